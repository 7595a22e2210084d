//! A backend's records: its states, the operator's override, what the
//! database keeps of it and what a poll learnt.
//!
//! Why apart from the job records (`model.rs`): the two change for
//! different reasons (the monitor and the operator controls here, the job
//! life cycle there). `model` re-exports these, so callers see one set.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the monitor last saw of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum BackendState {
    /// Not polled yet since it was first configured. (After a restart a
    /// backend keeps the state of its last poll until the next one: work
    /// resumes on the boxes that were up without waiting for every poll.)
    Unknown,
    /// Answering, and of a version we can drive.
    Online,
    /// Not answering (or answering garbage).
    Offline,
    /// Answering, but too old (or not saying its version) to be driven safely.
    Incompatible,
}

impl BackendState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Unknown => "unknown",
            BackendState::Online => "online",
            BackendState::Offline => "offline",
            BackendState::Incompatible => "incompatible",
        }
    }
}

/// An operator's override of the config's `enabled` (kept across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes jobs, whatever the config says.
    Enabled,
    /// Takes no new jobs; what it has keeps running.
    Disabled,
    /// Finishes what it has, takes nothing new.
    Draining,
}

impl AdminState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Disabled => "disabled",
            AdminState::Draining => "draining",
        }
    }
}

/// Whether the config or an operator lets a backend take jobs (the
/// operator's override wins, else the config), in its hours or not: one
/// that will take jobs when its hours begin, which a job may wait for and
/// a submission may count on. `admitted_sql` in SQL.
pub fn backend_admitted(config_enabled: bool, admin: Option<AdminState>) -> bool {
    match admin {
        Some(AdminState::Enabled) => true,
        Some(AdminState::Disabled | AdminState::Draining) => false,
        None => config_enabled,
    }
}

/// The one "enabled" rule: admitted, and not outside its hours (V16),
/// whatever admits it: whether it takes new jobs now, health aside.
/// `enabled_sql` in SQL.
pub fn backend_enabled(config_enabled: bool, admin: Option<AdminState>, off_hours: bool) -> bool {
    backend_admitted(config_enabled, admin) && !off_hours
}

/// [`backend_enabled`] of the `backends` row `alias`, in SQL, for the
/// rules that look at other backends inside a query.
pub(super) fn enabled_sql(alias: &str) -> String {
    format!("({} AND {alias}.off_hours = 0)", admitted_sql(alias))
}

/// [`backend_admitted`] of the `backends` row `alias`, in SQL.
pub(super) fn admitted_sql(alias: &str) -> String {
    format!(
        "(CASE {alias}.admin_state WHEN 'enabled' THEN 1 WHEN 'disabled' THEN 0 \
         WHEN 'draining' THEN 0 ELSE {alias}.config_enabled END = 1)"
    )
}

/// Whether a failed attempt's error says the GPU ran out of memory: the job
/// needs a bigger box, and says nothing against this one. ComfyUI names
/// the exception (`torch.OutOfMemoryError`, `torch.cuda.OutOfMemoryError`)
/// and adds "you ran out of memory on your GPU" to its message.
pub fn out_of_memory(error: &serde_json::Value) -> bool {
    ["exception_type", "exception_message"].iter().any(|f| {
        error[f].as_str().is_some_and(|s| {
            let s = s.to_ascii_lowercase();
            s.contains("out of memory") || s.contains("outofmemory")
        })
    })
}

/// Whether a failed attempt's error says the box's own disk is full: a
/// node (ComfyUI 0.3.64's `SaveImage`, recorded) raised `OSError` with
/// "[Errno 28] No space left on device" (or a spent quota). Every job that
/// saves there fails alike until space is freed on the box: the box is to
/// blame at once, the job not at all.
pub fn box_disk_full(error: &serde_json::Value) -> bool {
    error["exception_type"].is_string()
        && error["exception_message"].as_str().is_some_and(|m| {
            let m = m.to_ascii_lowercase();
            [
                "[errno 28]",
                "no space left on device",
                "[errno 122]",
                "disk quota exceeded",
            ]
            .iter()
            .any(|s| m.contains(s))
        })
}

/// [`out_of_memory`] of the JSON error in column `error`, in SQL (`LIKE`
/// ignores ASCII case, as the Rust rule does).
pub(super) fn out_of_memory_sql(error: &str) -> String {
    let field = |f: &str| {
        format!(
            "json_extract({error}, '$.{f}') LIKE '%out of memory%' \
             OR json_extract({error}, '$.{f}') LIKE '%outofmemory%'"
        )
    };
    format!(
        "({} OR {})",
        field("exception_type"),
        field("exception_message")
    )
}

/// One backend as the database knows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BackendRecord {
    /// Stable id from the config.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Host of the ComfyUI server.
    pub host: String,
    /// Port of the ComfyUI server.
    pub port: i64,
    /// Where its ComfyUI answers (scheme, host, port and path), as the
    /// config gives it; `None` for a backend gone from the config before
    /// this was recorded.
    pub url: Option<String>,
    /// Enabled in the config file.
    pub config_enabled: bool,
    /// Operator override; `None` follows the config.
    pub admin_state: Option<AdminState>,
    /// Capabilities jobs may require.
    #[sqlx(json)]
    pub tags: Vec<String>,
    /// Prompts held at once.
    pub max_inflight: i64,
    /// The WebSocket client id used with this backend, kept across restarts.
    pub client_id: String,
    /// What the monitor last saw.
    pub state: BackendState,
    /// `system.comfyui_version` of `/system_stats`.
    pub comfyui_version: Option<String>,
    /// VRAM of the first device, bytes.
    pub vram_total: Option<i64>,
    /// Free VRAM of the first device, bytes.
    pub vram_free: Option<i64>,
    /// The largest upload it takes, bytes (its ComfyUI's
    /// `--max-upload-size`), as it last said; `None` until it has.
    pub max_upload_bytes: Option<i64>,
    /// Prompts in ComfyUI's queue (running and pending).
    pub queue_remaining: Option<i64>,
    /// Jobs this orchestrator has on it now (assigned or running).
    pub active_jobs: i64,
    /// Last error talking to it (or why it is incompatible).
    pub last_error: Option<String>,
    /// Last successful contact.
    pub last_seen: Option<DateTime<Utc>>,
    /// Since when it has not answered.
    pub offline_since: Option<DateTime<Utc>>,
    /// The model (checkpoint) of the last job leased to it: what it keeps
    /// loaded, and what the lease preference steers by.
    pub last_affinity: Option<String>,
    /// When it takes the farm's jobs (the config's `hours`, local time).
    pub hours: Option<String>,
    /// Now outside its hours: it takes no new jobs, enabled or not.
    pub off_hours: bool,
    /// Lent to the farm outside its hours by an operator's enable, until
    /// then (the end of its next hours); `None` when not lent.
    pub hours_override_until: Option<DateTime<Utc>>,
}

impl BackendRecord {
    /// Whether an operator, the config or its hours keep new jobs away.
    pub fn enabled(&self) -> bool {
        backend_enabled(self.config_enabled, self.admin_state, self.off_hours)
    }

    /// Whether new jobs may be leased to it now (config, override, health).
    pub fn accepting_jobs(&self) -> bool {
        self.enabled() && self.state == BackendState::Online
    }
}

/// The configured facts of a backend, written at start-up.
#[derive(Debug, Clone)]
pub struct BackendUpsert {
    /// Id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Where its ComfyUI answers (`http://host:port`, or the `url` given).
    pub url: String,
    /// Enabled in the config.
    pub enabled: bool,
    /// Tags.
    pub tags: Vec<String>,
    /// Prompts at once.
    pub max_inflight: u32,
    /// Its hours (`20:00-08:00`), if it has any.
    pub hours: Option<String>,
    /// Outside them now.
    pub off_hours: bool,
}

/// What the monitor learnt from one poll.
#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    /// ComfyUI version.
    pub comfyui_version: Option<String>,
    /// VRAM total, bytes.
    pub vram_total: Option<i64>,
    /// VRAM free, bytes.
    pub vram_free: Option<i64>,
    /// Queue length.
    pub queue_remaining: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A backend as the database knows it, enabled by its config.
    fn record() -> BackendRecord {
        BackendRecord {
            id: "b".into(),
            name: "b".into(),
            host: "h".into(),
            port: 1,
            url: None,
            config_enabled: true,
            admin_state: None,
            tags: vec![],
            max_inflight: 2,
            client_id: "c".into(),
            state: BackendState::Online,
            comfyui_version: None,
            vram_total: None,
            vram_free: None,
            max_upload_bytes: None,
            queue_remaining: None,
            active_jobs: 0,
            last_error: None,
            last_seen: None,
            offline_since: None,
            last_affinity: None,
            hours: None,
            off_hours: false,
            hours_override_until: None,
        }
    }

    #[tokio::test]
    async fn the_sql_forms_of_the_rules_say_what_the_rust_ones_do() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        let enabled = format!(
            "SELECT {}, {} FROM (SELECT ? AS config_enabled, ? AS admin_state, ? AS off_hours) b",
            enabled_sql("b"),
            admitted_sql("b")
        );
        for (config, off) in [(false, false), (true, false), (false, true), (true, true)] {
            for admin in [
                None,
                Some(AdminState::Enabled),
                Some(AdminState::Disabled),
                Some(AdminState::Draining),
            ] {
                let (got, admitted): (bool, bool) = sqlx::query_as(&enabled)
                    .bind(config)
                    .bind(admin.map(AdminState::as_str))
                    .bind(off)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                let record = BackendRecord {
                    config_enabled: config,
                    admin_state: admin,
                    off_hours: off,
                    ..record()
                };
                assert_eq!(got, record.enabled(), "{config} {admin:?} {off}");
                assert_eq!(
                    admitted,
                    backend_admitted(config, admin),
                    "{config} {admin:?}"
                );
            }
        }
        let oom = format!(
            "SELECT coalesce({}, 0) FROM (SELECT ? AS error) e",
            out_of_memory_sql("e.error")
        );
        for (error, expected) in [
            (json!({"exception_type": "torch.OutOfMemoryError"}), true),
            (
                json!({"exception_type": "torch.cuda.OutOfMemoryError"}),
                true,
            ),
            (
                json!({"exception_type": "RuntimeError", "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"}),
                true,
            ),
            (
                json!({"exception_type": "RuntimeError", "exception_message": "CUDA error: an illegal memory access was encountered"}),
                false,
            ),
            (json!({"message": "backend a: out of memory"}), false),
            (json!({}), false),
        ] {
            let got: bool = sqlx::query_scalar(&oom)
                .bind(error.to_string())
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(out_of_memory(&error), expected, "{error}");
            assert_eq!(got, expected, "{error}");
        }
    }
}
