//! The HTTP API: routes, thin handlers, one error shape, the OpenAPI document.
//!
//! Why thin handlers: each parses its input, calls one domain function
//! (store, manifest, dispatch) and answers, so behaviour is tested where it
//! lives. Every error, including malformed JSON, a wrong content type, a body
//! over the limit and an unknown route, is `{"error": {"code", "message",
//! "field"?}}`, so clients need one error path.

mod backends;
mod error;
mod events;
mod jobs;
mod openapi;
mod system;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub(crate) use jobs::{submit_manifest, SubmitResponse};

use crate::config::Config;
use crate::dispatch::Farm;
use crate::store::Store;
use crate::workflows::Catalog;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Workflow templates.
    pub catalog: Arc<Catalog>,
    /// Settings.
    pub config: Arc<Config>,
    /// When the service started (for `uptime_s`).
    pub started: Instant,
    /// The running farm: wakes dispatchers, cancels through backends, live progress.
    pub farm: Farm,
}

/// Builds the whole router.
pub fn app(state: AppState) -> Router {
    let limit = state.config.limits.max_body_bytes;
    Router::new()
        .merge(jobs::router())
        .merge(system::router())
        .merge(backends::router())
        .merge(events::router())
        .merge(openapi::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
