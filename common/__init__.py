"""Contracts shared by the server and the trainer: the store, identities and splits,
the checkpoint format, and the models. Nothing here imports grpc, vllm or the trainer.

Importing this package also fixes one process setting that must precede ``import grpc``,
so every product package (server, trainer, clients, webapp, bench) imports it first, in
its own ``__init__``: gRPC's fork support is OFF unless the environment says otherwise.
With it on, grpcio >= 1.81 restarts its poller in a forked child, which can find the
epoll fd already closed and abort the child before it execs ("epoll_wait error: Bad file
descriptor", grpc/grpc#43055; reproduced here, 2026-12-05, by repeating tests/test_label_tui.py's
spawn of `rlhf label` beside a serving gRPC thread: an abort at spawn 37 of 40, none in 160
with it off). Our processes fork children that never use
gRPC (subprocesses that exec, vLLM's engine processes), so they need no fork handlers.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
