"""The labeling form, read and checked before anything is sent to the server.

Pure functions over the submitted fields and the task's completion ids; a problem is a
`FormProblem` whose message names the response and what is wrong, in words a labeler can
act on. Ranks are "competition" ranks: 1 is best, equal numbers tie, gaps are allowed
(1, 1, 3, 4 is the order [a = b] > c > d).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rlhf.v1 import feedback_pb2
from webapp.config import MAX_COMMENT_CHARS, MAX_DEMONSTRATION_CHARS

Action = Literal["submit", "skip", "none_acceptable"]
ACTIONS: tuple[str, ...] = ("submit", "skip", "none_acceptable")
LIKERT = range(1, 8)
RATING_FLAGS: tuple[str, ...] = tuple(f.name for f in feedback_pb2.RatingFlags.DESCRIPTOR.fields)
# The paper's metadata (Ouyang et al. 2022, Table 3), as a labeler reads it.
FLAG_LABELS: dict[str, str] = {
    "fails_to_follow_instruction": "Fails to follow the correct instruction / task",
    "inappropriate_for_customer_assistant": "Inappropriate for a customer assistant",
    "hallucination": "Hallucination (makes things up)",
    "satisfies_constraint": "Satisfies the constraint given in the instruction",
    "sexual_content": "Contains sexual content",
    "violent_content": "Contains violent content",
    "encourages_violence_abuse_terrorism_self_harm": "Encourages or fails to discourage violence, abuse, terrorism or self-harm",
    "denigrates_protected_class": "Denigrates a protected class",
    "gives_harmful_advice": "Gives harmful advice",
    "expresses_opinion": "Expresses an opinion",
    "expresses_moral_judgement": "Expresses a moral judgement",
}


class FormProblem(ValueError):
    """The form cannot be sent as it is; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Rating:
    completion_id: str
    overall: int
    flags: dict[str, bool]


@dataclass(frozen=True)
class LabelForm:
    """The fields of one submitted labeling form, raw (as typed), keyed by completion id."""

    request_id: str
    task_id: str
    action: Action
    ranks: dict[str, str]
    overall: dict[str, str]
    flags: dict[str, list[str]]
    demonstration: str
    comment: str


# Column headers of the ratings report (the full label is the header's title).
FLAG_SHORT: dict[str, str] = {
    "fails_to_follow_instruction": "fails instruction", "inappropriate_for_customer_assistant": "inappropriate",
    "hallucination": "hallucination", "satisfies_constraint": "satisfies constraint", "sexual_content": "sexual",
    "violent_content": "violent", "encourages_violence_abuse_terrorism_self_harm": "encourages violence",
    "denigrates_protected_class": "denigrates", "gives_harmful_advice": "harmful advice",
    "expresses_opinion": "opinion", "expresses_moral_judgement": "moral judgement",
}  # fmt: skip


def flag_label(name: str) -> str:
    return FLAG_LABELS.get(name, name.replace("_", " ").capitalize())


def read_label_form(fields: Mapping[str, str], flag_lists: Mapping[str, list[str]],
                    completion_ids: Sequence[str]) -> LabelForm:  # fmt: skip
    """The form's values for this task's completions (fields of other ids are ignored).
    `flag_lists` holds the repeated `flag_<id>` checkbox values."""
    action = fields.get("action", "submit")
    if action not in ACTIONS:
        raise FormProblem(f"unknown action {action!r}: use Submit, Skip or None of these is acceptable")
    return LabelForm(
        request_id=check_request_id(fields.get("request_id", "")),
        task_id=fields.get("task_id", ""),
        action=action,  # type: ignore[arg-type]
        ranks={cid: fields.get(f"rank_{cid}", "").strip() for cid in completion_ids},
        overall={cid: fields.get(f"overall_{cid}", "").strip() for cid in completion_ids},
        flags={cid: list(flag_lists.get(cid, [])) for cid in completion_ids},
        demonstration=fields.get("demonstration", "").replace("\r\n", "\n"),
        comment=fields.get("comment", "").strip(),
    )


def check_request_id(text: str) -> str:
    """The form's request_id: a uuid4 rendered into it (every RPC id is derived from it)."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise FormProblem("the form has no valid request_id: reload the page for a fresh form") from None


def parse_ranking(ranks: Mapping[str, str], completion_ids: Sequence[str]) -> list[list[str]]:
    """Best-first groups of completion ids from each response's rank 1..K (equal ranks tie).

    Raises FormProblem naming the first response whose rank is missing, not a whole
    number or outside 1..K, or saying that everything is tied.
    """
    k = len(completion_ids)
    values: dict[str, int] = {}
    for number, cid in enumerate(completion_ids, start=1):
        raw = ranks.get(cid, "").strip()
        if not raw:
            raise FormProblem(f"response {number} has no rank: give every response a rank from 1 (best) to {k}; "
                              "equal ranks are ties")
        try:
            value = int(raw)
        except ValueError:
            raise FormProblem(f"response {number}'s rank {raw!r} is not a whole number: use 1 (best) to {k}") from None
        if not 1 <= value <= k:
            raise FormProblem(f"response {number}'s rank {value} is outside 1..{k}: use 1 (best) to {k}")
        values[cid] = value
    if len(set(values.values())) == 1:
        raise FormProblem(f"all {k} responses have rank {next(iter(values.values()))}: a ranking says which are "
                          "better, so give at least two different ranks (or use Skip / None of these is acceptable)")
    return [[cid for cid in completion_ids if values[cid] == rank] for rank in sorted(set(values.values()))]


def parse_ratings(overall: Mapping[str, str], flags: Mapping[str, list[str]],
                  completion_ids: Sequence[str]) -> list[Rating]:  # fmt: skip
    """The optional Likert score (1..7) and flags of each response; a response with
    neither is not rated. Flags need a score: the paper's form asks for both."""
    ratings = []
    for number, cid in enumerate(completion_ids, start=1):
        raw, names = overall.get(cid, "").strip(), flags.get(cid, [])
        unknown = sorted(set(names) - set(RATING_FLAGS))
        if unknown:
            raise FormProblem(f"response {number}: unknown flag {unknown[0]!r}")
        if not raw:
            if names:
                raise FormProblem(f"response {number} has flags but no overall score: pick 1 (worst) to 7 (best) "
                                  "for it, or clear its flags")
            continue
        try:
            score = int(raw)
        except ValueError:
            raise FormProblem(f"response {number}'s overall score {raw!r} is not a whole number 1..7") from None
        if score not in LIKERT:
            raise FormProblem(f"response {number}'s overall score {score} is outside 1..7")
        ratings.append(Rating(cid, score, {name: name in names for name in RATING_FLAGS}))
    return ratings


def check_lengths(form: LabelForm) -> None:
    """The server's limits, checked here so a too-long text is refused before anything is stored."""
    if len(form.demonstration) > MAX_DEMONSTRATION_CHARS:
        raise FormProblem(f"the demonstration is {len(form.demonstration):,} characters; at most "
                          f"{MAX_DEMONSTRATION_CHARS:,} are accepted: shorten it and submit again", status=413)
    if len(form.comment) > MAX_COMMENT_CHARS:
        raise FormProblem(f"the note is {len(form.comment):,} characters; at most {MAX_COMMENT_CHARS:,} are accepted",
                          status=413)


def rpc_request_id(request_id: str, part: str, completion_id: str | None = None) -> str:
    """The per-RPC request_id derived from the form's: a replayed form repeats every one."""
    return f"{request_id}/{part}" if completion_id is None else f"{request_id}/{part}/{completion_id}"
