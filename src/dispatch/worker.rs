//! The per-backend worker: keeps the backend's WebSocket alive and heard,
//! leases jobs while the backend has free slots, follows what it submitted,
//! and hands each prompt's steps to helper tasks.
//!
//! Why it watches its socket so closely: ComfyUI sends a prompt's messages
//! only to the socket registered for our client id, keeps no backlog, and
//! forgets that registration when *any* socket with the id closes (even an
//! old one of ours, after the new one is up), or a NAT drops the connection
//! silently. So the worker pings ([`crate::config::DispatchConfig::heartbeat_ms`]),
//! confirms after each connect that the new socket is the registered one
//! (ComfyUI answers our `feature_flags` through its registration), expects a
//! `status` broadcast after each submit, and reconnects when any of these
//! stays silent. A backend that answers nothing is down from its first
//! silence; past the grace period its jobs go elsewhere.
//!
//! Why one file of some 580 lines: the loop and the socket's watch are one
//! concern (they share the worker's state and its one `select!`); what
//! stands alone lives beside it: filling free slots (`fill.rs`), what each
//! socket message means for the prompts followed (`heard.rs`), one attempt
//! (`attempt.rs`), the socket (`link.rs`), the phases (`phase.rs`),
//! progress (`progress.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::attempt::{Ctx, Held, Report, FINISH_TRIES};
use super::fill::Wake;
use super::link::{Check, Link};
use super::phase::{Phase, Signal};
use super::progress::{NodeTypes, ProgressBook, PROGRESS_EVERY};
use super::{Command, Shared};
use crate::comfy::{ComfyClient, WsEvent};
use crate::config::BackendConfig;

/// A prompt the worker follows.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    pub(super) held: Held,
    pub(super) phase: Phase,
    /// Longest the run may take.
    pub(super) limit: Duration,
    /// When its submit was sent (a `status` broadcast must follow it).
    pub(super) sent: Instant,
    /// Its graph's node types: progress names the node by its type.
    pub(super) nodes: Arc<NodeTypes>,
    /// It finished, and its outputs wait for space on the data folder's
    /// disk (its job's log says so once).
    pub(super) waits_for_disk: bool,
}

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) id: String,
    pub(super) client: ComfyClient,
    pub(super) max_inflight: usize,
    pub(super) tracked: HashMap<String, Tracked>,
    pub(super) helpers: JoinSet<Report>,
    pub(super) progress: ProgressBook,
    /// The prompt running on the backend now: previews without a prompt id belong to it.
    pub(super) running: Option<String>,
    /// Something is in doubt: ask the backend now rather than at the next round.
    pub(super) reconcile_soon: bool,
    /// Ask the backend again at this time (a submit in doubt).
    reconcile_at: Option<Instant>,
    /// Failed tries to collect each finished prompt.
    pub(super) finish_failures: HashMap<String, u32>,
    pub(super) link: Link,
    /// A prompt given up on still runs there (a hung node): lease nothing.
    pub(super) stuck: bool,
    /// Inputs uploaded since the last connect (a reconnect may be a restart).
    uploaded: Arc<std::sync::Mutex<HashMap<String, String>>>,
    /// Heard when the prompt leased last here has been posted (or will
    /// never be): the next one posts after it (see [`super::attempt::Turn`]).
    pub(super) last_post: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What the socket tells this backend's monitor.
    pub(super) pulse: Arc<crate::monitor::Pulse>,
    /// Its place among the farm's timer slots (`super::SLOTS`).
    slot: u32,
    /// Prompts in the backend's queue that are not ours (an artist's,
    /// queued from ComfyUI's own page), from its last `status`: they take
    /// its slots as ours do.
    pub(super) foreign: usize,
    /// Fewer of them since the worker last looked: a slot may have freed.
    pub(super) foreign_freed: bool,
    /// Its prompts whose outputs wait for disk space, as last shown.
    pub(super) disk_waits: usize,
    /// The largest upload it takes, as last recorded.
    pub(super) upload_limit: Option<i64>,
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: String,
        client: ComfyClient,
        config: &BackendConfig,
        pulse: Arc<crate::monitor::Pulse>,
        slot: u32,
    ) -> Worker {
        Worker {
            progress: ProgressBook::new(shared.clone()),
            shared,
            id,
            client,
            max_inflight: config.max_inflight as usize,
            tracked: HashMap::new(),
            helpers: JoinSet::new(),
            running: None,
            reconcile_soon: false,
            reconcile_at: None,
            finish_failures: HashMap::new(),
            link: Link::new(),
            stuck: false,
            uploaded: Arc::default(),
            last_post: None,
            pulse,
            slot,
            foreign: 0,
            foreign_freed: false,
            disk_waits: 0,
            upload_limit: None,
        }
    }

    /// Slots taken on the backend: our prompts and those not ours.
    pub(super) fn slots_taken(&self) -> usize {
        self.tracked.len() + self.foreign
    }

    pub(super) fn ctx(&self) -> Ctx {
        Ctx {
            shared: self.shared.clone(),
            backend_id: self.id.clone(),
            client: self.client.clone(),
            uploaded: self.uploaded.clone(),
        }
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.shared.config.dispatch.heartbeat_ms)
    }

    /// How long a job may run here: its own limit (from its manifest or
    /// template), else `dispatch.job_timeout_s`.
    pub(super) fn run_limit(&self, timeout_s: Option<i64>) -> Duration {
        Duration::from_secs(
            timeout_s
                .map(|s| s as u64)
                .unwrap_or(self.shared.config.dispatch.job_timeout_s),
        )
    }

    pub(super) fn deaf_after(&self) -> Duration {
        Duration::from_millis(self.shared.config.dispatch.deaf_after_ms)
    }

    /// Runs until the service stops; then its helpers are stopped too
    /// (prompts stay on the backend; the next start re-attaches to them).
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let stop = self.shared.stop.clone();
        let mut broadcast = self.shared.wake.subscribe();
        let bell = self.shared.idle.bell(&self.id);
        let poll = Duration::from_millis(self.shared.config.dispatch.poll_interval_ms);
        // Ticks in this worker's slot of the period, with the other workers
        // of that slot (one wake for all of them), and kept on that grid.
        let period = poll.min(self.heartbeat());
        let first = self.shared.epoch + period * self.slot / super::SLOTS;
        let mut tick = tokio::time::interval_at(first, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut flush = tokio::time::interval(PROGRESS_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_round = Instant::now();
        let mut last_fill = Instant::now();
        // Lease only when something may have changed, not on every progress message.
        let mut wake = Some(Wake::Always);
        // This future lives as long as the service and is as large as its
        // largest await: the large steps are boxed (18 KB a worker inline).
        while !stop.is_cancelled() {
            if self.take_reports() || std::mem::take(&mut self.foreign_freed) {
                wake = wake.max(Some(Wake::SlotFreed));
            }
            self.note_disk_waits();
            if self.link.stream.is_none() && !Box::pin(self.connect()).await {
                self.shared.idle.busy(&self.id);
                let (since, delay) = self.link.connect_failed();
                tracing::debug!(backend_id = %self.id, down_for_ms = since.elapsed().as_millis() as u64, "backend unreachable");
                self.take_back_if_past_grace().await;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                    Some(cmd) = commands.recv() => Box::pin(self.on_command(cmd)).await,
                    Some(r) = self.helpers.join_next(), if !self.helpers.is_empty() => self.on_joined(r),
                }
                continue;
            }
            if self.reconcile_soon {
                self.reconcile_soon = false;
                Box::pin(self.reconcile()).await;
                wake = Some(Wake::Always);
            }
            if let Some(why) = wake.take() {
                self.fill(why).await;
                if why == Wake::Always {
                    last_fill = Instant::now();
                }
            }
            let Some(stream) = self.link.stream.as_mut() else {
                continue;
            };
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => Box::pin(self.on_event(ev)).await,
                    Some(Err(e)) => Box::pin(self.lost_link(&format!("its socket broke: {e}"))).await,
                    None => Box::pin(self.lost_link("it closed its socket")).await,
                },
                Some(r) = self.helpers.join_next(), if !self.helpers.is_empty() => {
                    self.on_joined(r);
                    wake = wake.max(Some(Wake::SlotFreed));
                }
                Some(cmd) = commands.recv() => Box::pin(self.on_command(cmd)).await,
                _ = broadcast.changed() => wake = Some(Wake::Always),
                _ = bell.notified() => wake = Some(Wake::Always),
                _ = flush.tick(), if self.progress.has_pending() => self.progress.flush().await,
                at = tick.tick() => {
                    // Safety nets only (queued jobs ring a waiting worker;
                    // a connect reconciles), so rarer for a worker holding
                    // nothing, and skipped when the farm's glance (read
                    // once for this slot's workers) says they would find
                    // nothing: on a large farm these reads were most of
                    // an idle orchestrator's database work.
                    let idle = self.tracked.is_empty() && !self.stuck;
                    let net = if self.tracked.is_empty() { poll * 15 } else { poll * 5 };
                    let (look_due, round_due) = (last_fill.elapsed() >= net, last_round.elapsed() >= net);
                    let glance = if look_due || round_due {
                        self.shared.glances.for_tick(at, &self.shared.store).await
                    } else {
                        None
                    };
                    let nets = super::glance::nets(&self.id, look_due, round_due, idle, glance.as_deref());
                    if nets.look {
                        wake = Some(Wake::Always);
                    } else if look_due {
                        last_fill = Instant::now();
                    }
                    Box::pin(self.check_health()).await;
                    self.check_timeouts().await;
                    // Ask the backend now and then about anything missed.
                    let due = self.reconcile_at.is_some_and(|t| Instant::now() >= t);
                    if due || nets.reconcile {
                        self.reconcile_at = None;
                        Box::pin(self.reconcile()).await;
                        // Paced from its end: a backend that answers
                        // slowly is not asked again at once, and the
                        // worker hears its socket and helpers between.
                        last_round = Instant::now();
                    } else if round_due {
                        last_round = Instant::now();
                    }
                }
                _ = stop.cancelled() => {}
            }
        }
        self.helpers.abort_all();
        while self.helpers.join_next().await.is_some() {}
        tracing::debug!(backend_id = %self.id, "worker stopped");
    }

    /// Opens the socket (the old one is closed first) and asks it to prove
    /// it is heard; then asks the backend about everything it holds.
    /// `false` when the backend cannot be reached.
    async fn connect(&mut self) -> bool {
        match self.client.connect().await {
            Ok(mut stream) => {
                if let Err(e) = stream.probe().await {
                    tracing::debug!(backend_id = %self.id, error = %e, "cannot send feature_flags");
                }
                tracing::info!(backend_id = %self.id, "connected to backend");
                self.link.connected(stream, self.deaf_after());
                self.pulse.socket_changed();
                // It may have restarted empty: inputs are uploaded again.
                self.uploaded.lock().expect("uploads").clear();
                self.reconcile().await;
                true
            }
            Err(e) => {
                tracing::debug!(backend_id = %self.id, error = %e, "cannot connect to the backend");
                false
            }
        }
    }

    /// Past the grace period of a silent backend, its jobs go elsewhere.
    async fn take_back_if_past_grace(&mut self) {
        let grace = Duration::from_secs(self.shared.config.dispatch.backend_grace_s);
        if self.link.past_grace(grace) {
            let reason = format!(
                "backend {} has not answered for {} s (grace period)",
                self.id,
                grace.as_secs()
            );
            self.take_back_all(&reason).await;
        }
    }

    /// The socket is gone or unheard: drop it (closing it first) and reconnect.
    async fn lost_link(&mut self, why: &str) {
        tracing::warn!(backend_id = %self.id, "reconnecting to the backend: {why}");
        self.link.down_since.get_or_insert_with(Instant::now);
        self.pulse.socket_changed();
        // Unknown until the backend's next `status` (sent at each connect);
        // no slot freed for that.
        self.note_foreign(0);
        self.foreign_freed = false;
        if let Some(old) = self.link.stream.take() {
            // ComfyUI forgets our registration when an old socket ends:
            // the old one must be gone before the new one opens.
            old.close(Duration::from_secs(1)).await;
        }
        self.running = None;
    }

    /// Pings, and reconnects a socket that does not answer or is not heard.
    async fn check_health(&mut self) {
        let heartbeat = self.heartbeat();
        let mut check = self.link.check(heartbeat);
        if !matches!(check, Check::Fine | Check::Ping) {
            // A pong or a message that waited while this worker was busy
            // elsewhere (a slow store write, a reconcile waiting on the
            // backend) is not silence: judge with them read.
            self.read_waiting().await;
            if self.link.stream.is_none() {
                return;
            }
            check = self.link.check(heartbeat);
        }
        match check {
            Check::Fine => {}
            Check::Ping => {
                self.link.pinged();
                if let Some(stream) = self.link.stream.as_mut() {
                    if let Err(e) = stream.ping().await {
                        self.lost_link(&format!("cannot ping: {e}")).await;
                    }
                }
            }
            Check::Dead(since) => {
                let why = format!("no answer to a ping for {} ms", heartbeat.as_millis() * 2);
                self.lost_link(&why).await;
                // Down from the first unanswered ping, not from the reconnect.
                self.link.down_since = Some(since);
            }
            Check::Unconfirmed => {
                self.deaf("a new socket was not confirmed as the one ComfyUI sends to")
                    .await
            }
            Check::Unheard => self.deaf("no message followed an accepted submit").await,
        }
    }

    /// The socket is open but ComfyUI sends our messages elsewhere (or
    /// nowhere): reconnect, and tell the jobs that were running.
    pub(super) async fn deaf(&mut self, why: &str) {
        let message = format!(
            "the orchestrator stopped hearing backend {} ({why}); reconnected, the job is followed again",
            self.id
        );
        for t in self.tracked.values() {
            if let Err(e) = self
                .shared
                .store
                .note_event(
                    &t.held.job_id,
                    "backend_socket_deaf",
                    &self.id,
                    message.clone(),
                    None,
                )
                .await
            {
                tracing::debug!(job_id = %t.held.job_id, backend_id = %self.id, error = %e, "cannot note the deaf socket");
            }
        }
        self.lost_link(why).await;
        self.link.down_since = None;
    }

    /// Handles every frame that has already arrived on the socket, without
    /// waiting for more. `true` when one was a message (a pong proves the
    /// connection only) or the socket turned out closed (then it is
    /// already dealt with).
    pub(super) async fn read_waiting(&mut self) -> bool {
        use futures::FutureExt;
        let mut heard = false;
        loop {
            let Some(stream) = self.link.stream.as_mut() else {
                return heard;
            };
            // Unconstrained: "nothing has arrived" must be the socket's
            // answer, not the task's spent budget (which makes a ready
            // read look pending), or a late message could be judged missing.
            match tokio::task::coop::unconstrained(stream.next()).now_or_never() {
                None => return heard,
                Some(Some(Ok(ev))) => {
                    heard |= ev != WsEvent::Pong;
                    self.on_event(ev).await;
                }
                Some(Some(Err(e))) => {
                    self.lost_link(&format!("its socket broke: {e}")).await;
                    return true;
                }
                Some(None) => {
                    self.lost_link("it closed its socket").await;
                    return true;
                }
            }
        }
    }

    /// Asks the backend again no later than `at`.
    pub(super) fn ask_at(&mut self, at: Instant) {
        self.reconcile_at = Some(self.reconcile_at.map_or(at, |t| t.min(at)));
    }

    /// Applies `signal` to a followed prompt; the new phase if it changed.
    pub(super) fn signal(&mut self, pid: &str, signal: Signal) -> Option<Phase> {
        let t = self.tracked.get_mut(pid)?;
        let next = t.phase.on(signal)?;
        t.phase = next;
        Some(next)
    }

    /// Starts the finish of a prompt that ended.
    pub(super) fn spawn_finish(&mut self, pid: &str) {
        if let Some(t) = self.tracked.get(pid) {
            let told = t.waits_for_disk;
            self.helpers.spawn(self.ctx().finish(t.held.clone(), told));
        }
    }

    /// Starts the cancel of a followed prompt.
    pub(super) fn spawn_cancel(&mut self, pid: &str) {
        if let Some(t) = self.tracked.get(pid) {
            self.helpers.spawn(self.ctx().cancel(t.held.clone()));
        }
    }

    /// Takes the reports of the helpers that have ended; `true` if any.
    ///
    /// Why before every turn of the loop rather than only through its
    /// `select!`: a backend whose `/queue` answers slowly keeps the safety
    /// net's tick due after every round, and the `select!` was seen to pick
    /// that tick for half a minute while a finished job's report waited, so
    /// the freed slot took no job. Taking them here does not depend on which
    /// ready branch the `select!` picks.
    fn take_reports(&mut self) -> bool {
        let mut any = false;
        while let Some(joined) = self.helpers.try_join_next() {
            self.on_joined(joined);
            any = true;
        }
        any
    }

    fn on_joined(&mut self, joined: Result<Report, tokio::task::JoinError>) {
        match joined {
            Ok(report) => self.on_report(report),
            // A helper that panicked leaves its prompt to the next reconcile.
            Err(e) if e.is_panic() => {
                tracing::error!(backend_id = %self.id, error = %e, "a dispatch helper panicked");
                self.reconcile_soon = true;
            }
            Err(_) => {}
        }
    }

    fn on_report(&mut self, r: Report) {
        match r {
            Report::Accepted(pid) => {
                if self.signal(&pid, Signal::Accepted).is_some() {
                    let sent = self.tracked[&pid].sent;
                    self.link.expect_after(sent, self.deaf_after());
                }
            }
            Report::AcceptedCancelled(pid) => {
                self.signal(&pid, Signal::Accepted);
                if self.signal(&pid, Signal::CancelRequested).is_some() {
                    self.spawn_cancel(&pid);
                }
            }
            Report::NoAnswer(pid) => {
                self.signal(&pid, Signal::NoAnswer);
                // Ask the backend now rather than at the next safety-net round.
                self.reconcile_soon = true;
            }
            Report::Done(pid) => {
                self.finish_failures.remove(&pid);
                if let Some(t) = self.tracked.remove(&pid) {
                    self.progress.forget(&t.held.job_id);
                }
            }
            Report::Deferred(pid, why) if why.is_disk_full() => {
                // The orchestrator's disk, not the box nor the job: the
                // prompt stays on the box (its history too) and is
                // collected once space is freed, its tries not counted.
                if self.signal(&pid, Signal::FinishDeferred).is_none() {
                    self.reconcile_soon = true;
                } else if let Some(t) = self.tracked.get_mut(&pid) {
                    t.waits_for_disk = true;
                }
            }
            Report::Deferred(pid, why) => {
                let tries = {
                    let n = self.finish_failures.entry(pid.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if self.signal(&pid, Signal::FinishDeferred).is_none() {
                    // Not a finish (a cancel or time-out that could not be recorded): ask again.
                    self.reconcile_soon = true;
                    return;
                }
                if tries >= FINISH_TRIES {
                    // The backend keeps the prompt but its outputs cannot be had.
                    self.finish_failures.remove(&pid);
                    self.signal(&pid, Signal::Ended);
                    let held = self.tracked[&pid].held.clone();
                    self.helpers.spawn(self.ctx().uncollectable(held, why));
                }
            }
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Stop(job_id) => {
                let pid = self
                    .tracked
                    .iter()
                    .find(|(_, t)| t.held.job_id == job_id)
                    .map(|(p, _)| p.clone());
                match pid {
                    // Not followed right now: reconcile picks the flag up.
                    None => self.reconcile().await,
                    Some(pid) => {
                        if self.signal(&pid, Signal::CancelRequested).is_some() {
                            self.spawn_cancel(&pid);
                        }
                    }
                }
            }
        }
    }

    /// Fails prompts that ran past their limit, and takes back what waits
    /// behind them (a hung prompt blocks the backend's queue).
    async fn check_timeouts(&mut self) {
        let expired: Vec<(String, Held, Duration)> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.phase.overdue(t.limit))
            .map(|(pid, t)| (pid.clone(), t.held.clone(), t.limit))
            .collect();
        for (pid, held, limit) in expired {
            // A hung node ignores interrupts: the prompt goes on the cleanup
            // list now, and the backend takes nothing new while it still runs.
            let reason = format!("ran past its {} s limit", limit.as_secs());
            let entry = self.ctx().cleanup_entry(&held, reason);
            if let Err(e) = self.shared.store.add_cleanup(entry).await {
                tracing::error!(job_id = %held.job_id, backend_id = %self.id, error = %e, "cannot put the timed-out prompt on the cleanup list; will try again");
                continue;
            }
            self.stuck = true;
            // The helper owns the prompt now, as for a cancel.
            self.signal(&pid, Signal::CancelRequested);
            self.helpers.spawn(self.ctx().time_out(held.clone(), limit));
            let waiting: Vec<Held> = self
                .tracked
                .values()
                .filter(|t| matches!(t.phase, Phase::Queued | Phase::InDoubt(_)))
                .map(|t| t.held.clone())
                .collect();
            for w in waiting {
                let reason = format!(
                    "it waited behind job {} on backend {}, which ran past its {} s limit",
                    held.job_id,
                    self.id,
                    limit.as_secs()
                );
                self.give_back(&w, reason, true).await;
            }
        }
    }
}
