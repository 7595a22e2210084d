//! Dispatch: one worker per backend leases jobs, submits them, follows them
//! on the backend's WebSocket, collects their outputs and ends them.
//!
//! Why one worker per backend: a backend is one GPU with one queue and one
//! WebSocket; a worker owns all three, so there is no shared mutable state
//! between backends beyond the database. The rules that keep a job from
//! being lost or run twice (`docs/architecture.md`, "The dispatch protocol"):
//!
//! - A prompt id is chosen and stored in the lease before `POST /prompt`, and
//!   is never submitted twice; a retry gets a new lease and a new prompt id.
//! - The end of a prompt is `executing` with `node: null`; only then is
//!   `/history/{prompt_id}` read.
//! - When in doubt (a dropped socket, a submit whose answer never came, a
//!   restart of the orchestrator), the backend is asked: `/queue` first, then
//!   `/history`. Nothing is rescued on time alone, except from a backend that
//!   has answered nothing for the whole grace period; every prompt given up
//!   on goes on a durable cleanup list and is removed there when it answers.
//! - Every state change after the lease is fenced by the lease token.
//!
//! Layout: `worker` (the per-backend loop and filling), `heard` (what its
//! socket's messages mean for the prompts it follows), `phase` (where
//! each followed prompt stands: the one state machine), `attempt` (one
//! attempt's steps: submit, finish, cancel, time out), `failures` (what a
//! failed attempt means for the job, its box and its batch), `reconcile`
//! (asking the backend, the cleanup list, taking jobs back), `outputs`
//! (downloads), `progress` (live progress and previews), `idle` (who
//! waits for work), `glance` (one read of the farm for the safety nets),
//! `inventories` (what each backend can run, as the farm keeps it), `hours`
//! (each backend's hours kept in the database at the edges of its window),
//! `health` (a sick box's quarantine) and `batches` (a broken batch paused).

mod attempt;
mod batches;
mod failures;
mod files;
mod fill;
mod glance;
mod health;
mod heard;
mod hours;
mod idle;
mod inventories;
mod link;
mod outputs;
mod phase;
mod progress;
mod reconcile;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::comfy::{ComfyClient, ComfyError, Limits};
use crate::config::Config;
use crate::inventory::{Inventory, Rules};
use crate::store::{CancelOutcome, JobStatus, PauseChange, Store, StoreError};

pub use batches::BatchResumed;
pub use health::Quarantine;
pub use outputs::safe_name;
pub use progress::Preview;

/// Why a step of dispatch could not be done now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// Talking to the backend failed.
    #[error("{0}")]
    Backend(#[from] ComfyError),
    /// The database refused the write or read.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The backend says the prompt finished, but keeps no history of it.
    #[error("backend has no history for prompt {0}")]
    NoHistory(String),
    /// Reading an input, or writing an output, in the data folder failed.
    #[error("{0}")]
    Files(String),
    /// The data folder's disk is full (or its quota spent): neither the
    /// box's fault nor the job's. What was to be written waits for space,
    /// however long, and no attempt is spent on it.
    #[error("{0}")]
    DiskFull(String),
    /// A file the job needs is larger than the backend takes (a `413` to
    /// its upload): that backend cannot run the job, others may.
    #[error("{0}")]
    TooLarge(String),
    /// A file the job names is not here and will not be (an input deleted,
    /// an output its parent did not make or retention deleted): no attempt
    /// anywhere can succeed.
    #[error("{0}")]
    Gone(String),
}

impl DispatchError {
    /// Whether the orchestrator's own disk is full (an output's file, or
    /// the database).
    pub(super) fn is_disk_full(&self) -> bool {
        matches!(
            self,
            DispatchError::DiskFull(_) | DispatchError::Store(StoreError::Full)
        )
    }
}

/// Messages to a backend's worker.
#[derive(Debug)]
enum Command {
    /// A user asked to stop this job, which the backend holds: to cancel
    /// it, or to pause it (the store knows which).
    Stop(String),
}

/// What the workers share: the database, settings, and the ways to reach
/// each other and the API.
struct Shared {
    store: Store,
    config: Arc<Config>,
    outputs_dir: PathBuf,
    inputs_dir: PathBuf,
    wake: watch::Sender<u64>,
    stop: CancellationToken,
    commands: HashMap<String, mpsc::Sender<Command>>,
    progress: Mutex<HashMap<String, Value>>,
    /// Prompts not ours in each backend's queue, as its worker last heard
    /// (absent: none, or not heard yet).
    foreign: Mutex<HashMap<String, usize>>,
    /// Prompts of each backend that finished and wait for disk space to
    /// save their outputs (absent: none).
    disk_waits: Mutex<HashMap<String, usize>>,
    previews: tokio::sync::broadcast::Sender<Preview>,
    /// Times at which a retry falls due (the workers are woken then).
    due: DueTimes,
    /// What each backend can run, as last read.
    inventories: std::sync::RwLock<HashMap<String, Arc<Inventory>>>,
    /// The last answer of [`Farm::distinct_inventories`], for the backend
    /// list it was asked with, until an inventory changes. Taken after
    /// `inventories`, emptied under its write lock.
    distinct_kept: Mutex<Option<inventories::DistinctKept>>,
    /// How inventories check graphs.
    rules: Arc<Rules>,
    /// Each backend's client (for reading its inventory on demand).
    clients: HashMap<String, ComfyClient>,
    /// Workers waiting for work: a queued job rings one of them.
    idle: idle::IdleWorkers,
    /// Where the farm's timers are laid out from (see [`SLOTS`]).
    epoch: tokio::time::Instant,
    /// One look at the farm for the safety nets of a slot's workers.
    glances: glance::Glances,
    /// Which backends fail jobs that others complete (see `health`).
    health: health::Health,
    /// Which batches fail job after job alike (see `batches`).
    batches: batches::BadBatches,
}

/// The periodic work of workers and monitors (ticks, pings, polls) falls in
/// this many slots of each period, spread over it, and everything in a
/// slot fires together. Why: a timer of its own per backend woke the
/// process a thousand times a second on a farm of a thousand idle boxes
/// (a third of its idle time was threads parking and waking); slots keep
/// the load spread but wake it a few times a second.
pub(crate) const SLOTS: u32 = 10;

/// Times at which workers must be woken: a retry's back-off ends (every
/// worker), or the avoidance of the backend that failed it (that backend's
/// worker alone: the others could take the job already).
#[derive(Default)]
struct DueTimes {
    /// When, and whom: `None` every worker, else one backend's.
    times: Mutex<BTreeMap<Instant, Vec<Option<String>>>>,
    changed: Notify,
}

impl DueTimes {
    fn add(&self, at: Instant, who: Option<String>) {
        self.times
            .lock()
            .expect("due")
            .entry(at)
            .or_default()
            .push(who);
        self.changed.notify_one();
    }

    /// Waits until the earliest time falls due (whom to wake then, and it
    /// is forgotten) or an earlier one may have been added (nobody).
    async fn next(&self) -> Vec<Option<String>> {
        let next = self.times.lock().expect("due").keys().next().copied();
        let Some(at) = next else {
            self.changed.notified().await;
            return Vec::new();
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                let now = Instant::now();
                let mut times = self.times.lock().expect("due");
                let later = times.split_off(&(now + Duration::from_nanos(1)));
                std::mem::replace(&mut *times, later).into_values().flatten().collect()
            }
            _ = self.changed.notified() => Vec::new(),
        }
    }
}

impl Shared {
    /// Wakes every worker: a job was queued, or a backend may take one.
    fn wake(&self) {
        // Freed slots look too, until a look finds nothing due.
        self.idle.opened();
        self.wake.send_modify(|n| *n += 1);
    }

    /// Appends a backend's quarantine event (its start, end or lift) to the
    /// log; one that cannot be written is logged, and the quarantine, kept
    /// in memory, holds all the same.
    async fn quarantine_event(&self, backend_id: &str, kind: &str, message: &str, data: Value) {
        if let Err(e) = self
            .store
            .backend_event(backend_id, kind, message, data)
            .await
        {
            tracing::warn!(backend_id, kind, error = %e, "cannot record the quarantine's event");
        }
    }

    /// Rings the backend's worker a moment after its quarantine ends at
    /// `until`, so that the worker finds it over.
    fn wake_at_quarantine_end(&self, backend_id: &str, until: chrono::DateTime<chrono::Utc>) {
        self.wake_at(
            until + chrono::Duration::milliseconds(100),
            Some(backend_id),
        );
    }

    /// Wakes every worker at `at` (a retry's back-off ends then), or only
    /// the worker of backend `who`.
    fn wake_at(&self, at: chrono::DateTime<chrono::Utc>, who: Option<&str>) {
        let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
        self.due.add(Instant::now() + wait, who.map(str::to_string));
    }
}

/// Wakes the workers when retries fall due, until the service stops.
async fn wake_when_due(shared: Arc<Shared>) {
    loop {
        let due = tokio::select! {
            _ = shared.stop.cancelled() => return,
            due = shared.due.next() => due,
        };
        if due.contains(&None) {
            shared.wake();
            continue;
        }
        for id in due.iter().flatten() {
            shared.idle.bell(id).notify_one();
        }
    }
}

/// The running farm: one worker and one monitor per configured backend.
/// Cheap to clone.
#[derive(Clone)]
pub struct Farm {
    shared: Arc<Shared>,
}

/// At most this many distinct back-off ends are read at start: later ones
/// wait for a worker's safety net (a farm with more retries waiting than
/// this is busy enough that freed slots look anyway).
const MAX_RETRY_TIMES: usize = 10_000;

/// Delay before the next attempt after `attempt` failed: the retry
/// back-off, doubling from `retry_backoff_ms` up to `retry_backoff_max_ms`.
pub fn backoff(config: &Config, attempt: i64) -> chrono::Duration {
    let base = config.dispatch.retry_backoff_ms as f64;
    let ms = (base * 2f64.powi((attempt - 1).clamp(0, 30) as i32))
        .min(config.dispatch.retry_backoff_max_ms as f64);
    chrono::Duration::milliseconds(ms as i64)
}

impl Farm {
    /// Starts a worker and a monitor for every configured backend, on
    /// `tasks`; they stop when `stop` is cancelled.
    pub async fn start(
        store: Store,
        config: Arc<Config>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Farm, StoreError> {
        let released = store.release_unconfigured().await?;
        if released > 0 {
            tracing::warn!(
                released,
                "jobs held by backends no longer configured were queued again"
            );
        }
        let timeout = Duration::from_millis(config.dispatch.request_timeout_ms);
        let limits = Limits {
            max_reply_bytes: config.limits.max_backend_reply_bytes,
            max_output_bytes: config.limits.max_output_bytes,
        };
        let connections = crate::comfy::Connections::new(timeout);
        let mut commands = HashMap::new();
        let mut clients = HashMap::new();
        let mut receivers = Vec::new();
        for b in &config.backends {
            let (tx, rx) = mpsc::channel(64);
            commands.insert(b.id.clone(), tx);
            let backend = store
                .backend(&b.id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("backend `{}`", b.id)))?;
            // Checked when the config was read (a config built in code
            // that was not checked sends none).
            let headers = b.header_map().unwrap_or_default();
            let client = ComfyClient::sharing(
                &connections,
                &b.base_url(),
                headers,
                &backend.client_id,
                limits,
            );
            clients.insert(b.id.clone(), client.clone());
            receivers.push((b.clone(), rx, client));
        }
        let shared = Arc::new(Shared {
            store: store.clone(),
            outputs_dir: config.outputs_dir(),
            inputs_dir: config.inputs_dir(),
            config: config.clone(),
            wake: watch::channel(0u64).0,
            stop: stop.clone(),
            commands,
            progress: Mutex::new(HashMap::new()),
            foreign: Mutex::new(HashMap::new()),
            disk_waits: Mutex::new(HashMap::new()),
            previews: tokio::sync::broadcast::channel(64).0,
            due: DueTimes::default(),
            inventories: std::sync::RwLock::new(
                store
                    .inventories()
                    .await?
                    .into_iter()
                    .map(|(id, inv)| (id, Arc::new(inv)))
                    .collect(),
            ),
            distinct_kept: Mutex::new(None),
            rules: Arc::new(Rules::new(&config.inventory.exempt)),
            clients,
            idle: idle::IdleWorkers::new(
                config
                    .backends
                    .iter()
                    .map(|b| (b.id.as_str(), b.tags.as_slice())),
            ),
            epoch: tokio::time::Instant::now(),
            glances: Default::default(),
            health: health::Health::new(
                config.dispatch.quarantine_after,
                chrono::Duration::seconds(config.dispatch.quarantine_s as i64),
            ),
            batches: batches::BadBatches::new(
                config.dispatch.pause_batch_after,
                &config.dispatch.batch_field,
                config.backends.len(),
            ),
        });
        // Jobs queued before this start have no ring. Each worker looks once
        // as it starts, but one that starts full (its prompts outlived the
        // restart) must look when a slot frees, not wait for its safety
        // net: freed slots look until a look finds nothing due.
        shared.idle.opened();
        // Quarantines in force when the service stopped go on to their end.
        for (id, until, reason) in store.quarantines_in_force().await? {
            if !shared.clients.contains_key(&id) {
                continue;
            }
            tracing::info!(backend_id = %id, %until, "backend still in quarantine: {reason}");
            shared
                .health
                .restore(&id, health::Quarantine { until, reason });
            shared.wake_at_quarantine_end(&id, until);
        }
        // Batches held when the service stopped stay held, unless the
        // config no longer holds batches (`pause_batch_after: 0`) or names
        // them by another field: such a hold would go on pausing the
        // batch's new jobs, or warn, with nothing to lift it but a resume.
        // It ends; the jobs it paused stay paused, each a user's to resume.
        for hold in store.held_batches().await? {
            if shared.batches.reads(&hold) {
                continue;
            }
            if store.release_batch(&hold.field, &hold.batch).await? {
                tracing::warn!(batch = %hold.batch, field = %hold.field, "the batch's hold ends: {} (its paused jobs stay paused: orchestrator jobs --ids --paused -m {}={} | orchestrator resume -)", shared.batches.why_not_read(), hold.field, hold.batch);
            }
        }
        for hold in shared.batches.holds(&store).await? {
            tracing::info!(batch = %hold.batch, cause = %hold.cause, "batch still held: its new jobs are stored paused");
        }
        // Retries waiting out a back-off across the restart: woken when
        // each falls due, as the attempt that failed them would have.
        for at in store.retry_times(MAX_RETRY_TIMES).await? {
            shared.wake_at(at, None);
        }
        tasks.spawn(wake_when_due(shared.clone()));
        tasks.spawn(hours::keep(shared.clone()));
        let interval = Duration::from_millis(config.monitor.poll_interval_ms);
        for (i, (b, rx, client)) in receivers.into_iter().enumerate() {
            let slot = i as u32 % SLOTS;
            let (informed, id) = (shared.clone(), b.id.clone());
            // Its state concerns its own worker only: one bell, not a
            // farm-wide wake (a thousand backends coming up at once made a
            // million lease attempts).
            let bell = shared.idle.bell(&b.id);
            let pulse = Arc::new(crate::monitor::Pulse::default());
            tasks.spawn(crate::monitor::run(
                store.clone(),
                b.id.clone(),
                client.clone(),
                crate::monitor::Timing {
                    interval,
                    start: shared.epoch + interval * slot / SLOTS,
                    inventory_every: Duration::from_secs(config.inventory.refresh_interval_s),
                    socket_fresh: Duration::from_millis(config.dispatch.heartbeat_ms * 2),
                },
                stop.clone(),
                crate::monitor::Hooks {
                    on_change: Box::new(move || bell.notify_one()),
                    on_inventory: Box::new(move |inv| informed.set_inventory(&id, inv)),
                    pulse: pulse.clone(),
                },
            ));
            let worker = worker::Worker::new(shared.clone(), b.id.clone(), client, &b, pulse, slot);
            tasks.spawn(worker.run(rx));
        }
        Ok(Farm { shared })
    }

    /// Wakes every worker: a backend changed, or jobs were queued again.
    pub fn wake(&self) {
        self.shared.wake();
    }

    /// A backend's admin state changed: its own worker looks again (the
    /// others are not concerned; a thousand of them woken per change made
    /// disabling a large farm cost a million lease reads).
    pub fn backend_changed(&self, backend_id: &str) {
        self.shared.idle.bell(backend_id).notify_one();
    }

    /// A job needing `requires` was queued: one waiting worker that may
    /// run it is woken (busy ones lease when a slot frees).
    pub fn job_queued(&self, requires: &[String]) {
        self.shared.idle.ring_for(requires);
    }

    /// A job was queued to start at `at` (its `start_after`): the workers
    /// look then, as at a retry's back-off's end.
    pub fn job_due_at(&self, at: chrono::DateTime<chrono::Utc>) {
        self.shared.wake_at(at, None);
    }

    /// Cancels a job: at once if queued, through its backend if held.
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let outcome = self.shared.store.request_cancel(job_id).await?;
        if let CancelOutcome::Requested { backend_id } = &outcome {
            self.ask_to_stop(job_id, backend_id);
        }
        Ok(outcome)
    }

    /// Pauses or resumes a job (see [`Store::set_paused`]): one a backend
    /// holds, paused with `interrupt`, is stopped through it; one resumed
    /// into the queue rings a worker that may run it.
    pub async fn set_paused(
        &self,
        job_id: &str,
        paused: bool,
        interrupt: bool,
    ) -> Result<PauseChange, StoreError> {
        let change = self
            .shared
            .store
            .set_paused(job_id, paused, interrupt)
            .await?;
        if change.was_paused != paused {
            if let Some(backend_id) = &change.stopping {
                self.ask_to_stop(job_id, backend_id);
            } else if !paused && change.status == JobStatus::Queued {
                self.job_queued(&change.requires);
            }
        }
        Ok(change)
    }

    /// Tells `backend_id`'s worker that a user asked it to stop `job_id`.
    fn ask_to_stop(&self, job_id: &str, backend_id: &str) {
        if let Some(tx) = self.shared.commands.get(backend_id) {
            // A full mailbox is fine: the worker's next reconcile sees the flag.
            if let Err(e) = tx.try_send(Command::Stop(job_id.to_string())) {
                tracing::debug!(job_id, backend_id, error = %e, "stop left to the next reconcile");
            }
        }
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

    /// Prompts in each backend's ComfyUI queue that this orchestrator did
    /// not send (an artist's, queued from ComfyUI's own page), as its
    /// worker last heard, for the backends that have any: they take the
    /// backend's slots as ours do.
    pub fn prompts_not_ours(&self) -> HashMap<String, usize> {
        self.shared.foreign.lock().expect("foreign").clone()
    }

    /// Prompts of each backend (those that have any) that finished and
    /// wait for space on the data folder's disk to save their outputs:
    /// they hold its slots until space is freed.
    pub fn outputs_waiting_for_disk(&self) -> HashMap<String, usize> {
        self.shared.disk_waits.lock().expect("disk waits").clone()
    }

    /// Backends left out of leasing now because their jobs failed while
    /// the same jobs completed elsewhere (see `dispatch::health`).
    pub fn quarantined(&self) -> HashMap<String, Quarantine> {
        self.shared.health.all()
    }

    /// What a queued job's page needs of the running farm to say why it
    /// waits: prompts not ours, prompts waiting for disk space, and
    /// quarantines in a sentence each.
    pub fn live_backends(&self) -> crate::store::LiveBackends {
        crate::store::LiveBackends {
            not_ours: self.prompts_not_ours(),
            waiting_for_disk: self.outputs_waiting_for_disk(),
            quarantined: self
                .quarantined()
                .into_iter()
                .map(|(id, q)| {
                    let until = q.until.format("%Y-%m-%d %H:%M:%S UTC");
                    (id, format!("until {until} ({})", q.reason))
                })
                .collect(),
        }
    }

    /// An operator vouches for a backend: its quarantine, if any, ends now,
    /// with an event saying so, and its worker looks for work.
    pub async fn lift_quarantine(&self, backend_id: &str) {
        if self.shared.health.lift(backend_id) {
            tracing::info!(backend_id, "quarantine lifted by an operator");
            let message =
                format!("backend {backend_id} may take jobs again: an operator enabled it");
            let data = serde_json::json!({"by": "operator"});
            self.shared
                .quarantine_event(backend_id, "backend_quarantine_lifted", &message, data)
                .await;
        }
        self.backend_changed(backend_id);
    }

    /// Live previews of running jobs (lagging receivers miss frames, nothing else).
    pub fn subscribe_previews(&self) -> tokio::sync::broadcast::Receiver<Preview> {
        self.shared.previews.subscribe()
    }

    /// Cancelled when the service stops (for other background tasks and streams).
    pub fn stop_token(&self) -> CancellationToken {
        self.shared.stop.clone()
    }
}

#[cfg(test)]
mod tests;
