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
//! A backend that takes no jobs now (disabled, draining, not online) does
//! not wait here: its own bell rings when that changes (its state, its
//! admin state, its inventory). Farm-wide changes (a retry due, jobs queued
//! again) still wake everyone through the broadcast in `Shared::wake`.
//!
//! One seeker a job: a worker whose slot frees looks for work only when a
//! queued job may have nobody on its way to it: a ring found no waiting
//! worker (the farm was busy) or ended without a taker, or due jobs wait
//! that some workers may not run, or another such look is under way. On an
//! idle farm every job has its ring, and the worker that just finished one
//! waits instead of racing the rung worker to the writer for the same job
//! (on a farm of a thousand, that race was a second lease turn for almost
//! every job). The count of such jobs may run high (a job taken or
//! cancelled meanwhile costs one look that finds nothing), never low: a
//! look that finds nothing due for anyone resets it only when no job was
//! counted since that look began.

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
    /// Queued jobs that may have no seeker: no waiting worker fitted their
    /// ring, or it ended without a taker. Never too low.
    unclaimed: usize,
    /// Bumped whenever `unclaimed` grows: a look that found nothing due
    /// clears the count only if nothing was counted since it began.
    counted: u64,
    /// Looks under way that freed slots took for unclaimed jobs.
    claiming: usize,
    /// Due jobs may wait that no ring is on its way to: a look found only
    /// jobs its worker may not run (a ring cannot tell who fits), or a look
    /// that was not for one ring filled its worker up (more may be due).
    /// Every freed slot looks until a look finds nothing due.
    open: bool,
}

/// A look for work about to start (see [`IdleWorkers::gate`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Look {
    /// `State::counted` when it began.
    counted: u64,
    /// Whether it counts among `State::claiming`.
    claim: bool,
}

/// What a look found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Found {
    /// A job, leased.
    Job,
    /// No due job for anyone.
    Nothing,
    /// Due jobs, none this worker may run.
    Elsewhere,
    /// It could not look (its backend closed, or the store failed).
    Failed,
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
                unclaimed: 0,
                counted: 0,
                claiming: 0,
                open: false,
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

    /// The worker has a free slot and its look (`after`) found nothing due:
    /// it waits for a ring, registered under the rings' lock; unless a job
    /// was queued since that look began with no waiting worker to ring
    /// (this one was looking, not yet waiting): then `false`, and it looks
    /// again, or that job would wait for the safety net.
    pub(super) fn wait_after(&self, id: &str, after: Look) -> bool {
        let Some(&i) = self.index.get(id) else {
            return true;
        };
        let mut s = self.state.lock().expect("idle");
        if s.counted != after.counted {
            return false;
        }
        if !s.is_waiting[i] {
            s.is_waiting[i] = true;
            s.waiting.push_back(i);
        }
        true
    }

    /// The worker is full, or cannot lease (its backend is down). A ring
    /// it had not answered yet goes on to the next waiting worker.
    pub(super) fn busy(&self, id: &str) {
        let Some(&i) = self.index.get(id) else { return };
        let mut s = self.state.lock().expect("idle");
        if s.is_waiting[i] {
            s.is_waiting[i] = false;
            s.waiting.retain(|&w| w != i);
        }
        self.pass_on_locked(&mut s, i);
    }

    /// A rung worker leased something, or found that nothing due is left
    /// for anyone: its ring ends there.
    pub(super) fn end_ring(&self, id: &str) {
        let Some(&i) = self.index.get(id) else { return };
        self.state.lock().expect("idle").hops[i] = None;
    }

    /// A job needing `requires` was queued: rings the longest-waiting worker
    /// whose tags cover it. Whether one was rung (if not, the job counts as
    /// unclaimed: the next freed slot looks for it).
    pub(super) fn ring_for(&self, requires: &[String]) -> bool {
        let mut s = self.state.lock().expect("idle");
        let hops = s.waiting.len().saturating_sub(1);
        let rung = self.ring_first(&mut s, hops, |i| {
            requires.iter().all(|r| self.tags[i].contains(r))
        });
        if !rung {
            unclaimed(&mut s);
        }
        rung
    }

    /// A rung worker found nothing it may run: rings the next waiting worker,
    /// while the ring has hops left; a ring that ends there leaves its job
    /// unclaimed.
    pub(super) fn pass_on(&self, from: &str) {
        let Some(&from) = self.index.get(from) else {
            return;
        };
        let mut s = self.state.lock().expect("idle");
        self.pass_on_locked(&mut s, from);
    }

    fn pass_on_locked(&self, s: &mut State, from: usize) {
        let Some(hops) = s.hops[from].take() else {
            return;
        };
        if hops == 0 || !self.ring_first(s, hops - 1, |i| i != from) {
            unclaimed(s);
        }
    }

    /// Whether a worker with a free slot looks for work now, woken by
    /// something that may have freed a slot. `None`: it waits for a ring
    /// (and is registered as waiting, under the same lock as the rings, so
    /// none is missed); it looks when rung, or when a job may have no
    /// seeker (see the module doc). Report what the look found to
    /// [`IdleWorkers::found`].
    pub(super) fn gate(&self, id: &str) -> Option<Look> {
        let &i = self.index.get(id)?;
        let mut s = self.state.lock().expect("idle");
        let counted = s.counted;
        if s.hops[i].is_some() {
            return Some(Look {
                counted,
                claim: false,
            });
        }
        if s.unclaimed > 0 || s.claiming > 0 || s.open {
            s.unclaimed = s.unclaimed.saturating_sub(1);
            s.claiming += 1;
            return Some(Look {
                counted,
                claim: true,
            });
        }
        if !s.is_waiting[i] {
            s.is_waiting[i] = true;
            s.waiting.push_back(i);
        }
        None
    }

    /// A look that must happen whatever the gate would say (the worker was
    /// woken for it: a broadcast, its bell, its safety net).
    pub(super) fn look(&self) -> Look {
        Look {
            counted: self.state.lock().expect("idle").counted,
            claim: false,
        }
    }

    /// What a look found, for the count of unclaimed jobs.
    pub(super) fn found(&self, look: Look, found: Found) {
        let mut s = self.state.lock().expect("idle");
        if look.claim {
            s.claiming -= 1;
        }
        match found {
            Found::Job => {}
            // Every job counted before the look was committed before its
            // read: none is due any more.
            Found::Nothing if s.counted == look.counted => {
                s.unclaimed = 0;
                s.open = false;
            }
            Found::Nothing => {}
            Found::Elsewhere => {
                s.open = true;
                if look.claim {
                    s.unclaimed += 1;
                }
            }
            Found::Failed if look.claim => s.unclaimed += 1,
            Found::Failed => {}
        }
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

    /// Jobs were queued again or fell due, with no ring: every worker is
    /// woken, and freed slots look too until a look finds nothing due.
    pub(super) fn opened(&self) {
        let mut s = self.state.lock().expect("idle");
        s.open = true;
        s.counted += 1;
    }

    /// A look that was not for one ring filled its worker up: more jobs
    /// may be due, and no ring is on its way to them.
    pub(super) fn filled(&self) {
        self.state.lock().expect("idle").open = true;
    }

    /// Whether the worker was rung and has not answered yet.
    pub(super) fn is_rung(&self, id: &str) -> bool {
        self.index
            .get(id)
            .is_some_and(|&i| self.state.lock().expect("idle").hops[i].is_some())
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

/// One more queued job may have no seeker.
fn unclaimed(s: &mut State) {
    s.unclaimed += 1;
    s.counted += 1;
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
    fn a_job_queued_while_the_worker_looked_is_not_left_to_the_safety_net() {
        let idle = farm();
        let look = idle.look();
        // Queued while the look read the queue: nobody waits to be rung.
        assert!(!idle.ring_for(&[]));
        idle.found(look, Found::Nothing);
        assert!(!idle.wait_after("a", look), "it must look again");
        let again = idle.look();
        idle.found(again, Found::Job);
        assert!(idle.wait_after("a", again));
        assert_eq!(idle.waiting_now(), ["a"]);
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

    #[test]
    fn a_freed_slot_waits_while_every_queued_job_has_its_ring() {
        let idle = farm();
        idle.waiting("a");
        assert!(idle.ring_for(&[]), "a is rung");
        // c's job ended: the queued job is a's, so c waits (no second seeker).
        assert!(idle.gate("c").is_none());
        assert_eq!(idle.waiting_now(), ["c"], "registered as it decided");
        // a looks for its ring, whatever else is counted.
        assert!(idle.gate("a").is_some());
    }

    #[test]
    fn a_job_no_waiting_worker_took_is_looked_for_by_freed_slots_until_a_look_finds_nothing() {
        let idle = farm();
        assert!(!idle.ring_for(&[]), "nobody waits");
        let a = idle.gate("a").expect("a looks for it");
        // While a's look is under way, another freed slot looks too: a's
        // may end with a job only b may run.
        let b = idle.gate("b").expect("b looks too");
        idle.found(a, Found::Elsewhere);
        let c = idle.gate("c").expect("due jobs some may not run: open");
        idle.found(c, Found::Elsewhere);
        idle.found(b, Found::Job);
        // A look begun before a job was counted may not clear it.
        let late = idle.look();
        idle.busy("c");
        assert!(
            !idle.ring_for(&["flux".to_string()]),
            "only b has flux, busy"
        );
        idle.found(late, Found::Nothing);
        let c = idle.gate("c").expect("the flux job is still counted");
        // A look that saw the queue after every count: nothing is left.
        idle.found(c, Found::Nothing);
        let fresh = idle.look();
        idle.found(fresh, Found::Nothing);
        assert!(idle.gate("a").is_none(), "closed again: a waits");
    }

    #[test]
    fn a_ring_that_ends_without_a_taker_or_is_dropped_leaves_its_job_counted() {
        let idle = farm();
        idle.waiting("a");
        idle.ring_for(&[]); // a, no hops
        idle.pass_on("a");
        assert!(idle.gate("c").is_some(), "the ring ended: c looks");
        let idle = farm();
        idle.waiting("a");
        idle.waiting("b");
        idle.ring_for(&[]); // a, one hop
        idle.busy("a"); // its backend went down before it looked
        assert_eq!(idle.waiting_now(), Vec::<String>::new(), "b was rung");
        assert!(idle.is_rung("b"));
        idle.busy("b");
        assert!(idle.gate("c").is_some(), "no hop left: counted");
    }

    #[test]
    fn jobs_queued_again_open_the_gate_and_a_worker_full_before_the_end_keeps_it_open() {
        let idle = farm();
        idle.opened();
        let a = idle.gate("a").expect("open");
        idle.found(a, Found::Job);
        let b = idle.look();
        idle.filled();
        idle.found(b, Found::Job);
        let c = idle.gate("c").expect("still open");
        idle.found(c, Found::Nothing);
        assert!(idle.gate("a").is_none());
    }
}
