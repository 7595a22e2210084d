//! The HTTP API: routes, thin handlers, one error shape, the OpenAPI document.
//!
//! Why thin handlers: each parses its input, calls one domain function
//! (store, manifest, dispatch) and answers, so behaviour is tested where it
//! lives. Every error, including malformed JSON, a wrong content type, a body
//! over the limit and an unknown route, is `{"error": {"code", "message",
//! "field"?}}`, so clients need one error path.

mod backends;
mod batches;
mod dashboard;
mod error;
mod events;
mod farm;
mod history;
mod inputs;
mod jobs;
mod openapi;
mod outputs;
mod system;
pub mod wire;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, ErrorBody, ErrorDetail};

use crate::config::Config;
use crate::dispatch::Farm;
use crate::events::EventHub;
use crate::store::Store;
use crate::submit::Submitter;
use crate::workflows::Catalog;

/// What every handler can reach. Cheap to clone: one reference count.
///
/// Why behind one `Arc`: axum clones the state for every request (the
/// token check, the handler), and a clone of each part was some thirty
/// atomic operations on counters every core shares (the writer's channels,
/// the stop token's lock): 5% of the CPU of a burst of submissions.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    /// Wraps the service's parts.
    pub fn new(services: Services) -> AppState {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The service's parts, as handlers see them.
pub struct Services {
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
    /// Stores new jobs (the same path as the inbox's).
    pub submitter: Submitter,
    /// The live feed of the event log.
    pub events: EventHub,
    /// The input files.
    pub inputs: crate::inputs::Inputs,
    /// The data folder's last measurement (by the retention sweeper).
    pub usage: crate::retention::Usage,
    /// The inbox's files waiting for the job they start from.
    pub inbox_waiting: crate::inbox::Waiting,
}

/// CORS for browser tools on other origins: only the configured ones (none by default).
fn cors(config: &Config) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<axum::http::HeaderValue> = config
        .cors
        .origins
        .iter()
        .filter_map(|o| o.parse().ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ])
}

/// Builds the whole router.
pub fn app(state: AppState) -> Router {
    let limit = state.config.limits.max_body_bytes;
    Router::new()
        .merge(jobs::router(state.config.limits.max_input_bytes))
        .merge(history::router())
        .merge(batches::router())
        .merge(outputs::router())
        .merge(farm::router())
        .merge(inputs::router(state.config.limits.max_input_bytes))
        .merge(system::router())
        .merge(backends::router())
        .merge(events::router())
        .merge(dashboard::router())
        .merge(openapi::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            dashboard::require_token,
        ))
        .layer(cors(&state.config))
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
