-- A backend may have hours (`backends[].hours` in the config, as
-- `20:00-08:00` in the orchestrator's local time): an artist's workstation
-- that joins the farm at night. Outside them it takes no new jobs (those it
-- runs finish), whatever else enables it; a disable or a drain still holds
-- inside them.
--
-- `hours` is the config's window, kept for the messages that say why a
-- backend takes nothing; `off_hours` whether now is outside it, set by the
-- farm at start and at each edge of the window, and read by every rule
-- that asks whether a backend is enabled (leasing, the avoidance of a
-- retry, a job's page).
ALTER TABLE backends ADD COLUMN hours TEXT;
ALTER TABLE backends ADD COLUMN off_hours INTEGER NOT NULL DEFAULT 0;
