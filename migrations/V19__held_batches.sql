-- A batch the farm found broken is held: its next jobs are stored paused.
--
-- Why: the farm pauses a broken batch's queued jobs, but a tool that
-- submits its shots one at a time (each run before the next comes) has
-- none queued when the batch breaks, so each next shot ran and failed
-- alike all night, and a restart forgot even that the batch was broken.
-- A hold is kept here, so it outlives a restart; a job submitted for a
-- held batch is stored paused, its `paused` event saying why.
--
-- `field` is the metadata field naming a batch (`dispatch.batch_field`
-- when it was held) and `batch` its value as `job_metadata` keeps it.
-- `cause` is the failure that broke it, `why` each held job's event,
-- `banner` what `GET /api/health` warns with, `held_at` when (UTC).
CREATE TABLE held_batches (
    field   TEXT NOT NULL,
    batch   TEXT NOT NULL,
    cause   TEXT NOT NULL,
    why     TEXT NOT NULL,
    banner  TEXT NOT NULL,
    held_at TEXT NOT NULL,
    PRIMARY KEY (field, batch)
) WITHOUT ROWID;

-- The hold ends when its batch's last paused job stops being paused:
-- resumed (`orchestrator jobs --ids --paused -m batch=B | orchestrator
-- resume -` resumes them one by one), cancelled, or ended with a job it
-- started from (V11's triggers, where no code of ours runs). One resumed
-- while others stay paused (a shot let go to check the mend) keeps it.
-- A hold with nothing paused yet (the batch broke with nothing queued)
-- waits for its next job, or for `POST /api/batch/{batch}/resume`.
CREATE TRIGGER held_batch_let_go AFTER UPDATE OF paused_at ON jobs
    WHEN OLD.paused_at IS NOT NULL AND NEW.paused_at IS NULL
BEGIN
    DELETE FROM held_batches
    WHERE EXISTS (SELECT 1 FROM job_metadata m
                  WHERE m.job_seq = NEW.seq AND m.key = held_batches.field
                    AND m.value = held_batches.batch)
      AND NOT EXISTS (SELECT 1 FROM job_metadata m JOIN jobs j ON j.seq = m.job_seq
                      WHERE m.key = held_batches.field AND m.value = held_batches.batch
                        AND j.paused_at IS NOT NULL);
END;

-- A job stored paused for its held batch says why in its `paused` event
-- (the submission's single INSERT: the trigger of V13 made again, its
-- message read from the hold when there is one, its data as the farm's
-- pauses' with `held`: the batch's pause, told once, is not told again
-- for each job held after it). The hold is read in the select list, so
-- only for a job stored paused, and from the holds (a few rows) to the
-- job's metadata by its whole key: a join the other way round reads the
-- whole `job_metadata` table, which has no index by job, on every insert.
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
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message, data)
        SELECT NEW.id, NEW.workflow_id, NEW.submitted_at, 'paused', NEW.status,
               COALESCE((SELECT h.why FROM held_batches h WHERE EXISTS
                           (SELECT 1 FROM job_metadata m WHERE m.key = h.field
                              AND m.value = h.batch AND m.job_seq = NEW.seq)),
                        'submitted paused: no backend takes it until it is resumed'),
               (SELECT json_object('batch', h.batch, 'by', 'farm', 'held', json('true'))
                FROM held_batches h WHERE EXISTS
                  (SELECT 1 FROM job_metadata m WHERE m.key = h.field
                     AND m.value = h.batch AND m.job_seq = NEW.seq))
        WHERE NEW.paused_at IS NOT NULL;
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message)
        SELECT NEW.id, NEW.workflow_id, NEW.submitted_at, 'scheduled', NEW.status,
               'scheduled: no backend takes it before ' || NEW.not_before
        WHERE NEW.not_before > NEW.submitted_at;
END;
