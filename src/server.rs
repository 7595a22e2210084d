//! Start-up, serving and graceful stop of the whole service.
//!
//! Why a function that takes a bound listener and a shutdown future: `main`
//! and the tests run exactly the same code; tests bind `127.0.0.1:0` and stop
//! the service by resolving the future.

use std::fs::File;
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::dispatch::Farm;
use crate::store::{BackendUpsert, Store};
use crate::workflows::Catalog;

/// Holds the data folder's lock for as long as it lives.
///
/// Why: two orchestrators on one data folder would both lease the same jobs
/// to backends; the second one must refuse to start and say so.
pub struct DataLock {
    _file: File,
}

impl DataLock {
    /// Takes the lock of `data_dir`, creating the folder if needed.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataLock> {
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
            Ok(()) => Ok(DataLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another orchestrator is already running on data folder {} (its lock file {} is held); \
                 stop it first or give this one another --data-dir",
                data_dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// A started service, before it serves: everything that start-up can fail on
/// has been checked.
pub struct Service {
    state: AppState,
    _lock: DataLock,
}

impl Service {
    /// Locks the data folder, opens and migrates the database, loads the
    /// templates and mirrors the configured backends.
    pub async fn start(config: Config) -> anyhow::Result<Service> {
        let lock = DataLock::acquire(&config.data_dir)?;
        let loopback = matches!(config.host.as_str(), "127.0.0.1" | "localhost" | "::1");
        if !loopback && config.auth.token.is_none() {
            tracing::warn!(host = %config.host, "listening beyond loopback with no auth.token: anyone on the network can submit and cancel jobs");
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
                        host: b.host.clone(),
                        port: b.port,
                        enabled: b.enabled,
                        tags: b.tags.clone(),
                        max_inflight: b.max_inflight,
                    })
                    .collect(),
            )
            .await?;
        let catalog = Arc::new(Catalog::load(&config.workflows_dir));
        let config = Arc::new(config);
        let farm = Farm::start(store.clone(), config.clone()).await?;
        let state = AppState {
            store,
            catalog,
            config,
            started: Instant::now(),
            farm,
        };
        Ok(Service { state, _lock: lock })
    }

    /// The database (for tests and commands).
    pub fn store(&self) -> &crate::store::Store {
        &self.state.store
    }

    /// The farm (for tests).
    pub fn farm(&self) -> &Farm {
        &self.state.farm
    }

    /// Serves on `listener` until `shutdown` resolves, then stops taking
    /// requests, finishes those in flight (bounded by `shutdown_timeout_s`)
    /// and closes the database.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let timeout = Duration::from_secs(self.state.config.shutdown_timeout_s);
        let store = self.state.store.clone();
        let farm = self.state.farm.clone();
        let app = api::app(self.state.clone());
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let inbox = self.state.config.inbox_path().map(|dir| {
            tokio::spawn(crate::inbox::run(
                self.state.clone(),
                dir,
                farm.subscribe_shutdown(),
            ))
        });
        let webhooks = tokio::spawn(crate::webhooks::run(
            self.state.store.clone(),
            self.state.config.clone(),
            farm.subscribe_shutdown(),
        ));
        let stopping_farm = farm.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("stopping: no new requests or leases; finishing requests in flight");
            stopping_farm.signal_stop();
            let _ = stopping_tx.send(());
        });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            result = &mut server => result?,
            _ = async {
                let _ = stopping_rx.await;
                tokio::time::sleep(timeout).await;
            } => {
                tracing::warn!(timeout_s = timeout.as_secs(), "requests still in flight at the shutdown deadline; stopping anyway");
            }
        }
        // Running prompts stay on their backends; the next start re-attaches.
        farm.shutdown(timeout).await;
        if let Some(inbox) = inbox {
            let _ = tokio::time::timeout(timeout, inbox).await;
        }
        let _ = tokio::time::timeout(timeout, webhooks).await;
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

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
