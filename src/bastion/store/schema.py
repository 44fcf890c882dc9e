"""Database schema: what changes at run time (keys, teams created by API, usage).

Alembic migrations under `migrations/versions` create exactly this; a test compares them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

cost_centers = Table(
    "cost_centers",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("display_name", String(256), nullable=False, default=""),
    Column("source", String(16), nullable=False),  # config | api
    Column("created_at", DateTime(timezone=True), nullable=False),
)

teams = Table(
    "teams",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("cost_center", String(128), nullable=False),
    Column("models", JSON, nullable=True),
    Column("source", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("name", String(256), nullable=False, default=""),
    Column("team", String(128), nullable=False, index=True),
    Column("user", String(256), nullable=True),
    Column("models", JSON, nullable=True),
    Column("limits", JSON, nullable=True),
    # member: calls /v1; auditor: reads the audit trail and usage only (no /v1).
    Column("role", String(16), nullable=False, server_default="member"),
    # admin: made by an administrator; self-service: minted by the user after `bastion login`
    # (revoked when the directory no longer maps the user to the key's team).
    Column("source", String(16), nullable=False, server_default="admin"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Assigned by the database on every change (`store.changes`): replicas poll for rows past
    # the last number they saw, whatever the writers' clocks say.
    Column("change_seq", BigInteger, nullable=False, server_default="0", index=True),
    # The authenticated principal that made the key (admin key, signed-in user, key id).
    Column("created_by", String(256), nullable=True),
    # Waiting for a second administrator's approval (its id): the key does not work until then.
    Column("approval", String(32), nullable=True),
)

# One counter per stream of changes, advanced inside each writing transaction: the row lock
# orders writers, so a reader never sees a number before every smaller one is committed.
change_counters = Table(
    "change_counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Session tokens issued by `bastion login`: revoked ones (logout, offboarding, a disabled
# account) are refused on every replica within `identity.key_refresh_seconds`.
sessions = Table(
    "sessions",
    metadata,
    Column("jti", String(32), primary_key=True),
    Column("user", String(256), nullable=False, index=True),
    Column("team", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("revoked_by", String(256), nullable=True),
    Column("change_seq", BigInteger, nullable=False, server_default="0", index=True),
)

# Changes one administrator may only ask for: a second, distinct one approves (four eyes).
approvals = Table(
    "approvals",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("action", String(64), nullable=False),
    Column("team", String(128), nullable=True),
    Column("subject", JSON, nullable=False),
    Column("requested_by", String(256), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    # pending | approved | rejected | expired
    Column("status", String(16), nullable=False),
    Column("decided_by", String(256), nullable=True),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("ts", DateTime(timezone=True), nullable=False, index=True),
    Column("endpoint", String(32), nullable=False),
    Column("key_id", String(32), nullable=True, index=True),
    Column("team", String(128), nullable=True),
    Column("cost_center", String(128), nullable=True),
    Column("user", String(256), nullable=True),
    Column("client_user", String(256), nullable=True),
    Column("model", String(128), nullable=True),
    # The alias that served the call when it is not `model` too: a router's choice, a fallback.
    Column("served_model", String(128), nullable=True),
    # The registry adapter (NAME@VERSION) the engine applied, for an adapter alias.
    Column("adapter", String(200), nullable=True),
    Column("deployment", String(256), nullable=True),
    Column("stream", Boolean, nullable=False, default=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    # Integer micro-units (millionths) of `currency`: exact, summed without rounding.
    Column("cost_micros", BigInteger, nullable=False, default=0),
    Column("currency", String(3), nullable=True),
    Column("status", Integer, nullable=False),
    Column("outcome", String(32), nullable=False),  # ok | client_error | upstream_error | cancelled
    Column("error_code", String(64), nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    # The engine reported no usage (a cancelled or broken answer): the prompt was charged from
    # Bastion's own count (the tokenizer's, else an upper bound), the completion from chunks.
    Column("tokens_estimated", Boolean, nullable=False, default=False, server_default=false()),
)
Index("ix_usage_team_ts", usage.c.team, usage.c.ts)

#: Fixed latency/TTFT histogram bucket upper bounds in ms (the last bucket is open): exact
#: counts that add up under an upsert, from which percentiles are read to a bucket's width.
HISTOGRAM_BOUNDS_MS: tuple[float, ...] = (
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
)
ROLLUP_DIMENSIONS: tuple[str, ...] = (
    "team", "cost_center", "model", "served_model", "adapter", "key_id", "user", "endpoint",
    "currency",
)  # fmt: skip
_DIM_LENGTHS = {"key_id": 32, "user": 256, "adapter": 200, "endpoint": 32, "currency": 3}

#: Hourly usage rollups (`metering/hourly.py`), upserted in the transaction that inserts the
#: usage batch, so they never drift from `usage`. A dimension that a record lacks is '' (not
#: NULL: NULLs never conflict in a unique key, and the upsert needs them to). The deployment,
#: the client's own `user` field and the outcome are left out: they multiply rows (a row per
#: replica or free-text value) and no report groups by them; errors are counted instead.
usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("hour", DateTime(timezone=True), primary_key=True),
    *(
        Column(d, String(_DIM_LENGTHS.get(d, 128)), primary_key=True, server_default="")
        for d in ROLLUP_DIMENSIONS
    ),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("latency_ms_sum", Float, nullable=False),
    Column("ttft_ms_sum", Float, nullable=False),
    Column("ttft_count", BigInteger, nullable=False),
    *(
        Column(f"{h}_{i}", BigInteger, nullable=False, server_default="0")
        for h in ("lat", "ttft")
        for i in range(len(HISTOGRAM_BOUNDS_MS) + 1)
    ),
    # SQLite: the rows are stored in key order (hour first), so a month is one sequential
    # range, not a walk of the key's index with a table lookup per row (measured 40 % slower).
    sqlite_with_rowid=False,
)
Index("ix_usage_hourly_team_hour", usage_hourly.c.team, usage_hourly.c.hour)

# -- the audit trail (append-only: nothing in Bastion updates or deletes rows, except purging
# -- expired `content` and destroying data keys, which leave every hash verifiable) ----------
audit_entries = Table(
    "audit_entries",
    metadata,
    Column("replica", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("request_id", String(64), nullable=True, index=True),
    Column("ts", DateTime(timezone=True), nullable=False, index=True),
    Column("team", String(128), nullable=True),
    Column("user", String(256), nullable=True),
    Column("key_id", String(64), nullable=True),
    Column("model", String(128), nullable=True),
    Column("status", Integer, nullable=True),
    # The chained entry as written (canonical JSON, without the sealed content).
    Column("doc", Text, nullable=False),
    # AES-256-GCM sealed prompt/response; its SHA-256 is in `doc`. NULL once purged.
    Column("content", LargeBinary, nullable=True),
    Column("purged_at", DateTime(timezone=True), nullable=True),
)
Index("ix_audit_entries_team_ts", audit_entries.c.team, audit_entries.c.ts)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("replica", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("head", String(64), nullable=False),
    Column("ts", String(40), nullable=False),
    Column("public_key", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
)

audit_keys = Table(
    "audit_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("team", String(128), nullable=False, index=True),
    # The team's data key wrapped by the master key; NULL once destroyed (crypto-shredded).
    Column("wrapped", LargeBinary, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("destroyed_at", DateTime(timezone=True), nullable=True),
)

audit_holds = Table(
    "audit_holds",
    metadata,
    Column("team", String(128), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("placed_by", String(256), nullable=False),
    Column("placed_at", DateTime(timezone=True), nullable=False),
)

#: Responses of the OpenAI Responses API kept for `previous_response_id` and retrieval (never in
#: an engine's memory): the whole stored document is sealed with the team's audit data key.
responses = Table(
    "responses",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("team", String(128), nullable=False),
    Column("key_id", String(64), nullable=True),
    Column("request_id", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("previous_id", String(128), nullable=True),
    # The audit_keys row that sealed `content`; shredding the team makes it unreadable.
    Column("content_key", String(32), nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)

#: The model registry (`bastion.registry`): one row per model or adapter version. Its files and
#: metadata never change once registered; only `state`, `history` and `approval` do, each change
#: guarded by the state it was made from (compare-and-set) and recorded in the audit trail.
registry_models = Table(
    "registry_models",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # base | adapter
    Column("state", String(16), nullable=False, index=True),
    Column("path", Text, nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("files", JSON, nullable=False),
    Column("config", JSON, nullable=False),
    Column("license", String(256), nullable=True),
    Column("owner", String(256), nullable=True),
    Column("intended_use", Text, nullable=True),
    Column("risk_tier", String(16), nullable=True),
    Column("base", String(200), nullable=True),  # an adapter's base, NAME@VERSION
    Column("lineage", JSON, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Every transition: from, to, by, at, evidence (and the four-eyes approval, its requester).
    Column("history", JSON, nullable=False),
    # A pending four-eyes approval request (its id); NULL when none is pending.
    Column("approval", String(32), nullable=True),
)

#: Registry adapters served under an alias (`bastion models deploy`): every gateway replica
#: loads each one on the deployments of its base alias and routes the alias there. A row is
#: the deployment's whole state: deleting it (undeploy, retire) unloads the adapter.
adapter_deployments = Table(
    "adapter_deployments",
    metadata,
    Column("alias", String(128), primary_key=True),
    Column("adapter", String(200), nullable=False, index=True),  # NAME@VERSION
    Column("base_alias", String(128), nullable=False),
    # serve: an approved adapter, for every key that may use the alias; staging: a validated
    # one, only for keys that name the alias (evaluation before approval).
    Column("stage", String(16), nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: Digests the registry has verified, by file identity (`registry/cache.py` says why that is
#: safe): a restart re-reads only files whose inode, size, mtime or ctime changed.
registry_digests = Table(
    "registry_digests",
    metadata,
    Column("id", String(64), primary_key=True),  # sha256(host \0 absolute path)
    Column("host", String(255), nullable=False),
    Column("path", Text, nullable=False),
    Column("stat", String(128), nullable=False),  # dev:ino:size:mtime_ns:ctime_ns
    Column("sha256", String(64), nullable=False),
    Column("verified_at", DateTime(timezone=True), nullable=False),
)

# -- evals (issue 14): runs of eval suites through the gateway, one row per case and sample ----
eval_runs = Table(
    "eval_runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("suite", String(128), nullable=False, index=True),
    Column("suite_version", String(32), nullable=False),
    # The suite file's SHA-256: a resume or a comparison knows whether the cases changed.
    Column("suite_sha256", String(64), nullable=False),
    Column("suite_path", Text, nullable=False),
    Column("model", String(128), nullable=False, index=True),
    # The registry version (NAME@VERSION) the alias served when the run started: what
    # promotion gates look runs up by (None: the alias serves no registry version).
    Column("registry_ref", String(200), nullable=True, index=True),
    Column("samples", Integer, nullable=False),
    Column("cases_total", Integer, nullable=False),
    Column("params", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # running | finished | failed
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)

eval_results = Table(
    "eval_results",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("case_id", String(128), primary_key=True),
    Column("sample", Integer, primary_key=True),
    Column("tags", JSON, nullable=False),
    Column("output", Text, nullable=False),
    Column("tool_calls", JSON, nullable=True),
    # {scorer name: {value, passed, detail, error}}
    Column("scores", JSON, nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("error", Text, nullable=True),
    Column("latency_ms", Float, nullable=False),
    # Time to the first token of the streamed answer (None: no token came).
    Column("ttft_ms", Float, nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    # The gateway's usage record of the call (x-request-id), and its cost once written there.
    Column("request_id", String(64), nullable=True),
    Column("cost_micros", BigInteger, nullable=True),
    Column("currency", String(3), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
