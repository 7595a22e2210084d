//! Filling a worker's free slots: when a worker looks for work, and how
//! one look goes (the idle workers' gate in `super::idle`, a lease, the job
//! followed from then on).
//!
//! Why apart from the worker's loop: the loop decides *that* something may
//! have changed ([`Wake`]); what a look costs the farm (one writer turn per
//! lease, a ring answered or passed on) is this file's concern alone, and
//! the one the farm's size makes expensive.

use tokio::time::Instant;

use super::attempt::{Held, Turn};
use super::idle::Found;
use super::phase::Phase;
use super::progress::node_types;
use super::worker::{Tracked, Worker};
use crate::store::LeaseTry;

/// Why a worker looks for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Wake {
    /// A slot may have freed (a helper ended): it looks only when a queued
    /// job may have no seeker (see `super::idle`).
    SlotFreed,
    /// It was woken for it (its start, a broadcast, its bell, its safety
    /// net, a reconcile): it looks until it is full or finds nothing.
    Always,
}

impl Worker {
    /// Leases jobs while the backend has free slots and there is reason to
    /// look (`why`, then the idle workers' gate).
    pub(super) async fn fill(&mut self, mut why: Wake) {
        if self.stuck {
            self.shared.idle.busy(&self.id);
            return;
        }
        if let Some(q) = self.shared.health.ended(&self.id) {
            tracing::info!(backend_id = %self.id, "quarantine over; the backend takes jobs again");
            let message = format!(
                "backend {} takes jobs again: its quarantine ended ({})",
                self.id, q.reason
            );
            let data = serde_json::json!({"until": q.until});
            self.shared
                .quarantine_event(&self.id, "backend_quarantine_over", &message, data)
                .await;
        }
        if self.shared.health.quarantined(&self.id).is_some() {
            // As a closed backend: rung at the quarantine's end, or when
            // an operator lifts it.
            self.shared.idle.pass_on(&self.id);
            self.shared.idle.busy(&self.id);
            return;
        }
        loop {
            if !self.fill_once(why).await {
                return;
            }
            // A job was queued while it looked, with nobody waiting to be
            // rung: it looks again.
            why = Wake::Always;
        }
    }

    /// One round of [`Worker::fill`]: `true` when it must look again.
    async fn fill_once(&mut self, mut why: Wake) -> bool {
        // A ring is answered by one lease: further free slots go through the
        // gate, as after a finished job.
        let mut rung = self.shared.idle.is_rung(&self.id);
        let mut last = None;
        let mut leased = false;
        // Whether due jobs wait that another backend may run.
        let mut elsewhere = false;
        let prefer = crate::store::Preference {
            affinity: self.shared.config.dispatch.model_affinity,
            max_wait: chrono::Duration::seconds(
                self.shared.config.dispatch.affinity_max_wait_s as i64,
            ),
            share: self.shared.config.dispatch.share_by.is_some(),
        };
        while self.slots_taken() < self.max_inflight {
            let look = match why {
                Wake::Always => self.shared.idle.look(),
                Wake::SlotFreed => match self.shared.idle.gate(&self.id) {
                    Some(look) => look,
                    // Waiting for a ring now.
                    None => return false,
                },
            };
            last = Some(look);
            let fit = self.shared.fit_for(&self.id);
            let tried = self.shared.store.lease_for(&self.id, fit, prefer).await;
            self.shared.idle.found(
                look,
                match &tried {
                    Ok(LeaseTry::Leased(_)) => Found::Job,
                    Ok(LeaseTry::Nothing) => Found::Nothing,
                    Ok(LeaseTry::Elsewhere) => Found::Elsewhere,
                    Ok(LeaseTry::Closed) | Err(_) => Found::Failed,
                },
            );
            let lease = match tried {
                Ok(LeaseTry::Leased(l)) => l,
                Ok(LeaseTry::Nothing) => break,
                Ok(LeaseTry::Elsewhere) => {
                    elsewhere = true;
                    break;
                }
                Ok(LeaseTry::Closed) => {
                    // Disabled, draining or not online: not a worker to
                    // ring for each queued job (on a farm of many closed
                    // backends every submission would ring through all of
                    // them). Reopening wakes it.
                    self.shared.idle.pass_on(&self.id);
                    self.shared.idle.busy(&self.id);
                    return false;
                }
                Err(e) => {
                    tracing::error!(backend_id = %self.id, error = %e, "lease failed");
                    // Its ring, if any, is not lost with the read.
                    self.shared.idle.pass_on(&self.id);
                    break;
                }
            };
            if self.shared.health.quarantined(&self.id).is_some() {
                // Put in quarantine while the lease was on its way (the
                // proof against the box came meanwhile): the job is not
                // sent to the sick box but given back, its attempt unspent.
                let reason = format!(
                    "backend {} was put in quarantine before the job was sent there",
                    self.id
                );
                self.give_back(&Held::from(&lease), reason, false).await;
                self.shared.idle.pass_on(&self.id);
                self.shared.idle.busy(&self.id);
                return false;
            }
            leased = true;
            self.shared.idle.end_ring(&self.id);
            if std::mem::take(&mut rung) {
                why = Wake::SlotFreed;
            } else if why == Wake::Always && self.slots_taken() + 1 >= self.max_inflight {
                // Full before it saw the queue's end: more may be due.
                self.shared.idle.filled();
            }
            tracing::info!(job_id = %lease.job_id, backend_id = %self.id, prompt_id = %lease.prompt_id, attempt = lease.attempt, "job leased");
            self.tracked.insert(
                lease.prompt_id.clone(),
                Tracked {
                    held: Held::from(&lease),
                    phase: Phase::Submitting,
                    limit: self.run_limit(lease.timeout_s),
                    sent: Instant::now(),
                    nodes: std::sync::Arc::new(node_types(&lease.graph)),
                    waits_for_disk: false,
                },
            );
            let (posted, heard) = tokio::sync::oneshot::channel();
            let turn = Turn {
                after: self.last_post.replace(heard),
                posted,
            };
            self.helpers.spawn(self.ctx().submit(lease, turn));
        }
        if self.slots_taken() >= self.max_inflight {
            // Off the waiting list, and its ring (if any) ends.
            self.shared.idle.busy(&self.id);
            return false;
        }
        match last {
            Some(look) if !elsewhere => {
                if !self.shared.idle.wait_after(&self.id, look) {
                    return true;
                }
            }
            _ => self.shared.idle.waiting(&self.id),
        }
        if !leased && elsewhere {
            // Rung for a job it may not run: the next waiting worker tries.
            self.shared.idle.pass_on(&self.id);
        } else {
            // It leased, or nothing due is left for anyone (another worker
            // took the job it was rung for): passing the ring on would only
            // wake the farm one worker at a time for nothing.
            self.shared.idle.end_ring(&self.id);
        }
        false
    }
}
