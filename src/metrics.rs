//! Prometheus metrics at `GET /metrics`.
//!
//! Why the `metrics` crate with its Prometheus exporter: the text format,
//! label escaping and histogram buckets are the exporter's job, not ours.
//! Counters and histograms are recorded where things happen (submissions in
//! the API, completions and failures in dispatch, backend health in the
//! monitor, every HTTP request in a middleware); job counts by state are read
//! from the database at each scrape, so they are never out of step with it.
//! One recorder serves the process (as Prometheus expects one endpoint per
//! process).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::store::{JobStatus, Store};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Seconds, from a few milliseconds (HTTP) to an hour (long renders).
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
];

/// Installs the process's recorder (once); `None` if another one was installed first.
pub fn init() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .install_recorder()
                .map_err(|e| tracing::warn!(error = %e, "metrics are off"))
                .ok()
        })
        .as_ref()
}

/// Folds recorded histogram samples into their buckets every few seconds,
/// until the service stops. The exporter keeps every sample until an
/// upkeep: without one, a service nobody scrapes grew by a sample per
/// HTTP request and two per job, without end.
pub async fn upkeep(stop: tokio_util::sync::CancellationToken) {
    let Some(handle) = init() else {
        return;
    };
    use crate::periodic::{every, First};
    let period = std::time::Duration::from_secs(5);
    every(period, First::Now, stop, || {
        handle.run_upkeep();
        std::future::ready(())
    })
    .await
}

/// The metrics in the Prometheus text format.
pub async fn render(store: &Store) -> String {
    let Some(handle) = init() else {
        return String::new();
    };
    if let Ok(counts) = store.job_counts().await {
        for s in JobStatus::ALL {
            let n = counts
                .iter()
                .find(|(k, _)| *k == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            metrics::gauge!("orchestrator_jobs", "status" => s.as_str()).set(n as f64);
        }
    }
    // Paused jobs are counted in their status too (queued, waiting): this
    // is what a batch nobody resumed looks like to an alert.
    if let Ok(n) = store.paused_count().await {
        metrics::gauge!("orchestrator_jobs_paused").set(n as f64);
    }
    // Under the names Prometheus's own process collectors use, so that
    // dashboards and alerts written for them work as they are.
    let (open, resident) = tokio::task::spawn_blocking(|| {
        (crate::open_files::in_use(), crate::memory::resident_bytes())
    })
    .await
    .unwrap_or_default();
    if let Some(n) = open {
        metrics::gauge!("process_open_fds").set(n as f64);
    }
    if let Some(n) = crate::open_files::limit() {
        metrics::gauge!("process_max_fds").set(n as f64);
    }
    if let Some(n) = resident {
        metrics::gauge!("process_resident_memory_bytes").set(n as f64);
    }
    handle.run_upkeep();
    handle.render()
}

/// Counts every HTTP request and its latency, by route and status.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("orchestrator_http_requests_total", &labels).increment(1);
    metrics::histogram!("orchestrator_http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

/// A job was stored.
pub fn submitted(workflow: Option<&str>) {
    metrics::counter!("orchestrator_submissions_total", "workflow" => workflow.unwrap_or("inline").to_string()).increment(1);
}

/// Seconds from `t` to now, for the histograms: never negative (the wall
/// clock may step back between two readings).
pub fn seconds_since(t: chrono::DateTime<chrono::Utc>) -> f64 {
    (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
}

/// A job started on a backend after waiting `wait_s` seconds in the queue.
pub fn started(workflow: Option<&str>, backend: &str, wait_s: f64) {
    metrics::histogram!("orchestrator_queue_wait_seconds", "workflow" => workflow.unwrap_or("inline").to_string(), "backend" => backend.to_string())
        .record(wait_s);
}

/// A job completed after running `run_s` seconds.
pub fn completed(workflow: Option<&str>, backend: &str, run_s: f64) {
    let w = workflow.unwrap_or("inline").to_string();
    metrics::counter!("orchestrator_completions_total", "workflow" => w.clone(), "backend" => backend.to_string()).increment(1);
    metrics::histogram!("orchestrator_run_seconds", "workflow" => w, "backend" => backend.to_string()).record(run_s);
}

/// An attempt failed (`final`: the job failed for good).
pub fn failed(workflow: Option<&str>, backend: &str, is_final: bool) {
    metrics::counter!(
        "orchestrator_failures_total",
        "workflow" => workflow.unwrap_or("inline").to_string(),
        "backend" => backend.to_string(),
        "final" => is_final.to_string()
    )
    .increment(1);
}

/// What a retention sweep freed.
pub fn retained(s: &crate::retention::Swept) {
    for (kind, files, bytes) in [
        ("outputs", s.output_files, s.output_bytes),
        ("inputs", s.input_files, s.input_bytes),
        ("logs", s.log_files, s.log_bytes),
    ] {
        metrics::counter!("orchestrator_retention_files_deleted_total", "kind" => kind)
            .increment(files);
        metrics::counter!("orchestrator_retention_bytes_freed_total", "kind" => kind)
            .increment(bytes);
    }
    metrics::counter!("orchestrator_retention_progress_events_deleted_total")
        .increment(s.progress_events);
}

/// Whether a backend is in quarantine (a sick box), set at each scrape:
/// an alert on it tells the operator to look at the box.
pub fn quarantined(id: &str, yes: bool) {
    metrics::gauge!("orchestrator_backend_quarantined", "backend" => id.to_string()).set(if yes {
        1.0
    } else {
        0.0
    });
}

/// Free space on the data folder's disk (read every few seconds): a studio's
/// monitoring alerts on it before the farm stops for want of it.
pub fn data_disk_free(bytes: u64) {
    metrics::gauge!("orchestrator_data_disk_free_bytes").set(bytes as f64);
}

/// A backend's health and VRAM, as its last poll found them.
pub fn backend(id: &str, up: bool, vram_total: Option<i64>, vram_free: Option<i64>) {
    metrics::gauge!("orchestrator_backend_up", "backend" => id.to_string()).set(if up {
        1.0
    } else {
        0.0
    });
    if let Some(v) = vram_total {
        metrics::gauge!("orchestrator_backend_vram_total_bytes", "backend" => id.to_string())
            .set(v as f64);
    }
    if let Some(v) = vram_free {
        metrics::gauge!("orchestrator_backend_vram_free_bytes", "backend" => id.to_string())
            .set(v as f64);
    }
}
