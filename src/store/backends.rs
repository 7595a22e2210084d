//! Backends: the configured list mirrored into the database, the operator's
//! enable/disable/drain choices (kept across restarts), and the monitor's view.

use chrono::Utc;
use serde_json::json;

use super::events::backend_event;
use super::model::*;
use super::{fmt_time, Store, StoreError};

const BACKEND_SELECT: &str = "SELECT b.*, \
    (SELECT count(*) FROM jobs j WHERE j.backend_id = b.id AND j.status IN ('assigned', 'running')) \
    AS active_jobs FROM backends b";

/// What a poll found, as it is written.
enum Seen {
    Online(BackendStats),
    Offline(String),
    Incompatible(BackendStats, String),
}

impl Store {
    /// Mirrors the configured backends; those no longer configured are kept
    /// (their history refers to them) but hidden.
    pub async fn sync_backends(&self, configured: Vec<BackendUpsert>) -> Result<(), StoreError> {
        let synced = self
            .writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    sqlx::query("UPDATE backends SET configured = 0")
                        .execute(&mut *conn)
                        .await?;
                    for b in configured {
                        sqlx::query(
                            "INSERT INTO backends (id, name, host, port, url, configured, \
                             config_enabled, tags, max_inflight, client_id, state, updated_at, \
                             hours, off_hours) \
                             VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, 'unknown', ?, ?, ?) \
                             ON CONFLICT(id) DO UPDATE SET name = excluded.name, \
                             host = excluded.host, port = excluded.port, url = excluded.url, \
                             configured = 1, \
                             config_enabled = excluded.config_enabled, tags = excluded.tags, \
                             max_inflight = excluded.max_inflight, updated_at = excluded.updated_at, \
                             hours = excluded.hours, off_hours = excluded.off_hours",
                        )
                        .bind(&b.id)
                        .bind(&b.name)
                        .bind(&b.host)
                        .bind(b.port as i64)
                        .bind(&b.url)
                        .bind(b.enabled as i64)
                        .bind(serde_json::to_string(&b.tags)?)
                        .bind(b.max_inflight as i64)
                        .bind(uuid::Uuid::new_v4().to_string())
                        .bind(&now)
                        .bind(&b.hours)
                        .bind(b.off_hours)
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .await;
        self.takers.changed();
        synced
    }

    /// The configured backends, in id order.
    pub async fn backends(&self) -> Result<Vec<BackendRecord>, StoreError> {
        let sql = format!("{BACKEND_SELECT} WHERE b.configured = 1 ORDER BY b.id");
        Ok(sqlx::query_as(&sql).fetch_all(self.reader()).await?)
    }

    /// One configured backend.
    pub async fn backend(&self, id: &str) -> Result<Option<BackendRecord>, StoreError> {
        let sql = format!("{BACKEND_SELECT} WHERE b.configured = 1 AND b.id = ?");
        self.one_by(&sql, id).await
    }

    /// Sets the operator's override.
    pub async fn set_backend_admin_state(
        &self,
        id: &str,
        state: AdminState,
    ) -> Result<(), StoreError> {
        let id = id.to_string();
        let set = self
            .writer()
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
            .await;
        self.takers.changed();
        set
    }

    /// Records whether a backend is outside its hours now (`hours`, as
    /// the config writes them, for the event); `true` when that changed,
    /// which a backend event says (`backend_hours`), in the same
    /// transaction.
    pub async fn set_off_hours(
        &self,
        id: &str,
        off: bool,
        hours: &str,
    ) -> Result<bool, StoreError> {
        let (id, hours) = (id.to_string(), hours.to_string());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "UPDATE backends SET off_hours = ?, updated_at = ? \
                         WHERE id = ? AND configured = 1 AND off_hours <> ?",
                    )
                    .bind(off)
                    .bind(fmt_time(Utc::now()))
                    .bind(&id)
                    .bind(off)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if n == 0 {
                        return Ok(false);
                    }
                    let message = if off {
                        format!("backend {id} is outside its hours ({hours}): it takes no new jobs; those it runs finish")
                    } else {
                        format!("backend {id}'s hours ({hours}) began: it takes jobs")
                    };
                    let data = json!({"hours": hours, "off_hours": off});
                    backend_event(conn, &id, "backend_hours", message, data).await?;
                    Ok(true)
                })
            })
            .await
    }

    /// Records a successful poll.
    pub async fn backend_online(&self, id: &str, stats: BackendStats) -> Result<(), StoreError> {
        self.backend_seen(id, Seen::Online(stats)).await
    }

    /// Records that a backend still answers as it did at its last record:
    /// only `last_seen` moves. One statement, no read before it: a farm of a
    /// thousand backends does this about 33 times a second. `false` if the
    /// database does not hold it as online (then record it in full).
    pub async fn backend_still_online(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.writer()
            .write_one(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    let n = sqlx::query(
                        "UPDATE backends SET last_seen = ?, updated_at = ? \
                         WHERE id = ? AND state = 'online'",
                    )
                    .bind(&now)
                    .bind(&now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    Ok(n == 1)
                })
            })
            .await
    }

    /// Records a failed poll; `offline_since` keeps the first failure's time.
    pub async fn backend_offline(&self, id: &str, error: String) -> Result<(), StoreError> {
        self.backend_seen(id, Seen::Offline(error)).await
    }

    /// Records a backend that answers but cannot be driven safely, and why.
    pub async fn backend_incompatible(
        &self,
        id: &str,
        stats: BackendStats,
        why: String,
    ) -> Result<(), StoreError> {
        self.backend_seen(id, Seen::Incompatible(stats, why)).await
    }

    /// Writes what a poll found, with an event when the state changed.
    async fn backend_seen(&self, id: &str, seen: Seen) -> Result<(), StoreError> {
        let id = id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    let before: Option<BackendState> =
                        sqlx::query_scalar("SELECT state FROM backends WHERE id = ?")
                            .bind(&id)
                            .fetch_optional(&mut *conn)
                            .await?;
                    let (state, stats, error) = match seen {
                        Seen::Online(s) => (BackendState::Online, Some(s), None),
                        Seen::Offline(e) => (BackendState::Offline, None, Some(e)),
                        Seen::Incompatible(s, e) => (BackendState::Incompatible, Some(s), Some(e)),
                    };
                    if before != Some(state) {
                        let version = stats.as_ref().and_then(|s| s.comfyui_version.clone());
                        let message = match (state, &error) {
                            (BackendState::Online, _) => format!(
                                "backend {id} is online (ComfyUI {})",
                                version.as_deref().unwrap_or("?")
                            ),
                            (_, Some(e)) => format!("backend {id} is {}: {e}", state.as_str()),
                            (_, None) => format!("backend {id} is {}", state.as_str()),
                        };
                        let kind = format!("backend_{}", state.as_str());
                        backend_event(
                            conn,
                            &id,
                            &kind,
                            message,
                            json!({"state": state, "comfyui_version": version, "error": error}),
                        )
                        .await?;
                    }
                    match stats {
                        Some(stats) => {
                            sqlx::query(
                                "UPDATE backends SET state = ?, comfyui_version = ?, vram_total = ?, \
                                 vram_free = ?, queue_remaining = ?, last_seen = ?, offline_since = NULL, \
                                 last_error = ?, updated_at = ? WHERE id = ?",
                            )
                            .bind(state)
                            .bind(stats.comfyui_version)
                            .bind(stats.vram_total)
                            .bind(stats.vram_free)
                            .bind(stats.queue_remaining)
                            .bind(&now)
                            .bind(error)
                            .bind(&now)
                            .bind(&id)
                            .execute(&mut *conn)
                            .await?;
                        }
                        None => {
                            sqlx::query(
                                "UPDATE backends SET state = ?, last_error = ?, \
                                 offline_since = coalesce(offline_since, ?), updated_at = ? WHERE id = ?",
                            )
                            .bind(state)
                            .bind(error)
                            .bind(&now)
                            .bind(&now)
                            .bind(&id)
                            .execute(&mut *conn)
                            .await?;
                        }
                    }
                    Ok(())
                })
            })
            .await
    }
}
