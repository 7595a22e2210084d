//! Large-farm benchmarks: history queries on 1,000,000 jobs, start-up with
//! 100,000 queued and 1,000 running jobs on 8 simulated backends, and memory.
//! The data is generated here (one bulk insert), not checked in.
//!
//! Run: `cargo bench --bench scale` (add `-- --history-jobs 200000` for a quicker run).

mod common;

use std::time::{Duration, Instant};

use orchestrator::config::Config;
use orchestrator::server::Service;
use serde_json::Value;

fn graph() -> Value {
    serde_json::from_str(include_str!("../src/workflows/builtin/image_blur.json")).unwrap()
}

fn pct(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (common::quantile(&v, 0.5), common::quantile(&v, 0.99))
}

/// Stops a service the way the binary does (its workers end, its lock is freed).
async fn stop_service(service: Service) {
    let (_, stop, task) = common::serve(service).await;
    let _ = stop.send(());
    let _ = task.await;
}

async fn history(n: i64) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        workflows_dir: dir.path().join("w"),
        ..Default::default()
    };
    let service = Service::start(config).await.unwrap();
    let t = Instant::now();
    let statuses = [
        "completed",
        "completed",
        "completed",
        "failed",
        "cancelled",
        "queued",
    ]
    .map(String::from)
    .to_vec();
    let workflows = ["image_blur", "txt2img_sdxl", "shot_a", "shot_b"]
        .map(String::from)
        .to_vec();
    service
        .store()
        .bench_fill(n, statuses, workflows, vec![], graph())
        .await
        .unwrap();
    println!(
        "history: generated {n} jobs in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (url, stop, task) = common::serve(service).await;
    let client = reqwest::Client::new();
    // A deep cursor: the page after 90% of the history.
    let deep = format!("j{:x}", n / 10);
    let queries = [
        (
            "by status (failed)",
            "/api/jobs?status=failed&limit=50".to_string(),
        ),
        (
            "by two statuses",
            "/api/jobs?status=failed,cancelled&limit=50".to_string(),
        ),
        (
            "by workflow",
            "/api/jobs?workflow_id=shot_a&limit=50".to_string(),
        ),
        (
            "by metadata field",
            "/api/jobs?metadata.shot=sh42&limit=50".to_string(),
        ),
        (
            "deep cursor page",
            format!("/api/jobs?limit=50&cursor={deep}"),
        ),
        (
            "status + workflow",
            "/api/jobs?status=queued&workflow_id=shot_b&limit=50".to_string(),
        ),
        ("health (job counts)", "/api/health".to_string()),
    ];
    for (name, path) in queries {
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let r = client.get(format!("{url}{path}")).send().await.unwrap();
            assert!(r.status().is_success(), "{path}");
            let _ = r.bytes().await.unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let (p50, p99) = pct(lat);
        println!("history of {n} jobs, {name}: p50 {p50:.2} ms, p99 {p99:.2} ms (HTTP round trip, 50 jobs a page)");
    }
    let _ = stop.send(());
    let _ = task.await;
}

async fn startup(queued: i64, running: i64) {
    let dir = tempfile::tempdir().unwrap();
    let (_sims, backends) = common::sims(8, 0, 2).await;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        workflows_dir: dir.path().join("w"),
        backends: backends.clone(),
        ..Default::default()
    };
    config.monitor.poll_interval_ms = 200;
    {
        // Seed with all backends disabled, so that nothing runs before the restart.
        let mut seed = config.clone();
        for b in &mut seed.backends {
            b.enabled = false;
        }
        let service = Service::start(seed).await.unwrap();
        let ids: Vec<String> = backends.iter().map(|b| b.id.clone()).collect();
        service
            .store()
            .bench_fill(
                queued,
                vec!["queued".into()],
                vec!["image_blur".into()],
                vec![],
                graph(),
            )
            .await
            .unwrap();
        service
            .store()
            .bench_fill(
                running,
                vec!["running".into()],
                vec!["image_blur".into()],
                ids,
                graph(),
            )
            .await
            .unwrap();
        stop_service(service).await;
    }
    let t0 = Instant::now();
    let service = Service::start(config).await.unwrap();
    let store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    let r = reqwest::get(format!("{url}/api/health")).await.unwrap();
    assert!(r.status().is_success());
    let health = t0.elapsed();
    while store.open_bench_leases().await.unwrap() > 0 && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reconciled = t0.elapsed();
    println!(
        "start-up with {queued} queued and {running} running jobs on 8 simulated backends: /api/health answered after {:.0} ms; all {running} running jobs reconciled after {:.2} s",
        health.as_secs_f64() * 1000.0,
        reconciled.as_secs_f64()
    );
    let _ = stop.send(());
    let _ = task.await;
}

/// RSS of the real binary: idle, and with `queued` jobs in its queue.
async fn memory(queued: i64) {
    if !std::path::Path::new(common::RELEASE_BIN).exists() {
        println!("memory: build the release binary first (cargo build --release)");
        return;
    }
    for n in [0, queued] {
        let dir = tempfile::tempdir().unwrap();
        if n > 0 {
            let config = Config {
                data_dir: dir.path().join("data"),
                workflows_dir: dir.path().join("w"),
                ..Default::default()
            };
            let service = Service::start(config).await.unwrap();
            service
                .store()
                .bench_fill(
                    n,
                    vec!["queued".into()],
                    vec!["image_blur".into()],
                    vec![],
                    graph(),
                )
                .await
                .unwrap();
            stop_service(service).await;
        }
        let data = dir.path().join("data");
        let (child, url) = common::spawn_release(&["--data-dir".as_ref(), data.as_os_str()]).await;
        // Touch the API so that the pools and caches are warm.
        for _ in 0..20 {
            reqwest::get(format!("{url}/api/jobs?limit=100"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            reqwest::get(format!("{url}/api/health"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = common::rss_kb(child.pid());
        println!(
            "memory of the release binary with {n} queued jobs: RSS {:.1} MB",
            rss as f64 / 1024.0
        );
        child.kill().await;
    }
}

fn main() {
    // A thousand simulated backends or subscribers hold thousands of
    // sockets in this process: past the 1,024 a login shell allows.
    orchestrator::open_files::raise();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("machine: {}", common::machine());
    rt.block_on(async {
        memory(common::arg("--queued", 100_000)).await;
        startup(
            common::arg("--queued", 100_000),
            common::arg("--running", 1_000),
        )
        .await;
        history(common::arg("--history-jobs", 1_000_000)).await;
    });
}
