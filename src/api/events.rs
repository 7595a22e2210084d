//! Live progress routes: server-sent events and a WebSocket.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::events::Published;
use crate::store::{EventFilter, JobStatus};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/events", get(sse))
        .route("/api/ws", get(ws))
}

/// Most jobs one subscription may name (`job_id`).
const MAX_JOB_IDS: usize = 1000;

/// Refuses a subscription naming more than [`MAX_JOB_IDS`] jobs.
fn check_job_ids(ids: &[String]) -> Result<(), ApiError> {
    if ids.len() > MAX_JOB_IDS {
        return Err(ApiError::invalid(
            "job_id",
            format!(
                "names {} jobs; at most {MAX_JOB_IDS} per subscription",
                ids.len()
            ),
        ));
    }
    Ok(())
}

fn parse(query: Option<&str>, headers: &HeaderMap) -> Result<(EventFilter, Option<i64>), ApiError> {
    let mut f = EventFilter::default();
    let mut after: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "must be an event sequence number"))
        })
        .transpose()?;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "job_id" => f.job_ids.extend(
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            "status" => super::history::parse_statuses(&value, &mut f.statuses)?,
            "workflow_id" => f.workflow_id = Some(value.to_string()),
            "after" => {
                after =
                    Some(value.parse().map_err(|_| {
                        ApiError::invalid("after", "must be an event sequence number")
                    })?)
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!(
                        "unknown query parameter `{other}` (job_id, status, workflow_id, after)"
                    ),
                ))
            }
        }
    }
    check_job_ids(&f.job_ids)?;
    Ok((f, after))
}

/// A comment line every so often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The frames of `events`, several per write when several are ready (a
/// thousand dashboards cost a thousand writes per commit, not per event),
/// with a keep-alive comment when the stream is quiet; ends with `events`.
fn sse_body(
    events: impl Stream<Item = Arc<Published>> + Send + 'static,
) -> impl Stream<Item = Result<bytes::Bytes, Infallible>> + Send + 'static {
    let frames = events.ready_chunks(64).map(|batch| match batch.as_slice() {
        // The usual case: the frame built once for everyone, not copied.
        [one] => one.sse.clone(),
        _ => {
            let mut buf = bytes::BytesMut::new();
            for p in batch {
                buf.extend_from_slice(&p.sse);
            }
            buf.freeze()
        }
    });
    let tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    futures::stream::unfold(
        (frames.boxed(), tick),
        |(mut frames, mut tick)| async move {
            let next = tokio::select! {
                frame = frames.next() => frame?,
                _ = tick.tick() => bytes::Bytes::from_static(b": keep-alive\n\n"),
            };
            Some((Ok(next), (frames, tick)))
        },
    )
}

/// Server-sent events: job state changes, progress (a few a second at most)
/// and backend state changes, each with its sequence number as the event id.
/// Reconnect with `Last-Event-ID` (or `?after=SEQ`) to get what you missed;
/// without either, the stream starts now.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "events",
    params(
        ("job_id" = Option<String>, Query, description = "Only these jobs (repeat or comma-separate)"),
        ("status" = Option<String>, Query, description = "Only events leaving a job in these statuses"),
        ("workflow_id" = Option<String>, Query, description = "Only jobs of this workflow"),
        ("after" = Option<i64>, Query, description = "Resume after this sequence number (or send Last-Event-ID)"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`; each event's `data` is an Event", content_type = "text/event-stream", body = super::wire::Event),
        (status = 422, body = super::ErrorBody),
    )
)]
pub(super) async fn sse(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (filter, after) = parse(query.as_deref(), &headers)?;
    let (_, events) = state.events.follow_from(filter, after);
    let body = axum::body::Body::from_stream(sse_body(events));
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// Messages a WebSocket client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    /// Start (or replace) the subscription.
    Subscribe {
        #[serde(default)]
        job_ids: Vec<String>,
        #[serde(default)]
        status: Vec<JobStatus>,
        #[serde(default)]
        workflow_id: Option<String>,
        #[serde(default)]
        after: Option<i64>,
        /// Relay the backends' live preview images of these jobs.
        #[serde(default)]
        previews: bool,
    },
    /// Stop the subscription (the socket stays open).
    Unsubscribe,
}

/// The event stream over a WebSocket. Send `{"type": "subscribe", "job_ids":
/// [...], "status": [...], "workflow_id": ..., "after": SEQ, "previews": true}`
/// and `{"type": "unsubscribe"}`; receive `{"type": "event", "event": Event}`,
/// and, with `previews`, `{"type": "preview", "job_id", "format"}` each
/// followed by one binary frame holding the image.
#[utoipa::path(
    get,
    path = "/api/ws",
    tag = "events",
    responses((status = 101, description = "WebSocket upgrade"))
)]
pub(super) async fn ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| ws_session(state, socket))
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = std::sync::Arc<Published>> + Send>>;

async fn ws_session(state: AppState, mut socket: WebSocket) {
    let mut events: Option<EventStream> = None;
    let mut preview_jobs: Option<Vec<String>> = None;
    let mut previews = state.farm.subscribe_previews();
    let stop = state.farm.stop_token();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            incoming = socket.recv() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                match serde_json::from_str::<ClientMessage>(text.as_str()) {
                    Ok(ClientMessage::Subscribe { job_ids, status, workflow_id, after, previews: want }) => {
                        if let Err(e) = check_job_ids(&job_ids) {
                            let err = json!({"type": "error", "error": e.body().error});
                            if socket.send(Message::Text(err.to_string().into())).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        preview_jobs = want.then(|| job_ids.clone());
                        let filter = EventFilter { job_ids, statuses: status, workflow_id };
                        let (after, stream) = state.events.follow_from(filter, after);
                        events = Some(Box::pin(stream));
                        let ack = json!({"type": "subscribed", "after": after});
                        if socket.send(Message::Text(ack.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                    Ok(ClientMessage::Unsubscribe) => {
                        events = None;
                        preview_jobs = None;
                        let ack = json!({"type": "unsubscribed"});
                        if socket.send(Message::Text(ack.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let err = json!({"type": "error", "error": {"code": "bad_message", "message": format!("not a subscribe or unsubscribe message: {e}")}});
                        if socket.send(Message::Text(err.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                }
            }
            next = async { match events.as_mut() { Some(s) => s.next().await, None => std::future::pending().await } } => {
                let Some(p) = next else { return };
                let msg = format!(r#"{{"type":"event","event":{}}}"#, p.json);
                if socket.send(Message::Text(msg.into())).await.is_err() {
                    return;
                }
            }
            preview = previews.recv() => {
                let Ok(p) = preview else { continue };
                let wanted = preview_jobs.as_ref().is_some_and(|jobs| jobs.is_empty() || jobs.contains(&p.job_id));
                if wanted {
                    let head = json!({"type": "preview", "job_id": p.job_id, "format": p.format});
                    if socket.send(Message::Text(head.to_string().into())).await.is_err()
                        || socket.send(Message::Binary(p.image)).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::JobEvent;

    fn event(seq: i64) -> Arc<Published> {
        Published::new(JobEvent {
            seq,
            job_id: Some(format!("job-{seq}")),
            workflow_id: None,
            at: chrono::Utc::now(),
            kind: "running".into(),
            status: None,
            backend_id: None,
            attempt: None,
            message: None,
            data: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn events_ready_together_share_a_write_and_a_quiet_stream_gets_keep_alives() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut body = Box::pin(sse_body(rx));
        tx.unbounded_send(event(1)).unwrap();
        tx.unbounded_send(event(2)).unwrap();
        let first = body.next().await.unwrap().unwrap();
        let text = String::from_utf8(first.to_vec()).unwrap();
        assert!(
            text.starts_with("id: 1\nevent: running\ndata: {")
                && text.contains("\n\nid: 2\nevent: running\ndata: {")
                && text.ends_with("}\n\n"),
            "{text}"
        );
        let start = tokio::time::Instant::now();
        let quiet = body.next().await.unwrap().unwrap();
        assert_eq!(&quiet[..], b": keep-alive\n\n");
        assert_eq!(start.elapsed(), KEEP_ALIVE);
        drop(tx);
        assert!(
            body.next().await.is_none(),
            "the stream ends with its events"
        );
    }
}
