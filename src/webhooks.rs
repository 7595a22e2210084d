//! Webhook delivery: when a job with a `callback_url` ends, POST a summary.
//!
//! Why an outbox: the webhook is queued in the same transaction that ends
//! the job, and delivered from the database by this task with back-off, so a
//! receiver that is down, or an orchestrator restart, delays a callback but
//! never loses it. Each delivery is signed with an HMAC when a secret is set,
//! so receivers can check it came from us.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::EventHub;
use crate::store::{EventFilter, JobStatus, Store, Webhook};

/// Header carrying `sha256=HEX` (HMAC-SHA256 of the body).
pub const SIGNATURE_HEADER: &str = "X-Orchestrator-Signature";

/// Delivers due webhooks until `stop`.
///
/// A job's end queues its webhook in the transaction that appends its final
/// event, so the task looks at the outbox when such events come (and when a
/// retry falls due), not after every commit: a busy farm commits many
/// times a second, and two reads a commit were most of the reading the
/// service did.
pub async fn run(
    store: Store,
    events: EventHub,
    config: std::sync::Arc<Config>,
    stop: CancellationToken,
) {
    let Some(http) = client(&config, "webhooks") else {
        return;
    };
    let ends = EventFilter {
        statuses: JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect(),
        ..Default::default()
    };
    // Followed from before the first look at the outbox: no end falls between.
    let mut ends = std::pin::pin!(events.follow_from(ends, None).1);
    loop {
        let wait = match store.webhook_queue(32).await {
            // Delivered ones may be due again soon (a retry): look again
            // after the loop's shortest wait rather than trust a time read
            // before they were tried.
            Ok((due, _)) if !due.is_empty() => {
                for hook in due {
                    deliver(&store, &config, &http, hook).await;
                }
                Duration::ZERO
            }
            Ok((_, Some(at))) => (at - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(60)),
            Ok((_, None)) => Duration::from_secs(60),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook outbox");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            ended = ends.next() => {
                // The stream ends with the service.
                if ended.is_none() {
                    return;
                }
                // Jobs that ended together: one look for all of them.
                while let Some(Some(_)) = ends.next().now_or_never() {}
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// The JSON a receiver gets: the job's end, its outputs with URLs, its error.
pub async fn payload(store: &Store, config: &Config, job_id: &str) -> Option<Value> {
    let job = store.job(job_id).await.ok()??;
    let outputs = store.job_outputs(job_id).await.ok()?;
    let base = config.base_url();
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "kind": o.kind,
                "size": o.size,
                "sha256": o.sha256,
                "content_type": o.content_type,
                "url": format!("{base}/api/job/{job_id}/outputs/{}", o.name),
            })
        })
        .collect();
    let job = crate::api::wire::Job::from(job);
    Some(json!({
        "job_id": job.job_id,
        "status": job.status,
        "workflow_id": job.workflow_id,
        "metadata": job.metadata,
        "attempts": job.attempts,
        "backend_id": job.backend_id,
        "submitted_at": job.submitted_at,
        "finished_at": job.finished_at,
        "outputs": outputs,
        "error": job.error,
        "url": format!("{base}/api/job/{job_id}"),
    }))
}

/// The HTTP client of deliveries to receivers outside (`what`: webhooks
/// or alerts), with `webhooks.timeout_ms`; `None`, said in the log, if
/// there can be none.
pub(crate) fn client(config: &Config, what: &str) -> Option<reqwest::Client> {
    match reqwest::Client::builder()
        .timeout(Duration::from_millis(config.webhooks.timeout_ms))
        .build()
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "{what} off: no HTTP client");
            None
        }
    }
}

/// How long after its `tries`-th failed try a delivery is tried again:
/// `webhooks.retry_backoff_ms`, doubling, at most 5 minutes.
pub(crate) fn retry_delay(config: &Config, tries: i64) -> chrono::Duration {
    let ms = (config.webhooks.retry_backoff_ms as f64 * 2f64.powi((tries - 1).clamp(0, 20) as i32))
        .min(300_000.0);
    chrono::Duration::milliseconds(ms as i64)
}

/// POSTs `body` as JSON with `req`, signed when `webhooks.secret` is set;
/// `Err` says why the receiver did not take it.
pub(crate) async fn post(
    config: &Config,
    req: reqwest::RequestBuilder,
    body: &Value,
) -> Result<(), String> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(secret) = &config.webhooks.secret {
        req = req.header(SIGNATURE_HEADER, sign(secret, &body));
    }
    match req.body(body).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("the receiver answered HTTP {}", r.status())),
        Err(e) => Err(format!(
            "cannot reach the receiver: {}",
            crate::with_causes(&e)
        )),
    }
}

/// HMAC-SHA256 of `body` with `secret`, as `sha256=HEX`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

async fn deliver(store: &Store, config: &Config, http: &reqwest::Client, hook: Webhook) {
    let Some(body) = payload(store, config, &hook.job_id).await else {
        record(store, &hook, false, Some("job not found".into()), None).await;
        return;
    };
    let req = http
        .post(&hook.url)
        .header("X-Orchestrator-Job", &hook.job_id);
    let error = post(config, req, &body).await.err();
    let tries = hook.attempts + 1;
    match error {
        None => {
            tracing::info!(job_id = %hook.job_id, url = %hook.url, tries, "webhook delivered");
            record(store, &hook, true, None, None).await;
        }
        Some(e) if tries >= config.webhooks.max_attempts as i64 => {
            tracing::warn!(job_id = %hook.job_id, url = %hook.url, tries, error = %e, "webhook given up");
            record(store, &hook, false, Some(e), None).await;
        }
        Some(e) => {
            let next = chrono::Utc::now() + retry_delay(config, tries);
            tracing::info!(job_id = %hook.job_id, url = %hook.url, tries, error = %e, retry_at = %next, "webhook will be retried");
            record(store, &hook, false, Some(e), Some(next)).await;
        }
    }
}

/// Records a try. One that cannot be recorded (the disk full, the service
/// stopping) is made again later: a receiver may then get the callback
/// twice, which its job id lets it tell.
async fn record(
    store: &Store,
    hook: &Webhook,
    delivered: bool,
    error: Option<String>,
    retry_at: Option<chrono::DateTime<chrono::Utc>>,
) {
    if let Err(e) = store
        .webhook_tried(hook.id, delivered, error, retry_at)
        .await
    {
        tracing::warn!(job_id = %hook.job_id, url = %hook.url, error = %e, "cannot record the webhook's try; it is made again later");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_rfc_4231_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
