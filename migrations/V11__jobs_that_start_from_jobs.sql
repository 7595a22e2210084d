-- A job may start from another job's output (an input value `job:<id>` or
-- `job:<id>/<output name>`): a second pass (an upscale, an img2img) of a
-- shot submitted with its first, the night's batch in one go.
--
-- Such a job is stored `waiting` while one of the jobs it starts from (its
-- parents) has not completed, and goes to `queued` when the last one does;
-- if a parent fails or is cancelled, the jobs waiting on it fail, and the
-- ones waiting on those, so that a script following the batch sees every
-- job end. Both happen here, in the statement that ends the parent, so a
-- crash can never leave a child waiting for a parent that already ended.
--
-- The parents' ids are written with the job (a JSON array, as `inputs`);
-- a trigger turns them into rows, so a submission stays one INSERT.
ALTER TABLE jobs ADD COLUMN parents TEXT NOT NULL DEFAULT '[]';
CREATE TABLE job_parents (
    job_id    TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    PRIMARY KEY (job_id, parent_id)
);
CREATE INDEX job_parents_by_parent ON job_parents(parent_id);
CREATE TRIGGER jobs_parents AFTER INSERT ON jobs WHEN NEW.parents <> '[]' BEGIN
    INSERT OR IGNORE INTO job_parents (job_id, parent_id)
        SELECT NEW.id, value FROM json_each(NEW.parents);
END;

-- The last parent completed: its waiting children are queued.
CREATE TRIGGER jobs_release_children AFTER UPDATE OF status ON jobs
    WHEN NEW.status = 'completed' AND OLD.status <> 'completed' BEGIN
    UPDATE jobs SET status = 'queued', updated_at = NEW.updated_at
        WHERE status = 'waiting'
          AND id IN (SELECT job_id FROM job_parents WHERE parent_id = NEW.id)
          AND NOT EXISTS (SELECT 1 FROM job_parents p JOIN jobs j ON j.id = p.parent_id
                          WHERE p.job_id = jobs.id AND j.status <> 'completed');
END;
CREATE TRIGGER jobs_released AFTER UPDATE OF status ON jobs
    WHEN OLD.status = 'waiting' AND NEW.status = 'queued' BEGIN
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message)
        VALUES (NEW.id, NEW.workflow_id, NEW.updated_at, 'parents_completed', 'queued',
                'queued: the jobs it starts from completed');
END;

-- A parent failed or was cancelled: its waiting children fail (and theirs,
-- as each child's own change fires this again: the writer's connection
-- runs with recursive triggers on).
CREATE TRIGGER jobs_fail_children AFTER UPDATE OF status ON jobs
    WHEN NEW.status IN ('failed', 'cancelled') AND OLD.status <> NEW.status BEGIN
    UPDATE jobs SET status = 'failed', finished_at = NEW.updated_at, updated_at = NEW.updated_at,
                    error = json_object(
                        'code', 'parent_failed',
                        'parent', NEW.id,
                        'message', 'the job it starts from, ' || NEW.id || ', '
                            || CASE NEW.status WHEN 'failed' THEN 'failed' ELSE 'was cancelled' END
                            || '; retry both (a retried job waits for its parent again)')
        WHERE status = 'waiting'
          AND id IN (SELECT job_id FROM job_parents WHERE parent_id = NEW.id);
END;
CREATE TRIGGER jobs_parent_failed AFTER UPDATE OF status ON jobs
    WHEN OLD.status = 'waiting' AND NEW.status = 'failed' BEGIN
    INSERT INTO job_events (job_id, workflow_id, at, kind, status, message, data)
        VALUES (NEW.id, NEW.workflow_id, NEW.updated_at, 'failed', 'failed',
                json_extract(NEW.error, '$.message'), NEW.error);
    INSERT INTO webhook_outbox (job_id, url, status, next_attempt_at, created_at)
        SELECT NEW.id, NEW.callback_url, 'failed', NEW.updated_at, NEW.updated_at
        WHERE NEW.callback_url IS NOT NULL;
END;
