//! Test helpers: start the real service on `127.0.0.1:0` with its own data
//! folder, in-process (`spawn_app`) or as the real binary (`spawn_binary`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use orchestrator::config::Config;
use orchestrator::server::Service;
use orchestrator::store::Store;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

/// A running in-process service.
pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub config: Config,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// With `TEST_LOG` set (a tracing filter, `orchestrator=debug`), the
/// service's log goes to each test's captured output: printed for the tests
/// that fail, which is where a rare failure's story is.
fn log_if_asked() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A config with a fresh temporary data folder.
pub fn test_config() -> (Config, tempfile::TempDir) {
    log_if_asked();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        port: 0,
        data_dir: dir.path().join("data"),
        workflows_dir: dir.path().join("workflows"),
        ..Default::default()
    };
    (config, dir)
}

pub async fn spawn_app() -> TestApp {
    let (config, dir) = test_config();
    let mut app = spawn_with(config).await;
    app._dir = Some(dir);
    app
}

pub async fn spawn_with(config: Config) -> TestApp {
    let service = Service::start(config.clone())
        .await
        .expect("service starts");
    let store = service.store().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(service.serve(listener, async move {
        let _ = rx.await;
    }));
    TestApp {
        url,
        client: reqwest::Client::new(),
        config,
        store,
        stop: Some(tx),
        task: Some(task),
        _dir: None,
    }
}

impl TestApp {
    /// Stops the service gracefully and waits for it; keeps the data folder.
    pub async fn stop(mut self) -> (Config, Option<tempfile::TempDir>) {
        self.shutdown().await;
        (self.config.clone(), self._dir.take())
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.store.close().await;
    }

    /// Stops and starts again on the same data folder.
    pub async fn restart(self) -> TestApp {
        self.restart_after(|_| async {}).await
    }

    /// Stops, does `meanwhile` (with the service's config: its database
    /// is closed), and starts again on the same data folder.
    #[allow(dead_code)]
    pub async fn restart_after<F, Fut>(self, meanwhile: F) -> TestApp
    where
        F: FnOnce(Config) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (config, dir) = self.stop().await;
        meanwhile(config.clone()).await;
        let mut app = spawn_with(config).await;
        app._dir = dir;
        app
    }

    /// Stops and starts again on the same data folder, its config first
    /// changed by `tune` (an operator's edit between two runs).
    #[allow(dead_code)]
    pub async fn restart_with(self, tune: impl FnOnce(&mut Config)) -> TestApp {
        let (mut config, dir) = self.stop().await;
        tune(&mut config);
        let mut app = spawn_with(config).await;
        app._dir = dir;
        app
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn submit_blur(&self, extra: Value) -> String {
        let mut body =
            json!({"workflow_id": "image_blur", "parameters": {"width": 64, "height": 64}});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, resp) = self.post_json("/api/job", &body).await;
        assert_eq!(status, 201, "{resp}");
        resp["job_id"].as_str().unwrap().to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/job/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The bytes of output `name` of job `id`, as a client downloads them.
    pub async fn output_bytes(&self, id: &str, name: &str) -> bytes::Bytes {
        let r = self
            .client
            .get(format!("{}/api/job/{id}/outputs/{name}", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "output {name} of job {id}");
        r.bytes().await.unwrap()
    }

    /// Polls a job until `pred` holds or the deadline passes.
    pub async fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.job(id).await;
            if pred(&job) {
                return job;
            }
            if Instant::now() > deadline {
                panic!("job {id} never reached {what}: {job:#}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_job(id, status, |j| j["status"] == status).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real binary, run as a child process.
pub struct Binary {
    pub child: tokio::process::Child,
    pub url: String,
}

pub fn binary_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orchestrator"))
}

/// Starts `orchestrator serve` with `config_path` and waits for its "listening" line.
pub async fn spawn_binary(config_path: &Path) -> Binary {
    spawn_binary_with_env(config_path, &[]).await
}

/// The binary, with these environment variables set.
pub async fn spawn_binary_with_env(config_path: &Path, env: &[(&str, &str)]) -> Binary {
    let mut command = tokio::process::Command::new(binary_path());
    command
        .envs(env.iter().copied())
        .arg("serve")
        .arg("--config")
        .arg(config_path)
        .arg("--port")
        .arg("0");
    spawn_command(command).await
}

/// The binary's `serve --config CONFIG --port 0`, run by `sh` after
/// `script` (which may mount a small disk of its own), in a user and mount
/// namespace of its own: a disk mounted there is the binary's alone, and
/// the test reaches it through the binary's `/proc/PID/root`. `None` after
/// saying the test is skipped where the machine allows no such namespace
/// (never on CI: `.ci/run` runs as root on Linux).
pub async fn spawn_binary_after(config_path: &Path, script: &str) -> Option<Binary> {
    if !private_disks_or_skip() {
        return None;
    }
    let mut command = tokio::process::Command::new("unshare");
    command.arg("-rm").arg("sh").arg("-c").arg(format!(
        "{script} && exec '{}' serve --config '{}' --port 0",
        binary_path().display(),
        config_path.display()
    ));
    Some(spawn_command(command).await)
}

/// Fills the disk that holds folder `dir` with a file, `filler` in it,
/// until the disk says it is full; the file's path.
pub fn fill_disk(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let full = (0..1024).find_map(|_| f.write_all(&[0u8; 64 * 1024]).err());
    assert_eq!(
        full.map(|e| e.raw_os_error()),
        Some(Some(libc::ENOSPC)),
        "{} is a small disk that fills",
        dir.display()
    );
    filler
}

/// Whether this machine lets a test give a process a small disk of its own
/// (a user and mount namespace, `unshare -rm`, and a tmpfs in it); `false`
/// after saying the test is skipped (never on CI).
pub fn private_disks_or_skip() -> bool {
    let probe = tempfile::tempdir().unwrap();
    let can = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=1m tmpfs '{}'",
            probe.path().display()
        ))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        assert!(
            std::env::var("CI").is_err(),
            "CI must allow a mount namespace (unshare -rm)"
        );
        eprintln!("SKIPPED: this machine allows no mount namespace (unshare -rm)");
    }
    can
}

/// Runs `command` (the binary, or a wrapper that `exec`s it) and waits for
/// its "listening" line.
async fn spawn_command(mut command: tokio::process::Command) -> Binary {
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("orchestrator listening on ") {
                return rest.trim().to_string();
            }
        }
        panic!("binary exited before listening");
    })
    .await
    .expect("binary listens within 30 s");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Binary { child, url }
}

impl Binary {
    /// Submits a manifest to the running binary: the new job's id.
    pub async fn submit(&self, manifest: &Value) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/api/job", self.url))
            .json(manifest)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        body["job_id"].as_str().unwrap().to_string()
    }

    /// `GET` of a path of the running binary's API, as JSON.
    pub async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The value of gauge `name` in the binary's `/metrics` (one without
    /// labels), read now.
    pub async fn metric(&self, name: &str) -> f64 {
        let metrics = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics: {metrics}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// `path` as the binary sees it, in its own mount namespace (a disk
    /// mounted there by [`spawn_binary_after`] is seen through this path).
    pub fn sees(&self, path: &Path) -> PathBuf {
        let root = PathBuf::from(format!("/proc/{}/root", self.child.id().expect("running")));
        root.join(path.strip_prefix("/").expect("an absolute path"))
    }

    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// Stops it as a service manager does (SIGTERM), and waits for its end.
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid, which we have not waited for.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stops within 30 s")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// The binary's `serve --config CONFIG --port 0`, started with its limit on
/// open files lowered to `soft` (and the hard limit to `hard`), as a
/// service manager or a login shell may start it.
pub async fn spawn_binary_with_open_files(config_path: &Path, soft: u64, hard: u64) -> Binary {
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(format!(
        "ulimit -Sn {soft} && ulimit -Hn {hard} && exec '{}' serve --config '{}' --port 0",
        binary_path().display(),
        config_path.display()
    ));
    spawn_command(command).await
}

/// Writes a config file for the binary into `dir`.
pub fn write_config(dir: &Path, yaml_extra: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "data_dir: {}\nworkflows_dir: {}\n{yaml_extra}",
            dir.join("data").display(),
            dir.join("workflows").display()
        ),
    )
    .unwrap();
    path
}

use orchestrator::config::BackendConfig;
use orchestrator::simulator::{self, SimConfig, SimHandle};

/// A simulated ComfyUI on a free port.
pub async fn start_sim(job_ms: u64) -> SimHandle {
    start_sim_with(SimConfig {
        job_ms,
        ..Default::default()
    })
    .await
}

pub async fn start_sim_with(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    simulator::spawn(listener, config)
}

/// Starts a simulator again on the port of one that was killed (a ComfyUI restart).
pub async fn restart_sim_on(port: u16, job_ms: u64) -> SimHandle {
    let listener = poll("the port to be free again", || async move {
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    simulator::spawn(
        listener,
        SimConfig {
            job_ms,
            ..Default::default()
        },
    )
}

pub fn backend(id: &str, port: u16, tags: &[&str], max_inflight: u32) -> BackendConfig {
    BackendConfig {
        id: id.into(),
        name: None,
        host: "127.0.0.1".into(),
        port,
        enabled: true,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        max_inflight,
        url: None,
        headers: Default::default(),
        hours: None,
    }
}

/// A config whose timings suit tests: fast polls, short back-off and grace.
pub fn farm_config(backends: Vec<BackendConfig>) -> (Config, tempfile::TempDir) {
    let (mut config, dir) = test_config();
    config.backends = backends;
    config.monitor.poll_interval_ms = 50;
    config.dispatch.poll_interval_ms = 100;
    config.dispatch.retry_backoff_ms = 50;
    config.dispatch.retry_backoff_max_ms = 200;
    config.dispatch.backend_grace_s = 2;
    config.dispatch.cancel_timeout_s = 5;
    config.dispatch.request_timeout_ms = 2_000;
    config.dispatch.heartbeat_ms = 200;
    config.dispatch.deaf_after_ms = 500;
    (config, dir)
}

/// A farm with a config changed by `tune` first.
pub async fn spawn_farm_with(
    backends: Vec<BackendConfig>,
    tune: impl FnOnce(&mut Config),
) -> TestApp {
    let (mut config, dir) = farm_config(backends);
    tune(&mut config);
    let mut app = spawn_with(config).await;
    app._dir = Some(dir);
    app
}

/// One backend, `a`, whose every prompt fails at run time, retried after
/// `backoff_ms`; its idle safety net is set past every wait's deadline,
/// so a test sees only what wakes a worker on purpose.
pub async fn one_failing_backend(backoff_ms: u64) -> (SimHandle, TestApp) {
    let sim = start_sim_with(SimConfig {
        job_ms: 50,
        fail_rate: 1.0,
        ..Default::default()
    })
    .await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.dispatch.poll_interval_ms = 60_000;
        c.dispatch.retry_backoff_ms = backoff_ms;
        c.dispatch.retry_backoff_max_ms = backoff_ms;
    })
    .await;
    app.wait_backend("a", "online").await;
    (sim, app)
}

/// A backend's `hours` that begin `secs` seconds from now (a whole
/// second) and last two hours, as the service writes them back; and their
/// start.
pub fn hours_beginning_in(secs: i64) -> (chrono::DateTime<chrono::Local>, String) {
    use chrono::Timelike;
    let start = (chrono::Local::now() + chrono::Duration::seconds(secs))
        .with_nanosecond(0)
        .unwrap();
    let hours: orchestrator::config::Hours = format!(
        "{}-{}",
        start.format("%H:%M:%S"),
        (start + chrono::Duration::hours(2)).format("%H:%M:%S")
    )
    .parse()
    .unwrap();
    (start, hours.to_string())
}

/// A farm of one workstation, `id`, whose hours begin `secs` seconds from
/// now (outside them until then), once it is online; with its hours as
/// the service writes them, and their start.
pub async fn one_workstation(
    id: &str,
    secs: i64,
) -> (SimHandle, TestApp, chrono::DateTime<chrono::Local>, String) {
    let sim = start_sim(0).await;
    let (start, hours) = hours_beginning_in(secs);
    let mut workstation = backend(id, sim.port, &[], 1);
    workstation.hours = Some(hours.clone());
    let app = spawn_farm(vec![workstation]).await;
    app.wait_backend(id, "online").await;
    (sim, app, start, hours)
}

/// The backends a job's leases went to, in order.
pub fn leased_on(job: &Value) -> Vec<&str> {
    job["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["backend_id"].as_str().unwrap())
        .collect()
}

/// A farm of one box (one slot), `id`, shared by each job's `batch`
/// (`dispatch.share_by`), once the box is online.
pub async fn one_box_shared_by_batch(id: &str, job_ms: u64) -> (SimHandle, TestApp) {
    let sim = start_sim(job_ms).await;
    let app = spawn_farm_with(vec![backend(id, sim.port, &[], 1)], |c| {
        c.dispatch.share_by = Some("batch".into());
    })
    .await;
    app.wait_backend(id, "online").await;
    (sim, app)
}

pub async fn spawn_farm(backends: Vec<BackendConfig>) -> TestApp {
    spawn_farm_with(backends, |_| {}).await
}

/// A farm once every one of its backends is online.
pub async fn spawn_farm_online(backends: Vec<BackendConfig>) -> TestApp {
    let ids: Vec<String> = backends.iter().map(|b| b.id.clone()).collect();
    let app = spawn_farm(backends).await;
    for id in &ids {
        app.wait_backend(id, "online").await;
    }
    app
}

impl TestApp {
    /// Waits until the backend is online and accepting jobs.
    pub async fn wait_backend(&self, id: &str, state: &str) -> Value {
        let path = format!("/api/backends/{id}");
        poll(&format!("backend {id} to be {state}"), || async {
            let (_, b) = self.get(&path).await;
            (b["state"] == state).then_some(b)
        })
        .await
    }

    /// Waits until the backend's inventory has been read (and returns the backend).
    pub async fn wait_inventory(&self, id: &str) -> Value {
        let path = format!("/api/backends/{id}");
        poll(&format!("backend {id}'s inventory"), || async {
            let (_, b) = self.get(&path).await;
            b["inventory"]["read_at"].is_string().then_some(b)
        })
        .await
    }

    /// What `GET /api/health` warns of now (the dashboard's notices).
    pub async fn health_warnings(&self) -> Vec<String> {
        let (_, health) = self.get("/api/health").await;
        health["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| w.as_str().unwrap().to_string())
            .collect()
    }

    pub async fn events(&self, id: &str) -> Vec<Value> {
        let (_, e) = self.get(&format!("/api/job/{id}/events")).await;
        e["events"].as_array().unwrap().clone()
    }

    /// The kinds of a job's state changes (progress left out).
    pub async fn event_kinds(&self, id: &str) -> Vec<String> {
        self.events(id)
            .await
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .filter(|k| k != "progress")
            .collect()
    }
}

impl TestApp {
    /// Keeps `dir` alive as long as the app (for apps built with `spawn_with`).
    pub fn set_dir(&mut self, dir: tempfile::TempDir) {
        self._dir = Some(dir);
    }
}

/// An output file as the ComfyUI at `base` serves it (`/view`, from a
/// job's `outputs` entry): the orchestrator's copy must be these bytes.
pub async fn comfy_view(client: &reqwest::Client, base: &str, output: &Value) -> bytes::Bytes {
    client
        .get(format!("{base}/view"))
        .query(&[
            ("filename", output["filename"].as_str().unwrap()),
            ("subfolder", output["subfolder"].as_str().unwrap()),
            ("type", "output"),
        ])
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

/// A ComfyUI `/history` entry of a prompt that ran to its end untouched
/// (a prompt not ours, which no cancel of ours may interrupt).
pub fn assert_ran_untouched(entry: &Value) {
    assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
    assert!(
        !entry["status"]["messages"]
            .to_string()
            .contains("execution_interrupted"),
        "{entry:#}"
    );
}

/// The test CA's certificate (`tests/fixtures/tls/ca.pem`), for
/// `SSL_CERT_FILE`: what a machine that trusts it has installed.
pub fn test_ca() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls/ca.pem")
        .to_string_lossy()
        .into_owned()
}

/// A TLS server's side with the certificate of `tests/fixtures/tls`
/// (issued for 127.0.0.1 and localhost by the test CA beside it).
pub fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let certs = vec![CertificateDer::from_pem_file(dir.join("server.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let tls = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls))
}

/// What a TLS proxy saw: each connection's first request line, and how
/// many it turned away.
#[derive(Default)]
pub struct ProxySeen {
    pub first_lines: Vec<String>,
    pub refused: usize,
}

/// An https reverse proxy on loopback in front of `to` (a simulator), as a
/// rented GPU's: TLS with the test certificate, and each connection's first
/// request must carry `require` (a header line, lower case) or is answered
/// `401` and closed. Its port, and what it saw.
pub async fn tls_proxy(
    to: u16,
    require: &'static str,
) -> (u16, std::sync::Arc<std::sync::Mutex<ProxySeen>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: std::sync::Arc<std::sync::Mutex<ProxySeen>> = Default::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let first = text.lines().next().unwrap_or_default().to_string();
                if !text.contains(require) {
                    s.lock().unwrap().refused += 1;
                    let _ = tls
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                    return;
                }
                s.lock().unwrap().first_lines.push(first);
                let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                else {
                    return;
                };
                if upstream.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                }
            });
        }
    });
    (port, seen)
}

/// A job id as the dashboard and `watch` show it: its last 8 characters
/// (a UUIDv7's first ones are its time, the same for a whole batch).
pub fn short(id: &str) -> &str {
    &id[id.len() - 8..]
}

/// The recorded graph that raises at run time (ImageToMask alpha on an RGB image).
pub fn failing_graph() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}
    })
}
