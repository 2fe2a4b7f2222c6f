"""`rlhf trainer`: the trainer process. It runs one training cycle at a time, forever.

Where cycles come from: every cycle is a row in the store's `cycles` table.
- APScheduler (3.x, a BackgroundScheduler) queues one on the configured schedule
  (`schedule = "interval"` every `interval_s`, or `"cron"` by a crontab expression);
- `Admin.TriggerCycle` (and `rlhf cycle now`, through it) makes the SERVER queue one;
- `rlhf trainer --once --trigger` queues one and runs it without any server.
The main thread polls the store every `poll_s` and claims the oldest queued cycle with
`claim_queued_cycle`, whose single UPDATE and the store's one-running-cycle index are the
lock: two trainer processes can never run cycles at once.

A trigger while a cycle runs is QUEUED, not refused: the server records it, and the
trainer runs it after the current one (triggers are requests for training on the data
that will be there by then). The scheduler coalesces: it queues nothing while a cycle is
queued or running, so a long cycle never builds a backlog of scheduled ones.

Upkeep: the same scheduler prunes old logged data nothing uses (`retention`, when
`retention.max_age_days` is set; first at start-up) and backs the store up (`backup`, every
`backup.every_hours`; first when the newest backup is that old): `trainer.maintenance`. They
run on the scheduler's threads, beside a cycle, which reads its own snapshot.

Crash safety: before claiming, running cycles whose trainer is gone are marked failed
(its pid no longer exists on this host, or no heartbeat for `stale_after_s`), so the
queue never wedges; each cycle then cleans up partial checkpoints itself
(`trainer.cycle.clean_up_after_crashes`). SIGTERM/SIGINT interrupt the running cycle,
which is recorded as failed ("interrupted"), and the process exits.

Metrics: ``trainer.metrics.TrainerMetrics`` (cycle states, the current stage and stage
durations, RM accuracy per labeler group, KL, reward, ptx loss, gate decisions), on their
own HTTP port when ``metrics_port`` is set (`rlhf trainer --set metrics_port=9101`).

Several processes (issue 16): under torchrun (`rlhf trainer --nproc-per-node N`, or
`torchrun --nproc-per-node N -m trainer.service ...` across nodes) rank 0 is this service
(the COORDINATOR: store, scheduler, metrics, snapshot, evaluation, publishing, swap) and the
other ranks only train, running each cycle's sft, rm and ppo stages data-parallel as the
coordinator sends them (``trainer.distributed.everywhere``/``follow``). A cycle whose
data-parallel stage failed on any rank (a rank killed, a hung peer) is recorded as failed
and ends the job with exit status 1: the ranks are out of step, and the launcher (torchrun's
`--max-restarts`, systemd's `Restart=`) starts them again. Every rank needs the same config,
model folders, checkpoints and work_dir paths (one node, or a shared file system).

Fault injection (tests): `RLHF_TRAINER_PAUSE_AT=<point>` makes the process stop at a
hook point (`stage:<name>`, `publish:<sft|ppo>:files_written`, `publish:<sft|ppo>:renamed`;
on a follower rank R, `rank<R>:<function>` as it starts a data-parallel stage, e.g.
`rank1:train_ppo`) and sleep until killed, after writing the point's name to stderr;
`RLHF_TRAINER_FAIL_AT=<point>` raises there instead, `RLHF_TRAINER_KILL_AT=<point>` SIGKILLs
the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from common.store import (
    ConflictError,
    Cycle,
    Store,
    claim_queued_cycle,
    create_cycle,
    fail_stale_cycles,
    list_backups,
    list_cycles,
    update_cycle,
)
from trainer.cycle import CycleContext, run_cycle
from trainer.loop_config import TrainerConfig, config_to_dict, load_trainer_config_for_cli
from trainer.maintenance import back_up_store, prune_old_data
from trainer.metrics import TrainerMetrics
from trainer.publishing import AdminSwapper, Hook, PolicySwapper, StoreSwapper

log = logging.getLogger(__name__)

PAUSE_ENV = "RLHF_TRAINER_PAUSE_AT"
FAIL_ENV = "RLHF_TRAINER_FAIL_AT"
KILL_ENV = "RLHF_TRAINER_KILL_AT"


def env_hook(point: str) -> None:
    """The fault-injection hook driven by RLHF_TRAINER_PAUSE_AT / RLHF_TRAINER_FAIL_AT."""
    if os.environ.get(FAIL_ENV) == point:
        raise RuntimeError(f"injected failure at {point}")
    if os.environ.get(KILL_ENV) == point:
        print(f"killing myself at {point}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == point:
        print(f"paused at {point}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def owner_is_dead(pid: int | None) -> bool:
    """True when no process with this pid exists on this host."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RanksOutOfStep(RuntimeError):
    """Under torchrun, a data-parallel stage failed: this job can train no more cycles."""

    def __init__(self) -> None:
        super().__init__("a data-parallel stage failed on some rank; ending the job for its launcher to restart it")


class TrainerService:
    """Claims queued cycles from the store and runs them, one at a time."""

    def __init__(self, config: TrainerConfig, store: Store, swapper: PolicySwapper | None = None,
                 hook: Hook = env_hook, metrics: TrainerMetrics | None = None) -> None:
        self.config = config
        self.store = store
        self.swapper = swapper or default_swapper(config, store)
        self.hook = hook
        # Always recorded (cheap); exported only when metrics_port is set (main).
        self.metrics = metrics if metrics is not None else TrainerMetrics(config.cycle.data.held_out_groups)
        # Kept across cycles: a cycle's RMs run only its new completions through the frozen trunk.
        self.trunk_cache = None
        if config.trunk_cache_mb > 0:
            from trainer.trunk_cache import TrunkCache  # torch: imported when a trainer really runs

            self.trunk_cache = TrunkCache(config.trunk_cache_mb)

    def fail_dead_cycles(self) -> list[int]:
        """Mark failed the running cycles whose trainer died (pid gone, or no heartbeat)."""
        dead = []
        for cycle in self.store.read_sync(list_cycles(limit=0, state="running")):
            if owner_is_dead(cycle.owner_pid):
                error = f"the trainer (pid {cycle.owner_pid}) died in stage {cycle.stage}"
                try:
                    self.store.write_sync(update_cycle(cycle.id, state="failed", error=error))
                    dead.append(cycle.id)
                except ConflictError:  # it finished meanwhile
                    pass
        dead += self.store.write_sync(fail_stale_cycles(self.config.stale_after_s))
        if dead:
            log.warning("marked cycles %s failed: their trainer is gone", dead)
        return dead

    def enqueue(self, trigger: str = "schedule", reason: str = "") -> Cycle | None:
        """Queue a cycle unless one is already queued or running (coalescing); None then."""
        self.fail_dead_cycles()  # a crashed trainer's cycle must not swallow the trigger
        busy = [c for state in ("queued", "running") for c in self.store.read_sync(list_cycles(1, state=state))]
        if busy:
            log.info("%s trigger coalesced into cycle %d (%s)", trigger, busy[0].id, busy[0].state)
            return None
        return self.store.write_sync(create_cycle(trigger, reason))

    def run_pending(self) -> list[Cycle]:
        """Run queued cycles until none is left (or another trainer holds the lock, or, under
        torchrun, a data-parallel stage failed: no cycle can run on ranks out of step)."""
        finished = []
        self.fail_dead_cycles()
        while not ranks_out_of_step() and (cycle := self.store.write_sync(claim_queued_cycle())) is not None:
            context = CycleContext(self.store, self.config, self.swapper, self.hook, self.trunk_cache, self.metrics)
            finished.append(run_cycle(cycle, context))
        return finished

    def upkeep_jobs(self, now: float | None = None) -> list[UpkeepJob]:
        """Retention (when on: first at once) and backups (when on: first when the newest is due)."""
        cfg, now = self.config, time.time() if now is None else now
        jobs = []
        if cfg.retention.max_age_days is not None:
            jobs.append(UpkeepJob("retention", lambda: prune_old_data(self.store, cfg.retention,
                                                                      cfg.cycle.data.eval_splits),
                                  cfg.retention.every_hours * 3600, first_at=now))
        if cfg.backup.every_hours is not None:
            every_s = cfg.backup.every_hours * 3600
            newest = list_backups(cfg.backup.folder, cfg.store_path.stem)
            due = newest[-1].stat().st_mtime + every_s if newest else now
            jobs.append(UpkeepJob("backup", lambda: back_up_store(self.store, cfg.backup), every_s,
                                  first_at=max(due, now)))
        return jobs

    def serve_forever(self, stop: threading.Event) -> None:
        """The scheduler queues cycles; this thread polls for them until ``stop`` is set."""
        scheduler = build_scheduler(self.config, lambda: self.enqueue("schedule", "scheduled"), self.upkeep_jobs())
        if scheduler is not None:
            scheduler.start()
        log.info("trainer up: schedule %s, polling the store every %.1f s", describe_schedule(self.config),
                 self.config.poll_s)
        try:
            while not stop.is_set():
                try:
                    self.run_pending()
                except Exception:  # noqa: BLE001 - e.g. the store briefly unavailable: poll again
                    log.exception("polling for cycles failed; retrying in %.1f s", self.config.poll_s)
                if ranks_out_of_step():
                    raise RanksOutOfStep()
                stop.wait(self.config.poll_s)
        finally:
            if scheduler is not None:
                scheduler.shutdown(wait=False)


def default_swapper(config: TrainerConfig, store: Store) -> PolicySwapper:
    """Admin.SwapPolicy on the configured server, or the store alone when there is none."""
    if config.server_address is None:
        return StoreSwapper(store)
    return AdminSwapper(config.server_address, config.resolved_admin_key(), config.swap_timeout_s)


@dataclass(frozen=True)
class UpkeepJob:
    """A store upkeep job of the scheduler: ``run`` every ``every_s`` seconds, first at ``first_at``."""

    id: str
    run: Callable[[], object]
    every_s: float
    first_at: float


def build_scheduler(config: TrainerConfig, enqueue: Any, upkeep: Sequence[UpkeepJob] = ()) -> Any:
    """A BackgroundScheduler running ``enqueue`` on the configured schedule and the ``upkeep``
    jobs (None when the schedule is 'off' and there is no upkeep)."""
    if config.schedule == "off" and not upkeep:
        return None
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = BackgroundScheduler(daemon=True)
    if config.schedule != "off":
        trigger = (IntervalTrigger(seconds=config.interval_s) if config.schedule == "interval"
                   else CronTrigger.from_crontab(config.cron))
        scheduler.add_job(enqueue, trigger, id="training-cycle", max_instances=1, coalesce=True)
    for job in upkeep:
        first = datetime.fromtimestamp(job.first_at, timezone.utc)
        scheduler.add_job(job.run, IntervalTrigger(seconds=job.every_s), id=job.id, max_instances=1, coalesce=True,
                          next_run_time=first, misfire_grace_time=None)
    return scheduler


def describe_schedule(config: TrainerConfig) -> str:
    if config.schedule == "interval":
        return f"every {config.interval_s:g} s"
    return f"cron '{config.cron}'" if config.schedule == "cron" else "off (triggers only)"


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rlhf trainer", description="Run the scheduled trainer process (one training cycle at a time).")
    parser.add_argument("--config", help="TOML or JSON file (tables mirror TrainerConfig's nesting)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field by its dotted path, e.g. cycle.ppo.kl_coef=0.05 (repeatable)")
    parser.add_argument("--once", action="store_true",
                        help="run the queued cycles (if any), then exit instead of serving forever")
    parser.add_argument("--trigger", action="store_true",
                        help="queue a cycle first (trigger 'cli'), e.g. with --once for one cycle without a server")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="train data-parallel on N processes of this machine (torchrun --standalone); "
                             "rank 0 is the trainer service, the others only train")
    return parser.parse_args(list(argv))


def run_under_torchrun(argv: Sequence[str], nproc: int) -> int:
    """`rlhf trainer --nproc-per-node N ...`: this same command on N ranks of one machine."""
    if nproc < 1:
        print(f"--nproc-per-node must be at least 1, got {nproc}", file=sys.stderr)
        return 2
    rest, skip = [], False
    for arg in argv:  # the same arguments, less --nproc-per-node
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "trainer.service", *rest]
    log.info("starting %d ranks: %s", nproc, " ".join(command))
    return subprocess.call(command)


def joined_ranks() -> Any:
    """This process's place in a torchrun job (None outside one: no torch imported then)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from trainer import distributed

    return distributed.init_from_env()


def follow_the_coordinator(config: TrainerConfig) -> int:
    """A rank other than 0: train each stage the coordinator sends, until it stops."""
    from trainer import distributed

    cache = None
    if config.trunk_cache_mb > 0:
        from trainer.trunk_cache import TrunkCache

        cache = TrunkCache(config.trunk_cache_mb)
    rank = distributed.world().rank
    try:
        distributed.follow(local={"trunk_cache": cache}, before=lambda name: env_hook(f"rank{rank}:{name}"))
    finally:
        distributed.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and signum == signal.SIGTERM:
        # torchrun stops the surviving ranks of a job with SIGTERM when one of them fails
        raise KeyboardInterrupt(f"{name} from the launcher: another rank failed, or the job was stopped")
    raise KeyboardInterrupt(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlhf trainer`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = load_trainer_config_for_cli(args.config, args.overrides, "trainer")
    if config is None:
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        return run_under_torchrun(argv, args.nproc_per_node)
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    if config.share_cpu:
        from trainer.device import share_cpu_with_neighbours

        share_cpu_with_neighbours(config.torch_threads)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        ranks = joined_ranks()
        if ranks is not None and not ranks.is_coordinator:
            return follow_the_coordinator(config)
        with Store(config.store_path) as store:
            service = TrainerService(config, store)
            service.metrics.serve_http(config.metrics_host, config.metrics_port)
            try:
                return run_service(service, once=args.once, trigger=args.trigger)
            finally:
                service.metrics.stop_http()
                if ranks is not None:
                    release_the_followers()
    except RanksOutOfStep as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt as stop:
        log.info("stopping (%s)", stop or "interrupt")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def release_the_followers() -> None:
    """The coordinator is stopping: the followers stop too (they may be gone already)."""
    from trainer import distributed

    try:
        distributed.release_followers()
    except distributed.PeerFailure as gone:
        log.warning("%s", gone)
    finally:
        distributed.shutdown()


def ranks_out_of_step() -> bool:
    """True when a data-parallel stage failed under torchrun: the job must end (exit 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from trainer import distributed

    return not distributed.in_step()


def run_service(service: TrainerService, *, once: bool, trigger: bool) -> int:
    """Queue a cycle if asked, then run queued cycles once (exit 1 if one failed) or forever."""
    if trigger:
        service.enqueue("cli", "rlhf trainer --trigger")
    if not once:
        service.serve_forever(threading.Event())
        return 0
    cycles = service.run_pending()
    for cycle in cycles:
        print(f"cycle {cycle.id}: {cycle.state}" + (f" ({cycle.error})" if cycle.error else ""))
    return 0 if all(c.state != "failed" for c in cycles) else 1



if __name__ == "__main__":
    sys.exit(main())
