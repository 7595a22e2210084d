-- The farm view: attempts in a time window, and the queue over time.

-- Attempts that ended in a window (the timeline reads these and the open ones).
CREATE INDEX leases_by_finished ON leases(finished_at) WHERE finished_at IS NOT NULL;
-- Attempts still open.
CREATE INDEX leases_open ON leases(leased_at) WHERE finished_at IS NULL;

-- A sample of the queue each minute (what a chart of the last day draws).
CREATE TABLE farm_samples (
    at      TEXT    PRIMARY KEY,
    queued  INTEGER NOT NULL,
    running INTEGER NOT NULL
);
