//! Typed settings, loaded once at start-up and validated there.
//!
//! Why a module of its own: a farm runs unattended overnight, so a typo in
//! `config.yaml` must stop start-up with a message that names the key, not
//! surface hours later as a job that never runs. Every key has a default, so
//! the service runs with no file at all (listen on loopback, data in `./data`,
//! no backends). A `config.yaml` written for the earlier Python server
//! (`data_dir`, `log_dir`, `backends: [{id, name, host, port, enabled}]`)
//! loads unchanged.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod hours;
mod receivers;
mod validate;
pub use hours::Hours;
pub use receivers::{AlertsConfig, WebhookConfig};

/// Everything the service can be told. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on. Loopback by default: a shared network needs a
    /// deliberate choice.
    pub host: String,
    /// HTTP port of the API.
    pub port: u16,
    /// Where the database, outputs and lock file live.
    pub data_dir: PathBuf,
    /// When set, logs are also written to a daily file in this folder.
    pub log_dir: Option<PathBuf>,
    /// Folder of user workflow templates, added to the built-in ones.
    pub workflows_dir: PathBuf,
    /// Inbox folder for manifest files; default `<data_dir>/inbox`.
    pub inbox_dir: Option<PathBuf>,
    /// Inbox behaviour.
    pub inbox: InboxConfig,
    /// Base URL of this service as clients reach it (for output URLs in
    /// webhooks); default `http://HOST:PORT`.
    pub public_url: Option<String>,
    /// Webhook delivery.
    pub webhooks: WebhookConfig,
    /// Alerts to the people looking after the farm.
    pub alerts: AlertsConfig,
    /// Access control.
    pub auth: AuthConfig,
    /// Cross-origin requests from browser tools.
    pub cors: CorsConfig,
    /// Request limits.
    pub limits: Limits,
    /// SQLite settings.
    pub database: DatabaseConfig,
    /// Scheduling and leasing.
    pub dispatch: DispatchConfig,
    /// Backend health polling.
    pub monitor: MonitorConfig,
    /// What the data folder keeps, and for how long.
    pub retention: RetentionConfig,
    /// Reading and using what each backend can run.
    pub inventory: InventoryConfig,
    /// Bounded time for a graceful stop, in seconds.
    pub shutdown_timeout_s: u64,
    /// The ComfyUI servers of the farm.
    pub backends: Vec<BackendConfig>,
}

/// Backends' inventories (`/object_info`, model folders).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    /// Read each backend's inventory again this often, seconds (it is also
    /// read when the backend first answers, when its version changes, when
    /// it comes back online, and on `POST /api/backends/{id}/refresh`).
    pub refresh_interval_s: u64,
    /// Node classes (`MyLoader`) or inputs (`MyLoader.file`) that validate
    /// their values themselves, as ComfyUI's `VALIDATE_INPUTS` does: their
    /// option lists are not checked, so a custom node is never refused wrongly.
    pub exempt: Vec<String>,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            refresh_interval_s: 600,
            exempt: Vec::new(),
        }
    }
}

/// What the data folder keeps: each rule is off (`null`) or a number of days.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete the collected output files of jobs that ended more than this
    /// many days ago (the jobs, their history and output records stay).
    pub outputs_days: Option<u32>,
    /// Delete input files that no unfinished job uses and that no
    /// submission named for this many days.
    pub inputs_days: Option<u32>,
    /// Keep this many days of log files in `log_dir` (one file a day,
    /// today's included): a farm that runs for months piles them up.
    pub logs_days: Option<u32>,
    /// Delete progress events older than this many days (state changes stay).
    pub progress_days: Option<u32>,
    /// How often the sweeper runs (and measures the data folder), seconds.
    pub sweep_interval_s: u64,
    /// `GET /api/health` warns when the data folder's disk has less free,
    /// and a `disk_low` event (and alert) says so.
    pub low_space_bytes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            outputs_days: None,
            inputs_days: None,
            progress_days: None,
            logs_days: None,
            sweep_interval_s: 3_600,
            low_space_bytes: 5 * 1024 * 1024 * 1024,
        }
    }
}

/// Access control for shared networks.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When set, every route but `/api/health` needs this token (bearer
    /// header, or the dashboard's login cookie).
    pub token: Option<String>,
}

/// Cross-origin requests (off by default).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the API from a browser, like `http://storyboard.local:3000`.
    pub origins: Vec<String>,
}

/// The inbox folder.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    /// Watch the inbox at all.
    pub enabled: bool,
    /// A file is read once its size and time have not changed for this long.
    pub settle_ms: u64,
    /// Safety-net rescan for shares that send no file events.
    pub rescan_interval_ms: u64,
    /// How long a file that starts from a job named by its idempotency key
    /// (`job:key:`) waits in the inbox for that job when none has the key
    /// yet (the files of one drop come in any order), counted from the
    /// file's modification time; then it is rejected with the error.
    pub key_wait_s: u64,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            enabled: true,
            settle_ms: 500,
            rescan_interval_ms: 2_000,
            key_wait_s: 600,
        }
    }
}

/// Limits on what a client may send.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted, in bytes (`413` above it).
    pub max_body_bytes: usize,
    /// Largest JSON answer read from a backend (`/history`, `/object_info`);
    /// a larger one is an error for that backend, never memory growth.
    pub max_backend_reply_bytes: u64,
    /// Largest output file downloaded from a backend.
    pub max_output_bytes: u64,
    /// Largest input file (`POST /api/inputs`, a file part of a submission).
    pub max_input_bytes: u64,
}

/// How SQLite commits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `full` (default) makes every acknowledged submission survive a power
    /// loss; `normal` survives a crash of the process but not of the machine.
    pub synchronous: Synchronous,
    /// Read connections in the pool (writes use one connection of their own).
    pub read_connections: u32,
    /// Most submissions or other writes committed together in one transaction.
    pub max_batch: usize,
}

/// SQLite `synchronous` levels we allow; `off` would break the promise of a `2xx`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync the WAL at every commit.
    Full,
    /// fsync at checkpoints only.
    Normal,
}

/// Leasing and retries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Default `max_attempts` of a job whose manifest does not say.
    pub default_max_attempts: u32,
    /// First retry delay after a run-time failure; doubles per attempt.
    pub retry_backoff_ms: u64,
    /// Cap of the retry delay.
    pub retry_backoff_max_ms: u64,
    /// Safety-net poll for queued jobs when no wake-up arrives.
    pub poll_interval_ms: u64,
    /// How long a backend may stop answering before its jobs are taken back.
    pub backend_grace_s: u64,
    /// Longest wait for a backend to confirm a cancel.
    pub cancel_timeout_s: u64,
    /// Timeout of every HTTP call to a backend.
    pub request_timeout_ms: u64,
    /// A job whose runs its backends lost this many times after they had
    /// started (the backend died under it) fails: it may be what kills them.
    /// Unless they were all lost by one backend and another may run it:
    /// that one is then barred from it, and the other has its turn.
    pub max_lost_runs: u32,
    /// A backend whose jobs failed this many times in a row, each a job that
    /// another backend then completed, is sick (a broken driver, a full
    /// disk, a bad custom node): it takes no jobs for `quarantine_s`. 0: never.
    pub quarantine_after: u32,
    /// How long a sick backend is left out (an operator's enable ends it sooner).
    pub quarantine_s: u64,
    /// Longest a run may take on a backend, in seconds, for a job whose
    /// manifest and template do not say (`timeout_s`).
    pub job_timeout_s: u64,
    /// Interval of the pings on each backend's WebSocket; one unanswered
    /// for twice this long marks the backend down.
    pub heartbeat_ms: u64,
    /// How long a silent socket is trusted: after a new connection (until
    /// ComfyUI confirms it is the registered one) and after an accepted
    /// submit (until a `status` broadcast follows). Past it, reconnect.
    pub deaf_after_ms: u64,
    /// A free backend prefers, among jobs of the same priority, one that
    /// uses the checkpoint it ran last (loading one costs 5 to 30 s).
    pub model_affinity: bool,
    /// ... but never holds back the best job longer than this since it was
    /// submitted, seconds: nothing starves.
    pub affinity_max_wait_s: u64,
    /// Shares the farm between groups of jobs: the metadata field that
    /// names a job's group (`batch`, `artist`). Among the jobs of the
    /// highest priority, a free backend takes the next one of the group
    /// with the fewest jobs on the farm, so a batch submitted second does
    /// not wait behind the whole of the first (jobs without the field are
    /// a group of their own). Unset: priority, then age.
    pub share_by: Option<String>,
    /// The metadata field that names a job's batch (`batch`, as in
    /// `-m batch=night1`), for [`DispatchConfig::pause_batch_after`].
    pub batch_field: String,
    /// A batch broken in itself (a wrong setting, a node that raises on
    /// every shot) would spend the night failing each of its jobs, every
    /// attempt, while the batches behind it wait. Once this many of its
    /// jobs in a row failed an attempt with the same cause, on more than
    /// one backend (while more than one takes jobs), and none of the batch
    /// completed between them, its jobs not started are paused, each with
    /// an event saying why. 0 turns it off.
    pub pause_batch_after: u32,
}

/// Backend health polling.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Interval between two `/system_stats` polls of a backend.
    pub poll_interval_ms: u64,
}

/// One ComfyUI server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Stable id, used in the API, the database and logs.
    pub id: String,
    /// Display name; defaults to the id.
    #[serde(default)]
    pub name: Option<String>,
    /// Host name or address of the ComfyUI server.
    #[serde(default)]
    pub host: String,
    /// Port of the ComfyUI server.
    #[serde(default = "default_comfy_port")]
    pub port: u16,
    /// The server's address as a URL, in place of `host` and `port`: for a
    /// ComfyUI behind a reverse proxy, over TLS or under a path (a rented
    /// cloud GPU: `https://gpu7.example.com/comfyui`). Its WebSocket is the
    /// same address as `ws://` or `wss://`.
    #[serde(default)]
    pub url: Option<String>,
    /// Headers sent with every request to it, its WebSocket's included: a
    /// proxy's `Authorization`, an API key. Never shown by the API.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// A disabled backend gets no jobs; the API can change this later.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Capabilities that jobs may require (`requires` in the manifest).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Prompts held at once: one running, the rest waiting in ComfyUI's own
    /// queue so the GPU never idles between jobs.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u32,
    /// When it takes the farm's jobs, in the orchestrator's local time
    /// (`20:00-08:00`: a workstation at night; `Mon-Fri 20:00-08:00,
    /// Sat-Sun`: and at weekends); outside them it takes no new jobs.
    /// Unset: at any time.
    #[serde(default)]
    pub hours: Option<String>,
}

impl BackendConfig {
    /// Its hours, read (checked by [`Config::validate`]: a bad window
    /// never gets this far; one that did would mean any time).
    pub fn hours(&self) -> Option<Hours> {
        self.hours.as_deref().and_then(|h| h.parse().ok())
    }

    /// Whether local time `now` is outside its hours.
    pub fn off_hours(&self, now: chrono::NaiveDateTime) -> bool {
        self.hours().is_some_and(|h| !h.contains(now))
    }

    /// Where its ComfyUI answers: `url` as given (less a trailing `/`), or
    /// `http://host:port`.
    pub fn base_url(&self) -> String {
        match &self.url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None if self.host.contains(':') && !self.host.starts_with('[') => {
                format!("http://[{}]:{}", self.host, self.port)
            }
            None => format!("http://{}:{}", self.host, self.port),
        }
    }

    /// Its `headers` as sent; a bad one is its field (`headers` or
    /// `headers.NAME`) and what is wrong with it.
    pub fn header_map(&self) -> Result<reqwest::header::HeaderMap, (String, String)> {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in &self.headers {
            let Ok(n) = reqwest::header::HeaderName::from_bytes(name.as_bytes()) else {
                return Err(("headers".into(), format!("`{name}` is not a header name")));
            };
            let Ok(v) = reqwest::header::HeaderValue::from_str(value) else {
                return Err((
                    format!("headers.{name}"),
                    "must be visible ASCII (no line breaks)".into(),
                ));
            };
            map.append(n, v);
        }
        Ok(map)
    }

    /// The host and port it is reached at (from `url` when given), for
    /// display and the database.
    pub fn host_port(&self) -> (String, u16) {
        match self
            .url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
        {
            Some(u) => (
                u.host_str().unwrap_or_default().to_string(),
                u.port_or_known_default().unwrap_or_default(),
            ),
            None => (self.host.clone(), self.port),
        }
    }
}

fn default_comfy_port() -> u16 {
    8188
}
fn yes() -> bool {
    true
}
fn default_max_inflight() -> u32 {
    2
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 9800,
            data_dir: PathBuf::from("./data"),
            log_dir: None,
            workflows_dir: PathBuf::from("./workflows"),
            inbox_dir: None,
            inbox: InboxConfig::default(),
            public_url: None,
            webhooks: WebhookConfig::default(),
            alerts: AlertsConfig::default(),
            auth: AuthConfig::default(),
            cors: CorsConfig::default(),
            limits: Limits::default(),
            database: DatabaseConfig::default(),
            dispatch: DispatchConfig::default(),
            monitor: MonitorConfig::default(),
            retention: RetentionConfig::default(),
            inventory: InventoryConfig::default(),
            shutdown_timeout_s: 10,
            backends: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 * 1024 * 1024,
            max_backend_reply_bytes: 64 * 1024 * 1024,
            max_output_bytes: 16 * 1024 * 1024 * 1024,
            max_input_bytes: 512 * 1024 * 1024,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            synchronous: Synchronous::Full,
            read_connections: 4,
            max_batch: 512,
        }
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            default_max_attempts: 3,
            retry_backoff_ms: 2_000,
            retry_backoff_max_ms: 300_000,
            poll_interval_ms: 2_000,
            backend_grace_s: 60,
            cancel_timeout_s: 30,
            request_timeout_ms: 10_000,
            max_lost_runs: 2,
            quarantine_after: 3,
            quarantine_s: 900,
            job_timeout_s: 7_200,
            heartbeat_ms: 5_000,
            deaf_after_ms: 3_000,
            model_affinity: true,
            affinity_max_wait_s: 300,
            share_by: None,
            batch_field: "batch".into(),
            pause_batch_after: 5,
        }
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            poll_interval_ms: 2_000,
        }
    }
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML is malformed, or a key is unknown or of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's sentence, which names the key and the line.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates YAML text (an empty text is the defaults).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                path: PathBuf::new(),
                message: e.to_string(),
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// The inbox folder, when the inbox is on.
    pub fn inbox_path(&self) -> Option<PathBuf> {
        self.inbox.enabled.then(|| {
            self.inbox_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("inbox"))
        })
    }

    /// Base URL clients reach this service at.
    pub fn base_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }

    /// Path of the SQLite database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("orchestrator.db")
    }

    /// Folder where collected outputs are kept, one sub-folder per job.
    pub fn outputs_dir(&self) -> PathBuf {
        self.data_dir.join("outputs")
    }

    /// Folder where input files are kept, named by their SHA-256.
    pub fn inputs_dir(&self) -> PathBuf {
        self.data_dir.join("inputs")
    }
}

#[cfg(test)]
mod tests;
