//! A batch as a whole: the jobs that share a value of the metadata field
//! `dispatch.batch_field` (`batch`).
//!
//! Why apart from the job routes: the farm holds a batch it finds failing
//! job after job alike (its new jobs are stored paused), and letting it go
//! is one act on the batch, not on each job: the hold ends first, then
//! each of its paused jobs is resumed.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};

use super::{ApiError, AppState};
use crate::dispatch::BatchResumed;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/api/batch/{batch}/resume", post(resume_batch))
}

/// Let a batch go (jobs whose metadata field `dispatch.batch_field`, `batch`
/// by default, is `{batch}`): the farm no longer holds it, if it found it
/// broken, and each of its paused jobs is resumed and runs in its turn.
/// Once the cause is mended; a batch never held or paused changes nothing.
#[utoipa::path(
    post,
    path = "/api/batch/{batch}/resume",
    tag = "jobs",
    params(("batch" = String, Path, description = "The batch: its jobs' metadata field `dispatch.batch_field`")),
    responses((status = 200, description = "Whether it was held, and the jobs resumed", body = BatchResumed))
)]
pub(super) async fn resume_batch(
    State(state): State<AppState>,
    Path(batch): Path<String>,
) -> Result<Json<BatchResumed>, ApiError> {
    Ok(Json(state.farm.resume_batch(&batch).await?))
}
