//! Which workers wait for work, so that a queued job wakes one of them
//! instead of every worker of the farm.
//!
//! Why: with a thousand backends, waking every worker for every submission
//! costs a thousand lease attempts per job. A worker that found nothing to
//! lease with a slot free registers here; a queued job rings the worker that
//! has waited longest among those whose tags cover the job (so work spreads
//! over the farm). A rung worker that still finds nothing it may run while
//! due jobs wait (its inventory lacks the job's model) passes the ring on,
//! at most once around the workers that were waiting, so a job that fits
//! one box out of many still starts at once; one that finds the queue empty
//! of due jobs (a worker that freed a slot took the job first) ends the
//! ring, or a busy farm would ring through its idle workers for nothing.
//! Busy workers need no ring: they lease when a slot frees, and a backend
//! that takes no jobs now (disabled, draining, not online) does not wait here: its own bell rings when that changes (its
//! state, its admin state, its inventory). Farm-wide changes (a retry
//! due, jobs queued again) still wake everyone through the broadcast in
//! `Shared::wake`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Who waits, by backend number (given in [`IdleWorkers::new`]).
///
/// Why numbers: every fill of every worker asks whether it already waits,
/// and with ids that was a scan comparing up to a thousand strings, plus a
/// string allocated per wait and per ring.
struct State {
    /// Waiting workers, longest-waiting first.
    waiting: VecDeque<usize>,
    /// Whether each backend's worker is in `waiting`.
    is_waiting: Vec<bool>,
    /// Rings each rung worker may still pass on.
    hops: Vec<Option<usize>>,
}

/// The farm's waiting workers.
pub(super) struct IdleWorkers {
    state: Mutex<State>,
    /// Each backend's number.
    index: HashMap<String, usize>,
    bells: Vec<Arc<Notify>>,
    tags: Vec<Vec<String>>,
}

impl IdleWorkers {
    /// For these backends and their tags.
    pub(super) fn new<'a>(backends: impl Iterator<Item = (&'a str, &'a [String])>) -> IdleWorkers {
        let (mut index, mut bells, mut tags) = (HashMap::new(), Vec::new(), Vec::new());
        for (id, t) in backends {
            if index.contains_key(id) {
                continue;
            }
            index.insert(id.to_string(), bells.len());
            bells.push(Arc::new(Notify::new()));
            tags.push(t.to_vec());
        }
        let n = bells.len();
        IdleWorkers {
            state: Mutex::new(State {
                waiting: VecDeque::with_capacity(n),
                is_waiting: vec![false; n],
                hops: vec![None; n],
            }),
            index,
            bells,
            tags,
        }
    }

    /// The bell a worker listens to.
    pub(super) fn bell(&self, id: &str) -> Arc<Notify> {
        self.index
            .get(id)
            .map(|&i| self.bells[i].clone())
            .unwrap_or_default()
    }

    /// The worker has a free slot and found nothing to lease.
    pub(super) fn waiting(&self, id: &str) {
        let Some(&i) = self.index.get(id) else { return };
        let mut s = self.state.lock().expect("idle");
        if !s.is_waiting[i] {
            s.is_waiting[i] = true;
            s.waiting.push_back(i);
        }
    }

    /// The worker is full, or cannot lease (its backend is down).
    pub(super) fn busy(&self, id: &str) {
        let Some(&i) = self.index.get(id) else { return };
        let mut s = self.state.lock().expect("idle");
        if s.is_waiting[i] {
            s.is_waiting[i] = false;
            s.waiting.retain(|&w| w != i);
        }
        s.hops[i] = None;
    }

    /// A rung worker leased something, or found that nothing due is left
    /// for anyone: its ring ends there.
    pub(super) fn end_ring(&self, id: &str) {
        let Some(&i) = self.index.get(id) else { return };
        self.state.lock().expect("idle").hops[i] = None;
    }

    /// A job needing `requires` was queued: rings the longest-waiting worker
    /// whose tags cover it. Whether one was rung.
    pub(super) fn ring_for(&self, requires: &[String]) -> bool {
        let mut s = self.state.lock().expect("idle");
        let hops = s.waiting.len().saturating_sub(1);
        self.ring_first(&mut s, hops, |i| {
            requires.iter().all(|r| self.tags[i].contains(r))
        })
    }

    /// A rung worker found nothing it may run: rings the next waiting worker,
    /// while the ring has hops left.
    pub(super) fn pass_on(&self, from: &str) {
        let Some(&from) = self.index.get(from) else {
            return;
        };
        let mut s = self.state.lock().expect("idle");
        let Some(hops) = s.hops[from].take().filter(|h| *h > 0) else {
            return;
        };
        self.ring_first(&mut s, hops - 1, |i| i != from);
    }

    fn ring_first(&self, s: &mut State, hops: usize, fits: impl Fn(usize) -> bool) -> bool {
        let Some(pos) = s.waiting.iter().position(|&i| fits(i)) else {
            return false;
        };
        let i = s.waiting.remove(pos).expect("position is in range");
        s.is_waiting[i] = false;
        s.hops[i] = Some(hops);
        self.bells[i].notify_one();
        true
    }

    /// Waiting workers now (for tests and metrics).
    #[cfg(test)]
    fn waiting_now(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("idle")
            .waiting
            .iter()
            .filter_map(|&i| self.index.iter().find(|(_, &n)| n == i))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn farm() -> IdleWorkers {
        let none: Vec<String> = vec![];
        let flux = vec!["flux".to_string()];
        IdleWorkers::new(
            [
                ("a", none.as_slice()),
                ("b", flux.as_slice()),
                ("c", none.as_slice()),
            ]
            .into_iter(),
        )
    }

    #[tokio::test]
    async fn a_job_rings_the_longest_waiting_worker_whose_tags_cover_it() {
        let idle = farm();
        for id in ["a", "b", "c"] {
            idle.waiting(id);
        }
        idle.waiting("a");
        assert_eq!(idle.waiting_now(), ["a", "b", "c"], "registered once");
        assert!(idle.ring_for(&[]));
        assert_eq!(idle.waiting_now(), ["b", "c"]);
        // Rung: its bell holds a permit.
        tokio::time::timeout(std::time::Duration::from_secs(1), idle.bell("a").notified())
            .await
            .unwrap();
        assert!(idle.ring_for(&["flux".to_string()]));
        assert_eq!(idle.waiting_now(), ["c"]);
        assert!(
            !idle.ring_for(&["flux".to_string()]),
            "no one else has flux"
        );
        idle.busy("c");
        assert!(!idle.ring_for(&[]));
    }

    #[test]
    fn a_ring_passes_on_at_most_once_around() {
        let idle = farm();
        for id in ["a", "b", "c"] {
            idle.waiting(id);
        }
        idle.ring_for(&[]); // a, with 2 hops
        idle.waiting("a");
        idle.pass_on("a"); // b, 1 hop
        idle.waiting("b");
        idle.pass_on("b"); // c, 0 hops
        idle.waiting("c");
        assert_eq!(idle.waiting_now(), ["a", "b", "c"]);
        idle.pass_on("c");
        assert_eq!(idle.waiting_now(), ["a", "b", "c"], "the ring stopped");
    }
}
