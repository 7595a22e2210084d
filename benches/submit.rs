//! Durable submissions over HTTP: the real server, a real HTTP load generator
//! (`wrk`, from Debian's package of that name), 64 concurrent connections.
//! Beside it, the limit: raw SQLite inserts per second, batched, on the same disk.
//!
//! Run: `cargo bench --bench submit` (needs `wrk` on the PATH; `apt-get install wrk`).
//! Add `-- --synchronous normal` to compare with `synchronous = NORMAL`.

mod common;

use std::process::Command;
use std::time::Instant;

use orchestrator::config::{Config, Synchronous};
use orchestrator::server::Service;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

fn synchronous() -> Synchronous {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .position(|a| a == "--synchronous")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    }
}

/// Raw batched inserts of rows shaped like jobs, in transactions of 256.
async fn raw_inserts(dir: &std::path::Path, sync: Synchronous) -> f64 {
    let mut conn = SqliteConnectOptions::new()
        .filename(dir.join("raw.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if sync == Synchronous::Full {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, body TEXT, at TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    let body = "x".repeat(900);
    let n = 100_000;
    let start = Instant::now();
    for batch in 0..n / 256 {
        let mut tx = conn.begin().await.unwrap();
        for i in 0..256 {
            sqlx::query("INSERT INTO t (id, body, at) VALUES (?, ?, ?)")
                .bind(format!("{batch}-{i}-{}", uuid::Uuid::new_v4()))
                .bind(&body)
                .bind("2026-01-01T00:00:00Z")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    (n / 256 * 256) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let sync = synchronous();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "machine: {}; data on {}; synchronous = {sync:?}",
        common::machine(),
        dir.path().display()
    );
    rt.block_on(async {
        let raw = raw_inserts(dir.path(), sync).await;
        println!("limit: raw SQLite inserts, batches of 256, same disk: {raw:.0} rows/s");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            workflows_dir: dir.path().join("workflows"),
            ..Default::default()
        };
        config.database.synchronous = sync;
        let service = Service::start(config).await.unwrap();
        let store = service.store().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(service.serve(listener, async move {
            let _ = rx.await;
        }));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/submit.lua");
        let wrk = |args: Vec<String>| async move {
            tokio::task::spawn_blocking(move || Command::new("wrk").args(args).output())
                .await
                .unwrap()
        };
        let common = |extra: &[&str], target: String| -> Vec<String> {
            let mut a: Vec<String> = ["-t", "2", "-c", "64", "-d", "10s", "--latency"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.extend(extra.iter().map(|s| s.to_string()));
            a.push(target);
            a
        };
        // The limit beside it: the cheapest route on the same server, same load.
        match wrk(common(&[], format!("{url}/api/health"))).await {
            Ok(o) => println!(
                "limit: GET /api/health on the same server\n{}",
                String::from_utf8_lossy(&o.stdout)
            ),
            Err(e) => {
                println!("wrk not found ({e}); install it with `apt-get install wrk`");
                return;
            }
        }
        if let Ok(o) = wrk(common(&["-s", script], url.clone())).await {
            println!(
                "durable submissions: POST /api/job\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        let counts = store.job_counts().await.unwrap();
        println!("jobs stored: {counts:?}");
        let _ = tx.send(());
        let _ = task.await;
    });
}
