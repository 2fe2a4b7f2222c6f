"""`rlhf query "..."`: ask the served policy, streaming the reply to the terminal.

    rlhf query "What is the capital of France?" --temperature 0
    rlhf query "Name a colour" --n 3 --seed 7 --target host:50051 --key rlhf_...

The key comes from --key or $RLHF_API_KEY; the target from --target, $RLHF_TARGET or
127.0.0.1:50051. With --n > 1, sample 0 streams live and the others print as they finish.
A summary line (version, prompt id, tokens, finish reason) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

import grpc

from clients.client import RlhfClient
from rlhf.v1 import common_pb2, inference_pb2

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_ABORT: "abort"}


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--target, --key, --tls-root-cert, --user-id: shared by the client commands."""
    parser.add_argument("--target", default=None, help="host:port (default: $RLHF_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--key", default=None, help="API key (default: $RLHF_API_KEY)")
    parser.add_argument("--tls-root-cert", default=None, help="PEM file to trust (enables TLS)")
    parser.add_argument("--user-id", default=None, help="caller name for a server in open mode (no keys)")


def connect(args: argparse.Namespace) -> RlhfClient:
    return RlhfClient(args.target, args.key, root_cert=args.tls_root_cert, user_id=args.user_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf query", description="Ask the served policy.")
    parser.add_argument("prompt", help="the prompt (one user turn of the chat template)")
    parser.add_argument("--system", default=None, help="a system turn before the prompt")
    parser.add_argument("--n", type=int, default=1, help="samples, 1..9")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the server default")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    add_connection_flags(parser)
    return parser


def stream_to(out: TextIO, events: Sequence[inference_pb2.GenerateStreamResponse] | object,
              n: int) -> list[common_pb2.Completion]:
    """Print sample 0 as it streams and the others when they finish; return the completions."""
    done: list[common_pb2.Completion] = []
    for event in events:  # type: ignore[attr-defined]
        if event.index == 0:
            out.write(event.text_delta)
            out.flush()
        if event.HasField("completion"):
            done.append(event.completion)
            if event.index == 0 and n > 1:
                out.write("\n")
            elif event.index > 0:
                out.write(f"\n--- sample {event.index} ---\n{event.completion.text}\n")
    if n == 1:
        out.write("\n")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.system is not None:
        request = dict(messages=[("system", args.system), ("user", args.prompt)], **sampling)
    else:
        request = dict(prompt=args.prompt, **sampling)
    try:
        with connect(args) as client:
            done = stream_to(sys.stdout, client.generate_stream(timeout=args.timeout, **request), args.n)
    except grpc.RpcError as e:
        print(f"rlhf query: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    for c in sorted(done, key=lambda c: c.index):
        print(f"[sample {c.index}: policy v{c.policy_version}, {c.completion_tokens} tokens, "
              f"{FINISH.get(c.finish_reason, '?')}, completion {c.completion_id}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
