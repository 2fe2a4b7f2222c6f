"""A simulated labeler: ranks completions by a HIDDEN RULE, with calibrated noise.

Demos and tests need labels without people. A `SimulatedLabeler` scores each of a task's
K completions with a rule (a function of the prompt and the completion text, higher is
better) and submits the best-first order, ties where the rule ties.

Noise. The paper's labelers agree with each other 72.6% of the time; a simulated labeler
who gets each pair wrong with probability p agrees with the rule 1 - p of the time, and two
of them agree (1 - p)^2 + p^2 = 1 - 2p(1 - p) of the time (p = 0.16: 84% and 73%). Two
obvious ways to add noise do NOT give that:

- flipping each pair independently yields a tournament, which is often not a ranking
  (a > b > c > a); repairing it changes the flip rate;
- adding noise to the scores flips close pairs more than distant ones, so the pairwise
  error depends on the score gaps of the samples instead of being p.

`noisy_ranking` uses a mixture that IS exact: with probability 1 - 2p the labeler follows
the rule; with probability 2p it is inattentive and orders the K completions uniformly at
random. Each untied pair is then reversed with probability 2p * 1/2 = p, whatever its gap,
and two labelers with independent random streams agree with probability 1 - 2p(1 - p) on
each pair. The price: errors are correlated within one ranking (a ranking is either right
or random), which is a real failure mode of human labelers (a lapse of attention), and
one the reward model sees as whole noisy batch elements. p is limited to [0, 0.5].

Rules. `concise_polite` (the default) is graded: closeness of the word count to 20 words,
politeness words, overlap with the prompt's content words, a penalty for digits, so K
samples of one prompt almost always score differently and every ranking carries signal;
a policy can move toward it (shorter, politer, on topic, no digits). Measured on the
base SmolLM2-135M (48 replies to 12 shipped prompts, temperature 1, 64 new tokens):
score mean 0.47, sd 0.27; no group of K = 4 fully tied; its yes/no reading
(`meets_concise_polite`: 8..30 words, no digits) met by 4.2% (2/48). `short_no_digits`
is that yes/no rule as a score (the PPO scratch experiment's: ~3% at a 48-token cap);
it ties most samples, so rankings under it carry little.

Ratings (`run(rate=True)`, the demo's labelers): each completion of a ranked task also gets
a Likert score and flags from the SAME hidden score: the score's place in the rule's range
(`SCORE_RANGES`, or `score_range` for a rule of your own) mapped onto 1..7, and the flags
that reading implies (`rate`). A task whose rule ties every completion is declined as
SKIPPED (`Feedback.DeclineTask`): the labeler has no judgement to give.

The client side speaks the gRPC contract only (`rlhf.v1` stubs).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
import uuid
from typing import Callable, Container, Sequence

import grpc

from rlhf.v1 import feedback_pb2

log = logging.getLogger(__name__)

Rule = Callable[[str, str], float]
Groups = list[list[int]]

# Each untied pair reversed with this probability: two such labelers agree 73% of the time,
# as the paper's did (72.6%). The demo's labelers and the benches that imitate them use it.
NOISE_P = 0.16

_WORD = re.compile(r"[A-Za-z']+")
POLITE_WORDS = frozenset({"please", "thank", "thanks", "glad", "happy", "hope", "welcome", "sorry"})
_STOPWORDS = frozenset(
    """about above after again also because been before being could does doing down each
    from have having here into just more most other over same should some such than that
    their them then there these they this those through under until very what when where
    which while with would your yours give tell write make explain""".split()
)
TARGET_WORDS = 20


def words(text: str) -> list[str]:
    """Lower-cased alphabetic words (digits and punctuation dropped)."""
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> set[str]:
    """Words of 4+ letters that are not stop words: what a relevant answer would reuse."""
    return {w for w in words(text) if len(w) >= 4 and w not in _STOPWORDS}


def concise_polite(prompt: str, completion: str) -> float:
    """Graded hidden rule, higher is better; range about [-0.5, 2.0].

    length  = 1 / (1 + |words - 20| / 10)          1 at 20 words, 0.33 at 0 or 40, 0.2 at 60
    polite  = 0.25 * min(#polite words, 2)          "please", "thanks", "glad", ...
    overlap = 0.5 * share of the prompt's content words the reply uses
    digits  = -0.5 if the reply contains any digit
    """
    reply_words = words(completion)
    length = 1.0 / (1.0 + abs(len(reply_words) - TARGET_WORDS) / 10.0)
    polite = 0.25 * min(sum(w in POLITE_WORDS for w in reply_words), 2)
    wanted = content_words(prompt)
    overlap = 0.5 * len(wanted & set(reply_words)) / len(wanted) if wanted else 0.0
    digits = -0.5 if any(ch.isdigit() for ch in completion) else 0.0
    return length + polite + overlap + digits


def short_no_digits(prompt: str, completion: str) -> float:
    """Binary rule: 1.0 for replies of 8..30 words without digits, else 0.0."""
    n = len(completion.split())
    return float(8 <= n <= 30 and not any(ch.isdigit() for ch in completion))


RULES: dict[str, Rule] = {"concise_polite": concise_polite, "short_no_digits": short_no_digits}
# Each rule's range of scores (lowest, highest): a rating maps it onto the Likert scale 1..7.
SCORE_RANGES: dict[str, tuple[float, float]] = {"concise_polite": (-0.5, 2.0), "short_no_digits": (0.0, 1.0)}
LIKERT_MIN, LIKERT_MAX = 1, 7


def meets_concise_polite(prompt: str, completion: str) -> bool:
    """The yes/no reading of the default rule, for base rates: 8..30 words, no digits."""
    return short_no_digits(prompt, completion) == 1.0


def rule_from_name(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"Unknown rule: {name!r} (expected one of {sorted(RULES)})")
    return RULES[name]


# ------------------------------------------------------------------------------- ranking


def groups_by_score(scores: Sequence[float]) -> Groups:
    """Indexes grouped by equal score, best group first: [0.2, 0.9, 0.2] -> [[1], [0, 2]]."""
    groups: Groups = []
    for i in sorted(range(len(scores)), key=lambda j: (-scores[j], j)):
        if groups and scores[groups[-1][0]] == scores[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def noisy_ranking(scores: Sequence[float], p: float, rng: random.Random) -> Groups:
    """The rule's order (ties kept) with probability 1 - 2p, else a uniformly random strict
    order: every pair the rule does not tie comes out reversed with probability exactly p."""
    if not 0.0 <= p <= 0.5:
        raise ValueError(f"noise p must be in [0, 0.5], got {p}")
    if rng.random() < 2.0 * p:
        order = list(range(len(scores)))
        rng.shuffle(order)
        return [[i] for i in order]
    return groups_by_score(scores)


def likert(score: float, score_range: tuple[float, float]) -> int:
    """The score's place in the rule's range on the 1..7 scale: lowest -> 1, highest -> 7.
    (-0.5, 2.0): 0.75 -> 4, 2.0 -> 7, -0.5 -> 1; a score outside the range is clipped."""
    low, high = score_range
    place = min(max((score - low) / (high - low), 0.0), 1.0)
    return LIKERT_MIN + round(place * (LIKERT_MAX - LIKERT_MIN))


def rating_flags(overall: int, lowest: bool) -> dict[str, bool]:
    """The metadata flags a rule's reading implies: a completion rated 1..2, or the task's
    lowest-scored one rated 3 or less, fails to follow the instruction (the rule is what the
    labeler reads the instruction as); one rated 6..7 satisfies its constraints. A rule says
    nothing about the other flags (harm, opinions, ...): they stay unset."""
    return {"fails_to_follow_instruction": overall <= 2 or (lowest and overall <= 3),
            "satisfies_constraint": overall >= 6}


def pairwise_agreement(groups_a: Groups, groups_b: Groups) -> tuple[int, int]:
    """(agreeing pairs, compared pairs) over the pairs BOTH orders rank strictly."""
    rank_a = {i: r for r, g in enumerate(groups_a) for i in g}
    rank_b = {i: r for r, g in enumerate(groups_b) for i in g}
    agree = total = 0
    items = sorted(rank_a)
    for x, i in enumerate(items):
        for j in items[x + 1 :]:
            da, db = rank_a[i] - rank_a[j], rank_b[i] - rank_b[j]
            if da and db:
                total += 1
                agree += (da > 0) == (db > 0)
    return agree, total


# ------------------------------------------------------------------------------ labeler


@dataclasses.dataclass
class LabelingReport:
    """What `SimulatedLabeler.run` did: submitted rankings, skipped tasks (the rule tied
    every completion), and calls refused by the server (code name -> count)."""

    submitted: int = 0
    skipped: int = 0
    comparisons: int = 0
    demonstrations: int = 0
    ratings: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)
    no_task: int = 0


_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class SimulatedLabeler:
    """A labeler with a hidden rule and pairwise noise p, deterministic given `seed`.

    `labeler_group` is descriptive here: the server takes the group from the caller's
    identity (the API key), so a "heldout" labeler needs a key issued in that group.
    `score_range` (lowest, highest score) places a score on the Likert scale; a named rule
    brings its own (`SCORE_RANGES`), a rule of your own needs one to rate.
    """

    def __init__(
        self,
        rule: str | Rule = "concise_polite",
        p: float = NOISE_P,
        seed: int = 0,
        labeler_group: str = "train",
        metadata: Sequence[tuple[str, str]] = (),
        score_range: tuple[float, float] | None = None,
    ) -> None:
        if not 0.0 <= p <= 0.5:
            raise ValueError(f"noise p must be in [0, 0.5], got {p}")
        self.rule = rule_from_name(rule) if isinstance(rule, str) else rule
        self.p = p
        self.labeler_group = labeler_group
        self.metadata = tuple(metadata)
        self.score_range = score_range or (SCORE_RANGES.get(rule) if isinstance(rule, str) else None)
        self._rng = random.Random(seed)
        self._rating_rng = random.Random(f"ratings-{seed}")  # its own stream: rating leaves the rankings as they were

    def rank(self, prompt: str, completions: Sequence[str]) -> Groups | None:
        """Best-first groups of completion indexes; None when the rule ties them all (any
        order would then be made up, so the labeler passes)."""
        scores = [self.rule(prompt, c) for c in completions]
        if len(set(scores)) == 1 and len(scores) > 1:
            return None
        return noisy_ranking(scores, self.p, self._rng)

    def rate(self, prompt: str, completions: Sequence[str]) -> list[tuple[int, dict[str, bool]]]:
        """(Likert 1..7, flags) per completion, from the hidden scores the ranking follows
        (`likert`, `rating_flags`). In a lapse of attention (probability 2p, as for rankings)
        the task's scores are uniformly random instead."""
        if self.score_range is None:
            raise ValueError("rating needs the rule's score_range (lowest, highest score)")
        scores = [self.rule(prompt, c) for c in completions]
        lapse = self._rating_rng.random() < 2.0 * self.p
        overall = [self._rating_rng.randint(LIKERT_MIN, LIKERT_MAX) if lapse else likert(s, self.score_range)
                   for s in scores]  # fmt: skip
        lowest = min(scores)
        return [(o, rating_flags(o, s == lowest)) for o, s in zip(overall, scores)]

    def best_completion(self, task: feedback_pb2.ComparisonTask) -> str:
        """The completion the rule likes best: what this labeler would write as a demonstration
        (chosen among the K drafts it was shown, noise-free: a demonstration is written with care)."""
        texts = [c.text for c in task.completions]
        return max(texts, key=lambda text: self.rule(task.prompt_text, text))

    def rank_task(self, task: feedback_pb2.ComparisonTask) -> list[list[str]] | None:
        """Groups of completion ids for a leased task (None: pass)."""
        groups = self.rank(task.prompt_text, [c.text for c in task.completions])
        if groups is None:
            return None
        ids = [c.completion_id for c in task.completions]
        return [[ids[i] for i in group] for group in groups]

    def run(self, client, n_tasks: int, *, k: int = 0, timeout: float = 60.0, demonstrations: int = 0,
            demonstrate_on: Container[str] | None = None, rate: bool = False) -> LabelingReport:
        """Lease, rank and submit up to `n_tasks` tasks through a `FeedbackStub`; stops early
        when the queue is empty (NOT_FOUND). A task the rule cannot order (all tied) is
        declined as SKIPPED. Transient failures are retried with the same request_id, which
        the server answers idempotently. For the first `demonstrations` tasks (of prompts in
        `demonstrate_on`, when given) the labeler also submits a demonstration: the best of
        the task's drafts by its rule (``best_completion``), so demonstrations follow the
        labeler's preference whatever it is. With `rate`, every completion of a ranked task
        is also rated (`rate`: Likert 1..7 and flags, by the same rule)."""
        report = LabelingReport()
        for _ in range(n_tasks):
            try:
                task = self._call(client.NextComparison, feedback_pb2.NextComparisonRequest(k=k, request_id=_new_id()), timeout)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    report.no_task += 1
                    break
                raise
            groups = self.rank_task(task)
            if groups is None:
                self._call(client.DeclineTask, feedback_pb2.DeclineTaskRequest(
                    request_id=_new_id(), task_id=task.task_id, reason=feedback_pb2.SKIPPED,
                    comment="my rule ties every completion"), timeout)  # fmt: skip
                report.skipped += 1
                continue
            request = feedback_pb2.SubmitRankingRequest(
                request_id=_new_id(),
                task_id=task.task_id,
                prompt_id=task.prompt_id,
                ranking=[feedback_pb2.RankGroup(completion_ids=g) for g in groups],
            )
            try:
                response = self._call(client.SubmitRanking, request, timeout)
            except grpc.RpcError as err:
                name = err.code().name
                report.refused[name] = report.refused.get(name, 0) + 1
                log.warning("ranking refused: %s %s", name, err.details())
                continue
            report.submitted += 1
            report.comparisons += response.comparisons
            if rate:
                report.ratings += self._rate_task(client, task, timeout)
            if report.demonstrations < demonstrations and (demonstrate_on is None or task.prompt_id in demonstrate_on):
                self._call(client.SubmitDemonstration, feedback_pb2.SubmitDemonstrationRequest(
                    request_id=_new_id(), prompt_id=task.prompt_id, response=self.best_completion(task)), timeout)
                report.demonstrations += 1
        return report

    def _rate_task(self, client, task: feedback_pb2.ComparisonTask, timeout: float) -> int:
        """Submit a rating of each of the task's completions; return how many."""
        for completion, (overall, flags) in zip(task.completions, self.rate(task.prompt_text,
                                                                         [c.text for c in task.completions])):
            self._call(client.SubmitRating, feedback_pb2.SubmitRatingRequest(
                request_id=_new_id(), completion_id=completion.completion_id, overall=overall,
                flags=feedback_pb2.RatingFlags(**flags)), timeout)  # fmt: skip
        return len(task.completions)

    def _call(self, method, request, timeout: float, attempts: int = 5):
        for attempt in range(attempts):
            try:
                return method(request, metadata=self.metadata, timeout=timeout)
            except grpc.RpcError as err:
                if err.code() not in _RETRYABLE or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")


def _new_id() -> str:
    return uuid.uuid4().hex
