// The labeling page's keyboard and drag-and-drop ranking. The form works without this
// file: each response has a plain rank input. Nothing here touches HTML strings; texts
// are set with textContent.
"use strict";
(function () {
  const form = document.getElementById("label-form");
  if (!form) return;
  const list = document.getElementById("completions");
  const submit = document.getElementById("submit-ranking");
  const status = document.getElementById("kbd-status");
  const k = Number(form.dataset.k);

  const cards = () => Array.from(list.querySelectorAll(".completion"));
  const rankInput = (card) => card.querySelector(".rank-input");
  const say = (text) => { status.textContent = text; };

  function showRank(card) {
    const value = rankInput(card).value;
    card.querySelector(".rank-badge").textContent = value || "–";
    card.classList.toggle("ranked", value !== "");
  }

  function ranksFromOrder() {
    cards().forEach((card, i) => { rankInput(card).value = String(i + 1); showRank(card); });
    say("Ranks follow the order now: 1 at the top.");
  }

  function neighbour(card, step) {
    const all = cards();
    return all[all.indexOf(card) + step] || null;
  }

  cards().forEach(showRank);
  list.addEventListener("input", (event) => {
    const card = event.target.closest(".completion");
    if (card && event.target.classList.contains("rank-input")) showRank(card);
  });
  // A click on a card's title focuses the card, ready for a digit.
  list.addEventListener("click", (event) => {
    if (event.target.closest(".card-head h3, .grip")) event.target.closest(".completion").focus();
  });

  // ------------------------------------------------------------ keyboard
  list.addEventListener("keydown", (event) => {
    const card = event.target;
    // Only when the card itself has focus: typing in its fields stays typing.
    if (!card.classList || !card.classList.contains("completion")) return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const key = event.key;
    if (/^[1-9]$/.test(key)) {
      event.preventDefault();
      const rank = Number(key);
      if (rank > k) { say(`Ranks go from 1 to ${k}.`); return; }
      rankInput(card).value = key;
      showRank(card);
      say(`Response ${card.dataset.number}: rank ${rank}.`);
      (neighbour(card, 1) || submit).focus();
    } else if (key === "0" || key === "Backspace" || key === "Delete") {
      event.preventDefault();
      rankInput(card).value = "";
      showRank(card);
    } else if (key === "Enter") {
      event.preventDefault();
      form.requestSubmit(submit);
    } else if (key === "ArrowDown" || key === "ArrowUp") {
      event.preventDefault();
      const step = key === "ArrowDown" ? 1 : -1;
      const other = neighbour(card, step);
      if (!other) return;
      if (event.shiftKey) {
        if (step > 0) other.after(card); else other.before(card);
        ranksFromOrder();
        card.focus();
      } else {
        other.focus();
      }
    }
  });

  // ------------------------------------------------------------ drag and drop
  let dragged = null;
  const clearTargets = () => cards().forEach((c) => c.classList.remove("drop-target"));

  list.addEventListener("dragstart", (event) => {
    const card = event.target.closest && event.target.closest(".completion");
    if (!card) return;
    dragged = card;
    card.classList.add("dragging");
    event.dataTransfer.effectAllowed = "move";
    event.dataTransfer.setData("text/plain", card.dataset.number);
  });
  list.addEventListener("dragover", (event) => {
    const target = event.target.closest && event.target.closest(".completion");
    if (!dragged || !target) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
    clearTargets();
    if (target !== dragged) target.classList.add("drop-target");
  });
  list.addEventListener("drop", (event) => {
    const target = event.target.closest && event.target.closest(".completion");
    if (!dragged || !target) return;
    event.preventDefault();
    // The dragged response takes the target's place; the others shift by one.
    if (target !== dragged) {
      const all = cards();
      if (all.indexOf(dragged) < all.indexOf(target)) target.after(dragged); else target.before(dragged);
    }
    ranksFromOrder();
  });
  list.addEventListener("dragend", () => {
    if (dragged) dragged.classList.remove("dragging");
    dragged = null;
    clearTargets();
  });

  // ------------------------------------------------------------ long responses
  document.querySelectorAll(".completion-text.long").forEach((text) => {
    text.classList.add("collapsed");
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "toggle";
    toggle.textContent = "Show all";
    toggle.setAttribute("aria-expanded", "false");
    toggle.addEventListener("click", () => {
      const collapsed = text.classList.toggle("collapsed");
      toggle.textContent = collapsed ? "Show all" : "Show less";
      toggle.setAttribute("aria-expanded", String(!collapsed));
    });
    text.after(toggle);
  });

  // ------------------------------------------------------------ one submission per page
  // (the server stores a repeated form once anyway; this spares the round trip)
  form.addEventListener("submit", (event) => {
    if (form.dataset.sent) { event.preventDefault(); return; }
    form.dataset.sent = "1";
  });
  window.addEventListener("pageshow", () => { delete form.dataset.sent; });
})();
