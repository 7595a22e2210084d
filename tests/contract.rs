//! Contract tests: the recorded exchanges of a real ComfyUI 0.3.64
//! (`tests/fixtures/comfyui/`, recorded from a real server) replayed
//! against the simulator, and fed to the client's parsers, so that the real
//! server, the simulator and the client agree on every shape we rely on.

use std::time::Duration;

use futures::StreamExt;
use orchestrator::comfy::{rejection_summary, ComfyClient, ComfyError, HistoryEntry, WsEvent};
use orchestrator::simulator::{self, SimConfig, SimHandle};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn recorded(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/comfyui/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn sim(job_ms: u64) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    simulator::spawn(
        listener,
        SimConfig {
            job_ms,
            ..Default::default()
        },
    )
}

/// Every key the recorded value has, the simulated one has too, with a
/// value of the same JSON type (recursively; arrays by their first item).
fn assert_same_shape(recorded: &Value, simulated: &Value, path: &str) {
    match (recorded, simulated) {
        (Value::Object(r), Value::Object(s)) => {
            for (k, rv) in r {
                // Keys that are prompt ids differ by nature: compare the single entry.
                let sv = match s.get(k) {
                    Some(v) => v,
                    None if r.len() == 1 && s.len() == 1 && k.len() == 36 => {
                        s.values().next().unwrap()
                    }
                    None => panic!("{path}: simulated answer lacks key `{k}`: {simulated}"),
                };
                assert_same_shape(rv, sv, &format!("{path}.{k}"));
            }
        }
        (Value::Array(r), Value::Array(s)) => {
            if let (Some(r0), Some(s0)) = (r.first(), s.first()) {
                assert_same_shape(r0, s0, &format!("{path}[0]"));
            }
        }
        (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => {}
        _ => panic!("{path}: recorded {recorded} but simulated {simulated}"),
    }
}

/// The next event of a socket, within a deadline.
async fn next_event(events: &mut orchestrator::comfy::EventStream) -> WsEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the socket is open")
        .expect("a readable event")
}

fn requests(file: &Value) -> Vec<(Value, Value)> {
    file["exchange"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("request").is_some())
        .map(|e| (e["request"].clone(), e["response"].clone()))
        .collect()
}

fn ws_types(file: &Value) -> Vec<String> {
    file["exchange"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("ws"))
        .map(|m| m["type"].as_str().unwrap().to_string())
        .collect()
}

/// Message types as the orchestrator sees them: without `progress_state`
/// (recent versions only), `progress` (steps vary) and runs of `status`
/// collapsed (ComfyUI sends it once or twice per queue change).
fn normalise(types: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in types {
        if t == "progress_state" || t == "progress" {
            continue;
        }
        if t == "status" && out.last().map(String::as_str) == Some("status") {
            continue;
        }
        out.push(t.clone());
    }
    out
}

/// Connects a raw WebSocket and collects text messages until `executing`
/// with `node: null` for `prompt_id`; binary frames are counted.
async fn collect_until_done(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    prompt_id: &str,
) -> (Vec<Value>, usize) {
    let mut msgs = Vec::new();
    let mut binary = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = ws.next().await {
            match m.unwrap() {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    let done = v["type"] == "executing"
                        && v["data"]["node"].is_null()
                        && v["data"]["prompt_id"] == prompt_id;
                    msgs.push(v);
                    if done {
                        return;
                    }
                }
                Message::Binary(_) => binary += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("prompt finishes");
    (msgs, binary)
}

#[tokio::test]
async fn a_successful_prompt_runs_as_recorded() {
    let rec = recorded("success.json");
    let s = sim(20).await;
    let client_id = "8be338ce-c9ac-4685-b48e-4ca45e1de633";
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{}/ws?clientId={client_id}",
        s.port
    ))
    .await
    .unwrap();
    let reqs = requests(&rec);
    let (post, post_resp) = &reqs[0];
    let mut body = post["json"].clone();
    let pid = uuid::Uuid::new_v4().to_string();
    body["prompt_id"] = json!(pid);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/prompt", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        post_resp["status"].as_u64().unwrap() as u16
    );
    let answer: Value = r.json().await.unwrap();
    assert_same_shape(&post_resp["json"], &answer, "POST /prompt");
    assert_eq!(answer["prompt_id"], pid.as_str());

    let (msgs, binary) = collect_until_done(&mut ws, &pid).await;
    assert!(binary > 0, "preview frames are sent");
    let types: Vec<String> = msgs
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(normalise(&types), normalise(&ws_types(&rec)));
    // Each message has the recorded shape.
    let recorded_msgs: Vec<&Value> = rec["exchange"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("ws"))
        .collect();
    for m in &msgs {
        let same_kind = |r: &&&Value| {
            r["type"] == m["type"]
                && r["data"].get("sid").is_some() == m["data"].get("sid").is_some()
                && r["data"]["node"].is_null() == m["data"]["node"].is_null()
        };
        if let Some(r) = recorded_msgs.iter().find(same_kind) {
            assert_same_shape(&r["data"], &m["data"], m["type"].as_str().unwrap());
        }
    }
    assert_eq!(
        msgs[0]["data"]["sid"], client_id,
        "the first status carries the sid"
    );

    // History, view and queue answer as recorded.
    let (_, hist_resp) = &reqs[1];
    let h: Value = http
        .get(format!("{}/history/{pid}", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_same_shape(&hist_resp["body"], &h, "GET /history");
    let entry = HistoryEntry::parse(&h[&pid]).unwrap();
    assert_eq!(entry.status_str, "success");
    assert_eq!(entry.outputs.len(), 2, "batch_size 2 makes two images");
    let f = &entry.outputs[0];
    let r = http
        .get(format!("{}/view", s.url))
        .query(&[
            ("filename", &f.filename),
            ("subfolder", &f.subfolder),
            ("type", &f.file_type),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(
        hex(&bytes[..8]),
        reqs[2].1["body"]["first_8_bytes_hex"].as_str().unwrap()
    );
    let q: Value = http
        .get(format!("{}/queue", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q, reqs[3].1["body"]);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn the_same_graph_again_runs_from_cache_and_still_reports_outputs() {
    let rec = recorded("success_cached.json");
    let s = sim(0).await;
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let mut events = client.connect().await.unwrap();
    let graph = requests(&rec)[0].0["json"]["prompt"].clone();
    for round in 0..2 {
        let pid = uuid::Uuid::new_v4().to_string();
        client.submit(&pid, &graph).await.unwrap();
        let mut types = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let WsEvent::Other(t) = &ev {
                types.push(t.clone());
            }
            if matches!(&ev, WsEvent::Executing { prompt_id: Some(p), node: None } if *p == pid) {
                break;
            }
            if let WsEvent::Executing { node: Some(_), .. } = ev {
                types.push("executing".into());
            }
        }
        let entry = client.history(&pid).await.unwrap().unwrap();
        assert_eq!(entry.outputs.len(), 2, "round {round}: outputs reported");
        if round == 1 {
            assert!(
                !types.contains(&"executing".to_string()),
                "cached: no node runs"
            );
            let recorded_entry = HistoryEntry::parse(
                &requests(&rec)[1].1["body"]["cb798a5d-9e73-4e45-972a-fe0f37c189cc"],
            )
            .unwrap();
            assert_eq!(recorded_entry.outputs.len(), entry.outputs.len());
        }
    }
}

#[tokio::test]
async fn invalid_prompts_are_rejected_as_recorded() {
    let rec = recorded("rejected.json");
    let s = sim(0).await;
    let http = reqwest::Client::new();
    for (req, resp) in requests(&rec) {
        let r = http
            .post(format!("{}/prompt", s.url))
            .json(&req["json"])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap();
        assert_same_shape(&resp["json"], &body, "400 body");
        assert_eq!(body["error"]["type"], resp["json"]["error"]["type"]);
        assert_eq!(body["error"]["message"], resp["json"]["error"]["message"]);
        // The same node errors, of the same types, in the same order.
        let errors = |v: &Value| -> Vec<(String, String)> {
            v["node_errors"]
                .as_object()
                .unwrap()
                .iter()
                .flat_map(|(n, e)| {
                    e["errors"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(move |x| (n.clone(), x["type"].as_str().unwrap().to_string()))
                })
                .collect()
        };
        assert_eq!(errors(&body), errors(&resp["json"]));
        // The client turns both into the same sentence.
        assert_eq!(rejection_summary(&body), rejection_summary(&resp["json"]));
    }
    // And through the client, a 400 is `Rejected` with the body.
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let bad = requests(&rec)[0].0["json"]["prompt"].clone();
    match client.submit("p-1", &bad).await {
        Err(ComfyError::Rejected(body)) => {
            let summary = rejection_summary(&body.body);
            assert!(
                summary.contains("node 1 (EmptyImage): Value 99999999 bigger than max of 16384"),
                "{summary}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Runs the recorded prompt of `rec` on `s`: its prompt id, and the
/// `execution_error` the simulator sent for it, beside the recorded one.
async fn run_to_its_error(rec: &Value, client: &ComfyClient) -> (String, Value, Value) {
    let mut events = client.connect().await.unwrap();
    let graph = requests(rec)[0].0["json"]["prompt"].clone();
    let pid = uuid::Uuid::new_v4().to_string();
    client.submit(&pid, &graph).await.unwrap();
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WsEvent::ExecutionError { data, .. } => error = Some(data),
            WsEvent::Executing {
                prompt_id: Some(p),
                node: None,
            } if p == pid => break,
            _ => {}
        }
    }
    let recorded_error = rec["exchange"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ws"]["type"] == "execution_error")
        .unwrap()["ws"]["data"]
        .clone();
    (pid, error.expect("execution_error sent"), recorded_error)
}

#[tokio::test]
async fn a_full_disk_on_the_box_is_reported_as_recorded() {
    let rec = recorded("execution_error_disk_full.json");
    let s = sim(0).await;
    s.disk_full(true);
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let (pid, error, recorded_error) = run_to_its_error(&rec, &client).await;
    assert_same_shape(&recorded_error, &error, "execution_error");
    for field in ["node_type", "exception_type", "exception_message"] {
        assert_eq!(error[field], recorded_error[field], "{field}");
    }
    // The rule that leaves such a box out reads ComfyUI's own words.
    assert!(orchestrator::store::box_disk_full(&recorded_error));
    assert!(!orchestrator::store::against_the_job(&recorded_error));
    let entry = client.history(&pid).await.unwrap().unwrap();
    assert_eq!(entry.status_str, "error");
    assert!(entry.outputs.is_empty());
    // Space again: it saves.
    s.disk_full(false);
    let graph = requests(&rec)[0].0["json"]["prompt"].clone();
    let again = uuid::Uuid::new_v4().to_string();
    client.submit(&again, &graph).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entry = loop {
        if let Some(entry) = client.history(&again).await.unwrap() {
            break entry;
        }
        assert!(std::time::Instant::now() < deadline, "no history");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(entry.status_str, "success");
}

#[tokio::test]
async fn a_runtime_error_is_reported_as_recorded() {
    let rec = recorded("execution_error.json");
    let s = sim(0).await;
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let (pid, error, recorded_error) = run_to_its_error(&rec, &client).await;
    assert_same_shape(&recorded_error, &error, "execution_error");
    assert_eq!(error["exception_type"], recorded_error["exception_type"]);
    assert_eq!(error["node_id"], recorded_error["node_id"]);
    let entry = client.history(&pid).await.unwrap().unwrap();
    assert_eq!(entry.status_str, "error");
    assert!(!entry.completed);
    assert!(entry.outputs.is_empty());
    assert!(entry.message("execution_error").is_some());
    // The recorded history parses the same way.
    let rec_hist = &requests(&rec)[1].1["body"]["ad414670-53dc-45f1-b0da-b12668bdaa5b"];
    let rec_entry = HistoryEntry::parse(rec_hist).unwrap();
    assert_eq!(rec_entry.status_str, entry.status_str);
    assert_eq!(
        rec_entry.message("execution_error").unwrap()["node_type"],
        "ImageToMask"
    );
}

#[tokio::test]
async fn queue_delete_and_interrupt_work_as_recorded() {
    let rec = recorded("queue_interrupt_delete.json");
    let s = sim(2_000).await;
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let mut events = client.connect().await.unwrap();
    let reqs = requests(&rec);
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for (i, id) in ids.iter().enumerate() {
        client
            .submit(id, &reqs[i].0["json"]["prompt"])
            .await
            .unwrap();
    }
    // Wait until the first one runs.
    loop {
        if let WsEvent::ExecutionStart { prompt_id } = next_event(&mut events).await {
            assert_eq!(prompt_id, ids[0]);
            break;
        }
    }
    let http = reqwest::Client::new();
    let q: Value = http
        .get(format!("{}/queue", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_same_shape(&reqs[3].1["body"], &q, "GET /queue");
    let state = client.queue().await.unwrap();
    assert_eq!(state.running, vec![ids[0].clone()]);
    assert_eq!(state.pending, vec![ids[1].clone(), ids[2].clone()]);
    let p: Value = http
        .get(format!("{}/prompt", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p, json!({"exec_info": {"queue_remaining": 3}}));
    assert_eq!(client.queue_remaining().await.unwrap(), 3);

    client
        .delete_queued(std::slice::from_ref(&ids[2]))
        .await
        .unwrap();
    client.interrupt(&ids[0]).await.unwrap();
    let mut interrupted = false;
    loop {
        match next_event(&mut events).await {
            WsEvent::ExecutionInterrupted { prompt_id, data } => {
                assert_eq!(prompt_id, ids[0]);
                let recorded_data = rec["exchange"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["ws"]["type"] == "execution_interrupted")
                    .unwrap()["ws"]["data"]
                    .clone();
                assert_same_shape(&recorded_data, &data, "execution_interrupted");
                interrupted = true;
            }
            WsEvent::ExecutionStart { prompt_id } => {
                assert_eq!(prompt_id, ids[1], "the second one runs next");
                break;
            }
            _ => {}
        }
    }
    assert!(interrupted);
    let first = client.history(&ids[0]).await.unwrap().unwrap();
    assert_eq!(first.status_str, "error");
    assert!(first.message("execution_interrupted").is_some());
    assert!(
        client.history(&ids[2]).await.unwrap().is_none(),
        "a deleted prompt never reaches history"
    );
    // An interrupt aimed at another prompt id is ignored.
    client.interrupt("not-running").await.unwrap();
    assert_eq!(client.queue().await.unwrap().running, vec![ids[1].clone()]);
}

#[tokio::test]
async fn unknown_history_is_an_empty_object() {
    let rec = recorded("history_unknown.json");
    let s = sim(0).await;
    let (req, resp) = &requests(&rec)[0];
    let body: Value = reqwest::get(format!("{}{}", s.url, req["path"].as_str().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body, resp["body"]);
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    assert!(client
        .history("00000000-0000-0000-0000-000000000000")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn system_stats_has_the_recorded_shape() {
    let rec = recorded("system_stats.json");
    let s = sim(0).await;
    let body: Value = reqwest::get(format!("{}/system_stats", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_same_shape(&requests(&rec)[0].1["body"], &body, "system_stats");
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let stats = client.system_stats().await.unwrap();
    assert_eq!(stats.comfyui_version.as_deref(), Some("0.3.64"));
    assert!(stats.vram_total.unwrap() > 0);
}

#[tokio::test]
async fn reconnecting_resends_the_current_node_without_a_prompt_id_and_duplicates_run_twice() {
    let rec = recorded("reconnect_duplicate_cleanup.json");
    let s = sim(1_500).await;
    let cid = "fa24058b-f672-4873-bb04-f2d02db0dbea";
    let client = ComfyClient::new("127.0.0.1", s.port, cid, Duration::from_secs(5));
    let mut events = client.connect().await.unwrap();
    let reqs = requests(&rec);
    let pid = uuid::Uuid::new_v4().to_string();
    client
        .submit(&pid, &reqs[0].0["json"]["prompt"])
        .await
        .unwrap();
    loop {
        if let WsEvent::Executing { node: Some(n), .. } = next_event(&mut events).await {
            if n == "2" {
                break;
            }
        }
    }
    drop(events);
    let mut events = client.connect().await.unwrap();
    let first = next_event(&mut events).await;
    assert!(matches!(first, WsEvent::Status { .. }));
    let second = next_event(&mut events).await;
    assert_eq!(
        second,
        WsEvent::Executing {
            prompt_id: None,
            node: Some("2".into())
        },
        "as recorded: no prompt id"
    );
    loop {
        if let WsEvent::Executing {
            prompt_id: Some(p),
            node: None,
        } = next_event(&mut events).await
        {
            assert_eq!(p, pid);
            break;
        }
    }
    // One prompt id submitted twice runs twice; the second entry replaces the first.
    let dup = uuid::Uuid::new_v4().to_string();
    client
        .submit(&dup, &reqs[1].0["json"]["prompt"])
        .await
        .unwrap();
    client
        .submit(&dup, &reqs[2].0["json"]["prompt"])
        .await
        .unwrap();
    let mut ends = 0;
    while ends < 2 {
        if let WsEvent::Executing {
            prompt_id: Some(p),
            node: None,
        } = next_event(&mut events).await
        {
            if p == dup {
                ends += 1;
            }
        }
    }
    assert_eq!(s.prompt_posts()[&dup], 2);
    let h = client.history(&dup).await.unwrap().unwrap();
    assert_eq!(
        h.outputs[0].filename, "dup_00002_.png",
        "the second run's entry"
    );
    // POST /history delete forgets it.
    client
        .delete_history(std::slice::from_ref(&dup))
        .await
        .unwrap();
    assert!(client.history(&dup).await.unwrap().is_none());
    // A foreign Origin is refused with 403, as recorded; our client sends none.
    let (req, resp) = reqs.last().unwrap();
    let r = reqwest::Client::new()
        .get(format!("{}{}", s.url, req["path"].as_str().unwrap()))
        .header("Origin", req["headers"]["Origin"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16() as u64, resp["status"].as_u64().unwrap());
    client.queue().await.unwrap();
}

#[test]
fn the_client_understands_every_recorded_websocket_message() {
    for file in [
        "success.json",
        "success_cached.json",
        "execution_error.json",
        "queue_interrupt_delete.json",
        "reconnect_duplicate_cleanup.json",
    ] {
        let rec = recorded(file);
        for e in rec["exchange"].as_array().unwrap() {
            let Some(m) = e.get("ws") else { continue };
            let ev = WsEvent::parse_text(&m.to_string());
            let kind = m["type"].as_str().unwrap();
            match kind {
                "executing" => match &ev {
                    WsEvent::Executing { node, prompt_id } => {
                        assert_eq!(node.as_deref(), m["data"]["node"].as_str());
                        assert_eq!(prompt_id.as_deref(), m["data"]["prompt_id"].as_str());
                    }
                    other => panic!("{file}: {m} parsed as {other:?}"),
                },
                "execution_start"
                | "execution_success"
                | "execution_error"
                | "execution_interrupted"
                | "executed" => {
                    assert_eq!(
                        ev.prompt_id(),
                        m["data"]["prompt_id"].as_str(),
                        "{file}: {m}"
                    );
                    assert!(!matches!(ev, WsEvent::Other(_)), "{file}: {m}");
                }
                "status" => assert!(
                    matches!(
                        ev,
                        WsEvent::Status {
                            queue_remaining: Some(_)
                        }
                    ),
                    "{file}: {m}"
                ),
                _ => assert!(matches!(ev, WsEvent::Other(_)), "{file}: {m}"),
            }
        }
    }
}

#[tokio::test]
async fn the_inventory_routes_answer_as_recorded_and_replies_have_a_size_cap() {
    let rec = recorded("inventory.json");
    let s = sim(0).await;
    let http = reqwest::Client::new();
    for (req, resp) in requests(&rec) {
        let path = req["path"].as_str().unwrap();
        let r = http.get(format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(
            r.status().as_u16() as u64,
            resp["status"].as_u64().unwrap(),
            "{path}"
        );
        if resp["status"] == 200 {
            let body: Value = r.json().await.unwrap();
            assert_same_shape(&resp["body"], &body, path);
        }
    }
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let all = client.object_info().await.unwrap();
    let recorded_all = recorded("object_info.json");
    assert_eq!(all.len(), recorded_all.as_object().unwrap().len());
    assert_eq!(
        client.models("checkpoints").await.unwrap(),
        Some(vec!["sd_xl_base_1.0.safetensors".to_string()])
    );
    assert_eq!(client.models("no_such_folder").await.unwrap(), None);
    // Tens of MB with many custom nodes: an answer over the cap is an error, not memory.
    let capped = orchestrator::comfy::ComfyClient::with_limits(
        "127.0.0.1",
        s.port,
        "c1",
        Duration::from_secs(5),
        orchestrator::comfy::Limits {
            max_reply_bytes: 64 * 1024,
            max_output_bytes: 1 << 20,
        },
    );
    match capped.object_info().await {
        Err(ComfyError::BadResponse(m)) => assert!(m.contains("over 65536 bytes"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|m| m.len())),
    }
}

#[tokio::test]
async fn the_upload_limit_is_said_and_enforced_as_recorded() {
    let rec = recorded("upload_too_large.json");
    let exchanges: Vec<Value> = rec["exchange"].as_array().unwrap().clone();
    let limit = 1024 * 1024;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = simulator::spawn(
        listener,
        SimConfig {
            max_body_bytes: limit,
            ..Default::default()
        },
    );
    // GET /features: the same body.
    let features: Value = reqwest::get(format!("{}/features", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(features, exchanges[0]["response"]["body"]);
    // The socket's answer to our feature_flags, read by the client: the
    // recorded message and the simulator's give the same limit.
    let answer = exchanges[1]["response"]["feature_flags"].to_string();
    assert_eq!(
        WsEvent::parse_text(&answer),
        WsEvent::FeatureFlags {
            max_upload_bytes: Some(limit as i64)
        }
    );
    let client = ComfyClient::new("127.0.0.1", s.port, "c1", Duration::from_secs(5));
    let mut events = client.connect().await.unwrap();
    events.probe().await.unwrap();
    let flags = loop {
        match next_event(&mut events).await {
            e @ WsEvent::FeatureFlags { .. } => break e,
            _ => continue,
        }
    };
    assert_eq!(
        flags,
        WsEvent::FeatureFlags {
            max_upload_bytes: Some(limit as i64)
        }
    );
    // Uploads under and over it: the recorded statuses and bodies.
    let http = reqwest::Client::new();
    for ex in &exchanges[2..] {
        let part = &ex["request"]["multipart"];
        let size = part["image"]["bytes"].as_u64().unwrap() as usize;
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(vec![7u8; size])
                    .file_name("big.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
            .text("subfolder", "orchestrator")
            .text("type", "input")
            .text("overwrite", "true");
        let r = http
            .post(format!("{}/upload/image", s.url))
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        let body = r.text().await.unwrap();
        assert_eq!(status, ex["response"]["status"], "{}", ex["note"]);
        let media = |t: &str| t.split(';').next().unwrap_or("").trim().to_string();
        let recorded_type = ex["response"]["content_type"].as_str().unwrap();
        assert_eq!(media(&content_type), media(recorded_type), "{}", ex["note"]);
        match &ex["response"]["body"] {
            Value::String(text) => assert_eq!(&body, text),
            shape => assert_eq!(&serde_json::from_str::<Value>(&body).unwrap(), shape),
        }
    }
}

#[test]
fn a_loader_file_the_box_lacks_is_refused_on_its_input_as_recorded() {
    let rec = recorded("upload_loadimage.json");
    let missing = rec["exchange"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["note"] == "a file that is not in the input folder: 400")
        .expect("the recorded refusal");
    let r = orchestrator::comfy::Rejection {
        status: 400,
        body: missing["response"]["body"].clone(),
        queued: false,
    };
    assert_eq!(
        r.refused_inputs(),
        vec![("1".to_string(), "image".to_string())]
    );
}
