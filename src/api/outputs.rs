//! Output files and their thumbnails.
//!
//! Why a room of its own: serving files (streamed, never a path built from
//! the request) and making thumbnails (CPU work off the runtime, cached) is
//! not job bookkeeping.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/api/job/{id}/outputs/{name}", get(get_output))
}

/// How an output is wanted.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct OutputQuery {
    /// A thumbnail instead of the file: its longer side in pixels, one of
    /// 64, 128, 256, 512 (a JPEG, made once and kept).
    thumb: Option<String>,
}

/// Download one output of a completed job, with its content type; or its
/// thumbnail with `?thumb=SIZE`.
#[utoipa::path(
    get,
    path = "/api/job/{id}/outputs/{name}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id"), ("name" = String, Path, description = "Output name from the job's `outputs`"), OutputQuery),
    responses(
        (status = 200, description = "The file (or its thumbnail, image/jpeg)", content_type = "application/octet-stream"),
        (status = 404, body = super::ErrorBody),
        (status = 410, description = "Deleted by retention", body = super::ErrorBody),
        (status = 415, description = "A thumbnail of an output that is not a picture", body = super::ErrorBody),
        (status = 422, description = "A thumbnail size not offered", body = super::ErrorBody),
    )
)]
pub(super) async fn get_output(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    Query(q): Query<OutputQuery>,
) -> Result<Response, ApiError> {
    let size = q.thumb.as_deref().map(thumb_size).transpose()?;
    // The name is only looked up, never used as a path: the stored name is.
    let mut outputs = state.store.job_outputs(&id).await?;
    let Some(at) = outputs.iter().position(|o| o.name == name) else {
        return Err(no_such_output(&id, &name, &outputs));
    };
    let output = outputs.swap_remove(at);
    if let Some(at) = output.pruned_at {
        return Err(ApiError::new(
            StatusCode::GONE,
            "pruned",
            format!("output `{name}` of job `{id}` was deleted by retention on {at}"),
        ));
    }
    let dir = state.config.outputs_dir().join(&id);
    let (path, content_type) = match size {
        None => (dir.join(&output.name), output.content_type.clone()),
        Some(size) => {
            if !crate::thumbs::of_a_picture(&output.content_type) {
                return Err(not_a_picture(&name, &output.content_type));
            }
            let thumb =
                crate::thumbs::get(&dir, &output.name, size)
                    .await
                    .map_err(|e| match e {
                        crate::thumbs::ThumbError::NotAnImage(why) => not_a_picture(&name, &why),
                        e => ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            e.to_string(),
                        ),
                    })?;
            (thumb, crate::thumbs::CONTENT_TYPE.to_string())
        }
    };
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("output file {} is missing: {e}", path.display()),
        )
    })?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{}\"", output.name),
            ),
            // Outputs never change under their name: let the browser keep them.
            (header::CACHE_CONTROL, "private, max-age=86400".to_string()),
        ],
        body,
    )
        .into_response())
}

fn thumb_size(v: &str) -> Result<u32, ApiError> {
    v.parse::<u32>()
        .ok()
        .filter(|s| crate::thumbs::SIZES.contains(s))
        .ok_or_else(|| {
            ApiError::invalid(
                "thumb",
                format!(
                    "thumb: must be one of {:?} (the thumbnail's longer side in pixels), got `{v}`",
                    crate::thumbs::SIZES
                ),
            )
        })
}

fn not_a_picture(name: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not_an_image",
        format!("output `{name}` has no thumbnail: {why}"),
    )
}

/// A name the job has no output of: its 404 names the ones it has
/// (ComfyUI numbers its files, `orchestrator_00353_.png`: a name guessed
/// from a template's prefix is rarely right).
fn no_such_output(id: &str, name: &str, outputs: &[crate::store::OutputRecord]) -> ApiError {
    let what = format!("output `{name}` of job `{id}`");
    if outputs.is_empty() {
        return ApiError::not_found(what);
    }
    let mut names: Vec<String> = outputs
        .iter()
        .take(5)
        .map(|o| format!("`{}`", o.name))
        .collect();
    if outputs.len() > 5 {
        names.push(format!("and {} more", outputs.len() - 5));
    }
    let mut e = ApiError::not_found(what);
    e.message = format!("{}; its outputs: {}", e.message, names.join(", "));
    e
}
