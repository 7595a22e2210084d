//! The ways real ComfyUI servers fail, each produced by the simulator and
//! met by a real orchestrator over loopback: a job that kills its backend, a
//! half-valid graph, a submit whose answer never came, an old server, a
//! cancel that loses the race, a deaf socket, a run that never ends, other
//! refusals, output names ComfyUI would refuse, a frozen backend, a stalled
//! download, a full disk, a low limit on open files, log files that pile up. Each test is one case of `docs/operations.md`.

mod common;

use common::*;
use orchestrator::simulator::SimConfig;
use serde_json::{json, Value};

/// EmptyImage → ImageBlur → SaveImage, with `title` on the blur (the
/// simulator crashes or hangs on a node titled `sim:crash` / `sim:hang`).
fn blur_graph(title: &str, prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0},
              "_meta": {"title": title}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    })
}

async fn submit(app: &TestApp, manifest: Value) -> String {
    let (status, body) = app.post_json("/api/job", &manifest).await;
    assert_eq!(status, 201, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

fn messages(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| format!("{}: {}", e["kind"], e["message"]))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_job_that_kills_its_backend_fails_after_max_lost_runs_instead_of_killing_every_box() {
    let sim = start_sim_with(SimConfig {
        job_ms: 200,
        crash_down_ms: 200,
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = submit(&app, json!({"workflow": blur_graph("sim:crash", "crash")})).await;
    let job = app.wait_status(&id, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("died under it 2 times"), "{message}");
    assert!(message.contains("may be what crashes them"), "{message}");
    assert_eq!(job["error"]["lost_runs"], 2);
    let events = app.events(&id).await;
    assert!(
        messages(&events).contains("lost while running: 1 of 2"),
        "{}",
        messages(&events)
    );
    assert_eq!(sim.prompt_posts().len(), 2, "two runs, then it stops");
    // A prompt lost while only waiting in the queue costs nothing: the
    // backend is fine again and a normal job runs there.
    let ok = submit(&app, json!({"workflow": blur_graph("", "after")})).await;
    app.wait_status(&ok, "completed").await;
}

#[tokio::test]
async fn a_job_lost_twice_by_one_sick_box_goes_to_another_box_rather_than_fail() {
    // A box whose ComfyUI dies under every job, and a sound one an operator
    // has disabled for now: the sick box loses the shot twice (no other
    // may take it meanwhile). Two deaths on one box say nothing of the
    // shot: it waits for another box, and completes there.
    let sick = start_sim_with(SimConfig {
        job_ms: 100,
        crash_rate: 1.0,
        crash_down_ms: 100,
        ..Default::default()
    })
    .await;
    let sound = start_sim(50).await;
    let app = spawn_farm(vec![
        backend("sick", sick.port, &[], 1),
        backend("sound", sound.port, &[], 1),
    ])
    .await;
    app.post_json("/api/backends/sound/disable", &json!({}))
        .await;
    app.wait_backend("sick", "online").await;
    let id = submit(&app, json!({"workflow": blur_graph("", "shot")})).await;
    let job = app
        .wait_job(&id, "the sick box kept off it", |j| {
            j["leases"].as_array().is_some_and(|l| l.len() == 2)
                && j["leases"][1]["finished_at"].is_string()
        })
        .await;
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(job["leases"][0]["backend_id"], "sick", "{job}");
    assert_eq!(job["leases"][1]["backend_id"], "sick", "{job}");
    let waits = job["waiting_for"].to_string();
    assert!(waits.contains("died under it 2 times"), "{job}");
    assert_eq!(
        sick.prompt_posts().len(),
        2,
        "the sick box takes it no more"
    );
    app.post_json("/api/backends/sound/enable", &json!({}))
        .await;
    let job = app.wait_status(&id, "completed").await;
    assert_eq!(job["backend_id"], "sound", "{job}");
}

#[tokio::test]
async fn a_half_valid_graph_is_a_rejection_and_its_valid_part_is_removed_from_the_backend() {
    let sim = start_sim(1_000).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_inventory("a").await;
    // The recorded half-valid graph: once the backend's node list is known,
    // its out-of-range value is refused at submit and never reaches a GPU.
    let rec: Value =
        serde_json::from_str(include_str!("fixtures/comfyui/partial_validation.json")).unwrap();
    let recorded = rec["exchange"][1]["request"]["json"]["prompt"].clone();
    let (status, body) = app
        .post_json("/api/job", &json!({"workflow": recorded}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["field"], "workflow.3.inputs.blur_radius",
        "{body}"
    );
    // What only the backend can check (is the picture in its input folder?)
    // still gets through: ComfyUI starts the valid branch and names the
    // broken one.
    let graph = json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage",
              "inputs": {"images": ["1", 0], "filename_prefix": "partial_ok"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "4": {"class_type": "SaveImage",
              "inputs": {"images": ["3", 0], "filename_prefix": "partial_bad"}}
    });
    let id = submit(&app, json!({"workflow": graph})).await;
    let job = app.wait_status(&id, "failed").await;
    let error = &job["error"];
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("part of the graph does not validate"),
        "{message}"
    );
    assert!(
        message.contains("node 3 (LoadImage)") && message.contains("missing.png"),
        "{message}"
    );
    assert_eq!(error["node_errors"]["3"]["dependent_outputs"], json!(["4"]));
    assert_eq!(job["leases"][0]["outcome"], "rejected");
    // The valid branch that ComfyUI started is gone from the backend.
    poll("the prompt removed from the backend", || async {
        (sim.queue_len() == 0 && sim.history_ids().is_empty()).then_some(())
    })
    .await;
    assert!(job["outputs"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_submit_whose_answer_never_came_is_not_run_twice_on_the_gpu() {
    // The backend queues each submit 1.5 s after it arrives; the orchestrator
    // gives up on an answer after 1 s.
    let sim = start_sim_with(SimConfig {
        job_ms: 3_000,
        accept_delay_ms: 1_500,
        ..Default::default()
    })
    .await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.dispatch.request_timeout_ms = 1_000;
    })
    .await;
    app.wait_backend("a", "online").await;
    let id = submit(&app, json!({"workflow": blur_graph("", "doubt")})).await;
    let job = app.wait_status(&id, "completed").await;
    let leases = job["leases"].as_array().unwrap();
    // Whatever the timing, each prompt id that reached the backend either
    // is the one that completed or was removed: never a second finished run.
    let completed: Vec<&Value> = leases
        .iter()
        .filter(|l| l["outcome"] == "completed")
        .collect();
    assert_eq!(completed.len(), 1, "{leases:?}");
    let done = completed[0]["prompt_id"].as_str().unwrap();
    poll("the cleanup list to be worked", || async {
        let others: Vec<String> = sim
            .history_ids()
            .into_iter()
            .filter(|p| p != done)
            .collect();
        (others.is_empty() && sim.queue_len() == 0).then_some(())
    })
    .await;
    for l in leases.iter().filter(|l| l["outcome"] == "lost") {
        let message = l["error"]["message"].as_str().unwrap();
        assert!(message.contains("never confirmed prompt"), "{message}");
    }
    assert!(
        sim.prompt_posts().values().all(|n| *n == 1),
        "no prompt id is ever posted twice"
    );
}

#[tokio::test]
async fn a_backend_too_old_to_take_our_prompt_ids_gets_no_jobs_and_says_why() {
    let old = start_sim_with(SimConfig {
        version: "0.3.50".into(),
        ..Default::default()
    })
    .await;
    let silent = start_sim_with(SimConfig {
        version: String::new(),
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![
        backend("old", old.port, &[], 1),
        backend("silent", silent.port, &[], 1),
    ])
    .await;
    let b = app.wait_backend("old", "incompatible").await;
    assert!(
        b["last_error"]
            .as_str()
            .unwrap()
            .contains("older than 0.3.56"),
        "{b}"
    );
    assert_eq!(b["accepting_jobs"], false);
    let b = app.wait_backend("silent", "incompatible").await;
    assert!(
        b["last_error"]
            .as_str()
            .unwrap()
            .contains("does not report"),
        "{b}"
    );
    let (_, list) = app.get("/api/backends").await;
    assert!(list["message"]
        .as_str()
        .unwrap()
        .contains("no backend is accepting jobs"));
    let id = app.submit_blur(json!({})).await;
    let job = app
        .wait_job(&id, "a reason to wait", |j| {
            j["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("old is incompatible"))
        })
        .await;
    assert_eq!(job["status"], "queued");
    assert!(old.prompt_posts().is_empty() && silent.prompt_posts().is_empty());
}

#[tokio::test]
async fn a_cancel_whose_first_interrupt_is_lost_is_sent_again_until_it_lands() {
    let sim = start_sim(3_000).await;
    sim.ignore_interrupts(1);
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = app.submit_blur(json!({})).await;
    app.wait_status(&id, "running").await;
    let (status, _) = app
        .post_json(&format!("/api/job/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let job = app.wait_status(&id, "cancelled").await;
    let last = app.events(&id).await.last().cloned().unwrap();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("interrupted on backend a"),
        "{last}"
    );
    assert!(job["outputs"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_cancel_that_comes_too_late_leaves_the_job_completed_and_says_so() {
    let sim = start_sim(800).await;
    sim.ignore_interrupts(1_000);
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = app.submit_blur(json!({})).await;
    app.wait_status(&id, "running").await;
    app.post_json(&format!("/api/job/{id}/cancel"), &json!({}))
        .await;
    let job = app.wait_status(&id, "completed").await;
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1);
    let kinds = app.event_kinds(&id).await;
    assert!(kinds.contains(&"cancel_too_late".to_string()), "{kinds:?}");
}

/// Opens and closes a socket with the backend's client id: ComfyUI then
/// forgets the orchestrator's socket, which stays open and hears nothing.
async fn take_over_socket(app: &TestApp, backend_id: &str, port: u16) {
    let (_, b) = app.get(&format!("/api/backends/{backend_id}")).await;
    let cid = b["client_id"].as_str().unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws?clientId={cid}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.close(None).await.unwrap();
}

fn progress_after(events: &[Value], after: chrono::DateTime<chrono::Utc>) -> usize {
    events
        .iter()
        .filter(|e| e["kind"] == "progress")
        .filter(|e| {
            e["at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t > after)
        })
        .count()
}

#[tokio::test]
async fn a_socket_deafened_by_another_with_our_client_id_is_noticed_and_replaced() {
    let sim = start_sim(2_000).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    // Let the worker's socket be confirmed, then deafen it.
    let first = app.submit_blur(json!({})).await;
    app.wait_status(&first, "completed").await;
    take_over_socket(&app, "a", sim.port).await;
    let deafened = chrono::Utc::now();
    let id = app.submit_blur(json!({"parameters": {"width": 48}})).await;
    app.wait_status(&id, "completed").await;
    let events = app.events(&id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"backend_socket_deaf"), "{kinds:?}");
    assert!(
        progress_after(&events, deafened) > 0,
        "progress is heard again after the reconnect: {kinds:?}"
    );
}

#[tokio::test]
async fn messages_that_waited_while_the_worker_was_busy_are_not_a_deaf_socket() {
    // The backend answers `/queue` late: a worker reconciling waits on it
    // while the prompt ends and its messages arrive unread on the socket.
    // Those are late, not missing: no reconnect, no deaf-socket event.
    let sim = start_sim_with(SimConfig {
        job_ms: 2_500,
        queue_delay_ms: 1_500,
        ..Default::default()
    })
    .await;
    let app = spawn_farm_online(vec![backend("a", sim.port, &[], 1)]).await;
    let id = app.submit_blur(json!({})).await;
    app.wait_status(&id, "completed").await;
    // The worker takes the next job only once that reconcile is over (a
    // deaf verdict included): then the first job's events are complete.
    let next = app.submit_blur(json!({"parameters": {"width": 48}})).await;
    app.wait_status(&next, "completed").await;
    let events = app.events(&id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        !kinds.contains(&"backend_socket_deaf"),
        "{}",
        messages(&events)
    );
    assert_eq!(sim.socket_opens(), 1, "the worker never reconnected");
    assert_eq!(sim.prompt_posts().len(), 2, "one run each");
}

#[tokio::test]
async fn a_socket_dropped_silently_is_noticed_by_its_pings_and_replaced() {
    let sim = start_sim(3_000).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = app.submit_blur(json!({})).await;
    app.wait_status(&id, "running").await;
    sim.drop_sockets();
    let dropped = chrono::Utc::now();
    app.wait_status(&id, "completed").await;
    let events = app.events(&id).await;
    assert!(
        progress_after(&events, dropped) > 0,
        "progress resumed on a new socket: {}",
        messages(&events)
    );
}

#[tokio::test]
async fn a_run_past_its_time_limit_fails_and_what_waits_behind_it_moves_elsewhere() {
    let a = start_sim(0).await;
    let b = start_sim(0).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 2),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.post_json("/api/backends/b/disable", &json!({})).await;
    let hung = submit(
        &app,
        json!({"workflow": blur_graph("sim:hang", "hung"), "timeout_s": 1, "max_attempts": 1}),
    )
    .await;
    app.wait_status(&hung, "running").await;
    let behind = app.submit_blur(json!({})).await;
    app.wait_job(&behind, "waiting on a", |j| j["backend_id"] == "a")
        .await;
    app.post_json("/api/backends/b/enable", &json!({})).await;
    let job = app.wait_status(&hung, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("timed out after 1 s on backend a"),
        "{message}"
    );
    let job = app.wait_status(&behind, "completed").await;
    assert_eq!(job["backend_id"], "b", "taken back from the stuck backend");
    assert_eq!(job["attempts"], 1, "being taken back does not count");
    // The hung prompt still runs there (it ignores interrupts): a gets nothing new.
    let next = app.submit_blur(json!({"parameters": {"width": 40}})).await;
    let job = app.wait_status(&next, "completed").await;
    assert_eq!(job["backend_id"], "b");
    assert!(a.running().is_some());
    // A manifest's limit is checked.
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_blur", "timeout_s": 0}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "timeout_s");
}

#[tokio::test]
async fn a_refusal_other_than_a_400_fails_the_attempt_with_its_status_instead_of_looping() {
    let sim = start_sim_with(SimConfig {
        max_body_bytes: 300,
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = app.submit_blur(json!({})).await;
    let job = app.wait_status(&id, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("HTTP 413"), "{message}");
    assert_eq!(job["error"]["http_status"], 413);
    assert_eq!(
        job["leases"].as_array().unwrap().len(),
        1,
        "refused once, not retried there"
    );
}

#[tokio::test]
async fn output_names_comfyui_would_refuse_are_a_422_at_submit() {
    let app = spawn_app().await;
    for bad in ["/abs/path", "../escape", "a\\b", "tab\there"] {
        let (status, body) = app
            .post_json(
                "/api/job",
                &json!({"workflow_id": "image_blur", "parameters": {"filename_prefix": bad}}),
            )
            .await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(
            body["error"]["field"], "parameters.filename_prefix",
            "{body}"
        );
    }
    let (status, body) = app
        .post_json("/api/job", &json!({"workflow": blur_graph("", "../x")}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "workflow.3.inputs.filename_prefix");
    let (_, h) = app.get("/api/health").await;
    assert_eq!(h["jobs"]["queued"], 0, "nothing stored");
}

#[tokio::test]
async fn a_frozen_backend_loses_its_jobs_after_the_grace_period_and_is_cleaned_when_it_thaws() {
    let a = start_sim(3_000).await;
    let b = start_sim(0).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 2),
        backend("b", b.port, &[], 2),
    ])
    .await;
    app.post_json("/api/backends/b/disable", &json!({})).await;
    let running = app.submit_blur(json!({})).await;
    let waiting = app.submit_blur(json!({"parameters": {"width": 40}})).await;
    app.wait_status(&running, "running").await;
    app.wait_job(&waiting, "on a", |j| j["backend_id"] == "a")
        .await;
    // The box freezes: TCP stays up, nothing answers, not even pings.
    a.hang(true);
    app.post_json("/api/backends/b/enable", &json!({})).await;
    for id in [&running, &waiting] {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "b");
        assert_eq!(job["attempts"], 1);
        let kinds = app.event_kinds(id).await;
        assert!(kinds.contains(&"requeued".to_string()), "{kinds:?}");
    }
    // It thaws: before it gets anything new, what it still had is removed.
    a.hang(false);
    poll("the frozen box's prompts removed", || async {
        (a.queue_len() == 0).then_some(())
    })
    .await;
    let a_prompts: Vec<String> = a.prompt_posts().keys().cloned().collect();
    poll("their history removed too", || async {
        let h = a.history_ids();
        a_prompts.iter().all(|p| !h.contains(p)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_download_that_stalls_is_an_error_for_that_backend_not_an_hours_wait() {
    let sim = start_sim_with(SimConfig {
        job_ms: 0,
        view_stall_ms: 600_000,
        ..Default::default()
    })
    .await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.dispatch.request_timeout_ms = 300;
    })
    .await;
    app.wait_backend("a", "online").await;
    let id = app.submit_blur(json!({"max_attempts": 1})).await;
    let job = app.wait_status(&id, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("outputs could not be collected"),
        "{message}"
    );
    assert!(message.contains("did not answer within"), "{message}");
    // No half file under a real name.
    let dir = app.config.outputs_dir().join(&id);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(names.is_empty(), "{names:?}");
}

/// A run past its time limit that its node ends later by itself (it never
/// looked for the interrupt): the box is free the moment ComfyUI says its
/// queue changed, not at the next safety-net round (here ten minutes).
#[tokio::test]
async fn a_box_whose_timed_out_prompt_ends_by_itself_takes_the_next_job_at_once() {
    let sim = start_sim_with(SimConfig {
        job_ms: 2_000,
        ignore_interrupts: 1_000,
        ..Default::default()
    })
    .await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.dispatch.poll_interval_ms = 600_000
    })
    .await;
    app.wait_backend("a", "online").await;
    let slow = app
        .submit_blur(json!({"timeout_s": 1, "max_attempts": 1}))
        .await;
    app.wait_status(&slow, "running").await;
    let next = app.submit_blur(json!({"parameters": {"width": 40}})).await;
    let job = app.wait_status(&slow, "failed").await;
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 1 s"),
        "{job}"
    );
    let job = app.wait_status(&next, "completed").await;
    assert_eq!(job["backend_id"], "a");
}

#[tokio::test]
async fn outputs_that_meet_a_full_disk_wait_on_their_box_and_arrive_once_space_is_freed() {
    // The orchestrator's disk fills at night (a render of long videos):
    // the finished shots' outputs cannot be written. That is neither the
    // box's fault nor the shot's: they wait on the box, spend no attempt,
    // and arrive once the operator frees space.
    let sim = start_sim(0).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "dispatch: {{poll_interval_ms: 50, deaf_after_ms: 100}}\nbackends:\n  - {{id: n1, host: 127.0.0.1, port: {}, max_inflight: 1}}\n",
            sim.port
        ),
    );
    // The outputs' folder is a disk of its own, of 1 MiB, which the test
    // fills before the job finishes.
    let outputs = dir.path().join("data").join("outputs");
    std::fs::create_dir_all(&outputs).unwrap();
    let Some(bin) = spawn_binary_after(
        &config,
        &format!("mount -t tmpfs -o size=1m tmpfs '{}'", outputs.display()),
    )
    .await
    else {
        return;
    };
    let filler = fill_disk(&bin.sees(&outputs));
    let id = bin
        .submit(&json!({"workflow": blur_graph("blur", "night/shot")}))
        .await;
    let said = poll("the job's log to say its outputs wait", || async {
        let events = bin.get(&format!("/api/job/{id}/events")).await;
        let events = events["events"].as_array().unwrap().clone();
        events
            .iter()
            .any(|e| e["kind"] == "outputs_wait")
            .then_some(events)
    })
    .await;
    let wait = said.iter().find(|e| e["kind"] == "outputs_wait").unwrap();
    assert!(
        wait["message"].as_str().unwrap().contains("disk is full"),
        "{wait}"
    );
    // Tried again and again, more times than a backend's failures are
    // allowed (5), and not failed for it; the box, quiet meanwhile, is not
    // taken for deaf (the prompt's end was heard).
    let (views, opens) = (sim.views(), sim.socket_opens());
    poll("ten more tries to collect", || async {
        (sim.views() >= views + 10).then_some(())
    })
    .await;
    let job = bin.get(&format!("/api/job/{id}")).await;
    assert_eq!(job["status"], "running", "{job:#}");
    assert_eq!(job["attempts"], 1);
    let events = bin.get(&format!("/api/job/{id}/events")).await;
    let waits = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "outputs_wait")
        .count();
    assert_eq!(waits, 1, "said once: {events:#}");
    assert!(sim.history_ids().len() == 1, "the box keeps the prompt");
    assert_eq!(sim.socket_opens(), opens, "no reconnect to the box");
    // The next shot waits behind it, and its page says what to do.
    let next = bin
        .submit(&json!({"workflow": blur_graph("blur", "night/next")}))
        .await;
    let job = bin.get(&format!("/api/job/{next}")).await;
    assert_eq!(
        job["waiting_for"],
        "no backend can take it now: n1 is busy (1 of 1 slots; 1 of them finished, their outputs \
         waiting for space on the orchestrator's full disk: free space on it)",
        "{job:#}"
    );
    let box_ = bin.get("/api/backends/n1").await;
    assert_eq!(box_["outputs_waiting_for_disk"], 1, "{box_:#}");

    std::fs::remove_file(&filler).unwrap();
    let job = poll("the job completed once space is freed", || async {
        let job = bin.get(&format!("/api/job/{id}")).await;
        (job["status"] != "running").then_some(job)
    })
    .await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["attempts"], 1);
    let output = &job["outputs"][0];
    let bytes = reqwest::get(format!(
        "{}/api/job/{id}/outputs/{}",
        bin.url,
        output["name"].as_str().unwrap()
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    assert_eq!(bytes.len() as i64, output["size"].as_i64().unwrap());
    assert!(bytes.starts_with(b"\x89PNG"));
    let job = poll("the next shot completed", || async {
        let job = bin.get(&format!("/api/job/{next}")).await;
        (job["status"] == "completed").then_some(job)
    })
    .await;
    assert_eq!(job["attempts"], 1, "{job:#}");
    let box_ = bin.get("/api/backends/n1").await;
    assert_eq!(box_["outputs_waiting_for_disk"], 0, "{box_:#}");
    bin.stop().await;
}

/// The files (sockets included) process `pid` holds open.
fn open_files_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_low_limit_on_open_files_is_raised_at_start_and_watched_near_its_end() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("SKIPPED: no /proc on this system");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    // Started as a login shell or a systemd unit would start it: a soft
    // limit far under the hard one.
    let bin = spawn_binary_with_open_files(&config, 64, 200).await;
    let pid = bin.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        ["200", "200"],
        "the soft limit raised to the hard one: {line}"
    );
    assert_eq!(bin.metric("process_max_fds").await, 200.0);
    let open = bin.metric("process_open_fds").await as usize;
    let seen = open_files_of(pid);
    assert!(open.abs_diff(seen) <= 4, "metrics say {open}, /proc {seen}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let resident = bin.metric("process_resident_memory_bytes").await / 1024.0;
    assert!(
        (resident - rss_kib).abs() < rss_kib / 4.0,
        "metrics say {resident} KiB resident, /proc {rss_kib} KiB"
    );
    let health = bin.get("/api/health").await;
    assert!(health["warnings"].is_null(), "{health}");

    // Dashboards, each holding its live stream open, until four fifths of
    // the limit are in use.
    let mut streams = Vec::new();
    while open_files_of(pid) < 160 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = bin.url.strip_prefix("http://").unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /api/events HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        streams.push(conn);
        assert!(streams.len() < 200, "each stream holds a file open");
    }
    // The count the health check reads is at most a second old.
    poll("the warning of files near the limit", || async {
        let health = bin.get("/api/health").await;
        health["warnings"]
            .as_array()
            .is_some_and(|warnings| {
                warnings.iter().any(|w| {
                    let w = w.as_str().unwrap();
                    w.contains("of the 200 files this process may open are open")
                        && w.contains("LimitNOFILE=")
                })
            })
            .then_some(())
    })
    .await;
    // Closed, they are counted no longer: the warning goes.
    drop(streams);
    poll("the warning to go with the streams", || async {
        bin.get("/api/health").await["warnings"]
            .is_null()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn log_files_older_than_logs_days_are_deleted_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // A month of an older run's daily files, and beside them files that
    // are not the service's logs, or not old.
    let old: Vec<String> = (1..=30)
        .map(|d| format!("orchestrator.log.2026-10-{d:02}"))
        .collect();
    for name in &old {
        std::fs::write(logs.join(name), "a day's log\n").unwrap();
    }
    let others = [
        "notes.txt",
        "orchestrator.log.2026-10-01.gz",
        "orchestrator.log.2099-01-01",
    ];
    for name in others {
        std::fs::write(logs.join(name), "mine").unwrap();
    }
    let config = write_config(
        dir.path(),
        &format!("log_dir: {}\nretention: {{logs_days: 3}}\n", logs.display()),
    );
    let bin = spawn_binary(&config).await;
    // The sweeper's first round, at start.
    poll("the old days' files to go", || async {
        (!logs.join(&old[29]).exists()).then_some(())
    })
    .await;
    let mut kept: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !others.contains(&n.as_str()))
        .collect();
    let today = format!("orchestrator.log.{}", chrono::Utc::now().format("%Y-%m-%d"));
    kept.retain(|n| *n != today);
    assert_eq!(kept, Vec::<String>::new(), "only today's file is new");
    for name in others {
        assert!(logs.join(name).exists(), "{name} kept");
    }
    bin.stop().await;
}
