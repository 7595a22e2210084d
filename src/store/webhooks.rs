//! The webhook outbox: a row per webhook to deliver, written in the same
//! transaction that ends its job, so a callback can be late but never lost.
//! And how far the farm's alerts went (`crate::alerts`): the other thing
//! told to receivers outside, kept so a restart neither skips nor repeats.

use chrono::{DateTime, Utc};

use super::batch::Batch;
use super::model::{JobStatus, Webhook};
use super::{fmt_time, Store, StoreError};

/// Queues the job's webhook if it names one, in the batch that ends the job
/// (most jobs name none: the statement then writes nothing, and costs no
/// round trip of its own).
pub(super) fn push_webhook(b: &mut Batch<'_>, job_id: &str, status: JobStatus, now: &str) {
    b.push(
        "INSERT INTO webhook_outbox (job_id, url, status, next_attempt_at, created_at) \
         SELECT id, callback_url, ?, ?, ? FROM jobs WHERE id = ? AND callback_url IS NOT NULL",
    )
    .bind(status)
    .bind(now.to_string())
    .bind(now.to_string())
    .bind(job_id.to_string());
}

/// A job's webhook deliveries, in the order they were queued.
pub(super) const WEBHOOKS_OF: &str = "SELECT url, status, attempts, delivered_at, gave_up_at, \
     last_error FROM webhook_outbox WHERE job_id = ? ORDER BY id";

impl Store {
    /// Webhooks due now (at most `limit`, oldest first), and when the next
    /// pending one falls due after them, if any: one read, because the
    /// webhook task asks after every batch of job ends and most jobs name
    /// no callback (it was two reads each time, a sixth of a busy farm's
    /// reads).
    pub async fn webhook_queue(
        &self,
        limit: usize,
    ) -> Result<(Vec<Webhook>, Option<DateTime<Utc>>), StoreError> {
        let rows: Vec<(i64, String, String, i64, String)> = sqlx::query_as(
            "SELECT id, job_id, url, attempts, next_attempt_at FROM webhook_outbox \
             INDEXED BY webhook_due WHERE delivered_at IS NULL AND gave_up_at IS NULL \
             ORDER BY next_attempt_at LIMIT ?",
        )
        .bind(limit as i64 + 1)
        .fetch_all(self.reader())
        .await?;
        let now = fmt_time(Utc::now());
        let mut due = Vec::new();
        for (id, job_id, url, attempts, at) in rows {
            if due.len() == limit || at > now {
                return Ok((due, super::parse_time(&at)));
            }
            due.push(Webhook {
                id,
                job_id,
                url,
                attempts,
            });
        }
        Ok((due, None))
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

impl Store {
    /// The last event the farm's alerts have dealt with (`settings`), if
    /// they ever ran here.
    pub async fn alerts_cursor(&self) -> Result<Option<i64>, StoreError> {
        let value: Option<Option<String>> =
            sqlx::query_scalar("SELECT value FROM settings WHERE name = 'alerts_after'")
                .fetch_optional(self.reader())
                .await?;
        Ok(value.flatten().and_then(|v| v.parse().ok()))
    }

    /// Records that the alerts have dealt with every event up to `seq`
    /// (`None`: forgets it, the alerts being off).
    pub async fn set_alerts_cursor(&self, seq: Option<i64>) -> Result<(), StoreError> {
        if seq.is_none() && self.alerts_cursor().await?.is_none() {
            return Ok(());
        }
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let sql = match seq {
                        Some(_) => {
                            "INSERT INTO settings (name, value) VALUES ('alerts_after', ?1) \
                             ON CONFLICT (name) DO UPDATE SET value = ?1"
                        }
                        None => "DELETE FROM settings WHERE name = 'alerts_after' AND ?1 IS NULL",
                    };
                    sqlx::query(sql)
                        .bind(seq.map(|s| s.to_string()))
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[tokio::test]
    async fn one_read_gives_the_due_webhooks_and_when_the_next_falls_due() {
        let (_dir, store) = Store::temporary().await;
        let (empty, next) = store.webhook_queue(32).await.unwrap();
        assert!(empty.is_empty() && next.is_none(), "nothing queued");
        for job in ["j1", "j2", "j3"] {
            store
                .writer()
                .write(move |conn| {
                    Box::pin(async move {
                        let now = fmt_time(Utc::now());
                        sqlx::query(
                            "INSERT INTO webhook_outbox (job_id, url, status, next_attempt_at, created_at) \
                             VALUES (?, 'http://127.0.0.1:9/hook', 'completed', ?, ?)",
                        )
                        .bind(job)
                        .bind(&now)
                        .bind(&now)
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                })
                .await
                .unwrap();
        }
        // j2's first try failed: its retry falls due in a minute.
        let retry = Utc::now() + Duration::minutes(1);
        let (due, _) = store.webhook_queue(32).await.unwrap();
        let j2 = due.iter().find(|h| h.job_id == "j2").unwrap().id;
        store
            .webhook_tried(j2, false, Some("refused".into()), Some(retry))
            .await
            .unwrap();

        let (due, next) = store.webhook_queue(32).await.unwrap();
        let jobs: Vec<&str> = due.iter().map(|h| h.job_id.as_str()).collect();
        assert_eq!(jobs, ["j1", "j3"], "the due ones, oldest first");
        assert_eq!(next.map(fmt_time), Some(fmt_time(retry)), "then j2's retry");
        // More due than the limit: the rest are due now.
        let (due, next) = store.webhook_queue(1).await.unwrap();
        assert_eq!(due.len(), 1);
        assert!(next.unwrap() <= Utc::now(), "{next:?}");
        // Delivered ones leave the queue.
        for h in store.webhook_queue(32).await.unwrap().0 {
            store.webhook_tried(h.id, true, None, None).await.unwrap();
        }
        let (due, next) = store.webhook_queue(32).await.unwrap();
        assert!(due.is_empty());
        assert_eq!(next.map(fmt_time), Some(fmt_time(retry)));
    }
}
