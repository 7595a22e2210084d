//! Backends: the configured list mirrored into the database, the operator's
//! enable/disable/drain choices (kept across restarts), and the monitor's view.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use utoipa::ToSchema;

use super::{fmt_time, parse_time, Store, StoreError};

/// One backend as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackendRecord {
    /// Stable id from the config.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Host of the ComfyUI server.
    pub host: String,
    /// Port of the ComfyUI server.
    pub port: i64,
    /// Enabled in the config file.
    pub config_enabled: bool,
    /// Operator override: `enabled`, `disabled`, `draining`, or `null` to follow the config.
    pub admin_state: Option<String>,
    /// Whether new jobs may be leased to it now (config, override, health).
    pub accepting_jobs: bool,
    /// Capabilities jobs may require.
    pub tags: Vec<String>,
    /// Prompts held at once.
    pub max_inflight: i64,
    /// The WebSocket client id used with this backend, kept across restarts.
    pub client_id: String,
    /// `unknown`, `online` or `offline`.
    pub state: String,
    /// `system.comfyui_version` of `/system_stats`.
    pub comfyui_version: Option<String>,
    /// VRAM of the first device, bytes.
    pub vram_total: Option<i64>,
    /// Free VRAM of the first device, bytes.
    pub vram_free: Option<i64>,
    /// Prompts in ComfyUI's queue (running and pending).
    pub queue_remaining: Option<i64>,
    /// Jobs this orchestrator has on it now (assigned or running).
    pub active_jobs: i64,
    /// Last error talking to it.
    pub last_error: Option<String>,
    /// Last successful contact.
    pub last_seen: Option<DateTime<Utc>>,
    /// Since when it has not answered.
    pub offline_since: Option<DateTime<Utc>>,
}

impl BackendRecord {
    /// Whether an operator or the config keeps new jobs away.
    pub fn enabled(&self) -> bool {
        match self.admin_state.as_deref() {
            Some("enabled") => true,
            Some("disabled") | Some("draining") => false,
            _ => self.config_enabled,
        }
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
    /// Enabled in the config.
    pub enabled: bool,
    /// Tags.
    pub tags: Vec<String>,
    /// Prompts at once.
    pub max_inflight: u32,
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

fn backend_from_row(row: &SqliteRow) -> Result<BackendRecord, sqlx::Error> {
    let tags: String = row.try_get("tags")?;
    let last_seen: Option<String> = row.try_get("last_seen")?;
    let offline_since: Option<String> = row.try_get("offline_since")?;
    let mut b = BackendRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        host: row.try_get("host")?,
        port: row.try_get("port")?,
        config_enabled: row.try_get::<i64, _>("config_enabled")? != 0,
        admin_state: row.try_get("admin_state")?,
        accepting_jobs: false,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        max_inflight: row.try_get("max_inflight")?,
        client_id: row.try_get("client_id")?,
        state: row.try_get("state")?,
        comfyui_version: row.try_get("comfyui_version")?,
        vram_total: row.try_get("vram_total")?,
        vram_free: row.try_get("vram_free")?,
        queue_remaining: row.try_get("queue_remaining")?,
        active_jobs: row.try_get("active_jobs")?,
        last_error: row.try_get("last_error")?,
        last_seen: last_seen.as_deref().and_then(parse_time),
        offline_since: offline_since.as_deref().and_then(parse_time),
    };
    b.accepting_jobs = b.enabled() && b.state == "online";
    Ok(b)
}

async fn previous_state(
    conn: &mut sqlx::SqliteConnection,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT state FROM backends WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

const BACKEND_SELECT: &str = "SELECT b.*, \
    (SELECT count(*) FROM jobs j WHERE j.backend_id = b.id AND j.status IN ('assigned', 'running')) \
    AS active_jobs FROM backends b";

impl Store {
    /// Mirrors the configured backends; those no longer configured are kept
    /// (their history refers to them) but hidden.
    pub async fn sync_backends(&self, configured: Vec<BackendUpsert>) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    sqlx::query("UPDATE backends SET configured = 0")
                        .execute(&mut *conn)
                        .await?;
                    for b in configured {
                        sqlx::query(
                            "INSERT INTO backends (id, name, host, port, configured, config_enabled, \
                             tags, max_inflight, client_id, state, updated_at) \
                             VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, 'unknown', ?) \
                             ON CONFLICT(id) DO UPDATE SET name = excluded.name, \
                             host = excluded.host, port = excluded.port, configured = 1, \
                             config_enabled = excluded.config_enabled, tags = excluded.tags, \
                             max_inflight = excluded.max_inflight, updated_at = excluded.updated_at",
                        )
                        .bind(&b.id)
                        .bind(&b.name)
                        .bind(&b.host)
                        .bind(b.port as i64)
                        .bind(b.enabled as i64)
                        .bind(serde_json::to_string(&b.tags)?)
                        .bind(b.max_inflight as i64)
                        .bind(uuid::Uuid::new_v4().to_string())
                        .bind(&now)
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .await
    }

    /// The configured backends, in id order.
    pub async fn backends(&self) -> Result<Vec<BackendRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "{BACKEND_SELECT} WHERE b.configured = 1 ORDER BY b.id"
        ))
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(backend_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)
    }

    /// One configured backend.
    pub async fn backend(&self, id: &str) -> Result<Option<BackendRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "{BACKEND_SELECT} WHERE b.configured = 1 AND b.id = ?"
        ))
        .bind(id)
        .fetch_optional(self.reader())
        .await?;
        row.as_ref()
            .map(backend_from_row)
            .transpose()
            .map_err(StoreError::from)
    }

    /// Sets the operator's override (`enabled`, `disabled`, `draining`).
    pub async fn set_backend_admin_state(
        &self,
        id: &str,
        state: &'static str,
    ) -> Result<(), StoreError> {
        let id = id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "UPDATE backends SET admin_state = ?, updated_at = ? WHERE id = ? AND configured = 1",
                    )
                    .bind(state)
                    .bind(fmt_time(Utc::now()))
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if n == 0 {
                        return Err(StoreError::NotFound(format!("backend `{id}`")));
                    }
                    Ok(())
                })
            })
            .await
    }

    /// Records a successful poll.
    pub async fn backend_online(&self, id: &str, stats: BackendStats) -> Result<(), StoreError> {
        let id = id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    let before = previous_state(conn, &id).await?;
                    if before.as_deref() != Some("online") {
                        super::events::backend_event(
                            conn,
                            &id,
                            "backend_online",
                            format!("backend {id} is online (ComfyUI {})", stats.comfyui_version.as_deref().unwrap_or("?")),
                            serde_json::json!({"state": "online", "comfyui_version": stats.comfyui_version}),
                        )
                        .await?;
                    }
                    sqlx::query(
                        "UPDATE backends SET state = 'online', comfyui_version = ?, vram_total = ?, \
                         vram_free = ?, queue_remaining = ?, last_seen = ?, offline_since = NULL, \
                         last_error = NULL, updated_at = ? WHERE id = ?",
                    )
                    .bind(stats.comfyui_version)
                    .bind(stats.vram_total)
                    .bind(stats.vram_free)
                    .bind(stats.queue_remaining)
                    .bind(&now)
                    .bind(&now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Records a failed poll; `offline_since` keeps the first failure's time.
    pub async fn backend_offline(&self, id: &str, error: String) -> Result<(), StoreError> {
        let id = id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    let before = previous_state(conn, &id).await?;
                    if before.as_deref() != Some("offline") {
                        super::events::backend_event(
                            conn,
                            &id,
                            "backend_offline",
                            format!("backend {id} is offline: {error}"),
                            serde_json::json!({"state": "offline", "error": error}),
                        )
                        .await?;
                    }
                    sqlx::query(
                        "UPDATE backends SET state = 'offline', last_error = ?, \
                         offline_since = coalesce(offline_since, ?), updated_at = ? WHERE id = ?",
                    )
                    .bind(error)
                    .bind(&now)
                    .bind(&now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }
}
