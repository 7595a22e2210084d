//! One error type for every handler, and the JSON shape clients see.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;
use crate::submit::SubmitError;

/// The body of every error answer (also the inbox's `.error.json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`validation_failed`, `not_found`, ...).
    pub code: String,
    /// A sentence for people.
    pub message: String,
    /// The request field at fault, when there is one (`parameters.width`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error a handler answers with.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Sentence for people.
    pub message: String,
    /// Field at fault.
    pub field: Option<String>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A `422` naming a field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// A `404` for a missing thing.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} not found", what.into()),
        )
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            code: e.code(),
            field: e.field().map(str::to_string),
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_full",
                "the database disk is full; nothing was stored. Free space and retry",
            ),
            StoreError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is stopping; retry in a moment",
            ),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m.clone()),
            StoreError::NotFound(m) => ApiError::not_found(m.clone()),
            StoreError::InvalidState(m) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", m.clone())
            }
            StoreError::LeaseLost => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", e.to_string())
            }
            e @ StoreError::Database(_) if e.locked() => {
                tracing::error!(error = %e, "the database is locked by another program");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    StoreError::LOCKED,
                )
            }
            StoreError::Database(inner) => {
                tracing::error!(error = %inner, "database error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    format!("the database is not usable: {inner}"),
                )
            }
        }
    }
}

impl ErrorBody {
    /// The body of a refused submission.
    pub fn of_submit(e: &SubmitError) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: e.code().to_string(),
                message: e.to_string(),
                field: e.field().map(str::to_string),
            },
        }
    }
}

impl ApiError {
    /// The JSON body clients see.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Answer for routes that do not exist.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

/// Answer for a known route with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
