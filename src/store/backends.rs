//! Backends: the configured list mirrored into the database, the operator's
//! enable/disable/drain choices (kept across restarts), and the monitor's view.

use chrono::{DateTime, Utc};
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
                             hours = excluded.hours, \
                             off_hours = CASE WHEN backends.hours IS excluded.hours \
                             AND coalesce(backends.hours_override_until > ?13, 0) THEN 0 \
                             ELSE excluded.off_hours END, \
                             hours_override_until = CASE WHEN backends.hours IS excluded.hours \
                             THEN backends.hours_override_until END",
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
                        .bind(&now)
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

    /// Records whether a backend is now outside its hours (`off`), with a
    /// `backend_hours` event, in one transaction. `Some(true)` if that
    /// changed it, `Some(false)` if it already was so, `None` if an
    /// operator lent it to the farm outside its hours until a time still to
    /// come ([`Store::lend_outside_hours`]): then it stays as lent.
    pub async fn set_off_hours(
        &self,
        id: &str,
        off: bool,
        hours: &str,
    ) -> Result<Option<bool>, StoreError> {
        let (id, hours) = (id.to_string(), hours.to_string());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    let n = sqlx::query(
                        "UPDATE backends SET off_hours = ?1, hours_override_until = NULL, \
                         updated_at = ?2 \
                         WHERE id = ?3 AND configured = 1 AND off_hours <> ?1 \
                         AND NOT (?1 = 1 AND coalesce(hours_override_until > ?2, 0))",
                    )
                    .bind(off)
                    .bind(&now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if n == 0 && !off {
                        return Ok(Some(false));
                    }
                    if n == 0 {
                        let lent: Option<bool> = sqlx::query_scalar(
                            "SELECT coalesce(hours_override_until > ?, 0) FROM backends WHERE id = ?",
                        )
                        .bind(&now)
                        .bind(&id)
                        .fetch_optional(&mut *conn)
                        .await?;
                        return Ok(if lent == Some(true) { None } else { Some(false) });
                    }
                    let message = if off {
                        format!("backend {id} is outside its hours ({hours}): it takes no new jobs; those it runs finish")
                    } else {
                        format!("backend {id}'s hours ({hours}) began: it takes jobs")
                    };
                    let data = json!({"hours": hours, "off_hours": off});
                    backend_event(conn, Some(&id), "backend_hours", message, data).await?;
                    Ok(Some(true))
                })
            })
            .await
    }

    /// An operator's enable outside a backend's hours lends it to the farm
    /// until `until` (the end of its next hours, when they take over
    /// again): it takes jobs now, and neither the hours' edges nor a
    /// restart take it back before then. `None` ends a loan (a disable or a
    /// drain), with `off` the side its hours say now. A `backend_hours`
    /// event says which; `false` if there was nothing to change.
    pub async fn lend_outside_hours(
        &self,
        id: &str,
        until: Option<DateTime<Utc>>,
        off: bool,
        hours: &str,
    ) -> Result<bool, StoreError> {
        let (id, hours) = (id.to_string(), hours.to_string());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "UPDATE backends SET off_hours = ?1, hours_override_until = ?2, updated_at = ?3 \
                         WHERE id = ?4 AND configured = 1 \
                         AND (off_hours <> ?1 OR hours_override_until IS NOT ?2)",
                    )
                    .bind(until.is_none() && off)
                    .bind(until.map(fmt_time))
                    .bind(fmt_time(Utc::now()))
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if n == 0 {
                        return Ok(false);
                    }
                    let (message, data) = match until {
                        Some(t) => (
                            format!(
                                "backend {id} takes jobs until {}: an operator enabled it outside its hours ({hours}); then its hours hold again",
                                t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S")
                            ),
                            json!({"hours": hours, "off_hours": false, "lent_until": fmt_time(t)}),
                        ),
                        None if off => (
                            format!("backend {id} is outside its hours ({hours}) again: an operator took it back"),
                            json!({"hours": hours, "off_hours": true}),
                        ),
                        None => return Ok(true),
                    };
                    backend_event(conn, Some(&id), "backend_hours", message, data).await?;
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

    /// Records the largest upload a backend takes, in bytes, as its ComfyUI
    /// said it (each socket it opens hears it): leasing leaves it the jobs
    /// whose files fit. Whether it changed (a box started again with
    /// another `--max-upload-size`); one statement, no event.
    pub async fn set_upload_limit(&self, id: &str, bytes: i64) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.writer()
            .write_one(move |conn| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "UPDATE backends SET max_upload_bytes = ?1 \
                         WHERE id = ?2 AND max_upload_bytes IS NOT ?1",
                    )
                    .bind(bytes)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    Ok(n == 1)
                })
            })
            .await
    }

    /// The largest upload each of these backends takes, bytes (`None`
    /// for one that has not said), by id.
    pub async fn upload_limits(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, Option<i64>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, max_upload_bytes FROM backends \
             WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
        )
        .bind(serde_json::to_string(ids)?)
        .fetch_all(self.reader())
        .await?)
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
                            Some(&id),
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
