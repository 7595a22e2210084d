//! Helpers shared by the benchmarks: arguments, simulated farms, serving.
#![allow(dead_code)]

use orchestrator::config::BackendConfig;
use orchestrator::server::Service;
use orchestrator::simulator::{self, SimConfig, SimHandle};

/// `--name VALUE` from the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` simulated backends on free ports, and their config entries (`sim0`, ...).
pub async fn sims(
    n: usize,
    job_ms: u64,
    max_inflight: u32,
) -> (Vec<SimHandle>, Vec<BackendConfig>) {
    let config = SimConfig {
        job_ms,
        ..Default::default()
    };
    sims_with(n, &config, max_inflight).await
}

/// `n` simulated backends that all behave as `config` says.
pub async fn sims_with(
    n: usize,
    config: &SimConfig,
    max_inflight: u32,
) -> (Vec<SimHandle>, Vec<BackendConfig>) {
    let mut sims = Vec::new();
    let mut backends = Vec::new();
    for i in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = simulator::spawn(listener, config.clone());
        backends.push(BackendConfig {
            id: format!("sim{i}"),
            name: None,
            host: "127.0.0.1".into(),
            port: sim.port,
            enabled: true,
            tags: vec![],
            max_inflight,
        });
        sims.push(sim);
    }
    (sims, backends)
}

/// Serves a started service on a free port: its URL, a stop switch, the task.
pub async fn serve(
    service: Service,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.serve(listener, async move {
        let _ = rx.await;
    }));
    (url, tx, task)
}
