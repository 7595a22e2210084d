//! Service routes: health and the workflow catalogue.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::store::JobStatus;
use crate::workflows::{Template, TemplateError};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/workflows", get(workflows))
        .route("/api/workflows/reload", post(reload_workflows))
        .route("/metrics", get(metrics))
}

/// Health of the service.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `error` with a `503`.
    pub status: String,
    /// Version of this build.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// `ok`, or why the database is not usable.
    pub database: String,
    /// Number of jobs in each state.
    pub jobs: BTreeMap<String, i64>,
    /// Jobs a user paused (counted in `queued` or `waiting` too): they do
    /// not start until resumed, whatever the farm does.
    pub paused: i64,
    /// The data folder: database, outputs and inputs, and the free space
    /// (measured by the retention sweeper).
    pub disk: crate::retention::DiskUsage,
    /// Things an operator should look at (low disk space, a data folder on
    /// a network share, the database locked by another program, a batch
    /// the farm holds because its jobs failed one after the other alike,
    /// open files near the process's limit).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Inbox files left there until the job they start from (named by its
    /// idempotency key, `job:key:`) is submitted; each is rejected with its
    /// `message` at `rejected_after` if none comes. Also files the service
    /// cannot store now (its disk full: `rejected_after` null), taken once
    /// it can.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inbox_waiting: Vec<crate::inbox::WaitingFile>,
    /// Batches the farm holds, found failing job after job alike: their
    /// jobs not started are paused, and so is each job submitted for them,
    /// until `POST /api/batch/{batch}/resume` (each is also in `warnings`,
    /// as its `message`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_batches: Vec<super::wire::HeldBatch>,
}

/// Health: `200` when the database answers, `503` with the reason when not.
#[utoipa::path(
    get,
    path = "/api/health",
    tag = "service",
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
pub(super) async fn health(State(state): State<AppState>) -> Response {
    let mut jobs: BTreeMap<String, i64> = JobStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    let database = match state.store.job_counts().await {
        Ok(counts) => {
            for (s, n) in counts {
                jobs.insert(s.as_str().to_string(), n);
            }
            "ok".to_string()
        }
        Err(e) => e.to_string(),
    };
    let paused = state.store.paused_count().await.unwrap_or(0);
    let ok = database == "ok";
    let disk = state.usage.lock().expect("usage").clone();
    let mut warnings = Vec::new();
    if let Some(free) = disk
        .free_bytes
        .filter(|f| *f < state.config.retention.low_space_bytes)
    {
        warnings.push(format!(
            "the data folder's disk has {} MiB free (retention.low_space_bytes is {} MiB): \
             free space, or set retention rules",
            free >> 20,
            state.config.retention.low_space_bytes >> 20
        ));
    }
    if state.store.locked_by_another() {
        warnings.push(
            "the database is locked by another program holding a write transaction on it \
             (a sqlite3 shell, a database browser): every write of the service waits for it \
             and fails, submissions and the farm's alike, until that transaction ends"
                .into(),
        );
    }
    if let Some(kind) = disk.network_file_system {
        warnings.push(crate::retention::network_warning(kind));
    }
    let held_batches: Vec<super::wire::HeldBatch> = match state.farm.held_batches().await {
        Ok(held) => held.into_iter().map(super::wire::HeldBatch::from).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read which batches the farm holds");
            Vec::new()
        }
    };
    warnings.extend(held_batches.iter().map(|h| h.message.clone()));
    if let (Some(open), Some(limit)) = (
        crate::open_files::in_use_now().await,
        crate::open_files::limit(),
    ) {
        warnings.extend(crate::open_files::warning(open, limit));
    }
    let body = Health {
        inbox_waiting: state.inbox_waiting.list(),
        held_batches,
        disk,
        warnings,
        status: if ok { "ok" } else { "error" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: state.started.elapsed().as_secs(),
        database,
        jobs,
        paused,
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Prometheus metrics: jobs by state, submissions, completions and failures
/// by workflow and backend, queue wait and run time histograms, backend
/// up/VRAM, HTTP requests and latencies.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let quarantined = state.farm.quarantined();
    for b in &state.config.backends {
        crate::metrics::quarantined(&b.id, quarantined.contains_key(&b.id));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(&state.store).await,
    )
        .into_response()
}

/// The workflow catalogue.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    /// Templates by id, with their parameters.
    pub workflows: Vec<Template>,
    /// Files in the workflows folder that could not be loaded, and why.
    pub errors: Vec<TemplateError>,
}

/// Templates and their parameters.
#[utoipa::path(get, path = "/api/workflows", tag = "workflows", responses((status = 200, body = WorkflowList)))]
pub(super) async fn workflows(State(state): State<AppState>) -> Json<WorkflowList> {
    let (templates, errors) = state.catalog.list();
    let ids: Vec<String> = state
        .store
        .backends()
        .await
        .map(|bs| bs.into_iter().map(|b| b.id).collect())
        .unwrap_or_default();
    let inventories = state.farm.inventories(&ids);
    Json(WorkflowList {
        workflows: templates
            .iter()
            .map(|t| with_options((**t).clone(), &inventories))
            .collect(),
        errors,
    })
}

/// Fills each parameter's `options`: the union, over the backends, of the
/// values their inventories accept for the input it sets.
fn with_options(
    mut t: Template,
    inventories: &[(String, std::sync::Arc<crate::inventory::Inventory>)],
) -> Template {
    use crate::workflows::ParamType;
    let free = |p: &&mut crate::workflows::Param| {
        p.choices.is_none() && !matches!(p.ty, ParamType::Image | ParamType::Mask)
    };
    for p in t.parameters.iter_mut().filter(free) {
        let Some(target) = p.targets.first() else {
            continue;
        };
        let Some(class) = t.graph[&target.node]["class_type"].as_str() else {
            continue;
        };
        let mut options: Vec<serde_json::Value> = Vec::new();
        let mut any = false;
        for (_, inv) in inventories {
            if let Some(values) = inv.options(class, &target.input) {
                any = true;
                for v in values {
                    if !options.contains(v) {
                        options.push(v.clone());
                    }
                }
            }
        }
        if any {
            p.options = Some(options);
        }
    }
    t
}

/// Rescans the workflows folder now.
#[utoipa::path(post, path = "/api/workflows/reload", tag = "workflows", responses((status = 200, body = WorkflowList)))]
pub(super) async fn reload_workflows(State(state): State<AppState>) -> Json<WorkflowList> {
    state.catalog.reload_async().await;
    workflows(State(state)).await
}
