//! Live events: how many subscribers one orchestrator serves while jobs run,
//! and the latency from a backend's message (`execution_start`) to each
//! subscriber (`running` event), with everything on one machine.
//!
//! Run: `cargo bench --bench events` (add `-- --subscribers 1000 --jobs 300`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::quantile;
use orchestrator::config::Config;
use orchestrator::server::Service;
use serde_json::{json, Value};

type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// One subscriber, as lean as a dashboard on another machine would be to
/// the orchestrator: a plain TCP connection whose bytes are scanned for the
/// `running` events' job ids (chunk-size lines and the response head hold no
/// `"job_id":"`), nothing else decoded, so the client's own cost on these
/// shared two cores hides as little as it can of the server's.
async fn subscriber(addr: std::net::SocketAddr, seen: Seen, ready: Arc<tokio::sync::Barrier>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /api/events?status=running HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .unwrap();
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    // The response head arrives before any event: wait for it.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if conn.read_buf(&mut buf).await.unwrap() == 0 {
            return;
        }
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    buf.clear();
    ready.wait().await;
    const KEY: &[u8] = b"\"job_id\":\"";
    loop {
        match conn.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let now = Instant::now();
        let Some(end) = buf.windows(2).rposition(|w| w == b"\n\n") else {
            continue;
        };
        for line in buf[..end].split(|b| *b == b'\n') {
            if let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) {
                let id = &line[at + KEY.len()..];
                let id = &id[..id.iter().position(|b| *b == b'"').unwrap_or(id.len())];
                let id = String::from_utf8_lossy(id).into_owned();
                seen.lock().unwrap().entry(id).or_insert(now);
            }
        }
        buf.drain(..end + 2);
    }
}

async fn scenario(clients: &tokio::runtime::Handle, subscribers: usize, jobs: usize) {
    let dir = tempfile::tempdir().unwrap();
    // The backends too are other machines: they run beside the subscribers.
    let (sims, backends) = clients.spawn(common::sims(2, 50, 2)).await.unwrap();
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
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
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
        tasks.push(clients.spawn(subscriber(addr, seen, ready.clone())));
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
    // The same clock for the log's wall-clock times.
    let (wall0, mono0) = (chrono::Utc::now(), Instant::now());
    let wall = |t: Instant| {
        wall0 + chrono::Duration::from_std(t.saturating_duration_since(mono0)).unwrap_or_default()
            - chrono::Duration::from_std(mono0.saturating_duration_since(t)).unwrap_or_default()
    };
    // Per job: from the backend's message to the event in the log.
    let mut to_log = Vec::new();
    let mut latencies = Vec::new();
    // Per job: the first subscriber's latency, and how long the fan-out to
    // all of them took after it.
    let mut firsts = Vec::new();
    let mut spreads = Vec::new();
    for id in &ids {
        let job = store.job(id).await.unwrap().unwrap();
        let Some(t0) = job.prompt_id.as_ref().and_then(|p| started.get(p)) else {
            continue;
        };
        let events = store.job_events(id).await.unwrap();
        if let Some(ev) = events.iter().find(|e| e.kind == "running") {
            to_log.push((ev.at - wall(*t0)).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
        let mut job_latencies = Vec::new();
        for s in &seen_by {
            if let Some(t) = s.lock().unwrap().get(id) {
                job_latencies.push(t.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
            }
        }
        let first = job_latencies.iter().copied().fold(f64::INFINITY, f64::min);
        let last = job_latencies.iter().copied().fold(0.0, f64::max);
        if first.is_finite() {
            firsts.push(first);
            spreads.push(last - first);
        }
        latencies.extend(job_latencies);
    }
    // Each list sorted once, then read at any quantile.
    for v in [&mut firsts, &mut spreads, &mut latencies, &mut to_log] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let (first50, first99) = (quantile(&firsts, 0.5), quantile(&firsts, 0.99));
    let (spread50, spread99) = (quantile(&spreads, 0.5), quantile(&spreads, 0.99));
    let p = |q: f64| quantile(&latencies, q);
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
    println!(
        "  per job: in the log after p50 {:.1} ms, p99 {:.1} ms; first subscriber p50 {first50:.1} ms, p99 {first99:.1} ms; fan-out to the last one took p50 {spread50:.1} ms, p99 {spread99:.1} ms more",
        quantile(&to_log, 0.5),
        quantile(&to_log, 0.99)
    );
    for t in tasks {
        t.abort();
    }
    let _ = stop.send(());
    let _ = server.await;
}

fn main() {
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
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
    // The subscribers stand for dashboards on other machines (and the
    // simulated backends for GPU boxes): they run on threads of their own,
    // so the operating system shares the cores between them and the
    // service as it would between processes, instead of queueing the
    // service's own tasks behind theirs.
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-clients")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n in [1, 100, max] {
            scenario(clients.handle(), n, jobs).await;
        }
    });
}
