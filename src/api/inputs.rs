//! Input routes: store a picture, read it back, list and delete inputs, and
//! submit a job with its pictures in one multipart request.
//!
//! Why a submission can carry its files: a tool that starts a job from a
//! frame would otherwise make two requests and handle the failure between
//! them; in one request either all of it is accepted or nothing is.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::wire::SubmitResponse;
use super::{ApiError, AppState};
use crate::inputs::{file_refs, replace_file_refs, InputError, Staged};
use crate::store::{InputDeletion, InputRecord, JobStatus};

pub(super) fn router(max_input_bytes: u64) -> Router<AppState> {
    // A multipart body carries files: it may be as large as one input and its manifest.
    let limit = axum::extract::DefaultBodyLimit::max((max_input_bytes + (16 << 20)) as usize);
    Router::new()
        .route("/api/inputs", post(upload).get(list))
        .route("/api/inputs/{id}", get(download).delete(delete))
        .layer(limit)
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::new(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.code(),
            e.to_string(),
        )
    }
}

/// A stored input file.
#[derive(Debug, Serialize, ToSchema)]
pub struct InputFile {
    /// `sha256:<64 hex>`: what a parameter of type `image` takes.
    pub input_id: String,
    /// Bytes.
    pub size: i64,
    /// Its type, read from its bytes.
    pub content_type: String,
    /// The name it was first given.
    pub filename: Option<String>,
    /// When it was first stored.
    pub created_at: DateTime<Utc>,
    /// When a submission last named it.
    pub last_used_at: DateTime<Utc>,
}

impl From<InputRecord> for InputFile {
    fn from(r: InputRecord) -> InputFile {
        InputFile {
            input_id: r.id,
            size: r.size,
            content_type: r.content_type,
            filename: r.filename,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
        }
    }
}

pub(super) fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("multipart/form-data"))
}

fn bad_part(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "payload_too_large"
    } else {
        "bad_request"
    };
    ApiError::new(
        status,
        code,
        format!("the multipart body is unreadable: {}", e.body_text()),
    )
}

/// Store a picture (or video, sound) a job starts from: the raw body with
/// its `Content-Type`, or `multipart/form-data` with one file part.
/// Content-addressed: the same bytes again answer `200` with the same id.
#[utoipa::path(
    post,
    path = "/api/inputs",
    tag = "inputs",
    request_body(content = String, content_type = "image/png", description = "The file's bytes (or multipart/form-data with one file part)"),
    responses(
        (status = 201, description = "Stored", body = InputFile),
        (status = 200, description = "The same bytes were stored already", body = InputFile),
        (status = 413, description = "Over limits.max_input_bytes", body = super::ErrorBody),
        (status = 415, description = "Not a type ComfyUI loads", body = super::ErrorBody),
        (status = 422, description = "Empty, or not the type its Content-Type says", body = super::ErrorBody),
    )
)]
pub(super) async fn upload(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let staged = if is_multipart(req.headers()) {
        let mut multipart = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
        let mut staged: Option<Staged> = None;
        while let Some(field) = multipart.next_field().await.map_err(bad_part)? {
            if let Some(first) = staged.take() {
                state.inputs.discard(first).await;
                return Err(ApiError::invalid("file", "send one file part per request"));
            }
            let (claimed, name) = (
                field.content_type().map(str::to_string),
                field.file_name().map(str::to_string),
            );
            staged = Some(state.inputs.stage(field, claimed.as_deref(), name).await?);
        }
        staged.ok_or_else(|| ApiError::invalid("file", "the multipart body has no file part"))?
    } else {
        let claimed = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let name = req
            .headers()
            .get("x-filename")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = req.into_body().into_data_stream();
        state.inputs.stage(body, claimed.as_deref(), name).await?
    };
    let (record, created) = state.inputs.commit(staged).await?;
    tracing::info!(input_id = %record.id, size = record.size, created, "input stored");
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(InputFile::from(record))).into_response())
}

/// The stored inputs.
#[derive(Debug, Serialize, ToSchema)]
pub struct InputList {
    /// Newest first.
    pub inputs: Vec<InputListed>,
}

/// An input and the jobs that use it.
#[derive(Debug, Serialize, ToSchema)]
pub struct InputListed {
    /// The input.
    #[serde(flatten)]
    pub input: InputFile,
    /// Jobs that name it, newest first.
    pub jobs: Vec<InputJob>,
}

/// A job that names an input.
#[derive(Debug, Serialize, ToSchema)]
pub struct InputJob {
    /// The job.
    pub job_id: String,
    /// Its status.
    pub status: JobStatus,
}

/// Every stored input, with its size and the jobs that use it.
#[utoipa::path(get, path = "/api/inputs", tag = "inputs", responses((status = 200, body = InputList)))]
pub(super) async fn list(State(state): State<AppState>) -> Result<Json<InputList>, ApiError> {
    let inputs = state
        .store
        .inputs()
        .await?
        .into_iter()
        .map(|u| InputListed {
            input: u.input.into(),
            jobs: u
                .jobs
                .into_iter()
                .map(|(job_id, status)| InputJob { job_id, status })
                .collect(),
        })
        .collect();
    Ok(Json(InputList { inputs }))
}

/// An input's bytes, with its type.
#[utoipa::path(
    get,
    path = "/api/inputs/{id}",
    tag = "inputs",
    params(("id" = String, Path, description = "sha256:<64 hex>")),
    responses((status = 200, description = "The file"), (status = 404, body = super::ErrorBody))
)]
pub(super) async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = state
        .store
        .input(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("input `{id}`")))?;
    let path = state
        .inputs
        .path_of(&id)
        .ok_or_else(|| ApiError::not_found(format!("input `{id}`")))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::not_found(format!("input file {} ({e})", path.display())))?;
    Ok((
        [
            (header::CONTENT_TYPE, record.content_type),
            (header::CONTENT_LENGTH, record.size.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response())
}

/// Delete an input; a `409` while an unfinished job uses it.
#[utoipa::path(
    delete,
    path = "/api/inputs/{id}",
    tag = "inputs",
    params(("id" = String, Path, description = "sha256:<64 hex>")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "Unfinished jobs use it, or a submission naming it is being stored", body = super::ErrorBody),
    )
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.inputs.delete(&id).await? {
        InputDeletion::Deleted => {
            tracing::info!(input_id = %id, "input deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        InputDeletion::NotFound => Err(ApiError::not_found(format!("input `{id}`"))),
        InputDeletion::Named => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("input `{id}` is named by a submission being stored now; try again"),
        )),
        InputDeletion::InUse(jobs) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!(
                "input `{id}` is needed by unfinished jobs: {}",
                jobs.join(", ")
            ),
        )),
    }
}

/// `POST /api/job` as `multipart/form-data`: a `manifest` part (the JSON
/// manifest) and file parts; a parameter value `"@PART"` names a file part.
/// The files are stored as inputs and the job is stored; if anything is
/// refused, nothing stays.
pub(super) async fn submit_multipart(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let mut multipart = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
    let mut manifest: Option<Value> = None;
    let mut files: HashMap<String, Staged> = HashMap::new();
    let read = async {
        while let Some(field) = multipart.next_field().await.map_err(bad_part)? {
            let name = field.name().unwrap_or("").to_string();
            if name == "manifest" {
                let text = field.text().await.map_err(bad_part)?;
                manifest = Some(serde_json::from_str(&text).map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "malformed_json",
                        format!("the manifest part is not valid JSON: {e}"),
                    )
                })?);
                continue;
            }
            let claimed = field.content_type().map(str::to_string);
            let filename = field.file_name().map(str::to_string);
            let staged = state
                .inputs
                .stage(field, claimed.as_deref(), filename)
                .await
                .map_err(|e| {
                    let mut err = ApiError::from(e);
                    err.message = format!("file part `{name}`: {}", err.message);
                    err.field = Some(name.clone());
                    err
                })?;
            files.insert(name, staged);
        }
        Ok::<(), ApiError>(())
    }
    .await;
    let discard_all = |files: HashMap<String, Staged>| async {
        for (_, f) in files {
            state.inputs.discard(f).await;
        }
    };
    if let Err(e) = read {
        discard_all(files).await;
        return Err(e);
    }
    let Some(mut manifest) = manifest else {
        discard_all(files).await;
        return Err(ApiError::invalid(
            "manifest",
            "the multipart body has no `manifest` part",
        ));
    };
    // Only the parts the manifest names are stored.
    let named: Vec<String> = file_refs(&manifest).into_iter().map(|(_, n)| n).collect();
    let mut warnings = Vec::new();
    let mut stored = HashMap::new();
    let mut created = Vec::new();
    for (name, staged) in files {
        if !named.contains(&name) {
            warnings.push(format!(
                "file part `{name}` is named by no parameter; not stored"
            ));
            state.inputs.discard(staged).await;
            continue;
        }
        match state.inputs.commit(staged).await {
            Ok((record, new)) => {
                if new {
                    created.push(record.id.clone());
                }
                stored.insert(name, record.id);
            }
            Err(e) => {
                state.inputs.forget_new(&created).await;
                return Err(e.into());
            }
        }
    }
    replace_file_refs(&mut manifest, |name| stored.get(name).cloned());
    match state.submitter.submit(manifest).await {
        Ok(submitted) => {
            let code = if submitted.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut body = SubmitResponse::from(submitted);
            body.warnings.extend(warnings);
            Ok((code, Json(body)).into_response())
        }
        Err(e) => {
            state.inputs.forget_new(&created).await;
            Err(e.into())
        }
    }
}
