"""`rlhf label`: rank completions in the terminal, as a labeler.

The session leases a task (one prompt, K numbered responses), reads an order such as
`3>1=2>4` (best first; `>` separates groups, `=` ties), submits it and loops until `q`.
A malformed order is refused with the reason and asked again; nothing is sent until the
order names every response exactly once. Talks to the server through the generated
stubs only.

    rlhf label --target 127.0.0.1:50051 --key rlhf_...     # or RLHF_API_KEY=...
    rlhf label --user-id alice                               # a server in open mode (x-user-id)
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import uuid
from typing import Callable, Sequence

import grpc

from clients.query_cli import add_connection_flags, connect
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

HELP = "Order best first: `>` separates groups, `=` ties, e.g. 3>1=2>4. q quits."
_TOKEN = re.compile(r"\s*(\d+|[>=])\s*")


def parse_order(text: str, k: int) -> list[list[int]]:
    """Parse a best-first order of responses 1..k: "3>1=2>4" -> [[3], [1, 2], [4]].

    Raises ValueError saying what is wrong: garbage, an empty group, a number outside
    1..k, a number given twice or left out, or everything tied.
    """
    text = text.strip()
    if not text:
        raise ValueError(f"empty order: rank all {k} responses, e.g. {_example(k)}")
    position, tokens = 0, []
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unexpected {text[position]!r} at character {position + 1}: use numbers, '>' and '='")
        tokens.append(match.group(1))
        position = match.end()
    groups: list[list[int]] = [[]]
    expect_number = True
    for token in tokens:
        if token.isdigit():
            if not expect_number:
                raise ValueError(f"missing '>' or '=' before {token}")
            groups[-1].append(int(token))
        elif expect_number:
            raise ValueError(f"'{token}' needs a response number on each side")
        elif token == ">":
            groups.append([])
        expect_number = not token.isdigit()
    if expect_number:
        raise ValueError(f"the order ends with '{tokens[-1]}': a response number must follow it")
    _check_numbers([n for g in groups for n in g], k)
    if len(groups) == 1 and k > 1:
        raise ValueError("everything is tied: say which responses are better (use '>')")
    return groups


def _check_numbers(numbers: list[int], k: int) -> None:
    unknown = [n for n in numbers if not 1 <= n <= k]
    if unknown:
        raise ValueError(f"no response {unknown[0]}: the responses are numbered 1..{k}")
    seen: set[int] = set()
    for n in numbers:
        if n in seen:
            raise ValueError(f"response {n} appears twice")
        seen.add(n)
    missing = sorted(set(range(1, k + 1)) - seen)
    if missing:
        raise ValueError(f"missing response{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}: rank all {k}")


def _example(k: int) -> str:
    return ">".join(str(n) for n in range(1, k + 1))


def render_task(task: feedback_pb2.ComparisonTask, width: int = 88) -> str:
    """The prompt and its numbered responses, as the labeler sees them."""
    lines = ["=" * width, "PROMPT", ""]
    if len(task.messages) > 1:
        lines += [f"[{m.role}] {m.content}" for m in task.messages]
    else:
        lines += textwrap.wrap(task.prompt_text, width) or [""]
    for number, completion in enumerate(task.completions, start=1):
        lines += ["", f"--- response {number} " + "-" * (width - 15 - len(str(number)))]
        for paragraph in completion.text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
    lines += ["=" * width]
    return "\n".join(lines)


class LabelSession:
    """The interactive loop; `ask` reads one line (raises EOFError at the end of input)."""

    def __init__(
        self,
        stub: feedback_pb2_grpc.FeedbackStub,
        metadata: Sequence[tuple[str, str]],
        k: int = 0,
        ask: Callable[[str], str] = input,
        say: Callable[[str], None] = print,
        timeout: float = 300.0,
    ) -> None:
        self.stub, self.metadata, self.k = stub, tuple(metadata), k
        self.ask, self.say, self.timeout = ask, say, timeout
        self.submitted = 0

    def run(self) -> int:
        """Loop until `q` or end of input; return the process exit code."""
        try:
            while True:
                task = self._next_task()
                if task is None:
                    if self.ask("Nothing to label. Enter checks again, q quits: ").strip().lower() == "q":
                        break
                    continue
                if not self._label(task):
                    break
        except (EOFError, KeyboardInterrupt):
            self.say("")
        except grpc.RpcError as err:
            self.say(f"Server error: {err.code().name}: {err.details()}")
            return 1
        self.say(f"Bye: {self.submitted} ranking{'s' if self.submitted != 1 else ''} submitted.")
        return 0

    def _next_task(self) -> feedback_pb2.ComparisonTask | None:
        request = feedback_pb2.NextComparisonRequest(k=self.k, request_id=uuid.uuid4().hex)
        self.say("Fetching a task (the server samples the responses now)...")
        try:
            return self.stub.NextComparison(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                self.say(f"{err.details()}")
                return None
            raise

    def _label(self, task: feedback_pb2.ComparisonTask) -> bool:
        """Show one task, read an order, submit it. False when the labeler quits."""
        k = len(task.completions)
        self.say(render_task(task))
        self.say(HELP)
        request_id = uuid.uuid4().hex  # one id per task: a resubmission is a safe retry
        while True:
            answer = self.ask(f"Order of responses 1..{k}: ").strip()
            if answer.lower() in {"q", "quit", "exit"}:
                return False
            try:
                groups = parse_order(answer, k)
            except ValueError as err:
                self.say(f"Not a valid order: {err}. Try again.")
                continue
            ids = [c.completion_id for c in task.completions]
            request = feedback_pb2.SubmitRankingRequest(
                request_id=request_id,
                task_id=task.task_id,
                prompt_id=task.prompt_id,
                ranking=[feedback_pb2.RankGroup(completion_ids=[ids[n - 1] for n in g]) for g in groups],
            )
            try:
                response = self.stub.SubmitRanking(request, metadata=self.metadata, timeout=self.timeout)
            except grpc.RpcError as err:
                self.say(f"Refused ({err.code().name}): {err.details()}")
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue  # same request_id: retrying cannot store it twice
                return True  # e.g. the lease expired: move on to a fresh task
            self.submitted += 1
            self.say(f"Saved ranking {response.ranking_id} ({response.comparisons} comparisons).")
            return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf label", description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=0, help="responses per task, 4..9 (0: the server's default)")
    add_connection_flags(parser)
    args = parser.parse_args(argv)
    if args.k and not 4 <= args.k <= 9:
        parser.error(f"--k must be 0 or 4..9, got {args.k}")
    with connect(args) as client:
        session = LabelSession(feedback_pb2_grpc.FeedbackStub(client.channel), client.metadata, k=args.k)
        return session.run()


if __name__ == "__main__":
    sys.exit(main())
