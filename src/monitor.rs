//! Backend health: polls each backend's `/system_stats` and keeps its state.
//!
//! Why separate from dispatch: health has its own rhythm (a poll every
//! `monitor.poll_interval_ms`) and is what decides whether a backend gets new
//! leases: one that stops answering is `offline`, one too old to be driven
//! safely is `incompatible` (with the reason in `last_error`); dispatch takes
//! a silent backend's jobs back once it has been silent past the grace period.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::comfy::{version_problem, ComfyClient, ComfyError};
use crate::inventory::Inventory;
use crate::store::{BackendStats, Store};

/// What a monitor calls back with.
pub struct Hooks {
    /// The backend became usable, or stopped being so: dispatch reacts at once.
    pub on_change: Box<dyn Fn() + Send>,
    /// A new inventory was read and stored.
    pub on_inventory: Box<dyn Fn(Inventory) + Send>,
}

/// Polls one backend until `stop`, and reads its inventory when it first
/// answers, when its version changes, when it comes back, and every
/// `inventory_every`.
///
/// A backend that comes up has its inventory read before it is recorded
/// online, so the first lease it gets is already checked against what it
/// can run (jobs accepted while the whole farm was unknown included).
pub async fn run(
    store: Store,
    backend_id: String,
    client: ComfyClient,
    interval: Duration,
    inventory_every: Duration,
    stop: CancellationToken,
    hooks: Hooks,
) {
    let mut was_usable: Option<bool> = None;
    let mut version: Option<String> = None;
    let mut inventory_at: Option<tokio::time::Instant> = None;
    loop {
        let probed = probe(&client).await;
        let usable = matches!(&probed, Ok(stats) if version_problem(stats.comfyui_version.as_deref()).is_none());
        let now_version = probed.as_ref().ok().and_then(|s| s.comfyui_version.clone());
        if usable && was_usable != Some(true) {
            // Back (or new): what it can run may have changed.
            inventory_at = None;
        }
        if usable
            && (now_version != version
                || inventory_at.is_none_or(|t| t.elapsed() >= inventory_every))
        {
            version = now_version;
            match crate::inventory::refresh(&store, &client, &backend_id, version.clone()).await {
                Ok(inv) => {
                    inventory_at = Some(tokio::time::Instant::now());
                    (hooks.on_inventory)(inv);
                }
                Err(e) => {
                    tracing::warn!(backend_id, error = %e, "cannot read the backend's inventory; will try again")
                }
            }
        }
        record(&store, &backend_id, probed).await;
        if was_usable != Some(usable) {
            (hooks.on_change)();
            was_usable = Some(usable);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Asks the backend how it is.
async fn probe(client: &ComfyClient) -> Result<BackendStats, ComfyError> {
    let stats = client.system_stats().await?;
    let queue_remaining = client.queue_remaining().await?;
    Ok(BackendStats {
        comfyui_version: stats.comfyui_version,
        vram_total: stats.vram_total,
        vram_free: stats.vram_free,
        queue_remaining: Some(queue_remaining),
    })
}

/// Records what the backend said: online, incompatible (too old to be
/// driven safely) or offline.
async fn record(store: &Store, backend_id: &str, probed: Result<BackendStats, ComfyError>) {
    let recorded = match probed {
        Ok(stats) => match version_problem(stats.comfyui_version.as_deref()) {
            Some(why) => {
                tracing::warn!(backend_id, "backend gets no jobs: {why}");
                crate::metrics::backend(backend_id, false, stats.vram_total, stats.vram_free);
                store.backend_incompatible(backend_id, stats, why).await
            }
            None => {
                crate::metrics::backend(backend_id, true, stats.vram_total, stats.vram_free);
                store.backend_online(backend_id, stats).await
            }
        },
        Err(e) => {
            tracing::debug!(backend_id, error = %e, "backend poll failed");
            crate::metrics::backend(backend_id, false, None, None);
            store.backend_offline(backend_id, e.to_string()).await
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(backend_id, error = %e, "cannot record backend state");
    }
}
