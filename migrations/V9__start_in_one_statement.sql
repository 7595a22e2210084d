-- A job's start costs one statement a step, as its lease does (V8):
-- the lease's `submitted_at`, set once, appends the job's
-- `submitted_to_backend` event; the job's UPDATE from 'assigned' to
-- 'running' records the lease's start and appends the `running` event.
-- Each was a statement of its own, a round trip to SQLite's thread while
-- every other write waits for the writer.
CREATE TRIGGER leases_submitted AFTER UPDATE OF submitted_at ON leases
    WHEN OLD.submitted_at IS NULL AND NEW.submitted_at IS NOT NULL BEGIN
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, attempt, message)
        VALUES (NEW.job_id, (SELECT workflow_id FROM jobs WHERE id = NEW.job_id), NEW.submitted_at,
                'submitted_to_backend', NULL, NEW.backend_id, NEW.attempt,
                'backend ' || NEW.backend_id || ' accepted the prompt');
END;
CREATE TRIGGER jobs_running AFTER UPDATE OF status ON jobs
    WHEN OLD.status = 'assigned' AND NEW.status = 'running' BEGIN
    UPDATE leases SET started_at = coalesce(started_at, NEW.updated_at)
        WHERE prompt_id = NEW.prompt_id;
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, attempt, message)
        VALUES (NEW.id, NEW.workflow_id, NEW.updated_at, 'running', 'running', NEW.backend_id,
                NEW.attempts, 'running on backend ' || NEW.backend_id);
END;
