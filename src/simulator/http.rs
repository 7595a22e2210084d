//! The simulated HTTP routes, answering as ComfyUI 0.3.64 answers, and the
//! control routes (`/_sim/...`) that make it fail on demand.
//!
//! Why control routes: a test (or a person trying the orchestrator) must be
//! able to freeze a backend, drop its sockets or crash it at a moment of
//! its choosing, from outside the process too (`orchestrator simulate`).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::nodes;
use super::{Prompt, Sim, S};
use crate::comfy::parse_version;

pub(super) fn router(sim: S) -> Router {
    Router::new()
        .route("/prompt", post(post_prompt).get(get_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/history", get(get_history_all).post(post_history))
        .route("/history/{id}", get(get_history))
        .route("/view", get(view))
        .route("/system_stats", get(system_stats))
        .route(
            "/features",
            get(|State(sim): State<S>| async move { Json(features(&sim)) }),
        )
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_of))
        .route("/models", get(models))
        .route("/models/{folder}", get(models_in))
        .route("/upload/image", post(upload_image))
        .route("/ws", get(super::ws::ws))
        .layer(axum::extract::DefaultBodyLimit::max(
            sim.config.max_body_bytes,
        ))
        .layer(middleware::from_fn_with_state(sim.clone(), freeze))
        .layer(middleware::from_fn(refuse_foreign_origin))
        .merge(control())
        .with_state(sim)
}

/// Routes that make the simulator fail; they answer even when it is frozen.
fn control() -> Router<S> {
    Router::new()
        .route(
            "/_sim/hang",
            post(|State(sim): State<S>, Json(b): Json<Value>| async move {
                sim.hung.send_replace(b["on"].as_bool().unwrap_or(true));
                StatusCode::OK
            }),
        )
        .route(
            "/_sim/drop_sockets",
            post(|State(sim): State<S>| async move {
                sim.silence.send_modify(|n| *n += 1);
                StatusCode::OK
            }),
        )
        .route(
            "/_sim/disk_full",
            post(|State(sim): State<S>, Json(b): Json<Value>| async move {
                sim.lock().disk_full = b["on"].as_bool().unwrap_or(true);
                StatusCode::OK
            }),
        )
        .route(
            "/_sim/crash",
            post(|State(sim): State<S>| async move {
                sim.crash();
                StatusCode::OK
            }),
        )
        .route(
            "/_sim/checkpoints",
            post(|State(sim): State<S>, Json(b): Json<Value>| async move {
                let list = b["checkpoints"].as_array().into_iter().flatten();
                sim.set_checkpoints(
                    list.filter_map(|c| c.as_str().map(str::to_string))
                        .collect(),
                );
                StatusCode::OK
            }),
        )
        .route(
            "/_sim/ignore_interrupts",
            post(|State(sim): State<S>, Json(b): Json<Value>| async move {
                sim.lock().interrupts_to_ignore = b["count"].as_u64().unwrap_or(1) as u32;
                StatusCode::OK
            }),
        )
}

/// A frozen server answers nothing: the request waits until it thaws.
async fn freeze(State(sim): State<S>, req: Request, next: Next) -> Response {
    let mut hung = sim.hung.subscribe();
    while *hung.borrow_and_update() {
        if hung.changed().await.is_err() {
            break;
        }
    }
    next.run(req).await
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

fn bad_request(kind: &str, message: &str, details: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}})),
    )
        .into_response()
}

/// Whether this version predates client-chosen prompt ids (0.3.44).
fn ignores_prompt_ids(version: &str) -> bool {
    parse_version(version).is_some_and(|v| v < (0, 3, 44))
}

async fn post_prompt(State(sim): State<S>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("invalid_json", "Invalid JSON", "");
    };
    let Some(graph) = body.get("prompt").cloned() else {
        return bad_request("no_prompt", "No prompt provided", "No prompt provided");
    };
    let prompt_id = body["prompt_id"]
        .as_str()
        .filter(|_| !ignores_prompt_ids(&sim.config.version))
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
    let accepted = match nodes::validate(&sim, &graph) {
        Ok(a) => a,
        Err(refusal) => return (StatusCode::BAD_REQUEST, Json(refusal.body())).into_response(),
    };
    let client_id = body["client_id"].as_str().map(str::to_string);
    let mut extra_data = body.get("extra_data").cloned().unwrap_or_else(|| json!({}));
    if let (Some(cid), Some(o)) = (&client_id, extra_data.as_object_mut()) {
        o.insert("client_id".into(), json!(cid));
    }
    let prompt = Prompt {
        number: 0,
        prompt_id: prompt_id.clone(),
        graph,
        extra_data,
        outputs: accepted.good_outputs,
        client_id,
    };
    let node_errors = accepted.node_errors;
    let delay = sim.config.accept_delay_ms;
    let number = if delay > 0 {
        // As aiohttp does: the handler runs to its end even if the client gave up.
        let (sim2, (tx, rx)) = (sim.clone(), tokio::sync::oneshot::channel());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let _ = tx.send(enqueue(&sim2, prompt));
        });
        match rx.await {
            Ok(n) => n,
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    } else {
        enqueue(&sim, prompt)
    };
    if sim.config.prompt_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sim.config.prompt_delay_ms)).await;
    }
    Json(json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}))
        .into_response()
}

/// Queues a prompt; its number.
fn enqueue(sim: &Sim, mut prompt: Prompt) -> u64 {
    let number = {
        let mut inner = sim.lock();
        inner.number += 1;
        prompt.number = inner.number;
        inner.queue.push_back(prompt);
        inner.number
    };
    sim.broadcast_status();
    sim.work.notify_one();
    number
}

/// `POST /upload/image` as ComfyUI answers it: into the input folder (or a
/// subfolder of it); without `overwrite`, other bytes under a taken name
/// get `NAME (1).EXT` and the same bytes are recognised as a duplicate.
async fn upload_image(
    State(sim): State<S>,
    headers: axum::http::HeaderMap,
    mut form: axum::extract::Multipart,
) -> Response {
    let proxy = sim.config.proxy_max_body_bytes;
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if proxy > 0 && length.is_some_and(|n| n > proxy) {
        // nginx's answer past its client_max_body_size; ComfyUI never sees
        // it. Read to its end first, as nginx's lingering close does, so the
        // client, still sending, gets the answer rather than a reset.
        while let Ok(Some(mut field)) = form.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
        let page = "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [(header::CONTENT_TYPE, "text/html")],
            page,
        )
            .into_response();
    }
    let (mut file, mut subfolder, mut overwrite) = (None, String::new(), false);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name().unwrap_or("") {
            "image" => {
                let name = field.file_name().unwrap_or("image.png").to_string();
                match field.bytes().await {
                    Ok(b) => file = Some((name, b)),
                    Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        // aiohttp's words (recorded: upload_too_large.json).
                        let said = format!(
                            "Maximum request body size {} exceeded.",
                            sim.config.max_body_bytes
                        );
                        return (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            said,
                        )
                            .into_response();
                    }
                    Err(_) => return StatusCode::BAD_REQUEST.into_response(),
                }
            }
            "subfolder" => subfolder = field.text().await.unwrap_or_default(),
            "overwrite" => overwrite = matches!(field.text().await.as_deref(), Ok("true" | "1")),
            _ => {}
        }
    }
    let Some((name, bytes)) = file else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    tokio::time::sleep(Duration::from_millis(sim.config.upload_delay_ms)).await;
    if subfolder.split('/').any(|p| p == "..") || subfolder.starts_with('/') || name.contains('/') {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut inner = sim.lock();
    let mut stored = name.clone();
    if !overwrite {
        let (stem, ext) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
        let mut n = 1;
        while let Some(existing) = inner.input_files.get(&(subfolder.clone(), stored.clone())) {
            if *existing == bytes {
                break;
            }
            stored = format!("{stem} ({n}).{ext}");
            n += 1;
        }
    }
    inner
        .input_files
        .insert((subfolder.clone(), stored.clone()), bytes);
    Json(json!({"name": stored, "subfolder": subfolder, "type": "input"})).into_response()
}

async fn get_prompt(State(sim): State<S>) -> Json<Value> {
    let remaining = Sim::queue_remaining(&sim.lock());
    Json(json!({"exec_info": {"queue_remaining": remaining}}))
}

async fn get_queue(State(sim): State<S>) -> Json<Value> {
    tokio::time::sleep(Duration::from_millis(sim.config.queue_delay_ms)).await;
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
    let targeted = match (&inner.running, body["prompt_id"].as_str()) {
        (None, _) => return StatusCode::OK,
        (Some(r), Some(pid)) if pid != r.prompt.prompt_id => return StatusCode::OK,
        (_, pid) => pid.is_some(),
    };
    if targeted && inner.interrupts_to_ignore > 0 {
        // Lost, as one that lands before the prompt really starts.
        inner.interrupts_to_ignore -= 1;
        return StatusCode::OK;
    }
    if let Some(r) = inner.running.as_mut() {
        r.interrupt = true;
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
    let map: Map<String, Value> = entries
        .into_iter()
        .skip(q.offset.unwrap_or(0))
        .take(q.max_items.unwrap_or(usize::MAX))
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
    sim.lock().views += 1;
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
    if sim.config.view_delay_ms == 0 && sim.config.view_stall_ms == 0 {
        return ([(header::CONTENT_TYPE, "image/png")], bytes).into_response();
    }
    // A slow transfer: the bytes trickle in over `view_delay_ms`, in ten
    // parts; with `view_stall_ms`, it stalls after the first part.
    let pause = Duration::from_millis(sim.config.view_delay_ms / 10);
    let stall = Duration::from_millis(sim.config.view_stall_ms);
    let step = bytes.len().div_ceil(10).max(1);
    let parts: Vec<(usize, Bytes)> = (0..bytes.len())
        .step_by(step)
        .map(|i| bytes.slice(i..(i + step).min(bytes.len())))
        .enumerate()
        .collect();
    let body = futures::stream::iter(parts).then(move |(i, part)| async move {
        tokio::time::sleep(if i == 1 { pause + stall } else { pause }).await;
        Ok::<_, std::convert::Infallible>(part)
    });
    (
        [(header::CONTENT_TYPE, "image/png")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// What `GET /features` answers, and the socket's `feature_flags`: the
/// upload limit in bytes, a float as ComfyUI computes it (MB × 1024 × 1024).
pub(super) fn features(sim: &super::Sim) -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": sim.config.max_body_bytes as f64})
}

async fn system_stats(State(sim): State<S>) -> Json<Value> {
    let mut system = json!({
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
    });
    if sim.config.version.is_empty() {
        system.as_object_mut().map(|s| s.remove("comfyui_version"));
    }
    Json(json!({
        "system": system,
        "devices": [{
            "name": "simulated", "type": "cpu", "index": null,
            "vram_total": sim.config.vram_bytes,
            "vram_free": sim.config.vram_bytes.saturating_sub(1_046_913_024),
            "torch_vram_total": sim.config.vram_bytes,
            "torch_vram_free": sim.config.vram_bytes.saturating_sub(1_046_913_024)
        }]
    }))
}

async fn object_info(State(sim): State<S>) -> Response {
    let defs = sim.defs.read().expect("defs").clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&*defs).unwrap_or_default(),
    )
        .into_response()
}

async fn object_info_of(State(sim): State<S>, Path(class): Path<String>) -> Json<Value> {
    match sim.defs.read().expect("defs").get(&class) {
        Some(def) => Json(json!({ class: def })),
        None => Json(json!({})),
    }
}

/// The model folders ComfyUI 0.3.64 knows.
const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

async fn models() -> Json<Value> {
    Json(json!(MODEL_FOLDERS))
}

async fn models_in(State(sim): State<S>, Path(folder): Path<String>) -> Response {
    match folder.as_str() {
        "checkpoints" => Json(json!(sim.checkpoints())).into_response(),
        f if MODEL_FOLDERS.contains(&f) => Json(json!([])).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_versions_ignore_prompt_ids() {
        assert!(ignores_prompt_ids("0.3.40"));
        assert!(!ignores_prompt_ids("0.3.44"));
        assert!(!ignores_prompt_ids("0.3.64"));
        assert!(!ignores_prompt_ids(""));
    }
}
