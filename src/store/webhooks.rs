//! The webhook outbox: a row per webhook to deliver, written in the same
//! transaction that ends its job, so a callback can be late but never lost.

use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::model::{JobStatus, Webhook};
use super::{fmt_time, Store, StoreError};

/// Queues the job's webhook, inside the transaction that ends the job.
pub(super) async fn enqueue_webhook(
    conn: &mut SqliteConnection,
    job_id: &str,
    url: &str,
    status: JobStatus,
) -> Result<(), StoreError> {
    let now = fmt_time(Utc::now());
    sqlx::query(
        "INSERT INTO webhook_outbox (job_id, url, status, next_attempt_at, created_at) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(job_id)
    .bind(url)
    .bind(status)
    .bind(&now)
    .bind(&now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A job's webhook deliveries, in the order they were queued.
pub(super) const WEBHOOKS_OF: &str = "SELECT url, status, attempts, delivered_at, gave_up_at, \
     last_error FROM webhook_outbox WHERE job_id = ? ORDER BY id";

impl Store {
    /// Webhooks due now, oldest first.
    pub async fn due_webhooks(&self, limit: i64) -> Result<Vec<Webhook>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, job_id, url, attempts FROM webhook_outbox INDEXED BY webhook_due \
             WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ? \
             ORDER BY next_attempt_at LIMIT ?",
        )
        .bind(fmt_time(Utc::now()))
        .bind(limit)
        .fetch_all(self.reader())
        .await?)
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
}
