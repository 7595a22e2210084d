//! What each backend can run, as the farm keeps it: its inventory, read
//! at connect and on request, and the check leasing and submissions run
//! against it.
//!
//! Why apart from the farm's other state: inventories change rarely and are
//! read on every submission (is there a box that can run this graph?) and
//! every lease (can this one?); what is kept for those reads, and when it
//! is dropped, is one concern.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::{Farm, Shared};
use crate::inventory::{Inventory, Rules};

impl Shared {
    /// A backend's new inventory: jobs it could not run may fit now.
    pub(super) fn set_inventory(&self, backend_id: &str, inventory: Inventory) {
        let mut all = self.inventories.write().expect("inventories");
        // Identical boxes share one copy of their node definitions.
        let inventory = match all.values().find(|i| i.defs_hash == inventory.defs_hash) {
            Some(same) => inventory.sharing_with(same),
            None => inventory,
        };
        all.insert(backend_id.to_string(), Arc::new(inventory));
        *self.distinct_kept.lock().expect("distinct inventories") = None;
        drop(all);
        // Jobs this backend could not run may fit now; nothing changed
        // for the others.
        self.idle.bell(backend_id).notify_one();
    }

    /// The check leasing runs on candidates for this backend, when its
    /// inventory is known.
    pub(super) fn fit_for(&self, backend_id: &str) -> Option<crate::store::Fit> {
        let inventory = self
            .inventories
            .read()
            .expect("inventories")
            .get(backend_id)
            .cloned()?;
        let rules = self.rules.clone();
        Some(crate::store::Fit {
            hash: inventory.hash.clone(),
            check: Arc::new(move |graph: &Value| {
                inventory
                    .check(graph, &rules)
                    .map_err(|r| crate::inventory::lacks(&r))
            }),
        })
    }
}

impl Farm {
    /// The inventories of these backends, where known.
    pub fn inventories(&self, backend_ids: &[String]) -> Vec<(String, Arc<Inventory>)> {
        let map = self.shared.inventories.read().expect("inventories");
        backend_ids
            .iter()
            .filter_map(|id| map.get(id).map(|inv| (id.clone(), inv.clone())))
            .collect()
    }

    /// The distinct inventories of these backends (identical boxes count
    /// once), or `None` while one of them has none yet. Asked by every
    /// submission with the list the store keeps for its tag set: the answer
    /// for that list is kept until an inventory changes, so a submission
    /// does not look through a thousand backends' inventories each time.
    pub fn distinct_inventories(&self, backend_ids: &Arc<[String]>) -> Option<Vec<Arc<Inventory>>> {
        let map = self.shared.inventories.read().expect("inventories");
        let mut kept = self
            .shared
            .distinct_kept
            .lock()
            .expect("distinct inventories");
        // The same list (held here, so its address is not reused) and no
        // inventory changed since (that empties what is kept).
        if let Some(k) = kept.as_ref().filter(|k| Arc::ptr_eq(&k.ids, backend_ids)) {
            return k.distinct.clone();
        }
        let distinct = distinct_of(&map, backend_ids);
        *kept = Some(DistinctKept {
            ids: backend_ids.clone(),
            distinct: distinct.clone(),
        });
        distinct
    }

    /// How inventories check graphs.
    pub fn rules(&self) -> Arc<Rules> {
        self.shared.rules.clone()
    }

    /// Reads a backend's inventory now and stores it.
    pub async fn refresh_inventory(&self, backend_id: &str) -> Result<(), String> {
        let client = self
            .shared
            .clients
            .get(backend_id)
            .ok_or_else(|| format!("backend `{backend_id}` is not configured"))?;
        let version = client
            .system_stats()
            .await
            .map_err(|e| e.to_string())?
            .comfyui_version;
        let inventory =
            crate::inventory::refresh(&self.shared.store, client, backend_id, version).await?;
        self.shared.set_inventory(backend_id, inventory);
        Ok(())
    }
}

/// A kept answer of [`Farm::distinct_inventories`].
pub(super) struct DistinctKept {
    ids: Arc<[String]>,
    distinct: Option<Vec<Arc<Inventory>>>,
}

/// The distinct inventories of `backend_ids` in `map`, `None` while one
/// has none.
fn distinct_of(
    map: &HashMap<String, Arc<Inventory>>,
    backend_ids: &[String],
) -> Option<Vec<Arc<Inventory>>> {
    let mut distinct: Vec<Arc<Inventory>> = Vec::new();
    for id in backend_ids {
        let inventory = map.get(id)?;
        if !distinct.iter().any(|d| d.hash == inventory.hash) {
            distinct.push(inventory.clone());
        }
    }
    Some(distinct)
}
