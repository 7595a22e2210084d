//! What a failed attempt means: the job's error in a sentence, the retry
//! or the end, and what the failure says of the backend (`health`: a sick
//! box) and of the job's batch (`batches`: a batch broken in itself).
//!
//! Why apart from the attempt's steps (`attempt.rs`): every step ends in
//! one of these when it goes wrong, and the judging of boxes and batches
//! is a concern of its own, which grows as the farm learns its failures.

use serde_json::{json, Value};

use super::attempt::{Ctx, Held};
use super::batches::Verdict;
use crate::comfy::{ExecutionError, PromptEnd, Rejection};
use crate::store::{AttemptOutcome, StoreError};

/// A person-readable error from a failed prompt's end.
pub(super) fn runtime_error(backend_id: &str, attempt: i64, end: &PromptEnd) -> Value {
    match end {
        PromptEnd::Error(ExecutionError {
            node_id,
            node_type,
            exception_type,
            exception_message,
            traceback,
        }) => json!({
            "message": format!("backend {backend_id}: node {node_id} ({node_type}) raised {exception_type}: {exception_message}"),
            "backend_id": backend_id,
            "attempt": attempt,
            "node_id": node_id,
            "node_type": node_type,
            "exception_type": exception_type,
            "exception_message": exception_message,
            "traceback": traceback,
        }),
        PromptEnd::Interrupted { node_id } => json!({
            "message": format!("backend {backend_id}: interrupted at node {node_id}, not by this orchestrator (someone cancelled it on the backend?)"),
            "backend_id": backend_id,
            "attempt": attempt,
            "node_id": node_id,
            "interrupted": true,
        }),
        PromptEnd::Other(status) => json!({
            "message": format!("backend {backend_id}: the prompt ended with status `{status}`"),
            "backend_id": backend_id,
            "attempt": attempt,
        }),
        // Not a failure; listed so that the match stays whole.
        PromptEnd::Success => json!({
            "message": format!("backend {backend_id}: the prompt succeeded"),
            "backend_id": backend_id,
            "attempt": attempt,
        }),
    }
}

/// The job's error for a refused prompt, with ComfyUI's own words beside it.
pub(super) fn rejection_error(backend_id: &str, attempt: i64, r: &Rejection) -> Value {
    json!({
        "message": format!("backend {backend_id} rejected the workflow: {}", r.summary()),
        "backend_id": backend_id,
        "attempt": attempt,
        "http_status": r.status,
        "comfyui_error": r.error(),
        "node_errors": r.node_errors(),
    })
}

impl Ctx {
    /// Records a failed attempt and schedules the retry; `false` if it could
    /// not be recorded (the caller then leaves the prompt for a reconcile).
    pub(super) async fn fail(&self, held: &Held, rejected: bool, error: Value) -> bool {
        self.fail_at(held, rejected, error, None).await
    }

    /// [`Ctx::fail`], for a failure learned late (`ran`: when the box
    /// ran it).
    pub(super) async fn fail_at(
        &self,
        held: &Held,
        rejected: bool,
        error: Value,
        ran: Option<crate::store::RanAt>,
    ) -> bool {
        let delay = super::backoff(&self.shared.config, held.attempt);
        let against = self.shared.batches.counts(&error);
        let disk_full = crate::store::box_disk_full(&error);
        // Read again once the failure is recorded, which takes the error.
        let kept = (against || disk_full).then(|| error.clone());
        let outcome = self
            .shared
            .store
            .fail_attempt_at(&held.job_id, held.token, rejected, error, delay, ran)
            .await;
        let recorded = matches!(
            outcome,
            Ok(AttemptOutcome::Failed(_) | AttemptOutcome::Retry(_))
        );
        let counted = self.failure_recorded(held, outcome, delay).await;
        if let (true, Some(error)) = (recorded, kept) {
            if against {
                self.judge_the_batch(&held.job_id, &error).await;
            }
            if disk_full {
                self.leave_out_a_full_box(&held.job_id, &error).await;
            }
        }
        counted
    }

    /// This box could not write a job's outputs for want of disk space:
    /// every next job there would fail alike, so it is left out now (not
    /// after three jobs proven elsewhere), saying what to do.
    async fn leave_out_a_full_box(&self, job_id: &str, error: &Value) {
        let backend_id = self.backend_id.as_str();
        let what = format!(
            "{} (node {}) raised {}: {}",
            error["node_type"].as_str().unwrap_or("a node"),
            error["node_id"].as_str().unwrap_or("?"),
            error["exception_type"].as_str().unwrap_or("an error"),
            error["exception_message"].as_str().unwrap_or("").trim()
        );
        let reason = format!(
            "its disk is full: {what}; free space on it (ComfyUI's output folder), then enable \
             it (POST /api/backends/{backend_id}/enable) or let the quarantine end"
        );
        let Some(q) = self.shared.health.quarantine_now(backend_id, reason) else {
            return;
        };
        tracing::warn!(backend_id, until = %q.until, job_id, "backend quarantined: {}", q.reason);
        self.announce_quarantine(backend_id, &q).await;
    }

    /// Tells a quarantine (an event, an alert) and looks for work again
    /// at its end.
    async fn announce_quarantine(&self, backend_id: &str, q: &super::health::Quarantine) {
        let message = format!(
            "backend {backend_id} takes no jobs until {}: {}",
            q.until.format("%H:%M:%S UTC"),
            q.reason
        );
        let data = json!({"until": q.until, "reason": q.reason});
        self.shared
            .quarantine_event(backend_id, "backend_quarantined", &message, data)
            .await;
        self.shared.wake_at_quarantine_end(backend_id, q.until);
    }

    /// A failed attempt that says something against the job may show its
    /// batch broken (`super::batches`): its jobs not started are paused.
    async fn judge_the_batch(&self, job_id: &str, error: &Value) {
        let backend_id = self.backend_id.as_str();
        let batches = &self.shared.batches;
        let verdict = batches
            .failed(&self.shared.store, job_id, backend_id, error)
            .await;
        let broken = match verdict {
            Ok(Verdict::Broken(b)) => b,
            Ok(Verdict::Fine) => return,
            Ok(Verdict::Held { batch, why }) => {
                match batches.hold(&self.shared.store, &batch, why).await {
                    Ok(n) => {
                        tracing::info!(job_id, backend_id, %batch, paused = n, "a job of a batch the farm paused failed alike: paused with it")
                    }
                    Err(e) => {
                        tracing::error!(job_id, backend_id, %batch, error = %e, "cannot pause the job with its batch")
                    }
                }
                return;
            }
            Ok(Verdict::OnOneBox { batch, backend }) => match self.others_take_jobs(&backend).await
            {
                Ok(true) => return,
                Ok(false) => match batches.trip(batch, &backend) {
                    Some(b) => b,
                    None => return,
                },
                Err(e) => {
                    tracing::warn!(job_id, backend_id, error = %e, "cannot read the farm; the batch is not judged");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(job_id, backend_id, error = %e, "cannot read the job's batch; not judged");
                return;
            }
        };
        match batches.pause(&self.shared.store, &broken).await {
            Ok(n) => tracing::warn!(
                job_id, backend_id, batch = %broken.batch, cause = %broken.cause, jobs = broken.jobs, paused = n,
                "a batch fails job after job alike: its jobs not started are paused"
            ),
            Err(e) => {
                tracing::error!(job_id, backend_id, batch = %broken.batch, error = %e, "cannot pause the broken batch")
            }
        }
    }

    /// Whether a backend other than `backend` takes jobs now (online,
    /// enabled, in its hours, not in quarantine): one that could tell a
    /// broken batch from a sick box.
    async fn others_take_jobs(&self, backend: &str) -> Result<bool, StoreError> {
        let backends = self.shared.store.backends().await?;
        Ok(backends.iter().any(|b| {
            b.id != backend
                && b.accepting_jobs()
                && self.shared.clients.contains_key(&b.id)
                && self.shared.health.quarantined(&b.id).is_none()
        }))
    }

    /// Fails the job now: no backend could make the attempt succeed.
    pub(super) async fn fail_hopeless(&self, held: &Held, error: Value) -> bool {
        let outcome = self
            .shared
            .store
            .fail_hopeless(&held.job_id, held.token, error)
            .await;
        self.failure_recorded(held, outcome, chrono::Duration::zero())
            .await
    }

    /// Counts a failed attempt's outcome and wakes the workers for what it
    /// queued; `false` if it was not recorded.
    async fn failure_recorded(
        &self,
        held: &Held,
        outcome: Result<AttemptOutcome, StoreError>,
        delay: chrono::Duration,
    ) -> bool {
        let job_id = held.job_id.as_str();
        let recorded = match outcome {
            Ok(AttemptOutcome::Failed(reason)) => {
                tracing::warn!(job_id, backend_id = %self.backend_id, "job failed: {reason}");
                self.count_failure(job_id, true).await;
                true
            }
            Ok(AttemptOutcome::Retry(at)) => {
                self.count_failure(job_id, false).await;
                tracing::info!(job_id, backend_id = %self.backend_id, retry_at = %at, "attempt failed; job queued again");
                self.shared.wake_at(at, None);
                // This backend may take it again then, if no other did.
                let avoided = chrono::Utc::now() + crate::store::avoid_span(delay);
                self.shared.wake_at(avoided, Some(&self.backend_id));
                true
            }
            Ok(AttemptOutcome::LeaseLost) => true,
            Err(e) => {
                tracing::error!(job_id, backend_id = %self.backend_id, error = %e, "cannot record the failed attempt; the backend will be asked again");
                false
            }
        };
        self.shared.wake();
        recorded
    }

    /// The job completed here after failing elsewhere: each backend that
    /// failed it may be sick (`super::health`); one found so is left out
    /// for a while, with an event, and looks for work again when that ends.
    pub(super) async fn judge_where_it_failed(&self, job_id: &str) {
        let leases = match self.shared.store.job_leases(job_id).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(job_id, backend_id = %self.backend_id, error = %e, "cannot read where the job failed before");
                return;
            }
        };
        let failed: Vec<_> = leases
            .into_iter()
            .filter(|l| match l.outcome {
                Some(crate::store::LeaseOutcome::Failed) => {
                    l.error.as_ref().is_none_or(super::health::blames_the_box)
                }
                // Its ComfyUI died under it, or the box went away, mid-run.
                Some(crate::store::LeaseOutcome::Lost) => l.started_at.is_some(),
                _ => false,
            })
            .filter_map(|l| {
                Some(super::health::FailedThere {
                    at: l.finished_at?,
                    message: l
                        .error
                        .as_ref()
                        .and_then(|e| e["message"].as_str())
                        .unwrap_or("failed")
                        .to_string(),
                    backend_id: l.backend_id,
                })
            })
            .collect();
        for (sick, q) in self.shared.health.proven(job_id, &self.backend_id, &failed) {
            tracing::warn!(backend_id = %sick, until = %q.until, job_id, "backend quarantined: {}", q.reason);
            self.announce_quarantine(&sick, &q).await;
        }
    }

    async fn count_failure(&self, job_id: &str, is_final: bool) {
        let workflow = match self.shared.store.job_times(job_id).await {
            Ok(j) => j.and_then(|j| j.workflow_id),
            Err(_) => None,
        };
        crate::metrics::failed(workflow.as_deref(), &self.backend_id, is_final);
    }
}
