//! One look at the farm for the safety nets of all the workers that tick
//! together.
//!
//! Why: each worker has safety nets (a look at the queue, in case a ring was
//! missed; a reconcile, in case the database says the backend holds
//! something the worker does not follow). On an idle farm of a thousand
//! backends they were five database reads by each worker every 30 s, some
//! 160 reads a second that found nothing: most of the idle orchestrator's
//! work. The workers of one timer slot (`super::SLOTS`) tick at the same
//! instant, so the first of them reads [`FarmGlance`] (two statements) and
//! the others of that tick use its answer: a worker whose net finds nothing
//! due anywhere does not look, and an idle worker whose backend holds
//! nothing and has nothing to clean up does not reconcile. The nets still
//! catch what they are for: a due job nobody took, a job or a cleanup entry
//! the worker does not know of, at the next tick after it appears.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::store::{FarmGlance, Store};

/// The last glance, by the tick it was read for.
#[derive(Default)]
pub(super) struct Glances {
    kept: Mutex<Option<(Instant, Arc<FarmGlance>)>>,
}

impl Glances {
    /// The glance for the tick scheduled at `tick`: read by the first
    /// worker of that tick, shared by the others. `None` when it cannot be
    /// read: the worker then runs its nets as if it had none.
    pub(super) async fn for_tick(&self, tick: Instant, store: &Store) -> Option<Arc<FarmGlance>> {
        let mut kept = self.kept.lock().await;
        if let Some((at, glance)) = kept.as_ref() {
            if *at == tick {
                return Some(glance.clone());
            }
        }
        match store.farm_glance().await {
            Ok(glance) => {
                let glance = Arc::new(glance);
                *kept = Some((tick, glance.clone()));
                Some(glance)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the farm for the safety nets; each worker looks for itself");
                None
            }
        }
    }
}

/// What a worker's safety nets do on a tick, given the glance.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Nets {
    /// Look for work.
    pub(super) look: bool,
    /// Ask the backend (reconcile).
    pub(super) reconcile: bool,
}

/// Decides a worker's nets: `look_due` and `round_due` say which of its
/// nets fell due; `idle`, that it follows nothing and is not stuck.
pub(super) fn nets(
    backend_id: &str,
    look_due: bool,
    round_due: bool,
    idle: bool,
    glance: Option<&FarmGlance>,
) -> Nets {
    let Some(g) = glance else {
        return Nets {
            look: look_due,
            reconcile: round_due,
        };
    };
    Nets {
        // Nothing due anywhere: no ring can have been missed.
        look: look_due && g.due,
        // A worker that follows prompts asks its backend anyway (it is
        // how lost messages are found); an idle one only when the database
        // says its backend holds something.
        reconcile: round_due && (!idle || g.holders.contains(backend_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glance(due: bool, holders: &[&str]) -> FarmGlance {
        FarmGlance {
            due,
            holders: holders.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn an_idle_worker_skips_the_nets_that_would_find_nothing() {
        let quiet = glance(false, &[]);
        assert_eq!(
            nets("b1", true, true, true, Some(&quiet)),
            Nets {
                look: false,
                reconcile: false
            }
        );
        // A job due somewhere: it looks. Its backend holds something (a job
        // it does not follow, a prompt to clean up): it asks the backend.
        let busy = glance(true, &["b1"]);
        assert_eq!(
            nets("b1", true, true, true, Some(&busy)),
            Nets {
                look: true,
                reconcile: true
            }
        );
        assert!(!nets("b2", true, true, true, Some(&busy)).reconcile);
        // Only the nets that fell due run.
        assert_eq!(
            nets("b1", false, false, true, Some(&busy)),
            Nets {
                look: false,
                reconcile: false
            }
        );
    }

    #[test]
    fn a_worker_that_follows_prompts_or_has_no_glance_keeps_its_nets() {
        let quiet = glance(false, &[]);
        assert!(nets("b1", true, true, false, Some(&quiet)).reconcile);
        assert_eq!(
            nets("b1", true, true, true, None),
            Nets {
                look: true,
                reconcile: true
            }
        );
    }

    #[tokio::test]
    async fn the_workers_of_one_tick_share_one_read() {
        let (_dir, store) = Store::temporary().await;
        let glances = Glances::default();
        let tick = Instant::now();
        let first = glances.for_tick(tick, &store).await.unwrap();
        let again = glances.for_tick(tick, &store).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "one read for one tick");
        assert!(!first.due && first.holders.is_empty(), "{first:?}");
        let next = glances
            .for_tick(tick + std::time::Duration::from_secs(2), &store)
            .await
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &next), "a new read for the next tick");
    }
}
