//! Live events: how many subscribers one orchestrator serves while jobs run,
//! and the latency from a backend's message (`execution_start`) to each
//! subscriber (`running` event), with everything on one machine.
//!
//! Run: `cargo bench --bench events` (add `-- --subscribers 1000 --jobs 300`,
//! or `-- --dashboards-beside`).

mod common;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::quantile;
use orchestrator::config::Config;
use orchestrator::server::Service;
use serde_json::{json, Value};

/// When a subscriber got each job's `running` event: when its bytes
/// reached the subscriber's socket (the kernel's receive time, what a
/// dashboard on another machine would see them arrive at) and when the
/// subscriber read them (on this machine's shared cores).
#[derive(Default)]
struct Arrivals {
    at_socket: HashMap<String, SystemTime>,
    read: HashMap<String, Instant>,
}

type Seen = Arc<Mutex<Arrivals>>;

/// One `recvmsg` into `buf`, with the kernel's receive time of the last
/// bytes it returns (`SO_TIMESTAMPNS`); `WouldBlock` when there is nothing.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<SystemTime>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes `buf` and `control`, both alive and writable.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// One subscriber, as lean as a dashboard on another machine would be to
/// the orchestrator: a plain TCP connection whose bytes are scanned for the
/// `running` events' job ids (chunk-size lines and the response head hold no
/// `"job_id":"`), nothing else decoded, so the client's own cost on these
/// shared two cores hides as little as it can of the server's. The kernel
/// stamps each read with when its last bytes arrived: an event read
/// together with a later one gets the later one's time (never earlier than
/// it was).
async fn subscriber(addr: std::net::SocketAddr, seen: Seen, ready: Arc<tokio::sync::Barrier>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of_val(&on) as _,
        )
    };
    assert_eq!(rc, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
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
    let fd = conn.as_raw_fd();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if conn.readable().await.is_err() {
            return;
        }
        let (n, stamp) = match conn.try_io(Interest::READABLE, || recv_stamped(fd, &mut chunk)) {
            Ok((0, _)) => return,
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let now = Instant::now();
        let stamp = stamp.unwrap_or_else(SystemTime::now);
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(2).rposition(|w| w == b"\n\n") else {
            continue;
        };
        let mut seen = seen.lock().unwrap();
        for line in buf[..end].split(|b| *b == b'\n') {
            if let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) {
                let id = &line[at + KEY.len()..];
                let id = &id[..id.iter().position(|b| *b == b'"').unwrap_or(id.len())];
                let id = String::from_utf8_lossy(id).into_owned();
                seen.at_socket.entry(id.clone()).or_insert(stamp);
                seen.read.entry(id).or_insert(now);
            }
        }
        drop(seen);
        buf.drain(..end + 2);
    }
}

/// The threads the bench's other machines run on.
struct Machines<'a> {
    /// The simulated backends (GPU boxes).
    backends: &'a tokio::runtime::Handle,
    /// The subscribers (dashboards).
    dashboards: &'a tokio::runtime::Handle,
    /// Whether the dashboards' threads compete with the server's for the
    /// cores (`--dashboards-beside`), rather than take only what it leaves.
    beside: bool,
}

/// CPU time (user + system) this process's threads have used, by thread
/// name, from /proc.
fn cpu_by_thread() -> HashMap<String, Duration> {
    let mut by = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        *by.entry(stat[open + 1..close].to_string()).or_default() += common::stat_cpu(&stat);
    }
    by
}

/// The CPU of the threads whose name `keep` takes, in [`cpu_by_thread`].
fn cpu_of(by: &HashMap<String, Duration>, keep: impl Fn(&str) -> bool) -> Duration {
    by.iter()
        .filter(|(name, _)| keep(name))
        .map(|(_, t)| *t)
        .sum()
}

/// The service's threads: its runtime (which also runs this bench's few
/// submissions), its writer and SQLite's threads; not the bench's own.
fn is_service(thread: &str) -> bool {
    !thread.starts_with("bench-") && !thread.starts_with("events")
}

/// What one scenario measured, for comparing sizes.
struct Outcome {
    /// The service's CPU from the first submission to the last event seen.
    service_cpu: Duration,
    /// The data folder, removed only when the bench ends: on a file system
    /// without a journal, creating files within seconds of removing many
    /// makes ext4 skip the freed inodes one by one (`recently_deleted`),
    /// which the next scenario's output folders would pay for.
    _dir: tempfile::TempDir,
}

async fn scenario(machines: &Machines<'_>, subscribers: usize, jobs: usize) -> Outcome {
    let beside = machines.beside;
    let dir = tempfile::tempdir().unwrap();
    // The backends too are other machines: they run beside the subscribers.
    let (sims, backends) = machines
        .backends
        .spawn(common::sims(2, 50, 2))
        .await
        .unwrap();
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
        tasks.push(
            machines
                .dashboards
                .spawn(subscriber(addr, seen, ready.clone())),
        );
    }
    ready.wait().await;
    let client = reqwest::Client::new();
    let cpu0 = cpu_by_thread();
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
    while seen_by.iter().any(|s| s.lock().unwrap().read.len() < jobs) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    let cpu1 = cpu_by_thread();
    let service_cpu = cpu_of(&cpu1, is_service).saturating_sub(cpu_of(&cpu0, is_service));
    let is_dashboard = |thread: &str| thread.starts_with("bench-dashboard");
    let dashboards_cpu = cpu_of(&cpu1, is_dashboard).saturating_sub(cpu_of(&cpu0, is_dashboard));
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
    // Per job and subscriber, from the backend's message: the event's
    // arrival at the subscriber's socket, and its read there.
    let mut arrivals = Vec::new();
    let mut reads = Vec::new();
    // Per job: the first arrival, and how long the fan-out to the last
    // subscriber's socket took after it.
    let mut firsts = Vec::new();
    let mut spreads = Vec::new();
    let ms = |d: chrono::Duration| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    for id in &ids {
        let job = store.job(id).await.unwrap().unwrap();
        let Some(t0) = job.prompt_id.as_ref().and_then(|p| started.get(p)) else {
            continue;
        };
        let t0 = wall(*t0);
        let events = store.job_events(id).await.unwrap();
        if let Some(ev) = events.iter().find(|e| e.kind == "running") {
            to_log.push(ms(ev.at - t0));
        }
        let mut job_arrivals = Vec::new();
        for s in &seen_by {
            let s = s.lock().unwrap();
            if let Some(t) = s.at_socket.get(id) {
                job_arrivals.push(ms(chrono::DateTime::<chrono::Utc>::from(*t) - t0));
            }
            if let Some(t) = s.read.get(id) {
                reads.push(ms(wall(*t) - t0));
            }
        }
        let first = job_arrivals.iter().copied().fold(f64::INFINITY, f64::min);
        let last = job_arrivals
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if first.is_finite() {
            firsts.push(first);
            spreads.push(last - first);
        }
        arrivals.extend(job_arrivals);
    }
    // Each list sorted once, then read at any quantile.
    for v in [
        &mut firsts,
        &mut spreads,
        &mut arrivals,
        &mut reads,
        &mut to_log,
    ] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let complete = seen_by
        .iter()
        .filter(|s| s.lock().unwrap().read.len() >= jobs)
        .count();
    println!(
        "{subscribers} SSE subscribers, {jobs} jobs on 2 simulated backends (--job-ms 50): {complete}/{subscribers} subscribers saw every job; jobs ran at {:.0}/s\n  \
         backend execution_start -> `running` at the subscriber's socket: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n  \
         per job: in the log after p50 {:.1} ms, p99 {:.1} ms; at the first subscriber p50 {:.1} ms, p99 {:.1} ms; fan-out to the last one took p50 {:.1} ms, p99 {:.1} ms more\n  \
         read by the subscriber (its threads {}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        jobs as f64 / elapsed.as_secs_f64(),
        quantile(&arrivals, 0.5),
        quantile(&arrivals, 0.99),
        arrivals.last().copied().unwrap_or(f64::NAN),
        quantile(&to_log, 0.5),
        quantile(&to_log, 0.99),
        quantile(&firsts, 0.5),
        quantile(&firsts, 0.99),
        quantile(&spreads, 0.5),
        quantile(&spreads, 0.99),
        if beside { "beside the server's" } else { "on idle priority" },
        quantile(&reads, 0.5),
        quantile(&reads, 0.99),
        reads.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "  CPU from the first submission to the last event seen: the service {:.2} s, the dashboards {:.2} s",
        service_cpu.as_secs_f64(),
        dashboards_cpu.as_secs_f64()
    );
    for t in tasks {
        t.abort();
    }
    let _ = stop.send(());
    let _ = server.await;
    Outcome {
        service_cpu,
        _dir: dir,
    }
}

fn main() {
    // A thousand simulated backends or subscribers hold thousands of
    // sockets in this process: past the 1,024 a login shell allows.
    orchestrator::open_files::raise();
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
    println!("machine: {}", common::machine());
    let jobs = common::arg("--jobs", 200);
    let max = common::arg("--subscribers", 1000);
    // The subscribers stand for dashboards on other machines, and the
    // simulated backends for GPU boxes: they run on threads of their own,
    // so the operating system shares the cores between them and the
    // service as it would between processes, instead of queueing the
    // service's own tasks behind theirs. The dashboards' threads take
    // only the CPU the rest leaves (`SCHED_IDLE`), as if they had cores
    // of their own; their latency is when an event's bytes reached their
    // socket (the kernel's receive time). `--dashboards-beside` runs them
    // at the server's priority instead (the set-up of earlier figures).
    let beside = std::env::args().any(|a| a == "--dashboards-beside");
    let backends = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-backends")
        .enable_all()
        .build()
        .unwrap();
    let dashboards = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-dashboards")
        .on_thread_start(move || {
            if !beside {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: this thread's own policy; a plain struct.
                let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                assert_eq!(rc, 0, "SCHED_IDLE: {}", std::io::Error::last_os_error());
            }
        })
        .enable_all()
        .build()
        .unwrap();
    let machines = Machines {
        backends: backends.handle(),
        dashboards: dashboards.handle(),
        beside,
    };
    rt.block_on(async {
        let mut outcomes = Vec::new();
        for n in [1, 100, max] {
            outcomes.push((n, scenario(&machines, n, jobs).await));
        }
        // What each subscriber adds: the service's CPU over the one-subscriber
        // run's, at the largest size only (the one-subscriber run's own
        // swing, a few tenths of a second, drowns the hundred's difference).
        let base = outcomes[0].1.service_cpu;
        if let Some((n, o)) = outcomes.last().filter(|(n, _)| *n > 1) {
            let per = o.service_cpu.saturating_sub(base).as_secs_f64() / (jobs * (n - 1)) as f64;
            println!(
                "the service's CPU for each `running` event and subscriber past the first, at {n}: {:.1} us",
                per * 1e6
            );
        }
    });
}
