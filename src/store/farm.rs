//! What the farm did over a time window: every attempt (which backend,
//! from its lease to its end), completions, and the queue over time.
//!
//! Why from the database: the farm view must show last night as it was,
//! after restarts; the leases already say when each attempt ran where, so
//! only the queue depth needs a sample of its own (`farm_samples`, one row
//! a minute).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{fmt_time, LeaseOutcome, Store, StoreError};

/// One attempt of one job on one backend.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Attempt {
    /// The job.
    pub job_id: String,
    /// Its attempt number.
    pub attempt: i64,
    /// Where it ran.
    pub backend_id: String,
    /// Its template (`null` for an inline graph).
    pub workflow_id: Option<String>,
    /// When the backend was given it.
    pub leased_at: DateTime<Utc>,
    /// When ComfyUI started running it (`null` if it never did).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended (`null` while it runs).
    pub finished_at: Option<DateTime<Utc>>,
    /// How it ended (`null` while it runs).
    pub outcome: Option<LeaseOutcome>,
}

/// The queue at one moment.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct QueueSample {
    /// When.
    pub at: DateTime<Utc>,
    /// Jobs waiting for a backend.
    pub queued: i64,
    /// Jobs on backends (assigned or running).
    pub running: i64,
}

/// How long queue samples are kept.
const SAMPLES_KEPT_DAYS: i64 = 8;

impl Store {
    /// The attempts that overlap `[from, to)`, oldest lease first, at most
    /// `max` (and whether there were more).
    pub async fn attempts_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        max: i64,
    ) -> Result<(Vec<Attempt>, bool), StoreError> {
        let cols = "l.job_id, l.attempt, l.backend_id, j.workflow_id, l.leased_at, l.started_at, \
                    l.finished_at, l.outcome";
        let sql = format!(
            "SELECT * FROM ( \
               SELECT {cols} FROM leases l INDEXED BY leases_by_finished JOIN jobs j ON j.id = l.job_id \
               WHERE l.finished_at IS NOT NULL AND l.finished_at >= ?1 AND l.leased_at < ?2 \
               UNION ALL \
               SELECT {cols} FROM leases l INDEXED BY leases_open JOIN jobs j ON j.id = l.job_id \
               WHERE l.finished_at IS NULL AND l.leased_at < ?2) \
             ORDER BY leased_at LIMIT ?3"
        );
        let mut rows: Vec<Attempt> = sqlx::query_as(&sql)
            .bind(fmt_time(from))
            .bind(fmt_time(to))
            .bind(max + 1)
            .fetch_all(self.reader())
            .await?;
        let more = rows.len() as i64 > max;
        rows.truncate(max as usize);
        Ok((rows, more))
    }

    /// When each job completed in `[from, to)`.
    pub async fn completions_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>, StoreError> {
        let rows: Vec<(DateTime<Utc>,)> = sqlx::query_as(
            "SELECT finished_at FROM jobs INDEXED BY jobs_by_finished \
             WHERE finished_at >= ? AND finished_at < ? AND status = 'completed' ORDER BY finished_at",
        )
        .bind(fmt_time(from))
        .bind(fmt_time(to))
        .fetch_all(self.reader())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The queue samples in `[from, to)`.
    pub async fn queue_samples(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<QueueSample>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT at, queued, running FROM farm_samples WHERE at >= ? AND at < ? ORDER BY at",
        )
        .bind(fmt_time(from))
        .bind(fmt_time(to))
        .fetch_all(self.reader())
        .await?)
    }

    /// Records the queue now, and forgets samples older than a week.
    pub async fn sample_queue(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT OR REPLACE INTO farm_samples (at, queued, running) VALUES (?, \
                         (SELECT count(*) FROM jobs WHERE status = 'queued'), \
                         (SELECT count(*) FROM jobs WHERE status IN ('assigned', 'running')))",
                    )
                    .bind(fmt_time(now))
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query("DELETE FROM farm_samples WHERE at < ?")
                        .bind(fmt_time(now - Duration::days(SAMPLES_KEPT_DAYS)))
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }
}
