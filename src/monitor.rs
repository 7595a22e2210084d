//! Backend health: polls each backend's `/system_stats` and keeps its state.
//!
//! Why separate from dispatch: health has its own rhythm (a poll every
//! `monitor.poll_interval_ms`) and is what decides whether a backend gets new
//! leases; a backend that stops answering is marked `offline` here, and
//! dispatch takes its jobs back once it has been offline past the grace period.

use std::time::Duration;

use tokio::sync::watch;

use crate::comfy::{parse_version, ComfyClient, ComfyError, MIN_VERSION};
use crate::store::{BackendStats, Store};

/// Polls one backend until `shutdown` turns true. `on_change` is called when
/// the backend comes online or goes offline, so that dispatch reacts at once.
pub async fn run(
    store: Store,
    backend_id: String,
    client: ComfyClient,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    on_change: impl Fn() + Send + 'static,
) {
    let mut was_online: Option<bool> = None;
    loop {
        let online = poll_once(&store, &backend_id, &client).await;
        if was_online != Some(online) {
            on_change();
            was_online = Some(online);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// One poll: records what the backend said. Returns whether it is usable.
pub async fn poll_once(store: &Store, backend_id: &str, client: &ComfyClient) -> bool {
    let result: Result<BackendStats, ComfyError> = async {
        let stats = client.system_stats().await?;
        let queue_remaining = client.queue_remaining().await?;
        Ok(BackendStats {
            comfyui_version: stats.comfyui_version,
            vram_total: stats.vram_total,
            vram_free: stats.vram_free,
            queue_remaining: Some(queue_remaining),
        })
    }
    .await;
    match result {
        Ok(stats) => {
            let too_old = stats
                .comfyui_version
                .as_deref()
                .and_then(parse_version)
                .is_some_and(|v| v < MIN_VERSION);
            if too_old {
                let msg = format!(
                    "ComfyUI {} is older than 0.3.44, which client-chosen prompt ids need; upgrade it",
                    stats.comfyui_version.as_deref().unwrap_or("?")
                );
                tracing::warn!(backend_id, "{msg}");
                let _ = store.backend_offline(backend_id, msg).await;
                return false;
            }
            crate::metrics::backend(backend_id, true, stats.vram_total, stats.vram_free);
            if let Err(e) = store.backend_online(backend_id, stats).await {
                tracing::warn!(backend_id, error = %e, "cannot record backend state");
            }
            true
        }
        Err(e) => {
            tracing::debug!(backend_id, error = %e, "backend poll failed");
            crate::metrics::backend(backend_id, false, None, None);
            let _ = store.backend_offline(backend_id, e.to_string()).await;
            false
        }
    }
}
