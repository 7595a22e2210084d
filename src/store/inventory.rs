//! Backends' inventories as stored: read back at start-up, so a restart
//! does not wait for every backend to answer `/object_info` again.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
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
        let defs = serde_json::Value::Object(inventory.defs.clone()).to_string();
        let models = serde_json::to_string(&inventory.models)?;
        let (hash, count) = (inventory.hash.clone(), inventory.defs.len() as i64);
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO backend_inventory (backend_id, hash, node_defs, models, node_count, \
                         comfyui_version, read_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(backend_id) DO UPDATE \
                         SET hash = excluded.hash, node_defs = excluded.node_defs, models = excluded.models, \
                         node_count = excluded.node_count, comfyui_version = excluded.comfyui_version, \
                         read_at = excluded.read_at",
                    )
                    .bind(&backend_id)
                    .bind(&hash)
                    .bind(defs)
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

    /// Every configured backend's stored inventory.
    pub async fn inventories(&self) -> Result<Vec<(String, Inventory)>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.backend_id, i.hash, i.node_defs, i.models FROM backend_inventory i \
             JOIN backends b ON b.id = i.backend_id WHERE b.configured = 1",
        )
        .fetch_all(self.reader())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let defs: String = r.try_get("node_defs")?;
            let models: String = r.try_get("models")?;
            out.push((
                r.try_get("backend_id")?,
                Inventory {
                    defs: serde_json::from_str(&defs)?,
                    models: serde_json::from_str(&models)?,
                    hash: r.try_get("hash")?,
                },
            ));
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
