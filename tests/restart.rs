//! Restart-safe farm operation: the real binary killed with SIGKILL at every
//! moment of a job's life, backends that restart empty or vanish, and a
//! graceful stop. After each, every job completes exactly once, and each
//! prompt id reaches a backend at most once.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use orchestrator::simulator::{SimConfig, SimHandle};
use serde_json::{json, Value};

fn farm_yaml(backends: &[(&str, u16, u32)]) -> String {
    let mut y = String::from(
        "shutdown_timeout_s: 3\nmonitor: {poll_interval_ms: 50}\n\
         dispatch: {poll_interval_ms: 100, retry_backoff_ms: 50, retry_backoff_max_ms: 200, backend_grace_s: 2, cancel_timeout_s: 5, request_timeout_ms: 1000}\n\
         backends:\n",
    );
    for (id, port, inflight) in backends {
        y.push_str(&format!(
            "  - {{id: {id}, host: 127.0.0.1, port: {port}, max_inflight: {inflight}}}\n"
        ));
    }
    y
}

struct Http {
    url: String,
    client: reqwest::Client,
}

impl Http {
    fn new(url: &str) -> Http {
        Http {
            url: url.to_string(),
            client: reqwest::Client::new(),
        }
    }
    async fn submit(&self, color: u64) -> String {
        let r = self
            .client
            .post(format!("{}/api/job", self.url))
            .json(&json!({"workflow_id": "image_blur", "parameters": {"width": 32, "height": 32, "color": color}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    }
    async fn job(&self, id: &str) -> Option<Value> {
        let r = self
            .client
            .get(format!("{}/api/job/{id}", self.url))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }
    async fn wait(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(j) = self.job(id).await {
                if pred(&j) {
                    return j;
                }
                if Instant::now() > deadline {
                    panic!("job {id} never reached {what}: {j:#}");
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    /// The kinds of a job's state changes (progress left out).
    async fn events(&self, id: &str) -> Vec<String> {
        let v: Value = self
            .client
            .get(format!("{}/api/job/{id}/events", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .filter(|k| k != "progress")
            .collect()
    }
}

/// Every prompt id reached a backend at most once, and every lease that a
/// backend acknowledged was posted exactly once.
fn assert_each_prompt_posted_once(jobs: &[Value], sims: &[&SimHandle]) {
    assert_posted_once(jobs, sims.iter().map(|s| s.prompt_posts()).collect());
}

/// Same, from the POST counts of each backend (also of backends since killed).
fn assert_posted_once(jobs: &[Value], seen: Vec<HashMap<String, usize>>) {
    let mut posts: HashMap<String, usize> = HashMap::new();
    for s in seen {
        for (p, n) in s {
            *posts.entry(p).or_default() += n;
        }
    }
    assert!(
        posts.values().all(|n| *n == 1),
        "a prompt id was posted twice: {posts:?}"
    );
    let leased: Vec<String> = jobs
        .iter()
        .flat_map(|j| {
            j["leases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["prompt_id"].as_str().unwrap().to_string())
        })
        .collect();
    for p in posts.keys() {
        assert!(
            leased.contains(p),
            "backend saw prompt {p} that no lease holds"
        );
    }
    for j in jobs {
        for l in j["leases"].as_array().unwrap() {
            if l["submitted_at"].is_string() {
                assert!(
                    posts.contains_key(l["prompt_id"].as_str().unwrap()),
                    "acknowledged lease never posted: {l}"
                );
            }
        }
    }
}

async fn completed_once(http: &Http, ids: &[String]) -> Vec<Value> {
    let mut jobs = Vec::new();
    for id in ids {
        let j = http
            .wait(id, "completed", |j| j["status"] == "completed")
            .await;
        assert_eq!(j["attempts"], 1, "a crash must not burn an attempt: {j:#}");
        assert!(!j["outputs"].as_array().unwrap().is_empty());
        let completed = http
            .events(id)
            .await
            .iter()
            .filter(|k| *k == "completed")
            .count();
        assert_eq!(completed, 1);
        jobs.push(j);
    }
    jobs
}

enum Moment {
    JustLeased,
    JustSubmitted,
    Running,
    FinishedOnBackend,
}

async fn kill_at(moment: Moment) {
    let sim_config = match moment {
        Moment::JustLeased => SimConfig {
            job_ms: 3_000,
            prompt_delay_ms: 3_000,
            ..Default::default()
        },
        Moment::JustSubmitted | Moment::Running => SimConfig {
            job_ms: 1_500,
            ..Default::default()
        },
        Moment::FinishedOnBackend => SimConfig {
            job_ms: 0,
            view_delay_ms: 3_000,
            ..Default::default()
        },
    };
    let sim = start_sim_with(sim_config).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &farm_yaml(&[("a", sim.port, 2)]));
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let ids = vec![http.submit(1).await, http.submit(2).await];
    match moment {
        Moment::JustLeased => {
            // One job leased and posted, waiting in ComfyUI's queue (so not
            // started), the backend's answer not yet back.
            poll("a lease whose submit is unanswered", || async {
                for id in &ids {
                    let j = http.job(id).await?;
                    if j["status"] == "assigned"
                        && j["leases"][0]["submitted_at"].is_null()
                        && sim.prompt_posts().len() == 2
                    {
                        return Some(());
                    }
                }
                None
            })
            .await;
        }
        Moment::JustSubmitted => {
            http.wait(&ids[1], "acknowledged", |j| {
                j["leases"][0]["submitted_at"].is_string()
            })
            .await;
        }
        Moment::Running => {
            http.wait(&ids[0], "running", |j| j["status"] == "running")
                .await;
        }
        Moment::FinishedOnBackend => {
            poll("a prompt finished on the backend", || async {
                (!sim.history_ids().is_empty()).then_some(())
            })
            .await;
            assert_ne!(http.job(&ids[0]).await.unwrap()["status"], "completed");
        }
    }
    bin.kill9().await;
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let jobs = completed_once(&http, &ids).await;
    assert_each_prompt_posted_once(&jobs, &[&sim]);
    bin.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_just_after_the_lease_loses_nothing_and_runs_nothing_twice() {
    kill_at(Moment::JustLeased).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_just_after_the_backend_accepted_the_prompt_reattaches_to_it() {
    kill_at(Moment::JustSubmitted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_while_jobs_run_reattaches_and_completes_each_once() {
    kill_at(Moment::Running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_while_outputs_are_collected_collects_them_after_restart() {
    kill_at(Moment::FinishedOnBackend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_restarted_empty_mid_job_gives_its_jobs_back_without_burning_attempts() {
    let a = start_sim(1_500).await;
    let b = start_sim(1_500).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    let x = app.submit_blur(json!({"parameters": {"color": 1}})).await;
    let y = app.submit_blur(json!({"parameters": {"color": 2}})).await;
    let on_a = poll("a job running on a", || async {
        for id in [&x, &y] {
            let j = app.job(id).await;
            if j["status"] == "running" && j["backend_id"] == "a" {
                return Some(id.clone());
            }
        }
        None
    })
    .await;
    let port = a.port;
    let before = a.prompt_posts();
    a.kill().await;
    let a = restart_sim_on(port, 100).await;
    let job = app.wait_status(&on_a, "completed").await;
    assert_eq!(job["attempts"], 1);
    let kinds = app.event_kinds(&on_a).await;
    assert!(kinds.contains(&"requeued".to_string()), "{kinds:?}");
    let lost = &job["leases"][0];
    assert_eq!(lost["outcome"], "lost");
    assert!(
        lost["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer has"),
        "{lost}"
    );
    let other = if on_a == x { &y } else { &x };
    let other = app.wait_status(other, "completed").await;
    assert_posted_once(
        &[job, other],
        vec![before, a.prompt_posts(), b.prompt_posts()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_vanishes_loses_its_jobs_after_the_grace_period_and_runs_nothing_twice_when_back(
) {
    let mut a = start_sim(15_000).await;
    let b = start_sim(100).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 2),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.post_json("/api/backends/b/disable", &json!({})).await;
    let one = app.submit_blur(json!({"parameters": {"color": 1}})).await;
    let two = app.submit_blur(json!({"parameters": {"color": 2}})).await;
    // Both go to a (two slots) and are submitted side by side: whichever
    // prompt reached it first runs, the other waits in its queue.
    let (running, pending) = poll("one of the two to run on a", || async {
        if app.job(&one).await["status"] == "running" {
            Some((one.clone(), two.clone()))
        } else if app.job(&two).await["status"] == "running" {
            Some((two.clone(), one.clone()))
        } else {
            None
        }
    })
    .await;
    let pending_prompt = app
        .wait_job(&pending, "acknowledged", |j| {
            j["leases"][0]["submitted_at"].is_string()
        })
        .await["prompt_id"]
        .as_str()
        .unwrap()
        .to_string();
    app.post_json("/api/backends/b/enable", &json!({})).await;
    // The box drops off the network; its GPU keeps going.
    let port = a.port;
    a.disconnect().await;
    app.wait_backend("a", "offline").await;
    let t0 = Instant::now();
    for id in [&running, &pending] {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "b", "{job:#}");
        assert_eq!(
            job["attempts"], 1,
            "a lost backend does not burn an attempt"
        );
        assert_eq!(job["leases"][0]["outcome"], "lost");
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(1_500),
        "jobs stay while the backend may come back"
    );
    // It comes back: what it still had is deleted and interrupted there.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    a.reconnect(listener);
    poll("the returned backend to be emptied", || async {
        (a.queue_len() == 0).then_some(())
    })
    .await;
    let timeline = a.timeline();
    assert_eq!(
        timeline.len(),
        1,
        "only the prompt that was running ran there"
    );
    assert!(
        timeline[0].2 - timeline[0].1 < Duration::from_secs(14),
        "and it was interrupted"
    );
    assert!(
        !a.timeline().iter().any(|(p, _, _)| *p == pending_prompt),
        "the prompt that waited on the vanished backend never ran there"
    );
    let (_, b_info) = app.get("/api/backends/a").await;
    assert_eq!(b_info["active_jobs"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_restarted_while_a_backend_is_down_moves_its_jobs_after_the_grace_period()
{
    let mut a = start_sim(5_000).await;
    let b = start_sim(100).await;
    let dir = tempfile::tempdir().unwrap();
    // b starts disabled so that the job goes to a.
    let config = write_config(
        dir.path(),
        &farm_yaml(&[("a", a.port, 1), ("b", b.port, 1)]),
    );
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    http.client
        .post(format!("{}/api/backends/b/disable", http.url))
        .send()
        .await
        .unwrap();
    let id = http.submit(1).await;
    http.wait(&id, "running on a", |j| j["status"] == "running")
        .await;
    http.client
        .post(format!("{}/api/backends/b/enable", http.url))
        .send()
        .await
        .unwrap();
    bin.kill9().await;
    a.disconnect().await;
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let job = http
        .wait(&id, "completed", |j| j["status"] == "completed")
        .await;
    assert_eq!(job["backend_id"], "b");
    assert_eq!(job["attempts"], 1);
    assert_each_prompt_posted_once(&[job], &[&a, &b]);
    bin.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_restarted_after_a_backend_restarted_empty_runs_its_jobs_again_once() {
    let a = start_sim(5_000).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &farm_yaml(&[("a", a.port, 1)]));
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let id = http.submit(1).await;
    http.wait(&id, "running", |j| j["status"] == "running")
        .await;
    bin.kill9().await;
    let port = a.port;
    let before = a.prompt_posts();
    a.kill().await;
    let a = restart_sim_on(port, 100).await;
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let job = http
        .wait(&id, "completed", |j| j["status"] == "completed")
        .await;
    assert_eq!(job["attempts"], 1);
    let kinds = http.events(&id).await;
    assert_eq!(
        kinds,
        [
            "submitted",
            "assigned",
            "submitted_to_backend",
            "running",
            "requeued",
            "assigned",
            "submitted_to_backend",
            "running",
            "completed"
        ]
    );
    assert_posted_once(&[job], vec![before, a.prompt_posts()]);
    bin.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_within_the_bound_and_leaves_the_prompt_running_for_the_next_start() {
    let a = start_sim(2_500).await;
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = write_config(dir.path(), &farm_yaml(&[("a", a.port, 1)]));
    let mut bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let id = http.submit(1).await;
    http.wait(&id, "running", |j| j["status"] == "running")
        .await;
    let pid = bin.child.id().unwrap();
    let t0 = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), bin.child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "bounded by shutdown_timeout_s: {:?}",
        t0.elapsed()
    );
    assert_eq!(a.queue_len(), 1, "the prompt keeps running on its backend");
    let bin = spawn_binary(&config).await;
    let http = Http::new(&bin.url);
    let job = http
        .wait(&id, "completed", |j| j["status"] == "completed")
        .await;
    assert_eq!(
        job["leases"].as_array().unwrap().len(),
        1,
        "re-attached, not run again"
    );
    assert_each_prompt_posted_once(&[job], &[&a]);
    bin.kill9().await;
}

#[tokio::test]
async fn a_sigterm_just_after_the_listening_line_is_a_graceful_stop() {
    // A service manager (or a script) that stops it as soon as it says it
    // runs: each stop is the graceful one (exit 0), never the signal's
    // default death before the handler is in place.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    for _ in 0..5 {
        spawn_binary(&config).await.stop().await;
    }
}

#[tokio::test]
async fn after_a_restart_with_every_slot_taken_a_freed_slot_takes_the_queued_job_at_once() {
    // The backend's one slot is taken by a prompt that keeps running across
    // the restart; the second job was queued before it, so no submission
    // rings for it afterwards. When the slot frees it must be taken then,
    // not at the idle worker's safety net (a minute's worth of polls here,
    // past the wait's deadline).
    let a = start_sim(1_500).await;
    let app = spawn_farm_with(vec![backend("a", a.port, &[], 1)], |c| {
        c.dispatch.poll_interval_ms = 60_000;
    })
    .await;
    app.wait_backend("a", "online").await;
    let first = app.submit_blur(json!({})).await;
    app.wait_status(&first, "running").await;
    let second = app.submit_blur(json!({})).await;
    let app = app.restart().await;
    assert_eq!(app.job(&second).await["status"], "queued");
    let first = app.wait_status(&first, "completed").await;
    assert_eq!(first["leases"].as_array().unwrap().len(), 1, "re-attached");
    let second = app.wait_status(&second, "completed").await;
    assert_eq!(second["leases"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_retry_whose_back_off_spans_a_restart_starts_when_it_falls_due() {
    // The attempt failed and the job waits out its back-off when the
    // service restarts: the restarted service must wake a worker when it
    // falls due, not leave it to the idle safety net (set past the wait's
    // deadline here).
    let (_sim, app) = one_failing_backend(2_000).await;
    let id = app.submit_blur(json!({ "max_attempts": 2 })).await;
    app.wait_job(&id, "its first attempt failed", |j| {
        j["status"] == "queued" && j["attempts"] == 1
    })
    .await;
    let app = app.restart().await;
    let job = app.wait_status(&id, "failed").await;
    assert_eq!(job["attempts"], 2, "retried once after the restart: {job}");
    assert_eq!(job["leases"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_database_of_the_release_before_v10_killed_mid_batch_is_upgraded_and_finishes_its_jobs() {
    // tests/fixtures/db/v9_mid_batch.db was written by the release before
    // migration V10 (at cdd7c07) and killed with `kill -9` on a one-box
    // farm (backend `gpu1`, 2 slots): sh010 completed, sh020 running,
    // sh030 assigned, sh040 queued. The ComfyUI it ran on is gone: this
    // one does not know their prompts.
    let sim = start_sim(100).await;
    let (config, dir) = farm_config(vec![backend("gpu1", sim.port, &[], 2)]);
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/db/v9_mid_batch.db");
    std::fs::copy(fixture, config.data_dir.join("orchestrator.db")).unwrap();
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    let shots = [
        ("sh010", "01a21dc8-3db0-71c2-a1ea-ad0a17ecc25d", "completed"),
        ("sh020", "01a21dc8-6463-7617-b392-63f7418850b7", "running"),
        ("sh030", "01a21dc8-65e9-757b-bb70-f3bbf932e9e6", "assigned"),
        ("sh040", "01a21dc8-6785-725d-827b-70a603f2aa52", "queued"),
    ];
    let done = app.job(shots[0].1).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["metadata"]["shot"], "sh010");
    assert_eq!(
        done["outputs"].as_array().unwrap().len(),
        1,
        "its history kept"
    );
    for (shot, id, before) in &shots[1..] {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["metadata"]["shot"], *shot);
        let leases = job["leases"].as_array().unwrap();
        let kinds = app.event_kinds(id).await;
        assert_eq!(
            kinds[0], "submitted",
            "{shot}: its log kept from the start: {kinds:?}"
        );
        if *before == "queued" {
            assert_eq!(leases.len(), 1, "{shot}");
        } else {
            // Its prompt was lost with the old ComfyUI: queued again
            // without the attempt counting, then run here.
            assert_eq!(leases.len(), 2, "{shot}: {leases:?}");
            assert_eq!(leases[0]["outcome"], "lost", "{shot}");
            assert_eq!(job["attempts"], 1, "{shot}: the lost run does not count");
            assert!(kinds.contains(&"requeued".to_string()), "{shot}: {kinds:?}");
        }
        // The run after the upgrade went through V10's trigger: accepted,
        // then running, once each for that lease.
        let mut last_lease: Vec<_> = kinds
            .iter()
            .rev()
            .take_while(|k| *k != "assigned")
            .collect();
        last_lease.reverse();
        let started: Vec<_> = last_lease
            .into_iter()
            .filter(|k| *k == "submitted_to_backend" || *k == "running")
            .collect();
        assert_eq!(
            started,
            ["submitted_to_backend", "running"],
            "{shot}: the last lease accepted, then running: {kinds:?}"
        );
    }
    assert_eq!(
        app.job(shots[0].1).await["leases"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Progress names the node by its type (`ImageBlur`), also for a prompt
/// that outlived a restart of the orchestrator (its graph is read again).
#[tokio::test]
async fn progress_after_a_restart_still_names_the_node_type() {
    let sim = start_sim(4_000).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = app.submit_blur(json!({})).await;
    app.wait_job(&id, "progress", |j| j["progress"]["max"].is_number())
        .await;
    let last_seq = |events: &[Value]| {
        events
            .iter()
            .filter_map(|e| e["seq"].as_i64())
            .max()
            .unwrap_or(0)
    };
    let before = last_seq(&app.events(&id).await);
    let app = app.restart().await;
    // A progress event the new process wrote.
    let after = poll("progress from the restarted service", || async {
        app.events(&id)
            .await
            .into_iter()
            .find(|e| e["kind"] == "progress" && e["seq"].as_i64().is_some_and(|s| s > before))
    })
    .await;
    assert_eq!(after["data"]["node_type"], "ImageBlur", "{after:#}");
    app.wait_status(&id, "completed").await;
}

#[tokio::test]
async fn a_job_that_ended_while_the_orchestrator_was_down_ends_when_its_box_ended_it() {
    // One box completes its job, the other fails its (one attempt allowed),
    // both while the service is down.
    let good = start_sim(300).await;
    let bad = start_sim_with(SimConfig {
        job_ms: 300,
        fail_rate: 1.0,
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![
        backend("good", good.port, &["good"], 1),
        backend("bad", bad.port, &["bad"], 1),
    ])
    .await;
    app.wait_backend("good", "online").await;
    app.wait_backend("bad", "online").await;
    let completes = app.submit_blur(json!({"requires": ["good"]})).await;
    let fails = app
        .submit_blur(json!({"requires": ["bad"], "max_attempts": 1}))
        .await;
    app.wait_status(&completes, "running").await;
    app.wait_status(&fails, "running").await;
    let (config, dir) = app.stop().await;
    poll(
        "both prompts ended on their boxes while nobody listened",
        || async {
            (!good.history_ids().is_empty() && !bad.history_ids().is_empty()).then_some(())
        },
    )
    .await;
    let ended = chrono::Utc::now();
    // The downtime itself (not a wait for something to happen): long enough
    // that the ends are old news when the service is back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut app = spawn_with(config).await;
    app.set_dir(dir.unwrap());
    let back = chrono::Utc::now();
    let at = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    for (id, status) in [(&completes, "completed"), (&fails, "failed")] {
        let job = app.wait_status(id, status).await;
        let finished = at(&job["finished_at"]);
        assert!(
            finished < back - chrono::Duration::seconds(2),
            "{status}: stamped {finished}: it should be when its box ended it, before the restart ({back})"
        );
        // The box's times come to the second (its answer's `Date`).
        let off = (finished - ended).num_milliseconds().abs();
        assert!(off < 1_500, "{status}: {finished} against {ended}");
        let lease = &job["leases"][0];
        assert_eq!(
            at(&lease["finished_at"]),
            finished,
            "{status}: the farm view's bar ends there too"
        );
        let events = app.events(id).await;
        let end = events.iter().find(|e| e["kind"] == status).unwrap();
        let message = end["message"].as_str().unwrap();
        assert!(
            message.contains("before the orchestrator heard of it"),
            "{message}"
        );
    }
}
