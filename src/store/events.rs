//! The durable event log as a stream, progress at a bounded rate, backend
//! state changes, and the webhook outbox.
//!
//! Why read live streams from the log rather than an in-memory bus: a
//! subscriber that reconnects with its last sequence number gets exactly
//! what it missed (no gap, no duplicate), also across restarts, and a slow
//! subscriber only lags behind in its own reads: it never holds back
//! dispatch or anyone else.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::watch;

use super::jobs::{append_event, event_from_row, EventInput, JobEvent, EVENT_COLUMNS};
use super::{fmt_time, Store, StoreError};

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only these jobs (any, when empty).
    pub job_ids: Vec<String>,
    /// Only events that leave a job in one of these statuses.
    pub statuses: Vec<String>,
    /// Only jobs of this workflow.
    pub workflow_id: Option<String>,
}

/// A webhook due for delivery.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Outbox row.
    pub id: i64,
    /// The job that ended.
    pub job_id: String,
    /// Where to POST.
    pub url: String,
    /// Tries so far.
    pub attempts: i64,
}

impl Store {
    /// Changes after every commit: wait on it for new events.
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.writer().subscribe_commits()
    }

    /// The newest event's sequence number (0 when there is none).
    pub async fn latest_event_seq(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM job_events")
                .fetch_one(self.reader())
                .await?,
        )
    }

    /// Events after `after`, oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: i64,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE seq > "
        ));
        q.push_bind(after);
        if !filter.job_ids.is_empty() {
            q.push(" AND job_id IN (");
            let mut sep = q.separated(", ");
            for id in &filter.job_ids {
                sep.push_bind(id.clone());
            }
            q.push(")");
        }
        if !filter.statuses.is_empty() {
            q.push(" AND status IN (");
            let mut sep = q.separated(", ");
            for s in &filter.statuses {
                sep.push_bind(s.clone());
            }
            q.push(")");
        }
        if let Some(w) = &filter.workflow_id {
            q.push(" AND workflow_id = ").push_bind(w.clone());
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(self.reader()).await?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Stores a running job's progress (the caller bounds the rate) as the
    /// job's `progress` and as a `progress` event.
    pub async fn record_progress(
        &self,
        job_id: &str,
        token: i64,
        progress: Value,
    ) -> Result<(), StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row = sqlx::query(
                        "UPDATE jobs SET progress = ? WHERE id = ? AND lease_token = ? AND status = 'running' \
                         RETURNING backend_id, attempts",
                    )
                    .bind(progress.to_string())
                    .bind(&job_id)
                    .bind(token)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some(row) = row else { return Ok(()) };
                    let backend: Option<String> = row.try_get("backend_id")?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "progress",
                            status: Some("running"),
                            backend_id: backend.as_deref(),
                            attempt: Some(row.try_get("attempts")?),
                            message: None,
                            data: Some(progress),
                        },
                    )
                    .await
                })
            })
            .await
    }

    /// Webhooks due now, oldest first.
    pub async fn due_webhooks(&self, limit: i64) -> Result<Vec<Webhook>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, job_id, url, attempts FROM webhook_outbox INDEXED BY webhook_due \
             WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ? \
             ORDER BY next_attempt_at LIMIT ?",
        )
        .bind(fmt_time(Utc::now()))
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Webhook {
                    id: r.try_get("id")?,
                    job_id: r.try_get("job_id")?,
                    url: r.try_get("url")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// When the next webhook falls due, if any is pending.
    pub async fn next_webhook_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let s: Option<String> = sqlx::query_scalar(
            "SELECT min(next_attempt_at) FROM webhook_outbox WHERE delivered_at IS NULL AND gave_up_at IS NULL",
        )
        .fetch_one(self.reader())
        .await?;
        Ok(s.as_deref().and_then(super::parse_time))
    }

    /// Records one delivery try: delivered, retry at `next`, or given up (`next: None`).
    pub async fn webhook_tried(
        &self,
        id: i64,
        delivered: bool,
        error: Option<String>,
        next: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    let (delivered_at, gave_up_at, next_at) = match (delivered, next) {
                        (true, _) => (Some(now.clone()), None, now.clone()),
                        (false, Some(n)) => (None, None, fmt_time(n)),
                        (false, None) => (None, Some(now.clone()), now.clone()),
                    };
                    sqlx::query(
                        "UPDATE webhook_outbox SET attempts = attempts + 1, delivered_at = ?, gave_up_at = ?, \
                         next_attempt_at = ?, last_error = ? WHERE id = ?",
                    )
                    .bind(delivered_at)
                    .bind(gave_up_at)
                    .bind(next_at)
                    .bind(error)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// The outbox rows of a job (for the API and tests).
    pub async fn job_webhooks(&self, job_id: &str) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT url, status, attempts, delivered_at, gave_up_at, last_error FROM webhook_outbox \
             WHERE job_id = ? ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(json!({
                    "url": r.try_get::<String, _>("url")?,
                    "status": r.try_get::<String, _>("status")?,
                    "attempts": r.try_get::<i64, _>("attempts")?,
                    "delivered_at": r.try_get::<Option<String>, _>("delivered_at")?,
                    "gave_up_at": r.try_get::<Option<String>, _>("gave_up_at")?,
                    "last_error": r.try_get::<Option<String>, _>("last_error")?,
                }))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

/// Queues the job's webhook, inside the transaction that ends the job.
pub(crate) async fn enqueue_webhook(
    conn: &mut SqliteConnection,
    job_id: &str,
    status: &str,
) -> Result<(), StoreError> {
    let now = fmt_time(Utc::now());
    sqlx::query(
        "INSERT INTO webhook_outbox (job_id, url, status, next_attempt_at, created_at) \
         SELECT id, callback_url, ?, ?, ? FROM jobs WHERE id = ? AND callback_url IS NOT NULL",
    )
    .bind(status)
    .bind(&now)
    .bind(&now)
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Appends a backend event when its state changed.
pub(crate) async fn backend_event(
    conn: &mut SqliteConnection,
    backend_id: &str,
    kind: &str,
    message: String,
    data: Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, message, data) \
         VALUES (NULL, NULL, ?, ?, NULL, ?, ?, ?)",
    )
    .bind(fmt_time(Utc::now()))
    .bind(kind)
    .bind(backend_id)
    .bind(message)
    .bind(data.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
