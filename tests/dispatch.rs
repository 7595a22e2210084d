//! Running the queue on simulated ComfyUI backends, over real HTTP and
//! WebSocket on loopback.

mod common;

use common::*;
use orchestrator::simulator::{SimConfig, SimHandle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn blur(extra: Value) -> Value {
    let mut m = json!({"workflow_id": "image_blur", "parameters": {"width": 64, "height": 48, "color": 255}});
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    m
}

async fn submit(app: &TestApp, manifest: Value) -> String {
    let (status, body) = app.post_json("/api/job", &manifest).await;
    assert_eq!(status, 201, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_job_completes_and_its_output_downloads_byte_identical_to_the_backends() {
    let sim = start_sim(30).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 2)]).await;
    let b = app.wait_backend("node1", "online").await;
    assert_eq!(b["comfyui_version"], "0.3.64");
    assert!(b["vram_total"].as_i64().unwrap() > 0);
    assert_eq!(b["accepting_jobs"], true);

    let id = submit(&app, blur(json!({"parameters": {"width": 64, "height": 48, "batch_size": 2, "filename_prefix": "shot/sc01"}}))).await;
    let job = app.wait_status(&id, "completed").await;
    assert_eq!(job["backend_id"], "node1");
    assert_eq!(job["attempts"], 1);
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "{job:#}");
    for o in outputs {
        let name = o["name"].as_str().unwrap();
        let r = app
            .client
            .get(format!("{}/api/job/{id}/outputs/{name}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let ours = r.bytes().await.unwrap();
        let theirs = comfy_view(&app.client, &sim.url, o).await;
        assert_eq!(ours, theirs, "byte-identical");
        assert_eq!(o["size"], ours.len());
        assert_eq!(o["sha256"], format!("{:x}", Sha256::digest(&ours)));
        assert_eq!(o["subfolder"], "shot");
    }
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
    let lease = &job["leases"][0];
    assert_eq!(lease["outcome"], "completed");
    assert_eq!(lease["prompt_id"], job["prompt_id"]);
    // Finished prompts are deleted from the backend's history.
    poll("history cleanup", || async {
        sim.history_ids().is_empty().then_some(())
    })
    .await;
    let (status, _) = app
        .get(&format!("/api/job/{id}/outputs/..%2F..%2Forchestrator.db"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_cached_run_still_reports_its_outputs() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    app.wait_backend("node1", "online").await;
    let a = submit(&app, blur(json!({}))).await;
    app.wait_status(&a, "completed").await;
    let b = submit(&app, blur(json!({}))).await;
    let job = app.wait_status(&b, "completed").await;
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1, "{job:#}");
}

/// One box, `node1`, whose model `checkpoint` is deleted after its
/// inventory was read: the submit check passes, and ComfyUI refuses the
/// graph.
async fn a_box_that_lost_its_model(checkpoint: &str) -> (SimHandle, TestApp) {
    let sim = start_sim_with(orchestrator::simulator::SimConfig {
        job_ms: 0,
        checkpoints: vec![checkpoint.into()],
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 2)]).await;
    app.wait_backend("node1", "online").await;
    app.wait_inventory("node1").await;
    sim.set_checkpoints(&[]);
    (sim, app)
}

#[tokio::test]
async fn a_rejected_workflow_fails_with_comfyuis_node_errors_and_is_not_retried_there() {
    let (sim, app) = a_box_that_lost_its_model("missing.safetensors").await;
    let id = submit(&app, json!({"workflow_id": "txt2img_sdxl", "parameters": {"prompt": "a cat", "checkpoint": "missing.safetensors"}})).await;
    let job = app.wait_status(&id, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("backend node1 rejected the workflow"),
        "{message}"
    );
    assert!(
        message.contains("node 4 (CheckpointLoaderSimple): Value not in list"),
        "{message}"
    );
    assert!(
        message.contains("no enabled backend can run this job"),
        "{message}"
    );
    assert!(job["error"]["node_errors"]["4"].is_object());
    assert_eq!(job["attempts"], 1, "not retried on the same backend");
    assert_eq!(job["leases"][0]["outcome"], "rejected");
    assert_eq!(sim.prompt_posts().len(), 1);
}

#[tokio::test]
async fn a_shot_refused_for_want_of_a_model_runs_when_retried_once_the_model_is_installed() {
    let (sim, app) = a_box_that_lost_its_model("sdxl.safetensors").await;
    let shot = json!({"workflow_id": "txt2img_sdxl", "parameters": {"prompt": "a cat", "checkpoint": "sdxl.safetensors"}});
    let id = submit(&app, shot).await;
    let job = app.wait_status(&id, "failed").await;
    assert_eq!(job["leases"][0]["outcome"], "rejected", "{job:#}");
    // The artist installs the model, has the box read again, and retries.
    sim.set_checkpoints(&["sdxl.safetensors"]);
    let (status, body) = app
        .post_json("/api/backends/node1/refresh", &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let job = app
        .wait_job(&id, "a final state", |j| {
            j["status"] == "completed" || j["status"] == "failed"
        })
        .await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(sim.prompt_posts().len(), 2);
}

#[tokio::test]
async fn a_rejection_moves_the_job_to_a_backend_that_accepts_it() {
    let without = start_sim(0).await;
    let with = start_sim_with(orchestrator::simulator::SimConfig {
        job_ms: 0,
        checkpoints: vec!["flux.safetensors".into()],
        ..Default::default()
    })
    .await;
    let app = spawn_farm_online(vec![
        backend("a", without.port, &[], 1),
        backend("b", with.port, &[], 1),
    ])
    .await;
    let id = submit(&app, json!({"workflow_id": "txt2img_sdxl", "parameters": {"prompt": "x", "checkpoint": "flux.safetensors"}})).await;
    let job = app
        .wait_job(&id, "a final state", |j| {
            j["status"] == "completed" || j["status"] == "failed"
        })
        .await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["backend_id"], "b");
}

#[tokio::test]
async fn a_runtime_error_is_retried_with_backoff_on_another_backend_and_then_fails_readably() {
    let a = start_sim(0).await;
    let b = start_sim(0).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    let id = submit(
        &app,
        json!({"workflow": failing_graph(), "max_attempts": 3}),
    )
    .await;
    let job = app.wait_status(&id, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("node 2 (ImageToMask) raised IndexError: index 3 is out of bounds"),
        "{message}"
    );
    assert!(message.contains("attempt 3 of 3"), "{message}");
    assert_eq!(job["attempts"], 3);
    let leases = job["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 3);
    assert_ne!(
        leases[0]["backend_id"], leases[1]["backend_id"],
        "the retry prefers another backend"
    );
    assert!(leases.iter().all(|l| l["outcome"] == "failed"));
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "retry_scheduled").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(kinds.last().unwrap(), "failed");
    // Back-off: the second lease came at least retry_backoff_ms after the first failure.
    let t = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(
        t(&leases[1]["leased_at"]) - t(&leases[0]["finished_at"])
            >= chrono::Duration::milliseconds(40)
    );
    // Each prompt id was submitted exactly once.
    let posts: usize = a
        .prompt_posts()
        .values()
        .chain(b.prompt_posts().values())
        .sum();
    assert_eq!(posts, 3);
    assert!(a
        .prompt_posts()
        .values()
        .chain(b.prompt_posts().values())
        .all(|n| *n == 1));

    // A user can queue it again.
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let job = app.wait_status(&id, "failed").await;
    assert_eq!(job["attempts"], 4);
    let (status, _) = app
        .post_json(&format!("/api/job/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 409, "only failed or cancelled jobs: {body}");
}

#[tokio::test]
async fn cancel_removes_an_assigned_job_from_the_backend_queue_and_interrupts_a_running_one() {
    let sim = start_sim(3_000).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 2)]).await;
    app.wait_backend("node1", "online").await;
    let first = submit(&app, blur(json!({"parameters": {"width": 64, "color": 1}}))).await;
    let second = submit(&app, blur(json!({"parameters": {"width": 64, "color": 2}}))).await;
    app.wait_status(&first, "running").await;
    let second_job = app
        .wait_job(&second, "submitted", |j| {
            j["leases"][0]["submitted_at"].is_string()
        })
        .await;
    assert_eq!(second_job["status"], "assigned", "waits in ComfyUI's queue");

    let (status, body) = app
        .post_json(&format!("/api/job/{second}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_status(&second, "cancelled").await;
    assert_eq!(sim.queue_len(), 1, "removed from the backend's queue");

    let (status, _) = app
        .post_json(&format!("/api/job/{first}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let job = app.wait_status(&first, "cancelled").await;
    let kinds = app.event_kinds(&first).await;
    assert!(
        kinds.ends_with(&["cancel_requested".into(), "cancelled".into()]),
        "{kinds:?}"
    );
    assert!(
        app.events(&first).await.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{job:#}"
    );
    poll("backend idle", || async {
        (sim.queue_len() == 0).then_some(())
    })
    .await;
    // A cancelled job can be queued again.
    let (status, _) = app
        .post_json(&format!("/api/job/{second}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200);
    app.wait_status(&second, "completed").await;
}

/// An artist's prompt, queued on `sim` from ComfyUI's own page (not by the
/// orchestrator): its prompt id.
async fn artist_prompt(
    app: &TestApp,
    sim: &orchestrator::simulator::SimHandle,
    color: u32,
) -> String {
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "artist"}}
    });
    let r = app
        .client
        .post(format!("{}/prompt", sim.url))
        .json(&json!({"prompt": graph, "client_id": "an-artist"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().await.unwrap();
    r["prompt_id"].as_str().unwrap().to_string()
}

/// Waits until backend `id`'s worker counts `n` prompts not ours there.
async fn heard_not_ours(app: &TestApp, id: &str, n: u64) -> Value {
    poll(
        &format!("{id}'s worker to count {n} prompts not ours"),
        || async {
            let (_, b) = app.get(&format!("/api/backends/{id}")).await;
            (b["prompts_not_ours"] == n).then_some(b)
        },
    )
    .await
}

/// A box shared with an artist: a prompt queued from ComfyUI's own page
/// runs, ours waits behind it and is cancelled. The cancel must not
/// interrupt the artist's prompt (an interrupt without a prompt id stops
/// whatever runs). The same check against a real ComfyUI is in
/// `tests/live.rs`.
#[tokio::test]
async fn a_cancel_spares_a_prompt_that_is_not_ours_on_a_shared_box() {
    let sim = start_sim(5_000).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 2)]).await;
    app.wait_backend("node1", "online").await;
    let theirs = artist_prompt(&app, &sim, 7).await;
    let ours = submit(&app, blur(json!({"parameters": {"width": 64, "color": 5}}))).await;
    app.wait_job(&ours, "submitted", |j| {
        j["leases"][0]["submitted_at"].is_string()
    })
    .await;
    let queue: Value = app
        .client
        .get(format!("{}/queue", sim.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        queue["queue_running"][0][1], theirs,
        "the artist's prompt runs while ours waits: {queue}"
    );
    let (status, body) = app
        .post_json(&format!("/api/job/{ours}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_status(&ours, "cancelled").await;
    let entry = poll("the artist's prompt to end", || {
        let url = format!("{}/history/{theirs}", sim.url);
        let (client, theirs) = (&app.client, &theirs);
        async move {
            let h: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            h.get(theirs).cloned()
        }
    })
    .await;
    assert_ran_untouched(&entry);
}

/// A box an artist is using: the prompts queued from ComfyUI's own page
/// take its slots as ours do, so the farm's jobs go to a free box instead
/// of waiting behind them; once the artist's queue drains, it takes work
/// again.
#[tokio::test]
async fn a_box_busy_with_prompts_not_ours_leaves_the_work_to_a_free_one() {
    let a = start_sim(4_000).await;
    let b = start_sim(300).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    artist_prompt(&app, &a, 1).await;
    let shown = heard_not_ours(&app, "a", 1).await;
    assert_eq!(shown["active_jobs"], 0);
    let jobs: Vec<String> = futures::future::join_all(
        (0..3).map(|i| submit(&app, blur(json!({"parameters": {"width": 64 + i}})))),
    )
    .await;
    // While the artist's prompt runs (4 s), a takes none: b runs the three
    // one after the other.
    for id in &jobs {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "b", "{job:#}");
    }
    // Its queue drained: a takes work again.
    heard_not_ours(&app, "a", 0).await;
    app.post_json("/api/backends/b/disable", &json!({})).await;
    let later = submit(&app, blur(json!({"parameters": {"width": 99}}))).await;
    let job = app.wait_status(&later, "completed").await;
    assert_eq!(job["backend_id"], "a");
}

/// Work queued while the only box is busy with an artist's prompt starts
/// when that prompt ends: the freed slot looks at once, not at the
/// worker's safety net (set past the deadline here).
#[tokio::test]
async fn work_queued_behind_prompts_not_ours_starts_when_they_end() {
    let a = start_sim(1_500).await;
    let app = spawn_farm_with(vec![backend("a", a.port, &[], 1)], |c| {
        c.dispatch.poll_interval_ms = 60_000;
    })
    .await;
    app.wait_backend("a", "online").await;
    artist_prompt(&app, &a, 3).await;
    heard_not_ours(&app, "a", 1).await;
    let id = submit(&app, blur(json!({}))).await;
    // Its page says why it waits.
    let job = app.job(&id).await;
    assert_eq!(job["status"], "queued", "{job:#}");
    assert_eq!(
        job["waiting_for"],
        "no backend can take it now: a is busy (0 of 1 slots ours, and 1 prompt in its queue not from the orchestrator)"
    );
    let job = app.wait_status(&id, "completed").await;
    assert_eq!(job["backend_id"], "a");
    assert_eq!(
        app.event_kinds(&id).await[..2],
        ["submitted", "assigned"],
        "{job:#}"
    );
}

#[tokio::test]
async fn jobs_run_by_priority_then_age() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    app.wait_backend("node1", "online").await;
    app.post_json("/api/backends/node1/disable", &json!({}))
        .await;
    let low = submit(
        &app,
        blur(json!({"priority": -5, "parameters": {"color": 1}})),
    )
    .await;
    let mid1 = submit(&app, blur(json!({"parameters": {"color": 2}}))).await;
    let high = submit(
        &app,
        blur(json!({"priority": 10, "parameters": {"color": 3}})),
    )
    .await;
    let mid2 = submit(&app, blur(json!({"parameters": {"color": 4}}))).await;
    let (status, b) = app
        .post_json("/api/backends/node1/enable", &json!({}))
        .await;
    assert_eq!(status, 200, "{b}");
    let ids = run_order(&app, &[&low, &mid1, &high, &mid2]).await;
    assert_eq!(ids, [high, mid1, mid2, low]);
}

/// The order in which the jobs were leased, once all have completed.
async fn run_order(app: &TestApp, jobs: &[&String]) -> Vec<String> {
    let mut order = Vec::new();
    for id in jobs {
        let job = app.wait_status(id, "completed").await;
        order.push((
            job["leases"][0]["leased_at"].as_str().unwrap().to_string(),
            id.to_string(),
        ));
    }
    order.sort();
    order.into_iter().map(|(_, id)| id).collect()
}

/// Two artists' batches on one box, the farm shared by `batch`: the box
/// alternates between them, where it would run the whole of the first
/// batch before the second.
#[tokio::test]
async fn a_farm_shared_by_batch_alternates_between_two_artists_batches() {
    let (_sim, app) = one_box_shared_by_batch("node1", 0).await;
    app.post_json("/api/backends/node1/disable", &json!({}))
        .await;
    let mut a = Vec::new();
    for color in 0..4 {
        let m = json!({"metadata": {"batch": "anna"}, "parameters": {"color": color}});
        a.push(submit(&app, blur(m)).await);
    }
    let mut b = Vec::new();
    for color in 0..2 {
        let m = json!({"metadata": {"batch": "ben"}, "parameters": {"color": color}});
        b.push(submit(&app, blur(m)).await);
    }
    let why = app.job(&b[1]).await["waiting_for"].clone();
    assert!(
        why.as_str().unwrap().ends_with(
            "; the farm is shared by `batch`: its group `ben` has 0 jobs on the farm, beside 1 other group"
        ),
        "{why}"
    );
    let (status, body) = app
        .post_json("/api/backends/node1/enable", &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let all: Vec<&String> = a.iter().chain(&b).collect();
    assert_eq!(
        run_order(&app, &all).await,
        [&a[0], &b[0], &a[1], &b[1], &a[2], &a[3]].map(String::as_str)
    );
}

#[tokio::test]
async fn a_shot_moved_up_an_overnight_queue_runs_next() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    app.wait_backend("node1", "online").await;
    app.post_json("/api/backends/node1/disable", &json!({}))
        .await;
    let mut batch = Vec::new();
    for color in 1..=4 {
        batch.push(submit(&app, blur(json!({"parameters": {"color": color}}))).await);
    }
    let (first, second, urgent, last) = (&batch[0], &batch[1], &batch[2], &batch[3]);
    let (status, job) = app
        .post_json(
            &format!("/api/job/{urgent}/priority"),
            &json!({"priority": 10}),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["priority"], 10);
    let (status, job) = app
        .post_json(
            &format!("/api/job/{first}/priority"),
            &json!({"priority": -1}),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    app.post_json("/api/backends/node1/enable", &json!({}))
        .await;
    for id in &batch {
        app.wait_status(id, "completed").await;
    }
    let mut order = Vec::new();
    for id in &batch {
        let job = app.job(id).await;
        let leased = job["leases"][0]["leased_at"].as_str().unwrap().to_string();
        order.push((leased, id.clone()));
    }
    order.sort();
    let ran: Vec<_> = order.into_iter().map(|(_, id)| id).collect();
    assert_eq!(ran, [urgent, second, last, first].map(String::clone));
    let events = app.events(urgent).await;
    let moved = events
        .iter()
        .find(|e| e["kind"] == "priority_changed")
        .expect("the change is in the job's history");
    assert_eq!(moved["message"], "priority changed from 0 to 10 by a user");
}

async fn metrics_text(app: &TestApp) -> String {
    let url = format!("{}/metrics", app.url);
    app.client
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The backend events (`job_id` null) of kind `kind`, oldest first.
async fn backend_events(app: &TestApp, kind: &str) -> Vec<orchestrator::store::JobEvent> {
    let all = app
        .store
        .events_after(0, &Default::default(), 100_000)
        .await
        .unwrap();
    all.into_iter()
        .filter(|e| e.job_id.is_none() && e.kind == kind)
        .collect()
}

/// A box that fails every prompt beside a good one, quarantined for
/// `quarantine_s` once it is found out, after a night of 12 jobs that all
/// completed (on the good box). The simulators, the service, the night.
async fn sick_beside_good(quarantine_s: u64) -> (SimHandle, SimHandle, TestApp, Vec<String>) {
    let sick = start_sim_with(SimConfig {
        job_ms: 20,
        fail_rate: 1.0,
        ..Default::default()
    })
    .await;
    let good = start_sim(20).await;
    let app = spawn_farm_with(
        vec![
            backend("sick", sick.port, &[], 1),
            backend("good", good.port, &[], 1),
        ],
        |c| {
            c.dispatch.retry_backoff_ms = 50;
            c.dispatch.retry_backoff_max_ms = 50;
            c.dispatch.quarantine_s = quarantine_s;
            // No safety net rings a worker in these tests' time.
            c.dispatch.poll_interval_ms = 60_000;
        },
    )
    .await;
    app.wait_backend("sick", "online").await;
    app.wait_backend("good", "online").await;
    let mut night = Vec::new();
    for color in 0..12 {
        night.push(submit(&app, blur(json!({"parameters": {"color": color}}))).await);
    }
    for id in &night {
        app.wait_status(id, "completed").await;
    }
    (sick, good, app, night)
}

#[tokio::test]
async fn a_box_that_fails_what_others_complete_is_quarantined_until_an_operator_vouches() {
    let (_sick, _good, app, night) = sick_beside_good(900).await;

    let (_, b) = app.get("/api/backends/sick").await;
    let until = b["quarantined_until"].as_str().expect("in quarantine");
    let until = chrono::DateTime::parse_from_rfc3339(until).unwrap();
    let reason = b["quarantine_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("3 jobs in a row failed there that other backends then completed")
            && reason.contains("simulated failure"),
        "{b}"
    );
    assert_eq!(b["accepting_jobs"], false, "{b}");
    let (_, g) = app.get("/api/backends/good").await;
    assert!(g["quarantined_until"].is_null(), "{g}");
    let events = backend_events(&app, "backend_quarantined").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].backend_id.as_deref(), Some("sick"));
    // From then on it took nothing (but for one lease that may have passed
    // the check as the quarantine began: its one slot).
    let began = until - chrono::Duration::seconds(app.config.dispatch.quarantine_s as i64);
    let (mut on_sick, mut after) = (0, Vec::new());
    for id in &night {
        for l in app.job(id).await["leases"].as_array().unwrap() {
            if l["backend_id"] == "sick" {
                on_sick += 1;
                let at = l["leased_at"].as_str().unwrap();
                if chrono::DateTime::parse_from_rfc3339(at).unwrap() > began {
                    after.push(at.to_string());
                }
            }
        }
    }
    assert!(on_sick >= 3, "{on_sick} attempts on the sick box");
    assert!(
        after.len() <= 1,
        "leased to the sick box after its quarantine began at {began}: {after:?}"
    );

    let text = metrics_text(&app).await;
    assert!(
        text.contains("orchestrator_backend_quarantined{backend=\"sick\"} 1")
            && text.contains("orchestrator_backend_quarantined{backend=\"good\"} 0"),
        "{text}"
    );

    // A job queued now says why the sick box does not take it.
    app.post_json("/api/backends/good/disable", &json!({}))
        .await;
    let waiting = submit(&app, blur(json!({}))).await;
    let why = app.job(&waiting).await["waiting_for"].clone();
    assert!(
        why.as_str()
            .unwrap()
            .contains("sick is in quarantine until"),
        "{why}"
    );

    // The operator vouches for it: it takes jobs again at once.
    let (status, b) = app.post_json("/api/backends/sick/enable", &json!({})).await;
    assert_eq!(status, 200, "{b}");
    assert!(b["quarantined_until"].is_null(), "{b}");
    app.wait_job(&waiting, "leased to the sick box", |j| {
        j["leases"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["backend_id"] == "sick"))
    })
    .await;
    assert_eq!(
        backend_events(&app, "backend_quarantine_lifted")
            .await
            .len(),
        1
    );
    let text = metrics_text(&app).await;
    assert!(
        text.contains("orchestrator_backend_quarantined{backend=\"sick\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_box_whose_disk_is_full_is_left_out_at_its_first_failure_and_its_batch_is_not_held() {
    let full = start_sim(20).await;
    full.disk_full(true);
    let good = start_sim(20).await;
    let app = spawn_farm_with(
        vec![
            backend("full", full.port, &[], 1),
            backend("good", good.port, &[], 1),
        ],
        |c| {
            c.dispatch.retry_backoff_ms = 50;
            c.dispatch.retry_backoff_max_ms = 50;
            // Two failures alike would hold a batch.
            c.dispatch.pause_batch_after = 2;
            c.dispatch.poll_interval_ms = 60_000;
        },
    )
    .await;
    app.wait_backend("full", "online").await;
    app.wait_backend("good", "online").await;
    // The night's first shot meets the full box alone.
    app.post_json("/api/backends/good/disable", &json!({}))
        .await;
    let night = json!({"metadata": {"batch": "night1"}});
    let first = submit(&app, blur(night.clone())).await;
    let b = poll("the full box left out", || async {
        let (_, b) = app.get("/api/backends/full").await;
        b["quarantined_until"].is_string().then_some(b)
    })
    .await;
    let reason = b["quarantine_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("its disk is full: SaveImage (node 4) raised OSError: [Errno 28] No space left on device; free space on it"),
        "{b}"
    );
    // At its first failure: the shot waits for another box, or the space,
    // rather than spend its attempts there, and says why.
    let job = app
        .wait_job(&first, "its back-off over, waiting for a box", |j| {
            j["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("full is in quarantine until"))
        })
        .await;
    assert_eq!(job["attempts"], 1, "{job}");
    let quarantined = backend_events(&app, "backend_quarantined").await;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0]
        .message
        .as_deref()
        .is_some_and(|m| m.contains("its disk is full")));

    // The good box back: the night completes there, the batch not held
    // (a full disk says nothing against the shots).
    app.post_json("/api/backends/good/enable", &json!({})).await;
    let mut shots = vec![first];
    for _ in 0..3 {
        shots.push(submit(&app, blur(night.clone())).await);
    }
    for id in &shots {
        assert_eq!(app.wait_status(id, "completed").await["backend_id"], "good");
    }
    assert_eq!(full.prompt_posts().len(), 1, "the full box took one shot");
    assert!(backend_events(&app, "batch_broken").await.is_empty());
    assert!(app.health_warnings().await.is_empty());

    // Space freed on it, the operator vouches for it: it takes jobs again.
    full.disk_full(false);
    app.post_json("/api/backends/good/disable", &json!({}))
        .await;
    let (status, b) = app.post_json("/api/backends/full/enable", &json!({})).await;
    assert_eq!(status, 200, "{b}");
    let after = submit(&app, blur(night)).await;
    assert_eq!(
        app.wait_status(&after, "completed").await["backend_id"],
        "full"
    );
}

#[tokio::test]
async fn a_box_whose_comfyui_dies_under_every_job_is_quarantined_and_the_night_completes() {
    // A GPU that faults: its ComfyUI dies mid-run, and its service brings
    // it back empty. Each job it loses completes on the good box.
    let crashy = start_sim_with(SimConfig {
        job_ms: 400,
        crash_rate: 1.0,
        crash_down_ms: 200,
        ..Default::default()
    })
    .await;
    let good = start_sim(300).await;
    let app = spawn_farm_with(
        vec![
            backend("crashy", crashy.port, &[], 1),
            backend("good", good.port, &[], 1),
        ],
        |c| {
            // A job lost mid-run keeps off the box that lost it for 10 s
            // (twice the back-off) while the good box is online (and for
            // good once that box has lost it twice).
            c.dispatch.retry_backoff_ms = 5_000;
            c.dispatch.retry_backoff_max_ms = 5_000;
            c.dispatch.quarantine_s = 900;
        },
    )
    .await;
    app.wait_backend("crashy", "online").await;
    app.wait_backend("good", "online").await;
    let mut night = Vec::new();
    for color in 0..16 {
        night.push(submit(&app, blur(json!({"parameters": {"color": color}}))).await);
    }
    // Every job completes: none is lost twice, on the box that dies under
    // everything, and taken for a job that crashes its boxes.
    for id in &night {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "good", "{job}");
    }
    let b = poll("the box in quarantine", || async {
        let (_, b) = app.get("/api/backends/crashy").await;
        b["quarantined_until"].is_string().then_some(b)
    })
    .await;
    let reason = b["quarantine_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("3 jobs in a row failed there that other backends then completed")
            && reason.contains("no longer has prompt"),
        "{b}"
    );
    // The night's jobs that ran there first were lost mid-run; the box was
    // found out at the third completed elsewhere (others may have started
    // there before that completion: how many depends on the two boxes'
    // pace), and ran none after (one leased there while the proof came is
    // given back unsent).
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let since = time(&b["quarantined_until"]) - chrono::Duration::seconds(900);
    let mut lost_there = 0;
    for id in &night {
        let job = app.job(id).await;
        for l in job["leases"].as_array().unwrap() {
            if l["backend_id"] == "crashy" {
                assert_eq!(l["outcome"], "lost", "{job}");
                if l["started_at"].is_null() {
                    let why = l["error"]["message"].as_str().unwrap_or("");
                    assert!(
                        why.contains("put in quarantine before the job was sent"),
                        "{job}"
                    );
                    continue;
                }
                assert!(
                    time(&l["leased_at"]) < since,
                    "leased there in quarantine: {job}"
                );
                lost_there += 1;
            }
        }
    }
    assert!(lost_there >= 3, "{lost_there} lost there");
}

/// A farm whose boxes differ: an 8 GB box that runs out of GPU memory on
/// a picture over a megapixel, and a bigger one whose jobs take 1.5 s.
async fn small_and_big_boxes() -> (SimHandle, SimHandle) {
    let small = start_sim_with(SimConfig {
        job_ms: 100,
        vram_bytes: 8 << 30,
        oom_above_pixels: 1_000_000,
        ..Default::default()
    })
    .await;
    (small, start_sim(1_500).await)
}

#[tokio::test]
async fn a_job_that_ran_out_of_gpu_memory_waits_for_a_bigger_box_rather_than_fail_again() {
    // A farm whose boxes differ: an 8 GB box that cannot hold a large
    // picture, and a 24 GB one, busy when the large shot comes in.
    let (small, big) = small_and_big_boxes().await;
    let app = spawn_farm_with(
        vec![
            backend("small", small.port, &[], 1),
            backend("big", big.port, &["big"], 1),
        ],
        |c| {
            // The retry keeps off the box that failed it for 100 ms only.
            c.dispatch.retry_backoff_ms = 50;
            c.dispatch.retry_backoff_max_ms = 50;
        },
    )
    .await;
    app.wait_backend("small", "online").await;
    app.wait_backend("big", "online").await;
    let busy = submit(&app, blur(json!({"requires": ["big"]}))).await;
    app.wait_status(&busy, "running").await;
    let large = submit(
        &app,
        blur(json!({"parameters": {"width": 2048, "height": 1024}})),
    )
    .await;
    // It ran out of memory on the small box, and waits for the big one.
    let queued = app
        .wait_job(&large, "queued again after its first attempt", |j| {
            j["status"] == "queued" && j["attempts"] == 1
        })
        .await;
    assert_eq!(queued["leases"][0]["backend_id"], "small", "{queued}");
    assert!(
        queued["error"]["exception_type"]
            .as_str()
            .is_some_and(|t| t.contains("OutOfMemory")),
        "{queued}"
    );
    // Its page says why, while the big box is busy.
    let why = app
        .wait_job(&large, "the reason it waits", |j| {
            j["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("GPU memory"))
        })
        .await;
    let why = why["waiting_for"].as_str().unwrap();
    assert!(
        why.contains(
            "small has no more GPU memory than a backend where it ran out of it (8.0 GiB)"
        ),
        "{why}"
    );
    let done = app.wait_status(&large, "completed").await;
    assert_eq!(
        leased_on(&done),
        ["small", "big"],
        "not tried on the small box again: {done}"
    );
    assert_eq!(done["attempts"], 2);
}

#[tokio::test]
async fn a_shot_too_big_for_the_small_box_retried_by_hand_still_waits_for_the_big_one() {
    // The big box was off when the shot ran out of memory on the small one,
    // so it failed; retried in the morning, it must not spend its one
    // attempt on the small box again (a retry forgets other bars, not
    // this one: a box's memory is not mended).
    let (small, big) = small_and_big_boxes().await;
    let app = spawn_farm_online(vec![
        backend("small", small.port, &[], 1),
        backend("big", big.port, &["big"], 1),
    ])
    .await;
    app.post_json("/api/backends/big/disable", &json!({})).await;
    let large = submit(
        &app,
        blur(json!({"parameters": {"width": 2048, "height": 1024}, "max_attempts": 1})),
    )
    .await;
    let failed = app.wait_status(&large, "failed").await;
    assert_eq!(leased_on(&failed), ["small"], "{failed}");
    app.post_json("/api/backends/big/enable", &json!({})).await;
    let busy = submit(&app, blur(json!({"requires": ["big"]}))).await;
    app.wait_status(&busy, "running").await;
    let (status, body) = app
        .post_json(&format!("/api/job/{large}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let done = app
        .wait_job(&large, "a final state", |j| {
            j["status"] == "completed" || j["status"] == "failed"
        })
        .await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(leased_on(&done), ["small", "big"], "{done}");
}

#[tokio::test]
async fn a_quarantine_outlives_a_restart_of_the_orchestrator() {
    let (_sick, _good, app, _) = sick_beside_good(900).await;
    let (_, before) = app.get("/api/backends/sick").await;
    let until = before["quarantined_until"].clone();
    assert!(until.is_string(), "in quarantine: {before}");
    let app = app.restart().await;
    app.wait_backend("good", "online").await;
    let (_, after) = app.get("/api/backends/sick").await;
    assert_eq!(after["quarantined_until"], until, "{after}");
    assert_eq!(after["quarantine_reason"], before["quarantine_reason"]);
    // The next jobs all go to the good box: the sick one takes none.
    let mut jobs = Vec::new();
    for color in 0..4 {
        jobs.push(submit(&app, blur(json!({"parameters": {"color": color}}))).await);
    }
    for id in &jobs {
        let job = app.wait_status(id, "completed").await;
        let leased: Vec<&Value> = job["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["backend_id"])
            .collect();
        assert_eq!(leased, [&json!("good")], "{job}");
    }
    // An operator still ends it by enabling the box.
    app.post_json("/api/backends/sick/enable", &json!({})).await;
    let (_, b) = app.get("/api/backends/sick").await;
    assert!(b["quarantined_until"].is_null(), "{b}");
}

#[tokio::test]
async fn a_quarantine_ends_by_itself_and_the_box_takes_work_again() {
    let (_sick, _good, app, _) = sick_beside_good(4).await;
    app.post_json("/api/backends/good/disable", &json!({}))
        .await;
    let (_, b) = app.get("/api/backends/sick").await;
    let until = b["quarantined_until"].as_str().expect("in quarantine");
    let until = chrono::DateTime::parse_from_rfc3339(until).unwrap();
    // Queued while the only box left is in quarantine (or just after it
    // ended, on a slow run): nobody rings its worker but the quarantine's end.
    let id = submit(&app, blur(json!({}))).await;
    let job = app
        .wait_job(&id, "leased to the sick box again", |j| {
            j["leases"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["backend_id"] == "sick"))
        })
        .await;
    let leased = job["leases"][0]["leased_at"].as_str().unwrap();
    let leased = chrono::DateTime::parse_from_rfc3339(leased).unwrap();
    assert!(
        leased >= until,
        "leased {leased}, quarantined until {until}"
    );
    let over = backend_events(&app, "backend_quarantine_over").await;
    assert_eq!(over.len(), 1, "its end is said once: {over:?}");
    assert!(
        over[0]
            .message
            .as_deref()
            .unwrap()
            .starts_with("backend sick takes jobs again: its quarantine ended"),
        "{over:?}"
    );
}

/// A farm of two boxes, `a` and `b` (one slot each, prompts of `job_ms`),
/// its config changed by `tune`, once both are online.
async fn two_boxes(
    job_ms: u64,
    tune: impl FnOnce(&mut orchestrator::config::Config),
) -> (SimHandle, SimHandle, TestApp) {
    let (a, b) = (start_sim(job_ms).await, start_sim(job_ms).await);
    let app = spawn_farm_with(
        vec![backend("a", a.port, &[], 1), backend("b", b.port, &[], 1)],
        tune,
    )
    .await;
    app.wait_backend("a", "online").await;
    app.wait_backend("b", "online").await;
    (a, b, app)
}

#[tokio::test]
async fn jobs_that_fail_everywhere_put_no_box_in_quarantine() {
    let (_a, _b, app) = two_boxes(10, |c| {
        c.dispatch.retry_backoff_ms = 20;
        c.dispatch.retry_backoff_max_ms = 20;
        c.dispatch.quarantine_after = 1;
    })
    .await;
    // A bad batch (asks for a channel the picture lacks: an IndexError on
    // any box) among good jobs.
    let bad_graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}
    });
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for color in 0..4 {
        bad.push(submit(&app, json!({"workflow": bad_graph, "max_attempts": 2})).await);
        good.push(submit(&app, blur(json!({"parameters": {"color": color}}))).await);
    }
    for id in &bad {
        app.wait_status(id, "failed").await;
    }
    for id in &good {
        app.wait_status(id, "completed").await;
    }
    for id in ["a", "b"] {
        let (_, b) = app.get(&format!("/api/backends/{id}")).await;
        assert!(b["quarantined_until"].is_null(), "{b}");
    }
    assert!(backend_events(&app, "backend_quarantined").await.is_empty());
}

#[tokio::test]
async fn requires_tags_pick_the_backend_and_impossible_tags_are_refused() {
    let plain = start_sim(0).await;
    let gpu = start_sim(0).await;
    let app = spawn_farm(vec![
        backend("plain", plain.port, &[], 2),
        backend("big", gpu.port, &["sdxl", "48gb"], 2),
    ])
    .await;
    app.wait_backend("plain", "online").await;
    app.wait_backend("big", "online").await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(&app, blur(json!({"requires": ["sdxl"]}))).await);
    }
    for id in &ids {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "big");
    }
    let (status, body) = app
        .post_json("/api/job", &blur(json!({"requires": ["flux"]})))
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "requires");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("big [\"sdxl\", \"48gb\"]"));
}

#[tokio::test]
async fn two_backends_share_the_work() {
    let a = start_sim(150).await;
    let b = start_sim(150).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 2),
        backend("b", b.port, &[], 2),
    ])
    .await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(submit(&app, blur(json!({"parameters": {"color": i}}))).await);
    }
    let mut on = std::collections::HashMap::new();
    for id in &ids {
        let job = app.wait_status(id, "completed").await;
        *on.entry(job["backend_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(
        on.get("a").copied().unwrap_or(0) >= 2 && on.get("b").copied().unwrap_or(0) >= 2,
        "{on:?}"
    );
    let (_, list) = app.get("/api/jobs?backend=a&status=completed").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), on["a"]);
}

#[tokio::test]
async fn drain_finishes_what_a_backend_has_and_disable_keeps_new_jobs_away_across_restarts() {
    let a = start_sim(400).await;
    let b = start_sim(0).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.post_json("/api/backends/b/disable", &json!({})).await;
    let first = submit(&app, blur(json!({"parameters": {"color": 7}}))).await;
    app.wait_status(&first, "running").await;
    let (status, body) = app.post_json("/api/backends/a/drain", &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["admin_state"], "draining");
    assert_eq!(body["accepting_jobs"], false);
    let second = submit(&app, blur(json!({"parameters": {"color": 8}}))).await;
    let job = app.wait_status(&first, "completed").await;
    assert_eq!(job["backend_id"], "a", "drain lets the running job finish");
    // Nobody takes the second job, and it says why.
    let waiting = |j: &Value| {
        j["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("a is draining") && w.contains("b is disabled"))
    };
    let job = app.wait_job(&second, "waiting on a drain", waiting).await;
    assert_eq!(job["status"], "queued");
    let app = app.restart().await;
    let (_, b) = app.get("/api/backends/b").await;
    assert_eq!(b["admin_state"], "disabled", "kept across restarts");
    app.wait_backend("a", "online").await;
    let job = app
        .wait_job(&second, "waiting after the restart", waiting)
        .await;
    assert_eq!(job["status"], "queued");
    app.post_json("/api/backends/b/enable", &json!({})).await;
    let job = app.wait_status(&second, "completed").await;
    assert_eq!(job["backend_id"], "b");
    let (status, _) = app.post_json("/api/backends/nope/drain", &json!({})).await;
    assert_eq!(status, 404);
}

/// A "backend" that accepts connections and never answers.
async fn hanging_backend() -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

/// A "backend" that answers every request with garbage.
async fn garbage_backend() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{\"oops\":[")
                    .await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_backend_that_hangs_or_answers_garbage_does_not_stop_the_others() {
    let (hang, _h) = hanging_backend().await;
    let (garbage, _g) = garbage_backend().await;
    let good = start_sim(0).await;
    // A port nothing listens on: a ComfyUI not running, or listening on
    // its own machine only.
    let nothing = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut config, dir) = farm_config(vec![
        backend("hang", hang, &[], 2),
        backend("garbage", garbage, &[], 2),
        backend("good", good.port, &[], 2),
        backend("nothing", nothing, &[], 2),
    ]);
    config.dispatch.request_timeout_ms = 300;
    let app = spawn_with(config).await;
    app.wait_backend("good", "online").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(submit(&app, blur(json!({"parameters": {"color": i}}))).await);
    }
    for id in &ids {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "good");
    }
    let hang = app.wait_backend("hang", "offline").await;
    assert!(
        hang["last_error"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{hang}"
    );
    let garbage = app.wait_backend("garbage", "offline").await;
    assert!(
        garbage["last_error"].as_str().unwrap().contains("unusable"),
        "{garbage}"
    );
    let nothing = app.wait_backend("nothing", "offline").await;
    assert!(
        nothing["last_error"]
            .as_str()
            .unwrap()
            .contains("nothing listens there: is ComfyUI running, and, on another machine, started with `--listen`"),
        "{nothing}"
    );
    drop(dir);
}

#[tokio::test]
async fn progress_is_visible_while_a_job_runs() {
    let sim = start_sim(2_000).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    app.wait_backend("node1", "online").await;
    let id = submit(&app, blur(json!({}))).await;
    let job = app
        .wait_job(&id, "progress", |j| j["progress"]["max"].as_f64().is_some())
        .await;
    assert_eq!(job["status"], "running");
    assert_eq!(job["progress"]["node"], "2");
    assert_eq!(
        job["progress"]["node_type"], "ImageBlur",
        "named by its type"
    );
    assert!(job["progress"]["value"].as_f64().unwrap() >= 1.0);
    let (_, list) = app.get("/api/jobs?status=running").await;
    assert_eq!(list["jobs"][0]["progress"]["node"], "2");
    assert_eq!(list["jobs"][0]["progress"]["node_type"], "ImageBlur");
}

/// The value of one Prometheus sample (`name{labels} value`), 0 when absent.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_when_jobs_run() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("metrics1", sim.port, &[], 2)]).await;
    app.wait_backend("metrics1", "online").await;
    let scrape = || async {
        let r = app
            .client
            .get(format!("{}/metrics", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        r.text().await.unwrap()
    };
    let before = scrape().await;
    // Every sample line is `name{labels} value` with a number: the text format parses.
    for line in before
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        // Ours, and the process's under Prometheus's own names.
        assert!(
            line.starts_with("orchestrator_") || line.starts_with("process_"),
            "{line}"
        );
    }
    // A workflow only this test uses: its counters move only with this test.
    let dir = &app.config.workflows_dir;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("metrics_blur.json"),
        include_str!("../src/workflows/builtin/image_blur.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("metrics_blur.yaml"),
        include_str!("../src/workflows/builtin/image_blur.yaml"),
    )
    .unwrap();
    let (status, _) = app.post_json("/api/workflows/reload", &json!({})).await;
    assert_eq!(status, 200);
    let done = |t: &str| {
        sample(
            t,
            "orchestrator_completions_total",
            &[("backend", "metrics1"), ("workflow", "metrics_blur")],
        )
    };
    let count = |t: &str, name: &str, labels: &[(&str, &str)]| sample(t, name, labels);
    let b0 = done(&before);
    let submitted0 = count(
        &before,
        "orchestrator_submissions_total",
        &[("workflow", "metrics_blur")],
    );
    let http0 = count(
        &before,
        "orchestrator_http_requests_total",
        &[("route", "/api/job"), ("method", "POST"), ("status", "201")],
    );
    let ok = submit(
        &app,
        json!({"workflow_id": "metrics_blur", "parameters": {"width": 64, "height": 64}}),
    )
    .await;
    let bad = submit(
        &app,
        json!({"workflow": failing_graph(), "max_attempts": 1}),
    )
    .await;
    app.wait_status(&ok, "completed").await;
    app.wait_status(&bad, "failed").await;
    let after = scrape().await;
    assert_eq!(done(&after), b0 + 1.0, "{after}");
    // The backend's label is this test's own: every change is this test's.
    let moved = |name: &str, labels: &[(&str, &str)]| {
        count(&after, name, labels) - count(&before, name, labels)
    };
    assert_eq!(
        moved(
            "orchestrator_failures_total",
            &[
                ("backend", "metrics1"),
                ("workflow", "inline"),
                ("final", "true")
            ]
        ),
        1.0
    );
    assert_eq!(
        count(
            &after,
            "orchestrator_submissions_total",
            &[("workflow", "metrics_blur")]
        ),
        submitted0 + 1.0
    );
    assert_eq!(
        moved("orchestrator_run_seconds_count", &[("backend", "metrics1")]),
        1.0
    );
    assert_eq!(
        moved(
            "orchestrator_queue_wait_seconds_bucket",
            &[("backend", "metrics1"), ("le", "+Inf")]
        ),
        2.0,
        "both jobs started"
    );
    assert_eq!(
        sample(
            &after,
            "orchestrator_backend_up",
            &[("backend", "metrics1")]
        ),
        1.0
    );
    assert!(
        sample(
            &after,
            "orchestrator_backend_vram_total_bytes",
            &[("backend", "metrics1")]
        ) > 0.0
    );
    assert!(sample(&after, "orchestrator_jobs", &[("status", "completed")]) >= 1.0);
    assert!(
        count(
            &after,
            "orchestrator_http_requests_total",
            &[("route", "/api/job"), ("method", "POST"), ("status", "201")]
        ) >= http0 + 2.0,
        "this test's two submissions at least (other tests run in the same process)"
    );
    assert!(after.contains("orchestrator_http_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn outputs_that_cannot_be_collected_end_the_attempt_after_a_few_tries() {
    let broken = start_sim_with(orchestrator::simulator::SimConfig {
        job_ms: 0,
        view_fails: true,
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![backend("broken", broken.port, &[], 1)]).await;
    app.wait_backend("broken", "online").await;
    let id = submit(&app, blur(json!({"max_attempts": 1}))).await;
    let job = app.wait_status(&id, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("outputs could not be collected after 5 tries"),
        "{message}"
    );
    assert!(message.contains("HTTP 500"), "{message}");
    assert_eq!(job["outputs"], json!([]));
}

#[tokio::test]
async fn a_queued_job_runs_the_template_it_was_checked_against_after_the_template_changes() {
    // Templates change while jobs wait (an artist fixes a default in the
    // night's template): a job keeps the graph it was validated and bound
    // with, and the backend runs exactly that one.
    let sim = start_sim(0).await;
    let app = spawn_farm_online(vec![backend("node1", sim.port, &[], 1)]).await;
    let dir = app.config.workflows_dir.clone();
    std::fs::create_dir_all(&dir).unwrap();
    // The template as it is now (its SaveImage prefix), then a job of it.
    let submit_with = |prefix: &'static str| {
        let (app, dir) = (&app, &dir);
        async move {
            let graph = include_str!("../src/workflows/builtin/image_blur.json").replace(
                "\"filename_prefix\": \"orchestrator\"",
                &format!("\"filename_prefix\": \"{prefix}\""),
            );
            assert!(graph.contains(prefix));
            std::fs::write(dir.join("night.json"), graph).unwrap();
            std::fs::write(
                dir.join("night.yaml"),
                "parameters:\n  width: {type: int, default: 16, target: 1.inputs.width}\n",
            )
            .unwrap();
            let (status, body) = app.post_json("/api/workflows/reload", &json!({})).await;
            assert_eq!(status, 200, "{body}");
            submit(
                app,
                json!({"workflow_id": "night", "parameters": {"width": 16}}),
            )
            .await
        }
    };
    let (status, b) = app
        .post_json("/api/backends/node1/disable", &json!({}))
        .await;
    assert_eq!(status, 200, "{b}");
    let queued = submit_with("before").await;
    let later = submit_with("after").await;
    assert_eq!(app.job(&queued).await["status"], "queued");
    let (status, b) = app
        .post_json("/api/backends/node1/enable", &json!({}))
        .await;
    assert_eq!(status, 200, "{b}");
    for (id, prefix) in [(&queued, "before_"), (&later, "after_")] {
        let job = app.wait_status(id, "completed").await;
        let outputs = job["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 1, "{job:#}");
        let name = outputs[0]["filename"].as_str().unwrap();
        assert!(name.starts_with(prefix), "{id}: {name}");
    }
}

/// A freed slot looks for work only when a queued job may have nobody on its
/// way to it (one seeker a job, `src/dispatch/idle.rs`): that must never
/// leave work waiting. Here the workers' safety net is an hour away, so
/// only the rings, the freed slots and the broadcasts can start these jobs.
#[tokio::test]
async fn work_queued_while_every_slot_is_busy_starts_as_slots_free_without_the_safety_net() {
    let sim = start_sim(300).await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.dispatch.poll_interval_ms = 3_600_000;
    })
    .await;
    app.wait_backend("a", "online").await;
    // Fails for good at its one attempt: to be queued again below.
    let again = submit(
        &app,
        json!({"workflow": failing_graph(), "max_attempts": 1}),
    )
    .await;
    app.wait_status(&again, "failed").await;
    // The only slot busy: two jobs queued behind it (no waiting worker to
    // ring), and the failed one queued again by hand (no ring either).
    let first = submit(&app, blur(json!({}))).await;
    app.wait_status(&first, "running").await;
    let behind = [
        submit(
            &app,
            blur(json!({"parameters": {"width": 16, "height": 16, "color": 1}})),
        )
        .await,
        submit(
            &app,
            blur(json!({"parameters": {"width": 16, "height": 16, "color": 2}})),
        )
        .await,
    ];
    let (status, body) = app
        .post_json(&format!("/api/job/{again}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    for id in &behind {
        app.wait_status(id, "completed").await;
    }
    let job = app
        .wait_job(&again, "its second attempt to end", |j| {
            j["attempts"] == 2 && j["status"] == "failed"
        })
        .await;
    assert_eq!(job["leases"].as_array().unwrap().len(), 2);
    // Nothing ran twice, nothing was left behind.
    assert!(sim.prompt_posts().values().all(|n| *n == 1));
    let (_, health) = app.get("/api/health").await;
    assert_eq!(health["jobs"]["queued"], 0, "{health}");
}

/// The other way a job can have no ring: the only backend whose tags cover
/// it is busy while another one idles. It starts when that backend frees a
/// slot, with the safety net an hour away, and never on the idle one.
#[tokio::test]
async fn a_job_only_a_busy_backend_may_run_starts_when_that_backend_frees_a_slot() {
    let plain = start_sim(0).await;
    let gpu = start_sim(300).await;
    let app = spawn_farm_with(
        vec![
            backend("plain", plain.port, &[], 1),
            backend("big", gpu.port, &["sdxl"], 1),
        ],
        |c| c.dispatch.poll_interval_ms = 3_600_000,
    )
    .await;
    app.wait_backend("plain", "online").await;
    app.wait_backend("big", "online").await;
    let first = submit(&app, blur(json!({"requires": ["sdxl"]}))).await;
    app.wait_status(&first, "running").await;
    // Only "big" may run it, and "big" is full: no waiting worker to ring.
    let second = submit(&app, blur(json!({"requires": ["sdxl"]}))).await;
    // The idle backend still takes untagged work meanwhile.
    let other = submit(&app, blur(json!({}))).await;
    assert_eq!(
        app.wait_status(&other, "completed").await["backend_id"],
        "plain"
    );
    for id in [&first, &second] {
        assert_eq!(app.wait_status(id, "completed").await["backend_id"], "big");
    }
}

#[tokio::test]
async fn a_retry_that_only_the_failing_backend_can_run_goes_back_to_it_when_its_avoidance_ends() {
    // A failed attempt's job keeps away from its backend for a while so
    // that another gets the first chance; with no other, that backend must
    // take it again (as soon as the back-off ends), not at its idle safety
    // net (set past the wait's deadline here).
    let (_sim, app) = one_failing_backend(500).await;
    let id = app.submit_blur(json!({ "max_attempts": 2 })).await;
    let job = app.wait_status(&id, "failed").await;
    assert_eq!(job["attempts"], 2, "retried on the same backend: {job}");
    let leases = job["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 2);
    assert!(leases.iter().all(|l| l["backend_id"] == "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_behind_an_https_proxy_with_a_token_runs_jobs_and_one_without_it_is_refused() {
    let sim = start_sim(0).await;
    let (port, seen) = tls_proxy(sim.port, "authorization: bearer t0ken").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "monitor: {{poll_interval_ms: 50}}\nbackends:\n\
             \x20 - {{id: cloud, url: \"https://127.0.0.1:{port}/\", headers: {{Authorization: Bearer t0ken}}, tags: [cloud]}}\n\
             \x20 - {{id: nokey, url: \"https://localhost:{port}\"}}\n"
        ),
    );
    let bin = spawn_binary_with_env(&config, &[("SSL_CERT_FILE", &test_ca())]).await;
    let id = bin
        .submit(&json!({"workflow_id": "image_blur", "requires": ["cloud"]}))
        .await;
    let job = poll("the job through the proxy", || async {
        let j = bin.get(&format!("/api/job/{id}")).await;
        (j["status"] == "completed").then_some(j)
    })
    .await;
    assert_eq!(job["backend_id"], "cloud");
    // Its picture came back through the proxy, whole.
    let name = job["outputs"][0]["name"].as_str().unwrap();
    let bytes = reqwest::get(format!("{}/api/job/{id}/outputs/{name}", bin.url))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        format!("{:x}", Sha256::digest(&bytes)),
        job["outputs"][0]["sha256"]
    );
    let backends = bin.get("/api/backends").await;
    let of = |id: &str| {
        backends["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(of("cloud")["host"], "127.0.0.1");
    assert_eq!(of("cloud")["port"], port);
    // Its address as given: scheme and all (the trailing `/` dropped).
    assert_eq!(of("cloud")["url"], format!("https://127.0.0.1:{port}"));
    assert!(
        !backends.to_string().contains("t0ken"),
        "headers are never shown"
    );
    {
        let seen = seen.lock().unwrap();
        assert!(
            seen.first_lines
                .iter()
                .any(|l| l.starts_with("get /ws?clientid=")),
            "the WebSocket went through TLS with the token: {:?}",
            seen.first_lines
        );
    }
    // The box without the token: refused, and it says so.
    let nokey = poll("the box without a token seen refused", || async {
        let b = bin.get("/api/backends").await;
        let b = b["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == "nokey")
            .unwrap()
            .clone();
        b["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401"))
            .then_some(b)
    })
    .await;
    assert!(
        nokey["last_error"]
            .as_str()
            .unwrap()
            .contains("give them in this backend's `headers`"),
        "{nokey}"
    );
    assert_ne!(nokey["state"], "online", "{nokey}");
    assert!(seen.lock().unwrap().refused > 0);
    bin.kill9().await;
}

/// An artist's workstation joins the farm in its hours only (local time):
/// outside them its jobs wait, and the job's page says why; at the start
/// of its hours it takes them by itself, with nobody to enable it.
#[tokio::test]
async fn a_workstation_takes_jobs_only_in_its_hours_and_at_their_start_by_itself() {
    let (_sim, app, start, hours) = one_workstation("workstation", 4).await;
    let id = submit(&app, blur(json!({}))).await;
    let asked = chrono::Local::now();
    let (_, b) = app.get("/api/backends/workstation").await;
    let job = app.job(&id).await;
    if asked < start - chrono::Duration::milliseconds(500) {
        assert_eq!(b["hours"], hours, "{b}");
        assert_eq!(b["off_hours"], true, "{b}");
        assert_eq!(b["accepting_jobs"], false, "{b}");
        assert_eq!(
            job["waiting_for"],
            format!("no backend can take it now: workstation is outside its hours ({hours})"),
            "{job}"
        );
    }
    let job = app.wait_status(&id, "completed").await;
    let leased =
        chrono::DateTime::parse_from_rfc3339(job["leases"][0]["leased_at"].as_str().unwrap())
            .unwrap();
    assert!(
        leased >= start,
        "leased at {leased}, its hours began at {start}"
    );
    let (_, b) = app.get("/api/backends/workstation").await;
    assert_eq!(b["off_hours"], false, "{b}");
}

/// Hours by the day: a workstation given the days around today takes the
/// jobs; one given only days to come (its weekend) takes none, and says
/// which days are its.
#[tokio::test]
async fn a_workstation_given_other_days_takes_no_jobs_today() {
    use chrono::Datelike;
    let today = chrono::Local::now().weekday();
    let day = |n: u32| (0..n).fold(today, |d, _| d.succ());
    // Days that hold now, and days that cannot, whatever midnight passes.
    let near = format!("{}-{}", today.pred(), day(1));
    let far = format!("{}-{}", day(2), day(4));
    let (on_sim, off_sim) = (start_sim(0).await, start_sim(0).await);
    let mut on = backend("near", on_sim.port, &[], 1);
    on.hours = Some(near);
    let mut off = backend("far", off_sim.port, &[], 1);
    off.hours = Some(far.clone());
    let app = spawn_farm_online(vec![on, off]).await;
    let (_, b) = app.get("/api/backends/far").await;
    assert_eq!(
        (&b["hours"], &b["off_hours"]),
        (&json!(far), &json!(true)),
        "{b}"
    );
    let mut ids = Vec::new();
    for width in [64, 65, 66] {
        ids.push(
            submit(
                &app,
                blur(json!({"parameters": {"width": width, "height": 64}})),
            )
            .await,
        );
    }
    for id in &ids {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(leased_on(&job), ["near"], "{job}");
    }
}

/// A batch broken in itself (a node that raises on every shot) is paused
/// once three of its jobs in a row failed alike on both boxes: most of it
/// never runs, each paused job says why, and the next batch goes on.
#[tokio::test]
async fn a_batch_failing_job_after_job_alike_is_paused_and_the_next_runs() {
    let (_a, _b, app) = two_boxes(20, |c| {
        c.dispatch.pause_batch_after = 3;
        // Retries wait: they are paused with the rest.
        c.dispatch.retry_backoff_ms = 60_000;
        c.dispatch.retry_backoff_max_ms = 60_000;
    })
    .await;
    let mut broken = Vec::new();
    for n in 0..12 {
        let job = json!({"workflow": failing_graph(), "max_attempts": 2, "metadata": {"batch": "broken", "n": n}});
        broken.push(submit(&app, job).await);
    }
    let fine = submit(&app, blur(json!({"metadata": {"batch": "fine"}}))).await;
    app.wait_status(&fine, "completed").await;
    let jobs = poll("the broken batch paused", || async {
        let mut jobs = Vec::new();
        for id in &broken {
            let job = app.job(id).await;
            if job["status"] != "queued" {
                return None;
            }
            jobs.push(job);
        }
        let paused = jobs.iter().filter(|j| !j["paused_at"].is_null()).count();
        (paused >= 9).then_some(jobs)
    })
    .await;
    let never_ran = jobs
        .iter()
        .filter(|j| !j["paused_at"].is_null() && j["attempts"] == 0)
        .count();
    assert!(never_ran >= 5, "{never_ran} of 12 never ran");
    let paused = jobs.iter().find(|j| j["attempts"] == 0).unwrap();
    let said = app.events(paused["job_id"].as_str().unwrap()).await;
    let last = said.last().unwrap();
    assert_eq!(last["kind"], "paused", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.starts_with("paused with its batch (batch broken): 3 of its jobs in a row failed with the same cause, IndexError in ImageToMask, on a, b (the last: ")
            && message.ends_with("orchestrator jobs --ids --paused -m batch=broken | orchestrator resume -"),
        "{message}"
    );
    // Its page says the farm paused it, and why, not a user.
    let job = app.job(paused["job_id"].as_str().unwrap()).await;
    assert_eq!(job["waiting_for"], message, "{job}");
    // The health check (the dashboard's notices) warns until it is resumed.
    let warned = |warnings: &[String]| {
        warnings
            .iter()
            .any(|w| w.starts_with("batch broken was paused by the farm at "))
    };
    let warnings = app.health_warnings().await;
    assert!(warned(&warnings), "{warnings:?}");
    for job in jobs.iter().filter(|j| !j["paused_at"].is_null()) {
        let id = job["job_id"].as_str().unwrap();
        let (status, body) = app
            .post_json(&format!("/api/job/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let warnings = app.health_warnings().await;
    assert!(!warned(&warnings), "{warnings:?}");
}

/// A farm down to one box (the other disabled for the night) has nobody
/// to tell a broken batch from a sick box: the batch is paused on the
/// one box's failures rather than failed shot by shot. The job that was
/// in the box's queue when the batch was paused fails alike after, and
/// goes back paused with the rest, not to its retry.
#[tokio::test]
async fn a_batch_failing_on_the_only_box_taking_jobs_is_paused_too() {
    let (a, b) = (start_sim(300).await, start_sim(300).await);
    let app = spawn_farm_with(
        vec![backend("a", a.port, &[], 2), backend("b", b.port, &[], 1)],
        |c| {
            c.dispatch.pause_batch_after = 3;
            c.dispatch.retry_backoff_ms = 60_000;
            c.dispatch.retry_backoff_max_ms = 60_000;
        },
    )
    .await;
    app.wait_backend("a", "online").await;
    let (status, body) = app.post_json("/api/backends/b/disable", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let mut broken = Vec::new();
    for n in 0..8 {
        let job = json!({"workflow": failing_graph(), "max_attempts": 2, "metadata": {"batch": "broken", "n": n}});
        broken.push(submit(&app, job).await);
    }
    let jobs = poll("the whole broken batch paused", || async {
        let mut paused = Vec::new();
        for id in &broken {
            let job = app.job(id).await;
            if job["status"] != "queued" || job["paused_at"].is_null() {
                return None;
            }
            paused.push(job);
        }
        Some(paused)
    })
    .await;
    let ran = jobs.iter().filter(|j| j["attempts"] == 1).count();
    assert!(
        (4..=5).contains(&ran),
        "{ran} of 8 ran: 3, and those on the box then"
    );
    let events = app.events(jobs[0]["job_id"].as_str().unwrap()).await;
    let message = events.last().unwrap()["message"].to_string();
    assert!(
        message.contains("3 of its jobs in a row failed with the same cause, IndexError in ImageToMask, on a (the last: "),
        "{message}"
    );
}

/// An operator who switches the breaker off (`pause_batch_after: 0`) and
/// starts the service again gets the batch's next shots run, not paused by
/// a hold the config no longer keeps; the jobs it paused stay paused until
/// resumed, and nothing warns of the hold.
#[tokio::test]
async fn a_hold_ends_when_the_breaker_is_switched_off_and_the_service_started_again() {
    let a = start_sim(0).await;
    let app = spawn_farm_with(vec![backend("a", a.port, &[], 1)], |c| {
        c.dispatch.pause_batch_after = 3;
        c.dispatch.retry_backoff_ms = 60_000;
        c.dispatch.retry_backoff_max_ms = 60_000;
    })
    .await;
    app.wait_backend("a", "online").await;
    let mut broken = Vec::new();
    for n in 0..5 {
        let job = json!({"workflow": failing_graph(), "max_attempts": 2, "metadata": {"batch": "broken", "n": n}});
        broken.push(submit(&app, job).await);
    }
    let held = |warnings: &[String]| {
        warnings
            .iter()
            .any(|w| w.starts_with("batch broken was paused by the farm at "))
    };
    poll("the batch held", || async {
        held(&app.health_warnings().await).then_some(())
    })
    .await;
    let next = submit(&app, blur(json!({"metadata": {"batch": "broken", "n": 5}}))).await;
    assert!(app.job(&next).await["paused_at"].is_string(), "held");

    let app = app.restart_with(|c| c.dispatch.pause_batch_after = 0).await;
    app.wait_backend("a", "online").await;
    let warnings = app.health_warnings().await;
    assert!(!held(&warnings), "{warnings:?}");
    let after = submit(
        &app,
        blur(json!({"metadata": {"batch": "broken", "n": 6}, "parameters": {"width": 65}})),
    )
    .await;
    let job = app.wait_status(&after, "completed").await;
    assert!(job["paused_at"].is_null(), "{job}");
    // What the hold paused stays paused: each a user's to resume.
    let job = app.job(&next).await;
    assert!(job["paused_at"].is_string(), "{job}");
}

/// The `backend_hours` events' messages so far.
async fn hours_events(app: &TestApp) -> Vec<String> {
    let said = backend_events(app, "backend_hours").await;
    said.into_iter().filter_map(|e| e.message).collect()
}

/// An artist gone home early enables her workstation outside its hours: it
/// takes jobs now, through a restart of the orchestrator, until the end of
/// its next hours; a disable or a drain takes it back.
#[tokio::test]
async fn an_enable_outside_its_hours_lends_the_workstation_until_they_end() {
    let (_sim, app, start, hours) = one_workstation("anna-ws", 3600).await;
    let end = (start + chrono::Duration::hours(2)).with_timezone(&chrono::Utc);
    let (status, b) = app
        .post_json("/api/backends/anna-ws/enable", &json!({}))
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["off_hours"], false, "{b}");
    assert_eq!(b["accepting_jobs"], true, "{b}");
    let until = |b: &Value| {
        b["hours_override_until"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    assert_eq!(until(&b), Some(end), "lent until its hours end: {b}");
    let said = hours_events(&app).await;
    assert!(
        said.last().unwrap().contains(&format!(
            "an operator enabled it outside its hours ({hours})"
        )),
        "{said:?}"
    );
    let id = submit(&app, blur(json!({}))).await;
    assert_eq!(
        leased_on(&app.wait_status(&id, "completed").await),
        ["anna-ws"]
    );

    // The loan outlives a restart (the start writes the hours' side).
    let app = app.restart().await;
    app.wait_backend("anna-ws", "online").await;
    let id = submit(
        &app,
        blur(json!({"parameters": {"width": 65, "height": 64}})),
    )
    .await;
    app.wait_status(&id, "completed").await;
    let (_, b) = app.get("/api/backends/anna-ws").await;
    assert_eq!(
        (b["off_hours"].clone(), until(&b)),
        (json!(false), Some(end)),
        "{b}"
    );

    // A drain takes it back at once; an enable lends it again.
    for (action, off) in [("drain", true), ("enable", false), ("disable", true)] {
        let (_, b) = app
            .post_json(&format!("/api/backends/anna-ws/{action}"), &json!({}))
            .await;
        assert_eq!(b["off_hours"], off, "{action}: {b}");
        assert_eq!(until(&b), (!off).then_some(end), "{action}: {b}");
    }
    let said = hours_events(&app).await;
    assert!(
        said.last().unwrap().contains("is outside its hours")
            && said.last().unwrap().contains("an operator took it back"),
        "{said:?}"
    );
}

/// A loan ends with the hours it ran into: past their end the workstation
/// is outside them again, as any night.
#[tokio::test]
async fn a_workstation_lent_early_is_taken_back_when_its_hours_end() {
    use chrono::Timelike;
    let sim = start_sim(0).await;
    let start = (chrono::Local::now() + chrono::Duration::seconds(3))
        .with_nanosecond(0)
        .unwrap();
    let end = start + chrono::Duration::seconds(2);
    let mut ws = backend("ws", sim.port, &[], 1);
    ws.hours = Some(format!(
        "{}-{}",
        start.format("%H:%M:%S"),
        end.format("%H:%M:%S")
    ));
    let app = spawn_farm_online(vec![ws]).await;
    let (_, b) = app.post_json("/api/backends/ws/enable", &json!({})).await;
    if chrono::Local::now() < start {
        assert!(!b["hours_override_until"].is_null(), "{b}");
    }
    let b = poll("the loan's end", || async {
        let (_, b) = app.get("/api/backends/ws").await;
        (b["off_hours"] == true).then_some(b)
    })
    .await;
    assert!(
        chrono::Local::now() >= end,
        "taken back at the end of its hours"
    );
    assert!(b["hours_override_until"].is_null(), "{b}");
    let id = submit(&app, blur(json!({}))).await;
    let job = app.job(&id).await;
    assert!(
        job["waiting_for"]
            .as_str()
            .unwrap()
            .contains("ws is outside its hours"),
        "{job}"
    );
}

/// A shot too large for the small box waits for the big workstation's
/// hours rather than fail on the small box again: a box outside its hours
/// is one that will come back.
#[tokio::test]
async fn a_job_that_ran_out_of_gpu_memory_waits_for_the_big_workstations_hours() {
    let small = start_sim_with(SimConfig {
        job_ms: 50,
        vram_bytes: 8 << 30,
        oom_above_pixels: 1_000_000,
        ..Default::default()
    })
    .await;
    let big = start_sim(0).await;
    let mut workstation = backend("anna-ws", big.port, &[], 1);
    workstation.hours = Some(hours_beginning_in(4).1);
    let app = spawn_farm_with(
        vec![backend("small", small.port, &[], 1), workstation],
        |c| {
            c.dispatch.retry_backoff_ms = 50;
            c.dispatch.retry_backoff_max_ms = 50;
        },
    )
    .await;
    app.wait_backend("small", "online").await;
    app.wait_backend("anna-ws", "online").await;
    let large = submit(
        &app,
        blur(json!({"parameters": {"width": 2048, "height": 1024}})),
    )
    .await;
    let done = app.wait_status(&large, "completed").await;
    assert_eq!(
        leased_on(&done),
        ["small", "anna-ws"],
        "not tried on the small box again: {done}"
    );
}
