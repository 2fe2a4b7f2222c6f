"""The `rlhf` command: one entry point that hands each subcommand to the module owning it.

Subcommands are imported lazily, so `rlhf query` never loads torch and `rlhf serve`
never loads the trainer. Each target is a `main(argv: list[str]) -> int | None`.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Order is the order `rlhf --help` shows.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.app:main", "run the gRPC inference/feedback/admin server"),
    "keys": ("server.keys_cli:main", "create, list and revoke API keys"),
    "query": ("clients.query_cli:main", "ask the served policy (streams to the terminal)"),
    "label": ("clients.label_tui:main", "rank completions interactively, as a labeler"),
    "web": ("webapp.app:main", "serve the labeling web app (rank, rate, demonstrate; admin pages)"),
    "export": ("clients.exchange_cli:export_main", "export rankings/demonstrations as JSONL"),
    "import": ("clients.exchange_cli:import_main", "import rankings/demonstrations from JSONL"),
    "train": ("trainer.cli:main", "run one training stage by hand: sft | rm | ppo"),
    "trainer": ("trainer.service:main", "run the scheduled trainer process"),
    "cycle": ("clients.admin_cli:cycle_main", "`rlhf cycle now`: ask for a training cycle now"),
    "cycles": ("clients.admin_cli:cycles_main", "show the history of training cycles and the ratings per version"),
    "policies": ("clients.admin_cli:policies_main", "list policies; swap or roll back"),
    "store": ("trainer.store_cli:main", "prune old data, back up or restore the store"),
    "users": ("clients.admin_cli:users_main", "`rlhf users erase USER --yes`: erase a user's data"),
    "labelers": ("clients.admin_cli:labelers_main", "labeler quality (agreement, gold tasks); `gold` sets a gold ranking"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: rlhf COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`rlhf COMMAND --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"rlhf: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
