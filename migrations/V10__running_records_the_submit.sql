-- A job's start is one statement whatever order its news comes in: the
-- job's UPDATE from 'assigned' to 'running' also records the lease's
-- submission when the answer to the submit has not been recorded yet (it
-- runs, so the backend has it), which fires `leases_submitted` (V9) and so
-- appends `submitted_to_backend` before `running`, as the two statements
-- it replaces did.
DROP TRIGGER jobs_running;
CREATE TRIGGER jobs_running AFTER UPDATE OF status ON jobs
    WHEN OLD.status = 'assigned' AND NEW.status = 'running' BEGIN
    UPDATE leases SET submitted_at = coalesce(submitted_at, NEW.updated_at),
                      started_at = coalesce(started_at, NEW.updated_at)
        WHERE prompt_id = NEW.prompt_id;
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, attempt, message)
        VALUES (NEW.id, NEW.workflow_id, NEW.updated_at, 'running', 'running', NEW.backend_id,
                NEW.attempts, 'running on backend ' || NEW.backend_id);
END;
