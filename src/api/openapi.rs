//! The OpenAPI document and the interactive docs at `/docs`.
//!
//! Why utoipa with a vendored Swagger UI: the document is generated from the
//! handlers' own annotations, so it cannot drift from the routes, and the
//! docs page works on a farm network with no internet.

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use super::{backends, batches, events, farm, history, inputs, jobs, outputs, system, AppState};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orchestrator",
        description = "Durable job queue and render-farm manager in front of ComfyUI servers. \
            Every error answer is `{\"error\": {\"code\", \"message\", \"field\"?}}`."
    ),
    paths(
        jobs::submit_job,
        jobs::get_job,
        jobs::job_events,
        jobs::cancel_job,
        jobs::retry_job,
        jobs::set_priority,
        jobs::pause_job,
        jobs::resume_job,
        batches::resume_batch,
        jobs::schedule_job,
        outputs::get_output,
        farm::farm,
        history::list_jobs,
        history::count_jobs,
        inputs::upload,
        inputs::list,
        inputs::download,
        inputs::delete,
        events::sse,
        events::ws,
        system::health,
        system::metrics,
        system::workflows,
        system::reload_workflows,
        backends::list_backends,
        backends::get_backend,
        backends::refresh_backend,
        backends::enable_backend,
        backends::disable_backend,
        backends::drain_backend,
    ),
    tags(
        (name = "jobs", description = "Submit jobs and read their history"),
        (name = "inputs", description = "Pictures (and videos, sounds) jobs start from, stored by their SHA-256"),
        (name = "backends", description = "The ComfyUI farm"),
        (name = "events", description = "Live progress: server-sent events and a WebSocket; see docs/events.md"),
        (name = "workflows", description = "Workflow templates"),
        (name = "service", description = "Health"),
    )
)]
struct ApiDoc;

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(super) fn router() -> Router<AppState> {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", document()))
}
