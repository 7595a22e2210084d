-- Node definitions are kept once per distinct set: a farm of identical
-- boxes stores (and holds in memory) one copy, not one per backend.
CREATE TABLE node_defs (
    hash TEXT PRIMARY KEY,
    defs TEXT NOT NULL
);
-- Set for inventories stored from now on (their node_defs column is then '').
ALTER TABLE backend_inventory ADD COLUMN defs_hash TEXT;
