//! Helpers shared by the benchmarks: arguments, simulated farms, serving.
#![allow(dead_code)]

use orchestrator::config::BackendConfig;
use orchestrator::server::Service;
use orchestrator::simulator::{self, SimConfig, SimHandle};

/// The value at quantile `q` (0 to 1) of `sorted` (ascending): the one at
/// rank `(len - 1) * q`, rounded down; NaN when there is none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * q) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// What the figures ran on: the cores, the CPU, and how long the file
/// system of the temporary folder (where the benches keep their data) took
/// to create a folder with one file in it, as every job does for its
/// outputs. That last one swings by ten times on one machine: ext4 without
/// a journal walks past every inode freed in the last minute or so when it
/// creates one (docs/PERFORMANCE.md, "This machine, a later day"), so a
/// bench run just after many files were removed pays for it in every job.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // Few, so that removing them frees few inodes for the next creations.
    const PROBES: u32 = 20;
    let creation = tempfile::tempdir().ok().and_then(|dir| {
        let start = std::time::Instant::now();
        for i in 0..PROBES {
            let folder = dir.path().join(i.to_string());
            std::fs::create_dir(&folder).ok()?;
            std::fs::File::create(folder.join("output.png")).ok()?;
        }
        Some(start.elapsed() / PROBES)
    });
    let creation = creation.map_or("unknown".into(), |t| format!("{} us", t.as_micros()));
    format!(
        "{cpus} cores, {model}; a folder with a file created in {} in {creation}",
        std::env::temp_dir().display()
    )
}

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
            url: None,
            headers: Default::default(),
            hours: None,
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

/// The release binary, which the process-level scenarios run as a user
/// would (`cargo build --release` first).
pub const RELEASE_BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/orchestrator");

/// Starts the release binary with `args` (after `serve --port 0`) and
/// returns it with the URL it printed once listening. `BENCH_WRAP` in the
/// environment runs it under a profiler (`BENCH_WRAP="heaptrack -o /tmp/h"`):
/// the figures are then the profiler's too, but the profile is the binary's;
/// `BENCH_LOG` is its `RUST_LOG` (`warn` unless set).
pub async fn spawn_release(args: &[&std::ffi::OsStr]) -> (Release, String) {
    use tokio::io::AsyncBufReadExt;
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = tokio::process::Command::new(program);
            c.args(words).arg(RELEASE_BIN);
            c
        }
        None => tokio::process::Command::new(RELEASE_BIN),
    };
    let mut child = command
        .args(["serve", "--port", "0"])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::piped())
        // A group of its own: a wrapper's children (a profiler starts the
        // binary as one) end with it.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().unwrap();
        if let Some(u) = line.strip_prefix("orchestrator listening on ") {
            break u.to_string();
        }
    };
    // Keep reading its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (Release(child), url)
}

/// The release binary started by [`spawn_release`], with whatever wraps
/// it: dropped or killed, its whole process group ends (killing a wrapper
/// alone once left a profiled orchestrator running through the next
/// benchmark).
pub struct Release(tokio::process::Child);

impl Release {
    /// The started process (the wrapper's, under `BENCH_WRAP`).
    pub fn pid(&self) -> u32 {
        self.0.id().expect("running")
    }

    /// Ends the process group and waits for the started process.
    pub async fn kill(mut self) {
        self.kill_group();
        let _ = self.0.wait().await;
    }

    fn kill_group(&self) {
        if let Some(pid) = self.0.id() {
            // SAFETY: kill only sends a signal; the group is the child's own.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) process `pid` has used, from /proc.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// The CPU time (user + system) in a `/proc/.../stat` line, of a process or
/// of one of its threads.
pub fn stat_cpu(stat: &str) -> std::time::Duration {
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime): the 12th and 13th after the name.
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    std::time::Duration::from_millis((field(11) + field(12)) * 10)
}
