//! Live events: how many subscribers one orchestrator serves while jobs run,
//! and the latency from a backend's message (`execution_start`) to each
//! subscriber (`running` event), with everything on one machine.
//!
//! Run: `cargo bench --bench events` (add `-- --subscribers 1000 --jobs 300`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use orchestrator::config::Config;
use orchestrator::server::Service;
use serde_json::{json, Value};

type Seen = Arc<Mutex<HashMap<String, Instant>>>;

async fn subscriber(url: String, seen: Seen, ready: Arc<tokio::sync::Barrier>) {
    let r = reqwest::Client::new()
        .get(format!("{url}/api/events?status=running"))
        .send()
        .await
        .unwrap();
    ready.wait().await;
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.contains("event: running") {
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let v: Value = serde_json::from_str(data).unwrap();
                    let id = v["job_id"].as_str().unwrap().to_string();
                    seen.lock().unwrap().entry(id).or_insert_with(Instant::now);
                }
            }
        }
    }
}

async fn scenario(subscribers: usize, jobs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (sims, backends) = common::sims(2, 50, 2).await;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        workflows_dir: dir.path().join("workflows"),
        backends,
        ..Default::default()
    };
    config.monitor.poll_interval_ms = 100;
    let service = Service::start(config).await.unwrap();
    let store = service.store().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.serve(listener, async move {
        let _ = rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while store
        .backends()
        .await
        .unwrap()
        .iter()
        .filter(|b| b.state == orchestrator::store::BackendState::Online)
        .count()
        < 2
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = Arc::new(tokio::sync::Barrier::new(subscribers + 1));
    let mut seen_by = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let seen: Seen = Arc::default();
        seen_by.push(seen.clone());
        tasks.push(tokio::spawn(subscriber(url.clone(), seen, ready.clone())));
    }
    ready.wait().await;
    let client = reqwest::Client::new();
    let start = Instant::now();
    let mut ids = Vec::new();
    for i in 0..jobs {
        let r = client
            .post(format!("{url}/api/job"))
            .json(&json!({"workflow_id": "image_blur", "parameters": {"width": 16, "height": 16, "color": i}}))
            .send()
            .await
            .unwrap();
        ids.push(
            r.json::<Value>().await.unwrap()["job_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Every subscriber saw every job start.
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen_by.iter().any(|s| s.lock().unwrap().len() < jobs) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    // When each prompt started on its backend (same process, same clock).
    let mut started: HashMap<String, Instant> = HashMap::new();
    for s in &sims {
        for (prompt, t0, _) in s.timeline() {
            started.insert(prompt, t0);
        }
    }
    let mut latencies = Vec::new();
    for id in &ids {
        let job = store.job(id).await.unwrap().unwrap();
        let Some(t0) = job.prompt_id.as_ref().and_then(|p| started.get(p)) else {
            continue;
        };
        for s in &seen_by {
            if let Some(t) = s.lock().unwrap().get(id) {
                latencies.push(t.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
            }
        }
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let complete = seen_by
        .iter()
        .filter(|s| s.lock().unwrap().len() >= jobs)
        .count();
    println!(
        "{subscribers} SSE subscribers, {jobs} jobs on 2 simulated backends (--job-ms 50): {complete}/{subscribers} subscribers saw every job; \
         backend execution_start -> subscriber `running`: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; jobs ran at {:.0}/s",
        p(0.5),
        p(0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        jobs as f64 / elapsed.as_secs_f64()
    );
    for t in tasks {
        t.abort();
    }
    let _ = stop.send(());
    let _ = server.await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let jobs = common::arg("--jobs", 200);
    let max = common::arg("--subscribers", 1000);
    rt.block_on(async {
        for n in [1, 100, max] {
            scenario(n, jobs).await;
        }
    });
}
