"""Domain operations on the store, each a factory returning an `Op`, one module per part of
the schema: users (and keys), prompts (and completions), labeling (queue and feedback),
quality (gold rankings, the labeler-quality and ratings reads), policies, cycles,
idempotency (and audit), stats, retention (pruning old rows nothing uses), erasure (a user's every row);
base holds what they share.

An `Op[T]` is a function `(db: sqlite_utils.Database) -> T`. Nothing here touches a
connection when called: `add_prompt(...)` only builds the op, and the caller decides where
it runs:

    prompt = await store.write(add_prompt(user_id, "hi"))     # server (asyncio)
    prompt = store.write_sync(add_prompt(user_id, "hi"))      # trainer, CLI, threads
    policy = await store.read(serving_policy())               # reads likewise

Ops compose: calling `op(db)` inside another op joins its transaction, so several steps
commit or fail together, e.g. a generation's prompt and completions:

    def log_generation(db):
        prompt = add_prompt(user_id, text)(db)
        return prompt, add_completions(prompt.id, samples)(db)
    prompt, completions = await store.write(log_generation)

Ops that change rows must run through `write`/`write_sync`; read connections refuse them.
Ids are uuid4 hex unless a caller passes its own; `now` defaults to the clock at the
moment the op runs. Hot inserts use one plain INSERT statement rather than sqlite-utils'
`Table.insert`, which inspects the table on every call (about 50 µs against 4 µs), and the
single writer thread is the store's serial resource; queries and counts use sqlite-utils.
"""
