//! Farm benchmarks: jobs per second end to end through simulated backends,
//! and the idle gap a backend sees between two jobs.
//!
//! Run: `cargo bench --bench farm` (add `-- --jobs 2000 --backends 8`;
//! `-- --only mixed` runs only the mixed-model scenario; `-- --only shared`
//! only two batches on a farm shared by `batch` and not; `-- --only big`
//! only the 8 against 1,000 backends scenario, in `--rounds 5` rounds of
//! 1,000 jobs to each farm in turn; `--no-baseline` leaves out its
//! 8-backend farm, for trying a change to the large farm quickly, and for
//! a `BENCH_LOG` of one process only).
//! Each figure is printed with the machine it ran on.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::quantile;
use orchestrator::config::Config;
use orchestrator::server::Service;
use orchestrator::simulator::{self, SimConfig, SimHandle};
use serde_json::json;

async fn farm(
    backends: usize,
    max_inflight: u32,
    job_ms: u64,
) -> (Service, Vec<SimHandle>, tempfile::TempDir) {
    farm_with(backends, max_inflight, job_ms, |_| {}).await
}

/// [`farm`] with its config changed by `tune` first.
async fn farm_with(
    backends: usize,
    max_inflight: u32,
    job_ms: u64,
    tune: impl FnOnce(&mut Config),
) -> (Service, Vec<SimHandle>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (sims, configs) = common::sims(backends, job_ms, max_inflight).await;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        workflows_dir: dir.path().join("workflows"),
        backends: configs,
        ..Default::default()
    };
    config.monitor.poll_interval_ms = 200;
    tune(&mut config);
    let service = Service::start(config).await.unwrap();
    (service, sims, dir)
}

async fn wait_online(service: &Service, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let online = service
            .store()
            .backends()
            .await
            .unwrap()
            .iter()
            .filter(|b| b.state == orchestrator::store::BackendState::Online)
            .count();
        if online == n || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits `n` jobs through the HTTP API with `clients` concurrent
/// clients; the latency of each, sorted.
async fn submit_timed(url: &str, n: usize, clients: usize) -> Vec<f64> {
    submit_each(url, n, clients, Arc::new(|_| json!({}))).await
}

/// A manifest's fields beyond the bench's blur, for its `i`th job.
type Extra = Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>;

/// Submits `n` blurs as [`submit_timed`] does, each with `extra(i)`'s
/// fields (its metadata, say).
async fn submit_each(url: &str, n: usize, clients: usize, extra: Extra) -> Vec<f64> {
    let client = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, url) = (client.clone(), next.clone(), url.to_string());
        let extra = extra.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return lat;
                }
                let mut body = json!({"workflow_id": "image_blur", "parameters": {"width": 16, "height": 16, "color": i % 16777215}});
                if let (Some(b), serde_json::Value::Object(e)) = (body.as_object_mut(), extra(i)) {
                    b.extend(e);
                }
                let t = Instant::now();
                let r = client.post(format!("{url}/api/job")).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 201);
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat
}

async fn throughput(backends: usize, jobs: usize) {
    let (service, sims, _dir) = farm(backends, 2, 0).await;
    wait_online(&service, backends).await;
    let store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    let start = Instant::now();
    submit_timed(&url, jobs, 16).await;
    let submitted = start.elapsed();
    until_completed(&store, jobs, 10).await;
    let total = start.elapsed();
    let outputs: usize = sims.iter().map(|s| s.timeline().len()).sum();
    println!(
        "end to end, {backends} simulated backends, --job-ms 0: {jobs} jobs completed with outputs collected in {:.2} s = {:.0} jobs/s (submission alone took {:.2} s; prompts run on backends: {outputs})",
        total.as_secs_f64(),
        jobs as f64 / total.as_secs_f64(),
        submitted.as_secs_f64()
    );
    let _ = stop.send(());
    let _ = task.await;
}

async fn idle_gap(max_inflight: u32, jobs: usize, job_ms: u64) {
    let (service, sims, _dir) = farm(1, max_inflight, job_ms).await;
    wait_online(&service, 1).await;
    let svc_store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    submit_timed(&url, jobs, 4).await;
    until_completed(&svc_store, jobs, 10).await;
    let tl = sims[0].timeline();
    let mut gaps: Vec<f64> = tl
        .windows(2)
        .map(|w| w[1].1.saturating_duration_since(w[0].2).as_secs_f64() * 1000.0)
        .collect();
    gaps.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| common::quantile(&gaps, q);
    println!(
        "idle gap between consecutive jobs on one backend, max_inflight {max_inflight}, --job-ms {job_ms}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} gaps",
        p(0.5),
        p(0.99),
        gaps.last().unwrap(),
        gaps.len()
    );
    let _ = stop.send(());
    let _ = task.await;
}

/// Waits until `n` jobs have completed, looking every `every_ms`.
async fn until_completed(store: &orchestrator::store::Store, n: usize, every_ms: u64) {
    while (completed_store(store).await as usize) < n {
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
}

async fn completed_store(store: &orchestrator::store::Store) -> i64 {
    store
        .job_counts()
        .await
        .unwrap()
        .into_iter()
        .filter(|(s, _)| *s == orchestrator::store::JobStatus::Completed)
        .map(|(_, n)| n)
        .sum()
}

/// Submit -> `POST /prompt` at an idle backend, one job at a time.
async fn dispatch_latency(jobs: usize) {
    let (service, sims, _dir) = farm(1, 2, 0).await;
    wait_online(&service, 1).await;
    let store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    let client = reqwest::Client::new();
    let mut lat = Vec::new();
    for i in 0..jobs {
        let body = json!({"workflow_id": "image_blur", "parameters": {"width": 16, "height": 16, "color": i}});
        let t0 = Instant::now();
        let r: serde_json::Value = client
            .post(format!("{url}/api/job"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["job_id"].as_str().unwrap().to_string();
        // Wait for the job to finish so that the backend is idle for the next one.
        loop {
            let job = store.job(&id).await.unwrap().unwrap();
            if job.status == orchestrator::store::JobStatus::Completed {
                let posted = sims[0]
                    .posted_at(job.prompt_id.as_deref().unwrap())
                    .unwrap();
                lat.push(posted.saturating_duration_since(t0).as_secs_f64() * 1000.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "dispatch latency, submit (durable) -> POST /prompt at an idle backend: p50 {:.2} ms, p99 {:.2} ms over {jobs} jobs",
        common::quantile(&lat, 0.5),
        common::quantile(&lat, 0.99)
    );
    let _ = stop.send(());
    let _ = task.await;
}

/// The limit: the simulators alone, driven straight by a client, no orchestrator.
async fn simulators_alone(backends: usize, jobs: usize) {
    let mut sims = Vec::new();
    for _ in 0..backends {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        sims.push(simulator::spawn(
            listener,
            SimConfig {
                job_ms: 0,
                ..Default::default()
            },
        ));
    }
    let graph: serde_json::Value =
        serde_json::from_str(include_str!("../src/workflows/builtin/image_blur.json")).unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (b, sim) in sims.iter().enumerate() {
        let client = orchestrator::comfy::ComfyClient::new(
            "127.0.0.1",
            sim.port,
            "bench",
            Duration::from_secs(10),
        );
        let mut graph = graph.clone();
        let n = jobs / backends;
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                graph["1"]["inputs"]["color"] = json!(b * 100_000 + i);
                graph["1"]["inputs"]["width"] = json!(16);
                graph["1"]["inputs"]["height"] = json!(16);
                let pid = uuid::Uuid::new_v4().to_string();
                client.submit(&pid, &graph).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    while sims.iter().map(|s| s.timeline().len()).sum::<usize>() < jobs / backends * backends {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = start.elapsed();
    println!(
        "limit: {backends} simulators alone, driven by one client, --job-ms 0: {:.0} prompts/s",
        (jobs / backends * backends) as f64 / total.as_secs_f64()
    );
}

/// A night of mixed work: 4 backends, 4 checkpoints, each switch of
/// checkpoint costing `load_ms`, jobs submitted in random checkpoint order.
/// Reports the time against the ideal (every job's run time, no switch).
async fn mixed_models(affinity: bool, jobs: usize, job_ms: u64, load_ms: u64) {
    const BACKENDS: usize = 4;
    let checkpoints: Vec<String> = (0..4).map(|i| format!("model_{i}.safetensors")).collect();
    let sim_config = SimConfig {
        job_ms,
        load_ms,
        checkpoints: checkpoints.clone(),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    // Two prompts in flight per backend, the default.
    let (sims, configs) = common::sims_with(BACKENDS, &sim_config, 2).await;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        workflows_dir: dir.path().join("workflows"),
        backends: configs,
        ..Default::default()
    };
    config.monitor.poll_interval_ms = 200;
    config.dispatch.model_affinity = affinity;
    let service = Service::start(config).await.unwrap();
    wait_online(&service, BACKENDS).await;
    let store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    // The same pseudo-random order every run (a fixed-seed LCG).
    let mut seed: u64 = 0x5eed;
    let client = reqwest::Client::new();
    let start = Instant::now();
    for i in 0..jobs {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ckpt = &checkpoints[(seed >> 33) as usize % checkpoints.len()];
        let body = json!({"workflow_id": "txt2img_sdxl", "parameters": {
            "prompt": format!("shot {i}"), "checkpoint": ckpt, "steps": 1,
            "width": 64, "height": 64}});
        let r = client
            .post(format!("{url}/api/job"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    until_completed(&store, jobs, 50).await;
    let total = start.elapsed().as_secs_f64();
    let ideal = (jobs as f64 * job_ms as f64 / 1000.0) / BACKENDS as f64;
    let switches: usize = sims.iter().map(|s| s.loads()).sum();
    println!(
        "mixed models, {BACKENDS} backends, 4 checkpoints, --job-ms {job_ms} --load-ms {load_ms}, {jobs} jobs, preference {}: {total:.1} s, {:.2} jobs/s, {:.0}% of the ideal ({ideal:.1} s), {switches} checkpoint loads",
        if affinity { "on " } else { "off" },
        jobs as f64 / total,
        100.0 * ideal / total,
    );
    let _ = stop.send(());
    let _ = task.await;
}

/// A farm of 8 simulated backends (two slots each) shared by `batch` or
/// not (`dispatch.share_by`).
async fn farm_of_8(share: bool, job_ms: u64) -> (Service, Vec<SimHandle>, tempfile::TempDir) {
    let farm = farm_with(8, 2, job_ms, |c| {
        c.dispatch.share_by = share.then(|| "batch".to_string());
    })
    .await;
    wait_online(&farm.0, 8).await;
    farm
}

/// Two artists' batches on a farm of 8: 1,000 jobs of 50 ms for the first,
/// then, once it runs, 100 for the second: how long the second waits for
/// its last job, the farm shared by `batch` or not. Then the lease's cost
/// on a deep queue of a shared farm: 10,000 jobs of 0 ms in 10 batches
/// (submitted faster than the farm runs them, so thousands wait), jobs/s.
async fn shared_farm(share: bool) {
    let (service, _sims, _dir) = farm_of_8(share, 50).await;
    let store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    submit_each(
        &url,
        1_000,
        16,
        Arc::new(|_| json!({"metadata": {"batch": "first"}})),
    )
    .await;
    until_completed(&store, 16, 5).await;
    let start = Instant::now();
    submit_each(
        &url,
        100,
        16,
        Arc::new(|_| json!({"metadata": {"batch": "second"}})),
    )
    .await;
    let client = reqwest::Client::new();
    let second = loop {
        let c = get_json(
            &client,
            &format!("{url}/api/jobs/counts?metadata.batch=second"),
        )
        .await;
        if c["jobs"]["completed"] == 100 {
            break start.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    until_completed(&store, 1_100, 10).await;
    let all = start.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = task.await;

    let (service, _sims, _dir) = farm_of_8(share, 0).await;
    let store = service.store().clone();
    let (url, stop, task) = common::serve(service).await;
    let start = Instant::now();
    submit_each(
        &url,
        10_000,
        16,
        Arc::new(|i| json!({"metadata": {"batch": format!("night{}", i % 10)}})),
    )
    .await;
    let submitted = start.elapsed().as_secs_f64();
    until_completed(&store, 10_000, 10).await;
    let deep = start.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = task.await;
    println!(
        "two batches, 8 backends, --job-ms 50, 1,000 jobs then 100, {}: the second's last job {second:.2} s after it was submitted (the first's last {all:.2} s); 10,000 jobs of 0 ms in 10 batches: {:.0} jobs/s end to end (submitted in {submitted:.2} s)",
        if share { "shared by batch" } else { "not shared     " },
        10_000.0 / deep,
    );
}

/// The JSON answer of `GET url`.
async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// Job counts by status, from `/api/health`.
async fn counts(client: &reqwest::Client, url: &str) -> serde_json::Value {
    get_json(client, &format!("{url}/api/health")).await["jobs"].clone()
}

/// A farm of `backends` simulated backends (in this process, `--job-ms 0`)
/// in front of the release binary on default settings, a process of its
/// own so that its CPU and memory are measured alone.
///
/// The simulated backends stand for GPU boxes and run on `machines`, a
/// runtime of their own: the operating system shares the cores between
/// them and the submitting clients as it would between processes, instead
/// of queueing each client's next request behind a thousand backends' work.
struct BigFarm {
    backends: usize,
    configs: Vec<orchestrator::config::BackendConfig>,
    child: common::Release,
    url: String,
    /// From the start of the binary to every backend online.
    online: Duration,
    /// Jobs completed so far (each round waits for its own).
    done: u64,
    _sims: Vec<SimHandle>,
    _dir: tempfile::TempDir,
}

/// One round of submissions to one farm.
struct Round {
    /// Each submission's latency, sorted.
    lat: Vec<f64>,
    jobs_per_s: f64,
    cpu_per_job_ms: f64,
    /// This process's CPU a job meanwhile: the simulators' and the clients'.
    bench_cpu_per_job_ms: f64,
    /// From the first submission to the last answer.
    window_s: f64,
    /// The orchestrator's CPU over that window, in cores (2.0 is all of
    /// this machine's): what the submissions' answers waited behind.
    window_cores: f64,
    /// Jobs of the round no longer queued when the last submission was
    /// answered: how much of the farm's work (leases, prompts, progress)
    /// ran during the submissions rather than after them.
    leased_in_window: u64,
}

impl BigFarm {
    async fn start(machines: &tokio::runtime::Handle, backends: usize) -> BigFarm {
        let dir = tempfile::tempdir().unwrap();
        let (sims, configs) = machines.spawn(common::sims(backends, 0, 2)).await.unwrap();
        let mut yaml = format!(
            "data_dir: {}\nworkflows_dir: {}\ninbox:\n  enabled: false\nbackends:\n",
            dir.path().join("data").display(),
            dir.path().join("workflows").display()
        );
        for b in &configs {
            yaml.push_str(&format!(
                "  - id: {}\n    host: 127.0.0.1\n    port: {}\n    max_inflight: 2\n",
                b.id, b.port
            ));
        }
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let started = Instant::now();
        let (child, url) = common::spawn_release(&["--config".as_ref(), config.as_os_str()]).await;
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let list = get_json(&client, &format!("{url}/api/backends")).await;
            let online = list["backends"]
                .as_array()
                .map_or(0, |l| l.iter().filter(|b| b["state"] == "online").count());
            if online == backends || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        BigFarm {
            backends,
            configs,
            child,
            url,
            online: started.elapsed(),
            done: 0,
            _sims: sims,
            _dir: dir,
        }
    }

    /// The idle orchestrator's share of a core over `over`, and its
    /// resident memory (MB) at the end.
    fn idle_from(&self, cpu0: Duration, t0: Instant) -> (f64, f64) {
        let idle =
            (common::cpu_time(self.child.pid()) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        (idle, common::rss_kb(self.child.pid()) as f64 / 1024.0)
    }

    /// `jobs` submitted from 16 clients, then waited for to the last.
    async fn round(&mut self, jobs: usize) -> Round {
        let client = reqwest::Client::new();
        let start = Instant::now();
        let cpu_before = common::cpu_time(self.child.pid());
        let bench_before = common::cpu_time(std::process::id());
        let lat = submit_timed(&self.url, jobs, 16).await;
        let window_s = start.elapsed().as_secs_f64();
        let window_cores =
            (common::cpu_time(self.child.pid()) - cpu_before).as_secs_f64() / window_s;
        let queued = counts(&client, &self.url).await["queued"]
            .as_u64()
            .unwrap_or(0);
        self.wait_done(jobs).await;
        let total = start.elapsed().as_secs_f64();
        Round {
            lat,
            jobs_per_s: jobs as f64 / total,
            cpu_per_job_ms: (common::cpu_time(self.child.pid()) - cpu_before).as_secs_f64()
                * 1000.0
                / jobs as f64,
            bench_cpu_per_job_ms: (common::cpu_time(std::process::id()) - bench_before)
                .as_secs_f64()
                * 1000.0
                / jobs as f64,
            window_s,
            window_cores,
            leased_in_window: (jobs as u64).saturating_sub(queued),
        }
    }

    /// Memory while `queued` more jobs wait (submitted from 64 clients
    /// with every backend disabled, sampled for 20 s) and while the farm
    /// starts on them (20 s more).
    /// Waits until the orchestrator uses under a tenth of a core over a
    /// quarter of a second (at most 10 s).
    async fn quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = common::cpu_time(self.child.pid());
            tokio::time::sleep(Duration::from_millis(250)).await;
            let used = common::cpu_time(self.child.pid()) - before;
            if used < Duration::from_millis(25) || Instant::now() > deadline {
                return;
            }
        }
    }

    /// `disable` or `enable` every backend of the farm.
    async fn admin(&self, action: &'static str) {
        use futures::StreamExt;
        let client = reqwest::Client::new();
        futures::stream::iter(self.configs.iter().map(|b| {
            let (client, url) = (client.clone(), self.url.clone());
            async move {
                let r = client
                    .post(format!("{url}/api/backends/{}/{action}", b.id))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{action} {}: {}", b.id, r.status());
            }
        }))
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    }

    /// A round whose submissions no backend takes while they are made
    /// (every backend disabled, enabled again after the last answer): what
    /// a submission costs beside the farm's size alone, without the work
    /// of running the jobs it is given at the same time.
    async fn held_round(&mut self, jobs: usize) -> Vec<f64> {
        self.admin("disable").await;
        // Each worker hears of its backend's change and looks once more:
        // the submissions start after that has passed, as they would on a
        // farm disabled a while ago.
        self.quiet().await;
        let lat = submit_timed(&self.url, jobs, 16).await;
        self.admin("enable").await;
        self.wait_done(jobs).await;
        lat
    }

    /// Waits for the `jobs` just submitted to complete, after those before.
    async fn wait_done(&mut self, jobs: usize) {
        let client = reqwest::Client::new();
        self.done += jobs as u64;
        while counts(&client, &self.url).await["completed"]
            .as_u64()
            .unwrap_or(0)
            < self.done
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn queued(&mut self, queued: usize) {
        let (client, url, pid) = (reqwest::Client::new(), self.url.clone(), self.child.pid());
        // Queued means waiting: every backend is disabled while they are
        // submitted, so that they are all in the queue at once.
        self.admin("disable").await;
        let t = Instant::now();
        submit_timed(&url, queued, 64).await;
        let rate = queued as f64 / t.elapsed().as_secs_f64();
        // Resident memory at most over 20 s, and at their end.
        let sample = |client: reqwest::Client, url: String| async move {
            let mut peak = 0u64;
            for _ in 0..40 {
                peak = peak.max(common::rss_kb(pid));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let last = common::rss_kb(pid) as f64 / 1024.0;
            let queued = counts(&client, &url).await["queued"].as_u64().unwrap_or(0);
            (peak as f64 / 1024.0, last, queued)
        };
        let (peak, last, waiting) = sample(client.clone(), url.clone()).await;
        self.admin("enable").await;
        let (running_peak, running_last, left) = sample(client.clone(), url.clone()).await;
        println!(
            "  then {queued} more jobs submitted ({rate:.0}/s) with every backend disabled: RSS at most {peak:.0} MB over the next 20 s ({last:.0} MB at their end) with {waiting} queued; backends enabled again: at most {running_peak:.0} MB over 20 s while they run ({running_last:.0} MB at the end, {left} still queued)"
        );
    }
}

/// The large farm against the baseline of 8 (unless `--no-baseline`), both
/// up at once: what each idle farm costs (CPU over 20 s, `--settle` seconds
/// after all are online; resident memory), then `rounds` rounds of `jobs`
/// submissions from 16 clients to each in turn (which goes first
/// alternates), each waited for to the last job, then as many rounds with
/// every backend disabled during the submissions (a submission's cost
/// without the farm's work beside it), then the large farm's memory with
/// `queued` jobs waiting.
///
/// Why rounds in turn: this machine's speed drifts over minutes, and one
/// farm measured a minute after the other compared the two phases more
/// than the two farms (the same build gave 0.91x and 3.28x). Rounds in
/// turn see the same phases, and the p99 over all of a farm's rounds
/// rests on more than its ten slowest submissions.
async fn big_farms(
    machines: &tokio::runtime::Handle,
    backends: usize,
    baseline: bool,
    rounds: usize,
    jobs: usize,
    queued: usize,
) {
    if !std::path::Path::new(common::RELEASE_BIN).exists() {
        println!("large farm: build the release binary first (cargo build --release)");
        return;
    }
    let mut farms = Vec::new();
    if baseline {
        farms.push(BigFarm::start(machines, 8).await);
    }
    farms.push(BigFarm::start(machines, backends).await);
    // Let the first inventory reads, reconciles and records pass: the
    // steady idle state is what a farm lives in.
    tokio::time::sleep(Duration::from_secs(common::arg("--settle", 30))).await;
    let (t0, cpu0): (Instant, Vec<Duration>) = (
        Instant::now(),
        farms
            .iter()
            .map(|f| common::cpu_time(f.child.pid()))
            .collect(),
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    for (f, cpu0) in farms.iter().zip(cpu0) {
        let (idle, rss) = f.idle_from(cpu0, t0);
        println!(
            "farm of {} simulated backends (--job-ms 0) before the release binary (default settings): all online after {:.1} s; idle: {:.1}% of a core, RSS {rss:.0} MB",
            f.backends,
            f.online.as_secs_f64(),
            idle * 100.0,
        );
    }
    let mut all: Vec<Vec<Round>> = farms.iter().map(|_| Vec::new()).collect();
    let plain = if std::env::args().any(|a| a == "--held-only") {
        0
    } else {
        rounds
    };
    for r in 0..plain {
        let mut order: Vec<usize> = (0..farms.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let round = farms[i].round(jobs).await;
            println!(
                "  round {}, {} backends: {jobs} jobs from 16 clients: submit p50 {:.1} ms, p99 {:.1} ms; {:.0} jobs/s end to end, {:.2} ms of the orchestrator's CPU a job ({:.2} ms of the simulators' and clients'); while submitting ({:.2} s): the orchestrator used {:.2} cores, {} jobs left the queue",
                r + 1,
                farms[i].backends,
                quantile(&round.lat, 0.5),
                quantile(&round.lat, 0.99),
                round.jobs_per_s,
                round.cpu_per_job_ms,
                round.bench_cpu_per_job_ms,
                round.window_s,
                round.window_cores,
                round.leased_in_window
            );
            all[i].push(round);
        }
    }
    if plain > 0 {
        let mut p99s = Vec::new();
        for (f, rounds) in farms.iter().zip(&all) {
            let mut lat: Vec<f64> = rounds.iter().flat_map(|r| r.lat.iter().copied()).collect();
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let mean =
                |x: fn(&Round) -> f64| rounds.iter().map(x).sum::<f64>() / rounds.len() as f64;
            p99s.push(quantile(&lat, 0.99));
            println!(
            "{} backends, all {} submissions of {} rounds: submit p50 {:.1} ms, p99 {:.1} ms; {:.0} jobs/s, {:.2} ms of CPU a job ({:.2} ms of the simulators' and clients'; means of the rounds); while submitting, {:.2} cores in the orchestrator and {:.0} jobs out of the queue (means)",
            f.backends,
            lat.len(),
            rounds.len(),
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            mean(|r| r.jobs_per_s),
            mean(|r| r.cpu_per_job_ms),
            mean(|r| r.bench_cpu_per_job_ms),
            mean(|r| r.window_cores),
            mean(|r| r.leased_in_window as f64)
        );
        }
        // The same submissions as the server saw them (its own histogram of
        // request durations): what of the latency is the orchestrator's, and
        // what the clients' wait for the cores.
        for (f, rounds) in farms.iter().zip(&all) {
            let text = reqwest::get(format!("{}/metrics", f.url))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let value = |name: &str| {
                text.lines()
                    .find(|l| {
                        l.starts_with(name)
                            && l.contains("route=\"/api/job\"")
                            && l.contains("method=\"POST\"")
                            && l.contains("status=\"201\"")
                    })
                    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            let sum = value("orchestrator_http_request_duration_seconds_sum");
            let count = value("orchestrator_http_request_duration_seconds_count");
            let client: f64 = rounds.iter().flat_map(|r| r.lat.iter()).sum::<f64>()
                / rounds.iter().map(|r| r.lat.len()).sum::<usize>() as f64;
            println!(
            "{} backends: a submission took {:.2} ms on average in the server's own measure, {client:.2} ms at the clients",
            f.backends,
            sum * 1000.0 / count
        );
        }
        if let [base, big] = p99s[..] {
            let mut ratios: Vec<f64> = all[0]
                .iter()
                .zip(&all[1])
                .map(|(a, b)| quantile(&b.lat, 0.99) / quantile(&a.lat, 0.99))
                .collect();
            ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
            "submit p99, {backends} against 8 backends: {:.2}x over all rounds; round by round {}",
            big / base,
            ratios
                .iter()
                .map(|r| format!("{r:.2}x"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        }
    }
    // The same with the farms' work set aside: no backend takes a job
    // while the submissions are made (all disabled), in turn as above.
    if farms.len() == 2 {
        let mut held: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
        let mut ratios = Vec::new();
        for r in 0..rounds {
            let mut order = [0, 1];
            if r % 2 == 1 {
                order.reverse();
            }
            let mut p99 = [0.0; 2];
            for i in order {
                let lat = farms[i].held_round(jobs).await;
                p99[i] = quantile(&lat, 0.99);
                held[i].extend(lat);
            }
            ratios.push(p99[1] / p99[0]);
        }
        for lat in &mut held {
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        }
        ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "held rounds (every backend disabled while the {jobs} jobs are submitted, then enabled): submit p50 {:.1} / p99 {:.1} ms with 8 backends, {:.1} / {:.1} ms with {backends}: {:.2}x over all rounds; round by round {}",
            quantile(&held[0], 0.5),
            quantile(&held[0], 0.99),
            quantile(&held[1], 0.5),
            quantile(&held[1], 0.99),
            quantile(&held[1], 0.99) / quantile(&held[0], 0.99),
            ratios
                .iter()
                .map(|r| format!("{r:.2}x"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // The baseline stops before the large farm's memory is measured.
    let mut big = farms.pop().expect("the large farm");
    drop(farms);
    if queued > 0 {
        big.queued(queued).await;
    }
    big.child.kill().await;
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
    let jobs = common::arg("--jobs", 2000);
    let backends = common::arg("--backends", 2);
    let only_mixed = std::env::args().any(|a| a == "mixed");
    if std::env::args().any(|a| a == "big") {
        let n = common::arg("--big-backends", 1000);
        let queued = common::arg("--queued", 100_000);
        let machines = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let baseline = n != 8 && !std::env::args().any(|a| a == "--no-baseline");
        let rounds = common::arg("--rounds", 5).max(1);
        rt.block_on(big_farms(
            machines.handle(),
            n,
            baseline,
            rounds,
            1000,
            queued,
        ));
        return;
    }
    if std::env::args().any(|a| a == "shared") {
        rt.block_on(async {
            shared_farm(true).await;
            shared_farm(false).await;
        });
        return;
    }
    let mixed_jobs = common::arg("--mixed-jobs", 400);
    rt.block_on(async {
        mixed_models(true, mixed_jobs, 500, 3000).await;
        mixed_models(false, mixed_jobs, 500, 3000).await;
        if only_mixed {
            return;
        }
        shared_farm(true).await;
        shared_farm(false).await;
        simulators_alone(8, jobs).await;
        throughput(backends, jobs).await;
        if backends != 8 {
            throughput(8, jobs).await;
        }
        dispatch_latency(200).await;
        idle_gap(1, 200, 20).await;
        idle_gap(2, 200, 20).await;
    });
}
