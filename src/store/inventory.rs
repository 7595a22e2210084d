//! Backends' inventories as stored: read back at start-up, so a restart
//! does not wait for every backend to answer `/object_info` again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{fmt_time, Store, StoreError};
use crate::inventory::Inventory;

/// What the API shows of an inventory.
#[derive(Debug, Clone)]
pub struct InventorySummary {
    /// Node classes it has.
    pub node_count: i64,
    /// Model files per folder.
    pub models: BTreeMap<String, Vec<String>>,
    /// When it was read.
    pub read_at: DateTime<Utc>,
    /// The ComfyUI version it was read from.
    pub comfyui_version: Option<String>,
}

impl Store {
    /// Stores a backend's inventory; from now on jobs found unfit for its
    /// previous one are looked at again.
    pub async fn save_inventory(
        &self,
        backend_id: &str,
        inventory: &Inventory,
        comfyui_version: Option<String>,
    ) -> Result<(), StoreError> {
        let backend_id = backend_id.to_string();
        let defs_hash = inventory.defs_hash.clone();
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM node_defs WHERE hash = ?")
            .bind(&defs_hash)
            .fetch_optional(self.reader())
            .await?;
        // Serialised only when this set of node definitions is new.
        let defs = match known {
            Some(_) => None,
            None => Some(serde_json::to_string(&*inventory.defs)?),
        };
        let models = serde_json::to_string(&inventory.models)?;
        let (hash, count) = (inventory.hash.clone(), inventory.defs.len() as i64);
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    if let Some(defs) = defs {
                        sqlx::query("INSERT OR IGNORE INTO node_defs (hash, defs) VALUES (?, ?)")
                            .bind(&defs_hash)
                            .bind(defs)
                            .execute(&mut *conn)
                            .await?;
                    }
                    sqlx::query(
                        "INSERT INTO backend_inventory (backend_id, hash, node_defs, defs_hash, models, node_count, \
                         comfyui_version, read_at) VALUES (?, ?, '', ?, ?, ?, ?, ?) ON CONFLICT(backend_id) DO UPDATE \
                         SET hash = excluded.hash, node_defs = '', defs_hash = excluded.defs_hash, \
                         models = excluded.models, node_count = excluded.node_count, \
                         comfyui_version = excluded.comfyui_version, read_at = excluded.read_at",
                    )
                    .bind(&backend_id)
                    .bind(&hash)
                    .bind(&defs_hash)
                    .bind(models)
                    .bind(count)
                    .bind(comfyui_version)
                    .bind(fmt_time(Utc::now()))
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query("UPDATE backends SET inventory_hash = ? WHERE id = ?")
                        .bind(&hash)
                        .bind(&backend_id)
                        .execute(&mut *conn)
                        .await?;
                    // Definitions no backend has any more.
                    sqlx::query(
                        "DELETE FROM node_defs WHERE hash NOT IN \
                         (SELECT defs_hash FROM backend_inventory WHERE defs_hash IS NOT NULL)",
                    )
                    .execute(&mut *conn)
                    .await?;
                    // Unfit marks of older inventories mean nothing now.
                    sqlx::query("DELETE FROM job_unfit WHERE backend_id = ? AND inventory_hash <> ?")
                        .bind(&backend_id)
                        .bind(&hash)
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Every configured backend's stored inventory; identical node
    /// definitions are read (and held) once.
    pub async fn inventories(&self) -> Result<Vec<(String, Inventory)>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.backend_id, i.hash, i.defs_hash, coalesce(d.defs, i.node_defs) AS defs, i.models \
             FROM backend_inventory i JOIN backends b ON b.id = i.backend_id \
             LEFT JOIN node_defs d ON d.hash = i.defs_hash WHERE b.configured = 1",
        )
        .fetch_all(self.reader())
        .await?;
        let mut parsed: HashMap<String, Arc<serde_json::Map<String, serde_json::Value>>> =
            HashMap::new();
        let mut out = Vec::new();
        for r in rows {
            let text: String = r.try_get("defs")?;
            // Inventories stored before V6 have no defs hash: their text's.
            let defs_hash: String = match r.try_get::<Option<String>, _>("defs_hash")? {
                Some(h) => h,
                None => format!("{:x}", Sha256::digest(&text)),
            };
            let defs = match parsed.get(&defs_hash) {
                Some(d) => d.clone(),
                None => {
                    let d = Arc::new(serde_json::from_str(&text)?);
                    parsed.insert(defs_hash.clone(), Arc::clone(&d));
                    d
                }
            };
            let models: String = r.try_get("models")?;
            let mut inv = Inventory::from_parts(defs, defs_hash, serde_json::from_str(&models)?);
            // The stored hash is what unfit verdicts were recorded under.
            inv.hash = r.try_get("hash")?;
            out.push((r.try_get("backend_id")?, inv));
        }
        Ok(out)
    }

    /// What the API shows of a backend's inventory, if one was read.
    pub async fn inventory_summary(
        &self,
        backend_id: &str,
    ) -> Result<Option<InventorySummary>, StoreError> {
        let row = sqlx::query(
            "SELECT node_count, models, read_at, comfyui_version FROM backend_inventory WHERE backend_id = ?",
        )
        .bind(backend_id)
        .fetch_optional(self.reader())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let models: String = r.try_get("models")?;
        Ok(Some(InventorySummary {
            node_count: r.try_get("node_count")?,
            models: serde_json::from_str(&models)?,
            read_at: r.try_get("read_at")?,
            comfyui_version: r.try_get("comfyui_version")?,
        }))
    }
}
