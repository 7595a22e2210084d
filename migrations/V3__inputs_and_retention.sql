-- Input files (pictures a workflow starts from), content-addressed: the id
-- is `sha256:<hex>` of the bytes, stored as data/inputs/<hex>.
CREATE TABLE inputs (
    id           TEXT    PRIMARY KEY,
    size         INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    filename     TEXT,
    created_at   TEXT    NOT NULL,
    -- The last submission that named it (retention keeps recently used inputs).
    last_used_at TEXT    NOT NULL
);

-- Which jobs use which inputs: an input an unfinished job needs is never deleted.
CREATE TABLE job_inputs (
    job_id   TEXT NOT NULL,
    input_id TEXT NOT NULL,
    PRIMARY KEY (job_id, input_id)
) WITHOUT ROWID;
CREATE INDEX job_inputs_by_input ON job_inputs(input_id);

-- The input ids a job's graph names (a JSON array), written with the job;
-- a trigger turns it into job_inputs rows, so a submission stays one INSERT.
ALTER TABLE jobs ADD COLUMN inputs TEXT NOT NULL DEFAULT '[]';
CREATE TRIGGER jobs_inputs AFTER INSERT ON jobs WHEN NEW.inputs <> '[]' BEGIN
    INSERT OR IGNORE INTO job_inputs (job_id, input_id)
        SELECT NEW.id, value FROM json_each(NEW.inputs);
    UPDATE inputs SET last_used_at = NEW.submitted_at
        WHERE id IN (SELECT value FROM json_each(NEW.inputs));
END;

-- Retention: when a collected output's file was deleted (the record stays).
ALTER TABLE outputs ADD COLUMN pruned_at TEXT;
-- Finished jobs by end time, for the outputs retention sweep.
CREATE INDEX jobs_by_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
-- Progress events by time, for the progress retention sweep.
CREATE INDEX job_events_progress ON job_events(seq) WHERE kind = 'progress';
