//! Workflows that start from a picture: storing input files, naming them in
//! jobs, uploading them to backends, and retention of the data folder.

mod common;

use common::*;
use orchestrator::simulator::{png, SimConfig};
use serde_json::{json, Value};

/// The names in the inbox's `accepted` folder once a manifest and its
/// picture are there.
async fn accepted_pair(accepted: &std::path::Path) -> Vec<String> {
    poll("the manifest and its picture accepted", || async {
        let names: Vec<String> = std::fs::read_dir(accepted)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        (names.len() == 2).then_some(names)
    })
    .await
}

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
    let names = accepted_pair(&accepted).await;
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
    let kept = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
    )
    .await;
    app.wait_status(&kept, "completed").await;
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
    // A second pass, queued: the job it starts from keeps its output too.
    let second_pass = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{kept}")}}),
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
    // A pass from an output retention deleted: refused at submission; the
    // one queued before runs from the output kept for it.
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{done}")}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "parameters.image");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("deleted by retention"), "{msg}");
    let kept_job = app.job(&kept).await;
    assert!(kept_job["outputs"][0]["pruned_at"].is_null(), "{kept_job}");
    app.post_json("/api/backends/a/enable", &json!({})).await;
    app.wait_status(&second_pass, "completed").await;
    // Once that pass has ended, the output goes the way of the others.
    let swept =
        orchestrator::retention::sweep_once(&app.store, &inputs, &outputs_dir, &rules, month)
            .await
            .unwrap();
    assert!(swept.output_files >= 1, "{swept:?}");
    assert!(app.job(&kept).await["outputs"][0]["pruned_at"].is_string());
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

/// Submits an invert of `image` (an input id or a `job:` reference): its
/// answer's status.
async fn submit_invert(app: &TestApp, image: &str) -> (String, String) {
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    (
        body["job_id"].as_str().unwrap().to_string(),
        body["status"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_job_starts_from_another_jobs_output_once_that_one_completes() {
    // Slow enough that the second and third are submitted while the first runs.
    let sim = start_sim(600).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 2)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, rgb) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let (first, status) = submit_invert(&app, input["input_id"].as_str().unwrap()).await;
    assert_eq!(status, "queued");
    // The second pass of the shot, and a third from the second, named by output.
    let (second, status) = submit_invert(&app, &format!("job:{first}")).await;
    assert_eq!(status, "waiting", "its parent has not completed");
    let waiting = app.job(&second).await;
    let why = waiting["waiting_for"].as_str().unwrap();
    assert!(why.contains(&first), "names the job it waits for: {why}");
    // The backend has a free slot, and takes nothing of the chain's next.
    assert!(app.job(&first).await["status"] != "completed");
    assert_eq!(app.job(&second).await["backend_id"], Value::Null);
    app.wait_status(&first, "completed").await;
    // Named by an output it will not have: it waits, then fails saying which there are.
    let (wrong, _) = submit_invert(&app, &format!("job:{second}/missing.png")).await;

    let job = app.wait_status(&second, "completed").await;
    let (w, h, out) = first_output(&app, &job).await;
    assert_eq!((w, h), (16, 8));
    assert_eq!(
        out, rgb,
        "inverted twice: the picture the first started from"
    );
    let kinds = app.event_kinds(&second).await;
    assert_eq!(kinds[..2], ["submitted", "parents_completed"], "{kinds:?}");
    let events = app.events(&second).await;
    assert_eq!(events[0]["status"], "waiting");

    let second_out = job["outputs"][0]["name"].as_str().unwrap();
    let failed = app.wait_status(&wrong, "failed").await;
    let msg = failed["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no output named `missing.png`") && msg.contains(second_out),
        "{msg}"
    );
    // No attempt could do better: failed at its first, the others unused.
    assert_eq!(failed["error"]["code"], "input_missing", "{failed}");
    assert_eq!(
        (failed["attempts"].as_i64(), failed["max_attempts"].as_i64()),
        (Some(1), Some(3))
    );
    // The same, submitted now that the parent has completed: refused at once.
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{second}/missing.png")}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "parameters.image");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no output named `missing.png`") && msg.contains(second_out),
        "{msg}"
    );
    // By name, from a completed job: queued at once, and run from that file.
    let (third, status) = submit_invert(&app, &format!("job:{second}/{second_out}")).await;
    assert_eq!(status, "queued");
    let job = app.wait_status(&third, "completed").await;
    let (_, _, out) = first_output(&app, &job).await;
    let inverted: Vec<u8> = rgb.iter().map(|v| 255 - v).collect();
    assert_eq!(out, inverted);
}

#[tokio::test]
async fn a_pass_from_an_output_whose_file_was_removed_by_hand_fails_at_once() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let first = app.submit_blur(json!({})).await;
    let job = app.wait_status(&first, "completed").await;
    let name = job["outputs"][0]["name"].as_str().unwrap();
    std::fs::remove_file(app.config.outputs_dir().join(&first).join(name)).unwrap();
    let (second, _) = submit_invert(&app, &format!("job:{first}")).await;
    let failed = app.wait_status(&second, "failed").await;
    assert_eq!(failed["error"]["code"], "input_missing", "{failed}");
    assert_eq!(failed["attempts"], 1, "{failed}");
    let msg = failed["error"]["message"].as_str().unwrap();
    assert!(msg.contains(name), "{msg}");
}

#[tokio::test]
async fn a_job_whose_parent_ends_without_completing_fails_and_so_do_its_own() {
    // No backends: nothing runs, the chain's fate is the first job's.
    let app = spawn_app().await;
    let (bytes, _) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let (first, _) = submit_invert(&app, input["input_id"].as_str().unwrap()).await;
    let (second, s2) = submit_invert(&app, &format!("job:{first}")).await;
    // The third says when it ends (to a port where nobody listens: the
    // delivery is on record, its tries are not this test's concern).
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{second}")},
                    "callback_url": "http://127.0.0.1:9/hook"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (third, s3) = (
        body["job_id"].as_str().unwrap().to_string(),
        body["status"].to_string(),
    );
    assert_eq!((s2.as_str(), s3.as_str()), ("waiting", "\"waiting\""));
    let j = app.job(&second).await;
    assert_eq!(j["starts_from"], json!([first]));
    assert_eq!(j["followed_by"], json!([third]));
    let (_, waiting) = app.get("/api/jobs?status=waiting").await;
    assert_eq!(waiting["jobs"].as_array().unwrap().len(), 2, "{waiting}");

    let (status, _) = app
        .post_json(&format!("/api/job/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    for (job, parent) in [(&second, &first), (&third, &second)] {
        let j = app.wait_status(job, "failed").await;
        assert_eq!(j["error"]["code"], "parent_failed", "{j}");
        let msg = j["error"]["message"].as_str().unwrap();
        assert!(msg.contains(parent.as_str()), "names its parent: {msg}");
        assert!(j["finished_at"].is_string());
        let kinds = app.event_kinds(job).await;
        assert_eq!(kinds, ["submitted", "failed"]);
    }
    assert!(app.job(&second).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("was cancelled"));
    let hooks = &app.job(&third).await["webhooks"];
    assert_eq!(hooks.as_array().unwrap().len(), 1, "{hooks}");
    assert_eq!(hooks[0]["status"], "failed");

    // A new job cannot start from one that ended so.
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{first}")}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "parameters.image");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("retry it first"));

    // Retried before its parent, the second waits for it again and says why.
    let (status, _) = app
        .post_json(&format!("/api/job/{second}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let j = app.job(&second).await;
    assert_eq!(j["status"], "waiting");
    let why = j["waiting_for"].as_str().unwrap();
    assert!(why.contains("cancelled: retry it"), "{why}");
    // The parent retried: queued (no backend), the child still waits.
    let (status, _) = app
        .post_json(&format!("/api/job/{first}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(app.job(&first).await["status"], "queued");
    assert_eq!(app.job(&second).await["status"], "waiting");
    // A waiting job is cancelled at once, and its own waiting child would fail.
    let (status, _) = app
        .post_json(&format!("/api/job/{second}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(app.job(&second).await["status"], "cancelled");
    let (_, counts) = app.get("/api/health").await;
    assert_eq!(counts["jobs"]["waiting"], 0, "{counts}");
}

#[tokio::test]
async fn a_reference_to_a_job_that_is_not_one_is_refused_naming_the_field() {
    let app = spawn_app().await;
    let unknown = "0191e7c8-4a7b-7c3e-9a52-2f0d6e1b9c11";
    for (image, says) in [
        (format!("job:{unknown}"), "is not known here"),
        ("job:not-a-uuid".to_string(), "job's output"),
        (format!("job:{unknown}/../../etc/passwd"), "job's output"),
        (format!("job:{unknown}/"), "job's output"),
    ] {
        let (status, body) = app
            .post_json(
                "/api/job",
                &json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
            )
            .await;
        assert_eq!(status, 422, "{image}: {body}");
        assert_eq!(body["error"]["field"], "parameters.image", "{image}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{image}: {msg}");
    }
    // In an inline graph, the field is the node's input.
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "job:nope"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let (status, body) = app.post_json("/api/job", &json!({"workflow": graph})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "workflow.1.inputs.image");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("is not a job's output"), "{msg}");
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "nothing stored");
}

#[tokio::test]
async fn the_backend_that_can_run_a_released_job_is_woken_for_it() {
    // Each box's safety-net look is past every deadline: only the
    // completion of the parent can wake the other box for its child.
    let (sa, sb) = (start_sim(0).await, start_sim(0).await);
    let app = spawn_farm_with(
        vec![
            backend("a", sa.port, &["a"], 1),
            backend("b", sb.port, &["b"], 1),
        ],
        |c| {
            c.dispatch.poll_interval_ms = 60_000;
            c.dispatch.heartbeat_ms = 60_000;
        },
    )
    .await;
    app.wait_backend("a", "online").await;
    app.wait_backend("b", "online").await;
    let (bytes, _) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": input["input_id"]},
                    "requires": ["a"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let first = body["job_id"].as_str().unwrap().to_string();
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{first}")},
                    "requires": ["b"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let second = body["job_id"].as_str().unwrap().to_string();
    app.wait_status(&first, "completed").await;
    let job = app.wait_status(&second, "completed").await;
    assert_eq!(job["backend_id"], "b");
}

#[tokio::test]
async fn a_job_names_the_one_it_starts_from_by_its_idempotency_key() {
    let sim = start_sim(300).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, rgb) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let post = |manifest: Value| {
        let app = &app;
        async move { app.post_json("/api/job", &manifest).await }
    };
    // A key with a `/` in it, as a tool names its shots.
    let (status, first) = post(
        json!({"workflow_id": "image_invert", "idempotency_key": "sc01/sh010/p1",
        "parameters": {"image": input["input_id"]}}),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let first = first["job_id"].as_str().unwrap().to_string();
    let (status, second) = post(json!({"workflow_id": "image_invert",
        "parameters": {"image": "job:key:sc01/sh010/p1"}}))
    .await;
    assert_eq!(status, 201, "{second}");
    let second = second["job_id"].as_str().unwrap().to_string();
    let job = app.job(&second).await;
    assert_eq!(job["starts_from"], json!([first]));
    assert_eq!(job["graph"]["1"]["inputs"]["image"], format!("job:{first}"));
    assert_eq!(
        job["parameters"]["image"], "job:key:sc01/sh010/p1",
        "as given"
    );
    let done = app.wait_status(&second, "completed").await;
    let (_, _, out) = first_output(&app, &done).await;
    assert_eq!(out, rgb, "inverted twice");
    // By key and output name, in an inline graph.
    let name = app.job(&first).await["outputs"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": format!("job:key:sc01/sh010/p1/{name}")}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let (status, third) = post(json!({"workflow": graph})).await;
    assert_eq!(status, 201, "{third}");
    let third = third["job_id"].as_str().unwrap();
    assert_eq!(
        app.job(third).await["graph"]["1"]["inputs"]["image"],
        format!("job:{first}/{name}")
    );
    // A key no job has: a 422 naming the field; nothing stored.
    let (status, body) = post(json!({"workflow_id": "image_invert",
        "parameters": {"image": "job:key:sc01/sh999/p1"}}))
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "parameters.image");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no job here has the idempotency key `sc01/sh999/p1`"),
        "{msg}"
    );
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 3);
}

/// A picture that meets a full disk is refused for now, never as the
/// client's fault: an upload is a `503 storage_full` (a script sends it
/// again), and a manifest dropped in the inbox with its picture stays
/// there, listed by `GET /api/health`, and is taken once space is freed
/// (it was moved to `rejected/`: the shot lost from the night).
#[tokio::test]
async fn a_picture_that_meets_a_full_disk_is_refused_for_now_and_an_inbox_drop_waits_for_space() {
    let sim = start_sim(0).await;
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("data").join("inputs");
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "inbox_dir: {}\ninbox: {{settle_ms: 50, rescan_interval_ms: 100}}\n\
             backends:\n  - {{id: a, host: 127.0.0.1, port: {}}}\n",
            inbox.display(),
            sim.port
        ),
    );
    // The input files' folder is a disk of its own, of 1 MiB, filled.
    let Some(bin) = spawn_binary_after(
        &config,
        &format!("mount -t tmpfs -o size=1m tmpfs '{}'", inputs.display()),
    )
    .await
    else {
        return;
    };
    let filler = fill_disk(&bin.sees(&inputs));

    let (bytes, _) = frame();
    let r = reqwest::Client::new()
        .post(format!("{}/api/inputs", bin.url))
        .header("content-type", "image/png")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_full", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the data folder's disk is full"),
        "{body}"
    );

    std::fs::write(inbox.join("frame.png"), &bytes).unwrap();
    std::fs::write(
        inbox.join("shot.json"),
        json!({"workflow_id": "image_invert", "parameters": {"image": "@frame.png"}}).to_string(),
    )
    .unwrap();
    let held = poll("the drop listed as held", || async {
        let health = bin.get("/api/health").await;
        let waiting = health["inbox_waiting"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        waiting.into_iter().find(|w| w["file"] == "shot.json")
    })
    .await;
    assert!(held["rejected_after"].is_null(), "{held}");
    assert!(
        held["message"].as_str().unwrap().contains("disk is full"),
        "{held}"
    );
    assert!(inbox.join("shot.json").exists() && inbox.join("frame.png").exists());

    std::fs::remove_file(&filler).unwrap();
    let accepted = inbox.join("accepted");
    let names = accepted_pair(&accepted).await;
    let manifest = names.iter().find(|n| n.ends_with(".json")).unwrap();
    let job_id = manifest
        .trim_start_matches("shot.")
        .trim_end_matches(".json");
    poll("the shot completed", || async {
        let job = bin.get(&format!("/api/job/{job_id}")).await;
        (job["status"] == "completed").then_some(())
    })
    .await;
    let health = bin.get("/api/health").await;
    assert!(health.get("inbox_waiting").is_none(), "{health}");
    bin.stop().await;
}

/// A picture of about 300 KB that does not compress (the simulator's PNG
/// stores its rows as they are).
fn large_frame() -> Vec<u8> {
    let rgb: Vec<u8> = (0..320u32 * 320 * 3)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    png::encode(320, 320, &rgb)
}

/// The largest upload each backend takes, as `GET /api/backends` shows it.
async fn upload_limits(app: &TestApp) -> Vec<(String, Value)> {
    let (_, list) = app.get("/api/backends").await;
    list["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["max_upload_bytes"].clone(),
            )
        })
        .collect()
}

/// Where an invert of a small picture ran (its leases' backends), once
/// completed.
async fn small_picture_runs_on(app: &TestApp) -> Vec<String> {
    let (bytes, _) = frame();
    let (_, input) = upload(app, bytes, "image/png").await;
    let id = app_submit(
        app,
        json!({"workflow_id": "image_invert", "parameters": {"image": input["input_id"], "filename_prefix": "small"}}),
    )
    .await;
    let job = app.wait_status(&id, "completed").await;
    leased_on(&job).into_iter().map(str::to_string).collect()
}

#[tokio::test]
async fn a_picture_larger_than_a_box_takes_is_left_to_one_that_takes_it() {
    // `small` was started with a low --max-upload-size (200 KB), `big` with
    // ComfyUI's default (100 MB); each says so on its socket.
    let small = start_sim_with(SimConfig {
        job_ms: 0,
        max_body_bytes: 200 * 1024,
        ..Default::default()
    })
    .await;
    let big = start_sim(0).await;
    let app = spawn_farm(vec![
        backend("big", big.port, &[], 1),
        backend("small", small.port, &[], 1),
    ])
    .await;
    let said = poll("each backend's upload limit recorded", || async {
        let limits = upload_limits(&app).await;
        limits.iter().all(|(_, l)| l.is_i64()).then_some(limits)
    })
    .await;
    assert_eq!(
        said,
        vec![
            ("big".to_string(), json!(100 * 1024 * 1024)),
            ("small".to_string(), json!(200 * 1024))
        ]
    );
    let bytes = large_frame();
    assert!(bytes.len() > 300_000, "{}", bytes.len());
    let (_, input) = upload(&app, bytes, "image/png").await;
    let large = input["input_id"].as_str().unwrap().to_string();

    // With `big` off, no enabled box takes it: refused at once, nothing stored.
    app.post_json("/api/backends/big/disable", &json!({})).await;
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_invert", "parameters": {"image": large}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "parameters.image", "{body}");
    let said = body["error"]["message"].as_str().unwrap();
    assert!(
        said.contains("is 0.3 MB, larger than any enabled backend takes (small 0.2 MB: its ComfyUI's --max-upload-size)"),
        "{said}"
    );
    let (_, counts) = app.get("/api/jobs/counts").await;
    assert_eq!(counts["total"], 0, "{counts}");

    // Accepted while `big` takes it (paused), then waiting with `big` off,
    // saying why `small` will not do.
    app.post_json("/api/backends/big/enable", &json!({})).await;
    let waiting = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "paused": true, "parameters": {"image": large}}),
    )
    .await;
    app.post_json("/api/backends/big/disable", &json!({})).await;
    app.post_json(&format!("/api/job/{waiting}/resume"), &json!({}))
        .await;
    let job = app
        .wait_job(&waiting, "it says why it waits", |j| {
            j["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("small"))
        })
        .await;
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.contains("small takes uploads up to 0.2 MB (its ComfyUI's --max-upload-size), and the job starts from a file of 0.3 MB"),
        "{why}"
    );
    // A small picture runs on `small` meanwhile: the box is not left out.
    assert_eq!(small_picture_runs_on(&app).await, ["small"]);
    assert_eq!(app.job(&waiting).await["status"], "queued");

    // `big` back: the large ones run there, each at its first attempt, and
    // `small` never had them to refuse.
    app.post_json("/api/backends/big/enable", &json!({})).await;
    let mut ids = vec![waiting];
    for n in 0..3 {
        ids.push(
            app_submit(
                &app,
                json!({"workflow_id": "image_invert", "parameters": {"image": large, "filename_prefix": format!("large{n}")}}),
            )
            .await,
        );
    }
    for id in &ids {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(leased_on(&job), ["big"], "{job}");
        assert_eq!(job["attempts"], 1);
    }
}

#[tokio::test]
async fn a_picture_a_proxy_refuses_goes_to_another_box_and_the_box_is_not_blamed() {
    // `proxied` sits behind a proxy that takes bodies up to 100 KB (its
    // ComfyUI says 100 MB: nothing tells the proxy's limit but its 413).
    // One failure proven elsewhere would put a box in quarantine.
    let proxied = start_sim_with(SimConfig {
        job_ms: 0,
        proxy_max_body_bytes: 100 * 1024,
        ..Default::default()
    })
    .await;
    let direct = start_sim(0).await;
    let app = spawn_farm_with(
        vec![
            backend("direct", direct.port, &[], 1),
            backend("proxied", proxied.port, &[], 1),
        ],
        |c| c.dispatch.quarantine_after = 1,
    )
    .await;
    app.wait_backend("direct", "online").await;
    app.wait_backend("proxied", "online").await;
    let (_, input) = upload(&app, large_frame(), "image/png").await;
    let large = input["input_id"].as_str().unwrap().to_string();
    app.post_json("/api/backends/direct/disable", &json!({}))
        .await;
    let id = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": large}}),
    )
    .await;
    let job = app
        .wait_job(&id, "refused by the proxy", |j| {
            j["attempts"] == 1 && j["status"] == "queued"
        })
        .await;
    let said = job["error"]["message"].as_str().unwrap();
    for part in [
        "backend proxied refused input sha256:",
        "as larger than it takes (HTTP 413: <html>",
        "--max-upload-size",
        "client_max_body_size",
    ] {
        assert!(said.contains(part), "{part}: {said}");
    }
    assert_eq!(job["error"]["code"], "upload_too_large");
    let why = job["waiting_for"].as_str().unwrap_or_default();
    assert!(
        why.contains("proxied refused a file of the job as too large (HTTP 413)"),
        "{job}"
    );

    app.post_json("/api/backends/direct/enable", &json!({}))
        .await;
    let job = app.wait_status(&id, "completed").await;
    assert_eq!(leased_on(&job), ["proxied", "direct"]);
    // No blame: with `direct` off again, `proxied` takes a small picture.
    app.post_json("/api/backends/direct/disable", &json!({}))
        .await;
    assert_eq!(small_picture_runs_on(&app).await, ["proxied"]);
    let (_, backends) = app.get("/api/backends/proxied").await;
    assert_eq!(backends["quarantined_until"], Value::Null, "{backends}");
}

#[tokio::test]
async fn a_picture_gone_from_the_box_is_uploaded_again_and_the_job_runs() {
    // One box: a refusal there would leave the job no backend at all.
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let (bytes, rgb) = frame();
    let (_, input) = upload(&app, bytes, "image/png").await;
    let image = input["input_id"].as_str().unwrap().to_string();
    let first = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image}}),
    )
    .await;
    app.wait_status(&first, "completed").await;
    // Someone empties the box's input folder; its socket stays up.
    assert_eq!(sim.clear_inputs(), 1);
    let second = app_submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": image, "filename_prefix": "again"}}),
    )
    .await;
    let job = app.wait_status(&second, "completed").await;
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(sim.input_count(), 1, "uploaded again");
    let (_, _, out) = first_output(&app, &job).await;
    let inverted: Vec<u8> = rgb.iter().map(|v| 255 - v).collect();
    assert_eq!(out, inverted);
}
