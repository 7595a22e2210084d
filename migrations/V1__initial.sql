-- Jobs: one row per submitted manifest. `seq` orders the history (newest
-- first) and is the keyset of pagination; `id` is what clients see.
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    workflow_id      TEXT,
    status           TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    requires         TEXT    NOT NULL DEFAULT '[]',
    max_attempts     INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT    UNIQUE,
    manifest_hash    TEXT    NOT NULL,
    manifest         TEXT    NOT NULL,
    parameters       TEXT    NOT NULL,
    metadata         TEXT    NOT NULL,
    graph            TEXT    NOT NULL,
    callback_url     TEXT,
    backend_id       TEXT,
    prompt_id        TEXT,
    lease_token      INTEGER,
    lease_expires_at TEXT,
    not_before       TEXT,
    last_backend_id  TEXT,
    avoid_until      TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress         TEXT,
    error            TEXT,
    submitted_at     TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX jobs_by_status    ON jobs(status, seq);
CREATE INDEX jobs_by_workflow  ON jobs(workflow_id, seq);
CREATE INDEX jobs_by_backend   ON jobs(backend_id, seq);
CREATE INDEX jobs_by_submitted ON jobs(submitted_at);
-- The lease query: best queued job first (priority, then age).
CREATE INDEX jobs_queue ON jobs(priority DESC, seq) WHERE status = 'queued';
-- The lease query's preference: the workflow a backend ran last.
CREATE INDEX jobs_queue_workflow ON jobs(workflow_id, priority DESC, seq) WHERE status = 'queued';
-- Jobs held by a backend, for reconciliation and slot counting.
CREATE INDEX jobs_active ON jobs(backend_id) WHERE status IN ('assigned', 'running');

-- Metadata fields, one row per scalar field, so `metadata.shot=...` filters use an index.
CREATE TABLE job_metadata (
    key     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    job_seq INTEGER NOT NULL REFERENCES jobs(seq),
    PRIMARY KEY (key, value, job_seq)
) WITHOUT ROWID;

-- The durable event log: every state change of a job, its progress at a
-- bounded rate, and backend state changes (job_id NULL), in one order.
CREATE TABLE job_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT,
    workflow_id TEXT,
    at         TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    status     TEXT,
    backend_id TEXT,
    attempt    INTEGER,
    message    TEXT,
    data       TEXT
);
CREATE INDEX job_events_by_job ON job_events(job_id, seq);

-- One row per lease: which backend got which prompt id for which attempt.
CREATE TABLE leases (
    prompt_id    TEXT    PRIMARY KEY,
    job_id       TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    backend_id   TEXT    NOT NULL,
    lease_token  INTEGER NOT NULL,
    leased_at    TEXT    NOT NULL,
    submitted_at TEXT,
    finished_at  TEXT,
    outcome      TEXT,
    error        TEXT,
    -- Taken back from a backend that may come back: delete and interrupt it there first.
    cleanup_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX leases_cleanup ON leases(backend_id) WHERE cleanup_pending = 1;
CREATE INDEX leases_by_job ON leases(job_id, leased_at);

-- Files collected from a backend for a completed job.
CREATE TABLE outputs (
    job_id       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    node_id      TEXT    NOT NULL,
    filename     TEXT    NOT NULL,
    subfolder    TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    sha256       TEXT    NOT NULL,
    content_type TEXT    NOT NULL,
    PRIMARY KEY (job_id, name)
);

-- Backends: configuration mirrored from the config file, admin overrides
-- made through the API (kept across restarts) and the monitor's view.
CREATE TABLE backends (
    id              TEXT    PRIMARY KEY,
    name            TEXT    NOT NULL,
    host            TEXT    NOT NULL,
    port            INTEGER NOT NULL,
    configured      INTEGER NOT NULL DEFAULT 1,
    config_enabled  INTEGER NOT NULL DEFAULT 1,
    admin_state     TEXT,
    tags            TEXT    NOT NULL DEFAULT '[]',
    max_inflight    INTEGER NOT NULL DEFAULT 2,
    client_id       TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'unknown',
    comfyui_version TEXT,
    vram_total      INTEGER,
    vram_free       INTEGER,
    queue_remaining INTEGER,
    last_error      TEXT,
    last_seen       TEXT,
    offline_since   TEXT,
    last_workflow_id TEXT,
    updated_at      TEXT    NOT NULL
);

-- Webhooks to deliver when a job ends, kept until acknowledged or given up.
CREATE TABLE webhook_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    delivered_at    TEXT,
    gave_up_at      TEXT,
    last_error      TEXT,
    created_at      TEXT    NOT NULL
);
CREATE INDEX webhook_due ON webhook_outbox(next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- Monotonic counters (lease fencing tokens).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters(name, value) VALUES ('lease_token', 0);

-- A submission is one INSERT: its metadata rows and its first event follow
-- from it here, so the writer makes one statement per job.
CREATE TRIGGER jobs_submitted AFTER INSERT ON jobs BEGIN
    INSERT OR IGNORE INTO job_metadata (key, value, job_seq)
        SELECT key, CASE type WHEN 'text' THEN value WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'
                                WHEN 'null' THEN 'null' ELSE json_quote(value) END, NEW.seq
        FROM json_each(NEW.metadata);
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message)
        VALUES (NEW.id, NEW.workflow_id, NEW.submitted_at, 'submitted', NEW.status,
                CASE WHEN NEW.workflow_id IS NULL THEN 'submitted with an inline workflow'
                     ELSE 'submitted with workflow `' || NEW.workflow_id || '`' END);
END;

-- Job counts by status, kept by triggers so that health is one small read.
CREATE TABLE job_counts (
    status TEXT PRIMARY KEY,
    n      INTEGER NOT NULL
);
CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts(status, n) VALUES (NEW.status, 1)
        ON CONFLICT(status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER job_counts_update AFTER UPDATE OF status ON jobs
    WHEN OLD.status <> NEW.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    INSERT INTO job_counts(status, n) VALUES (NEW.status, 1)
        ON CONFLICT(status) DO UPDATE SET n = n + 1;
END;
