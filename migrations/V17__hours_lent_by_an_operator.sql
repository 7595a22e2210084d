-- An operator who enables a backend outside its hours (an artist who goes
-- home early: "render on my box now") lends it to the farm until the end of
-- its next hours, when its hours take over again. `hours_override_until`
-- is that end (UTC); while it is to come, the farm does not set
-- `off_hours` (neither at an edge nor at a restart). A disable or a drain
-- ends the loan; a change of the backend's hours in the config too.
ALTER TABLE backends ADD COLUMN hours_override_until TEXT;
