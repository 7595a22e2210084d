//! Asking the backend: after a (re)connect, a submit without answer, and
//! every few seconds as a safety net, each job the database says the
//! backend holds is compared with the backend's `/queue` and `/history`.
//! Also the cleanup list, and taking jobs back from a backend.
//!
//! Why ask rather than guess: ComfyUI's queue and history live in memory
//! and die with it, and it never tells a disconnected client what it
//! missed. Only its answers say whether a prompt waits, runs, finished or
//! is unknown there, and each answer has exactly one consequence (see the
//! table in `docs/operations.md`).

use tokio::time::Instant;

use chrono::Utc;

use super::attempt::Held;
use super::phase::{Phase, Signal};
use super::progress::{node_types, NodeTypes};
use super::worker::{Tracked, Worker};
use crate::comfy::QueueState;
use crate::store::{ActiveJob, JobStatus, LostOutcome, LostRun};

/// An instant `age` ago (clamped to the clock's start).
fn ago(age: chrono::Duration) -> Instant {
    let age = age.to_std().unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// The worker's view of a held job it was not following (after a restart).
fn phase_from(a: &ActiveJob) -> Phase {
    let since =
        |t: Option<chrono::DateTime<Utc>>| ago(t.map(|t| Utc::now() - t).unwrap_or_default());
    match (a.status, a.submitted) {
        (JobStatus::Running, _) => Phase::Running(since(a.started_at.or(a.leased_at))),
        (_, true) => Phase::Queued,
        // Leased but never confirmed: the submit may or may not have landed.
        (_, false) => Phase::InDoubt(since(a.leased_at)),
    }
}

impl Worker {
    /// Asks the backend about every job it holds and acts on the answer.
    pub(super) async fn reconcile(&mut self) {
        let active = match self.shared.store.active_jobs(&self.id).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(backend_id = %self.id, error = %e, "cannot read active jobs");
                return;
            }
        };
        if active.is_empty() && self.tracked.is_empty() && !self.has_cleanup().await {
            // Nothing of ours there: nothing to ask (a farm of idle backends
            // costs no requests).
            self.set_stuck(false);
            return;
        }
        let queue = match self.client.queue().await {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(backend_id = %self.id, error = %e, "reconcile: /queue failed");
                return;
            }
        };
        self.work_cleanup(&queue).await;
        // Forget prompts the database no longer holds here (unless a helper owns them).
        let held: std::collections::HashSet<&str> =
            active.iter().map(|a| a.prompt_id.as_str()).collect();
        self.tracked
            .retain(|pid, t| held.contains(pid.as_str()) || t.phase.busy());
        let timeout = self.client.timeout();
        let mut unheard = false;
        for a in active {
            let pid = a.prompt_id.clone();
            let known = self.tracked.get(&pid).map(|t| t.phase);
            if known.is_some_and(Phase::busy) {
                continue;
            }
            let phase = known.unwrap_or_else(|| phase_from(&a));
            // Known already, or read once (a prompt that outlived a restart).
            let waits_for_disk = self.tracked.get(&pid).is_some_and(|t| t.waits_for_disk);
            let nodes = match self.tracked.get(&pid) {
                Some(t) => t.nodes.clone(),
                None => std::sync::Arc::new(match self.shared.store.job(&a.job_id).await {
                    Ok(Some(job)) => job.graph.as_ref().map(node_types).unwrap_or_default(),
                    _ => NodeTypes::new(),
                }),
            };
            self.tracked.insert(
                pid.clone(),
                Tracked {
                    held: Held {
                        job_id: a.job_id.clone(),
                        token: a.token,
                        attempt: a.attempt,
                        prompt_id: pid.clone(),
                    },
                    phase,
                    limit: self.run_limit(a.timeout_s),
                    sent: Instant::now(),
                    nodes,
                    waits_for_disk,
                },
            );
            if a.stop_requested {
                if self.signal(&pid, Signal::CancelRequested).is_some() {
                    self.spawn_cancel(&pid);
                }
                continue;
            }
            if queue.running.contains(&pid) {
                self.signal(&pid, Signal::Started);
                if a.status != JobStatus::Running {
                    self.record_running(&a.job_id, a.token).await;
                }
                continue;
            }
            if queue.pending.contains(&pid) {
                self.signal(&pid, Signal::SeenQueued);
                continue;
            }
            match self.client.history(&pid).await {
                Ok(Some(_)) => {
                    // A prompt we thought waiting or running ended, and the socket
                    // has been silent a while (not just a message on its way): deaf.
                    // (One whose end was heard, and whose finish waits, is not news.)
                    let deferred = waits_for_disk || self.finish_failures.contains_key(&pid);
                    unheard |= known
                        .is_some_and(|p| matches!(p, Phase::Queued | Phase::Running(_)))
                        && !deferred
                        && self.link.last_heard.elapsed() >= self.deaf_after();
                    if self.signal(&pid, Signal::Ended).is_some() {
                        self.spawn_finish(&pid);
                    }
                }
                Ok(None) => match phase {
                    Phase::InDoubt(since) if since.elapsed() < timeout => {
                        // A submit that timed out on our side may still be queued
                        // there: ask again once that can no longer happen.
                        self.ask_at(since + timeout);
                    }
                    Phase::InDoubt(since) => {
                        let reason = format!(
                            "backend {} never confirmed prompt {pid} and does not have it {} s later",
                            self.id,
                            since.elapsed().as_secs()
                        );
                        let held = self.tracked[&pid].held.clone();
                        self.give_back(&held, reason, true).await;
                    }
                    _ => {
                        let reason = format!(
                            "backend {} no longer has prompt {pid} (it restarted or lost it)",
                            self.id
                        );
                        let held = self.tracked[&pid].held.clone();
                        self.give_back(&held, reason, false).await;
                    }
                },
                Err(e) => {
                    tracing::debug!(backend_id = %self.id, error = %e, "reconcile: /history failed")
                }
            }
        }
        // What runs or waits there that is not ours, exactly (a `status`
        // gives a count; at a restart it comes before our prompts are
        // followed again, and would count them as not ours until the
        // queue next changes).
        let not_ours = queue
            .running
            .iter()
            .chain(&queue.pending)
            .filter(|p| !self.tracked.contains_key(*p))
            .count();
        self.note_foreign(not_ours);
        // Messages that arrived while this worker waited on the backend
        // are late, not missing: read what is waiting first (the next
        // reconcile decides again with them counted).
        if unheard && self.link.stream.is_some() && !self.read_waiting().await {
            self.deaf("a prompt finished without a word on the socket")
                .await;
        }
    }

    /// Queues a job this backend lost (or that is given up on) again, and
    /// stops following it. With `cleanup`, the prompt goes on the cleanup
    /// list, to be removed there when the backend answers.
    pub(super) async fn give_back(&mut self, held: &Held, reason: String, cleanup: bool) {
        let (job_id, backend_id) = (held.job_id.as_str(), self.id.as_str());
        let avoid = crate::store::avoid_span(super::backoff(&self.shared.config, held.attempt));
        let run = LostRun {
            // A submit in doubt may land up to a request timeout later.
            cleanup: cleanup.then(|| {
                Utc::now()
                    + chrono::Duration::from_std(self.client.timeout() * 2).unwrap_or_default()
            }),
            max_lost_runs: Some(self.shared.config.dispatch.max_lost_runs as i64),
            reason,
            avoid: Some(avoid),
        };
        let reason = run.reason.clone();
        match self.shared.store.give_back(job_id, held.token, run).await {
            Ok(LostOutcome::Requeued) => {
                tracing::warn!(job_id, backend_id, "{reason}; queued again");
                // Lost mid-run, it keeps away from here a while: this
                // backend may take it again then, if no other did.
                self.shared.wake_at(Utc::now() + avoid, Some(backend_id));
            }
            Ok(LostOutcome::Cancelled) => tracing::info!(job_id, backend_id, "{reason}; cancelled"),
            Ok(LostOutcome::Failed(why)) => {
                tracing::warn!(job_id, backend_id, "job failed: {why}");
                crate::metrics::failed(None, backend_id, true);
            }
            Ok(LostOutcome::LeaseLost) => {}
            Err(e) => {
                // Left tracked: the next reconcile tries again.
                tracing::error!(job_id, backend_id, error = %e, "cannot give the job back now");
                return;
            }
        }
        self.tracked.remove(&held.prompt_id);
        self.progress.forget(job_id);
        self.shared.wake();
    }

    /// The backend has not answered for the whole grace period: its jobs go
    /// elsewhere, and their prompts on the cleanup list.
    pub(super) async fn take_back_all(&mut self, reason: &str) {
        let active = match self.shared.store.active_jobs(&self.id).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(backend_id = %self.id, error = %e, "cannot read active jobs");
                return;
            }
        };
        for a in active {
            if self
                .tracked
                .get(&a.prompt_id)
                .is_some_and(|t| t.phase.busy())
            {
                continue;
            }
            let held = Held {
                job_id: a.job_id.clone(),
                token: a.token,
                attempt: a.attempt,
                prompt_id: a.prompt_id.clone(),
            };
            self.give_back(&held, reason.to_string(), true).await;
        }
    }

    /// Removes the prompts on the cleanup list from the backend, and drops
    /// from the list those it confirms gone. A prompt given up on that still
    /// runs there (a node that ignores interrupts) keeps the backend from
    /// getting new jobs.
    async fn has_cleanup(&self) -> bool {
        // When the list cannot be read, ask the backend anyway.
        self.shared
            .store
            .cleanup_prompts(&self.id)
            .await
            .map_or(true, |e| !e.is_empty())
    }

    async fn work_cleanup(&mut self, queue: &QueueState) {
        let entries = match self.shared.store.cleanup_prompts(&self.id).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(backend_id = %self.id, error = %e, "cannot read the cleanup list");
                return;
            }
        };
        if entries.is_empty() {
            self.set_stuck(false);
            return;
        }
        let ids: Vec<String> = entries.iter().map(|e| e.prompt_id.clone()).collect();
        if let Err(e) = self.client.remove(&ids, &queue.running).await {
            self.cleanup_tried(ids, e.to_string()).await;
            return;
        }
        let after = match self.client.queue().await {
            Ok(q) => q,
            Err(e) => {
                self.cleanup_tried(ids, e.to_string()).await;
                return;
            }
        };
        let mut done = Vec::new();
        let mut left = Vec::new();
        for e in &entries {
            let gone = !after.contains(&e.prompt_id)
                && matches!(self.client.history(&e.prompt_id).await, Ok(None));
            if gone && Utc::now() >= e.not_before {
                done.push(e.prompt_id.clone());
            } else {
                left.push(e.prompt_id.clone());
            }
        }
        self.set_stuck(entries.iter().any(|e| after.running.contains(&e.prompt_id)));
        if !done.is_empty() {
            tracing::info!(backend_id = %self.id, count = done.len(), "removed prompts given up on from the backend");
            if let Err(e) = self.shared.store.cleanup_done(done).await {
                tracing::error!(backend_id = %self.id, error = %e, "cannot update the cleanup list");
            }
        }
        if !left.is_empty() {
            self.cleanup_tried(left, "not confirmed gone yet".into())
                .await;
        }
    }

    async fn cleanup_tried(&self, ids: Vec<String>, error: String) {
        if let Err(e) = self.shared.store.cleanup_tried(ids, error).await {
            tracing::error!(backend_id = %self.id, error = %e, "cannot update the cleanup list");
        }
    }

    fn set_stuck(&mut self, stuck: bool) {
        if stuck && !self.stuck {
            tracing::warn!(backend_id = %self.id, "a prompt given up on still runs on the backend (a node that ignores interrupts?); it gets no new jobs until it ends or is restarted");
        } else if !stuck && self.stuck {
            tracing::info!(backend_id = %self.id, "the backend is free again");
            self.shared.wake();
        }
        self.stuck = stuck;
    }
}
