//! A simulated ComfyUI server that speaks the protocol of ComfyUI 0.3.64,
//! including the ways real servers fail.
//!
//! Why: the tests, the benchmarks and the README demo need backends on a
//! machine with no GPU and no network, and they must meet the same shapes
//! and the same failures a real ComfyUI produces (the recorded exchanges in
//! `tests/fixtures/comfyui/`, which the contract tests replay against this
//! simulator). One implementation serves all three.
//!
//! What it models: `POST /prompt` validated against the recorded
//! `/object_info` of a stock 0.3.64 the way ComfyUI validates (a `400`, or a
//! `200` whose `node_errors` name the outputs it drops and then runs only the
//! rest); one prompt at a time from its own queue; the WebSocket messages in
//! ComfyUI's order, sent only to the socket registered for the prompt's
//! client id, with ComfyUI's table of sockets (a new socket replaces the
//! old, and *any* socket's end removes the id's entry); `feature_flags`
//! answered through that table; binary previews (with metadata when asked);
//! `/history` (written after `execution_success`); `/view`; `/queue` and its
//! delete; `/interrupt {prompt_id}`; `/system_stats`; `/object_info`;
//! `/models`; the node cache; the `403` for a foreign `Origin`.
//!
//! The failures it can produce, for tests and for trying the orchestrator
//! (see `docs/operations.md`, "Trying the failures"):
//! - a node titled `sim:crash` (`_meta.title`) kills the server while it runs:
//!   it comes back after `crash_down_ms` with an empty queue and history;
//! - a node titled `sim:hang` never ends and ignores interrupts;
//! - `accept_delay_ms`: a submit is queued, and answered, only after this
//!   long (whether or not the client still waits);
//! - `version`: an old version (before 0.3.44 it ignores our prompt ids), or
//!   none at all;
//! - `ignore_interrupts`: the first N interrupts aimed at a prompt are lost;
//! - `queue_delay_ms`: `GET /queue` answers late;
//! - `view_stall_ms`: a download stalls mid-way; `max_body_bytes`: a larger
//!   submit or upload is a `413`, as `--max-upload-size` makes it (and the
//!   server says the limit); `proxy_max_body_bytes`: a proxy in front
//!   refuses a larger upload with its own `413`, the server unaware;
//! - `load_ms`: a prompt whose checkpoint differs from the last one's takes
//!   this much longer (loading a model); `POST /_sim/checkpoints`
//!   (`{"checkpoints": [...]}`) changes the models it has;
//! - control routes, which always answer: `POST /_sim/hang` (`{"on": bool}`:
//!   answer nothing, sockets included), `POST /_sim/drop_sockets` (every open
//!   socket goes silent, as behind a NAT that dropped it), `POST /_sim/crash`,
//!   `POST /_sim/ignore_interrupts` (`{"count": N}`), `POST /_sim/disk_full`
//!   (`{"on": bool}`: each `SaveImage` raises `OSError` "[Errno 28] No space
//!   left on device", as on a box whose disk is full).
//!
//! What it does not model: image processing beyond the few nodes
//! `nodes.rs` computes, models' real loading and VRAM use, custom node
//! output kinds, and the 10,000-entry history cap. Uploads it keeps, as
//! ComfyUI's input folder does (names, duplicates, its limit).

mod config;
mod execute;
mod http;
mod nodes;
pub mod png;
mod ws;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::Message;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};

pub use config::SimConfig;

#[derive(Clone)]
struct Prompt {
    number: u64,
    prompt_id: String,
    graph: Value,
    extra_data: Value,
    /// The output nodes that validated: only these (and what they need) run.
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

/// The socket registered for a client id (ComfyUI's `self.sockets[sid]`).
struct Socket {
    tx: mpsc::UnboundedSender<Message>,
    /// It asked for previews with metadata (`feature_flags`).
    preview_metadata: bool,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Prompt>,
    running: Option<Running>,
    history: HashMap<String, (u64, Value)>,
    files: HashMap<(String, String, String), Bytes>,
    /// The input folder: (subfolder, name) → bytes (`/upload/image`).
    input_files: HashMap<(String, String), Bytes>,
    counters: HashMap<String, u32>,
    number: u64,
    sockets: HashMap<String, Socket>,
    /// Sockets registered since it started.
    socket_opens: usize,
    /// `/view` requests answered.
    views: usize,
    posts: HashMap<String, usize>,
    posted_at: HashMap<String, Instant>,
    last_graph: Option<Value>,
    last_outputs: HashMap<String, Value>,
    rng: u64,
    timeline: Vec<(String, Instant, Instant)>,
    interrupts_to_ignore: u32,
    /// Refuses connections until then (it crashed and is restarting).
    down_until: Option<Instant>,
    /// The checkpoint files it has.
    checkpoints: Vec<String>,
    /// The checkpoint loaded by the last prompt (`load_ms` to switch).
    loaded: Option<String>,
    /// How many times a prompt loaded another checkpoint.
    switches: usize,
    /// Its output folder's disk is full: `SaveImage` raises as ComfyUI's does.
    disk_full: bool,
}

struct Sim {
    config: SimConfig,
    inner: Mutex<Inner>,
    work: Notify,
    /// Node definitions, as `/object_info` serves them (its checkpoints
    /// can change at run time).
    defs: std::sync::RwLock<Arc<serde_json::Map<String, Value>>>,
    /// Bumped by a crash: connections and runs of an older life end.
    life: watch::Sender<u64>,
    /// `true` while it answers nothing.
    hung: watch::Sender<bool>,
    /// Bumped to silence every open socket.
    silence: watch::Sender<u64>,
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

    /// Sends to the socket registered for the prompt's client id, or to
    /// every registered socket for prompts without one.
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

    fn queue_remaining(inner: &Inner) -> usize {
        inner.queue.len() + inner.running.is_some() as usize
    }

    fn broadcast_status(&self) {
        let inner = self.lock();
        let remaining = Sim::queue_remaining(&inner);
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

    /// Dies as a crashed ComfyUI does: every connection drops, the queue and
    /// history are gone, and it refuses connections for `crash_down_ms`.
    fn crash(&self) {
        {
            let mut inner = self.lock();
            inner.queue.clear();
            inner.history.clear();
            inner.running = None;
            inner.sockets.clear();
            inner.last_graph = None;
            inner.last_outputs.clear();
            inner.loaded = None;
            inner.down_until =
                Some(Instant::now() + Duration::from_millis(self.config.crash_down_ms));
        }
        self.life.send_modify(|n| *n += 1);
        self.hung.send_replace(false);
    }

    /// The server is down (crashed, coming back).
    fn is_down(&self) -> bool {
        let mut inner = self.lock();
        match inner.down_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                inner.down_until = None;
                false
            }
            None => false,
        }
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
    pub fn posted_at(&self, prompt_id: &str) -> Option<Instant> {
        self.sim.lock().posted_at.get(prompt_id).copied()
    }

    /// How many sockets have registered since it started (a client that
    /// reconnects registers again).
    pub fn socket_opens(&self) -> usize {
        self.sim.lock().socket_opens
    }

    /// How many `/view` requests it has had (a client that collects a
    /// prompt's outputs again asks again).
    pub fn views(&self) -> usize {
        self.sim.lock().views
    }

    /// Prompt ids in the simulated history.
    pub fn history_ids(&self) -> Vec<String> {
        self.sim.lock().history.keys().cloned().collect()
    }

    /// When each prompt started and ended, in run order (for idle-gap benchmarks).
    pub fn timeline(&self) -> Vec<(String, Instant, Instant)> {
        self.sim.lock().timeline.clone()
    }

    /// Prompts waiting or running.
    pub fn queue_len(&self) -> usize {
        Sim::queue_remaining(&self.sim.lock())
    }

    /// The prompt running now, if any.
    pub fn running(&self) -> Option<String> {
        self.sim
            .lock()
            .running
            .as_ref()
            .map(|r| r.prompt.prompt_id.clone())
    }

    /// Answers nothing (`true`), sockets included, as a frozen box; or
    /// answers again (`false`).
    pub fn hang(&self, on: bool) {
        self.sim.hung.send_replace(on);
    }

    /// Every open socket goes silent without closing, as behind a NAT that
    /// dropped the connection.
    pub fn drop_sockets(&self) {
        self.sim.silence.send_modify(|n| *n += 1);
    }

    /// Crashes now; back empty after `crash_down_ms`.
    pub fn crash(&self) {
        self.sim.crash();
    }

    /// Replaces the checkpoint files it has (as when a model is copied to
    /// or deleted from the box).
    pub fn set_checkpoints(&self, checkpoints: &[&str]) {
        self.sim
            .set_checkpoints(checkpoints.iter().map(|c| c.to_string()).collect());
    }

    /// How many times a prompt had to load another checkpoint.
    pub fn loads(&self) -> usize {
        self.sim.lock().switches
    }

    /// Its output folder's disk fills (`true`): each `SaveImage` raises
    /// `OSError` ("[Errno 28] No space left on device"), as ComfyUI 0.3.64
    /// does (recorded); or has space again (`false`).
    pub fn disk_full(&self, on: bool) {
        self.sim.lock().disk_full = on;
    }

    /// Its input folder is emptied while it runs (a cleanup on the box):
    /// the files uploaded to it are gone. How many there were.
    pub fn clear_inputs(&self) -> usize {
        let mut inner = self.sim.lock();
        let n = inner.input_files.len();
        inner.input_files.clear();
        n
    }

    /// Files in its input folder now.
    pub fn input_count(&self) -> usize {
        self.sim.lock().input_files.len()
    }

    /// Loses the next `count` interrupts aimed at a running prompt.
    pub fn ignore_interrupts(&self, count: u32) {
        self.sim.lock().interrupts_to_ignore = count;
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
        // Every connection drops (the queue keeps running).
        self.sim.life.send_modify(|n| *n += 1);
    }

    /// Back on the network on `listener`, with the state it had.
    pub fn reconnect(&mut self, listener: TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(self.sim.clone());
        self.task = Some(tokio::spawn(serve_http(
            self.sim.clone(),
            listener,
            app,
            rx,
        )));
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
        self.sim.crash();
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
            inner.running = None;
        }
        self.sim.life.send_modify(|n| *n += 1);
    }
}

/// The node definitions it serves: the recorded `/object_info` of a stock
/// ComfyUI 0.3.64, with the checkpoints it "has". Simulators with the same
/// checkpoints share one copy (a benchmark runs a thousand of them).
fn definitions(checkpoints: &[String]) -> Arc<serde_json::Map<String, Value>> {
    type Cache = Mutex<HashMap<Vec<String>, Arc<serde_json::Map<String, Value>>>>;
    static CACHE: std::sync::LazyLock<Cache> = std::sync::LazyLock::new(Cache::default);
    let mut cache = CACHE.lock().expect("definitions");
    cache
        .entry(checkpoints.to_vec())
        .or_insert_with(|| {
            let mut defs: serde_json::Map<String, Value> = serde_json::from_str(include_str!(
                "../../tests/fixtures/comfyui/object_info.json"
            ))
            .expect("the recorded object_info is JSON");
            with_checkpoints(&mut defs, checkpoints);
            Arc::new(defs)
        })
        .clone()
}

fn with_checkpoints(defs: &mut serde_json::Map<String, Value>, checkpoints: &[String]) {
    for (class, input) in nodes::CHECKPOINT_INPUTS {
        if let Some(spec) = defs
            .get_mut(*class)
            .and_then(|d| d["input"]["required"].get_mut(*input))
        {
            spec[0] = json!(checkpoints);
        }
    }
}

impl Sim {
    /// The checkpoint files it has now.
    fn checkpoints(&self) -> Vec<String> {
        self.lock().checkpoints.clone()
    }

    /// Replaces the checkpoint files it has (a model added or removed on the box).
    fn set_checkpoints(&self, checkpoints: Vec<String>) {
        *self.defs.write().expect("defs") = definitions(&checkpoints);
        self.lock().checkpoints = checkpoints;
    }
}

/// Starts a simulator on `listener` in the background.
pub fn spawn(listener: TcpListener, config: SimConfig) -> SimHandle {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let sim: S = Arc::new(Sim {
        defs: std::sync::RwLock::new(definitions(&config.checkpoints)),
        inner: Mutex::new(Inner {
            rng: now_ms() | 1,
            checkpoints: config.checkpoints.clone(),
            interrupts_to_ignore: config.ignore_interrupts,
            ..Default::default()
        }),
        config,
        work: Notify::new(),
        life: watch::channel(0).0,
        hung: watch::channel(false).0,
        silence: watch::channel(0).0,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = http::router(sim.clone());
    let runner = tokio::spawn(execute::run_queue(sim.clone()));
    let task = tokio::spawn(serve_http(sim.clone(), listener, app, rx));
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
/// is aborted), or the server crashes, every connection drops at once, as
/// when a box dies.
async fn serve_http(
    sim: S,
    listener: TcpListener,
    app: axum::Router,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut life = sim.life.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if sim.is_down() {
                    // Restarting after a crash: the connection is refused.
                    drop(stream);
                    continue;
                }
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
            _ = life.changed() => connections.abort_all(),
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
