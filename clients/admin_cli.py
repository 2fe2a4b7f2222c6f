"""Operator commands over the Admin service (role admin):

    rlhf cycle now [--reason TEXT]        ask the trainer for a training cycle now
    rlhf cycles [--limit N]               the history of training cycles
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

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from clients.client import RlhfClient
from clients.query_cli import add_connection_flags, connect
from rlhf.v1 import admin_pb2, common_pb2


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
    parser = argparse.ArgumentParser(prog="rlhf cycles", description="Show training cycles, newest first.")
    parser.add_argument("--limit", type=int, default=20)
    add_connection_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return _run(args, lambda client: format_cycles(client.list_cycles(args.limit)))


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
