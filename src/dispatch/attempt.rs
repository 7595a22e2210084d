//! One attempt's steps on a backend, each run as a helper task of its
//! worker: submit the prompt, finish it (read its history, collect its
//! outputs, end the job), cancel it, give up on it when it runs past its
//! time; what a failure of any of them means is `failures.rs`.
//!
//! Why helper tasks that return a [`Report`]: these steps wait on the
//! backend (a download can take minutes), and the worker must keep reading
//! its WebSocket meanwhile. Each step reports what became of the prompt; the
//! worker alone changes its view of it ([`super::phase`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;

use super::failures::{rejection_error, runtime_error};
use super::{outputs, DispatchError, Shared};
use crate::comfy::{ComfyClient, ComfyError, HistoryEntry, PromptEnd};
use crate::store::{CleanupEntry, Lease, StoreError};

/// Failed tries to collect a finished prompt before its attempt fails.
pub(super) const FINISH_TRIES: u32 = 5;

/// What became of a prompt after a helper's step.
#[derive(Debug)]
pub(super) enum Report {
    /// The backend accepted the submit.
    Accepted(String),
    /// The backend accepted the submit, and a cancel is pending.
    AcceptedCancelled(String),
    /// The submit got no usable answer: the backend must be asked.
    NoAnswer(String),
    /// The prompt is dealt with (completed, failed, requeued, cancelled).
    Done(String),
    /// Its end could not be dealt with now; the next reconcile tries again.
    Deferred(String, DispatchError),
}

/// What a helper needs: the backend and its client, and the shared state.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) shared: Arc<Shared>,
    pub(super) backend_id: String,
    pub(super) client: ComfyClient,
    /// Files uploaded to this backend since the worker connected (stored
    /// inputs and other jobs' outputs alike): their SHA-256 in hex → the
    /// value its loader nodes take.
    pub(super) uploaded: Arc<std::sync::Mutex<HashMap<String, String>>>,
}

/// A submit's place in its backend's order: it posts its prompt only after
/// the prompt leased before it on the same backend was posted.
///
/// Why: a worker leases in the queue's order (priority, then age) and each
/// prompt is posted by a helper of its own, side by side; ComfyUI runs its
/// queue in the order the prompts reached it. Without the turn, a job whose
/// input pictures are still uploading would be overtaken by the one leased
/// after it (an urgent shot waiting a whole job's length behind a routine
/// one). Uploads do not wait: only the `POST /prompt`.
pub(super) struct Turn {
    /// Heard when the previous prompt has been posted, or its helper gave up
    /// before posting (the sender dropped): either way, this one may go.
    pub(super) after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Dropped once this prompt has been posted (or will never be).
    pub(super) posted: tokio::sync::oneshot::Sender<()>,
}

/// A leased prompt, as the helpers name it.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) job_id: String,
    pub(super) token: i64,
    pub(super) attempt: i64,
    pub(super) prompt_id: String,
}

impl From<&Lease> for Held {
    fn from(l: &Lease) -> Held {
        Held {
            job_id: l.job_id.clone(),
            token: l.token,
            attempt: l.attempt,
            prompt_id: l.prompt_id.clone(),
        }
    }
}

impl Ctx {
    /// `POST /prompt`, and what the answer means for the job.
    pub(super) async fn submit(self, lease: Lease, turn: Turn) -> Report {
        let held = Held::from(&lease);
        let pid = held.prompt_id.clone();
        let (job_id, backend_id) = (held.job_id.as_str(), self.backend_id.as_str());
        let (graph, placed) = match self.with_inputs(lease.graph).await {
            Ok(g) => g,
            Err(e) => return self.files_not_sent(&held, e).await,
        };
        if let Some(after) = turn.after {
            // Ok or a dropped sender: either way the previous one is done posting.
            let _ = after.await;
        }
        let mut answer = self.client.submit(&pid, &graph).await;
        drop(turn.posted);
        // A file uploaded earlier on this connection that the box no longer
        // has (its input folder emptied while it ran): ComfyUI refuses the
        // loader's input. Uploaded again, and the prompt sent once more.
        if let Err(ComfyError::Rejected(r)) = &answer {
            let again = (!r.queued)
                .then(|| self.refused_files(graph, &placed, &r.refused_inputs()))
                .flatten();
            if let Some(graph) = again {
                tracing::info!(
                    job_id,
                    backend_id,
                    "the backend no longer has a file uploaded to it earlier; uploading it again"
                );
                if let Ok((graph, _)) = self.with_inputs(graph).await {
                    answer = self.client.submit(&pid, &graph).await;
                }
            }
        }
        match answer {
            Ok(()) => match self.shared.store.mark_submitted(job_id, held.token).await {
                Ok(true) => Report::AcceptedCancelled(pid),
                Ok(false) => Report::Accepted(pid),
                Err(StoreError::LeaseLost) => {
                    // Taken back while the submit was in flight: it must not run there.
                    self.forget_prompt(&held, "its lease was taken back while it was submitted")
                        .await;
                    Report::Done(pid)
                }
                Err(e) => {
                    // The backend has it; its first message records the submit too.
                    tracing::error!(job_id, backend_id, error = %e, "cannot record the submission");
                    Report::Accepted(pid)
                }
            },
            Err(ComfyError::Rejected(r)) => {
                let error = rejection_error(backend_id, held.attempt, &r);
                tracing::warn!(job_id, backend_id, "prompt rejected: {}", error["message"]);
                if r.queued {
                    // ComfyUI runs the valid part anyway: take it off the backend.
                    self.forget_prompt(&held, "part of its graph was refused")
                        .await;
                }
                reported(self.fail(&held, true, error).await, pid)
            }
            Err(e) => {
                tracing::warn!(job_id, backend_id, error = %e, "submit got no usable answer; the backend will be asked whether it has the prompt");
                Report::NoAnswer(pid)
            }
        }
    }

    /// The job's files could not be put on the box: the attempt ends as
    /// what the error says of it. A file gone for good: no backend could do
    /// better, the job fails now, attempts left unused. A file larger than
    /// the box takes: the box is never offered the job again and not blamed
    /// (it is sound), another tries at once. Anything else: an error of this
    /// attempt on this backend, retried elsewhere like any other.
    async fn files_not_sent(&self, held: &Held, e: DispatchError) -> Report {
        let backend_id = self.backend_id.as_str();
        let (mut error, rejected) = match &e {
            DispatchError::Gone(why) => (
                json!({"code": "input_missing", "message": format!("a file the job starts from is missing: {why}")}),
                None,
            ),
            DispatchError::TooLarge(why) => (
                json!({"code": crate::store::UPLOAD_TOO_LARGE, "message": why, "http_status": 413}),
                Some(true),
            ),
            e => (
                json!({"message": format!("backend {backend_id}: cannot upload the job's input files: {e}")}),
                Some(false),
            ),
        };
        error["backend_id"] = json!(backend_id);
        error["attempt"] = json!(held.attempt);
        tracing::warn!(job_id = %held.job_id, backend_id, "{}", error["message"]);
        let recorded = match rejected {
            None => self.fail_hopeless(held, error).await,
            Some(rejected) => self.fail(held, rejected, error).await,
        };
        reported(recorded, held.prompt_id.clone())
    }

    /// Removes a prompt from the backend at once, and puts it on the
    /// cleanup list: a prompt interrupted mid-run writes its history after
    /// the removal, and only the list's later rounds confirm it gone.
    async fn forget_prompt(&self, held: &Held, why: &str) {
        let entry = self.cleanup_entry(held, format!("prompt {}: {why}", held.prompt_id));
        if let Err(e) = self.shared.store.add_cleanup(entry).await {
            tracing::error!(job_id = %held.job_id, backend_id = %self.backend_id, error = %e, "cannot put the prompt on the cleanup list");
        }
        let ids = [held.prompt_id.clone()];
        if let Err(e) = self.client.remove(&ids, &ids).await {
            tracing::warn!(job_id = %held.job_id, backend_id = %self.backend_id, error = %e, "cannot remove the prompt now; the cleanup list will");
        }
    }

    /// The cleanup-list entry for a prompt given up on now.
    pub(super) fn cleanup_entry(&self, held: &Held, reason: String) -> CleanupEntry {
        CleanupEntry::new(
            &held.prompt_id,
            &self.backend_id,
            Some(&held.job_id),
            reason,
            chrono::Utc::now(),
        )
    }

    /// Reads the prompt's history and ends the job accordingly. `told`:
    /// its job's log already says its outputs wait for disk space.
    pub(super) async fn finish(self, held: Held, told: bool) -> Report {
        let pid = held.prompt_id.clone();
        match self.try_finish(&held).await {
            Ok(()) => Report::Done(pid),
            Err(e) if e.is_disk_full() => {
                if told {
                    tracing::debug!(job_id = %held.job_id, backend_id = %self.backend_id, error = %e, "the job's outputs still wait for disk space");
                } else {
                    tracing::warn!(job_id = %held.job_id, backend_id = %self.backend_id, error = %e, "the data folder's disk is full: the job's outputs wait on its backend for space");
                    self.say_outputs_wait(&held, &e).await;
                }
                Report::Deferred(pid, e)
            }
            Err(e) => {
                tracing::warn!(job_id = %held.job_id, backend_id = %self.backend_id, error = %e, "cannot finish the job now; will ask the backend again");
                Report::Deferred(pid, e)
            }
        }
    }

    async fn try_finish(&self, held: &Held) -> Result<(), DispatchError> {
        let (job_id, backend_id) = (held.job_id.as_str(), self.backend_id.as_str());
        let entry: HistoryEntry = self
            .client
            .history(&held.prompt_id)
            .await?
            .ok_or_else(|| DispatchError::NoHistory(held.prompt_id.clone()))?;
        let ran = ran_before(&entry, chrono::Utc::now());
        let end = entry.end();
        // An interrupted prompt is the stop a user asked for (a cancel, a
        // pause), when one was (read now: it may have come after this
        // attempt began); no other end needs to know, and most prompts
        // succeed.
        let stop_requested = matches!(end, PromptEnd::Interrupted { .. })
            && self
                .shared
                .store
                .lease_of(job_id)
                .await?
                .is_some_and(|a| a.stop_requested);
        match &end {
            PromptEnd::Success => {
                let dir = self.shared.outputs_dir.join(job_id);
                let outputs = outputs::collect(&self.client, &dir, &entry.outputs).await?;
                match self
                    .shared
                    .store
                    .complete_at(job_id, held.token, outputs, ran)
                    .await
                {
                    Ok(done) => {
                        let times = done.times;
                        tracing::info!(job_id, backend_id, "job completed");
                        for requires in &done.released {
                            self.shared.idle.ring_for(requires);
                        }
                        let run = times.started_at.map_or(0.0, crate::metrics::seconds_since);
                        crate::metrics::completed(times.workflow_id.as_deref(), backend_id, run);
                        self.shared.health.completed(backend_id);
                        if let Err(e) = self
                            .shared
                            .batches
                            .completed(&self.shared.store, job_id)
                            .await
                        {
                            tracing::warn!(job_id, backend_id, error = %e, "cannot read the job's batch: its failures in a row go on counting");
                        }
                        if done.failed_before {
                            self.judge_where_it_failed(job_id).await;
                        }
                    }
                    Err(StoreError::LeaseLost) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            PromptEnd::Interrupted { .. } if stop_requested => {
                let how = format!("interrupted on backend {backend_id}");
                self.shared
                    .store
                    .confirm_stop(job_id, held.token, how)
                    .await?;
            }
            _ => {
                let error = runtime_error(backend_id, held.attempt, &end);
                tracing::warn!(job_id, backend_id, "attempt failed: {}", error["message"]);
                if !self.fail_at(held, false, error, ran).await {
                    return Err(DispatchError::Store(StoreError::Closed));
                }
            }
        }
        if let Err(e) = self
            .client
            .delete_history(std::slice::from_ref(&held.prompt_id))
            .await
        {
            // Harmless: ComfyUI caps its history, and this prompt is never asked about again.
            tracing::debug!(job_id, backend_id, error = %e, "cannot delete the prompt's history");
        }
        // The freed slot is this worker's own: it leases again when this
        // helper is joined. No one else needs waking.
        Ok(())
    }

    /// Says in the job's log, once, that its outputs wait for disk space
    /// (with the database on the same full disk this too may fail: the
    /// warning logged says so then).
    async fn say_outputs_wait(&self, held: &Held, why: &DispatchError) {
        let message = format!(
            "the prompt finished on backend {}, but its outputs cannot be written: the data \
             folder's disk is full ({why}); they stay on the backend and are collected once \
             space is freed, no attempt spent",
            self.backend_id
        );
        if let Err(e) = self
            .shared
            .store
            .note_event(
                &held.job_id,
                "outputs_wait",
                &self.backend_id,
                message,
                None,
            )
            .await
        {
            tracing::warn!(job_id = %held.job_id, backend_id = %self.backend_id, error = %e, "cannot say in the job's log that its outputs wait for space");
        }
    }

    /// The prompt finished but its outputs could not be had, try after try:
    /// the attempt fails.
    pub(super) async fn uncollectable(self, held: Held, why: DispatchError) -> Report {
        let error = json!({
            "message": format!("backend {}: the prompt finished but its outputs could not be collected after {FINISH_TRIES} tries: {why}", self.backend_id),
            "backend_id": self.backend_id,
            "attempt": held.attempt,
        });
        if self.fail(&held, false, error).await {
            Report::Done(held.prompt_id)
        } else {
            Report::Deferred(held.prompt_id, why)
        }
    }

    /// Stops the prompt for a user (a cancel, or a pause that interrupts):
    /// removes it from the backend's queue or interrupts it (again at each
    /// check while it still runs: ComfyUI ignores an interrupt that lands
    /// before the prompt really starts), then waits for the backend to
    /// confirm, or for the cancel timeout. The store decides what becomes
    /// of the job.
    pub(super) async fn cancel(self, held: Held) -> Report {
        let (job_id, backend_id) = (held.job_id.as_str(), self.backend_id.as_str());
        let pid = held.prompt_id.clone();
        let ids = [pid.clone()];
        let _ = self.client.delete_queued(&ids).await;
        let _ = self.client.interrupt(&pid).await;
        let limit = self.shared.config.dispatch.cancel_timeout_s;
        let deadline = Instant::now() + Duration::from_secs(limit);
        loop {
            if let Ok(q) = self.client.queue().await {
                if q.running.contains(&pid) {
                    let _ = self.client.interrupt(&pid).await;
                } else if !q.contains(&pid) {
                    match self.client.history(&pid).await {
                        Ok(None) => {
                            let how = format!("removed from backend {backend_id}'s queue");
                            if let Err(e) = self
                                .shared
                                .store
                                .confirm_stop(job_id, held.token, how)
                                .await
                            {
                                return Report::Deferred(pid, e.into());
                            }
                            break;
                        }
                        // It ended there (interrupted, or finished first): the usual end path decides.
                        Ok(Some(_)) => return self.finish(held, false).await,
                        Err(_) => {}
                    }
                }
            }
            if Instant::now() >= deadline {
                let reason = format!("backend {backend_id} did not confirm within {limit} s");
                let store = &self.shared.store;
                let cleanup = store
                    .add_cleanup(self.cleanup_entry(&held, format!("stopped by a user; {reason}")))
                    .await;
                let confirmed = store
                    .confirm_stop(
                        job_id,
                        held.token,
                        format!("{reason}; the prompt is on the cleanup list"),
                    )
                    .await;
                if let Err(e) = cleanup.and(confirmed.map(|_| ())) {
                    return Report::Deferred(pid, e.into());
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.shared.wake();
        Report::Done(pid)
    }

    /// The prompt ran past its time limit (the worker has put it on the
    /// cleanup list: a hung node ignores interrupts): interrupt it, and fail
    /// the attempt.
    pub(super) async fn time_out(self, held: Held, limit: Duration) -> Report {
        let (job_id, backend_id) = (held.job_id.as_str(), self.backend_id.as_str());
        let pid = held.prompt_id.clone();
        if let Err(e) = self.client.interrupt(&pid).await {
            tracing::warn!(job_id, backend_id, error = %e, "cannot interrupt the timed-out prompt");
        }
        let message = format!(
            "timed out after {} s on backend {backend_id}",
            limit.as_secs()
        );
        let error = json!({
            "message": message,
            "backend_id": backend_id,
            "attempt": held.attempt,
            "timeout_s": limit.as_secs(),
        });
        tracing::warn!(job_id, backend_id, "{message}");
        if self.fail(&held, false, error).await {
            Report::Done(pid)
        } else {
            Report::Deferred(pid, DispatchError::Store(StoreError::Closed))
        }
    }
}

/// How long after a prompt ended its end counts as learned late.
const LATE: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// When the prompt ran, as its box tells it, if its end is learned late
/// (`learned`, when its history came: after a restart of the orchestrator,
/// or a socket that went deaf): the job then ends when it ended there, not
/// minutes later when it was heard of. `None` when heard in time, or when
/// the box gave no times.
fn ran_before(
    entry: &crate::comfy::HistoryEntry,
    learned: chrono::DateTime<chrono::Utc>,
) -> Option<crate::store::RanAt> {
    match entry.run_times() {
        (started, Some(ended)) if learned - ended > LATE => {
            Some(crate::store::RanAt { started, ended })
        }
        _ => None,
    }
}

/// What a worker hears of an attempt ended here: done with the prompt once
/// its end is `recorded`; otherwise it asks the backend again.
fn reported(recorded: bool, pid: String) -> Report {
    if recorded {
        Report::Done(pid)
    } else {
        Report::NoAnswer(pid)
    }
}
