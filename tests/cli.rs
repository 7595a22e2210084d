//! The command-line client against a real server.

mod common;

use common::*;
use serde_json::{json, Value};

async fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    cli_fed(url, args, "").await
}

/// The command with `input` on its standard input, as from a pipe.
async fn cli_fed(url: &str, args: &[&str], input: &str) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(binary_path())
        .args(args)
        .args(["--url", url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_status_jobs_cancel_and_backends_from_the_command_line() {
    let sim = start_sim(600).await;
    let app = spawn_farm(vec![backend("cli1", sim.port, &[], 1)]).await;
    app.wait_backend("cli1", "online").await;

    let (ok, out, err) = cli(
        &app.url,
        &[
            "submit",
            "--workflow",
            "image_blur",
            "-p",
            "width=64",
            "-p",
            "height=32",
            "-m",
            "shot=sc01",
            "--json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    let id = answer["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        app.job(&id).await["parameters"]["width"],
        64,
        "numbers are sent as numbers"
    );

    let (ok, out, err) = cli(&app.url, &["watch", &id, "--json"]).await;
    assert!(ok, "{err}");
    let finals: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(finals[&id], "completed");

    let (ok, out, _) = cli(&app.url, &["status", &id]).await;
    assert!(ok);
    assert!(
        out.contains("completed")
            && out.contains("cli1")
            && out.contains("orchestrator_00001_.png"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shot.json");
    std::fs::write(
        &file,
        r#"{"workflow_id": "image_blur", "metadata": {"shot": "sc02"}}"#,
    )
    .unwrap();
    let (ok, second, err) = cli(&app.url, &["submit", file.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let second = second.trim().to_string();
    assert_eq!(second.len(), 36, "prints the job id: {second}");

    // A graph saved from ComfyUI ("Save (API)") is run as it is; its UI
    // format, and a file that is neither, are refused saying so.
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 7}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "saved"}}
    });
    let saved = dir.path().join("graph_api.json");
    std::fs::write(&saved, graph.to_string()).unwrap();
    let (ok, out, err) = cli(&app.url, &["submit", saved.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let inline = app.job(out.trim()).await;
    assert_eq!(inline["graph"], graph, "{inline}");
    assert_eq!(inline["workflow_id"], Value::Null);
    let ui = dir.path().join("graph_ui.json");
    std::fs::write(&ui, r#"{"nodes": [], "links": [], "version": 0.4}"#).unwrap();
    let (ok, _, err) = cli(&app.url, &["submit", ui.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(
        err.contains("UI format") && err.contains("Save (API)"),
        "{err}"
    );
    let neither = dir.path().join("notes.json");
    std::fs::write(&neither, r#"{"shot": "sc03"}"#).unwrap();
    let (ok, _, err) = cli(&app.url, &["submit", neither.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(err.contains("notes.json is neither a manifest"), "{err}");

    let (ok, out, _) = cli(&app.url, &["jobs", "--meta", "shot=sc01"]).await;
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("JOB"), "{out}");
    assert!(out.contains(&id) && !out.contains(&second), "{out}");
    let (ok, out, _) = cli(&app.url, &["jobs", "--status", "completed", "--json"]).await;
    assert!(ok);
    let page: Value = serde_json::from_str(&out).unwrap();
    assert!(page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["job_id"] == id.as_str()));

    // Server errors are shown as their sentence, with a non-zero exit code.
    let (ok, _, err) = cli(&app.url, &["cancel", &id]).await;
    assert!(!ok);
    assert!(err.contains("is already completed"), "{err}");
    let (ok, _, err) = cli(&app.url, &["submit", "--workflow", "nope"]).await;
    assert!(!ok);
    assert!(err.contains("unknown workflow `nope`"), "{err}");
    let (ok, _, err) = cli("http://127.0.0.1:1", &["backends"]).await;
    assert!(!ok);
    assert!(err.contains("cannot reach the orchestrator"), "{err}");

    let (ok, out, _) = cli(&app.url, &["backends"]).await;
    assert!(ok);
    assert!(
        out.contains("cli1") && out.contains("online") && out.contains("0.3.64"),
        "{out}"
    );
    sim.set_checkpoints(&["copied_today.safetensors"]);
    let (ok, out, err) = cli(&app.url, &["backends", "--refresh", "cli1"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("478 node classes") && out.contains("checkpoints: copied_today.safetensors"),
        "{out}"
    );
    let (ok, out, _) = cli(&app.url, &["cancel", &second, "--json"]).await;
    assert!(ok, "{out}");
    app.wait_status(&second, "cancelled").await;
    let (ok, out, err) = cli(&app.url, &["retry", &second]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("queued"), "{out}");

    // A queued shot moved down (a negative number is a value, not a flag),
    // with why it waits; a finished one refused.
    app.post_json("/api/backends/cli1/disable", &json!({}))
        .await;
    let third = app.submit_blur(json!({})).await;
    let (ok, out, err) = cli(&app.url, &["priority", "-3", &third]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("queued, priority -3: no backend can take it now"),
        "{out}"
    );
    assert_eq!(app.job(&third).await["priority"], -3);
    let (ok, out, err) = cli(&app.url, &["status", &third]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("\nwaiting    no backend can take it now: cli1 is disabled"),
        "{out}"
    );
    let (ok, _, err) = cli(&app.url, &["priority", "5", &id]).await;
    assert!(!ok);
    assert!(err.contains("is already completed"), "{err}");
}

/// A night's batch acted on at once: its ids listed (every page), moved up
/// the queue from a pipe, cancelled with one id wrong (the rest still
/// cancelled, the command failing), then retried from a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_moved_cancelled_and_retried_by_its_ids() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("cli1", sim.port, &[], 1)]).await;
    app.wait_backend("cli1", "online").await;
    app.post_json("/api/backends/cli1/disable", &json!({}))
        .await;
    let mut night = Vec::new();
    for _ in 0..3 {
        night.push(
            app.submit_blur(json!({"metadata": {"batch": "night1"}}))
                .await,
        );
    }
    let other = app
        .submit_blur(json!({"metadata": {"batch": "other"}}))
        .await;

    // Two a request: every page is followed.
    let (ok, listed, err) = cli(
        &app.url,
        &["jobs", "--ids", "-m", "batch=night1", "--limit", "2"],
    )
    .await;
    assert!(ok, "{err}");
    let mut got: Vec<_> = listed.lines().map(str::to_string).collect();
    got.sort();
    let mut want = night.clone();
    want.sort();
    assert_eq!(got, want, "{listed}");

    let (ok, out, err) = cli_fed(&app.url, &["priority", "5", "-"], &listed).await;
    assert!(ok, "{err}");
    for id in &night {
        assert_eq!(app.job(id).await["priority"], 5);
        assert!(out.contains(&format!("{id}  queued, priority 5")), "{out}");
    }
    assert_eq!(app.job(&other).await["priority"], 0);

    let (ok, out, err) = cli(&app.url, &["cancel", &night[0], "no-such-job", &night[1]]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("no-such-job  error: ") && err.contains("1 of 3 jobs failed"),
        "{err}"
    );
    for id in &night[..2] {
        assert_eq!(app.job(id).await["status"], "cancelled");
    }
    // How far the batch got, in a line.
    let (ok, out, err) = cli(&app.url, &["jobs", "--count", "-m", "batch=night1"]).await;
    assert!(ok, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("3 jobs: 1 queued, 2 cancelled"), "{out}");
    let first = app.job(&night[0]).await["submitted_at"]
        .as_str()
        .unwrap()
        .replace('T', " ");
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with(&format!("the first submitted at {}", &first[..19])),
        "{out}"
    );
    // And why the one left waits.
    assert_eq!(
        lines.next(),
        Some(
            format!(
                "the queued ones wait: no backend can take it now: cli1 is disabled (the newest, {})",
                night[2]
            )
            .as_str()
        ),
        "{out}"
    );
    let (ok, _, err) = cli(&app.url, &["jobs", "--count", "--ids"]).await;
    assert!(!ok && err.contains("--ids"), "{err}");

    let (_, cancelled, _) = cli(
        &app.url,
        &[
            "jobs",
            "--ids",
            "--status",
            "cancelled",
            "-m",
            "batch=night1",
        ],
    )
    .await;
    assert_eq!(cancelled.lines().count(), 2, "{cancelled}");
    let (ok, _, err) = cli_fed(&app.url, &["retry", "-"], &cancelled).await;
    assert!(ok, "{err}");
    for id in &night[..2] {
        assert_eq!(app.job(id).await["status"], "queued");
    }
    // Nothing to act on is not an error for a pipe.
    let (ok, out, err) = cli_fed(&app.url, &["retry", "-"], "").await;
    assert!(ok && out.is_empty(), "{out} {err}");
    let (ok, out, err) = cli_fed(&app.url, &["watch", "-"], "").await;
    assert!(ok && out.trim() == "nothing to watch", "{out} {err}");

    // The retried jobs watched to their end from a pipe, once the box is back.
    app.post_json("/api/backends/cli1/enable", &json!({})).await;
    let (ok, out, err) = cli_fed(&app.url, &["watch", "-"], &cancelled).await;
    assert!(ok, "{out} {err}");
    for id in &night[..2] {
        assert!(out.contains(&format!("{}  completed", short(id))), "{out}");
    }
}

/// A batch the farm holds, as the morning's count shows it, let go in one
/// command: each of its paused jobs is resumed (its name in the path,
/// spaces and all), another batch's stay paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_is_counted_as_held_and_resumed_by_its_name() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("cli1", sim.port, &[], 1)]).await;
    let mut night = Vec::new();
    for batch in ["night 1", "night 1", "night 2"] {
        night.push(
            app.submit_blur(json!({"paused": true, "metadata": {"batch": batch}}))
                .await,
        );
    }
    // Held by the farm (as its breaker holds a batch failing job after job).
    app.store
        .hold_batch(orchestrator::store::HeldBatch {
            field: "batch".into(),
            batch: "night 1".into(),
            cause: "IndexError in ImageToMask".into(),
            why: "paused with its batch (batch night 1): it broke".into(),
            banner: "batch night 1 is held by the farm: it broke".into(),
            held_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let app = app.restart().await;
    app.wait_backend("cli1", "online").await;
    let (ok, out, err) = cli(&app.url, &["jobs", "--count", "-m", "batch=night 1"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("2 jobs: 2 queued (2 of them paused)\n")
            && out.contains("\nbatch night 1 is held by the farm: it broke\n"),
        "{out}"
    );
    let (ok, out, err) = cli(&app.url, &["resume", "--batch", "night 1"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "batch night 1: the farm no longer holds it: its new jobs run; 2 resumed:\n{}\n{}\n",
            night[0], night[1]
        )
    );
    for id in &night[..2] {
        app.wait_status(id, "completed").await;
    }
    assert!(app.job(&night[2]).await["paused_at"].is_string());
    let (ok, out, err) = cli(&app.url, &["jobs", "--count", "-m", "batch=night 1"]).await;
    assert!(ok && !out.contains("held"), "{out} {err}");
    let (ok, out, err) = cli(&app.url, &["resume", "--batch", "night 1"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "batch night 1: the farm did not hold it; no job of it was paused\n"
    );
    let (ok, _, err) = cli(&app.url, &["resume"]).await;
    assert!(!ok && err.contains("--batch"), "{err}");
}

/// A batch submitted paused from the command line (by day, for the
/// night), listed as paused, let go from a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_submitted_paused_is_listed_and_resumed_by_its_ids() {
    let sim = start_sim(0).await;
    let app = spawn_farm(vec![backend("cli1", sim.port, &[], 1)]).await;
    app.wait_backend("cli1", "online").await;
    let mut night = Vec::new();
    for width in ["64", "65"] {
        let (ok, out, err) = cli(
            &app.url,
            &[
                "submit",
                "--workflow",
                "image_blur",
                "-p",
                &format!("width={width}"),
                "--paused",
            ],
        )
        .await;
        assert!(ok, "{err}");
        night.push(out.trim().to_string());
    }
    // The box is free and runs what is not paused.
    let day = app.submit_blur(json!({})).await;
    app.wait_status(&day, "completed").await;

    let (ok, listed, err) = cli(&app.url, &["jobs", "--ids", "--paused"]).await;
    assert!(ok, "{err}");
    let mut got: Vec<_> = listed.lines().map(str::to_string).collect();
    got.sort();
    let mut want = night.clone();
    want.sort();
    assert_eq!(got, want, "{listed}");
    let (ok, out, err) = cli(&app.url, &["jobs", "--count", "--paused"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("2 jobs: 2 queued (2 of them paused)\nthe first submitted at "),
        "{out}"
    );
    let (ok, table, err) = cli(&app.url, &["jobs"]).await;
    assert!(ok, "{err}");
    for id in &night {
        let row = table.lines().find(|l| l.starts_with(id.as_str())).unwrap();
        assert!(
            row.contains("queued") && row.contains("paused since"),
            "{row}"
        );
    }
    let (ok, out, err) = cli(&app.url, &["status", &night[0]]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("`orchestrator resume {}` lets it run", night[0])),
        "{out}"
    );
    let (ok, _, err) = cli(&app.url, &["pause", &day]).await;
    assert!(!ok && err.contains("it is already completed"), "{err}");

    let (ok, out, err) = cli_fed(&app.url, &["resume", "-"], &listed).await;
    assert!(ok, "{err}");
    for id in &night {
        assert!(out.contains(&format!("{id}  ")), "{out}");
        assert!(!out.contains("paused"), "{out}");
    }
    let (ok, out, err) = cli_fed(&app.url, &["watch", "-"], &listed).await;
    assert!(ok, "{out} {err}");
    let (ok, listed, _) = cli(&app.url, &["jobs", "--ids", "--paused"]).await;
    assert!(ok && listed.is_empty(), "{listed}");

    // Set for tomorrow, started now by someone leaving early.
    let (ok, out, err) = cli(
        &app.url,
        &[
            "submit",
            "--workflow",
            "image_blur",
            "--start-after",
            "2099-01-01T20:00:00Z",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let late = out.trim().to_string();
    let (ok, table, err) = cli(&app.url, &["jobs"]).await;
    assert!(ok, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with(late.as_str()))
        .unwrap();
    assert!(row.ends_with("starts 2099-01-01T20:00:00"), "{row}");
    let (ok, out, err) = cli(&app.url, &["schedule", "2099-01-02T22:00:00Z", &late]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("scheduled: no backend takes it before 2099-01-02T22:00:00"),
        "{out}"
    );
    let (ok, _, err) = cli(&app.url, &["schedule", "tonight", &late]).await;
    assert!(!ok && err.contains("start_after"), "{err}");
    let (ok, _, err) = cli_fed(&app.url, &["schedule", "now", "-"], &late).await;
    assert!(ok, "{err}");
    app.wait_status(&late, "completed").await;
}

/// A shot a box runs, paused from the command line to make way: refused
/// without `--interrupt` (which says so), stopped there with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_shot_is_paused_with_interrupt_and_waits_in_the_queue() {
    // Its node never looks for the interrupt: the stop is given up on
    // after the cancel timeout (5 s here), as for a cancel.
    let sim = start_sim_with(orchestrator::simulator::SimConfig {
        job_ms: 60_000,
        ignore_interrupts: 1_000,
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![backend("cli2", sim.port, &[], 1)]).await;
    let long = app.submit_blur(json!({})).await;
    app.wait_status(&long, "running").await;
    let (ok, _, err) = cli(&app.url, &["pause", &long]).await;
    assert!(!ok && err.contains("\"interrupt\": true"), "{err}");
    let (ok, out, err) = cli(&app.url, &["pause", "--interrupt", &long]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("paused: backend cli2 is being asked to stop it"),
        "{out}"
    );
    let (ok, out, err) = cli(&app.url, &["status", &long]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("(backend cli2 is being asked to stop it; it then waits in the queue until `orchestrator resume"),
        "{out}"
    );
    let job = app
        .wait_job(&long, "queued again, paused", |j| {
            j["status"] == "queued" && j["paused_at"].is_string()
        })
        .await;
    let last = app.events(&long).await.pop().unwrap();
    assert!(
        last["message"].as_str().unwrap().starts_with(
            "paused: backend cli2 did not confirm within 5 s; the prompt is on the cleanup list"
        ),
        "{last} {job}"
    );
    let (ok, table, err) = cli(&app.url, &["jobs"]).await;
    assert!(ok, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with(long.as_str()))
        .unwrap();
    assert!(
        row.contains("queued") && row.contains("paused since"),
        "{row}"
    );
}

/// `watch` in a log or a script (no terminal: no bars): a line for each
/// change of each job, and a non-zero exit when one does not complete, so
/// `orchestrator watch ID && deliver` stops at a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_without_a_terminal_prints_lines_and_fails_when_a_job_does() {
    let sim = start_sim(300).await;
    let app = spawn_farm(vec![backend("cli1", sim.port, &[], 1)]).await;
    app.wait_backend("cli1", "online").await;
    let good = app.submit_blur(serde_json::json!({})).await;
    let (ok, out, err) = cli(&app.url, &["watch", &good]).await;
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("{}  completed (1 outputs)", short(&good)),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(short(&good)) && l.contains("running")),
        "the start is a line too: {out}"
    );

    // The recorded graph that raises at run time, with no second attempt.
    let (status, body) = app
        .post_json(
            "/api/job",
            &serde_json::json!({"max_attempts": 1, "workflow": failing_graph()}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let bad = body["job_id"].as_str().unwrap().to_string();
    let (ok, out, err) = cli(&app.url, &["watch", &good, &bad]).await;
    assert!(!ok, "a failed job makes watch fail: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(short(&bad)) && l.contains("failed")),
        "{out}"
    );
    // Each job's lines are told apart, though both were submitted within
    // the same second (their ids' first characters are that time).
    assert!(
        !out.lines()
            .any(|l| l.starts_with(short(&good)) && l.contains("failed")),
        "{out}"
    );
    assert!(
        err.contains("1 of 2 job(s) did not complete") && err.contains(short(&bad)),
        "{err}"
    );
}

/// The morning after: how many of a batch failed, and why, grouped by
/// cause, each with a job to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_count_says_why_its_failed_jobs_failed() {
    let (_sim, app) = one_failing_backend(50).await;
    let mut failed = Vec::new();
    for n in 0..2 {
        let id = app
            .submit_blur(json!({"max_attempts": 1, "metadata": {"batch": "night2", "n": n}}))
            .await;
        app.wait_status(&id, "failed").await;
        failed.push(id);
    }
    let (_, c) = app.get("/api/jobs/counts?metadata.batch=night2").await;
    assert_eq!(
        c["failures"],
        json!([{"cause": "RuntimeError in ImageBlur", "jobs": 2, "example": failed[1]}]),
        "{c}"
    );
    let (ok, out, err) = cli(&app.url, &["jobs", "--count", "-m", "batch=night2"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "why they failed:\n     2  RuntimeError in ImageBlur  (e.g. {})\n",
            failed[1]
        )),
        "{out}"
    );
    // None failed, none named.
    let (_, c) = app
        .get("/api/jobs/counts?metadata.batch=night2&status=queued")
        .await;
    assert_eq!(c["failures"], json!([]), "{c}");
}

/// `orchestrator backends` says a workstation takes no jobs outside its
/// hours, and which they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_command_says_a_workstation_is_outside_its_hours() {
    let (_sim, app, _, hours) = one_workstation("anna-ws", 3600).await;
    let (ok, out, err) = cli(&app.url, &["backends"]).await;
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with("anna-ws")).unwrap();
    assert!(
        row.ends_with(&format!("outside its hours ({hours}): no new jobs")),
        "{out}"
    );
    // Enabled outside them: lent to the farm until they end.
    let (status, _) = app
        .post_json("/api/backends/anna-ws/enable", &json!({}))
        .await;
    assert_eq!(status, 200);
    let (ok, out, err) = cli(&app.url, &["backends"]).await;
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with("anna-ws")).unwrap();
    assert!(
        row.contains(&format!("lent outside its hours ({hours}) until ")) && row.ends_with(" UTC"),
        "{out}"
    );
}

/// `orchestrator outputs` puts a batch's pictures in a folder a shot, each
/// as the orchestrator serves it; two boxes' files of one name both kept;
/// run again, it fetches nothing; a job not completed is named, and fails
/// the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_outputs_are_fetched_into_a_folder_a_shot() {
    let (sim1, sim2) = (start_sim(300).await, start_sim(300).await);
    let app = spawn_farm_online(vec![
        backend("box1", sim1.port, &[], 1),
        backend("box2", sim2.port, &[], 1),
    ])
    .await;
    let mut done = Vec::new();
    for width in [64, 65] {
        let job =
            json!({"parameters": {"width": width, "height": 64}, "metadata": {"shot": "sc01"}});
        done.push(app.submit_blur(job).await);
    }
    let held = app.submit_blur(json!({"paused": true})).await;
    let mut names = Vec::new();
    for id in &done {
        let job = app.wait_status(id, "completed").await;
        names.push(job["outputs"][0]["name"].as_str().unwrap().to_string());
    }
    // Each box numbers its own files: two pictures of one name.
    assert_eq!(names[0], names[1]);
    assert_ne!(
        leased_on(&app.job(&done[0]).await),
        leased_on(&app.job(&done[1]).await)
    );

    let to = tempfile::tempdir().unwrap();
    let dir = to.path().to_str().unwrap();
    let ids = format!("{}\n{}\n", done[0], done[1]);
    let (ok, out, err) = cli_fed(
        &app.url,
        &["outputs", "-", "--to", dir, "--by", "shot"],
        &ids,
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("1 output(s) in") && out.contains("(1 fetched, 0 already there)"),
        "{out}"
    );
    let second = format!("{}_{}", &done[1][done[1].len() - 12..], names[1]);
    for (id, file) in [(&done[0], &names[0]), (&done[1], &second)] {
        let on_disk = std::fs::read(to.path().join("sc01").join(file)).unwrap();
        assert_eq!(
            on_disk,
            app.output_bytes(id, &names[0]).await.to_vec(),
            "{file}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(to.path().join("sc01")).unwrap().collect();
    assert_eq!(left.len(), 2, "no .part left beside them: {left:?}");

    // Again, with the job not completed among them.
    let ids = format!("{ids}{held}\n");
    let (ok, out, err) = cli_fed(
        &app.url,
        &["outputs", "-", "--to", dir, "--by", "shot"],
        &ids,
    )
    .await;
    assert!(!ok, "{out}");
    assert_eq!(
        out.matches("(0 fetched, 1 already there)").count(),
        2,
        "{out}"
    );
    assert!(
        err.contains(&format!("{held}  error: it is queued, not completed")),
        "{err}"
    );
    assert!(err.contains("1 of 3 jobs failed"), "{err}");

    // With --json, a JSON object a line, for scripts.
    let (ok, out, err) = cli_fed(
        &app.url,
        &["outputs", "-", "--to", dir, "--by", "shot", "--json"],
        &format!("{}\n{}\n", done[0], done[1]),
    )
    .await;
    assert!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        (&lines[1]["job_id"], &lines[1]["already_there"]),
        (&json!(done[1]), &json!(1))
    );

    // By id: a folder a job.
    let (ok, out, err) = cli(&app.url, &["outputs", &done[0], "--to", dir]).await;
    assert!(ok, "{out}{err}");
    assert!(to.path().join(&done[0]).join(&names[0]).exists(), "{out}");

    // A wrong name's 404 names the job's outputs.
    let (status, body) = app
        .get(&format!(
            "/api/job/{}/outputs/orchestrator_00099_.png",
            done[0]
        ))
        .await;
    assert_eq!(status, 404);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("its outputs: `{}`", names[0])),
        "{body}"
    );
}

/// A job paused while it waits for a retry is listed as paused, its last
/// attempt's error after it (a batch the farm paused for failing reads so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_paused_after_a_failed_attempt_is_listed_as_paused() {
    let (_sim, app) = one_failing_backend(60_000).await;
    let id = app.submit_blur(json!({"max_attempts": 2})).await;
    app.wait_job(&id, "its retry", |j| {
        j["attempts"] == 1 && j["status"] == "queued"
    })
    .await;
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (ok, out, err) = cli(&app.url, &["jobs"]).await;
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap();
    let detail = row
        .split_once("paused since ")
        .map(|(_, d)| d)
        .unwrap_or("");
    assert!(
        detail.contains("; backend a: ") && detail.contains("RuntimeError"),
        "{row}"
    );
}

/// A command piped into a reader that goes (`jobs --ids | head -1`) ends
/// quietly, as other tools do, not with a panic's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_reader_goes_ends_quietly() {
    let app = spawn_app().await;
    app.submit_blur(json!({})).await;
    let mut child = tokio::process::Command::new(binary_path())
        .args(["jobs", "--url", &app.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.status.success());
}

/// On a shared farm, `orchestrator backends` says how each group stands,
/// as the dashboard's farm page does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_command_says_how_a_shared_farm_stands() {
    let (_sim, app) = one_box_shared_by_batch("box", 10_000).await;
    let first = app
        .submit_blur(json!({"metadata": {"batch": "anna"}}))
        .await;
    app.wait_job(&first, "on the farm", |j| j["status"] != "queued")
        .await;
    app.submit_blur(json!({"metadata": {"batch": "ben"}})).await;
    app.submit_blur(json!({})).await;
    let (ok, out, err) = cli(&app.url, &["backends"]).await;
    assert!(ok, "{err}");
    assert!(
        out.ends_with(
            "shared by batch, the group with the fewest on the farm next: \
             without batch 0 on the farm, 1 queued · anna 1 on the farm, 0 queued · ben 0 on the farm, 1 queued\n"
        ),
        "{out}"
    );
}

/// Outputs fetched onto a disk that fills are an error, not a short file
/// kept under the output's name with the command saying all went well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_fetched_onto_a_full_disk_fail_the_command() {
    if !private_disks_or_skip() {
        return;
    }
    let sim = start_sim(0).await;
    let app = spawn_farm_online(vec![backend("box1", sim.port, &[], 1)]).await;
    // A picture small enough to come in one piece: a short write is then
    // told only by a flush.
    let id = app
        .submit_blur(json!({"parameters": {"width": 16, "height": 16}}))
        .await;
    app.wait_status(&id, "completed").await;
    let to = tempfile::tempdir().unwrap();
    // The folder is a disk of its own, of 64 KiB, filled before the command runs.
    let out = tokio::process::Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=64k tmpfs '{to}' && head -c 1048576 /dev/zero > '{to}/filler'; \
             exec '{bin}' outputs {id} --to '{to}' --url {url}",
            to = to.path().display(),
            bin = binary_path().display(),
            url = app.url
        ))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("No space left on device") || err.contains("storage full"),
        "{err}"
    );
}
