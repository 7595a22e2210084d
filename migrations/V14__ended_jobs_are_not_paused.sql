-- An ended job is not paused: a pause holds back a job that may still run.
--
-- A job paused and then cancelled (or failed with the job it starts from,
-- or completed before a pause reached its backend) kept its `paused_at`,
-- so it went on being counted as paused (`/api/health`, and `/metrics`'
-- `orchestrator_jobs_paused`, whose alert for a batch nobody resumed then
-- never cleared) and listed as paused. Its events keep that it was.
--
-- A trigger rather than each way a job ends: a child failed by its parent's
-- triggers (V11) ends inside SQLite, where no code of ours runs.
UPDATE jobs SET paused_at = NULL
    WHERE paused_at IS NOT NULL AND status IN ('completed', 'failed', 'cancelled');
CREATE TRIGGER jobs_ended_not_paused AFTER UPDATE OF status ON jobs
    WHEN NEW.paused_at IS NOT NULL AND NEW.status IN ('completed', 'failed', 'cancelled')
BEGIN
    UPDATE jobs SET paused_at = NULL WHERE id = NEW.id;
END;
