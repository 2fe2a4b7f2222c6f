"""Operator commands over the Admin service (role admin):

    rlhf cycle now [--reason TEXT]        ask the trainer for a training cycle now
    rlhf cycles [--limit N]               the history of training cycles, and the ratings per version
    rlhf labelers                         labeler quality: work, time per task, agreement, gold
    rlhf labelers gold PROMPT 'a,b;c;d'   set a prompt's gold ranking (groups best first by ';',
                                          ties by ',')
    rlhf policies [--limit N]             published policies and their status
    rlhf policies swap N                  serve version N (verified before loading)
    rlhf policies rollback [N]            serve N, or the version served before this one
    rlhf users erase USER --yes           erase a user's data for good (README, "Users' data")

Connection flags (--target, --key or $RLHF_API_KEY, --tls-root-cert, --user-id) as for
`rlhf query`.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from clients.client import RlhfClient
from clients.query_cli import add_connection_flags, connect
from rlhf.v1 import admin_pb2, common_pb2, feedback_pb2


def _when(ts: Timestamp, present: bool = True) -> str:
    if not present or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return datetime.fromtimestamp(ts.seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def format_policies(policies: Sequence[common_pb2.Policy]) -> str:
    lines = [f"{'version':>7}  {'status':<9}  {'parent':>6}  {'cycle':>5}  {'created':<20}  path"]
    for p in policies:
        status = common_pb2.PolicyStatus.Name(p.status).removeprefix("POLICY_STATUS_").lower()
        parent = str(p.parent_version) if p.HasField("parent_version") else "-"
        cycle = str(p.cycle_id) if p.HasField("cycle_id") else "-"
        lines.append(f"v{p.version:>6}  {status:<9}  {parent:>6}  {cycle:>5}  {_when(p.created_at):<20}  {p.path}")
    return "\n".join(lines)


def format_cycles(cycles: Sequence[admin_pb2.Cycle]) -> str:
    lines = [f"{'id':>4}  {'state':<9}  {'stage':<9}  {'trigger':<8}  {'created':<20}  {'finished':<20}  "
             f"{'base':>4}  {'cand':>4}  error"]
    for c in cycles:
        state = admin_pb2.CycleState.Name(c.state).removeprefix("CYCLE_STATE_").lower()
        cand = f"v{c.candidate_version}" if c.HasField("candidate_version") else "-"
        base = f"v{c.base_version}" if c.base_version >= 0 else "-"
        lines.append(f"{c.cycle_id:>4}  {state:<9}  {c.stage or '-':<9}  {c.trigger:<8}  "
                     f"{_when(c.created_at, c.HasField('created_at')):<20}  "
                     f"{_when(c.finished_at, c.HasField('finished_at')):<20}  {base:>4}  {cand:>4}  {c.error}")
    return "\n".join(lines)


def format_swap(response: admin_pb2.SwapPolicyResponse) -> str:
    return (f"now serving v{response.version} (was v{response.previous_version}); requests stalled "
            f"{response.stall_seconds:.3f} s, new version served after {response.total_seconds:.3f} s")


def _run(args: argparse.Namespace, action: Callable[[RlhfClient], str]) -> int:
    try:
        with connect(args) as client:
            print(action(client))
    except grpc.RpcError as e:
        print(f"rlhf: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    return 0


def cycle_main(argv: Sequence[str] | None = None) -> int:
    """`rlhf cycle now`."""
    parser = argparse.ArgumentParser(prog="rlhf cycle", description="Ask the trainer for a cycle now.")
    parser.add_argument("when", choices=["now"])
    parser.add_argument("--reason", default="requested from the command line")
    add_connection_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))

    def trigger(client: RlhfClient) -> str:
        response = client.trigger_cycle(args.reason, request_id=uuid.uuid4().hex)
        state = admin_pb2.CycleState.Name(response.state).removeprefix("CYCLE_STATE_").lower()
        return f"cycle {response.cycle_id} {state}; follow it with `rlhf cycles`"

    return _run(args, trigger)


def cycles_main(argv: Sequence[str] | None = None) -> int:
    """`rlhf cycles`."""
    parser = argparse.ArgumentParser(prog="rlhf cycles", description="Show training cycles, newest first, "
                                     "and the labelers' ratings of each policy version's completions.")
    parser.add_argument("--limit", type=int, default=20)
    add_connection_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))

    def show(client: RlhfClient) -> str:
        cycles = format_cycles(client.list_cycles(args.limit))
        ratings = client.admin.GetRatingsReport(admin_pb2.GetRatingsReportRequest(), metadata=client.metadata)
        return f"{cycles}\n\nratings per policy version (Likert 1..7, 7 best)\n{format_ratings(ratings)}"

    return _run(args, show)


def format_ratings(report: admin_pb2.RatingsReport, top_flags: int = 3) -> str:
    """Per policy version: ratings, mean Likert score and the most frequent flags (the paper's Fig. 4)."""
    if not report.versions:
        return "no ratings yet (Feedback.SubmitRating)"
    lines = [f"{'version':>7}  {'ratings':>7}  {'mean':>5}  most frequent flags"]
    for v in report.versions:
        flags = sorted(((share, name) for name, share in v.flag_share.items() if share > 0), reverse=True)[:top_flags]
        shown = ", ".join(f"{name} {share:.0%}" for share, name in flags) or "none set"
        lines.append(f"v{v.policy_version:>6}  {v.ratings:>7}  {v.mean_overall:>5.2f}  {shown}")
    return "\n".join(lines)


# The paper's figure the agreement tables stand beside (Ouyang et al. 2022, section 3.4).
PAPER_AGREEMENT = "InstructGPT's training labelers agreed with each other 72.6 ± 1.5% of the time (Ouyang et al. 2022)"


def _share(message: Any, field: str) -> str:
    return f"{getattr(message, field):.1%}" if message.HasField(field) else "-"


def format_labeler_quality(quality: admin_pb2.LabelerQuality) -> str:
    """The per-labeler and per-group tables of Admin.GetLabelerQuality, beside the paper's figure."""
    lines = [f"{'labeler':<16}  {'group':<8}  {'done':>5}  {'declined':>8}  {'s/task':>7}  {'shared':>6}  "
             f"{'agree':>6}  {'gold':>4}  {'gold agree':>10}  flagged"]
    for s in quality.labelers:
        seconds = f"{s.median_seconds_per_task:.1f}" if s.HasField("median_seconds_per_task") else "-"
        lines.append(f"{s.labeler_id:<16}  {s.labeler_group or '-':<8}  {s.tasks_done:>5}  {s.tasks_declined:>8}  "
                     f"{seconds:>7}  {s.shared_tasks:>6}  {_share(s, 'pairwise_agreement'):>6}  {s.gold_tasks:>4}  "
                     f"{_share(s, 'gold_agreement'):>10}  {'yes: ' + s.flag_reason if s.flagged else ''}")
    lines += ["", f"{'group':<8}  {'labelers':>8}  {'shared sets':>11}  {'pairs':>6}  {'agreement':>9}  alpha (ordinal)"]
    for g in [*quality.groups, quality.overall]:
        alpha = f"{g.krippendorff_alpha:.3f}" if g.HasField("krippendorff_alpha") else "-"
        lines.append(f"{g.labeler_group or '(all)':<8}  {g.labelers:>8}  {g.shared_tasks:>11}  {g.pairs:>6}  "
                     f"{_share(g, 'pairwise_agreement'):>9}  {alpha}")
    lines += ["", PAPER_AGREEMENT + ".",
              f"Shared prompts {quality.overlap_share:.0%}, gold tasks {quality.gold_share:.0%} of requests; a labeler is "
              f"flagged below {quality.gold_min_agreement:.0%} gold agreement over {quality.gold_min_tasks}+ gold tasks."]
    return "\n".join(lines)


def parse_gold_ranking(text: str) -> list[list[str]]:
    """'a,b;c;d' -> [["a", "b"], ["c"], ["d"]]: groups best first, separated by ';', ties by ','."""
    return [[cid.strip() for cid in group.split(",")] for group in text.split(";")]


def labelers_main(argv: Sequence[str] | None = None) -> int:
    """`rlhf labelers [gold PROMPT_ID RANKING]`."""
    parser = argparse.ArgumentParser(
        prog="rlhf labelers", description="Labeler quality (work, time per task, agreement with each other and "
        "with gold rankings), or `gold PROMPT_ID 'id1,id2;id3;id4'` to set a prompt's gold ranking: completion "
        "ids best first, groups separated by ';', ties within a group by ','.")
    parser.add_argument("action", nargs="?", choices=["show", "gold"], default="show")
    parser.add_argument("prompt_id", nargs="?", default=None)
    parser.add_argument("ranking", nargs="?", default=None)
    add_connection_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.action == "show":
        return _run(args, lambda client: format_labeler_quality(client.admin.GetLabelerQuality(
            admin_pb2.GetLabelerQualityRequest(), metadata=client.metadata)))
    if args.prompt_id is None or args.ranking is None:
        parser.error("gold needs a prompt id and a ranking: rlhf labelers gold PROMPT_ID 'id1,id2;id3;id4'")
    request = admin_pb2.SetGoldRankingRequest(
        request_id=uuid.uuid4().hex, prompt_id=args.prompt_id,
        ranking=[feedback_pb2.RankGroup(completion_ids=g) for g in parse_gold_ranking(args.ranking)])

    def set_gold(client: RlhfClient) -> str:
        done = client.admin.SetGoldRanking(request, metadata=client.metadata)
        return (f"gold ranking of prompt {done.prompt_id} {'replaced' if done.replaced else 'set'}: "
                f"{done.comparisons} ordered pairs")

    return _run(args, set_gold)


def policies_main(argv: Sequence[str] | None = None) -> int:
    """`rlhf policies [swap N | rollback [N]]`."""
    parser = argparse.ArgumentParser(prog="rlhf policies", description="List, swap or roll back policies.")
    parser.add_argument("action", nargs="?", choices=["list", "swap", "rollback"], default="list")
    parser.add_argument("version", nargs="?", type=int, default=None)
    parser.add_argument("--limit", type=int, default=0)
    add_connection_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.action == "swap" and args.version is None:
        parser.error("swap needs a version: rlhf policies swap N")
    actions: dict[str, Callable[[RlhfClient], str]] = {
        "list": lambda client: format_policies(client.list_policies(args.limit)),
        "swap": lambda client: format_swap(client.swap_policy(args.version, request_id=uuid.uuid4().hex)),
        "rollback": lambda client: format_swap(client.rollback(args.version, request_id=uuid.uuid4().hex)),
    }
    return _run(args, actions[args.action])


def format_erasure(response: admin_pb2.EraseUserResponse) -> str:
    deleted = ", ".join(f"{table} {n}" for table, n in sorted(response.rows_deleted.items()) if n)
    return (f"erased user sha256:{response.user_id_sha256} at {_when(response.erased_at)}: deleted "
            f"{deleted or 'nothing'}; {response.audit_rows_pseudonymised} audit rows now name the hash")


def users_main(argv: Sequence[str] | None = None) -> int:
    """`rlhf users erase USER --yes`."""
    parser = argparse.ArgumentParser(
        prog="rlhf users", description="Erase a user: their prompts, completions, labeling work, keys and "
        "user row, and the feedback of others on their completions. Irreversible; erasing again is a no-op.")
    parser.add_argument("action", choices=["erase"])
    parser.add_argument("user", help="the user id to erase")
    parser.add_argument("--yes", action="store_true", help="confirm: the erasure cannot be undone")
    add_connection_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not args.yes:
        parser.error(f"erasing {args.user!r} cannot be undone: add --yes to confirm")
    return _run(args, lambda client: format_erasure(client.erase_user(args.user, request_id=uuid.uuid4().hex)))
