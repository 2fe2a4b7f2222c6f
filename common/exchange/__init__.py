"""Feedback in and out of the store as JSONL: rankings, pairwise preferences, demonstrations.

The line formats are in ``formats``, export in ``export``, import in ``importing``; this
package exports what the CLI (`rlhf export` / `rlhf import`) and tests use.

Three formats, one JSON object per line:

- ``rankings`` (K-way, lossless): one line per ranking, with everything needed to rebuild
  its rows in a fresh store: the prompt row, the ranked completions' rows, the best-first
  groups of completion ids, the labeler and the timestamps::

      {"ranking_id": "...", "prompt": {"id", "user_id", "text", "messages", "source",
       "has_pii", "redacted_text", "request_id", "created_at"},
       "completions": [{"id", "idx", "text", "policy_version", "finish_reason",
       "prompt_tokens", "completion_tokens", "sampling", "latency_s", "ttft_s", "purpose",
       "created_at", "has_pii", "redacted_text"}, ...],
       "ranking": [["c2"], ["c0", "c1"], ["c3"]], "k": 4, "labeler_id": "...",
       "labeler_group": "train", "source": "label", "created_at": 1700000000.0}

- ``pairs``: ``{"prompt": str, "chosen": str, "rejected": str}``, the preference format
  TRL's reward trainer reads. Export expands each ranking into its C(K,2) pairs minus the
  ties; import turns each line into a K = 2 comparison (source "import"), the bootstrap
  path. TRL's conversational variant (lists of {"role", "content"}) is accepted on import.

- ``demonstrations``: ``{"messages": [..., {"role": "assistant", "content": response}]}``,
  the chat format SFT trainers read, plus the ids, the labeler and the prompt row in
  extra keys so the round trip rebuilds the rows. A plain chat file (no extra keys)
  imports too.

Import is all or nothing: every line is checked (JSON, fields, types, ranking shape,
then against the store: completions belong to their prompt, re-imported rows are
identical) and EVERY bad line is reported with its number and reason; one bad line and
nothing is written. The writes happen in one transaction. Re-importing a file is a no-op
(rows keep their ids, identical rows are skipped). Not carried: comparison tasks (leases
are queue state, not data), so an imported ranking has no task_id.

PII: the server flags prompts (any chat turn) and completions at ingest
(``common.pii``). Export is lossless by default (a backup must restore what it saved,
flags included); ``redact_pii`` writes the redacted text of flagged prompts and
completions instead (and leaves out flagged prompts that have none, which is every
prompt flagged under the server's default ``pii_ingest = "flag"``), for files that leave
the operator's hands. Pairs are training data and always use the redacted text (or
leave the prompt out). Demonstrations carry no flag: their responses are written as
stored (redacted at ingest only under ``pii_ingest = "redact"``), so a file meant for
outsiders still needs a look over them.

The ranking checks live in `common.store.rankings`, shared with the store and the Feedback service.
"""

from common.exchange.export import export_jsonl, export_records, write_jsonl
from common.exchange.formats import KINDS, Kind
from common.exchange.importing import ImportRejected, ImportReport, import_jsonl

__all__ = ["KINDS", "ImportRejected", "ImportReport", "Kind", "export_jsonl", "export_records", "import_jsonl",
           "write_jsonl"]
