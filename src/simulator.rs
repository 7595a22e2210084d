//! A simulated ComfyUI server that speaks the protocol of ComfyUI 0.3.64.
//!
//! Why: the tests, the benchmarks and the README demo need backends on a
//! machine with no GPU and no network, and they must meet the same shapes a
//! real ComfyUI sends (see `shared/comfyui/PROTOCOL.md` and the recorded
//! exchanges, which the contract tests replay against this simulator). One
//! implementation serves all three.
//!
//! What it models: `POST /prompt` with validation answers (`400` with
//! `node_errors` for bad values, unknown node types, no output node, no
//! prompt), one prompt at a time from its own queue, the WebSocket messages in
//! ComfyUI's order (sent only to the prompt's `client_id`), binary preview
//! frames, `/history` (written after `execution_success`, as ComfyUI does),
//! `/view` with a real PNG, `/queue` and its delete, `/interrupt {prompt_id}`,
//! `POST /history` delete, `/system_stats`, `/object_info`, the node cache
//! (the same graph twice runs from cache and still reports outputs), and the
//! `403` for a foreign `Origin`. A run-time error comes from the same graph
//! as the recorded one (`ImageToMask` with `channel: alpha` on an RGB image)
//! or at random with `fail_rate`.
//!
//! What it does not model: real image processing (images are solid colours,
//! at most 256 px a side), models and VRAM use, `progress_state` detail beyond
//! the basics, uploads, custom node output kinds, and the 10,000-entry history cap.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

/// How the simulated backend behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Time a prompt takes, spread over its sampler steps.
    pub job_ms: u64,
    /// Chance (0 to 1) that a prompt fails at run time.
    pub fail_rate: f64,
    /// Checkpoint files it "has" (for `CheckpointLoaderSimple`).
    pub checkpoints: Vec<String>,
    /// `system.comfyui_version` it reports.
    pub version: String,
    /// Delay of the answer to `POST /prompt` (the prompt is queued at once):
    /// lets crash tests stop the orchestrator between submit and answer.
    pub prompt_delay_ms: u64,
    /// Delay of `/view` answers: lets crash tests stop the orchestrator
    /// while it collects outputs.
    pub view_delay_ms: u64,
    /// `/view` answers `500` (a backend whose output disk is gone): lets
    /// tests check that uncollectable outputs end the attempt.
    pub view_fails: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            job_ms: 200,
            fail_rate: 0.0,
            checkpoints: vec!["sd_xl_base_1.0.safetensors".into()],
            version: "0.3.64".into(),
            prompt_delay_ms: 0,
            view_delay_ms: 0,
            view_fails: false,
        }
    }
}

#[derive(Clone)]
struct Prompt {
    number: u64,
    prompt_id: String,
    graph: Value,
    extra_data: Value,
    outputs: Vec<String>,
    client_id: Option<String>,
}

impl Prompt {
    fn item(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.graph,
            self.extra_data,
            self.outputs
        ])
    }
}

struct Running {
    prompt: Prompt,
    node: Option<String>,
    interrupt: bool,
}

struct Socket {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Prompt>,
    running: Option<Running>,
    history: HashMap<String, (u64, Value)>,
    files: HashMap<(String, String, String), Bytes>,
    counters: HashMap<String, u32>,
    number: u64,
    sockets: HashMap<String, Socket>,
    socket_ids: u64,
    posts: HashMap<String, usize>,
    posted_at: HashMap<String, std::time::Instant>,
    last_graph: Option<Value>,
    last_outputs: HashMap<String, Value>,
    rng: u64,
    timeline: Vec<(String, std::time::Instant, std::time::Instant)>,
}

struct Sim {
    config: SimConfig,
    inner: Mutex<Inner>,
    work: Notify,
}

type S = Arc<Sim>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Sim {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("simulator state")
    }

    /// Sends to the prompt's socket, or to every socket for prompts without a client id.
    fn send_for(&self, client_id: &Option<String>, msg: Message) {
        let inner = self.lock();
        match client_id {
            Some(cid) => {
                if let Some(s) = inner.sockets.get(cid) {
                    let _ = s.tx.send(msg);
                }
            }
            None => {
                for s in inner.sockets.values() {
                    let _ = s.tx.send(msg.clone());
                }
            }
        }
    }

    fn event(&self, client_id: &Option<String>, kind: &str, data: Value) {
        let text = json!({"type": kind, "data": data}).to_string();
        self.send_for(client_id, Message::Text(text.into()));
    }

    fn broadcast_status(&self) {
        let inner = self.lock();
        let remaining = inner.queue.len() + inner.running.is_some() as usize;
        let text = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}}).to_string();
        for s in inner.sockets.values() {
            let _ = s.tx.send(Message::Text(text.clone().into()));
        }
    }

    fn random(&self) -> f64 {
        let mut inner = self.lock();
        // xorshift64*: enough for a failure rate.
        let mut x = inner.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        inner.rng = x;
        (x.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A running simulator: its address and what it saw.
pub struct SimHandle {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Port it listens on.
    pub port: u16,
    sim: S,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    runner: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// How many times each prompt id was `POST`ed to `/prompt`.
    pub fn prompt_posts(&self) -> HashMap<String, usize> {
        self.sim.lock().posts.clone()
    }

    /// When each prompt id was first posted (for dispatch-latency benchmarks).
    pub fn posted_at(&self, prompt_id: &str) -> Option<std::time::Instant> {
        self.sim.lock().posted_at.get(prompt_id).copied()
    }

    /// Prompt ids in the simulated history.
    pub fn history_ids(&self) -> Vec<String> {
        self.sim.lock().history.keys().cloned().collect()
    }

    /// When each prompt started and ended, in run order (for idle-gap benchmarks).
    pub fn timeline(&self) -> Vec<(String, std::time::Instant, std::time::Instant)> {
        self.sim.lock().timeline.clone()
    }

    /// Prompts waiting or running.
    pub fn queue_len(&self) -> usize {
        let inner = self.sim.lock();
        inner.queue.len() + inner.running.is_some() as usize
    }

    /// Takes it off the network: the HTTP server and sockets stop, but the
    /// queue keeps running, as on a box whose network dropped.
    pub async fn disconnect(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.sim.lock().sockets.clear();
    }

    /// Back on the network on `listener`, with the state it had.
    pub fn reconnect(&mut self, listener: TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(self.sim.clone());
        self.task = Some(tokio::spawn(serve_http(listener, app, rx)));
        self.stop = Some(tx);
    }

    /// Stops it at once, as a crash: its queue and history are gone.
    pub async fn kill(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.runner.abort();
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let mut inner = self.sim.lock();
        inner.sockets.clear();
        inner.queue.clear();
        if let Some(r) = inner.running.as_mut() {
            r.interrupt = true;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.runner.abort();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Ok(mut inner) = self.sim.inner.lock() {
            inner.sockets.clear();
            if let Some(r) = inner.running.as_mut() {
                r.interrupt = true;
            }
        }
    }
}

/// Starts a simulator on `listener` in the background.
pub fn spawn(listener: TcpListener, config: SimConfig) -> SimHandle {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let sim: S = Arc::new(Sim {
        config,
        inner: Mutex::new(Inner {
            rng: now_ms() | 1,
            ..Default::default()
        }),
        work: Notify::new(),
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(sim.clone());
    let runner = tokio::spawn(run_queue(sim.clone()));
    let task = tokio::spawn(serve_http(listener, app, rx));
    SimHandle {
        url: format!("http://127.0.0.1:{port}"),
        port,
        sim,
        stop: Some(tx),
        task: Some(task),
        runner,
    }
}

/// Serves HTTP with every connection owned by this task: when it stops (or
/// is aborted), every connection drops at once, as when a box dies.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    connections.abort_all();
}

/// Runs a simulator until `shutdown` resolves (the `simulate` command).
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut handle = spawn(listener, config);
    shutdown.await;
    handle.shutdown().await;
}

fn router(sim: S) -> Router {
    Router::new()
        .route("/prompt", post(post_prompt).get(get_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/history", get(get_history_all).post(post_history))
        .route("/history/{id}", get(get_history))
        .route("/view", get(view))
        .route("/system_stats", get(system_stats))
        .route("/object_info", get(object_info))
        .route("/ws", get(ws))
        .layer(middleware::from_fn(refuse_foreign_origin))
        .with_state(sim)
}

/// ComfyUI refuses requests whose `Origin` host differs from `Host`.
async fn refuse_foreign_origin(req: Request, next: Next) -> Response {
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split("://").nth(1).unwrap_or(origin);
        if origin_host != host {
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    next.run(req).await
}

// ---- node types ---------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Int(f64, f64),
    Float(f64, f64),
    Str,
    Combo(&'static [&'static str]),
    Checkpoints,
    Link(&'static str),
}

const SAMPLERS: &[&str] = &[
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpmpp_2m",
    "dpmpp_sde",
    "lcm",
];
const SCHEDULERS: &[&str] = &["normal", "karras", "exponential", "simple", "sgm_uniform"];
const CHANNELS: &[&str] = &["red", "green", "blue", "alpha"];

fn node_spec(class: &str) -> Option<(&'static [(&'static str, Kind)], bool)> {
    use Kind::*;
    Some(match class {
        "EmptyImage" => (
            &[
                ("width", Int(1.0, 16384.0)),
                ("height", Int(1.0, 16384.0)),
                ("batch_size", Int(1.0, 4096.0)),
                ("color", Int(0.0, 16777215.0)),
            ],
            false,
        ),
        "ImageBlur" => (
            &[
                ("image", Link("IMAGE")),
                ("blur_radius", Int(1.0, 31.0)),
                ("sigma", Float(0.1, 10.0)),
            ],
            false,
        ),
        "ImageInvert" => (&[("image", Link("IMAGE"))], false),
        "SaveImage" => (&[("images", Link("IMAGE")), ("filename_prefix", Str)], true),
        "PreviewImage" => (&[("images", Link("IMAGE"))], true),
        "ImageToMask" => (
            &[("image", Link("IMAGE")), ("channel", Combo(CHANNELS))],
            false,
        ),
        "MaskToImage" => (&[("mask", Link("MASK"))], false),
        "CheckpointLoaderSimple" => (&[("ckpt_name", Checkpoints)], false),
        "CLIPTextEncode" => (&[("text", Str), ("clip", Link("CLIP"))], false),
        "EmptyLatentImage" => (
            &[
                ("width", Int(16.0, 16384.0)),
                ("height", Int(16.0, 16384.0)),
                ("batch_size", Int(1.0, 4096.0)),
            ],
            false,
        ),
        "KSampler" => (
            &[
                ("model", Link("MODEL")),
                ("seed", Int(0.0, 18446744073709551615.0)),
                ("steps", Int(1.0, 10000.0)),
                ("cfg", Float(0.0, 100.0)),
                ("sampler_name", Combo(SAMPLERS)),
                ("scheduler", Combo(SCHEDULERS)),
                ("positive", Link("CONDITIONING")),
                ("negative", Link("CONDITIONING")),
                ("latent_image", Link("LATENT")),
                ("denoise", Float(0.0, 1.0)),
            ],
            false,
        ),
        "VAEDecode" => (&[("samples", Link("LATENT")), ("vae", Link("VAE"))], false),
        _ => return None,
    })
}

fn input_config(kind: Kind, checkpoints: &[String]) -> Value {
    match kind {
        Kind::Int(min, max) => json!(["INT", {"default": min, "min": min, "max": max, "step": 1}]),
        Kind::Float(min, max) => json!(["FLOAT", {"default": min, "min": min, "max": max}]),
        Kind::Str => json!(["STRING", {}]),
        Kind::Combo(list) => json!([list]),
        Kind::Checkpoints => json!([checkpoints]),
        Kind::Link(t) => json!([t]),
    }
}

fn value_error(kind: &str, message: String, details: String, extra: Value) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": extra})
}

/// Validates a graph as ComfyUI does; `Err` is the `400` body.
fn validate(graph: &Value, checkpoints: &[String]) -> Result<Vec<String>, Value> {
    let reject = |kind: &str, message: String, details: String| json!({"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}});
    let nodes = graph.as_object().ok_or_else(|| {
        reject(
            "invalid_prompt",
            "Cannot execute because the prompt is not an object.".into(),
            String::new(),
        )
    })?;
    for (id, node) in nodes {
        let Some(class) = node.get("class_type").and_then(Value::as_str) else {
            return Err(reject(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.".into(),
                format!("Node ID '#{id}'"),
            ));
        };
        if node_spec(class).is_none() {
            return Err(reject(
                "invalid_prompt",
                format!("Cannot execute because node {class} does not exist."),
                format!("Node ID '#{id}'"),
            ));
        }
    }
    let outputs: Vec<String> = nodes
        .iter()
        .filter(|(_, n)| {
            node_spec(n["class_type"].as_str().unwrap_or("")).is_some_and(|(_, out)| out)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if outputs.is_empty() {
        return Err(reject(
            "prompt_no_outputs",
            "Prompt has no outputs".into(),
            String::new(),
        ));
    }
    let mut node_errors = Map::new();
    for (id, node) in nodes {
        let class = node["class_type"].as_str().unwrap_or("");
        let (spec, _) = node_spec(class).expect("checked above");
        let inputs = node.get("inputs").and_then(Value::as_object);
        let mut errors = Vec::new();
        for (name, kind) in spec {
            let config = input_config(*kind, checkpoints);
            let v = inputs.and_then(|i| i.get(*name));
            let Some(v) = v else {
                errors.push(value_error(
                    "required_input_missing",
                    "Required input is missing".into(),
                    name.to_string(),
                    json!({"input_name": name}),
                ));
                continue;
            };
            if let Some(link) = v.as_array() {
                let target = link.first().and_then(Value::as_str).unwrap_or("");
                if link.len() == 2 && nodes.contains_key(target) {
                    continue;
                }
                errors.push(value_error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]".into(),
                    name.to_string(),
                    json!({"input_name": name, "input_config": config, "received_value": v}),
                ));
                continue;
            }
            let extra = |extra: Value| {
                let mut e =
                    json!({"input_name": name, "input_config": config, "received_value": v});
                if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
                    o.extend(x.clone());
                }
                e
            };
            match kind {
                Kind::Int(min, max) | Kind::Float(min, max) => {
                    let is_int = matches!(kind, Kind::Int(..));
                    let n = v
                        .as_f64()
                        .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()));
                    let Some(n) = n.filter(|n| !is_int || n.fract() == 0.0) else {
                        let t = if is_int { "INT" } else { "FLOAT" };
                        let lit = v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string());
                        let exc = if is_int {
                            format!("invalid literal for int() with base 10: '{lit}'")
                        } else {
                            format!("could not convert string to float: '{lit}'")
                        };
                        errors.push(value_error(
                            "invalid_input_type",
                            format!("Failed to convert an input value to a {t} value"),
                            format!("{name}, {lit}, {exc}"),
                            extra(json!({"exception_message": exc})),
                        ));
                        continue;
                    };
                    let shown = if is_int {
                        format!("{}", n as i128)
                    } else {
                        format!("{n}")
                    };
                    if n > *max {
                        errors.push(value_error(
                            "value_bigger_than_max",
                            format!("Value {shown} bigger than max of {}", *max as i128),
                            name.to_string(),
                            extra(json!({})),
                        ));
                    } else if n < *min {
                        errors.push(value_error(
                            "value_smaller_than_min",
                            format!("Value {shown} smaller than min of {}", *min as i128),
                            name.to_string(),
                            extra(json!({})),
                        ));
                    }
                }
                Kind::Str => {}
                Kind::Combo(_) | Kind::Checkpoints => {
                    let allowed: Vec<String> = match kind {
                        Kind::Combo(list) => list.iter().map(|s| s.to_string()).collect(),
                        _ => checkpoints.to_vec(),
                    };
                    let s = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    if !allowed.contains(&s) {
                        errors.push(value_error(
                            "value_not_in_list",
                            "Value not in list".into(),
                            format!("{name}: '{s}' not in {allowed:?}"),
                            extra(json!({})),
                        ));
                    }
                }
                Kind::Link(_) => errors.push(value_error(
                    "required_input_missing",
                    "Required input is missing".into(),
                    name.to_string(),
                    json!({"input_name": name}),
                )),
            }
        }
        if !errors.is_empty() {
            node_errors.insert(
                id.clone(),
                json!({"errors": errors, "dependent_outputs": outputs, "class_type": class}),
            );
        }
    }
    if !node_errors.is_empty() {
        return Err(json!({
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": node_errors,
        }));
    }
    Ok(outputs)
}

// ---- HTTP ----------------------------------------------------------------

async fn post_prompt(State(sim): State<S>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": {"type": "invalid_json", "message": "Invalid JSON", "details": "", "extra_info": {}}, "node_errors": {}}))).into_response();
    };
    let Some(graph) = body.get("prompt") else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}})),
        )
            .into_response();
    };
    let prompt_id = body["prompt_id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    {
        let mut inner = sim.lock();
        *inner.posts.entry(prompt_id.clone()).or_default() += 1;
        if inner.posted_at.len() < 100_000 {
            inner
                .posted_at
                .entry(prompt_id.clone())
                .or_insert_with(std::time::Instant::now);
        }
    }
    let outputs = match validate(graph, &sim.config.checkpoints) {
        Ok(o) => o,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(e)).into_response(),
    };
    let client_id = body["client_id"].as_str().map(str::to_string);
    let mut extra_data = body.get("extra_data").cloned().unwrap_or_else(|| json!({}));
    if let (Some(cid), Some(o)) = (&client_id, extra_data.as_object_mut()) {
        o.insert("client_id".into(), json!(cid));
    }
    let number = {
        let mut inner = sim.lock();
        inner.number += 1;
        let number = inner.number;
        inner.queue.push_back(Prompt {
            number,
            prompt_id: prompt_id.clone(),
            graph: graph.clone(),
            extra_data,
            outputs,
            client_id,
        });
        number
    };
    sim.broadcast_status();
    sim.work.notify_one();
    if sim.config.prompt_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sim.config.prompt_delay_ms)).await;
    }
    Json(json!({"prompt_id": prompt_id, "number": number, "node_errors": {}})).into_response()
}

async fn get_prompt(State(sim): State<S>) -> Json<Value> {
    let inner = sim.lock();
    let remaining = inner.queue.len() + inner.running.is_some() as usize;
    Json(json!({"exec_info": {"queue_remaining": remaining}}))
}

async fn get_queue(State(sim): State<S>) -> Json<Value> {
    let inner = sim.lock();
    let running: Vec<Value> = inner.running.iter().map(|r| r.prompt.item()).collect();
    let pending: Vec<Value> = inner.queue.iter().map(Prompt::item).collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

async fn post_queue(State(sim): State<S>, Json(body): Json<Value>) -> StatusCode {
    {
        let mut inner = sim.lock();
        if body["clear"].as_bool() == Some(true) {
            inner.queue.clear();
        }
        if let Some(ids) = body["delete"].as_array() {
            let ids: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
            inner.queue.retain(|p| !ids.contains(&p.prompt_id.as_str()));
        }
    }
    sim.broadcast_status();
    StatusCode::OK
}

async fn post_interrupt(State(sim): State<S>, body: Bytes) -> StatusCode {
    let body: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
    let mut inner = sim.lock();
    if let Some(r) = inner.running.as_mut() {
        match body["prompt_id"].as_str() {
            Some(pid) if pid != r.prompt.prompt_id => {}
            _ => r.interrupt = true,
        }
    }
    StatusCode::OK
}

async fn get_history(State(sim): State<S>, Path(id): Path<String>) -> Json<Value> {
    let inner = sim.lock();
    match inner.history.get(&id) {
        Some((_, entry)) => Json(json!({ id: entry })),
        None => Json(json!({})),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    max_items: Option<usize>,
    offset: Option<usize>,
}

async fn get_history_all(State(sim): State<S>, Query(q): Query<HistoryQuery>) -> Json<Value> {
    let inner = sim.lock();
    let mut entries: Vec<(&String, &(u64, Value))> = inner.history.iter().collect();
    entries.sort_by_key(|(_, (n, _))| *n);
    let offset = q.offset.unwrap_or(0);
    let max = q.max_items.unwrap_or(usize::MAX);
    let map: Map<String, Value> = entries
        .into_iter()
        .skip(offset)
        .take(max)
        .map(|(id, (_, e))| (id.clone(), e.clone()))
        .collect();
    Json(Value::Object(map))
}

async fn post_history(State(sim): State<S>, Json(body): Json<Value>) -> StatusCode {
    let mut inner = sim.lock();
    if body["clear"].as_bool() == Some(true) {
        inner.history.clear();
    }
    if let Some(ids) = body["delete"].as_array() {
        for id in ids.iter().filter_map(Value::as_str) {
            inner.history.remove(id);
        }
    }
    StatusCode::OK
}

#[derive(Deserialize)]
struct ViewQuery {
    filename: Option<String>,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type", default)]
    file_type: Option<String>,
}

async fn view(State(sim): State<S>, Query(q): Query<ViewQuery>) -> Response {
    let Some(filename) = q.filename else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if filename.starts_with('/') || filename.contains("..") || q.subfolder.contains("..") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let file_type = q.file_type.unwrap_or_else(|| "output".into());
    if sim.config.view_fails {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let bytes = sim
        .lock()
        .files
        .get(&(file_type, q.subfolder, filename))
        .cloned();
    let Some(bytes) = bytes else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if sim.config.view_delay_ms == 0 {
        return ([(header::CONTENT_TYPE, "image/png")], bytes).into_response();
    }
    // A slow transfer: the bytes trickle in over `view_delay_ms`, in ten parts.
    let pause = Duration::from_millis(sim.config.view_delay_ms / 10);
    let step = bytes.len().div_ceil(10).max(1);
    let parts: Vec<Bytes> = (0..bytes.len())
        .step_by(step)
        .map(|i| bytes.slice(i..(i + step).min(bytes.len())))
        .collect();
    let body = futures::stream::iter(parts).then(move |part| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::convert::Infallible>(part)
    });
    (
        [(header::CONTENT_TYPE, "image/png")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

async fn system_stats(State(sim): State<S>) -> Json<Value> {
    Json(json!({
        "system": {
            "os": "posix",
            "ram_total": 25276502016u64,
            "ram_free": 24229588992u64,
            "comfyui_version": sim.config.version,
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (simulated)",
            "pytorch_version": "simulated",
            "embedded_python": false,
            "argv": ["main.py", "--simulated"]
        },
        "devices": [{
            "name": "simulated", "type": "cpu", "index": null,
            "vram_total": 25276502016u64, "vram_free": 24229588992u64,
            "torch_vram_total": 25276502016u64, "torch_vram_free": 24229588992u64
        }]
    }))
}

async fn object_info(State(sim): State<S>) -> Json<Value> {
    let classes = [
        "EmptyImage",
        "ImageBlur",
        "ImageInvert",
        "SaveImage",
        "PreviewImage",
        "ImageToMask",
        "MaskToImage",
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
    ];
    let mut out = Map::new();
    for class in classes {
        let (spec, output_node) = node_spec(class).expect("known class");
        let required: Map<String, Value> = spec
            .iter()
            .map(|(n, k)| (n.to_string(), input_config(*k, &sim.config.checkpoints)))
            .collect();
        out.insert(
            class.into(),
            json!({"input": {"required": required}, "output_node": output_node, "name": class}),
        );
    }
    Json(Value::Object(out))
}

#[derive(Deserialize)]
struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

async fn ws(
    State(sim): State<S>,
    Query(q): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
    _h: HeaderMap,
) -> Response {
    let client_id = q
        .client_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| ws_session(sim, client_id, socket))
}

async fn ws_session(sim: S, client_id: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let my_id;
    {
        let mut inner = sim.lock();
        inner.socket_ids += 1;
        my_id = inner.socket_ids;
        let remaining = inner.queue.len() + inner.running.is_some() as usize;
        let hello = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}});
        let _ = tx.send(Message::Text(hello.to_string().into()));
        // Reconnecting while our prompt runs: re-send the current node, without a prompt id.
        if let Some(r) = &inner.running {
            if r.prompt.client_id.as_deref() == Some(client_id.as_str()) {
                if let Some(node) = &r.node {
                    let m = json!({"type": "executing", "data": {"node": node}});
                    let _ = tx.send(Message::Text(m.to_string().into()));
                }
            }
        }
        inner
            .sockets
            .insert(client_id.clone(), Socket { id: my_id, tx });
    }
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => {
                    if socket.send(m).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        if v["type"] == "feature_flags" {
                            let m = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
                            let _ = socket.send(Message::Text(m.to_string().into())).await;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let mut inner = sim.lock();
    if inner.sockets.get(&client_id).map(|s| s.id) == Some(my_id) {
        inner.sockets.remove(&client_id);
    }
}

// ---- execution -------------------------------------------------------------

/// Node ids in an order where every node comes after its inputs.
fn execution_order(graph: &Map<String, Value>) -> Vec<String> {
    let mut order = Vec::new();
    let mut done = std::collections::HashSet::new();
    fn visit(
        id: &str,
        g: &Map<String, Value>,
        done: &mut std::collections::HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if done.contains(id) || depth > 1000 {
            return;
        }
        done.insert(id.to_string());
        if let Some(inputs) = g.get(id).and_then(|n| n["inputs"].as_object()) {
            for v in inputs.values() {
                if let Some(src) = v.as_array().and_then(|a| a.first()).and_then(Value::as_str) {
                    visit(src, g, done, order, depth + 1);
                }
            }
        }
        order.push(id.to_string());
    }
    let mut ids: Vec<&String> = graph.keys().collect();
    ids.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), (*k).clone()));
    for id in ids {
        visit(id, graph, &mut done, &mut order, 0);
    }
    order
}

async fn run_queue(sim: S) {
    loop {
        let next = {
            let mut inner = sim.lock();
            match inner.queue.pop_front() {
                Some(p) => {
                    inner.running = Some(Running {
                        prompt: p.clone(),
                        node: None,
                        interrupt: false,
                    });
                    Some(p)
                }
                None => None,
            }
        };
        match next {
            Some(p) => execute(&sim, p).await,
            None => sim.work.notified().await,
        }
    }
}

fn interrupted(sim: &Sim) -> bool {
    sim.lock().running.as_ref().is_some_and(|r| r.interrupt)
}

fn set_node(sim: &Sim, node: &str) {
    if let Some(r) = sim.lock().running.as_mut() {
        r.node = Some(node.to_string());
    }
}

enum End {
    Success,
    Error(Value),
    Interrupted(Value),
}

async fn execute(sim: &Sim, p: Prompt) {
    let started = std::time::Instant::now();
    let cid = p.client_id.clone();
    let pid = p.prompt_id.clone();
    let graph = p.graph.as_object().cloned().unwrap_or_default();
    let start_ts = now_ms();
    let mut messages = vec![json!(["execution_start", {"prompt_id": pid, "timestamp": start_ts}])];
    sim.event(
        &cid,
        "execution_start",
        json!({"prompt_id": pid, "timestamp": start_ts}),
    );
    let cached = sim.lock().last_graph.as_ref() == Some(&p.graph);
    let order = execution_order(&graph);
    let cached_nodes: Vec<String> = if cached { order.clone() } else { vec![] };
    let cached_msg = json!({"nodes": cached_nodes, "prompt_id": pid, "timestamp": now_ms()});
    messages.push(json!(["execution_cached", cached_msg]));
    sim.event(&cid, "execution_cached", cached_msg);

    let mut outputs: Map<String, Value> = Map::new();
    let mut executed: Vec<String> = Vec::new();
    let mut end = End::Success;
    let fail_here = sim.config.fail_rate > 0.0 && sim.random() < sim.config.fail_rate;
    let work_node = order
        .iter()
        .find(|id| graph[*id]["class_type"] == "KSampler")
        .or_else(|| {
            order
                .iter()
                .find(|id| graph[*id]["class_type"] == "ImageBlur")
        })
        .or(order.first())
        .cloned();
    if cached {
        let last = sim.lock().last_outputs.clone();
        for (node, output) in last {
            sim.event(
                &cid,
                "executed",
                json!({"node": node, "display_node": node, "output": output, "prompt_id": pid}),
            );
            outputs.insert(node, output);
        }
    } else {
        'nodes: for id in &order {
            let node = &graph[id];
            let class = node["class_type"].as_str().unwrap_or("");
            if interrupted(sim) {
                end = End::Interrupted(
                    json!({"prompt_id": pid, "node_id": id, "node_type": class, "executed": executed, "timestamp": now_ms()}),
                );
                break;
            }
            set_node(sim, id);
            sim.event(
                &cid,
                "executing",
                json!({"node": id, "display_node": id, "prompt_id": pid}),
            );
            if Some(id) == work_node.as_ref() {
                let steps = node["inputs"]["steps"].as_u64().unwrap_or(4).clamp(1, 20);
                for step in 1..=steps {
                    if sim.config.job_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(sim.config.job_ms / steps)).await;
                    }
                    if interrupted(sim) {
                        end = End::Interrupted(
                            json!({"prompt_id": pid, "node_id": id, "node_type": class, "executed": executed, "timestamp": now_ms()}),
                        );
                        break 'nodes;
                    }
                    sim.event(
                        &cid,
                        "progress",
                        json!({"value": step, "max": steps, "prompt_id": pid, "node": id}),
                    );
                    // A preview frame: event 1 (image), format 2 (PNG), then the image.
                    let mut frame = vec![0, 0, 0, 1, 0, 0, 0, 2];
                    frame.extend_from_slice(&png(8, 8, [step as u8 * 10, 0, 0]));
                    sim.send_for(&cid, Message::Binary(frame.into()));
                }
                if fail_here {
                    end = End::Error(json!({
                        "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                        "exception_message": "simulated failure (fail_rate)\n", "exception_type": "RuntimeError",
                        "traceback": ["  File \"simulator\", line 1, in execute\n"], "current_inputs": {}, "current_outputs": order,
                        "timestamp": now_ms()
                    }));
                    break;
                }
            }
            if class == "ImageToMask" && node["inputs"]["channel"] == "alpha" {
                end = End::Error(json!({
                    "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                    "exception_message": "index 3 is out of bounds for dimension 3 with size 3\n",
                    "exception_type": "IndexError",
                    "traceback": ["  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n"],
                    "current_inputs": {"image": ["<tensor>"], "channel": ["alpha"]}, "current_outputs": order, "timestamp": now_ms()
                }));
                break;
            }
            if class == "SaveImage" || class == "PreviewImage" {
                let output = save_images(sim, &graph, id, class);
                sim.event(
                    &cid,
                    "executed",
                    json!({"node": id, "display_node": id, "output": output, "prompt_id": pid}),
                );
                outputs.insert(id.clone(), output);
            }
            executed.push(id.clone());
        }
    }
    let status = match &end {
        End::Success => {
            let m = json!({"prompt_id": pid, "timestamp": now_ms()});
            messages.push(json!(["execution_success", m]));
            sim.event(&cid, "execution_success", m);
            json!({"status_str": "success", "completed": true, "messages": messages})
        }
        End::Error(data) => {
            messages.push(json!(["execution_error", data]));
            sim.event(&cid, "execution_error", data.clone());
            json!({"status_str": "error", "completed": false, "messages": messages})
        }
        End::Interrupted(data) => {
            messages.push(json!(["execution_interrupted", data]));
            sim.event(&cid, "execution_interrupted", data.clone());
            json!({"status_str": "error", "completed": false, "messages": messages})
        }
    };
    let meta: Map<String, Value> = outputs
        .keys()
        .map(|n| {
            (
                n.clone(),
                json!({"node_id": n, "display_node": n, "parent_node": null, "real_node_id": n}),
            )
        })
        .collect();
    {
        let mut inner = sim.lock();
        let entry = json!({"prompt": p.item(), "outputs": outputs, "status": status, "meta": meta});
        inner.history.insert(pid.clone(), (p.number, entry));
        if matches!(end, End::Success) {
            inner.last_graph = Some(p.graph.clone());
            inner.last_outputs = outputs.into_iter().collect();
        }
        inner.running = None;
        if inner.timeline.len() >= 100_000 {
            inner.timeline.drain(..50_000);
        }
        inner
            .timeline
            .push((pid.clone(), started, std::time::Instant::now()));
    }
    sim.broadcast_status();
    sim.event(&cid, "executing", json!({"node": null, "prompt_id": pid}));
}

/// Finds the `EmptyImage` feeding a node, for the saved image's size and colour.
fn source_image(graph: &Map<String, Value>, id: &str) -> (u32, u32, u32, [u8; 3]) {
    let mut cur = id.to_string();
    let mut invert = false;
    for _ in 0..64 {
        let node = &graph[&cur];
        match node["class_type"].as_str().unwrap_or("") {
            "EmptyImage" => {
                let i = &node["inputs"];
                let c = i["color"].as_u64().unwrap_or(0) as u32;
                let mut rgb = [(c >> 16) as u8, (c >> 8) as u8, c as u8];
                if invert {
                    rgb = [255 - rgb[0], 255 - rgb[1], 255 - rgb[2]];
                }
                return (
                    i["width"].as_u64().unwrap_or(64) as u32,
                    i["height"].as_u64().unwrap_or(64) as u32,
                    i["batch_size"].as_u64().unwrap_or(1) as u32,
                    rgb,
                );
            }
            "ImageInvert" => invert = !invert,
            _ => {}
        }
        let next = node["inputs"].as_object().and_then(|i| {
            i.values()
                .find_map(|v| v.as_array().and_then(|a| a.first()).and_then(Value::as_str))
        });
        match next {
            Some(n) => cur = n.to_string(),
            None => break,
        }
    }
    (512, 512, 1, [128, 128, 128])
}

fn save_images(sim: &Sim, graph: &Map<String, Value>, id: &str, class: &str) -> Value {
    let (w, h, batch, rgb) = source_image(graph, id);
    let (file_type, prefix) = if class == "SaveImage" {
        (
            "output",
            graph[id]["inputs"]["filename_prefix"]
                .as_str()
                .unwrap_or("ComfyUI")
                .to_string(),
        )
    } else {
        ("temp", "ComfyUI_temp".to_string())
    };
    let (subfolder, base) = match prefix.rsplit_once('/') {
        Some((s, b)) => (s.to_string(), b.to_string()),
        None => (String::new(), prefix.clone()),
    };
    let mut images = Vec::new();
    let mut inner = sim.lock();
    for _ in 0..batch.min(64) {
        let counter = inner.counters.entry(prefix.clone()).or_insert(0);
        *counter += 1;
        let filename = format!("{base}_{:05}_.png", *counter);
        let bytes = Bytes::from(png(w.min(256), h.min(256), rgb));
        inner.files.insert(
            (file_type.to_string(), subfolder.clone(), filename.clone()),
            bytes,
        );
        images.push(json!({"filename": filename, "subfolder": subfolder, "type": file_type}));
    }
    json!({"images": images})
}

// ---- a tiny PNG encoder (stored deflate blocks) -----------------------------

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &d in data {
        a = (a + d as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A valid RGB PNG of one colour.
pub fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let (width, height) = (width.max(1), height.max(1));
    // Each row: filter type 0, then the pixels.
    let mut row = vec![0u8];
    for _ in 0..width {
        row.extend_from_slice(&rgb);
    }
    let raw = row.repeat(height as usize);
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_reference_value() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn a_png_has_the_signature_and_ends_with_iend() {
        let p = png(3, 2, [255, 0, 0]);
        assert_eq!(&p[..8], &[0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
        assert_eq!(&p[p.len() - 8..p.len() - 4], b"IEND");
    }
}
