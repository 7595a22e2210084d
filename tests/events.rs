//! Live progress over real connections: server-sent events, the WebSocket,
//! and webhooks, against simulated backends.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A minimal SSE reader: yields (id, event, data) as they arrive.
struct SseReader {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl SseReader {
    async fn open(url: &str, last_event_id: Option<i64>) -> SseReader {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseReader {
            stream: Box::pin(r.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<(i64, String, Value)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                match id {
                    Some(id) => return Some((id, event, serde_json::from_str(&data).unwrap())),
                    None => continue, // keep-alive comment
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.stream.next())
                .await
                .ok()??
                .ok()?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn a_subscriber_sees_a_jobs_whole_life_in_order() {
    let sim = start_sim(1_200).await;
    let app = spawn_farm(vec![backend("n1", sim.port, &[], 1)]).await;
    app.wait_backend("n1", "online").await;
    let mut sse = SseReader::open(&format!("{}/api/events", app.url), None).await;
    let id = app.submit_blur(json!({})).await;
    let mut kinds = Vec::new();
    let mut statuses = Vec::new();
    let mut last = 0;
    while let Some((seq, kind, data)) = sse.next().await {
        assert!(seq > last, "sequence numbers increase");
        last = seq;
        if data["job_id"] != id.as_str() {
            continue;
        }
        assert_eq!(data["kind"], kind.as_str());
        if statuses.last() != Some(&data["status"]) && !data["status"].is_null() {
            statuses.push(data["status"].clone());
        }
        kinds.push(kind.clone());
        if kind == "completed" {
            break;
        }
    }
    assert_eq!(
        statuses,
        [
            json!("queued"),
            json!("assigned"),
            json!("running"),
            json!("completed")
        ]
    );
    let progress = kinds.iter().filter(|k| *k == "progress").count();
    assert!(progress >= 1, "{kinds:?}");
    // Bounded rate: the simulator sent 4 node changes and 4 steps in 1.2 s.
    assert!(progress <= 8, "{kinds:?}");
    let first_progress = kinds.iter().position(|k| k == "progress").unwrap();
    assert!(kinds[..first_progress].contains(&"running".to_string()));
    // The log keeps the last progress, and the job shows it.
    let events = app.events(&id).await;
    let last_progress = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "progress")
        .unwrap();
    assert!(last_progress["data"]["node"].as_str().is_some());
}

#[tokio::test]
async fn reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing_across_a_restart() {
    let app = spawn_app().await;
    for _ in 0..5 {
        app.submit_blur(json!({})).await;
    }
    let mut seen: Vec<i64> = Vec::new();
    {
        let mut sse = SseReader::open(&format!("{}/api/events?after=0", app.url), None).await;
        for _ in 0..3 {
            seen.push(sse.next().await.unwrap().0);
        }
    }
    for _ in 0..5 {
        app.submit_blur(json!({})).await;
    }
    let app = app.restart().await;
    for _ in 0..5 {
        app.submit_blur(json!({})).await;
    }
    let total = app.store.latest_event_seq().await.unwrap();
    let mut sse = SseReader::open(
        &format!("{}/api/events", app.url),
        Some(*seen.last().unwrap()),
    )
    .await;
    while *seen.last().unwrap() < total {
        seen.push(sse.next().await.unwrap().0);
    }
    let expected: Vec<i64> = (1..=total).collect();
    assert_eq!(seen, expected, "every event exactly once, in order");
    // Filters: one job's events only.
    let (_, list) = app.get("/api/jobs?limit=1").await;
    let one = list["jobs"][0]["job_id"].as_str().unwrap();
    let mut sse = SseReader::open(
        &format!("{}/api/events?after=0&job_id={one}", app.url),
        None,
    )
    .await;
    let (_, kind, data) = sse.next().await.unwrap();
    assert_eq!(
        (kind.as_str(), data["job_id"].as_str()),
        ("submitted", Some(one))
    );
    let (status, body) = app.get("/api/events?colour=red").await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("colour"))
    );
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_stop_jobs_from_completing() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("n1", sim.port, &[], 2)]).await;
    app.wait_backend("n1", "online").await;
    // Opened and never read: an SSE stream and a WebSocket subscription.
    let stuck_sse = reqwest::Client::new()
        .get(format!("{}/api/events?after=0", app.url))
        .send()
        .await
        .unwrap();
    let (mut stuck_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/ws", &app.url[7..]))
            .await
            .unwrap();
    stuck_ws
        .send(Message::Text(
            json!({"type": "subscribe", "after": 0, "previews": true})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            app.submit_blur(json!({"parameters": {"color": i, "width": 512, "height": 512}}))
                .await,
        );
    }
    for id in &ids {
        app.wait_status(id, "completed").await;
    }
    drop(stuck_sse);
    drop(stuck_ws);
}

#[tokio::test]
async fn the_websocket_subscribes_unsubscribes_and_relays_live_previews() {
    let sim = start_sim(1_500).await;
    let app = spawn_farm(vec![backend("n1", sim.port, &[], 1)]).await;
    app.wait_backend("n1", "online").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/api/ws", &app.url[7..]))
        .await
        .unwrap();
    let id = app.submit_blur(json!({})).await;
    ws.send(Message::Text(
        json!({"type": "subscribe", "job_ids": [id], "after": 0, "previews": true})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut kinds = Vec::new();
    let mut previews = 0;
    let mut expect_binary = false;
    while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .unwrap()
    {
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str().unwrap() {
                    "event" => {
                        assert_eq!(v["event"]["job_id"], id.as_str());
                        kinds.push(v["event"]["kind"].as_str().unwrap().to_string());
                        if v["event"]["kind"] == "completed" {
                            break;
                        }
                    }
                    "preview" => {
                        assert_eq!(v["job_id"], id.as_str());
                        assert_eq!(v["format"], "png");
                        expect_binary = true;
                    }
                    _ => {}
                }
            }
            Message::Binary(b) => {
                assert!(expect_binary, "a binary frame follows its preview header");
                assert_eq!(&b[..4], b"\x89PNG");
                previews += 1;
                expect_binary = false;
            }
            _ => {}
        }
    }
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("submitted"),
        "after: 0 replays from the start"
    );
    assert!(previews >= 1, "live previews relayed");
    ws.send(Message::Text(
        json!({"type": "unsubscribe"}).to_string().into(),
    ))
    .await
    .unwrap();
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            if serde_json::from_str::<Value>(t.as_str()).unwrap()["type"] == "unsubscribed" {
                break;
            }
        }
    }
    ws.send(Message::Text("nonsense".into())).await.unwrap();
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "error" {
                assert_eq!(v["error"]["code"], "bad_message");
                break;
            }
        }
    }
}

/// A webhook receiver on loopback that fails its first `fail_first` requests.
async fn receiver(fail_first: usize) -> (String, Got, Arc<Mutex<usize>>) {
    let got: Got = Arc::default();
    let tries: Arc<Mutex<usize>> = Arc::default();
    let (g, t) = (got.clone(), tries.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (g, t) = (g.clone(), t.clone());
            async move {
                let n = {
                    let mut t = t.lock().unwrap();
                    *t += 1;
                    *t
                };
                if n <= fail_first {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                let sig = headers
                    .get("x-orchestrator-signature")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let expected = orchestrator::webhooks::sign("s3cret", body.as_bytes());
                assert_eq!(sig, expected, "signed with the configured secret");
                g.lock()
                    .unwrap()
                    .push((serde_json::from_str(&body).unwrap(), sig));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got, tries)
}

/// What a receiver had: each body, with its signature.
type Got = Arc<Mutex<Vec<(Value, String)>>>;

/// The alerts `got` holds of `kind` and of `batch` (either, any when
/// `None`); `None` while there is none, for `poll`.
fn alerts_in(got: &Got, kind: Option<&str>, batch: Option<&str>) -> Option<Vec<Value>> {
    let of: Vec<Value> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(v, _)| v.clone())
        .filter(|v| kind.is_none_or(|k| v["kind"] == k) && batch.is_none_or(|b| v["batch"] == b))
        .collect();
    (!of.is_empty()).then_some(of)
}

/// Asserts that `got` had each event told once, in order.
fn told_once_in_order(got: &Got) {
    let seqs: Vec<i64> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(v, _)| v["event_seq"].as_i64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "each event told once, in order: {seqs:?}"
    );
}

#[tokio::test]
async fn a_webhook_receiver_that_fails_at_first_gets_the_callback_once_it_answers() {
    let sim = start_sim(0).await;
    let (hook, got, tries) = receiver(2).await;
    let (mut config, dir) = farm_config(vec![backend("n1", sim.port, &[], 1)]);
    config.webhooks.secret = Some("s3cret".into());
    config.webhooks.retry_backoff_ms = 50;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    let id = app
        .submit_blur(json!({"callback_url": hook, "metadata": {"shot": "sh1"}}))
        .await;
    app.wait_status(&id, "completed").await;
    let (payload, _) = poll("the callback", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(*tries.lock().unwrap(), 3, "two failures, then delivered");
    assert_eq!(payload["job_id"], id.as_str());
    assert_eq!(payload["status"], "completed");
    assert_eq!(payload["metadata"]["shot"], "sh1");
    let url = payload["outputs"][0]["url"].as_str().unwrap();
    assert!(
        url.ends_with(&format!("/api/job/{id}/outputs/orchestrator_00001_.png")),
        "{url}"
    );
    let job = app
        .wait_job(&id, "webhook recorded", |j| {
            j["webhooks"][0]["delivered_at"].is_string()
        })
        .await;
    assert_eq!(job["webhooks"][0]["attempts"], 3);
    // Delivered, and recorded so: the outbox holds no more tries of it.
    assert_eq!(got.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_webhook_survives_a_kill_9_of_the_orchestrator() {
    let sim = start_sim(0).await;
    // The receiver fails for a long while: the outbox still holds it at the crash.
    let (hook, got, tries) = receiver(4).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "monitor: {{poll_interval_ms: 50}}\nwebhooks: {{secret: s3cret, retry_backoff_ms: 100}}\nbackends:\n  - {{id: n1, host: 127.0.0.1, port: {}}}\n",
            sim.port
        ),
    );
    let bin = spawn_binary(&config).await;
    let id = bin
        .submit(&json!({"workflow_id": "image_blur", "callback_url": hook}))
        .await;
    poll("two failed tries", || async {
        (*tries.lock().unwrap() >= 2).then_some(())
    })
    .await;
    bin.kill9().await;
    assert!(got.lock().unwrap().is_empty());
    let bin = spawn_binary(&config).await;
    let (payload, _) = poll("the callback after the restart", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(payload["job_id"], id.as_str());
    assert_eq!(payload["status"], "completed");
    bin.kill9().await;
}

#[tokio::test]
async fn open_streams_end_when_the_service_stops_so_the_stop_does_not_wait_for_them() {
    let (mut config, dir) = test_config();
    // A stop that waited for the streams would take two minutes.
    config.shutdown_timeout_s = 120;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    let sse = reqwest::Client::new()
        .get(format!("{}/api/events", app.url))
        .send()
        .await
        .unwrap();
    let mut sse = sse.bytes_stream();
    let ws_url = format!("{}/api/ws", app.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "subscribe"}).to_string().into(),
    ))
    .await
    .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(matches!(ack, Ok(Some(Ok(Message::Text(_))))), "{ack:?}");
    let stopping = tokio::spawn(app.stop());
    let within = Duration::from_secs(20);
    let sse_ended = tokio::time::timeout(within, async {
        while let Some(Ok(_)) = sse.next().await {}
    })
    .await;
    assert!(sse_ended.is_ok(), "the SSE stream ended on the stop");
    let ws_ended = tokio::time::timeout(within, async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(ws_ended.is_ok(), "the WebSocket was closed on the stop");
    let stopped = tokio::time::timeout(within, stopping).await;
    assert!(stopped.is_ok(), "the stop did not wait for the streams");
}

#[tokio::test]
async fn a_subscription_to_too_many_jobs_is_refused_with_the_field() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..1001).map(|i| format!("job-{i}")).collect();
    let (status, body) = app
        .get(&format!("/api/events?job_id={}", ids.join(",")))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "job_id");
}

/// An https webhook receiver on loopback, with the certificate of
/// `tests/fixtures/tls` (issued for 127.0.0.1 by the test CA beside it):
/// the bodies it was sent. A minimal HTTP/1.1: one request a connection.
async fn https_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/hook", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, g) = (acceptor.clone(), g.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = tls.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the request ended early");
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + len {
                        break buf[end + 4..end + 4 + len].to_vec();
                    }
                };
                g.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tls.shutdown().await;
            });
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_goes_to_an_https_receiver_whose_certificate_the_machine_trusts() {
    let sim = start_sim(0).await;
    let (hook, got) = https_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "monitor: {{poll_interval_ms: 50}}\nbackends:\n  - {{id: n1, host: 127.0.0.1, port: {}}}\n",
            sim.port
        ),
    );
    // The test CA, as a studio's own CA would be installed on the machine.
    let bin = spawn_binary_with_env(&config, &[("SSL_CERT_FILE", &test_ca())]).await;
    let id = bin
        .submit(&json!({"workflow_id": "image_blur", "callback_url": hook}))
        .await;
    let payload = poll("the callback over https", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(payload["job_id"], id.as_str());
    assert_eq!(payload["status"], "completed");
    bin.kill9().await;
}

#[tokio::test]
async fn a_webhook_to_an_https_receiver_the_machine_does_not_trust_is_refused_and_says_why() {
    let sim = start_sim(0).await;
    let (hook, got) = https_receiver().await;
    let (mut config, dir) = farm_config(vec![backend("n1", sim.port, &[], 1)]);
    config.webhooks.retry_backoff_ms = 50;
    config.webhooks.max_attempts = 1;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    let id = app.submit_blur(json!({"callback_url": hook})).await;
    let job = app
        .wait_job(&id, "the webhook given up", |j| {
            j["webhooks"][0]["gave_up_at"].is_string()
        })
        .await;
    let error = job["webhooks"][0]["last_error"].as_str().unwrap();
    assert!(
        error.contains("invalid peer certificate: UnknownIssuer"),
        "says why: {error}"
    );
    assert!(
        got.lock().unwrap().is_empty(),
        "nothing sent to an unverified server"
    );
}

/// The night's alerts reach whoever looks after the farm, once each: a
/// batch the farm paused (one alert, not one a job), a box frozen past
/// `alerts.offline_after_s`, and the same box back; signed and retried as
/// webhooks are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nights_alerts_reach_the_farms_keeper_once_each() {
    let sim = start_sim(20).await;
    let (hook, got, tries) = receiver(1).await;
    let (mut config, dir) = farm_config(vec![backend("n1", sim.port, &[], 1)]);
    config.webhooks.secret = Some("s3cret".into());
    config.webhooks.retry_backoff_ms = 50;
    config.alerts.url = Some(hook);
    config.alerts.offline_after_s = 1;
    config.dispatch.pause_batch_after = 3;
    config.dispatch.request_timeout_ms = 500;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    app.wait_backend("n1", "online").await;
    let broken = failing_graph();
    // Queued before the box takes any (one by one, each could have run
    // before the next came, and left none to pause).
    app.post_json("/api/backends/n1/disable", &json!({})).await;
    for n in 0..6 {
        let (status, body) = app
            .post_json(
                "/api/job",
                &json!({"workflow": broken, "max_attempts": 1, "metadata": {"batch": "night1", "n": n}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    app.post_json("/api/backends/n1/enable", &json!({})).await;
    let alerts = |kind: &'static str| {
        let got = &got;
        move || async move { alerts_in(got, Some(kind), None) }
    };
    let paused = poll("the batch's alert", alerts("batch_paused")).await;
    let text = paused[0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("orchestrator: batch night1 was paused by the farm: 3 of its jobs in a row failed with the same cause, IndexError in ImageToMask"),
        "{text}"
    );
    assert_eq!(paused[0]["batch"], "night1");
    assert!(
        *tries.lock().unwrap() >= 2,
        "the first try failed, and was retried"
    );
    // A frozen box: told once it stayed down a second, then when back.
    sim.hang(true);
    let down = poll("the offline alert", alerts("backend_offline")).await;
    assert_eq!(down[0]["backend_id"], "n1");
    assert!(
        down[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("orchestrator: backend n1 has been offline since "),
        "{}",
        down[0]
    );
    sim.hang(false);
    poll("the back alert", alerts("backend_back")).await;
    // One alert each: the batch's three paused jobs made one.
    let kinds: Vec<Value> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(v, _)| v["kind"].clone())
        .collect();
    assert_eq!(
        kinds,
        ["batch_paused", "backend_offline", "backend_back"],
        "{kinds:?}"
    );
}

/// An alert not yet delivered when the orchestrator is killed is told
/// after its restart, and one told is not told again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_not_told_before_a_kill_9_is_told_after_the_restart_and_only_once() {
    let sim = start_sim(0).await;
    // The receiver is down at first: the alert is still being tried at the crash.
    let (hook, got, tries) = receiver(4).await;
    let dir = tempfile::tempdir().unwrap();
    let config_with = |alerts: &str| {
        write_config(
            dir.path(),
            &format!(
                "monitor: {{poll_interval_ms: 50}}\nwebhooks: {{secret: s3cret, retry_backoff_ms: 100}}\n\
                 {alerts}dispatch: {{pause_batch_after: 2}}\n\
                 backends:\n  - {{id: n1, host: 127.0.0.1, port: {}}}\n",
                sim.port
            ),
        )
    };
    let config = config_with(&format!("alerts: {{url: '{hook}'}}\n"));
    let bin = spawn_binary(&config).await;
    queue_broken_batch(&bin, "night1").await;
    poll("two failed tries", || async {
        (*tries.lock().unwrap() >= 2).then_some(())
    })
    .await;
    bin.kill9().await;
    assert!(got.lock().unwrap().is_empty());
    let bin = spawn_binary(&config).await;
    let told = |batch: &'static str| {
        let got = &got;
        move || async move { alerts_in(got, None, Some(batch)).map(|a| a.len()) }
    };
    poll("the alert after the restart", told("night1")).await;
    // Stopped by its service manager (a kill -9 in the instant between the
    // receiver's answer and its record tells it again), and started once
    // more; then another batch breaks: its alert comes, the first batch's
    // does not come again.
    bin.stop().await;
    let bin = spawn_binary(&config).await;
    queue_broken_batch(&bin, "night2").await;
    poll("the second batch's alert", told("night2")).await;
    // (The first batch may have been paused twice: by the first binary,
    // and by the second if a job of it ran again after the kill and failed
    // alike; each pause is its own alert, told once.)
    told_once_in_order(&got);
    // Alerts turned off for a while, then on: what broke meanwhile is not
    // told (the first alerts after are of what happens from then).
    bin.stop().await;
    let bin = spawn_binary(&config_with("")).await;
    queue_broken_batch(&bin, "night3").await;
    let paused = |j: &Value| j["status"] == "queued" && j["paused_at"].is_string();
    poll("the third batch paused", || async {
        let page = bin.get("/api/jobs?metadata.batch=night3").await;
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(paused)
            .then_some(())
    })
    .await;
    bin.stop().await;
    let bin = spawn_binary(&config_with(&format!("alerts: {{url: '{hook}'}}\n"))).await;
    queue_broken_batch(&bin, "night4").await;
    poll("the fourth batch's alert", told("night4")).await;
    assert_eq!(told("night3")().await, None, "not told: alerts were off");
    bin.kill9().await;
}

/// Six jobs of a broken batch, queued while the box `n1` is disabled, then
/// let go: two a time on the box, the later ones are still queued when the
/// first two failures pause the batch (submitted one by one to a box that
/// fails at once, they could each have run before the next came).
async fn queue_broken_batch(bin: &Binary, batch: &str) {
    let admin = |what: &'static str| {
        reqwest::Client::new()
            .post(format!("{}/api/backends/n1/{what}", bin.url))
            .send()
    };
    assert!(admin("disable").await.unwrap().status().is_success());
    for n in 0..6 {
        bin.submit(&json!({"workflow": failing_graph(), "max_attempts": 1, "metadata": {"batch": batch, "n": n}}))
            .await;
    }
    assert!(admin("enable").await.unwrap().status().is_success());
}

/// The data folder's disk running low is told, and so is space freed: a
/// disk that fills at night stops the farm (outputs wait on their boxes,
/// submissions are refused) until someone frees space.
#[tokio::test]
async fn a_data_disk_running_low_is_told_and_so_is_space_freed() {
    let (hook, got, _) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &format!(
            "webhooks: {{secret: s3cret}}\nalerts: {{url: '{hook}'}}\nretention: {{low_space_bytes: 33554432}}\n"
        ),
    );
    // The data folder on a disk of its own, of 64 MiB.
    let Some(bin) = spawn_binary_after(
        &config,
        &format!(
            "mkdir -p '{0}' && mount -t tmpfs -o size=64m tmpfs '{0}'",
            data.display()
        ),
    )
    .await
    else {
        return;
    };
    let disk = bin.sees(&data);
    let kinds = || {
        got.lock()
            .unwrap()
            .iter()
            .map(|(v, _)| v["kind"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let text = |kind: &str| {
        got.lock()
            .unwrap()
            .iter()
            .find(|(v, _)| v["kind"] == kind)
            .map(|(v, _)| v["text"].as_str().unwrap().to_string())
    };
    // A render of long videos lands beside the database: 40 MiB.
    let renders = disk.join("renders.mov");
    std::fs::write(&renders, vec![1u8; 40 << 20]).unwrap();
    let low = poll("the disk_low alert", || async { text("disk_low") }).await;
    assert!(
        low.contains("under retention.low_space_bytes (32 MiB)"),
        "{low}"
    );
    // And for a studio's monitoring, in /metrics.
    let free = bin.metric("orchestrator_data_disk_free_bytes").await;
    assert!(free > 0.0 && free < 32.0 * 1024.0 * 1024.0, "{free}");
    std::fs::remove_file(&renders).unwrap();
    let ok = poll("the disk_ok alert", || async { text("disk_ok") }).await;
    assert!(ok.contains("free again"), "{ok}");
    assert_eq!(
        kinds(),
        ["disk_low", "disk_ok"],
        "a start with space says nothing"
    );
    bin.stop().await;
}

/// A batch fed one shot at a time (a tool that submits each shot as it is
/// ready) has nothing queued when it breaks, so nothing is paused: its
/// breaking is told, and the farm holds the batch, so each shot submitted
/// for it after is stored paused, through a restart, until the batch is
/// resumed. Resumed and broken again, it is told and held again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_breaks_with_nothing_queued_holds_its_next_shots_until_resumed() {
    let sim = start_sim(0).await;
    let (hook, got, _) = receiver(0).await;
    let (mut config, dir) = farm_config(vec![backend("n1", sim.port, &[], 1)]);
    config.webhooks.secret = Some("s3cret".into());
    config.alerts.url = Some(hook);
    config.dispatch.pause_batch_after = 3;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    app.wait_backend("n1", "online").await;
    async fn submit(app: &TestApp, n: usize) -> Value {
        let shot = json!({"workflow": failing_graph(), "max_attempts": 1, "metadata": {"batch": "night1", "n": n}});
        let (status, body) = app.post_json("/api/job", &shot).await;
        assert_eq!(status, 201, "{body}");
        body
    }
    let told = |got: &Got| alerts_in(got, Some("batch_broken"), Some("night1"));
    for n in 0..3 {
        let shot = submit(&app, n).await;
        assert!(shot.get("paused").is_none(), "{shot}");
        app.wait_status(shot["job_id"].as_str().unwrap(), "failed")
            .await;
    }
    let night1 = poll("night1's alert", || async { told(&got) }).await;
    let text = night1[0]["text"].as_str().unwrap();
    assert!(
        text.contains("batch night1: 3 of its jobs in a row failed with the same cause")
            && text.contains("none of its jobs was queued to pause: each job submitted for it from now is stored paused"),
        "{text}"
    );
    // The next shot waits, and says why.
    let held = |shot: &Value| {
        assert_eq!(shot["paused"], true, "{shot}");
        assert_eq!(
            shot["message"],
            "Job stored paused: the farm holds its batch (batch night1), found failing job after \
             job alike; once it is mended, let the batch go: POST /api/batch/night1/resume",
            "{shot}"
        );
        let warning = shot["warnings"][0].as_str().unwrap_or_default();
        assert!(
            warning.contains("the farm holds its batch (batch night1)")
                && warning.ends_with("orchestrator resume --batch night1"),
            "{shot}"
        );
        shot["job_id"].as_str().unwrap().to_string()
    };
    let first = held(&submit(&app, 3).await);
    let job = app.job(&first).await;
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("paused with its batch (batch night1): 3 of its jobs in a row failed with the same cause, IndexError in ImageToMask, on n1"),
        "{job}"
    );
    let events = app.events(&first).await;
    assert_eq!(events.last().unwrap()["message"], why, "{events:?}");
    let warned = |warnings: &[String]| {
        warnings
            .iter()
            .any(|w| w.starts_with("batch night1 was paused by the farm at "))
    };
    let warnings = app.health_warnings().await;
    assert!(warned(&warnings), "{warnings:?}");
    // A restart keeps the hold.
    let app = app.restart().await;
    app.wait_backend("n1", "online").await;
    let second = held(&submit(&app, 4).await);
    let warnings = app.health_warnings().await;
    assert!(warned(&warnings), "{warnings:?}");
    assert_eq!(app.job(&first).await["status"], "queued");
    // Mended (or so it is thought): the batch resumed, both held shots run.
    let (status, resumed) = app.post_json("/api/batch/night1/resume", &json!({})).await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["released"], true, "{resumed}");
    assert_eq!(resumed["resumed"], json!([first, second]), "{resumed}");
    let warnings = app.health_warnings().await;
    assert!(!warned(&warnings), "{warnings:?}");
    app.wait_status(&first, "failed").await;
    app.wait_status(&second, "failed").await;
    // Not held any more: the next shot runs, and is the third failure in
    // a row since the resume: broken again, told again, held again.
    let third = submit(&app, 5).await;
    assert!(third.get("paused").is_none(), "{third}");
    app.wait_status(third["job_id"].as_str().unwrap(), "failed")
        .await;
    poll("night1's second alert", || async {
        told(&got).filter(|a| a.len() == 2)
    })
    .await;
    held(&submit(&app, 6).await);
    // Another batch is not held.
    let (status, other) = app
        .post_json(
            "/api/job",
            &json!({"workflow": failing_graph(), "max_attempts": 1, "metadata": {"batch": "night2"}}),
        )
        .await;
    assert_eq!(status, 201, "{other}");
    assert!(other.get("paused").is_none(), "{other}");
    told_once_in_order(&got);
    app.stop().await;
}

/// An alert receiver on loopback that answers `200` a while after it has
/// the body (a slow chat server).
async fn slow_receiver(answer_after: Duration) -> (String, Got) {
    let got: Got = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let g = g.clone();
            async move {
                g.lock()
                    .unwrap()
                    .push((serde_json::from_str(&body).unwrap(), String::new()));
                tokio::time::sleep(answer_after).await;
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

/// A stop that comes while an alert's POST is in flight lets it finish:
/// the receiver has it, and it is not told again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_in_flight_at_a_stop_is_not_told_again_after_the_restart() {
    let sim = start_sim(0).await;
    let (hook, got) = slow_receiver(Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "monitor: {{poll_interval_ms: 50}}\nalerts: {{url: '{hook}'}}\n\
             dispatch: {{pause_batch_after: 2}}\n\
             backends:\n  - {{id: n1, host: 127.0.0.1, port: {}}}\n",
            sim.port
        ),
    );
    let told = |batch: &'static str| {
        let got = &got;
        move || async move { alerts_in(got, None, Some(batch)).map(|a| a.len()) }
    };
    let bin = spawn_binary(&config).await;
    queue_broken_batch(&bin, "night1").await;
    // The receiver has the alert, and answers in half a second: stopped now.
    poll("night1's alert at the receiver", told("night1")).await;
    bin.stop().await;
    let bin = spawn_binary(&config).await;
    queue_broken_batch(&bin, "night2").await;
    poll("night2's alert", told("night2")).await;
    told_once_in_order(&got);
    bin.kill9().await;
}
