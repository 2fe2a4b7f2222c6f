"""The store's upkeep beside the training cycles: pruning logged data that is old and that
nothing uses (``RetentionConfig``; the rule is ``common.store.ops.retention``) and verified
online backups (``BackupConfig``; ``common.store.backup``). The trainer's scheduler runs both
(``trainer.service``); `rlhf store prune | backup | restore` runs them on demand
(``trainer.store_cli``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from common.store import BackupResult, PruneReport, Store, backup_store, prune_in_batches
from trainer.loop_config import BackupConfig, RetentionConfig

log = logging.getLogger(__name__)

DAY_S = 86_400.0


def kept_splits(retention: RetentionConfig, eval_splits: Sequence[str]) -> list[str]:
    """The splits retention never prunes: the configured ones and the cycle's evaluation splits."""
    return sorted(set(retention.keep_splits) | set(eval_splits))


def prune_old_data(
    store: Store,
    retention: RetentionConfig,
    eval_splits: Sequence[str],
    max_age_days: float | None = None,
    now: float | None = None,
) -> PruneReport | None:
    """Prune what is older than ``max_age_days`` (default: the config's) and unused, in
    bounded batches; None when retention is off."""
    age = retention.max_age_days if max_age_days is None else max_age_days
    if age is None:
        return None
    cutoff = (time.time() if now is None else now) - age * DAY_S
    report = prune_in_batches(store.write_sync, cutoff, kept_splits(retention, eval_splits), retention.batch_rows)
    log.info("retention: pruned %s (older than %.1f days, %d rows scanned in %d batches)",
             report.deleted, age, report.scanned, report.batches)
    return report


def back_up_store(store: Store, backup: BackupConfig, to: Path | None = None) -> BackupResult:
    """A verified backup into ``backup.folder`` (older ones pruned to ``backup.keep``), or
    into the folder ``to`` (nothing pruned there)."""
    result = backup_store(store, backup.folder if to is None else to, backup.keep if to is None else None)
    log.info("backup: %s (%d bytes, %.2f s), pruned %s", result.path, result.bytes, result.seconds,
             [p.name for p in result.pruned])
    return result
