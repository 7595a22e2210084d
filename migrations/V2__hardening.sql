-- A job's own run-time limit (the manifest's `timeout_s`); NULL: the
-- template's or the farm's default.
ALTER TABLE jobs ADD COLUMN timeout_s INTEGER;

-- When the backend started running this lease's prompt: a lease lost after
-- it started counts towards `dispatch.max_lost_runs` (the job may be what
-- crashes its backend), one lost while it waited in a queue does not.
ALTER TABLE leases ADD COLUMN started_at TEXT;

-- The durable cleanup list: prompt ids the orchestrator gave up on (a
-- submit whose answer never came, a backend that stopped answering, a
-- cancel that timed out, a half-valid graph). Each is worked until the
-- backend confirms the prompt is gone from its queue and its history, in a
-- check made no earlier than `not_before` (a submit that timed out on our
-- side may still be queued by ComfyUI after we gave up on it).
CREATE TABLE prompt_cleanup (
    prompt_id  TEXT    PRIMARY KEY,
    backend_id TEXT    NOT NULL,
    job_id     TEXT,
    reason     TEXT    NOT NULL,
    added_at   TEXT    NOT NULL,
    not_before TEXT    NOT NULL,
    tries      INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX prompt_cleanup_by_backend ON prompt_cleanup(backend_id);

-- Leases taken back under V1 and not yet cleaned up move to the list.
INSERT INTO prompt_cleanup (prompt_id, backend_id, job_id, reason, added_at, not_before)
    SELECT prompt_id, backend_id, job_id, 'taken back while the backend was away',
           coalesce(finished_at, leased_at), coalesce(finished_at, leased_at)
    FROM leases WHERE cleanup_pending = 1;
UPDATE leases SET cleanup_pending = 0 WHERE cleanup_pending = 1;
