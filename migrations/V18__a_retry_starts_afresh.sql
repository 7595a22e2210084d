-- A user's retry starts a job afresh: what its earlier attempts decided
-- (a backend that refused it, failed it twice, or died under it) no longer
-- keeps it from any backend, and its lost runs are counted again from
-- none. (Where it ran out of GPU memory still counts: a box's memory is
-- not mended.) An artist retries once the box is
-- mended (the model installed, the GPU replaced); a job that is itself
-- the fault earns its bars again in a few attempts. `retried_at` is the
-- last retry (UTC, as leases' `leased_at`): the rules read only leases
-- from then. NULL: never retried.
ALTER TABLE jobs ADD COLUMN retried_at TEXT;
