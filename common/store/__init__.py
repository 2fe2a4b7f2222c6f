"""The rlhf-loop store: SQLite (WAL) through sqlite-utils, shared by server and trainer.

Two layers:
  * `Store` (core.py): the file, one writer thread with group commit and
    acknowledge-after-commit, per-thread read connections, snapshots. It runs functions
    `fn(db: sqlite_utils.Database) -> T`:
        await store.write(fn) / store.write_sync(fn)   committed before they return
        await store.read(fn)  / store.read_sync(fn)    one consistent read transaction
  * Domain operations (ops/, a module per part of the schema): factories that return such functions (`Op[T]`), so the
    same call serves asyncio and blocking callers, and ops compose into one transaction:
        prompt = await store.write(add_prompt(user_id, text))
        policy = store.read_sync(serving_policy())
    Rows come back as the frozen dataclasses of records.py (`*_json` columns decoded).

Backups (verified `VACUUM INTO` copies named by time) and restoring them: backup.py.
The schema and its migrations live in schema.py; errors in errors.py.
"""

from common.store.backup import (
    BackupResult,
    RestoreResult,
    StoreInUseError,
    backup_store,
    check_integrity,
    list_backups,
    prune_backups,
    restore_backup,
    store_in_use,
)
from common.store.core import Store, Synchronous
from common.store.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    NotYourTaskError,
    SchemaError,
    SchemaTooNewError,
    StoreClosedError,
    StoreError,
    TaskClosedError,
)
from common.store.ops.base import Op, new_id
from common.store.ops.cycles import (
    claim_queued_cycle,
    create_cycle,
    fail_stale_cycles,
    get_cycle,
    list_cycles,
    update_cycle,
)
from common.store.ops.erasure import Erasure, erase_user, user_id_sha256
from common.store.ops.idempotency import (
    Mutation,
    audit,
    commit_mutation,
    list_audit,
    lookup_idempotent,
    record_idempotent,
    replay_mutation,
    run_mutation,
)
from common.store.ops.labeling import (
    add_demonstration,
    add_ranking,
    add_rating,
    expire_tasks,
    get_task,
    lease_task,
    pick_prompts,
    prompt_is_free,
    release_task,
    reusable_completions,
    set_task_completions,
)
from common.store.ops.policies import (
    add_policy,
    get_policy,
    list_policies,
    previous_serving_policy,
    serving_policy,
    set_policy_status,
)
from common.store.ops.prompts import add_completions, add_prompt, dedup_key, get_completion, get_prompt
from common.store.ops.retention import (
    PruneReport,
    PruneStep,
    prune_in_batches,
    prune_old_completions,
    prune_old_idempotency,
    prune_old_prompts,
)
from common.store.ops.stats import stats
from common.store.ops.users import (
    add_api_key,
    add_user,
    find_key_by_hash,
    list_keys,
    opted_out_user_ids,
    revoke_key,
    set_train_opt_out,
)
from common.store.records import (
    ApiKey,
    AuditEntry,
    ComparisonTask,
    Completion,
    Cycle,
    Demonstration,
    IdempotentOutcome,
    IdempotentRecord,
    NewCompletion,
    Policy,
    Prompt,
    Ranking,
    Rating,
    Stats,
    User,
    WriterStats,
)
from common.store.schema import LATEST_VERSION, MIGRATIONS, migrate, schema_version

__all__ = [
    "Store",
    "Synchronous",
    "BackupResult",
    "RestoreResult",
    "StoreInUseError",
    "backup_store",
    "check_integrity",
    "list_backups",
    "prune_backups",
    "restore_backup",
    "store_in_use",
    "ConflictError",
    "InvalidArgumentError",
    "NotFoundError",
    "NotYourTaskError",
    "SchemaError",
    "SchemaTooNewError",
    "StoreClosedError",
    "StoreError",
    "TaskClosedError",
    "Op",
    "Mutation",
    "add_api_key",
    "add_completions",
    "add_demonstration",
    "add_policy",
    "add_prompt",
    "add_ranking",
    "add_rating",
    "add_user",
    "audit",
    "claim_queued_cycle",
    "commit_mutation",
    "create_cycle",
    "dedup_key",
    "erase_user",
    "expire_tasks",
    "fail_stale_cycles",
    "find_key_by_hash",
    "get_completion",
    "get_cycle",
    "get_policy",
    "get_prompt",
    "get_task",
    "lease_task",
    "list_audit",
    "list_cycles",
    "list_keys",
    "list_policies",
    "lookup_idempotent",
    "new_id",
    "opted_out_user_ids",
    "pick_prompts",
    "previous_serving_policy",
    "prune_in_batches",
    "prune_old_completions",
    "prune_old_idempotency",
    "prune_old_prompts",
    "prompt_is_free",
    "record_idempotent",
    "release_task",
    "reusable_completions",
    "revoke_key",
    "replay_mutation",
    "run_mutation",
    "serving_policy",
    "set_policy_status",
    "set_train_opt_out",
    "set_task_completions",
    "stats",
    "update_cycle",
    "user_id_sha256",
    "ApiKey",
    "AuditEntry",
    "ComparisonTask",
    "Completion",
    "Cycle",
    "Demonstration",
    "Erasure",
    "IdempotentOutcome",
    "IdempotentRecord",
    "NewCompletion",
    "Policy",
    "Prompt",
    "PruneReport",
    "PruneStep",
    "Ranking",
    "Rating",
    "Stats",
    "User",
    "WriterStats",
    "LATEST_VERSION",
    "MIGRATIONS",
    "migrate",
    "schema_version",
]
