-- What each backend can run: its node definitions (from /object_info, kept
-- to what validation needs) and its model files per folder. Kept here so
-- that a restart does not wait for a backend to answer.
CREATE TABLE backend_inventory (
    backend_id      TEXT    PRIMARY KEY,
    hash            TEXT    NOT NULL,
    node_defs       TEXT    NOT NULL,
    models          TEXT    NOT NULL,
    node_count      INTEGER NOT NULL,
    comfyui_version TEXT,
    read_at         TEXT    NOT NULL
);
-- The hash of the inventory now in use: a job found unfit for a backend is
-- looked at again when it changes (a model was added, say).
ALTER TABLE backends ADD COLUMN inventory_hash TEXT;

-- Jobs a backend's inventory cannot run (a node class or a model file it
-- lacks), for that inventory.
CREATE TABLE job_unfit (
    job_id         TEXT NOT NULL,
    backend_id     TEXT NOT NULL,
    inventory_hash TEXT NOT NULL,
    reason         TEXT NOT NULL,
    PRIMARY KEY (job_id, backend_id)
) WITHOUT ROWID;

-- What a job needs loaded (its checkpoint), and what each backend ran last:
-- a free backend prefers a job that keeps its models loaded.
ALTER TABLE jobs ADD COLUMN affinity TEXT;
ALTER TABLE backends ADD COLUMN last_affinity TEXT;
CREATE INDEX jobs_queue_affinity ON jobs(affinity, priority DESC, seq) WHERE status = 'queued';

-- The workflow preference gave way to the affinity above.
DROP INDEX IF EXISTS jobs_queue_workflow;
