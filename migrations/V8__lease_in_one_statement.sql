-- A lease is one statement: the job's UPDATE from 'queued' to 'assigned',
-- with a fencing token one past the counter, writes the lease's row, moves
-- the counter and appends the job's `assigned` event. Each of these was a
-- statement of its own, and each statement is a round trip to SQLite's
-- thread while every other write of the farm (and every submission) waits
-- for the writer.
CREATE TRIGGER jobs_leased AFTER UPDATE OF lease_token ON jobs
    WHEN OLD.status = 'queued' AND NEW.status = 'assigned' BEGIN
    UPDATE counters SET value = NEW.lease_token
        WHERE name = 'lease_token' AND value < NEW.lease_token;
    INSERT INTO leases (prompt_id, job_id, attempt, backend_id, lease_token, leased_at)
        VALUES (NEW.prompt_id, NEW.id, NEW.attempts, NEW.backend_id, NEW.lease_token, NEW.updated_at);
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, attempt, message, data)
        VALUES (NEW.id, NEW.workflow_id, NEW.updated_at, 'assigned', 'assigned', NEW.backend_id,
                NEW.attempts,
                'leased to backend ' || NEW.backend_id || ' (attempt ' || NEW.attempts || ')',
                json_object('prompt_id', NEW.prompt_id));
END;
