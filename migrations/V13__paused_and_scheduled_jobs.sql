-- A job can be paused: it keeps its place in the queue (its priority, its
-- age) but no backend takes it until it is resumed. An overnight batch
-- submitted in the afternoon and let go at night; the rest of a batch held
-- back while its first shots are checked, without cancelling (a cancel
-- ends the job: its place, its history, a script's wait for it).
--
-- A flag beside the status, not a status of its own: a paused job is still
-- `queued` (or `waiting` for the jobs it starts from, which the triggers of
-- V11 go on moving: a paused child is queued paused when its parents
-- complete, and fails with them), so every rule that reads the status
-- stays as it was; only choosing a job to run skips the paused ones.
-- Null: not paused; else when it was paused.
ALTER TABLE jobs ADD COLUMN paused_at TEXT;
-- The paused jobs, for their count (few, and read by health).
CREATE INDEX jobs_paused ON jobs(seq) WHERE paused_at IS NOT NULL;

-- A job may also be submitted to start after a time (`start_after`, its
-- first attempt's `not_before`, which leasing already honours): a batch
-- submitted by day starts by itself at night.
--
-- Submitted paused, or to start later: said in the job's history right
-- after its `submitted` event (the insert's trigger is made again with
-- it: SQLite runs a newer trigger first, which put these before it).
DROP TRIGGER jobs_submitted;
CREATE TRIGGER jobs_submitted AFTER INSERT ON jobs BEGIN
    INSERT OR IGNORE INTO job_metadata (key, value, job_seq)
        SELECT key, CASE type WHEN 'text' THEN value WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'
                                WHEN 'null' THEN 'null' ELSE json_quote(value) END, NEW.seq
        FROM json_each(NEW.metadata);
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message)
        VALUES (NEW.id, NEW.workflow_id, NEW.submitted_at, 'submitted', NEW.status,
                CASE WHEN NEW.workflow_id IS NULL THEN 'submitted with an inline workflow'
                     ELSE 'submitted with workflow `' || NEW.workflow_id || '`' END);
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message)
        SELECT NEW.id, NEW.workflow_id, NEW.submitted_at, 'paused', NEW.status,
               'submitted paused: no backend takes it until it is resumed'
        WHERE NEW.paused_at IS NOT NULL;
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message)
        SELECT NEW.id, NEW.workflow_id, NEW.submitted_at, 'scheduled', NEW.status,
               'scheduled: no backend takes it before ' || NEW.not_before
        WHERE NEW.not_before > NEW.submitted_at;
END;
