//! Start-up, serving and graceful stop of the whole service.
//!
//! Why a function that takes a bound listener and a shutdown future: `main`
//! and the tests run exactly the same code; tests bind `127.0.0.1:0` and stop
//! the service by resolving the future.

use std::fs::File;
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::dispatch::Farm;
use crate::events::EventHub;
use crate::store::{BackendUpsert, Store};
use crate::submit::Submitter;
use crate::workflows::Catalog;

/// Holds the data folder's lock for as long as it lives.
///
/// Why: two orchestrators on one data folder would both lease the same jobs
/// to backends; the second one must refuse to start and say so.
pub struct DataLock {
    _file: File,
}

/// How long start-up asks again for a data folder's lock that is held.
const LOCK_WAIT: Duration = Duration::from_secs(2);

impl DataLock {
    /// Takes the lock of `data_dir`, creating the folder if needed. A lock
    /// held is asked again for a moment before start-up fails: an instance
    /// that is stopping (a service manager's restart) holds it until its
    /// last instant, and a process forked meanwhile (a thumbnailer, a
    /// test's child) holds its copy until it execs.
    pub async fn acquire(data_dir: &Path) -> anyhow::Result<DataLock> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        loop {
            match Self::try_acquire(data_dir)? {
                Some(lock) => return Ok(lock),
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => anyhow::bail!(
                    "another orchestrator is already running on data folder {} (its lock file {} \
                     is held); stop it first or give this one another --data-dir",
                    data_dir.display(),
                    data_dir.join("orchestrator.lock").display()
                ),
            }
        }
    }

    /// The lock, or `None` while another holds it.
    fn try_acquire(data_dir: &Path) -> anyhow::Result<Option<DataLock>> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data folder {}", data_dir.display()))?;
        let path = data_dir.join("orchestrator.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DataLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// A started service, before it serves: everything that start-up can fail on
/// has been checked, and the farm's workers run.
pub struct Service {
    state: AppState,
    /// Every background task (workers, monitors, the event hub, the inbox,
    /// webhooks), so that a stop can wait for all of them, once, bounded.
    tasks: TaskTracker,
    /// Stops every task if the service is dropped without serving.
    stop: DropGuard,
    _lock: DataLock,
}

impl Service {
    /// Locks the data folder, opens and migrates the database, loads the
    /// templates, mirrors the configured backends and starts the farm.
    pub async fn start(config: Config) -> anyhow::Result<Service> {
        let lock = DataLock::acquire(&config.data_dir).await?;
        let loopback = matches!(config.host.as_str(), "127.0.0.1" | "localhost" | "::1");
        if !loopback && config.auth.token.is_none() {
            tracing::warn!(host = %config.host, "listening beyond loopback with no auth.token: anyone on the network can submit and cancel jobs");
        }
        let data_dir = config.data_dir.clone();
        if let Ok(Some(kind)) =
            tokio::task::spawn_blocking(move || crate::retention::network_file_system(&data_dir))
                .await
        {
            tracing::warn!(data_dir = %config.data_dir.display(), kind, "{}", crate::retention::network_warning(kind));
        }
        crate::metrics::init();
        let store = Store::open(&config.database_path(), &config.database).await?;
        store
            .sync_backends(
                config
                    .backends
                    .iter()
                    .map(|b| BackendUpsert {
                        id: b.id.clone(),
                        name: b.name.clone().unwrap_or_else(|| b.id.clone()),
                        host: b.host_port().0,
                        port: b.host_port().1,
                        url: b.base_url(),
                        enabled: b.enabled,
                        tags: b.tags.clone(),
                        max_inflight: b.max_inflight,
                        hours: b.hours().map(|h| h.to_string()),
                        off_hours: b.off_hours(chrono::Local::now().naive_local()),
                    })
                    .collect(),
            )
            .await?;
        let regrouped = store
            .share_farm_by(config.dispatch.share_by.as_deref())
            .await?;
        if regrouped > 0 {
            tracing::info!(
                jobs = regrouped,
                share_by = ?config.dispatch.share_by,
                "the farm's sharing changed: jobs put in their groups again"
            );
        }
        let workflows_dir = config.workflows_dir.clone();
        let catalog =
            Arc::new(tokio::task::spawn_blocking(move || Catalog::load(&workflows_dir)).await?);
        let config = Arc::new(config);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let farm = Farm::start(store.clone(), config.clone(), stop.clone(), &tasks).await?;
        let events = EventHub::start(store.clone(), stop.clone(), &tasks).await?;
        let submitter = Submitter {
            store: store.clone(),
            catalog: catalog.clone(),
            config: config.clone(),
            farm: farm.clone(),
        };
        let inputs = crate::inputs::Inputs::new(
            config.inputs_dir(),
            store.clone(),
            config.limits.max_input_bytes,
        );
        tasks.spawn(crate::farm::sample_queue(store.clone(), stop.clone()));
        tasks.spawn(crate::metrics::upkeep(stop.clone()));
        tasks.spawn(crate::memory::trim_now_and_then(stop.clone()));
        let usage = crate::retention::Usage::default();
        tasks.spawn(crate::retention::run(
            store.clone(),
            inputs.clone(),
            config.clone(),
            usage.clone(),
            stop.clone(),
        ));
        let state = AppState::new(api::Services {
            inbox_waiting: crate::inbox::Waiting::default(),
            usage,
            inputs,
            store,
            catalog,
            config,
            started: Instant::now(),
            farm,
            submitter,
            events,
        });
        Ok(Service {
            state,
            tasks,
            stop: stop.drop_guard(),
            _lock: lock,
        })
    }

    /// The database (for tests and commands).
    pub fn store(&self) -> &crate::store::Store {
        &self.state.store
    }

    /// The farm (for tests).
    pub fn farm(&self) -> &Farm {
        &self.state.farm
    }

    /// Serves on `listener` until `shutdown` resolves; then stops taking
    /// requests and leases, ends live streams, lets requests in flight
    /// finish, stops every background task, and closes the database, all
    /// within `shutdown_timeout_s` in total.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Service {
            state,
            tasks,
            stop,
            _lock,
        } = self;
        let stop = stop.disarm();
        let timeout = Duration::from_secs(state.config.shutdown_timeout_s);
        let store = state.store.clone();
        if let Some(dir) = state.config.inbox_path() {
            let inbox = crate::inbox::Inbox {
                submitter: state.submitter.clone(),
                inputs: state.inputs.clone(),
                waiting: state.inbox_waiting.clone(),
            };
            tasks.spawn(crate::inbox::run(inbox, dir, stop.clone()));
        }
        tasks.spawn(crate::alerts::run(
            state.store.clone(),
            state.events.clone(),
            state.config.clone(),
            stop.clone(),
        ));
        tasks.spawn(crate::webhooks::run(
            state.store.clone(),
            state.events.clone(),
            state.config.clone(),
            stop.clone(),
        ));
        let app = api::app(state);
        let deadline = Arc::new(OnceLock::new());
        let (stopping, set_deadline) = (stop.clone(), deadline.clone());
        // Without TCP_NODELAY a small write (an event frame, a short reply)
        // waits for the previous one's acknowledgement: tens of ms on a
        // live stream that sends two events in a row.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
        });
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("stopping: no new requests or leases; finishing requests in flight");
            let _ = set_deadline.set(tokio::time::Instant::now() + timeout);
            stopping.cancel();
        });
        let mut server = std::pin::pin!(server.into_future());
        let past_deadline = async {
            stop.cancelled().await;
            let at = *deadline.get().expect("set before the stop");
            tokio::time::sleep_until(at).await;
        };
        tokio::select! {
            result = &mut server => result?,
            _ = past_deadline => {
                tracing::warn!(timeout_s = timeout.as_secs(), "requests still in flight at the shutdown deadline; stopping anyway");
            }
        }
        // Running prompts stay on their backends; the next start re-attaches.
        stop.cancel();
        tasks.close();
        let at = deadline
            .get()
            .copied()
            .unwrap_or_else(|| tokio::time::Instant::now() + timeout);
        if tokio::time::timeout_at(at, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks did not stop by the shutdown deadline");
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Starts and serves until `shutdown`: what `orchestrator serve` runs.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Service::start(config)
        .await?
        .serve(listener, shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are in place when this
/// returns, not when the future is first polled: a stop sent right after
/// the "listening" line (a service manager, a test) is a graceful stop,
/// not the signal's default, immediate death. Call it within the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        // A signal whose handler could not be installed never comes.
        async fn next(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                _ = next(&mut term) => {},
                _ = next(&mut int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The log files' names in `log_dir`, before their day's date.
pub const LOG_FILE: &str = "orchestrator.log";

/// Logs to stderr, and to a daily file in `log_dir` when the config sets
/// one (the guard keeps that file's writer: hold it while the service
/// runs; `retention.logs_days` has the old files deleted). `RUST_LOG`
/// overrides the levels. An error when the log folder cannot be made or
/// written.
pub fn init_logging(
    config: &Config,
) -> anyhow::Result<Option<tracing_appender::non_blocking::WorkerGuard>> {
    // refinery logs each migration it applies, as the store does with its
    // name: once is enough (a first start would print 32 lines of them).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,refinery_core=warn"));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match &config.log_dir {
        Some(dir) => {
            // The files keep the names `rolling::daily` gave them
            // (`orchestrator.log.2026-12-07`), which tools may follow.
            let appender = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(LOG_FILE)
                .build(dir)
                .map_err(|e| anyhow::anyhow!("log_dir {}: {e}", dir.display()))?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let file = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer);
            tracing_subscriber::registry()
                .with(filter)
                .with(stderr)
                .with(file)
                .init();
            Ok(Some(guard))
        }
        None => {
            tracing_subscriber::registry()
                .with(filter)
                .with(stderr)
                .init();
            Ok(None)
        }
    }
}
