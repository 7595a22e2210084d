//! What can go wrong talking to a backend, in words an operator reading a
//! box's `last_error` can act on.
//!
//! Why apart from the client: the client says which call failed; this says
//! what the failure means (in doubt or not) and, for the answers a new farm
//! meets first (a refused connection, a login in front of ComfyUI), what to
//! do about it.

use std::time::Duration;

use super::Rejection;

/// What can go wrong talking to a backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComfyError {
    /// No connection, or the connection broke.
    #[error("cannot reach the backend: {0}")]
    Unreachable(String),
    /// The call took longer than the timeout.
    #[error("the backend did not answer within {0:?}")]
    Timeout(Duration),
    /// An answer we cannot use (not JSON, wrong shape, too large, unexpected status).
    #[error("the backend answered something unusable: {0}")]
    BadResponse(String),
    /// An upload was refused as larger than the server takes (a `413`:
    /// ComfyUI's `--max-upload-size`, or a proxy's limit in front of it);
    /// what it said.
    #[error("the backend refused the upload as too large (HTTP 413): {0}")]
    UploadTooLarge(String),
    /// `POST /prompt` was refused: the graph cannot run there as it is.
    #[error("the backend rejected the prompt: {}", .0.summary())]
    Rejected(Rejection),
}

impl ComfyError {
    /// The request may have reached the backend and been acted on (a
    /// timeout, a connection that broke mid-way): only asking it can tell.
    pub fn in_doubt(&self) -> bool {
        matches!(self, ComfyError::Unreachable(_) | ComfyError::Timeout(_))
    }
}

/// What a `401` or `403` from a box means to whoever reads its
/// `last_error`: a ComfyUI behind a login (a proxy, an auth extension)
/// wants credentials the config does not give.
pub(super) fn credentials_hint(status: reqwest::StatusCode) -> &'static str {
    match status.as_u16() {
        401 | 403 => " (the server asks for credentials: give them in this backend's `headers` in the config, e.g. `Authorization: Bearer …`)",
        _ => "",
    }
}

pub(super) fn net_error(e: reqwest::Error, timeout: Duration) -> ComfyError {
    if e.is_timeout() {
        ComfyError::Timeout(timeout)
    } else if e.is_decode() || e.is_body() {
        ComfyError::BadResponse(e.to_string())
    } else if refused(&e) {
        // The first thing a new farm meets: ComfyUI takes connections from
        // its own machine only unless started with `--listen`.
        ComfyError::Unreachable(format!(
            "{}; nothing listens there: is ComfyUI running, and, on another machine, \
             started with `--listen` (without it, it takes connections from its own machine only)?",
            crate::with_causes(&e)
        ))
    } else {
        ComfyError::Unreachable(crate::with_causes(&e))
    }
}

/// Whether the connection was refused: the machine answered, but no
/// server listens on the port (for this client's address).
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = s.source();
    }
    false
}
