-- The farm can be shared between groups of jobs (`dispatch.share_by`: the
-- metadata field that names a job's group, `batch` or `artist`): a free
-- backend takes the next job of the group with the fewest jobs on the farm,
-- so a second artist's batch does not wait behind the whole of the first.
--
-- `share` is the job's group: the field's value as its metadata row holds
-- it, '' for a job without the field, NULL while the farm is not shared.
-- Set at submission; when the field changes (or sharing is turned on or
-- off), set again at start for every job that may still run (a completed
-- one never runs again).
ALTER TABLE jobs ADD COLUMN share TEXT;
-- The groups with queued jobs, and each one's queue in leasing order. Only
-- shared jobs: a farm not shared keeps no entry (a submission writes one
-- index less).
CREATE INDEX jobs_queue_share ON jobs(share, priority DESC, seq)
    WHERE status = 'queued' AND share IS NOT NULL;
-- When each group was last served (the lease token of its latest lease,
-- which only rises): among groups with as many jobs on the farm, the one
-- served longest ago goes first, so one box alternates between batches
-- (with a slot each, every group has none on the farm when a slot frees).
-- A row a group (a batch's name: a few a night), written by the lease's
-- own statement through this trigger, only on a shared farm.
CREATE TABLE share_turns (
    share      TEXT PRIMARY KEY,
    last_token INTEGER NOT NULL
);
CREATE TRIGGER jobs_share_served AFTER UPDATE OF status ON jobs
    WHEN NEW.status = 'assigned' AND NEW.share IS NOT NULL
BEGIN
    INSERT INTO share_turns (share, last_token) VALUES (NEW.share, NEW.lease_token)
        ON CONFLICT (share) DO UPDATE SET last_token = excluded.last_token;
END;
-- Each group's jobs on the farm, counted at every lease on a shared farm
-- (a seek, where the held jobs of a thousand boxes would be read a group).
CREATE INDEX jobs_active_share ON jobs(share)
    WHERE status IN ('assigned', 'running') AND share IS NOT NULL;
-- Settings the database must remember across starts to tell a change of
-- the config from a start like the last (`share_by`).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT
);
