//! Workflows that start from a picture: storing input files, naming them in
//! jobs, uploading them to backends, and retention of the data folder.

mod common;

use common::*;
use orchestrator::simulator::{png, SimConfig};
use serde_json::{json, Value};

/// A small picture with distinct pixels.
fn frame() -> (Vec<u8>, Vec<u8>) {
    let rgb: Vec<u8> = (0..16 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect();
    (png::encode(16, 8, &rgb), rgb)
}

async fn upload(app: &TestApp, bytes: Vec<u8>, content_type: &str) -> (u16, Value) {
    let r = app
        .client
        .post(format!("{}/api/inputs", app.url))
        .header("content-type", content_type)
        .header("x-filename", "frame.png")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_input_is_stored_once_by_its_bytes_and_read_back() {
    let app = spawn_app().await;
    let (bytes, _) = frame();
    let (status, first) = upload(&app, bytes.clone(), "image/png").await;
    assert_eq!(status, 201, "{first}");
    let id = first["input_id"].as_str().unwrap();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    assert_eq!(first["size"], bytes.len());
    assert_eq!(first["content_type"], "image/png");
    assert_eq!(first["filename"], "frame.png");
    let (status, again) = upload(&app, bytes.clone(), "application/octet-stream").await;
    assert_eq!(status, 200, "the same bytes: {again}");
    assert_eq!(again["input_id"], id);
    let r = app
        .client
        .get(format!("{}/api/inputs/{id}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().to_vec(), bytes);
    // As multipart, with one file part.
    let other = png::solid(4, 4, [9, 9, 9]);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(other)
            .file_name("grey.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let r = app
        .client
        .post(format!("{}/api/inputs", app.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (_, list) = app.get("/api/inputs").await;
    assert_eq!(list["inputs"].as_array().unwrap().len(), 2);
    let (status, _) = app
        .get(&format!("/api/inputs/sha256:{}", "0".repeat(64)))
        .await;
    assert_eq!(status, 404);
    let (status, _) = app.get("/api/inputs/sha256:..%2F..%2Fetc").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_file_that_is_not_what_it_claims_or_too_large_is_refused_and_nothing_is_kept() {
    let (mut config, dir) = test_config();
    config.limits.max_input_bytes = 2048;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    let (png_bytes, _) = frame();
    let (status, body) = upload(&app, png_bytes, "image/jpeg").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("image/png, not image/jpeg"));
    let (status, body) = upload(&app, b"just some text, not a picture".to_vec(), "image/png").await;
    assert_eq!(status, 415, "{body}");
    let (status, body) = upload(&app, vec![], "image/png").await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = upload(&app, png::solid(64, 64, [1, 2, 3]), "image/png").await;
    assert_eq!(status, 413, "{body}");
    let (_, list) = app.get("/api/inputs").await;
    assert!(list["inputs"].as_array().unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(app.config.inputs_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "no half files: {leftovers:?}");
}

#[tokio::test]
async fn a_deletion_and_a_submission_naming_the_same_input_do_not_cross() {
    // A submission checks its inputs, and its job is stored with the next
    // batch: a deletion in between used to leave a stored job naming a file
    // that was gone.
    use futures::FutureExt;
    let app = spawn_app().await;
    let (bytes, _) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let input_id = input["input_id"].as_str().unwrap().to_string();
    let ids = [input_id.clone()];
    let delete = || {
        app.client
            .delete(format!("{}/api/inputs/{input_id}", app.url))
            .send()
    };
    // While a submission naming it is being stored, a deletion is refused.
    let named = app.store.name_inputs(&ids).await;
    let r = delete().await.unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "in_use");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("submission being stored"),
        "{body}"
    );
    drop(named);
    // While a deletion is under way, a submission naming it waits...
    let deleting = app.store.start_deleting_input(&input_id).unwrap();
    let mut waiting = Box::pin(app.store.name_inputs(&ids));
    assert!(
        (&mut waiting).now_or_never().is_none(),
        "went past a deletion"
    );
    assert_eq!(
        app.store.delete_input(&input_id).await.unwrap(),
        orchestrator::store::InputDeletion::Deleted
    );
    drop(deleting);
    // ...until it ends, and then finds the input gone and says so.
    drop(
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the submission goes on once the deletion ends"),
    );
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": input_id}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "parameters.image");
}

#[tokio::test]
async fn an_image_parameter_takes_a_stored_input_and_names_itself_otherwise() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"workflow_id": "image_invert", "parameters": {}}),
            "parameters.image",
            "required",
        ),
        (
            json!({"workflow_id": "image_invert", "parameters": {"image": "frame.png"}}),
            "parameters.image",
            "input id",
        ),
        (
            json!({"workflow_id": "image_invert", "parameters": {"image": format!("sha256:{}", "a".repeat(64))}}),
            "parameters.image",
            "not stored",
        ),
        (
            json!({"workflow": {
                "1": {"class_type": "LoadImage", "inputs": {"image": "sha256:short"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}}),
            "workflow.1.inputs.image",
            "not an input id",
        ),
    ];
    for (manifest, field, needle) in cases {
        let (status, body) = app.post_json("/api/job", &manifest).await;
        assert_eq!(status, 422, "{manifest}: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
}

/// Decodes a job's first output.
async fn first_output(app: &TestApp, job: &Value) -> (u32, u32, Vec<u8>) {
    let id = job["job_id"].as_str().unwrap();
    let name = job["outputs"][0]["name"].as_str().unwrap();
    let bytes = app.output_bytes(id, name).await;
    png::decode(&bytes).expect("a PNG")
}

#[tokio::test]
async fn an_invert_job_uploads_its_picture_and_the_output_is_computed_from_it() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, rgb) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let input_id = input["input_id"].as_str().unwrap().to_string();
    let id = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": input_id}}),
    )
    .await;
    let job = app.wait_status(&id, "completed").await;
    let (w, h, out) = first_output(&app, &job).await;
    assert_eq!((w, h), (16, 8));
    let inverted: Vec<u8> = rgb.iter().map(|v| 255 - v).collect();
    assert_eq!(
        out, inverted,
        "the output is the input inverted, pixel by pixel"
    );
    let (_, list) = app.get("/api/inputs").await;
    let entry = &list["inputs"][0];
    assert_eq!(entry["jobs"][0]["job_id"], id.as_str());
    // Finished now: it may go.
    let r = app
        .client
        .delete(format!("{}/api/inputs/{input_id}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

async fn app_submit(app: &TestApp, manifest: Value) -> String {
    let (status, body) = app.post_json("/api/job", &manifest).await;
    assert_eq!(status, 201, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn an_unfinished_job_keeps_its_input_from_deletion() {
    let sim = start_sim(1_500).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, _) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let input_id = input["input_id"].as_str().unwrap().to_string();
    let id = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": input_id}}),
    )
    .await;
    app.wait_status(&id, "running").await;
    let r = app
        .client
        .delete(format!("{}/api/inputs/{input_id}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains(&id));
    app.wait_status(&id, "completed").await;
}

#[tokio::test]
async fn a_backend_that_restarted_empty_gets_the_picture_again() {
    let sim = start_sim(0).await;
    let port = sim.port;
    let app = spawn_farm(vec![backend("a", port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, _) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let image = input["input_id"].as_str().unwrap().to_string();
    let first = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
    )
    .await;
    app.wait_status(&first, "completed").await;
    // ComfyUI comes back on another disk: its input folder is empty.
    sim.kill().await;
    let _sim = restart_sim_on(port, 0).await;
    let second = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image, "filename_prefix": "again"}}),
    )
    .await;
    let job = app.wait_status(&second, "completed").await;
    assert_eq!(job["attempts"], 1, "uploaded again, not refused");
}

#[tokio::test]
async fn a_multipart_submission_stores_its_files_and_the_job_or_nothing() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, _) = frame();
    let form = |manifest: Value, bytes: Vec<u8>| {
        reqwest::multipart::Form::new()
            .text("manifest", manifest.to_string())
            .part(
                "frame",
                reqwest::multipart::Part::bytes(bytes)
                    .file_name("frame.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
    };
    // Refused (a bad parameter): neither the file nor the job stays.
    let bad = json!({"workflow_id": "image_invert", "parameters": {"image": "@frame", "filename_prefix": "../x"}});
    let r = app
        .client
        .post(format!("{}/api/job", app.url))
        .multipart(form(bad, bytes.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "parameters.filename_prefix");
    let (_, list) = app.get("/api/inputs").await;
    assert!(list["inputs"].as_array().unwrap().is_empty(), "{list}");
    // Accepted: both.
    let good = json!({"workflow_id": "image_invert", "parameters": {"image": "@frame"}});
    let r = app
        .client
        .post(format!("{}/api/job", app.url))
        .multipart(form(good, bytes))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let job = app
        .wait_status(body["job_id"].as_str().unwrap(), "completed")
        .await;
    assert!(job["parameters"]["image"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let (_, list) = app.get("/api/inputs").await;
    assert_eq!(list["inputs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_manifest_dropped_in_the_inbox_takes_the_picture_beside_it() {
    let sim = start_sim(0).await;
    let (mut config, dir) = farm_config(vec![backend("a", sim.port, &[], 1)]);
    config.inbox.settle_ms = 50;
    config.inbox.rescan_interval_ms = 100;
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    app.wait_backend("a", "online").await;
    let inbox = app.config.inbox_path().unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let (bytes, _) = frame();
    std::fs::write(inbox.join("frame.png"), &bytes).unwrap();
    std::fs::write(
        inbox.join("shot.json"),
        json!({"workflow_id": "image_invert", "parameters": {"image": "@frame.png"}}).to_string(),
    )
    .unwrap();
    let accepted = inbox.join("accepted");
    let names = poll("the manifest and its picture accepted", || async {
        let names: Vec<String> = std::fs::read_dir(&accepted)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        (names.len() == 2).then_some(names)
    })
    .await;
    assert!(names.iter().any(|n| n.ends_with(".frame.png")), "{names:?}");
    assert!(!inbox.join("frame.png").exists());
    let manifest = names.iter().find(|n| n.ends_with(".json")).unwrap();
    let job_id = manifest
        .trim_start_matches("shot.")
        .trim_end_matches(".json");
    app.wait_status(job_id, "completed").await;
}

#[tokio::test]
async fn the_command_line_uploads_a_file_parameter_first() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = frame();
    let file = dir.path().join("frame.png");
    std::fs::write(&file, bytes).unwrap();
    let out = tokio::process::Command::new(binary_path())
        .args(["submit", "--workflow", "image_invert", "-p"])
        .arg(format!("image=@{}", file.display()))
        .args(["--url", &app.url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let job = app.wait_status(&job_id, "completed").await;
    assert!(job["parameters"]["image"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
}

#[tokio::test]
async fn retention_frees_old_outputs_inputs_and_progress_and_keeps_what_is_needed() {
    let sim = start_sim(600).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, _) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let image = input["input_id"].as_str().unwrap().to_string();
    let done = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
    )
    .await;
    let job = app.wait_status(&done, "completed").await;
    let output = job["outputs"][0]["name"].as_str().unwrap().to_string();
    let blur = app.submit_blur(json!({"parameters": {"width": 32}})).await;
    let blur_job = app.wait_status(&blur, "completed").await;
    assert!(
        app.events(&blur)
            .await
            .iter()
            .any(|e| e["kind"] == "progress"),
        "a job of 600 ms leaves progress events"
    );
    let inputs = orchestrator::inputs::Inputs::new(
        app.config.inputs_dir(),
        app.store.clone(),
        app.config.limits.max_input_bytes,
    );
    let rules = orchestrator::config::RetentionConfig {
        outputs_days: Some(30),
        inputs_days: Some(30),
        progress_days: Some(7),
        ..Default::default()
    };
    let outputs_dir = app.config.outputs_dir();
    // A week later: only the progress events are old enough.
    let week = chrono::Utc::now() + chrono::Duration::days(8);
    let swept =
        orchestrator::retention::sweep_once(&app.store, &inputs, &outputs_dir, &rules, week)
            .await
            .unwrap();
    assert!(swept.progress_events > 0);
    assert_eq!((swept.output_files, swept.input_files), (0, 0));
    assert!(!app
        .events(&blur)
        .await
        .iter()
        .any(|e| e["kind"] == "progress"));
    assert!(
        app.event_kinds(&blur)
            .await
            .contains(&"completed".to_string()),
        "state changes stay"
    );
    // An input an unfinished job needs stays, whatever its age.
    app.post_json("/api/backends/a/disable", &json!({})).await;
    let waiting = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
    )
    .await;
    let month = chrono::Utc::now() + chrono::Duration::days(31);
    let swept =
        orchestrator::retention::sweep_once(&app.store, &inputs, &outputs_dir, &rules, month)
            .await
            .unwrap();
    assert!(swept.output_files >= 2, "{swept:?}");
    let job = app.job(&done).await;
    assert_eq!(job["status"], "completed", "the job and its history stay");
    assert!(job["outputs"][0]["pruned_at"].is_string(), "{job}");
    let r = app
        .client
        .get(format!("{}/api/job/{done}/outputs/{output}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    assert!(!outputs_dir.join(&done).join(&output).exists());
    let blur_output = blur_job["outputs"][0]["name"].as_str().unwrap();
    assert!(!outputs_dir.join(&blur).join(blur_output).exists());
    assert_eq!(app.job(&waiting).await["status"], "queued");
    assert_eq!(swept.input_files, 0, "a queued job still needs it");
    let (_, list) = app.get("/api/inputs").await;
    assert_eq!(list["inputs"].as_array().unwrap().len(), 1);
    let (status, _) = app
        .post_json(&format!("/api/job/{waiting}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let swept =
        orchestrator::retention::sweep_once(&app.store, &inputs, &outputs_dir, &rules, month)
            .await
            .unwrap();
    assert_eq!(swept.input_files, 1, "{swept:?}");
    let (_, list) = app.get("/api/inputs").await;
    assert!(list["inputs"].as_array().unwrap().is_empty());
    let (_, h) = app.get("/api/health").await;
    assert!(h["disk"]["database_bytes"].as_i64().unwrap() > 0, "{h}");
}

#[tokio::test]
async fn an_urgent_job_whose_picture_uploads_slowly_is_not_overtaken_on_its_backend() {
    // Two slots on one box; a picture takes 1.5 s to reach it.
    let sim = start_sim_with(SimConfig {
        job_ms: 300,
        upload_delay_ms: 1_500,
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 2)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, _) = frame();
    let (_, routine_input) = upload(&app, bytes, "image/png").await;
    let routine_input = routine_input["input_id"].as_str().unwrap().to_string();
    // The routine job's picture is on the box already (an earlier shot used it).
    let earlier = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": routine_input}}),
    )
    .await;
    app.wait_status(&earlier, "completed").await;
    let fresh = png::encode(4, 4, &[200; 4 * 4 * 3]);
    let (_, urgent_input) = upload(&app, fresh, "image/png").await;
    let urgent_input = urgent_input["input_id"].as_str().unwrap().to_string();

    // Both queued while the box is closed, then leased together in the
    // queue's order: the urgent one first.
    app.post_json("/api/backends/a/disable", &json!({})).await;
    let routine = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": routine_input, "filename_prefix": "routine"}}),
    )
    .await;
    let urgent = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "priority": 10, "parameters": {"image": urgent_input, "filename_prefix": "urgent"}}),
    )
    .await;
    app.post_json("/api/backends/a/enable", &json!({})).await;
    let urgent = app.wait_status(&urgent, "completed").await;
    let routine = app.wait_status(&routine, "completed").await;
    let started = |j: &Value| {
        chrono::DateTime::parse_from_rfc3339(j["started_at"].as_str().unwrap()).unwrap()
    };
    assert!(
        started(&urgent) < started(&routine),
        "the urgent job ran after the routine one: {urgent} {routine}"
    );
}
