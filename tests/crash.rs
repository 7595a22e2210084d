//! The real binary killed with SIGKILL: a `2xx` means the job is on disk.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_a_burst_of_submissions_loses_no_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let bin = spawn_binary(&config).await;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let (acked, client, url) = (acked.clone(), client.clone(), bin.url.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let token = format!("w{worker}-n{n}");
                let body = json!({"workflow_id": "image_blur", "parameters": {"width": 64 + n % 100},
                                  "metadata": {"token": token, "source": "crash-test"}});
                let Ok(r) = client.post(format!("{url}/api/job")).json(&body).send().await else { return };
                if r.status() != 201 {
                    return;
                }
                let Ok(v) = r.json::<Value>().await else { return };
                acked.lock().await.push((token, v["job_id"].as_str().unwrap().to_string()));
            }
        }));
    }
    // Kill once a good number of submissions were acknowledged, while the rest are in flight.
    poll("300 acknowledged submissions", || {
        let acked = acked.clone();
        async move { (acked.lock().await.len() >= 300).then_some(()) }
    })
    .await;
    bin.kill9().await;
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().await.clone();

    let bin = spawn_binary(&config).await;
    let client = reqwest::Client::new();
    let mut stored = std::collections::HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/api/jobs?limit=1000&metadata.source=crash-test", bin.url);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        for j in page["jobs"].as_array().unwrap() {
            let token = j["metadata"]["token"].as_str().unwrap().to_string();
            let previous = stored.insert(token.clone(), j.clone());
            assert!(previous.is_none(), "token {token} stored twice");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    for (token, job_id) in &acked {
        let job = stored
            .get(token)
            .unwrap_or_else(|| panic!("acknowledged job {job_id} ({token}) lost"));
        assert_eq!(job["job_id"], job_id.as_str());
        assert_eq!(job["status"], "queued");
        let n: u64 = token.split("-n").nth(1).unwrap().parse().unwrap();
        assert_eq!(job["parameters"]["width"], 64 + n % 100, "manifest intact");
    }
    assert!(stored.len() >= acked.len());
    bin.kill9().await;
}

#[tokio::test]
async fn the_binary_refuses_a_second_instance_and_a_bad_config_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let bin = spawn_binary(&config).await;
    let out = tokio::process::Command::new(binary_path())
        .args(["serve", "--port", "0", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another orchestrator is already running"),
        "{err}"
    );
    bin.kill9().await;

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "data_dir: x\nbackends:\n  - {id: a, host: h, prot: 5}\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(binary_path())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prot"), "{err}");
}

#[tokio::test]
async fn backup_writes_a_consistent_copy_while_the_service_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let bin = spawn_binary(&config).await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let r = client
            .post(format!("{}/api/job", bin.url))
            .json(&json!({"workflow_id": "image_blur"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let copy = dir.path().join("copy.db");
    let out = tokio::process::Command::new(binary_path())
        .arg("backup")
        .arg(&copy)
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin.kill9().await;
    // The copy is a working data folder of its own.
    let restored = dir.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::copy(&copy, restored.join("orchestrator.db")).unwrap();
    let cfg = dir.path().join("restored.yaml");
    std::fs::write(&cfg, format!("data_dir: {}\n", restored.display())).unwrap();
    let bin = spawn_binary(&cfg).await;
    let page: Value = client
        .get(format!("{}/api/jobs", bin.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 5);
    bin.kill9().await;
}

#[tokio::test]
async fn logs_also_go_to_a_file_in_log_dir() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let config = write_config(dir.path(), &format!("log_dir: {}\n", logs.display()));
    let mut child = tokio::process::Command::new(binary_path())
        .args(["serve", "--port", "0", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = poll("the log file to name the start-up", || {
        let logs = logs.clone();
        async move {
            let entry = std::fs::read_dir(&logs).ok()?.flatten().next()?;
            let text = std::fs::read_to_string(entry.path()).ok()?;
            text.lines()
                .find(|l| l.contains("orchestrator listening"))
                .map(str::to_string)
        }
    })
    .await;
    assert!(line.contains("data_dir"), "{line}");
    child.start_kill().unwrap();
    let _ = child.wait().await;
}
