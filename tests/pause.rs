//! Holding jobs back: paused (the rest of a batch held back while its first
//! shots are checked) or submitted to start later (a batch submitted by day
//! starts by itself at night). Over real HTTP to a farm of simulated
//! ComfyUI backends.

mod common;

use common::*;
use serde_json::{json, Value};

fn blur(color: u32, extra: Value) -> Value {
    let mut m = json!({"workflow_id": "image_blur", "parameters": {"width": 64, "height": 48, "color": color}});
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

/// A farm of one quick box, disabled while the test sets its queue up.
async fn one_box_disabled() -> (orchestrator::simulator::SimHandle, TestApp) {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    app.wait_backend("node1", "online").await;
    app.post_json("/api/backends/node1/disable", &json!({}))
        .await;
    (sim, app)
}

/// A farm of one quick box whose worker looks at the queue by itself only
/// every ten minutes: a job with a start time starts because its time came.
async fn one_box_without_safety_net() -> (orchestrator::simulator::SimHandle, TestApp) {
    let sim = start_sim(0).await;
    let app = spawn_farm_with(vec![backend("node1", sim.port, &[], 1)], |c| {
        c.dispatch.poll_interval_ms = 600_000
    })
    .await;
    app.wait_backend("node1", "online").await;
    (sim, app)
}

/// Posts `body` to `path`, which must refuse it (`409`): its message.
async fn refusal(app: &TestApp, path: &str, body: Value) -> String {
    let (status, body) = app.post_json(path, &body).await;
    assert_eq!(status, 409, "{body}");
    body["error"]["message"].as_str().unwrap().to_string()
}

fn leased_at(job: &Value) -> String {
    job["leases"][0]["leased_at"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_paused_job_keeps_its_place_through_a_restart_and_runs_once_resumed() {
    let (_sim, app) = one_box_disabled().await;

    let (status, body) = app
        .post_json("/api/job", &blur(1, json!({"paused": "yes"})))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "paused", "{body}");

    // The urgent shot, submitted paused; then the batch, one paused by hand.
    let (status, body) = app
        .post_json(
            "/api/job",
            &blur(1, json!({"paused": true, "priority": 10})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let urgent = body["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        body["message"],
        format!("Job stored paused: no backend takes it until it is resumed (POST /api/job/{urgent}/resume)")
    );
    let held = submit(&app, blur(2, json!({}))).await;
    let free = submit(&app, blur(3, json!({}))).await;
    let (status, job) = app
        .post_json(&format!("/api/job/{held}/pause"), &json!({}))
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "queued");
    assert!(job["paused_at"].is_string(), "{job}");
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("paused by a user at ") && why.contains(&format!("/api/job/{held}/resume")),
        "{why}"
    );
    // Twice is once.
    let (status, again) = app
        .post_json(&format!("/api/job/{held}/pause"), &json!({}))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["paused_at"], job["paused_at"]);
    let list = app.get("/api/jobs?status=queued").await.1;
    let paused: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["paused_at"].is_string())
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(paused, [held.as_str(), urgent.as_str()], "lists say so too");
    let health = app.get("/api/health").await.1;
    assert_eq!(health["paused"], 2, "{health}");
    assert_eq!(health["jobs"]["queued"], 3, "{health}");
    // And to an alert: the only test of this binary that reads /metrics
    // (one recorder serves the process; the gauge is set at each scrape).
    let metrics = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "orchestrator_jobs_paused 2"),
        "{metrics}"
    );

    // The box takes the one job not paused, though both paused ones are
    // ahead of it (a priority, an age).
    app.post_json("/api/backends/node1/enable", &json!({}))
        .await;
    app.wait_status(&free, "completed").await;
    for id in [&urgent, &held] {
        let job = app.job(id).await;
        assert_eq!(job["status"], "queued", "{job}");
        assert_eq!(job["leases"], json!([]), "{job}");
    }
    // An ended job has nothing to pause.
    let message = refusal(&app, &format!("/api/job/{free}/pause"), json!({})).await;
    assert!(message.contains("it is already completed"), "{message}");

    // A pause is stored: it outlives a restart of the orchestrator.
    let app = app.restart().await;
    app.wait_backend("node1", "online").await;
    let free2 = submit(&app, blur(4, json!({}))).await;
    app.wait_status(&free2, "completed").await;
    for id in [&urgent, &held] {
        let job = app.job(id).await;
        assert_eq!(job["status"], "queued", "{job}");
        assert!(job["paused_at"].is_string(), "{job}");
    }

    // Resumed, they run in their turn: the urgent one first.
    app.post_json("/api/backends/node1/disable", &json!({}))
        .await;
    for id in [&held, &urgent] {
        let (status, job) = app
            .post_json(&format!("/api/job/{id}/resume"), &json!({}))
            .await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["paused_at"], Value::Null, "{job}");
    }
    app.post_json("/api/backends/node1/enable", &json!({}))
        .await;
    let urgent_job = app.wait_status(&urgent, "completed").await;
    let held_job = app.wait_status(&held, "completed").await;
    assert!(
        leased_at(&urgent_job) <= leased_at(&held_job),
        "priority 10 first: {} then {}",
        leased_at(&urgent_job),
        leased_at(&held_job)
    );
    assert_eq!(app.get("/api/health").await.1["paused"], 0);
    let kinds = app.event_kinds(&urgent).await;
    assert_eq!(&kinds[..3], ["submitted", "paused", "resumed"], "{kinds:?}");
    let events = app.events(&held).await;
    let paused = events.iter().find(|e| e["kind"] == "paused").unwrap();
    assert_eq!(
        paused["message"],
        "paused by a user: it keeps its place in the queue, and no backend takes it until it is resumed"
    );
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "paused").count(),
        1,
        "the second pause changed nothing"
    );
}

#[tokio::test]
async fn a_paused_second_pass_waits_for_its_first_and_then_to_be_resumed() {
    let (_sim, app) = one_box_disabled().await;
    // A first pass, and its second submitted paused: it waits for the
    // first, then for a person.
    let first = submit(&app, blur(5, json!({}))).await;
    let second = submit(
        &app,
        json!({"workflow_id": "image_invert", "parameters": {"image": format!("job:{first}")}, "paused": true}),
    )
    .await;
    let job = app.job(&second).await;
    assert_eq!(job["status"], "waiting", "{job}");
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("paused by a user")
            && why.contains(&format!(
                "waiting for the job it starts from to complete: {first}"
            )),
        "{why}"
    );
    app.post_json("/api/backends/node1/enable", &json!({}))
        .await;
    app.wait_status(&first, "completed").await;
    // Its first pass completed: queued, still paused. A later job runs
    // past it.
    app.wait_status(&second, "queued").await;
    let later = submit(&app, blur(6, json!({}))).await;
    app.wait_status(&later, "completed").await;
    let job = app.job(&second).await;
    assert_eq!(job["status"], "queued", "{job}");
    assert!(job["paused_at"].is_string(), "{job}");

    let (status, job) = app
        .post_json(&format!("/api/job/{second}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200, "{job}");
    app.wait_status(&second, "completed").await;
    // An unknown job is a 404 for both.
    for action in ["pause", "resume"] {
        let (status, body) = app
            .post_json(&format!("/api/job/nope/{action}"), &json!({}))
            .await;
        assert_eq!(status, 404, "{body}");
    }
}

#[tokio::test]
async fn a_job_a_backend_runs_cannot_be_paused_and_the_refusal_says_what_stops_it() {
    let sim = start_sim(60_000).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    let long = submit(&app, blur(7, json!({}))).await;
    app.wait_status(&long, "running").await;
    let message = refusal(&app, &format!("/api/job/{long}/pause"), json!({})).await;
    assert!(
        message.contains("it is running on backend node1") && message.contains("cancel it"),
        "{message}"
    );
    assert_eq!(app.job(&long).await["paused_at"], Value::Null);
}

#[tokio::test]
async fn a_running_job_paused_with_interrupt_is_stopped_on_its_box_and_runs_again_once_resumed() {
    // The box runs a long shot that must make way: paused with
    // `interrupt`, it is stopped there and waits in the queue, paused.
    let slow = start_sim(60_000).await;
    let quick = start_sim(0).await;
    let app = spawn_farm(vec![
        backend("slow", slow.port, &[], 1),
        backend("quick", quick.port, &[], 1),
    ])
    .await;
    app.wait_backend("quick", "online").await;
    app.post_json("/api/backends/quick/disable", &json!({}))
        .await;
    let long = submit(&app, blur(8, json!({}))).await;
    app.wait_status(&long, "running").await;

    let pause = format!("/api/job/{long}/pause");
    // An empty body (whatever its type says) asks no interrupt: refused.
    let r = app
        .client
        .post(format!("{}{pause}", app.url))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let (status, body) = app.post_json(&pause, &json!({"interrupt": "yes"})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "interrupt", "{body}");
    let (status, job) = app.post_json(&pause, &json!({"interrupt": true})).await;
    assert_eq!(status, 202, "{job}");
    assert!(job["paused_at"].is_string(), "{job}");

    let job = app
        .wait_job(&long, "queued again, paused", |j| {
            j["status"] == "queued" && j["paused_at"].is_string()
        })
        .await;
    poll("stopped on the box, which is free", || async {
        (slow.queue_len() == 0).then_some(())
    })
    .await;
    assert_eq!(job["attempts"], 0, "the stopped run does not count: {job}");
    assert_eq!(job["leases"][0]["outcome"], "paused", "{job}");
    let events = app.events(&long).await;
    let last = &events[events.len() - 1];
    assert_eq!(last["kind"], "paused", "{events:#?}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("interrupted on backend slow"),
        "{last}"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "pause_requested"),
        "{events:#?}"
    );

    // Resumed, it runs again in its turn: here on the other box.
    app.post_json("/api/backends/slow/disable", &json!({}))
        .await;
    app.post_json("/api/backends/quick/enable", &json!({}))
        .await;
    let (status, _) = app
        .post_json(&format!("/api/job/{long}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let job = app.wait_status(&long, "completed").await;
    assert_eq!(job["backend_id"], "quick", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
}

#[tokio::test]
async fn a_pause_stored_but_not_carried_out_before_a_restart_is_carried_out_after_it() {
    let sim = start_sim(60_000).await;
    let app = spawn_farm(vec![backend("node1", sim.port, &[], 1)]).await;
    let long = submit(&app, blur(9, json!({}))).await;
    app.wait_status(&long, "running").await;
    // The request stored, its worker never told: the service stopped first.
    let id = long.clone();
    let app = app
        .restart_after(|config| async move {
            let store = orchestrator::store::Store::open(&config.database_path(), &config.database)
                .await
                .unwrap();
            let change = store.set_paused(&id, true, true).await.unwrap();
            assert_eq!(change.stopping.as_deref(), Some("node1"));
            store.close().await;
        })
        .await;
    let job = app
        .wait_job(&long, "stopped after the restart, paused", |j| {
            j["status"] == "queued" && j["paused_at"].is_string()
        })
        .await;
    assert_eq!(job["leases"][0]["outcome"], "paused", "{job}");
    poll("stopped on the box", || async {
        (sim.queue_len() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_submitted_to_start_later_waits_for_its_time_and_then_runs() {
    let (_sim, app) = one_box_without_safety_net().await;
    let (status, body) = app
        .post_json("/api/job", &blur(8, json!({"start_after": "tonight"})))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "start_after", "{body}");

    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let stamp = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (status, body) = app
        .post_json(
            "/api/job",
            &blur(8, json!({"start_after": stamp, "priority": 10})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let later = body["job_id"].as_str().unwrap().to_string();
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("Job stored; no backend takes it before ")
            && message.ends_with("(its start_after)"),
        "{message}"
    );
    let job = app.job(&later).await;
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("scheduled: no backend takes it before ")
            && why.ends_with("(its start_after)"),
        "{why}"
    );
    // The free box runs a job submitted after it, of a lower priority.
    let now = submit(&app, blur(9, json!({}))).await;
    app.wait_status(&now, "completed").await;
    if chrono::Utc::now() < at {
        assert_eq!(app.job(&later).await["leases"], json!([]));
    }
    // Then it starts by itself at its time.
    let job = app.wait_status(&later, "completed").await;
    let leased = chrono::DateTime::parse_from_rfc3339(&leased_at(&job)).unwrap();
    assert!(
        leased >= at,
        "leased at {leased}, before its start_after {stamp}"
    );
    let kinds = app.event_kinds(&later).await;
    assert_eq!(
        &kinds[..3],
        ["submitted", "scheduled", "assigned"],
        "{kinds:?}"
    );
    // Paused as well, it says both: resumed, it still waits for its time.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let both = submit(
        &app,
        blur(11, json!({"start_after": tomorrow, "paused": true})),
    )
    .await;
    let why = app.job(&both).await["waiting_for"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.starts_with("paused by a user at ")
            && why.contains("; and scheduled: no backend takes it before ")
            && why.ends_with("(its start_after)"),
        "{why}"
    );
    let (status, job) = app
        .post_json(&format!("/api/job/{both}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200, "{job}");
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("scheduled: no backend takes it before "),
        "{why}"
    );
    // A time already past holds nothing back.
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let now = submit(&app, blur(10, json!({"start_after": past}))).await;
    app.wait_status(&now, "completed").await;
    assert!(!app
        .event_kinds(&now)
        .await
        .contains(&"scheduled".to_string()));
}

#[tokio::test]
async fn a_start_time_is_moved_or_dropped_after_submission() {
    let (_sim, app) = one_box_without_safety_net().await;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let later = submit(&app, blur(12, json!({"start_after": tomorrow}))).await;
    let path = format!("/api/job/{later}/schedule");
    for bad in [
        json!({}),
        json!({"start_after": "tonight"}),
        json!({"start_after": 5}),
    ] {
        let (status, body) = app.post_json(&path, &bad).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["error"]["field"], "start_after", "{body}");
    }
    let (status, _) = app
        .post_json(
            "/api/job/no-such-job/schedule",
            &json!({"start_after": null}),
        )
        .await;
    assert_eq!(status, 404);

    // Moved from tomorrow to two seconds from now: it starts by itself then.
    let at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let stamp = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (status, job) = app.post_json(&path, &json!({"start_after": stamp})).await;
    assert_eq!(status, 200, "{job}");
    let why = job["waiting_for"].as_str().unwrap();
    assert!(
        why.starts_with("scheduled: no backend takes it before "),
        "{why}"
    );
    let job = app.wait_status(&later, "completed").await;
    let leased = chrono::DateTime::parse_from_rfc3339(&leased_at(&job)).unwrap();
    assert!(leased >= at, "leased at {leased}, before {stamp}");
    let kinds = app.event_kinds(&later).await;
    assert_eq!(
        &kinds[..4],
        ["submitted", "scheduled", "scheduled", "assigned"],
        "{kinds:?}"
    );

    // Dropped (null): it runs now, in its turn.
    let other = submit(&app, blur(13, json!({"start_after": tomorrow}))).await;
    let (status, job) = app
        .post_json(
            &format!("/api/job/{other}/schedule"),
            &json!({"start_after": null}),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    app.wait_status(&other, "completed").await;

    // A job that ran has no start time to change.
    let path = format!("/api/job/{other}/schedule");
    let message = refusal(&app, &path, json!({"start_after": null})).await;
    assert!(message.contains("it is already completed"), "{message}");
}
