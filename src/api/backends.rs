//! Backend routes: the farm as the database sees it, and the operator's controls.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use std::collections::HashMap;

use super::wire::Backend;
use super::{ApiError, AppState};
use crate::dispatch::Quarantine;
use crate::store::AdminState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/backends", get(list_backends))
        .route("/api/backends/{id}", get(get_backend))
        .route("/api/backends/{id}/refresh", post(refresh_backend))
        .route("/api/backends/{id}/enable", post(enable_backend))
        .route("/api/backends/{id}/disable", post(disable_backend))
        .route("/api/backends/{id}/drain", post(drain_backend))
}

/// The configured backends.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackendList {
    /// By id.
    pub backends: Vec<Backend>,
    /// A sentence when the list is empty or nothing can take jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the farm is shared between groups of jobs now (as in
    /// `GET /api/farm`); `null` when it is not (`dispatch.share_by` unset).
    pub sharing: Option<super::farm::FarmSharing>,
}

/// What only the running farm knows of its backends now, read once for a
/// whole list.
struct FarmNow {
    /// [`crate::dispatch::Farm::prompts_not_ours`].
    not_ours: HashMap<String, usize>,
    /// [`crate::dispatch::Farm::outputs_waiting_for_disk`].
    waiting_for_disk: HashMap<String, usize>,
    /// [`crate::dispatch::Farm::quarantined`].
    quarantined: HashMap<String, Quarantine>,
}

impl FarmNow {
    fn read(state: &AppState) -> FarmNow {
        FarmNow {
            not_ours: state.farm.prompts_not_ours(),
            waiting_for_disk: state.farm.outputs_waiting_for_disk(),
            quarantined: state.farm.quarantined(),
        }
    }

    /// A backend's stored record, with what only its worker knows now.
    fn live(&self, record: crate::store::BackendRecord) -> Backend {
        let mut b = Backend::from(record);
        b.prompts_not_ours = self.not_ours.get(&b.id).copied().unwrap_or(0) as i64;
        b.outputs_waiting_for_disk = self.waiting_for_disk.get(&b.id).copied().unwrap_or(0) as i64;
        if let Some(q) = self.quarantined.get(&b.id) {
            b.accepting_jobs = false;
            b.quarantined_until = Some(q.until);
            b.quarantine_reason = Some(q.reason.clone());
        }
        b
    }
}

/// The configured backends with their state.
#[utoipa::path(get, path = "/api/backends", tag = "backends", responses((status = 200, body = BackendList)))]
pub(super) async fn list_backends(
    State(state): State<AppState>,
) -> Result<Json<BackendList>, ApiError> {
    let now = FarmNow::read(&state);
    let backends: Vec<Backend> = state
        .store
        .backends()
        .await?
        .into_iter()
        .map(|b| now.live(b))
        .collect();
    let message = if backends.is_empty() {
        Some(
            "no backends are configured: jobs wait in the queue until one is added to the config"
                .into(),
        )
    } else if !backends.iter().any(|b| b.accepting_jobs) {
        Some(
            "no backend is accepting jobs now (offline, disabled, draining, outside its hours or in quarantine)"
                .into(),
        )
    } else {
        None
    };
    let sharing = super::farm::sharing_now(&state.store).await?;
    Ok(Json(BackendList {
        backends,
        message,
        sharing,
    }))
}

/// What a backend can run, as last read.
#[derive(Debug, Serialize, ToSchema)]
pub struct InventoryView {
    /// Node classes it has (`/object_info`).
    pub node_count: i64,
    /// Model files per folder (`/models/{folder}`).
    pub models: std::collections::BTreeMap<String, Vec<String>>,
    /// When it was read.
    pub read_at: chrono::DateTime<chrono::Utc>,
    /// The ComfyUI version it was read from.
    pub comfyui_version: Option<String>,
}

/// One backend, with what it can run.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackendDetail {
    /// The backend.
    #[serde(flatten)]
    pub backend: Backend,
    /// Its inventory, once read (`null` until it first answers).
    pub inventory: Option<InventoryView>,
}

/// One backend, with its inventory.
#[utoipa::path(
    get,
    path = "/api/backends/{id}",
    tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendDetail), (status = 404, body = super::ErrorBody))
)]
pub(super) async fn get_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendDetail>, ApiError> {
    let backend = state
        .store
        .backend(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("backend `{id}`")))?;
    let inventory = state
        .store
        .inventory_summary(&id)
        .await?
        .map(|i| InventoryView {
            node_count: i.node_count,
            models: i.models,
            read_at: i.read_at,
            comfyui_version: i.comfyui_version,
        });
    Ok(Json(BackendDetail {
        backend: FarmNow::read(&state).live(backend),
        inventory,
    }))
}

/// Read the backend's inventory now; answers once it is stored.
#[utoipa::path(
    post,
    path = "/api/backends/{id}/refresh",
    tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses(
        (status = 200, body = BackendDetail),
        (status = 404, body = super::ErrorBody),
        (status = 502, description = "The backend did not answer", body = super::ErrorBody),
    )
)]
pub(super) async fn refresh_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendDetail>, ApiError> {
    if state.store.backend(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("backend `{id}`")));
    }
    state.farm.refresh_inventory(&id).await.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "backend_unavailable",
            format!("cannot read backend {id}'s inventory: {e}"),
        )
    })?;
    get_backend(State(state), Path(id)).await
}

async fn set_admin(
    state: AppState,
    id: String,
    admin: AdminState,
) -> Result<Json<BackendDetail>, ApiError> {
    state.store.set_backend_admin_state(&id, admin).await?;
    state.farm.admin_changed(&id, admin).await?;
    tracing::info!(backend_id = %id, admin_state = admin.as_str(), "backend admin state changed");
    if admin == AdminState::Enabled {
        // An operator who enables a box vouches for it.
        state.farm.lift_quarantine(&id).await;
    } else {
        state.farm.backend_changed(&id);
    }
    get_backend(State(state), Path(id)).await
}

/// Let the backend take jobs again (kept across restarts); ends its
/// quarantine, if it is in one. Outside its hours, lends it to the farm
/// until they end (`hours_override_until`).
#[utoipa::path(post, path = "/api/backends/{id}/enable", tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendDetail), (status = 404, body = super::ErrorBody)))]
pub(super) async fn enable_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendDetail>, ApiError> {
    set_admin(state, id, AdminState::Enabled).await
}

/// Take no new jobs; what it has keeps running (kept across restarts).
#[utoipa::path(post, path = "/api/backends/{id}/disable", tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendDetail), (status = 404, body = super::ErrorBody)))]
pub(super) async fn disable_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendDetail>, ApiError> {
    set_admin(state, id, AdminState::Disabled).await
}

/// Finish what it has, take nothing new (kept across restarts).
#[utoipa::path(post, path = "/api/backends/{id}/drain", tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendDetail), (status = 404, body = super::ErrorBody)))]
pub(super) async fn drain_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendDetail>, ApiError> {
    set_admin(state, id, AdminState::Draining).await
}
