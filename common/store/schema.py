"""The store's schema, as an ordered list of migrations.

`PRAGMA user_version` holds the number of migrations applied; `MIGRATIONS[i]` takes a file
from version i to i + 1. Opening a file runs the missing steps, one transaction per step,
so a crash mid-migration leaves the file at the last completed version. A file whose
version is above `LATEST_VERSION` was written by newer code and is refused.

The steps are raw DDL on purpose: a migration is frozen history, and must build exactly
the same tables next year whatever a library's defaults become. Never edit a released
step; append a new one.

History:
  v1  The core data model: users and hashed API keys, logged prompts and completions,
      labeler feedback (rankings against a prompt's completions, demonstrations,
      ratings), published policies (at most one serving) and training cycles.
  v2  The labeling queue and safe retries: comparison tasks (leases of K completions to
      a labeler; a ranking may now answer one, at most once), the idempotency table
      that lets a client retry any mutating call with its request_id, and the audit log
      of admin actions.
  v3  Trainer liveness: cycles gain `heartbeat_at` / `owner_pid`, so a cycle whose
      trainer died can be failed instead of blocking the queue forever, and "at most one
      running cycle" moves from trainer code into a partial unique index (older trainers
      could leave a second one behind after a crash; the step fails all but the newest).
  v4  The users' data: a user's "do not train on my data" setting (`users.train_opt_out`),
      completions flagged for PII at ingest like prompts (`has_pii`, `redacted_text`), and
      the indexes that erasure (by labeler) and retention (by age) read.
  v5  Truthful versions across a hot swap: a completion that two policy versions
      produced (swap mode "keep") keeps its tokens' versions (`version_spans_json`, NULL
      when one version made them all), with a partial index for counting and skipping them.
  v6  Labeler quality: a task may be declined (status 'declined', with `decline_reason`
      'skipped' | 'none_acceptable', `decline_comment`, `declined_at`) and records when
      its completions reached the labeler (`shown_at`: time per task is the ranking's
      created_at minus it); `gold_rankings` holds the operator's ranking of a prompt's
      completions, against which labelers are scored. SQLite cannot alter a CHECK, so
      comparison_tasks is rebuilt the documented way (new table, copy, drop, rename,
      indexes again), with foreign keys off for the step (`_apply_step`) so that
      rankings.task_id keeps naming the table.

Foreign keys are off while a step runs and checked (`PRAGMA foreign_key_check`) before it
commits: a step may rebuild a table other tables reference, which SQLite allows only so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlite_utils import Database

from common.store.errors import SchemaError, SchemaTooNewError

Migration = Callable[[Database], None]

_V1_CORE = """
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    labeler_group TEXT
);
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL REFERENCES users(id),
    role TEXT NOT NULL CHECK (role IN ('user', 'labeler', 'admin')),
    labeler_group TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX api_keys_by_user ON api_keys(user_id);
CREATE TABLE prompts (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    text TEXT NOT NULL,
    messages_json TEXT,
    source TEXT NOT NULL CHECK (source IN ('traffic', 'label', 'demonstration', 'import')),
    split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
    dedup_key TEXT NOT NULL,
    has_pii INTEGER NOT NULL DEFAULT 0 CHECK (has_pii IN (0, 1)),
    redacted_text TEXT,
    request_id TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX prompts_by_split_time ON prompts(split, created_at);
CREATE INDEX prompts_by_user ON prompts(user_id, created_at);
CREATE INDEX prompts_by_dedup_key ON prompts(dedup_key);
CREATE TABLE completions (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    idx INTEGER NOT NULL CHECK (idx >= 0),
    policy_version INTEGER NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL CHECK (finish_reason IN ('stop', 'length', 'abort')),
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    sampling_json TEXT NOT NULL DEFAULT '{}',
    latency_s REAL NOT NULL,
    ttft_s REAL,
    purpose TEXT NOT NULL CHECK (purpose IN ('serve', 'label')),
    created_at REAL NOT NULL
);
CREATE INDEX completions_by_prompt ON completions(prompt_id, idx);
CREATE TABLE rankings (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    labeler_id TEXT NOT NULL,
    labeler_group TEXT,
    ranking_json TEXT NOT NULL,
    k INTEGER NOT NULL CHECK (k >= 2),
    source TEXT NOT NULL CHECK (source IN ('label', 'import')),
    created_at REAL NOT NULL
);
CREATE INDEX rankings_by_prompt ON rankings(prompt_id);
CREATE INDEX rankings_by_labeler ON rankings(labeler_id, created_at);
CREATE TABLE demonstrations (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    labeler_id TEXT NOT NULL,
    labeler_group TEXT,
    response TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('label', 'import')),
    created_at REAL NOT NULL
);
CREATE INDEX demonstrations_by_prompt ON demonstrations(prompt_id);
CREATE TABLE ratings (
    id TEXT PRIMARY KEY,
    completion_id TEXT NOT NULL REFERENCES completions(id),
    labeler_id TEXT NOT NULL,
    labeler_group TEXT,
    overall INTEGER NOT NULL CHECK (overall BETWEEN 1 AND 7),
    flags_json TEXT NOT NULL DEFAULT '{}',
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX ratings_by_completion ON ratings(completion_id);
CREATE TABLE policies (
    version INTEGER PRIMARY KEY CHECK (version >= 0),
    path TEXT NOT NULL,
    parent_version INTEGER REFERENCES policies(version),
    status TEXT NOT NULL CHECK (status IN ('candidate', 'serving', 'rejected', 'retired')),
    created_at REAL NOT NULL,
    cycle_id INTEGER,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    serving_since REAL
);
CREATE UNIQUE INDEX policies_one_serving ON policies(status) WHERE status = 'serving';
CREATE TABLE cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'running', 'promoted', 'rejected', 'skipped', 'failed')),
    stage TEXT,
    trigger TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    base_version INTEGER,
    candidate_version INTEGER,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    error TEXT
);
"""

_V2_QUEUE_RETRIES_AUDIT = """
CREATE TABLE comparison_tasks (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    labeler_id TEXT NOT NULL,
    k INTEGER NOT NULL CHECK (k >= 2),
    completion_ids_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('leased', 'submitted', 'expired')),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX comparison_tasks_by_status ON comparison_tasks(status, expires_at);
CREATE INDEX comparison_tasks_by_labeler ON comparison_tasks(labeler_id, created_at);
ALTER TABLE rankings ADD COLUMN task_id TEXT REFERENCES comparison_tasks(id);
CREATE UNIQUE INDEX rankings_one_per_task ON rankings(task_id) WHERE task_id IS NOT NULL;
CREATE TABLE idempotency (
    caller_id TEXT NOT NULL,
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    response BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (caller_id, method, request_id)
);
CREATE INDEX idempotency_by_time ON idempotency(created_at);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    user_id TEXT,
    action TEXT NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_by_time ON audit(at);
"""

_V3_CYCLE_LIVENESS = """
ALTER TABLE cycles ADD COLUMN heartbeat_at REAL;
ALTER TABLE cycles ADD COLUMN owner_pid INTEGER;
UPDATE cycles
   SET state = 'failed',
       error = 'superseded: another cycle was running when the store moved to schema v3',
       finished_at = COALESCE(finished_at, started_at, created_at)
 WHERE state = 'running'
   AND id < (SELECT MAX(id) FROM cycles WHERE state = 'running');
CREATE UNIQUE INDEX cycles_one_running ON cycles(state) WHERE state = 'running';
CREATE INDEX cycles_by_state ON cycles(state, id);
"""

_V4_USERS_DATA = """
ALTER TABLE users ADD COLUMN train_opt_out INTEGER NOT NULL DEFAULT 0 CHECK (train_opt_out IN (0, 1));
ALTER TABLE completions ADD COLUMN has_pii INTEGER NOT NULL DEFAULT 0 CHECK (has_pii IN (0, 1));
ALTER TABLE completions ADD COLUMN redacted_text TEXT;
CREATE INDEX prompts_by_time ON prompts(created_at);
CREATE INDEX completions_by_time ON completions(created_at);
CREATE INDEX demonstrations_by_labeler ON demonstrations(labeler_id);
CREATE INDEX ratings_by_labeler ON ratings(labeler_id);
CREATE INDEX comparison_tasks_by_prompt ON comparison_tasks(prompt_id);
CREATE INDEX idempotency_by_caller ON idempotency(caller_id);
"""


def _v1_core(db: Database) -> None:
    db.executescript(_V1_CORE)


def _v2_queue_retries_audit(db: Database) -> None:
    db.executescript(_V2_QUEUE_RETRIES_AUDIT)


def _v3_cycle_liveness(db: Database) -> None:
    db.executescript(_V3_CYCLE_LIVENESS)


def _v4_users_data(db: Database) -> None:
    db.executescript(_V4_USERS_DATA)


_V5_VERSION_SPANS = """
ALTER TABLE completions ADD COLUMN version_spans_json TEXT;
CREATE INDEX completions_mixed_versions ON completions(prompt_id) WHERE version_spans_json IS NOT NULL;
"""


def _v5_version_spans(db: Database) -> None:
    db.executescript(_V5_VERSION_SPANS)


_V6_LABELER_QUALITY = """
CREATE TABLE comparison_tasks_v6 (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL REFERENCES prompts(id),
    labeler_id TEXT NOT NULL,
    k INTEGER NOT NULL CHECK (k >= 2),
    completion_ids_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('leased', 'submitted', 'expired', 'declined')),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    shown_at REAL,
    decline_reason TEXT CHECK (decline_reason IN ('skipped', 'none_acceptable')),
    decline_comment TEXT NOT NULL DEFAULT '',
    declined_at REAL,
    CHECK ((status = 'declined') = (decline_reason IS NOT NULL))
);
INSERT INTO comparison_tasks_v6 (id, prompt_id, labeler_id, k, completion_ids_json, status, created_at, expires_at)
    SELECT id, prompt_id, labeler_id, k, completion_ids_json, status, created_at, expires_at FROM comparison_tasks;
DROP TABLE comparison_tasks;
ALTER TABLE comparison_tasks_v6 RENAME TO comparison_tasks;
CREATE INDEX comparison_tasks_by_status ON comparison_tasks(status, expires_at);
CREATE INDEX comparison_tasks_by_labeler ON comparison_tasks(labeler_id, created_at);
CREATE INDEX comparison_tasks_by_prompt ON comparison_tasks(prompt_id);
CREATE TABLE gold_rankings (
    prompt_id TEXT PRIMARY KEY REFERENCES prompts(id),
    completion_ids_json TEXT NOT NULL,
    ranking_json TEXT NOT NULL,
    set_by TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX gold_rankings_by_setter ON gold_rankings(set_by);
"""


def _v6_labeler_quality(db: Database) -> None:
    db.executescript(_V6_LABELER_QUALITY)


MIGRATIONS: tuple[Migration, ...] = (
    _v1_core, _v2_queue_retries_audit, _v3_cycle_liveness, _v4_users_data, _v5_version_spans,
    _v6_labeler_quality,
)
LATEST_VERSION = len(MIGRATIONS)


def schema_version(db: Database) -> int:
    """The file's `PRAGMA user_version` (0 for a new, empty file)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def check_not_newer(version: int, known: int, where: str) -> None:
    """Raise SchemaTooNewError when a file's version is beyond what this code knows."""
    if version > known:
        raise SchemaTooNewError(
            f"{where} has schema version {version}, but this rlhf-loop only knows versions "
            f"up to {known}: it was written by newer code. Upgrade rlhf-loop to open it "
            "(downgrading a store is not supported)."
        )


def migrate(
    db: Database,
    migrations: Sequence[Migration] = MIGRATIONS,
    target: int | None = None,
    where: str = "the store",
) -> int:
    """Bring `db` to version `target` (default: the last migration); return the version.

    Each step runs in its own BEGIN IMMEDIATE transaction and re-reads the version inside
    it, so two processes opening the same old file migrate it once, not twice.
    `db.conn` must be in autocommit mode (isolation_level None, no open transaction).
    """
    known = len(migrations)
    target = known if target is None else target
    check_not_newer(schema_version(db), known, where)
    for version in range(schema_version(db) + 1, target + 1):
        _apply_step(db, migrations[version - 1], version, known, where)
    return schema_version(db)


def _apply_step(db: Database, step: Migration, version: int, known: int, where: str) -> None:
    """Run one migration step and set user_version to `version`, atomically.

    Foreign keys are off during the step (SQLite ignores the pragma inside a transaction,
    so it is set before BEGIN) and checked before COMMIT: SQLite's way to rebuild a table
    that others reference (v6), harmless for the others. Only a violation the step made
    refuses it (rows an old file already held are not this step's to judge)."""
    enforced = db.conn.execute("PRAGMA foreign_keys").fetchone()[0]
    db.conn.execute("PRAGMA foreign_keys = OFF")
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        current = schema_version(db)
        check_not_newer(current, known, where)
        if current < version:
            before = set(db.conn.execute("PRAGMA foreign_key_check").fetchall())
            step(db)
            broken = set(db.conn.execute("PRAGMA foreign_key_check").fetchall()) - before
            if broken:
                raise SchemaError(f"migration to v{version} of {where} left rows whose reference is missing: "
                                  f"{sorted(broken)[:3]}")
            # PRAGMA values cannot be bound; `version` is an int we computed.
            db.conn.execute(f"PRAGMA user_version = {int(version)}")
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    finally:
        db.conn.execute(f"PRAGMA foreign_keys = {int(enforced)}")
