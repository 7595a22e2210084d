//! Job routes: submit, look up, events, cancel, retry, priority, start
//! time, pause and resume (lists and counts of jobs: `history.rs`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::wire::{Event, Job, Lease, Output, SubmitResponse, WebhookDelivery};
use super::{ApiError, AppState};
use crate::store::{CancelOutcome, JobStatus};

pub(super) fn router(max_input_bytes: u64) -> Router<AppState> {
    // A multipart submission carries its files.
    let limit = axum::extract::DefaultBodyLimit::max((max_input_bytes + (16 << 20)) as usize);
    let submit = Router::new()
        .route("/api/job", post(submit_job))
        .layer(limit);
    Router::new()
        .merge(submit)
        .route("/api/job/{id}", get(get_job))
        .route("/api/job/{id}/events", get(job_events))
        .route("/api/job/{id}/cancel", post(cancel_job))
        .route("/api/job/{id}/retry", post(retry_job))
        .route("/api/job/{id}/priority", post(set_priority))
        .route("/api/job/{id}/pause", post(pause_job))
        .route("/api/job/{id}/resume", post(resume_job))
        .route("/api/job/{id}/schedule", post(schedule_job))
}

/// A request's body, at most `limit` bytes (this route takes larger
/// multipart bodies; a JSON manifest keeps `limits.max_body_bytes`).
async fn limited_body(req: axum::extract::Request, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = source {
                if s.to_string().contains("length limit exceeded") {
                    return ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "the request body is larger than limits.max_body_bytes",
                    );
                }
                source = s.source();
            }
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {e}"),
            )
        })
}

/// A JSON request's body, at most `limits.max_body_bytes`, parsed.
async fn json_request(state: &AppState, req: axum::extract::Request) -> Result<Value, ApiError> {
    let headers = req.headers().clone();
    json_body(
        &headers,
        limited_body(req, state.config.limits.max_body_bytes).await,
    )
}

/// Requires a JSON body, then parses it into a value.
pub(super) fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be JSON with Content-Type: application/json (got `{}`)",
                if content_type.is_empty() {
                    "none"
                } else {
                    content_type
                }
            ),
        ));
    }
    let body = body?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// Submit a job. A `2xx` means it is stored on disk. As `multipart/form-data`,
/// a `manifest` part and file parts: a parameter value `"@PART"` names a
/// file part, stored as an input with the job (all or nothing).
#[utoipa::path(
    post,
    path = "/api/job",
    tag = "jobs",
    request_body = crate::manifest::JobManifest,
    responses(
        (status = 201, description = "Stored and queued", body = SubmitResponse),
        (status = 200, description = "Same idempotency key and manifest as an earlier job: that job", body = SubmitResponse),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 409, description = "Idempotency key already used with another manifest", body = super::ErrorBody),
        (status = 413, description = "Body over limits.max_body_bytes", body = super::ErrorBody),
        (status = 415, description = "Not JSON", body = super::ErrorBody),
        (status = 422, description = "A field or parameter is wrong; `field` names it; nothing stored", body = super::ErrorBody),
        (status = 503, description = "Database unusable or full; nothing stored", body = super::ErrorBody),
    )
)]
pub(super) async fn submit_job(
    State(state): State<AppState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    if super::inputs::is_multipart(req.headers()) {
        return super::inputs::submit_multipart(&state, req).await;
    }
    let value = json_request(&state, req).await?;
    let submitted = state.submitter.submit(value).await?;
    let code = if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(SubmitResponse::from(submitted))).into_response())
}

/// Everything about a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobDetail {
    /// The job.
    #[serde(flatten)]
    pub job: Job,
    /// Files collected from the backend.
    pub outputs: Vec<Output>,
    /// Every lease: backend, prompt id, outcome.
    pub leases: Vec<Lease>,
    /// Webhook deliveries (when the manifest has a `callback_url`).
    pub webhooks: Vec<WebhookDelivery>,
    /// For a queued job: why it is not running yet (its back-off, or what
    /// keeps each backend from taking it now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// The jobs that start from its outputs, oldest first.
    pub followed_by: Vec<String>,
}

/// One job: manifest, bound graph, status, attempts, backend, outputs; all
/// of it as the database held it at one moment (a job never shows `queued`
/// beside the lease that took it, or `completed` without its outputs).
#[utoipa::path(
    get,
    path = "/api/job/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, body = JobDetail),
        (status = 404, body = super::ErrorBody),
    )
)]
pub(super) async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    detail(&state, &id).await.map(Json)
}

/// The job as `GET /api/job/{id}` shows it.
async fn detail(state: &AppState, id: &str) -> Result<JobDetail, ApiError> {
    let d = state
        .store
        .job_detail(id, &state.farm.live_backends())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job `{id}`")))?;
    Ok(JobDetail {
        waiting_for: d.waiting_for,
        followed_by: d.followed_by,
        job: with_progress(state, d.job.into()),
        outputs: d.outputs.into_iter().map(Output::from).collect(),
        leases: d.leases.into_iter().map(Lease::from).collect(),
        webhooks: d.webhooks.into_iter().map(WebhookDelivery::from).collect(),
    })
}

/// The job's event log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    /// Oldest first.
    pub events: Vec<Event>,
}

/// The job's event log, oldest first: every state change.
#[utoipa::path(
    get,
    path = "/api/job/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = EventList), (status = 404, body = super::ErrorBody))
)]
pub(super) async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventList>, ApiError> {
    let events = state.store.job_events(&id).await?;
    if events.is_empty() && state.store.job(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("job `{id}`")));
    }
    Ok(Json(EventList {
        events: events.into_iter().map(Event::from).collect(),
    }))
}

/// Answer to a cancel.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResponse {
    /// The job.
    pub job_id: String,
    /// `cancelled`, or the current state while a backend is asked to stop it.
    pub status: JobStatus,
    /// A sentence for people.
    pub message: String,
}

/// Cancel a job.
#[utoipa::path(
    post,
    path = "/api/job/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = CancelResponse),
        (status = 202, description = "The backend is being asked to stop it", body = CancelResponse),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "Already finished", body = super::ErrorBody),
    )
)]
pub(super) async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.farm.cancel(&id).await? {
        CancelOutcome::Cancelled => {
            tracing::info!(job_id = %id, "job cancelled");
            let body = CancelResponse {
                job_id: id,
                status: JobStatus::Cancelled,
                message: "cancelled".into(),
            };
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        CancelOutcome::Requested { backend_id } => {
            tracing::info!(job_id = %id, backend_id = %backend_id, "cancel requested");
            let current = state
                .store
                .job(&id)
                .await?
                .map(|j| j.status)
                .unwrap_or(JobStatus::Cancelled);
            let body = CancelResponse {
                job_id: id,
                status: current,
                message: format!("backend {backend_id} is being asked to stop it; the job becomes `cancelled` once it confirms"),
            };
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// Queue a failed or cancelled job again, as a new attempt.
#[utoipa::path(
    post,
    path = "/api/job/{id}/retry",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Queued again", body = SubmitResponse),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "Not failed or cancelled", body = super::ErrorBody),
    )
)]
pub(super) async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SubmitResponse>, ApiError> {
    state.store.retry(&id).await?;
    tracing::info!(job_id = %id, "job queued again by a user");
    let job = state
        .store
        .job(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job `{id}`")))?;
    // One waiting worker that may run it, as for a submission: a night's
    // failures retried by their ids on a large farm woke every worker
    // for each of them.
    if job.status == JobStatus::Queued {
        state.farm.job_queued(&job.requires);
    }
    Ok(Json(SubmitResponse {
        job_id: id,
        status: job.status,
        message: "queued again as a new attempt".into(),
        submitted_at: job.submitted_at,
        warnings: vec![],
        paused: false,
    }))
}

/// The body of `POST /api/job/{id}/priority`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriorityRequest {
    /// The job's new priority, -1000 to 1000; higher runs first.
    pub priority: i64,
}

/// Give a job that has not ended a new priority: a queued job takes its new
/// place in the queue at once (a shot needed first in the morning goes to
/// the front of an overnight batch); one a backend holds keeps it for when
/// it is queued again. The change is a `priority_changed` event.
#[utoipa::path(
    post,
    path = "/api/job/{id}/priority",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    request_body = PriorityRequest,
    responses(
        (status = 200, description = "The job, with its new priority and `waiting_for`", body = JobDetail),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "The job has ended", body = super::ErrorBody),
        (status = 422, description = "`priority` missing, not an integer or out of range", body = super::ErrorBody),
    )
)]
pub(super) async fn set_priority(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Json<JobDetail>, ApiError> {
    let value = json_request(&state, req).await?;
    let range = crate::manifest::PRIORITIES;
    let priority = match value.get("priority") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "priority",
                format!(
                "is required: the job's new priority, an integer from {} to {} (higher runs first)",
                range.start(),
                range.end()
            ),
            ))
        }
        Some(v) => v.as_i64().filter(|n| range.contains(n)).ok_or_else(|| {
            ApiError::invalid(
                "priority",
                format!(
                    "must be an integer from {} to {}, got {v}",
                    range.start(),
                    range.end()
                ),
            )
        })?,
    };
    let change = state.store.set_priority(&id, priority).await?;
    if change.from != priority {
        tracing::info!(job_id = %id, from = change.from, to = priority, status = %change.status, "priority changed");
    }
    detail(&state, &id).await.map(Json)
}

/// The body of `POST /api/job/{id}/schedule`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleRequest {
    /// RFC 3339: no backend takes the job before then; `null`: now.
    pub start_after: Option<DateTime<Utc>>,
}

/// Give a job that has not started a new start time, as `start_after` in
/// its manifest would have (a batch set for 20:00 moved to 22:00), or
/// `null` to let it start now in its turn. A waiting job still waits for
/// its parents. The change is a `scheduled` event.
#[utoipa::path(
    post,
    path = "/api/job/{id}/schedule",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    request_body = ScheduleRequest,
    responses(
        (status = 200, description = "The job, with its `not_before` and `waiting_for`", body = JobDetail),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "The job has started (an attempt ran, or a backend holds it) or ended", body = super::ErrorBody),
        (status = 422, description = "`start_after` missing or not an RFC 3339 time", body = super::ErrorBody),
    )
)]
pub(super) async fn schedule_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Json<JobDetail>, ApiError> {
    let value = json_request(&state, req).await?;
    let at = match value.get("start_after") {
        None => {
            return Err(ApiError::invalid(
                "start_after",
                "is required: an RFC 3339 time (no backend takes the job before it), or null (now)",
            ))
        }
        Some(Value::Null) => None,
        Some(Value::String(t)) => Some(super::history::time_param("start_after", t)?),
        Some(other) => {
            return Err(ApiError::invalid(
                "start_after",
                format!("start_after: must be an RFC 3339 time such as 2026-12-07T20:00:00Z or null, got {other}"),
            ))
        }
    };
    let change = state.store.set_start_after(&id, at).await?;
    tracing::info!(job_id = %id, start_after = ?at, status = %change.status, "start time set by a user");
    match at {
        Some(t) if t > Utc::now() => state.farm.job_due_at(t),
        _ if change.status == JobStatus::Queued => state.farm.job_queued(&change.requires),
        _ => {}
    }
    detail(&state, &id).await.map(Json)
}

/// The body of `POST /api/job/{id}/pause` (none: `interrupt` false).
#[derive(Debug, Serialize, ToSchema)]
pub struct PauseRequest {
    /// Also pause a job a backend runs: it is stopped there and goes back
    /// to the queue in its place, paused; its run is lost (the attempt does
    /// not count). Without it such a job is refused (`409`).
    #[serde(default)]
    pub interrupt: bool,
}

/// Pause a job that has not started: it keeps its place in the queue (and
/// a waiting one goes on waiting for its parents), but no backend takes it
/// until it is resumed; the rest of a batch held back while its first
/// shots are checked. A `paused` event; pausing a paused job changes
/// nothing. With `{"interrupt": true}` a job a backend runs is paused too:
/// `202`, a `pause_requested` event, then, once the backend stopped it, a
/// `paused` one (or `pause_too_late` if it finished first).
#[utoipa::path(
    post,
    path = "/api/job/{id}/pause",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    request_body(content = Option<PauseRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The job, with `paused_at` and `waiting_for`", body = JobDetail),
        (status = 202, description = "A backend runs it: being stopped there (`interrupt`)", body = JobDetail),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "A backend runs it (send `interrupt` to stop it), a cancel is under way, or it has ended", body = super::ErrorBody),
        (status = 422, description = "`interrupt` not a boolean", body = super::ErrorBody),
    )
)]
pub(super) async fn pause_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    // No body (or an empty one, whatever its type says): no interrupt, as
    // before the body existed.
    let headers = req.headers().clone();
    let body = limited_body(req, state.config.limits.max_body_bytes).await?;
    let interrupt = if !body.iter().all(u8::is_ascii_whitespace) {
        match json_body(&headers, Ok(body))?.get("interrupt") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::invalid(
                    "interrupt",
                    format!("interrupt: must be true or false, got {other}"),
                ))
            }
        }
    } else {
        false
    };
    let stopping = set_paused(&state, &id, true, interrupt).await?;
    let code = if stopping {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(detail(&state, &id).await?)).into_response())
}

/// Resume a paused job: it runs in its turn (its priority and age, as if
/// never paused). A `resumed` event; resuming a job not paused changes
/// nothing, so a whole batch can be resumed by its ids.
#[utoipa::path(
    post,
    path = "/api/job/{id}/resume",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, with `waiting_for`", body = JobDetail),
        (status = 404, body = super::ErrorBody),
    )
)]
pub(super) async fn resume_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    set_paused(&state, &id, false, false).await?;
    detail(&state, &id).await.map(Json)
}

/// Pauses or resumes a job; whether a backend is being asked to stop it.
async fn set_paused(
    state: &AppState,
    id: &str,
    paused: bool,
    interrupt: bool,
) -> Result<bool, ApiError> {
    let change = state.farm.set_paused(id, paused, interrupt).await?;
    if change.was_paused != paused {
        match &change.stopping {
            Some(backend_id) => {
                tracing::info!(job_id = %id, backend_id = %backend_id, "pause requested: the backend is asked to stop the job")
            }
            None => {
                tracing::info!(job_id = %id, status = %change.status, paused, "job paused or resumed by a user")
            }
        }
    }
    Ok(change.stopping.is_some())
}

/// The job with its live progress, while a backend holds it.
pub(super) fn with_progress(state: &AppState, mut job: Job) -> Job {
    if job.status.is_held() {
        if let Some(p) = state.farm.progress(&job.job_id) {
            job.progress = Some(p);
        }
    }
    job
}
