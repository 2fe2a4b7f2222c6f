"""The simulated labeler: its hidden rules, the noise model (pairwise agreement with the
rule 1 - p at every score gap, between two labelers 1 - 2p(1 - p)), determinism, and a
labeling loop against a real server."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from clients.prompts import load_prompts, sample_prompts
from clients.simulated_labeler import (
    SimulatedLabeler,
    concise_polite,
    groups_by_score,
    likert,
    meets_concise_polite,
    noisy_ranking,
    pairwise_agreement,
    rating_flags,
    short_no_digits,
)

# ------------------------------------------------------------------ rules


def test_concise_polite_by_hand() -> None:
    prompt = "How do I water basil plants?"  # content words: water, basil, plants
    twenty = " ".join(["word"] * 17) + " water basil thanks"  # 20 words, 2 of 3 content words, 1 polite
    # length 1/(1 + 0/10) = 1; polite 0.25·1; overlap 0.5·2/3; no digits
    assert concise_polite(prompt, twenty) == pytest.approx(1 + 0.25 + 1 / 3)
    forty = " ".join(["word"] * 40) + " 7"  # 40 words (digits are not words), a digit
    # length 1/(1 + 20/10) = 1/3; digits -0.5
    assert concise_polite(prompt, forty) == pytest.approx(1 / 3 - 0.5)
    assert concise_polite(prompt, "") == pytest.approx(1 / 3)  # 0 words: 1/(1 + 2)


def test_short_no_digits() -> None:
    assert short_no_digits("", "one two three four five six seven eight") == 1.0
    assert short_no_digits("", "one two three four five six seven 8") == 0.0
    assert short_no_digits("", "too short") == 0.0
    assert meets_concise_polite("", " ".join(["w"] * 31)) is False


def test_groups_by_score_ties_equal_scores() -> None:
    assert groups_by_score([0.2, 0.9, 0.2, 0.5]) == [[1], [3], [0, 2]]


# ------------------------------------------------------------------ noise


def agreement_over(rankings_a, rankings_b) -> tuple[int, int]:
    agree = total = 0
    for a, b in zip(rankings_a, rankings_b):
        x, n = pairwise_agreement(a, b)
        agree, total = agree + x, total + n
    return agree, total


def random_scores(rng: random.Random) -> list[float]:
    return [rng.random() for _ in range(rng.randint(4, 9))]


def tolerance(p: float, n: float) -> float:
    """4 standard deviations of a proportion p over n independent rankings. Pairs within
    one ranking are correlated (a ranking is right or random as a whole), so the count of
    RANKINGS, not pairs, sets the error; one Bernoulli per ranking bounds its variance."""
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.0, 0.16, 0.3, 0.5])
def test_agreement_with_the_rule_is_1_minus_p(p: float) -> None:
    rng = random.Random(1)
    scores = [random_scores(rng) for _ in range(4000)]
    noisy = [noisy_ranking(s, p, rng) for s in scores]
    agree, total = agreement_over(noisy, [groups_by_score(s) for s in scores])
    assert agree / total == pytest.approx(1 - p, abs=tolerance(max(p, 0.01), len(scores)))


def test_the_error_rate_does_not_depend_on_the_score_gap() -> None:
    """Unlike noisy scores, which flip close pairs far more often than distant ones."""
    p, rng = 0.16, random.Random(2)
    close, far = [0, 0], [0, 0]
    for _ in range(6000):
        scores = random_scores(rng)
        rank = {i: r for r, g in enumerate(noisy_ranking(scores, p, rng)) for i in g}
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                bucket = close if abs(scores[i] - scores[j]) < 0.1 else far if abs(scores[i] - scores[j]) > 0.5 else None
                if bucket is not None:
                    bucket[0] += (rank[i] < rank[j]) == (scores[i] > scores[j])
                    bucket[1] += 1
    for agree, total in (close, far):
        assert agree / total == pytest.approx(1 - p, abs=0.03)


@pytest.mark.parametrize("p", [0.16, 0.25])
def test_two_labelers_agree_1_minus_2p_1_minus_p(p: float) -> None:
    rng = random.Random(3)
    scores = [random_scores(rng) for _ in range(4000)]
    a, b = SimulatedLabeler(p=p, seed=10), SimulatedLabeler(p=p, seed=11)
    ranked_a = [noisy_ranking(s, p, a._rng) for s in scores]
    ranked_b = [noisy_ranking(s, p, b._rng) for s in scores]
    expected = 1 - 2 * p * (1 - p)  # p = 0.16: 0.7312, the paper's inter-labeler 72.6 ± 1.5%
    agree, total = agreement_over(ranked_a, ranked_b)
    assert agree / total == pytest.approx(expected, abs=tolerance(1 - expected, len(scores)))


def test_p_outside_0_to_half_is_refused() -> None:
    with pytest.raises(ValueError, match="noise p"):
        SimulatedLabeler(p=0.6)


def test_deterministic_given_a_seed() -> None:
    completions = [f"reply {'word ' * n}" for n in (3, 12, 20, 40, 25, 7)]
    labeler_a, labeler_b = SimulatedLabeler(p=0.3, seed=7), SimulatedLabeler(p=0.3, seed=7)
    rankings = [labeler_a.rank("Say hi", completions) for _ in range(50)]
    assert rankings == [labeler_b.rank("Say hi", completions) for _ in range(50)]
    assert len({str(r) for r in rankings}) > 1  # the noise does act


def test_identical_scores_are_tied_and_all_tied_is_a_pass() -> None:
    labeler = SimulatedLabeler(p=0.0)
    assert labeler.rank("q", ["same", "same", "a much longer reply than the others, surely", "x"]) is not None
    assert labeler.rank("q", ["same"] * 4) is None
    groups = labeler.rank("q", ["same", "same", "three words here", "four words right here"])
    assert [0, 1] in [sorted(g) for g in groups]


# ------------------------------------------------------------------ ratings


def test_likert_places_a_score_in_the_rules_range() -> None:
    # (-0.5, 2.0), a span of 2.5: -0.25 is 0.1 of the way up, 1 + round(0.6) = 2; 0.5 is 0.4: 1 + round(2.4) = 3;
    # 0.75 is halfway: 4; 1.75 is 0.9: 1 + round(5.4) = 6; outside the range is clipped.
    assert [likert(s, (-0.5, 2.0)) for s in (-0.5, -0.25, 0.5, 0.75, 1.75, 2.0, 3.0, -1.0)] == [1, 2, 3, 4, 6, 7, 7, 1]
    assert [likert(s, (0.0, 1.0)) for s in (0.0, 1.0)] == [1, 7]


def test_rating_flags_follow_the_rating() -> None:
    assert rating_flags(2, lowest=False) == {"fails_to_follow_instruction": True, "satisfies_constraint": False}
    assert rating_flags(3, lowest=True)["fails_to_follow_instruction"] is True  # the task's worst, and poor
    assert rating_flags(3, lowest=False)["fails_to_follow_instruction"] is False
    assert rating_flags(5, lowest=True) == {"fails_to_follow_instruction": False, "satisfies_constraint": False}
    assert rating_flags(6, lowest=False)["satisfies_constraint"] is True


def test_ratings_come_from_the_same_score_as_the_ranking() -> None:
    labeler = SimulatedLabeler(rule="short_no_digits", p=0.0)
    ratings = labeler.rate("q", ["eight words of reply without any digit here", "has 1 digit", "x"])
    assert [overall for overall, _ in ratings] == [7, 1, 1]
    assert [flags["fails_to_follow_instruction"] for _, flags in ratings] == [False, True, True]
    assert ratings[0][1]["satisfies_constraint"] is True
    with pytest.raises(ValueError, match="score_range"):
        SimulatedLabeler(rule=lambda prompt, text: 0.0).rate("q", ["a", "b"])
    # Rating draws from a stream of its own: rankings are what they were without it.
    with_ratings, without = SimulatedLabeler(p=0.3, seed=3), SimulatedLabeler(p=0.3, seed=3)
    texts = [f"reply {'word ' * n}" for n in (3, 12, 20, 40)]
    for _ in range(5):
        with_ratings.rate("q", texts)
    assert [with_ratings.rank("q", texts) for _ in range(20)] == [without.rank("q", texts) for _ in range(20)]


# ------------------------------------------------------------------ the shipped prompts


def test_the_shipped_prompt_set() -> None:
    prompts = load_prompts()
    assert 280 <= len(prompts) <= 320
    assert len({p.id for p in prompts}) == len(prompts) and len({p.text for p in prompts}) == len(prompts)
    assert 0.01 <= sum(p.pii for p in prompts) / len(prompts) <= 0.03
    assert len({p.category for p in prompts}) >= 8
    assert all(0 < len(p.text) <= 200 for p in prompts)
    assert [p.id for p in sample_prompts(5, seed=1)] == [p.id for p in sample_prompts(5, seed=1)]
    assert not any(p.pii for p in sample_prompts(400, include_pii=False))


def test_the_shipped_pii_prompts_are_found_by_the_hygiene_filter() -> None:
    from common.pii import find_pii

    for p in load_prompts():
        assert bool(find_pii(p.text)) == p.pii, p.text


# ------------------------------------------------------------------ the loop over gRPC


def test_run_labels_through_the_service(tiny_model_dir: Path, tmp_path: Path) -> None:
    import grpc

    from rlhf.v1 import feedback_pb2_grpc
    from server.engines.hf import HFEngine
    from test_feedback_harness import FeedbackServerThread, bearer, issue_key, seed_prompt

    with FeedbackServerThread(tmp_path / "store.sqlite", lambda: HFEngine(tiny_model_dir, 0), max_new_tokens=6) as server:
        key = issue_key(server.store, "sim-heldout", "labeler", "heldout")
        for i in range(2):
            seed_prompt(server.store, 0, text=f"Tell me about rivers, part {i}.")
        labeler = SimulatedLabeler(p=0.16, seed=0, labeler_group="heldout", metadata=bearer(key))
        with grpc.insecure_channel(server.target) as channel:
            report = labeler.run(feedback_pb2_grpc.FeedbackStub(channel), n_tasks=5, k=4)
        assert report.submitted + report.skipped == 2 and report.no_task == 1 and not report.refused
        stored = server.store.read_sync(lambda db: list(db.query("SELECT labeler_id, labeler_group, k FROM rankings")))
        assert stored == [{"labeler_id": "sim-heldout", "labeler_group": "heldout", "k": 4}] * report.submitted
        assert report.ratings == 0  # rating is the demo's choice (run(rate=True))


def test_the_labeler_rates_what_it_ranks_and_declines_what_it_cannot_order(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    import grpc

    from rlhf.v1 import feedback_pb2_grpc
    from server.engines.hf import HFEngine
    from test_feedback_harness import FeedbackServerThread, bearer, issue_key, seed_prompt

    def length(prompt: str, completion: str) -> float:  # any rule; a constant one for the second prompt
        return 0.0 if "constant" in prompt else float(len(completion))

    with FeedbackServerThread(tmp_path / "store.sqlite", lambda: HFEngine(tiny_model_dir, 0), max_new_tokens=6) as server:
        key = issue_key(server.store, "sim-r", "labeler", "A")
        seed_prompt(server.store, 0, text="Tell me about rivers.", now=2.0)
        seed_prompt(server.store, 0, text="A constant rule ties these.", now=1.0)  # older: offered second
        labeler = SimulatedLabeler(rule=length, p=0.0, metadata=bearer(key), score_range=(0.0, 60.0))
        with grpc.insecure_channel(server.target) as channel:
            report = labeler.run(feedback_pb2_grpc.FeedbackStub(channel), n_tasks=3, k=4, rate=True)
        rows = server.store.read_sync(lambda db: [tuple(r) for r in db.execute(
            "SELECT t.status, t.decline_reason, p.text FROM comparison_tasks t JOIN prompts p ON p.id = t.prompt_id "
            "ORDER BY p.created_at")])  # fmt: skip
        ratings = server.store.read_sync(lambda db: [tuple(r) for r in db.execute(
            "SELECT r.labeler_id, r.overall, c.prompt_id FROM ratings r JOIN completions c ON c.id = r.completion_id")])
    # The river task is ranked and its 4 completions rated (unless its samples all tie too).
    assert report.submitted + report.skipped == 2 and report.ratings == 4 * report.submitted == len(ratings)
    assert all(who == "sim-r" and 1 <= overall <= 7 for who, overall, _ in ratings)
    assert rows[0] == ("declined", "skipped", "A constant rule ties these.")


def test_a_demonstration_is_the_best_draft_by_the_labelers_own_rule(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Demonstrations follow the labeler's preference, whatever it is: the best of the task's K
    drafts by its rule, stored as the labeler's demonstration for the task's prompt."""
    import grpc

    from rlhf.v1 import feedback_pb2_grpc
    from server.engines.hf import HFEngine
    from test_feedback_harness import FeedbackServerThread, bearer, issue_key, seed_prompt

    def longest(prompt: str, completion: str) -> float:  # any rule: here, the longest draft wins
        return float(len(completion))

    with FeedbackServerThread(tmp_path / "store.sqlite", lambda: HFEngine(tiny_model_dir, 0), max_new_tokens=6) as server:
        key = issue_key(server.store, "sim-a", "labeler", "A")
        prompt_ids = [seed_prompt(server.store, 0, text=f"Tell me about rivers, part {i}.")[0] for i in range(4)]
        labeler = SimulatedLabeler(rule=longest, p=0.0, seed=0, labeler_group="A", metadata=bearer(key))
        with grpc.insecure_channel(server.target) as channel:  # demonstrations only for the chosen prompts
            report = labeler.run(feedback_pb2_grpc.FeedbackStub(channel), n_tasks=4, k=4, demonstrations=3,
                                 demonstrate_on=set(prompt_ids[1:3]))
        assert report.submitted == 4 and report.demonstrations == 2
        demos = server.store.read_sync(lambda db: list(db.query(
            "SELECT d.prompt_id, d.response, d.labeler_id FROM demonstrations d ORDER BY d.created_at")))
        assert len(demos) == 2 and all(d["labeler_id"] == "sim-a" for d in demos)
        assert {d["prompt_id"] for d in demos} == set(prompt_ids[1:3])
        for demo in demos:
            drafts = server.store.read_sync(lambda db: [r["text"] for r in db.query(
                "SELECT text FROM completions WHERE prompt_id = ? AND purpose = 'label'", [demo["prompt_id"]])])
            assert len(demo["response"]) == max(len(t) for t in drafts)


# ------------------------------------------------------------------ signal on the base model


@pytest.mark.slow
def test_the_default_rule_gives_signal_on_the_base_model(embedded_model_dir: Path) -> None:
    """SmolLM2-135M's own samples (temperature 1, 48 new tokens, fixed seeds): the graded
    rule orders most pairs of a prompt's K = 4 samples, so rankings carry information.
    (Its yes/no reading is met by a few percent of base-model replies: 2 of 48 when
    measured with 64 tokens; too rare for a test this small to assert.)"""
    import asyncio
    import statistics

    from server.engines.base import SamplingOptions
    from server.engines.hf import HFEngine

    async def sample_all() -> list[tuple[str, list[str]]]:
        engine = HFEngine(embedded_model_dir, 0, max_batch_size=24)
        await engine.start()
        try:
            async def one(index: int, text: str) -> tuple[str, list[str]]:
                replies = [""] * 4
                ids = engine.render_chat([{"role": "user", "content": text}])
                options = SamplingOptions(n=4, max_new_tokens=48, temperature=1.0, seed=index)
                async for update in engine.generate(f"rate-{index}", ids, options):
                    replies[update.index] += update.text_delta
                return text, replies

            return await asyncio.gather(*(one(i, p.text) for i, p in enumerate(sample_prompts(6, seed=0, include_pii=False))))
        finally:
            await engine.shutdown()

    groups = asyncio.run(sample_all())
    scores = [[concise_polite(prompt, reply) for reply in replies] for prompt, replies in groups]
    print("scores per prompt:", [[round(x, 3) for x in s] for s in scores])
    untied = sum(a != b for s in scores for i, a in enumerate(s) for b in s[i + 1:])
    assert all(len(set(s)) > 1 for s in scores)  # no prompt's samples all tied
    assert untied / (6 * len(scores)) >= 0.75  # most of the C(4, 2) = 6 pairs per prompt are ordered
    assert statistics.pstdev([x for s in scores for x in s]) > 0.1
