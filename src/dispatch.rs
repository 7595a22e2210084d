//! Dispatch: one worker per backend leases jobs, submits them, follows them
//! on the backend's WebSocket, collects their outputs and ends them.
//!
//! Why one worker per backend: a backend is one GPU with one queue and one
//! WebSocket; a worker owns all three, so there is no shared mutable state
//! between backends beyond the database. Rules that keep a job from being
//! lost or run twice (DESIGN.md, "Dispatch without loss or duplication"):
//!
//! - A prompt id is chosen and stored in the lease before `POST /prompt`, and
//!   is never submitted twice; a retry gets a new lease and a new prompt id.
//! - The end of a prompt is `executing` with `node: null`; only then is
//!   `/history/{prompt_id}` read.
//! - When in doubt (a dropped socket, a submit whose answer was lost, a
//!   restart of the orchestrator), the backend is asked: `/queue` first, then
//!   `/history`. Running or waiting there: follow it. Finished there:
//!   collect it. Unknown there: queue the job again without burning an
//!   attempt. Nothing is rescued on time alone, except a backend that has not
//!   answered for the whole grace period; its prompts are remembered and
//!   deleted and interrupted there if it comes back.
//! - Every state change after the lease is fenced by the lease token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::comfy::{rejection_summary, ComfyClient, ComfyError, HistoryEntry, OutputFile, WsEvent};
use crate::config::Config;
use crate::store::{
    ActiveJob, AttemptOutcome, CancelOutcome, Lease, OutputRecord, Store, StoreError,
};

/// Messages to a backend's worker.
#[derive(Debug)]
enum Command {
    /// A user asked to cancel this job, which the backend holds.
    Cancel(String),
}

/// Reports from a worker's helper tasks back to the worker.
#[derive(Debug)]
enum Report {
    /// `POST /prompt` ended (well or not).
    Submitted(String),
    /// The prompt is dealt with: completed, failed, requeued or cancelled.
    Done(String),
    /// Could not finish now (backend unreachable mid-way, outputs not
    /// collected): try again at the next reconcile. Carries the reason.
    Release(String, String),
    /// A submit got no answer: ask the backend at once whether it has the prompt.
    Doubt(String),
}

/// Failed tries to collect a finished prompt before its attempt fails.
const FINISH_TRIES: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Submitting,
    Submitted,
    Running,
    Finishing,
    Cancelling,
}

#[derive(Debug, Clone)]
struct Tracked {
    job_id: String,
    token: i64,
    phase: Phase,
}

struct Shared {
    store: Store,
    config: Arc<Config>,
    outputs_dir: PathBuf,
    wake: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    commands: HashMap<String, mpsc::UnboundedSender<Command>>,
    progress: Mutex<HashMap<String, Value>>,
    previews: tokio::sync::broadcast::Sender<Preview>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A live preview frame of a running job, relayed as it comes, never stored.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The job.
    pub job_id: String,
    /// `jpeg` or `png`.
    pub format: &'static str,
    /// The image bytes.
    pub image: bytes::Bytes,
}

/// Least time between two stored progress updates of one job.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Progress not yet stored, and when the job's last one was.
struct ProgressState {
    token: i64,
    written: Option<Instant>,
    pending: Option<Value>,
}

/// The running farm: one worker and one monitor per configured backend.
/// Cheap to clone.
#[derive(Clone)]
pub struct Farm {
    shared: Arc<Shared>,
}

impl Farm {
    /// Starts a worker and a monitor for every configured backend.
    pub async fn start(store: Store, config: Arc<Config>) -> Result<Farm, StoreError> {
        let released = store.release_unconfigured().await?;
        if released > 0 {
            tracing::warn!(
                released,
                "jobs held by backends no longer configured were queued again"
            );
        }
        let (wake, _) = watch::channel(0u64);
        let (shutdown, _) = watch::channel(false);
        let mut commands = HashMap::new();
        let mut receivers = Vec::new();
        for b in &config.backends {
            let (tx, rx) = mpsc::unbounded_channel();
            commands.insert(b.id.clone(), tx);
            receivers.push((b.clone(), rx));
        }
        let shared = Arc::new(Shared {
            store: store.clone(),
            outputs_dir: config.outputs_dir(),
            config: config.clone(),
            wake,
            shutdown,
            commands,
            progress: Mutex::new(HashMap::new()),
            previews: tokio::sync::broadcast::channel(64).0,
            tasks: Mutex::new(Vec::new()),
        });
        let timeout = Duration::from_millis(config.dispatch.request_timeout_ms);
        for (b, rx) in receivers {
            let backend = store
                .backend(&b.id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("backend `{}`", b.id)))?;
            let client = ComfyClient::new(&b.host, b.port, &backend.client_id, timeout);
            let monitor_shared = shared.clone();
            let monitor = tokio::spawn(crate::monitor::run(
                store.clone(),
                b.id.clone(),
                client.clone(),
                Duration::from_millis(config.monitor.poll_interval_ms),
                shared.shutdown.subscribe(),
                move || monitor_shared.wake.send_modify(|n| *n += 1),
            ));
            let worker = Worker {
                shared: shared.clone(),
                id: b.id.clone(),
                client,
                max_inflight: b.max_inflight as usize,
                tracked: HashMap::new(),
                reports: mpsc::unbounded_channel(),
                progress: HashMap::new(),
                running: None,
                reconcile_soon: false,
                finish_failures: HashMap::new(),
            };
            let handle = tokio::spawn(worker.run(rx));
            let mut tasks = shared.tasks.lock().expect("tasks");
            tasks.push(monitor);
            tasks.push(handle);
        }
        Ok(Farm { shared })
    }

    /// Wakes every worker: a job was queued or a backend changed.
    pub fn wake(&self) {
        self.shared.wake.send_modify(|n| *n += 1);
    }

    /// Cancels a job: at once if queued, through its backend if held.
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let outcome = self.shared.store.request_cancel(job_id).await?;
        if let CancelOutcome::Requested { backend_id } = &outcome {
            if let Some(tx) = self.shared.commands.get(backend_id) {
                let _ = tx.send(Command::Cancel(job_id.to_string()));
            }
        }
        Ok(outcome)
    }

    /// Live progress of a running job (kept in memory, never a disk write per step).
    pub fn progress(&self, job_id: &str) -> Option<Value> {
        self.shared
            .progress
            .lock()
            .expect("progress")
            .get(job_id)
            .cloned()
    }

    /// Live previews of running jobs (lagging receivers miss frames, nothing else).
    pub fn subscribe_previews(&self) -> tokio::sync::broadcast::Receiver<Preview> {
        self.shared.previews.subscribe()
    }

    /// A receiver that turns `true` when the service stops (for other background tasks).
    pub fn subscribe_shutdown(&self) -> watch::Receiver<bool> {
        self.shared.shutdown.subscribe()
    }

    /// Tells every worker and monitor to stop: no new leases from now on.
    pub fn signal_stop(&self) {
        let _ = self.shared.shutdown.send(true);
    }

    /// Stops every worker and monitor; prompts stay on their backends (the
    /// next start re-attaches to them). Waits at most `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        self.signal_stop();
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.shared.tasks.lock().expect("tasks"));
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!("dispatch workers did not stop in time");
        }
    }
}

/// Delay before the next attempt after `attempt` failed.
fn backoff(config: &Config, attempt: i64) -> chrono::Duration {
    let base = config.dispatch.retry_backoff_ms as f64;
    let ms = (base * 2f64.powi((attempt - 1).clamp(0, 30) as i32))
        .min(config.dispatch.retry_backoff_max_ms as f64);
    chrono::Duration::milliseconds(ms as i64)
}

struct Worker {
    shared: Arc<Shared>,
    id: String,
    client: ComfyClient,
    max_inflight: usize,
    tracked: HashMap<String, Tracked>,
    reports: (
        mpsc::UnboundedSender<Report>,
        mpsc::UnboundedReceiver<Report>,
    ),
    progress: HashMap<String, ProgressState>,
    /// The prompt running on the backend now: previews belong to it.
    running: Option<String>,
    /// Something is in doubt (a submit without answer): ask the backend now.
    reconcile_soon: bool,
    /// Failed tries to collect each finished prompt.
    finish_failures: HashMap<String, u32>,
}

impl Worker {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut wake = self.shared.wake.subscribe();
        let poll = Duration::from_millis(self.shared.config.dispatch.poll_interval_ms);
        let grace = Duration::from_secs(self.shared.config.dispatch.backend_grace_s);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(PROGRESS_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = None;
        let mut down_since: Option<Instant> = None;
        let mut retry_delay = Duration::from_millis(100);
        let mut ticks: u64 = 0;
        // Lease only when something may have changed, not on every progress message.
        let mut dirty = true;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if events.is_none() {
                match self.client.connect().await {
                    Ok(stream) => {
                        tracing::info!(backend_id = %self.id, "connected to backend");
                        events = Some(stream);
                        down_since = None;
                        retry_delay = Duration::from_millis(100);
                        self.reconcile().await;
                        dirty = true;
                    }
                    Err(e) => {
                        let since = *down_since.get_or_insert_with(Instant::now);
                        tracing::debug!(backend_id = %self.id, error = %e, "backend unreachable");
                        if since.elapsed() >= grace {
                            self.take_back_all(&format!(
                                "backend {} has not answered for {} s (grace period)",
                                self.id,
                                since.elapsed().as_secs()
                            ))
                            .await;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(retry_delay) => {}
                            _ = shutdown.changed() => {}
                            Some(cmd) = commands.recv() => self.on_command(cmd).await,
                            Some(r) = self.reports.1.recv() => self.on_report(r),
                        }
                        retry_delay = (retry_delay * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            if self.reconcile_soon {
                self.reconcile_soon = false;
                self.reconcile().await;
                dirty = true;
            }
            if dirty {
                self.fill().await;
                dirty = false;
            }
            let stream = events.as_mut().expect("connected");
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => self.on_event(ev).await,
                    Some(Err(e)) => {
                        tracing::warn!(backend_id = %self.id, error = %e, "backend socket broke");
                        events = None;
                    }
                    None => {
                        tracing::warn!(backend_id = %self.id, "backend closed its socket");
                        events = None;
                    }
                },
                Some(r) = self.reports.1.recv() => {
                    self.on_report(r);
                    dirty = true;
                }
                Some(cmd) = commands.recv() => self.on_command(cmd).await,
                _ = wake.changed() => dirty = true,
                _ = flush.tick() => self.flush_progress().await,
                _ = tick.tick() => {
                    dirty = true;
                    ticks += 1;
                    // A safety net for anything missed: ask the backend now and then.
                    if ticks.is_multiple_of(5) {
                        self.reconcile().await;
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
        tracing::debug!(backend_id = %self.id, "worker stopped");
    }

    /// Leases jobs while the backend has free slots.
    async fn fill(&mut self) {
        while self.tracked.len() < self.max_inflight {
            let lease = match self.shared.store.lease_next(&self.id).await {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(backend_id = %self.id, error = %e, "lease failed");
                    return;
                }
            };
            tracing::info!(job_id = %lease.job_id, backend_id = %self.id, prompt_id = %lease.prompt_id, attempt = lease.attempt, "job leased");
            self.tracked.insert(
                lease.prompt_id.clone(),
                Tracked {
                    job_id: lease.job_id.clone(),
                    token: lease.token,
                    phase: Phase::Submitting,
                },
            );
            self.spawn_submit(lease);
        }
    }

    fn spawn_submit(&self, lease: Lease) {
        let ctx = self.ctx();
        tokio::spawn(async move {
            let pid = lease.prompt_id.clone();
            match ctx.client.submit(&lease.prompt_id, &lease.graph).await {
                Ok(()) => match ctx
                    .shared
                    .store
                    .mark_submitted(&lease.job_id, lease.token)
                    .await
                {
                    Ok(true) => {
                        // Cancelled while the submission was in flight.
                        let _ = ctx.reports.send(Report::Submitted(pid.clone()));
                        ctx.cancel(&lease.job_id, lease.token, &pid).await;
                        return;
                    }
                    Ok(false) | Err(StoreError::LeaseLost) => {}
                    Err(e) => {
                        tracing::error!(job_id = %lease.job_id, error = %e, "cannot record submission")
                    }
                },
                Err(ComfyError::Rejected(body)) => {
                    let error = json!({
                        "message": format!("backend {} rejected the workflow: {}", ctx.backend_id, rejection_summary(&body)),
                        "backend_id": ctx.backend_id,
                        "attempt": lease.attempt,
                        "comfyui_error": body["error"],
                        "node_errors": body["node_errors"],
                    });
                    tracing::warn!(job_id = %lease.job_id, backend_id = %ctx.backend_id, "prompt rejected: {}", error["message"]);
                    let recorded = ctx
                        .fail(&lease.job_id, lease.token, lease.attempt, true, error)
                        .await;
                    // Not recorded: reconcile finds the prompt unknown and queues the job again.
                    let _ = ctx.reports.send(if recorded {
                        Report::Done(pid)
                    } else {
                        Report::Doubt(pid)
                    });
                    return;
                }
                Err(e) => {
                    // Did the backend get it? Only the backend can say: reconcile asks it.
                    tracing::warn!(job_id = %lease.job_id, backend_id = %ctx.backend_id, error = %e, "submit failed; the backend will be asked whether it has the prompt");
                    let _ = ctx.reports.send(Report::Doubt(pid));
                    return;
                }
            }
            let _ = ctx.reports.send(Report::Submitted(pid));
        });
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            shared: self.shared.clone(),
            backend_id: self.id.clone(),
            client: self.client.clone(),
            reports: self.reports.0.clone(),
        }
    }

    fn on_report(&mut self, r: Report) {
        match r {
            Report::Submitted(pid) => {
                if let Some(t) = self.tracked.get_mut(&pid) {
                    if t.phase == Phase::Submitting {
                        t.phase = Phase::Submitted;
                    }
                }
            }
            Report::Done(pid) => {
                self.finish_failures.remove(&pid);
                if let Some(t) = self.tracked.remove(&pid) {
                    self.forget_progress(&t.job_id);
                }
            }
            Report::Release(pid, why) => {
                let tries = {
                    let n = self.finish_failures.entry(pid.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let Some(t) = self.tracked.get_mut(&pid) else {
                    return;
                };
                if tries < FINISH_TRIES {
                    // Left for the next reconcile (a few seconds): the backend may be back by then.
                    t.phase = Phase::Running;
                    return;
                }
                // The backend keeps the prompt but its outputs cannot be had: fail the attempt.
                t.phase = Phase::Finishing;
                self.finish_failures.remove(&pid);
                let (job_id, token) = (t.job_id.clone(), t.token);
                let ctx = self.ctx();
                tokio::spawn(async move {
                    let attempt = ctx
                        .shared
                        .store
                        .lease_of(&job_id)
                        .await
                        .ok()
                        .flatten()
                        .map(|a| a.attempt)
                        .unwrap_or(1);
                    let error = json!({
                        "message": format!("backend {}: the prompt finished but its outputs could not be collected after {FINISH_TRIES} tries: {why}", ctx.backend_id),
                        "backend_id": ctx.backend_id,
                        "attempt": attempt,
                    });
                    let report = if ctx.fail(&job_id, token, attempt, false, error).await {
                        Report::Done(pid)
                    } else {
                        Report::Doubt(pid)
                    };
                    let _ = ctx.reports.send(report);
                });
            }
            Report::Doubt(pid) => {
                if let Some(t) = self.tracked.get_mut(&pid) {
                    t.phase = Phase::Submitted;
                }
                // Ask the backend now rather than at the next safety-net round.
                self.reconcile_soon = true;
            }
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Cancel(job_id) => {
                let Some((pid, t)) = self.tracked.iter_mut().find(|(_, t)| t.job_id == job_id)
                else {
                    // Not followed right now: reconcile picks the flag up.
                    self.reconcile().await;
                    return;
                };
                // A submission in flight checks the flag itself when it returns.
                if matches!(t.phase, Phase::Submitted | Phase::Running) {
                    t.phase = Phase::Cancelling;
                    let (pid, token) = (pid.clone(), t.token);
                    let ctx = self.ctx();
                    tokio::spawn(async move { ctx.cancel(&job_id, token, &pid).await });
                }
            }
        }
    }

    async fn on_event(&mut self, ev: WsEvent) {
        if let WsEvent::Preview(frame) = &ev {
            self.relay_preview(frame.clone());
            return;
        }
        let Some(pid) = ev.prompt_id().map(str::to_string) else {
            return;
        };
        let Some(t) = self.tracked.get(&pid).cloned() else {
            // Not ours (someone else's prompt, or one already dealt with).
            return;
        };
        match ev {
            WsEvent::ExecutionStart { .. } | WsEvent::Executing { node: Some(_), .. } => {
                self.running = Some(pid.clone());
                if let WsEvent::Executing {
                    node: Some(node), ..
                } = &ev
                {
                    self.set_progress(&t.job_id, t.token, json!({"node": node}))
                        .await;
                }
                if matches!(t.phase, Phase::Submitting | Phase::Submitted) {
                    match self.shared.store.mark_running(&t.job_id, t.token).await {
                        Ok(true) => self.record_started(&t.job_id).await,
                        Ok(false) | Err(StoreError::LeaseLost) => {}
                        Err(e) => {
                            tracing::error!(job_id = %t.job_id, error = %e, "cannot record running")
                        }
                    }
                    if let Some(t) = self.tracked.get_mut(&pid) {
                        t.phase = Phase::Running;
                    }
                }
            }
            WsEvent::Progress {
                node, value, max, ..
            } => {
                self.set_progress(
                    &t.job_id,
                    t.token,
                    json!({"node": node, "value": value, "max": max}),
                )
                .await;
            }
            WsEvent::Executing { node: None, .. } => {
                if self.running.as_deref() == Some(pid.as_str()) {
                    self.running = None;
                }
                if matches!(t.phase, Phase::Finishing | Phase::Cancelling) {
                    return;
                }
                if let Some(t) = self.tracked.get_mut(&pid) {
                    t.phase = Phase::Finishing;
                }
                let ctx = self.ctx();
                tokio::spawn(async move { ctx.finish(&t.job_id, t.token, &pid).await });
            }
            _ => {}
        }
    }

    /// Metrics: how long the job waited in the queue.
    async fn record_started(&self, job_id: &str) {
        if let Ok(Some(job)) = self.shared.store.job_times(job_id).await {
            let wait = (chrono::Utc::now() - job.submitted_at)
                .num_milliseconds()
                .max(0) as f64
                / 1000.0;
            crate::metrics::started(job.workflow_id.as_deref(), &self.id, wait);
        }
    }

    /// Keeps the live progress in memory, and stores it at most every
    /// `PROGRESS_EVERY` per job (the latest value is always stored).
    async fn set_progress(&mut self, job_id: &str, token: i64, p: Value) {
        let merged = {
            let mut map = self.shared.progress.lock().expect("progress");
            let entry = map.entry(job_id.to_string()).or_insert_with(|| json!({}));
            if let (Some(e), Some(p)) = (entry.as_object_mut(), p.as_object()) {
                if p.get("value").is_none() {
                    // A new node: its steps are not known yet.
                    e.remove("value");
                    e.remove("max");
                }
                e.extend(p.clone());
            }
            entry.clone()
        };
        let state = self
            .progress
            .entry(job_id.to_string())
            .or_insert(ProgressState {
                token,
                written: None,
                pending: None,
            });
        state.token = token;
        // The first value waits one period too: a job shorter than that
        // needs no progress rows, its end says it all.
        let written = *state.written.get_or_insert_with(Instant::now);
        if written.elapsed() < PROGRESS_EVERY {
            state.pending = Some(merged);
            return;
        }
        state.written = Some(Instant::now());
        state.pending = None;
        if let Err(e) = self
            .shared
            .store
            .record_progress(job_id, token, merged)
            .await
        {
            tracing::debug!(job_id, error = %e, "progress not stored");
        }
    }

    /// Stores progress held back by the rate limit.
    async fn flush_progress(&mut self) {
        let due: Vec<(String, i64, Value)> = self
            .progress
            .iter_mut()
            .filter(|(_, s)| {
                s.pending.is_some() && s.written.is_none_or(|w| w.elapsed() >= PROGRESS_EVERY)
            })
            .map(|(id, s)| {
                s.written = Some(Instant::now());
                (id.clone(), s.token, s.pending.take().expect("pending"))
            })
            .collect();
        for (job_id, token, p) in due {
            let _ = self.shared.store.record_progress(&job_id, token, p).await;
        }
    }

    /// Relays a preview frame of the running prompt to live subscribers.
    fn relay_preview(&self, frame: bytes::Bytes) {
        let Some(t) = self.running.as_ref().and_then(|p| self.tracked.get(p)) else {
            return;
        };
        if self.shared.previews.receiver_count() == 0 || frame.len() < 8 {
            return;
        }
        // 4 bytes event type (1: image), 4 bytes format (1: JPEG, 2: PNG), then the image.
        let event = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
        if event != 1 {
            return;
        }
        let format = match u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) {
            2 => "png",
            _ => "jpeg",
        };
        let _ = self.shared.previews.send(Preview {
            job_id: t.job_id.clone(),
            format,
            image: frame.slice(8..),
        });
    }

    /// Asks the backend about every job it holds and acts on the answer.
    async fn reconcile(&mut self) {
        let active = match self.shared.store.active_jobs(&self.id).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(backend_id = %self.id, error = %e, "cannot read active jobs");
                return;
            }
        };
        let queue = match self.client.queue().await {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(backend_id = %self.id, error = %e, "reconcile: /queue failed");
                return;
            }
        };
        self.cleanup(&queue.running).await;
        // Forget tracked prompts the database no longer holds here.
        let held: std::collections::HashSet<&str> =
            active.iter().map(|a| a.prompt_id.as_str()).collect();
        self.tracked.retain(|pid, t| {
            held.contains(pid.as_str()) || t.phase != Phase::Submitted && t.phase != Phase::Running
        });
        for a in active {
            let phase = self.tracked.get(&a.prompt_id).map(|t| t.phase);
            if matches!(
                phase,
                Some(Phase::Submitting | Phase::Finishing | Phase::Cancelling)
            ) {
                continue;
            }
            let t = Tracked {
                job_id: a.job_id.clone(),
                token: a.token,
                phase: if a.status == "running" {
                    Phase::Running
                } else {
                    Phase::Submitted
                },
            };
            self.tracked.insert(a.prompt_id.clone(), t);
            if a.cancel_requested {
                self.start_cancel(&a);
                continue;
            }
            if queue.running.contains(&a.prompt_id) {
                if a.status != "running" {
                    let _ = self.shared.store.mark_running(&a.job_id, a.token).await;
                    if let Some(t) = self.tracked.get_mut(&a.prompt_id) {
                        t.phase = Phase::Running;
                    }
                }
                continue;
            }
            if queue.pending.contains(&a.prompt_id) {
                continue;
            }
            match self.client.history(&a.prompt_id).await {
                Ok(Some(_)) => {
                    if let Some(t) = self.tracked.get_mut(&a.prompt_id) {
                        t.phase = Phase::Finishing;
                    }
                    let ctx = self.ctx();
                    let (job_id, token, pid) = (a.job_id.clone(), a.token, a.prompt_id.clone());
                    tokio::spawn(async move { ctx.finish(&job_id, token, &pid).await });
                }
                Ok(None) => {
                    let reason = if a.submitted {
                        format!(
                            "backend {} no longer has prompt {} (it restarted or lost it)",
                            self.id, a.prompt_id
                        )
                    } else {
                        format!("backend {} never received prompt {}", self.id, a.prompt_id)
                    };
                    tracing::warn!(job_id = %a.job_id, backend_id = %self.id, "{reason}; queued again");
                    self.give_back(&a, reason, false).await;
                }
                Err(e) => {
                    tracing::debug!(backend_id = %self.id, error = %e, "reconcile: /history failed")
                }
            }
        }
    }

    /// Queues a job this backend lost again (no attempt burnt) and stops following it.
    async fn give_back(&mut self, a: &ActiveJob, reason: String, cleanup: bool) {
        let _ = self
            .shared
            .store
            .requeue_lost(&a.job_id, a.token, reason, cleanup)
            .await;
        self.tracked.remove(&a.prompt_id);
        self.forget_progress(&a.job_id);
    }

    fn forget_progress(&mut self, job_id: &str) {
        self.shared
            .progress
            .lock()
            .expect("progress")
            .remove(job_id);
        self.progress.remove(job_id);
    }

    fn start_cancel(&mut self, a: &ActiveJob) {
        if let Some(t) = self.tracked.get_mut(&a.prompt_id) {
            t.phase = Phase::Cancelling;
        }
        let ctx = self.ctx();
        let (job_id, token, pid) = (a.job_id.clone(), a.token, a.prompt_id.clone());
        tokio::spawn(async move { ctx.cancel(&job_id, token, &pid).await });
    }

    /// Deletes and interrupts prompts taken back from this backend while it was away.
    async fn cleanup(&self, running: &[String]) {
        let prompts = match self.shared.store.cleanup_prompts(&self.id).await {
            Ok(p) if !p.is_empty() => p,
            _ => return,
        };
        if self.client.delete_queued(&prompts).await.is_err() {
            return;
        }
        for p in prompts.iter().filter(|p| running.contains(p)) {
            let _ = self.client.interrupt(p).await;
        }
        let _ = self.client.delete_history(&prompts).await;
        tracing::info!(backend_id = %self.id, count = prompts.len(), "removed prompts taken back while the backend was away");
        let _ = self.shared.store.cleanup_done(prompts).await;
    }

    /// The backend has been unreachable for the whole grace period: its jobs go elsewhere.
    async fn take_back_all(&mut self, reason: &str) {
        let active = match self.shared.store.active_jobs(&self.id).await {
            Ok(a) if !a.is_empty() => a,
            _ => return,
        };
        for a in active {
            // Best effort: it did not answer, but if it does now, it must not run these.
            let _ = self
                .client
                .delete_queued(std::slice::from_ref(&a.prompt_id))
                .await;
            let _ = self.client.interrupt(&a.prompt_id).await;
            tracing::warn!(job_id = %a.job_id, backend_id = %self.id, "{reason}; job queued again");
            self.give_back(&a, reason.to_string(), true).await;
        }
        self.shared.wake.send_modify(|n| *n += 1);
    }
}

/// What a helper task needs: the backend, its client, and the way back to the worker.
#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    backend_id: String,
    client: ComfyClient,
    reports: mpsc::UnboundedSender<Report>,
}

impl Ctx {
    /// Records a failed attempt; `false` if it could not be recorded (the
    /// caller then keeps the backend's history so that it can try again).
    async fn fail(
        &self,
        job_id: &str,
        token: i64,
        attempt: i64,
        rejected: bool,
        error: Value,
    ) -> bool {
        let delay = backoff(&self.shared.config, attempt);
        let recorded = match self
            .shared
            .store
            .fail_attempt(job_id, token, rejected, error, delay)
            .await
        {
            Ok(AttemptOutcome::Failed(reason)) => {
                tracing::warn!(job_id, backend_id = %self.backend_id, "job failed: {reason}");
                self.count_failure(job_id, true).await;
                true
            }
            Ok(AttemptOutcome::Retry(at)) => {
                self.count_failure(job_id, false).await;
                tracing::info!(job_id, backend_id = %self.backend_id, retry_at = %at, "attempt failed; job queued again");
                let shared = self.shared.clone();
                let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    shared.wake.send_modify(|n| *n += 1);
                });
                true
            }
            Ok(AttemptOutcome::LeaseLost) => true,
            Err(e) => {
                tracing::error!(job_id, error = %e, "cannot record the failed attempt");
                false
            }
        };
        self.shared.wake.send_modify(|n| *n += 1);
        recorded
    }

    async fn count_failure(&self, job_id: &str, is_final: bool) {
        let workflow = self
            .shared
            .store
            .job_times(job_id)
            .await
            .ok()
            .flatten()
            .and_then(|j| j.workflow_id);
        crate::metrics::failed(workflow.as_deref(), &self.backend_id, is_final);
    }

    /// Reads the prompt's history and ends the job accordingly.
    async fn finish(&self, job_id: &str, token: i64, pid: &str) {
        let report = match self.try_finish(job_id, token, pid).await {
            Ok(()) => Report::Done(pid.to_string()),
            Err(e) => {
                tracing::warn!(job_id, backend_id = %self.backend_id, error = %e, "cannot finish the job now; will ask the backend again");
                Report::Release(pid.to_string(), e)
            }
        };
        let _ = self.reports.send(report);
    }

    async fn try_finish(&self, job_id: &str, token: i64, pid: &str) -> Result<(), String> {
        let entry = self.client.history(pid).await.map_err(|e| e.to_string())?;
        let Some(h) = entry else {
            return Err(format!("backend has no history for prompt {pid}"));
        };
        let attempt = self.shared.store.lease_of(job_id).await.ok().flatten();
        let cancel_requested = attempt.as_ref().is_some_and(|a| a.cancel_requested);
        let attempt_no = attempt.map(|a| a.attempt).unwrap_or(0);
        if h.status_str == "success" || (h.completed && h.message("execution_error").is_none()) {
            let outputs = collect_outputs(
                &self.client,
                &self.shared.outputs_dir.join(job_id),
                &h.outputs,
            )
            .await
            .map_err(|e| format!("collecting outputs: {e}"))?;
            match self.shared.store.complete(job_id, token, outputs).await {
                Ok(()) => {
                    tracing::info!(job_id, backend_id = %self.backend_id, "job completed");
                    if let Ok(Some(job)) = self.shared.store.job_times(job_id).await {
                        let run = job
                            .started_at
                            .map(|s| {
                                (chrono::Utc::now() - s).num_milliseconds().max(0) as f64 / 1000.0
                            })
                            .unwrap_or(0.0);
                        crate::metrics::completed(
                            job.workflow_id.as_deref(),
                            &self.backend_id,
                            run,
                        );
                    }
                }
                Err(StoreError::LeaseLost) => {}
                Err(e) => return Err(e.to_string()),
            }
        } else if h.message("execution_interrupted").is_some() && cancel_requested {
            let _ = self
                .shared
                .store
                .confirm_cancel(
                    job_id,
                    token,
                    format!("cancelled: interrupted on backend {}", self.backend_id),
                )
                .await;
        } else {
            let error = runtime_error(&self.backend_id, attempt_no, &h);
            tracing::warn!(job_id, backend_id = %self.backend_id, "attempt failed: {}", error["message"]);
            if !self.fail(job_id, token, attempt_no, false, error).await {
                return Err("the failed attempt could not be recorded".into());
            }
        }
        let _ = self.client.delete_history(&[pid.to_string()]).await;
        self.shared.wake.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Removes the prompt from the backend's queue or interrupts it, then
    /// waits for the backend to confirm (or for the cancel timeout).
    async fn cancel(&self, job_id: &str, token: i64, pid: &str) {
        let _ = self.client.delete_queued(&[pid.to_string()]).await;
        let _ = self.client.interrupt(pid).await;
        let deadline =
            Instant::now() + Duration::from_secs(self.shared.config.dispatch.cancel_timeout_s);
        loop {
            if let Ok(q) = self.client.queue().await {
                if !q.contains(pid) {
                    match self.client.history(pid).await {
                        Ok(None) => {
                            let _ = self
                                .shared
                                .store
                                .confirm_cancel(
                                    job_id,
                                    token,
                                    format!(
                                        "cancelled: removed from backend {}'s queue",
                                        self.backend_id
                                    ),
                                )
                                .await;
                            break;
                        }
                        Ok(Some(_)) => {
                            // It ended there (interrupted, or finished first): the usual end path decides.
                            self.finish(job_id, token, pid).await;
                            return;
                        }
                        Err(_) => {}
                    }
                }
            }
            if Instant::now() >= deadline {
                let _ = self
                    .shared
                    .store
                    .confirm_cancel(
                        job_id,
                        token,
                        format!(
                            "cancelled; backend {} did not confirm within {} s",
                            self.backend_id, self.shared.config.dispatch.cancel_timeout_s
                        ),
                    )
                    .await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.reports.send(Report::Done(pid.to_string()));
        self.shared.wake.send_modify(|n| *n += 1);
    }
}

/// A person-readable error from a failed prompt's history.
fn runtime_error(backend_id: &str, attempt: i64, h: &HistoryEntry) -> Value {
    if let Some(d) = h.message("execution_error") {
        let node = d["node_id"].as_str().unwrap_or("?");
        let node_type = d["node_type"].as_str().unwrap_or("?");
        let exc = d["exception_type"].as_str().unwrap_or("error");
        let msg = d["exception_message"].as_str().unwrap_or("").trim();
        return json!({
            "message": format!("backend {backend_id}: node {node} ({node_type}) raised {exc}: {msg}"),
            "backend_id": backend_id,
            "attempt": attempt,
            "node_id": node,
            "node_type": node_type,
            "exception_type": exc,
            "exception_message": msg,
            "traceback": d["traceback"],
        });
    }
    if let Some(d) = h.message("execution_interrupted") {
        let node = d["node_id"].as_str().unwrap_or("?");
        return json!({
            "message": format!("backend {backend_id}: interrupted at node {node}, not by this orchestrator (someone cancelled it on the backend?)"),
            "backend_id": backend_id,
            "attempt": attempt,
            "node_id": node,
        });
    }
    json!({
        "message": format!("backend {backend_id}: the prompt ended with status `{}`", h.status_str),
        "backend_id": backend_id,
        "attempt": attempt,
    })
}

/// A file name from a backend made safe: no path, no hidden file, only
/// letters, digits, `.`, `-`, `_`.
pub fn safe_name(untrusted: &str) -> String {
    let base = untrusted.rsplit(['/', '\\']).next().unwrap_or("");
    let mut s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('.') {
        s.remove(0);
    }
    if s.len() > 200 {
        s = s[s.len() - 200..].to_string();
    }
    if s.is_empty() {
        "output".into()
    } else {
        s
    }
}

fn content_type_for(name: &str) -> &'static str {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

/// Downloads every listed file into `dir` (streamed, hashed on the way) and
/// returns their records. A partial download never looks complete: it is
/// written to a `.part` file and renamed at the end.
async fn collect_outputs(
    client: &ComfyClient,
    dir: &Path,
    files: &[OutputFile],
) -> Result<Vec<OutputRecord>, String> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut records: Vec<OutputRecord> = Vec::new();
    for f in files {
        let clean = safe_name(&f.filename);
        let mut name = clean.clone();
        let mut n = 1;
        while records.iter().any(|r| r.name == name) {
            n += 1;
            name = match clean.rsplit_once('.') {
                Some((stem, ext)) => format!("{stem}-{n}.{ext}"),
                None => format!("{clean}-{n}"),
            };
        }
        let mut resp = client.view(f).await.map_err(|e| e.to_string())?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && *v != "application/octet-stream")
            .map(str::to_string)
            .unwrap_or_else(|| content_type_for(&name).to_string());
        let part = dir.join(format!(".{name}.part"));
        let mut file = tokio::fs::File::create(&part)
            .await
            .map_err(|e| format!("{}: {e}", part.display()))?;
        let mut hasher = Sha256::new();
        let mut size: i64 = 0;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("downloading {}: {e}", f.filename))?
        {
            hasher.update(&chunk);
            size += chunk.len() as i64;
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("{}: {e}", part.display()))?;
        }
        file.sync_all()
            .await
            .map_err(|e| format!("{}: {e}", part.display()))?;
        drop(file);
        tokio::fs::rename(&part, dir.join(&name))
            .await
            .map_err(|e| format!("{}: {e}", name))?;
        records.push(OutputRecord {
            name,
            kind: f.kind.clone(),
            node_id: f.node_id.clone(),
            filename: f.filename.clone(),
            subfolder: f.subfolder.clone(),
            file_type: f.file_type.clone(),
            size,
            sha256: format!("{:x}", hasher.finalize()),
            content_type,
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_a_backend_cannot_escape_the_job_folder() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_name(".hidden"), "hidden");
        assert_eq!(safe_name("a b$c.png"), "a_b_c.png");
        assert_eq!(safe_name(".."), "output");
        assert_eq!(safe_name("/"), "output");
        assert_eq!(safe_name("orch_00001_.png"), "orch_00001_.png");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut c = Config::default();
        c.dispatch.retry_backoff_ms = 1000;
        c.dispatch.retry_backoff_max_ms = 5000;
        assert_eq!(backoff(&c, 1).num_milliseconds(), 1000);
        assert_eq!(backoff(&c, 2).num_milliseconds(), 2000);
        assert_eq!(backoff(&c, 5).num_milliseconds(), 5000);
    }
}
