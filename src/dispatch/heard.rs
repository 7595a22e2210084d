//! What the worker hears on its backend's WebSocket: that a prompt it
//! follows started, moved on a node, or ended; a preview of it; that the
//! backend's queue changed (how many prompts there are not ours); that the
//! socket is alive and is the one registered for our client id. And what
//! it shows the farm of its slots: those taken by prompts not ours, and by
//! prompts whose outputs wait for disk space (a queued job's page says why
//! the box takes no more).
//!
//! Why apart from the loop (`worker.rs`): the loop decides when to listen,
//! ask, lease and give up on the socket; this says what each message means
//! for the prompts followed, a table of its own that grows with what
//! ComfyUI sends.

use super::phase::Signal;
use super::progress::Step;
use super::worker::Worker;
use crate::comfy::{Preview, WsEvent};
use crate::store::StoreError;

impl Worker {
    /// ComfyUI's queue holds `remaining` prompts, running or waiting (a
    /// `status` message, sent at each change of its queue): what is not
    /// ours takes the box's slots too, so that work queued behind an
    /// artist's prompts goes to a free box instead; and a box kept from new
    /// jobs by a prompt given up on is asked again.
    ///
    /// Ours are the prompts followed in a phase where the backend may hold
    /// them. The count errs towards "ours" (a prompt whose end is being
    /// collected is counted though it left the queue), which leases as
    /// before; a prompt given up on that still runs there counts as not
    /// ours, which it is as far as free slots go.
    pub(super) fn saw_queue(&mut self, remaining: i64) {
        // A prompt given up on that still ran there may have ended (a node
        // that never looked for the interrupt, done at last): the box is
        // asked now, not at the next safety-net round.
        if self.stuck {
            self.reconcile_soon = true;
        }
        let ours = self
            .tracked
            .values()
            .filter(|t| t.phase.may_be_on_backend())
            .count();
        self.note_foreign(usize::try_from(remaining).unwrap_or(0).saturating_sub(ours));
    }

    /// `foreign` prompts not ours are on the backend now.
    pub(super) fn note_foreign(&mut self, foreign: usize) {
        if foreign != self.foreign {
            tracing::debug!(backend_id = %self.id, foreign, "prompts not ours in the backend's queue");
            let mut shown = self.shared.foreign.lock().expect("foreign");
            if foreign == 0 {
                shown.remove(&self.id);
            } else {
                shown.insert(self.id.clone(), foreign);
            }
        }
        self.foreign_freed |= foreign < self.foreign;
        self.foreign = foreign;
    }

    /// Shows the farm how many of its prompts finished and wait for disk
    /// space to save their outputs (they hold their slots), when it changed.
    pub(super) fn note_disk_waits(&mut self) {
        let waits = self.tracked.values().filter(|t| t.waits_for_disk).count();
        if waits != self.disk_waits {
            let mut shown = self.shared.disk_waits.lock().expect("disk waits");
            if waits == 0 {
                shown.remove(&self.id);
            } else {
                shown.insert(self.id.clone(), waits);
            }
            self.disk_waits = waits;
        }
    }

    /// Records the largest upload the backend takes, as its socket's
    /// `feature_flags` said, when it differs from the last record (a box
    /// started again with another `--max-upload-size`): leasing leaves it
    /// the jobs whose files fit, and a larger limit may let it take one
    /// that waited.
    async fn note_upload_limit(&mut self, limit: Option<i64>) {
        let Some(limit) = limit.filter(|l| Some(*l) != self.upload_limit) else {
            return;
        };
        match self.shared.store.set_upload_limit(&self.id, limit).await {
            Ok(changed) => {
                self.upload_limit = Some(limit);
                if changed {
                    tracing::info!(backend_id = %self.id, max_upload_bytes = limit, "the backend's upload limit is recorded");
                    self.shared.wake();
                }
            }
            Err(e) => {
                tracing::warn!(backend_id = %self.id, error = %e, "cannot record the backend's upload limit")
            }
        }
    }

    pub(super) async fn on_event(&mut self, ev: WsEvent) {
        self.pulse.heard();
        if ev == WsEvent::Pong {
            // Proves the connection, not that ComfyUI still sends us our messages.
            self.link.pong();
            return;
        }
        self.link.heard();
        let pid = match &ev {
            WsEvent::FeatureFlags { max_upload_bytes } => {
                self.link.confirmed();
                self.note_upload_limit(*max_upload_bytes).await;
                return;
            }
            WsEvent::Status {
                queue_remaining: Some(remaining),
            } => {
                self.saw_queue(*remaining);
                return;
            }
            WsEvent::Preview(frame) => {
                if let Some(p) = Preview::decode(frame) {
                    let pid = p.prompt_id.clone().or_else(|| self.running.clone());
                    if let Some(t) = pid.and_then(|pid| self.tracked.get(&pid)) {
                        self.progress.relay(&t.held.job_id, p);
                    }
                }
                return;
            }
            // Re-sent on reconnect for the running prompt, without its id.
            WsEvent::Executing {
                prompt_id: None,
                node: Some(_),
            } => self.running.clone(),
            _ => ev.prompt_id().map(str::to_string),
        };
        // Not ours (someone else's prompt, or one already dealt with).
        let Some((pid, t)) = pid.and_then(|p| self.tracked.get(&p).cloned().map(|t| (p, t))) else {
            return;
        };
        let (job_id, token) = (t.held.job_id.as_str(), t.held.token);
        match ev {
            WsEvent::ExecutionStart { .. } | WsEvent::Executing { node: Some(_), .. } => {
                self.running = Some(pid.clone());
                if let WsEvent::Executing {
                    node: Some(node), ..
                } = ev
                {
                    self.progress
                        .set(job_id, token, Step::Node(node), &t.nodes)
                        .await;
                }
                if self.signal(&pid, Signal::Started).is_some() {
                    self.record_running(job_id, token).await;
                }
            }
            WsEvent::Progress {
                node, value, max, ..
            } => {
                let step = Step::Value { node, value, max };
                self.progress.set(job_id, token, step, &t.nodes).await;
            }
            WsEvent::Executing { node: None, .. } => {
                if self.running.as_deref() == Some(pid.as_str()) {
                    self.running = None;
                }
                self.progress.ended(job_id);
                if self.signal(&pid, Signal::Ended).is_some() {
                    self.spawn_finish(&pid);
                }
            }
            _ => {}
        }
    }

    /// `assigned` → `running` in the database, and the queue-wait metric.
    pub(super) async fn record_running(&self, job_id: &str, token: i64) {
        match self.shared.store.mark_running(job_id, token).await {
            Ok(Some(job)) => {
                let wait = crate::metrics::seconds_since(job.submitted_at);
                crate::metrics::started(job.workflow_id.as_deref(), &self.id, wait);
            }
            Ok(None) | Err(StoreError::LeaseLost) => {}
            Err(e) => {
                tracing::error!(job_id, backend_id = %self.id, error = %e, "cannot record running")
            }
        }
    }
}
