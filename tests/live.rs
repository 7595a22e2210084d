//! The orchestrator against a real ComfyUI: the paths a new user walks
//! first, on model-free graphs that run in seconds on a CPU.
//!
//! Why these exist beside the simulator's tests: the simulator is built
//! from recorded exchanges, and a recording only says what happened once.
//! These check the same promises against the real server, so a ComfyUI
//! release that answers differently is found by running them, not by an
//! overnight batch.
//!
//! Why ignored: the suite must not need a ComfyUI. Run them against one
//! (`docs/operations.md`, "Checking against a real ComfyUI", says how to
//! start one on a CPU):
//!
//! ```sh
//! ORCH_LIVE_COMFYUI=127.0.0.1:8188 cargo test --test live -- --ignored
//! ```
//!
//! The tests share that server's queue, so they take turns. Each uses
//! graphs of its own run (sizes and pixels from the clock), so ComfyUI's
//! cache never answers for them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use orchestrator::config::BackendConfig;
use orchestrator::simulator::png;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The tests take turns on the one ComfyUI.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a live job may take: a CPU runs these graphs in seconds, a
/// busy one in tens of seconds.
const LIVE_DEADLINE: Duration = Duration::from_secs(180);

/// The real ComfyUI from `ORCH_LIVE_COMFYUI` (`host:port`).
fn live_backend() -> (BackendConfig, String) {
    let addr = std::env::var("ORCH_LIVE_COMFYUI").expect(
        "set ORCH_LIVE_COMFYUI=host:port to a running ComfyUI (these tests need a real one)",
    );
    let (host, port) = addr
        .rsplit_once(':')
        .expect("ORCH_LIVE_COMFYUI is host:port");
    let port: u16 = port.parse().expect("ORCH_LIVE_COMFYUI's port is a number");
    let mut b = backend("live", port, &[], 2);
    b.host = host.to_string();
    (b, format!("http://{addr}"))
}

/// A service driving the real ComfyUI, once it is online.
async fn live_app() -> (TestApp, String) {
    let (b, comfy) = live_backend();
    let app = spawn_farm_with(vec![b], |c| {
        c.dispatch.request_timeout_ms = 30_000;
        c.dispatch.cancel_timeout_s = 120;
        c.dispatch.backend_grace_s = 60;
        // A box busy on its CPU answers pings late: the defaults, not the
        // simulator tests' quick ones.
        let defaults = orchestrator::config::Config::default().dispatch;
        c.dispatch.heartbeat_ms = defaults.heartbeat_ms;
        c.dispatch.deaf_after_ms = defaults.deaf_after_ms;
    })
    .await;
    let b = app.wait_backend("live", "online").await;
    assert!(
        b["comfyui_version"].as_str().is_some_and(|v| !v.is_empty()),
        "{b:#}"
    );
    (app, comfy)
}

/// A number of this run, so each run's graphs differ from the last's.
fn nonce() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_micros()
}

/// Waits until the job is in one of `statuses` (a live deadline).
async fn wait_for(app: &TestApp, id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + LIVE_DEADLINE;
    loop {
        let job = app.job(id).await;
        if statuses.iter().any(|s| job["status"] == *s) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never reached {statuses:?}: {job:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit(app: &TestApp, manifest: Value) -> String {
    let (status, body) = app.post_json("/api/job", &manifest).await;
    assert_eq!(status, 201, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

async fn comfy_json(app: &TestApp, url: String) -> Value {
    app.client
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A graph that keeps ComfyUI busy for a while: `blurs` blurs of a
/// `side`-pixel square, one node after another (an interrupt lands between
/// nodes), saved under `prefix`.
fn slow_graph(side: u32, blurs: u32, prefix: &str) -> Value {
    let mut g = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0}}
    });
    for n in 0..blurs {
        g[(n + 2).to_string()] = json!({"class_type": "ImageBlur", "inputs": {"image": [(n + 1).to_string(), 0], "blur_radius": 31, "sigma": 8.0}});
    }
    g[(blurs + 2).to_string()] = json!({"class_type": "SaveImage", "inputs": {"images": [(blurs + 1).to_string(), 0], "filename_prefix": prefix}});
    g
}

/// A job of `blurs` blurs (see [`slow_graph`]), once ComfyUI runs it.
async fn running_slow_job(app: &TestApp, side: u32, blurs: u32, prefix: &str) -> String {
    let id = submit(app, json!({"workflow": slow_graph(side, blurs, prefix)})).await;
    wait_for(app, &id, &["running"]).await;
    id
}

/// Cancels a job and waits for its end: the job, and its last event's words.
async fn cancel(app: &TestApp, id: &str) -> (Value, String) {
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/cancel"), &json!({}))
        .await;
    assert!(status == 200 || status == 202, "{status} {body}");
    let job = wait_for(app, id, &["cancelled", "completed", "failed"]).await;
    assert_eq!(job["status"], "cancelled", "{job:#}");
    let last = app.events(id).await.last().cloned().unwrap();
    (
        job,
        last["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_job_runs_on_comfyui_and_its_outputs_are_comfyuis_files_byte_for_byte() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, comfy) = live_app().await;
    let width = 256 + nonce() % 256;
    let id = submit(
        &app,
        json!({"workflow_id": "image_blur", "parameters": {"width": width, "height": 96, "batch_size": 2, "filename_prefix": "live/blur"}}),
    )
    .await;
    let job = wait_for(&app, &id, &["completed", "failed"]).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(
        app.event_kinds(&id).await,
        [
            "submitted",
            "assigned",
            "submitted_to_backend",
            "running",
            "completed"
        ]
    );
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "{job:#}");
    for o in outputs {
        let name = o["name"].as_str().unwrap();
        let ours = app.output_bytes(&id, name).await;
        let theirs = comfy_view(&app.client, &comfy, o).await;
        assert_eq!(ours, theirs, "{name} is ComfyUI's file, byte for byte");
        assert_eq!(o["subfolder"], "live");
        assert_eq!(o["sha256"], format!("{:x}", Sha256::digest(&ours)));
        let (w, h, _) = png::decode(&ours).expect("a PNG");
        assert_eq!((w, h), (width, 96));
    }
    // The prompt's history on the backend is removed once collected.
    let prompt = job["prompt_id"].as_str().unwrap();
    poll("the collected prompt's history to be removed", || {
        let url = format!("{comfy}/history/{prompt}");
        let app = &app;
        async move { (comfy_json(app, url).await == json!({})).then_some(()) }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_video_and_an_animation_are_collected_and_the_animation_has_a_thumbnail() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, comfy) = live_app().await;
    // Even: H.264 refuses odd sizes (ComfyUI raises av.error.ExternalError).
    let side = 64 + 2 * (nonce() % 32);
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 8, "color": 16711680}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "live/shot", "format": "mp4", "codec": "h264"}},
        "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "live/anim", "fps": 6, "lossless": true, "quality": 80, "method": "default"}}
    });
    let id = submit(&app, json!({"workflow": graph})).await;
    let job = wait_for(&app, &id, &["completed", "failed"]).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    let outputs = job["outputs"].as_array().unwrap();
    let of = |ext: &str| {
        outputs
            .iter()
            .find(|o| o["name"].as_str().unwrap().ends_with(ext))
            .unwrap_or_else(|| panic!("no .{ext} output: {job:#}"))
    };
    let (video, anim) = (of("mp4"), of("webp"));
    assert_eq!(video["content_type"], "video/mp4");
    assert_eq!(video["thumbnail"], false);
    assert_eq!(anim["content_type"], "image/webp");
    assert_eq!(anim["thumbnail"], true);
    for o in [video, anim] {
        let name = o["name"].as_str().unwrap();
        let ours = app.output_bytes(&id, name).await;
        assert_eq!(ours, comfy_view(&app.client, &comfy, o).await, "{name}");
    }
    // The list's picture of the job is the animation, and its thumbnail
    // is a red square.
    let (_, list) = app.get("/api/jobs?limit=1").await;
    assert_eq!(list["jobs"][0]["preview"], anim["name"], "{list}");
    let thumb = app
        .client
        .get(format!(
            "{}/api/job/{id}/outputs/{}?thumb=64",
            app.url,
            anim["name"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.status(), 200);
    assert_eq!(thumb.headers()["content-type"], "image/jpeg");
    let jpeg = thumb.bytes().await.unwrap();
    assert!(jpeg.starts_with(&[0xff, 0xd8, 0xff]), "a JPEG");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_picture_is_uploaded_to_comfyui_and_comes_back_inverted() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, _) = live_app().await;
    let seed = nonce();
    let rgb: Vec<u8> = (0..24 * 16 * 3u32)
        .map(|i| ((i * 7 + seed) % 256) as u8)
        .collect();
    let r = app
        .client
        .post(format!("{}/api/inputs", app.url))
        .header("content-type", "image/png")
        .body(png::encode(24, 16, &rgb))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let input: Value = r.json().await.unwrap();
    let id = submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": input["input_id"]}}),
    )
    .await;
    // Its second pass, submitted before the first ran: it starts from the
    // first's output, so ComfyUI gets that file uploaded in its turn.
    let second = submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{id}")}}),
    )
    .await;
    let job = wait_for(&app, &id, &["completed", "failed"]).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    let name = job["outputs"][0]["name"].as_str().unwrap();
    let bytes = app.output_bytes(&id, name).await;
    let (w, h, out) = png::decode(&bytes).expect("a PNG");
    assert_eq!((w, h), (24, 16));
    // ComfyUI computes in floats and truncates when it saves: 255 - v can
    // come back one lower.
    for (i, (o, v)) in out.iter().zip(&rgb).enumerate() {
        let want = 255 - v;
        assert!(
            *o == want || *o + 1 == want,
            "byte {i}: {o}, the inverse of {v} is {want}"
        );
    }
    let job = wait_for(&app, &second, &["completed", "failed"]).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["starts_from"], json!([id]));
    let name = job["outputs"][0]["name"].as_str().unwrap();
    let (w, h, twice) = png::decode(&app.output_bytes(&second, name).await).expect("a PNG");
    assert_eq!((w, h), (24, 16));
    for (i, (t, v)) in twice.iter().zip(&rgb).enumerate() {
        assert!(
            t.abs_diff(*v) <= 1,
            "byte {i}: {t}, inverted twice from {v}"
        );
    }
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn the_box_upload_limit_is_recorded_as_comfyui_says_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, comfy) = live_app().await;
    // ComfyUI's own word: `--max-upload-size` in bytes, a float.
    let features = comfy_json(&app, format!("{comfy}/features")).await;
    let said = features["max_upload_size"]
        .as_f64()
        .expect("GET /features names max_upload_size");
    let recorded = poll("the limit recorded from the socket", || async {
        let (_, b) = app.get("/api/backends/live").await;
        b["max_upload_bytes"].as_i64()
    })
    .await;
    assert_eq!(recorded, said as i64, "{features}");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_value_comfyui_would_refuse_is_a_422_naming_its_field_and_nothing_is_stored() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, _) = live_app().await;
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
                "2": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 0, "height": 64, "x": 0, "y": 0}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "live/refused"}}
            }}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "workflow.2.inputs.width", "{body}");
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_model_the_box_does_not_have_is_a_422_naming_it_and_nothing_is_stored() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, _) = live_app().await;
    // What the box has comes from its own `/object_info`.
    let missing = format!("no_such_model_{}.safetensors", nonce());
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow": {
                "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": missing}},
                "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "live/model"}}
            }}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["field"], "workflow.1.inputs.ckpt_name",
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&missing)),
        "{body}"
    );
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_runtime_error_fails_the_job_with_comfyuis_exception_after_its_retry() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, _) = live_app().await;
    let side = 32 + nonce() % 64;
    // Alpha of an RGB image: valid to ComfyUI's checks, an error when run.
    let id = submit(
        &app,
        json!({"workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
            "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "live/error"}}
        }}),
    )
    .await;
    let job = wait_for(&app, &id, &["completed", "failed"]).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    let error = &job["error"];
    assert_eq!(error["node_id"], "2", "{error:#}");
    assert_eq!(error["node_type"], "ImageToMask", "{error:#}");
    assert_eq!(error["exception_type"], "IndexError", "{error:#}");
    assert!(error["traceback"].as_array().is_some_and(|t| !t.is_empty()));
    let kinds = app.event_kinds(&id).await;
    assert!(
        kinds.contains(&"retry_scheduled".to_string()),
        "the first failure is retried: {kinds:?}"
    );
    assert_eq!(job["attempts"], 2, "{job:#}");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_cancel_takes_our_prompt_out_of_the_queue_and_spares_a_prompt_not_ours() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, comfy) = live_app().await;
    // An artist's prompt, queued from ComfyUI's own page: it runs first.
    let theirs: Value = app
        .client
        .post(format!("{comfy}/prompt"))
        .json(&json!({"prompt": slow_graph(1536 + nonce() % 64, 4, "live/artist"), "client_id": "an-artist"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let theirs = theirs["prompt_id"].as_str().unwrap().to_string();
    let id = submit(
        &app,
        json!({"workflow_id": "image_blur", "parameters": {"width": 128 + nonce() % 64, "height": 64}}),
    )
    .await;
    // Ours waits on the backend behind theirs.
    let ours = poll("our prompt to wait in ComfyUI's queue", || {
        let (app, id) = (&app, &id);
        let url = format!("{comfy}/queue");
        async move {
            let job = app.job(id).await;
            let prompt = job["prompt_id"].as_str()?.to_string();
            let q = comfy_json(app, url).await;
            let has = |lane: &str| {
                q[lane]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|p| p[1] == prompt.as_str()))
            };
            assert!(
                !has("queue_running"),
                "ours runs already: the artist's prompt ended too soon for this machine (make slow_graph slower)"
            );
            has("queue_pending").then_some(prompt)
        }
    })
    .await;
    // The artist's prompt is counted as taking one of the box's slots.
    poll("the artist's prompt to be counted as not ours", || async {
        let (_, b) = app.get("/api/backends/live").await;
        (b["prompts_not_ours"] == 1).then_some(())
    })
    .await;
    let (_, last) = cancel(&app, &id).await;
    assert!(last.contains("removed from backend"), "{last}");
    let q = comfy_json(&app, format!("{comfy}/queue")).await;
    assert!(
        !q.to_string().contains(&ours),
        "our prompt is gone from ComfyUI's queue: {q}"
    );
    // Theirs runs to its end, untouched.
    let deadline = Instant::now() + LIVE_DEADLINE;
    let entry = loop {
        let h = comfy_json(&app, format!("{comfy}/history/{theirs}")).await;
        if let Some(entry) = h.get(&theirs) {
            break entry.clone();
        }
        assert!(Instant::now() < deadline, "the artist's prompt never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ran_untouched(&entry);
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_cancel_of_a_running_job_interrupts_it_on_comfyui() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, comfy) = live_app().await;
    let id = running_slow_job(&app, 1536 + nonce() % 64, 6, "live/cancelled").await;
    let (job, last) = cancel(&app, &id).await;
    assert_eq!(job["outputs"].as_array().map_or(0, |o| o.len()), 0);
    assert!(last.contains("interrupted"), "{last}");
    let q = comfy_json(&app, format!("{comfy}/queue")).await;
    assert_eq!(q["queue_running"], json!([]), "{q}");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_pause_with_interrupt_stops_the_job_on_comfyui_and_queues_it_paused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, comfy) = live_app().await;
    let id = running_slow_job(&app, 1536 + nonce() % 64, 6, "live/paused").await;
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/pause"), &json!({"interrupt": true}))
        .await;
    assert!(status == 202 || status == 200, "{status} {body}");
    let job = wait_for(&app, &id, &["queued", "completed", "failed"]).await;
    assert_eq!(job["status"], "queued", "{job:#}");
    assert!(job["paused_at"].is_string(), "{job:#}");
    assert_eq!(job["attempts"], 0, "{job:#}");
    assert_eq!(job["leases"][0]["outcome"], "paused", "{job:#}");
    let q = comfy_json(&app, format!("{comfy}/queue")).await;
    assert_eq!(q["queue_running"], json!([]), "{q}");
    // Not left queued and paused for the next test's farm.
    let (job, _) = cancel(&app, &id).await;
    assert_eq!(job["paused_at"], Value::Null, "an ended job is not paused");
}

#[tokio::test]
#[ignore = "needs a real ComfyUI: ORCH_LIVE_COMFYUI=host:port"]
async fn a_job_running_through_a_restart_of_the_orchestrator_completes_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, _) = live_app().await;
    let id = running_slow_job(&app, 1024 + nonce() % 64, 4, "live/restart").await;
    let app = app.restart().await;
    let job = wait_for(&app, &id, &["completed", "failed"]).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1, "{job:#}");
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "assigned").count(),
        1,
        "sent to ComfyUI once: {kinds:?}"
    );
}

/// `ORCH_LIVE_COMFYUI_RESTART`: a shell command that kills the ComfyUI and
/// starts it again (and returns once it answers).
#[tokio::test]
#[ignore = "needs a real ComfyUI and a command that restarts it: ORCH_LIVE_COMFYUI_RESTART"]
async fn a_job_whose_comfyui_restarts_runs_again_without_the_attempt_counting() {
    let restart = std::env::var("ORCH_LIVE_COMFYUI_RESTART").expect(
        "set ORCH_LIVE_COMFYUI_RESTART to a shell command that restarts the ComfyUI (or --skip this test)",
    );
    let _turn = ONE_AT_A_TIME.lock().await;
    let (app, _) = live_app().await;
    let id = running_slow_job(&app, 1024 + nonce() % 64, 4, "live/lost").await;
    let done = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&restart)
            .status()
            .expect("the restart command runs")
    })
    .await
    .unwrap();
    assert!(done.success(), "the restart command failed: {done}");
    let job = wait_for(&app, &id, &["completed", "failed"]).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["attempts"], 1, "the lost run does not count: {job:#}");
    let requeued = app
        .events(&id)
        .await
        .into_iter()
        .find(|e| e["kind"] == "requeued")
        .expect("taken back once the restarted ComfyUI no longer knew the prompt");
    assert!(
        requeued["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not count")),
        "{requeued:#}"
    );
}
