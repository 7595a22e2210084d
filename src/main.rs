//! The `orchestrator` binary: parses the command line and runs a subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use orchestrator::config::Config;

/// Durable job queue and render-farm manager in front of ComfyUI servers.
#[derive(Parser)]
#[command(name = "orchestrator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (HTTP API on 127.0.0.1:9800 by default).
    Serve(ServeArgs),
    /// Run a simulated ComfyUI server (for trying the orchestrator without a
    /// GPU, and its failures: see docs/operations.md, "Trying the failures").
    Simulate(SimulateArgs),
    /// Submit a job: a manifest file, or --workflow ID with --param name=value.
    Submit {
        /// Manifest file (the JSON of POST /api/job), or a graph saved from ComfyUI with "Save (API)" (run as it is).
        file: Option<PathBuf>,
        /// Workflow template id (instead of, or on top of, the file).
        #[arg(long)]
        workflow: Option<String>,
        /// A parameter, name=value (repeat); values parse as JSON when they can.
        #[arg(long = "param", short = 'p')]
        params: Vec<String>,
        /// A metadata field, key=value (repeat).
        #[arg(long = "meta", short = 'm')]
        meta: Vec<String>,
        /// Priority (higher runs first).
        #[arg(long)]
        priority: Option<i64>,
        /// Store it paused: it keeps its place in the queue, and runs once
        /// resumed (`orchestrator resume ID`).
        #[arg(long)]
        paused: bool,
        /// No backend takes it before this time (RFC 3339, e.g.
        /// 2026-12-07T20:00:00Z): a batch submitted by day starts at night.
        #[arg(long, value_name = "TIME")]
        start_after: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show one job.
    Status {
        /// Job id.
        id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// The history, newest first, as a table.
    Jobs {
        /// Only these statuses (repeat or comma-separate).
        #[arg(long)]
        status: Vec<String>,
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only this backend.
        #[arg(long)]
        backend: Option<String>,
        /// Only jobs whose metadata has key=value (repeat).
        #[arg(long = "meta", short = 'm')]
        meta: Vec<String>,
        /// Only paused jobs.
        #[arg(long)]
        paused: bool,
        /// How many (with `--ids`, how many a request: all are printed).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print only the ids of every matching job, one a line (all of
        /// them, not a page): `orchestrator jobs --ids --status failed -m
        /// batch=night1 | orchestrator retry -`.
        #[arg(long)]
        ids: bool,
        /// Print how many jobs match, by status (all of them, not a page):
        /// how far a batch got, `orchestrator jobs --count -m batch=night1`.
        #[arg(long, conflicts_with = "ids")]
        count: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Live progress bars until the jobs end (default: all queued or running);
    /// without a terminal, a line per change. Fails if a job does not complete.
    Watch {
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Fetch completed jobs' outputs into a folder, one folder a job (its
    /// id, or `--by shot`): `orchestrator jobs --ids --status completed -m
    /// batch=night1 | orchestrator outputs - --to renders`. Each file is
    /// checked against its recorded SHA-256; run again, it fetches only what
    /// is missing.
    Outputs {
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        #[arg(required = true)]
        ids: Vec<String>,
        /// The folder to write into (made when missing).
        #[arg(long, default_value = ".")]
        to: PathBuf,
        /// Name each job's folder by this metadata field (`shot`), not by
        /// the job's id (a job without it: its id).
        #[arg(long, value_name = "FIELD")]
        by: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel jobs.
    Cancel {
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Queue failed or cancelled jobs again.
    Retry {
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Give jobs that have not ended a new priority (higher runs first,
    /// -1000 to 1000): a queued job moves in the queue at once.
    Priority {
        /// The new priority.
        #[arg(allow_negative_numbers = true)]
        priority: i64,
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Give jobs that have not started a new start time (RFC 3339, as
    /// `submit --start-after`), or `now` to let them start in their turn.
    Schedule {
        /// When they may start: `2026-12-07T22:00:00Z`, or `now`.
        start_after: String,
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Pause jobs that have not started: they keep their place in the
    /// queue, and no backend takes them until they are resumed.
    Pause {
        /// Also pause jobs a backend runs: each is stopped there (its run is
        /// lost) and waits in the queue in its place, paused.
        #[arg(long)]
        interrupt: bool,
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Resume paused jobs: they run in their turn.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["batch", "ids"])))]
    Resume {
        /// Resume a whole batch instead (jobs whose metadata
        /// `dispatch.batch_field`, `batch` by default, is this): each of its
        /// paused jobs, and the farm no longer holds it if it found it broken.
        #[arg(long, conflicts_with = "ids")]
        batch: Option<String>,
        /// Job ids; `-` reads them from standard input (`jobs --ids`).
        ids: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// The ComfyUI backends and their state.
    Backends {
        /// Read this backend's inventory (node classes, model files) again
        /// now, e.g. after copying a model to it, and print it.
        #[arg(long, value_name = "ID")]
        refresh: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Write a consistent copy of the database to FILE (safe while the service runs).
    Backup {
        /// Where to write the copy; must not exist yet.
        file: PathBuf,
        /// Config file whose data_dir holds the database.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data folder (overrides the config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// The simulated ComfyUI's behaviour.
#[derive(clap::Args)]
struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (ComfyUI's usual port is 8188).
    #[arg(long, default_value_t = 8188)]
    port: u16,
    /// Time each prompt takes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    job_ms: u64,
    /// Chance (0 to 1) that a prompt fails at run time.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Chance (0 to 1) that a prompt crashes the server once it runs; it
    /// comes back empty after --crash-down-ms.
    #[arg(long, default_value_t = 0.0)]
    crash_rate: f64,
    /// Checkpoint files the simulated server has (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sd_xl_base_1.0.safetensors"
    )]
    checkpoints: Vec<String>,
    /// The ComfyUI version it reports; "" reports none (older than 0.3.44
    /// also ignores the orchestrator's prompt ids).
    #[arg(long, default_value = "0.3.64")]
    version: String,
    /// Queue (and answer) a submit only after this long, even when the
    /// client gave up waiting.
    #[arg(long, default_value_t = 0)]
    accept_delay_ms: u64,
    /// How long a crash (a node titled sim:crash, or POST /_sim/crash)
    /// keeps it down before it comes back empty.
    #[arg(long, default_value_t = 3000)]
    crash_down_ms: u64,
    /// Lose the first N interrupts aimed at a running prompt.
    #[arg(long, default_value_t = 0)]
    ignore_interrupts: u32,
    /// Stall each output download mid-way for this long.
    #[arg(long, default_value_t = 0)]
    view_stall_ms: u64,
    /// Largest submit body it takes (ComfyUI's --max-upload-size); a larger one is a 413.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    max_body_bytes: usize,
    /// A proxy in front of it refuses uploads larger than this with its own
    /// 413, the server unaware (0: no proxy).
    #[arg(long, default_value_t = 0)]
    proxy_max_body_bytes: usize,
    /// Extra time a prompt takes when its checkpoint differs from the last
    /// prompt's (loading a model onto the GPU).
    #[arg(long, default_value_t = 0)]
    load_ms: u64,
    /// Answer `GET /queue` only after this long (a box too busy to answer
    /// its health checks quickly).
    #[arg(long, default_value_t = 0)]
    queue_delay_ms: u64,
}

/// How the client commands reach a running orchestrator.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The orchestrator's URL.
    #[arg(
        long,
        env = "ORCHESTRATOR_URL",
        default_value = "http://127.0.0.1:9800"
    )]
    url: String,
    /// Access token, when the server has `auth.token` set.
    #[arg(long, env = "ORCHESTRATOR_TOKEN")]
    token: Option<String>,
    /// Print JSON for scripts instead of text.
    #[arg(long)]
    json: bool,
}

impl RemoteArgs {
    fn remote(self) -> orchestrator::cli::Remote {
        orchestrator::cli::Remote {
            url: self.url,
            token: self.token,
            json: self.json,
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// YAML config file (see config.example.yaml); without it, built-in defaults.
    #[arg(long, env = "ORCHESTRATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the config's `host`).
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one (overrides the config's `port`).
    #[arg(long)]
    port: Option<u16>,
    /// Folder for the database, outputs and lock file (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also start two simulated ComfyUI backends in this process and use
    /// them, so the whole loop runs on a machine with no GPU.
    #[arg(long)]
    demo: bool,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = load_config(args.config.as_ref())?;
    if let Some(h) = args.host {
        config.host = h;
    }
    if let Some(p) = args.port {
        config.port = p;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    let _guard = orchestrator::server::init_logging(&config)?;
    let mut demo_backends = Vec::new();
    if args.demo {
        for id in ["demo1", "demo2"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = listener.local_addr()?.port();
            demo_backends.push(orchestrator::simulator::spawn(
                listener,
                orchestrator::simulator::SimConfig {
                    job_ms: 1500,
                    ..Default::default()
                },
            ));
            config.backends.push(orchestrator::config::BackendConfig {
                id: id.into(),
                name: Some(format!("simulated ComfyUI ({id})")),
                host: "127.0.0.1".into(),
                port,
                enabled: true,
                tags: vec![],
                max_inflight: 2,
                url: None,
                headers: Default::default(),
                hours: None,
            });
            println!("demo backend {id}: simulated ComfyUI on http://127.0.0.1:{port}");
        }
    }
    config.validate()?;
    orchestrator::open_files::raise_for(config.backends.len());
    let service = orchestrator::server::Service::start(config.clone()).await?;
    let addr: SocketAddr = tokio::net::lookup_host((config.host.as_str(), config.port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve host `{}`", config.host))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    // Before the line that says it runs: a stop sent once it is read is
    // a graceful one.
    let shutdown = orchestrator::server::shutdown_signal();
    // Scripts and tests read this line to find the port.
    println!("orchestrator listening on http://{local}");
    tracing::info!(%local, data_dir = %config.data_dir.display(), "orchestrator listening");
    service.serve(listener, shutdown).await
}

async fn backup(
    file: PathBuf,
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = load_config(config.as_ref())?;
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    if file.exists() {
        anyhow::bail!("{} exists already; choose a new file", file.display());
    }
    let db = config.database_path();
    if !db.exists() {
        anyhow::bail!("no database at {}", db.display());
    }
    orchestrator::store::backup_file(&db, &file).await?;
    println!("backup of {} written to {}", db.display(), file.display());
    Ok(())
}

async fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.fail_rate) {
        anyhow::bail!("--fail-rate must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&a.crash_rate) {
        anyhow::bail!("--crash-rate must be between 0 and 1");
    }
    let _guard = orchestrator::server::init_logging(&Config::default())?;
    let (host, port) = (a.host.as_str(), a.port);
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
    let local = listener.local_addr()?;
    let shutdown = orchestrator::server::shutdown_signal();
    println!(
        "simulated ComfyUI {} listening on http://{local}",
        if a.version.is_empty() {
            "(no version)"
        } else {
            &a.version
        }
    );
    let config = orchestrator::simulator::SimConfig {
        job_ms: a.job_ms,
        fail_rate: a.fail_rate,
        crash_rate: a.crash_rate,
        checkpoints: a.checkpoints,
        version: a.version,
        accept_delay_ms: a.accept_delay_ms,
        crash_down_ms: a.crash_down_ms,
        ignore_interrupts: a.ignore_interrupts,
        view_stall_ms: a.view_stall_ms,
        max_body_bytes: a.max_body_bytes,
        proxy_max_body_bytes: a.proxy_max_body_bytes,
        load_ms: a.load_ms,
        queue_delay_ms: a.queue_delay_ms,
        ..Default::default()
    };
    orchestrator::simulator::serve(listener, config, shutdown).await;
    Ok(())
}

fn main() -> ExitCode {
    orchestrator::memory::tune();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Simulate(_)) {
        orchestrator::cli::end_quietly_when_the_reader_goes();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Backup {
                file,
                config,
                data_dir,
            } => backup(file, config, data_dir).await,
            Command::Simulate(args) => simulate(args).await,
            Command::Submit {
                file,
                workflow,
                params,
                meta,
                priority,
                paused,
                start_after,
                remote,
            } => {
                let args = orchestrator::cli::SubmitArgs {
                    file,
                    workflow,
                    params,
                    meta,
                    priority,
                    paused,
                    start_after,
                };
                orchestrator::cli::submit(&remote.remote(), args).await
            }
            Command::Status { id, remote } => {
                orchestrator::cli::status(&remote.remote(), &id).await
            }
            Command::Jobs {
                status,
                workflow,
                backend,
                meta,
                paused,
                limit,
                ids,
                count,
                remote,
            } => {
                let args = orchestrator::cli::JobsArgs {
                    status,
                    workflow,
                    backend,
                    meta,
                    paused,
                    limit,
                    ids_only: ids,
                    count,
                };
                orchestrator::cli::jobs(&remote.remote(), args).await
            }
            Command::Watch { ids, remote } => {
                let piped = ids.len() == 1 && ids[0] == "-";
                let ids = orchestrator::cli::job_ids(ids)?;
                if piped && ids.is_empty() {
                    // An empty batch, not "everything queued or running".
                    println!("nothing to watch");
                    Ok(())
                } else {
                    orchestrator::cli::watch(&remote.remote(), ids).await
                }
            }
            Command::Outputs {
                ids,
                to,
                by,
                remote,
            } => {
                let ids = orchestrator::cli::job_ids(ids)?;
                let args = orchestrator::cli::OutputsArgs { to, by };
                orchestrator::cli::outputs(&remote.remote(), &ids, &args).await
            }
            Command::Cancel { ids, remote } => {
                let ids = orchestrator::cli::job_ids(ids)?;
                orchestrator::cli::job_action(&remote.remote(), &ids, "cancel").await
            }
            Command::Retry { ids, remote } => {
                let ids = orchestrator::cli::job_ids(ids)?;
                orchestrator::cli::job_action(&remote.remote(), &ids, "retry").await
            }
            Command::Priority {
                priority,
                ids,
                remote,
            } => {
                let ids = orchestrator::cli::job_ids(ids)?;
                orchestrator::cli::set_priority(&remote.remote(), &ids, priority).await
            }
            Command::Schedule {
                start_after,
                ids,
                remote,
            } => {
                let ids = orchestrator::cli::job_ids(ids)?;
                orchestrator::cli::schedule(&remote.remote(), &ids, &start_after).await
            }
            Command::Pause {
                interrupt,
                ids,
                remote,
            } => {
                let ids = orchestrator::cli::job_ids(ids)?;
                orchestrator::cli::set_paused(&remote.remote(), &ids, "pause", interrupt).await
            }
            Command::Resume { batch, ids, remote } => match batch {
                Some(batch) => orchestrator::cli::resume_batch(&remote.remote(), &batch).await,
                None => {
                    let ids = orchestrator::cli::job_ids(ids)?;
                    orchestrator::cli::set_paused(&remote.remote(), &ids, "resume", false).await
                }
            },
            Command::Backends { refresh, remote } => match refresh {
                Some(id) => orchestrator::cli::refresh_backend(&remote.remote(), &id).await,
                None => orchestrator::cli::backends(&remote.remote()).await,
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
