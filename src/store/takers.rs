//! Which backends a submission is checked against: the configured ones
//! whose tags cover what it requires, and of those the enabled ones.
//!
//! Why a module of its own: every submission asks, and on a farm of 1,000
//! the read goes over every backend (about 270 us, a core's worth at 4,000
//! submissions a second), so the answer is kept per tag set until a
//! backend's tags or admin state change. The tag rule itself is leasing's
//! ([`super::lease::missing_tags`]), so the two cannot disagree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lease::missing_tags;
use super::model::*;
use super::{Store, StoreError};

/// The configured backends whose tags cover one tag set, and of those the
/// enabled ones: both from one read of the farm.
struct Covering {
    all: Arc<[String]>,
    enabled: Arc<[String]>,
}

/// The answers of [`Store::backends_with_tags`] and
/// [`Store::enabled_backends_with_tags`] by tag set, until the backends'
/// tags, configuration or admin states change.
#[derive(Default)]
pub(super) struct Takers {
    generation: AtomicU64,
    known: Mutex<HashMap<String, Arc<Covering>>>,
    /// Held while an answer is read: the submissions that miss together
    /// (the first ones after a start or a change) wait for one read of the
    /// farm instead of each making its own (13 reads of 10 ms each at the
    /// start of a burst on a farm of 1,000).
    reading: tokio::sync::Mutex<()>,
}

/// Tag sets remembered at most (clients use a handful).
const MAX_TAG_SETS: usize = 1_000;

impl Takers {
    /// Backends' tags, configuration or admin states changed (called once
    /// the change is committed): what was kept is forgotten.
    pub(super) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.known.lock().expect("takers").clear();
    }
}

impl Store {
    /// The configured backends whose tags cover `requires`, enabled or not
    /// (the submit check of `requires`: a job may wait for a disabled one).
    pub async fn backends_with_tags(&self, requires: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(self.covering(requires).await?.all.to_vec())
    }

    /// The enabled configured backends whose tags cover `requires` (what
    /// a submission's graph is checked against).
    pub async fn enabled_backends_with_tags(
        &self,
        requires: &[String],
    ) -> Result<Arc<[String]>, StoreError> {
        Ok(self.covering(requires).await?.enabled.clone())
    }

    /// Every submission asks, and the read goes over the whole farm (about
    /// 270 us with 1,000 backends, a core's worth at 4,000 submissions a
    /// second): the answer is kept until a backend's tags, configuration or
    /// admin state change.
    async fn covering(&self, requires: &[String]) -> Result<Arc<Covering>, StoreError> {
        let key = serde_json::to_string(requires)?;
        let known = || self.takers.known.lock().expect("takers").get(&key).cloned();
        if let Some(c) = known() {
            return Ok(c);
        }
        let _reading = self.takers.reading.lock().await;
        let generation = self.takers.generation.load(Ordering::SeqCst);
        if let Some(c) = known() {
            return Ok(c);
        }
        let rows: Vec<(String, bool, Option<AdminState>)> = sqlx::query_as(&format!(
            "SELECT id, config_enabled, admin_state FROM backends b \
             WHERE configured = 1 AND NOT EXISTS {} ORDER BY id",
            missing_tags("?1", "b.tags")
        ))
        .bind(&key)
        .fetch_all(self.reader())
        .await?;
        let covering = Arc::new(Covering {
            all: rows.iter().map(|(id, _, _)| id.clone()).collect(),
            enabled: rows
                .into_iter()
                .filter(|(_, config, admin)| backend_admitted(*config, *admin))
                .map(|(id, _, _)| id)
                .collect(),
        });
        let mut known = self.takers.known.lock().expect("takers");
        // Kept only if nothing changed while it was read.
        if self.takers.generation.load(Ordering::SeqCst) == generation {
            if known.len() >= MAX_TAG_SETS {
                known.clear();
            }
            known.insert(key, covering.clone());
        }
        Ok(covering)
    }
}
