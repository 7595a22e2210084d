//! What retention may free: collected outputs of jobs finished long ago
//! (their records stay, marked pruned), and old progress events (state
//! changes stay for ever). Inputs are in `inputs.rs`.
//!
//! Why in batches: the sweeper runs beside a busy farm, so each write is a
//! bounded batch that holds the writer for milliseconds, not a night's
//! history in one transaction.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{fmt_time, Store, StoreError};

/// An output file retention may delete.
#[derive(Debug, Clone)]
pub struct StaleOutput {
    /// Its job.
    pub job_id: String,
    /// Its name in the job's folder.
    pub name: String,
    /// Its size.
    pub size: i64,
}

impl Store {
    /// Outputs not yet pruned of jobs that ended before `before`, oldest
    /// first; not those of a job another job still to end starts from (its
    /// second pass needs them, as a queued job needs its inputs).
    pub async fn stale_outputs(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<StaleOutput>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.job_id, o.name, o.size FROM jobs j INDEXED BY jobs_by_finished \
             JOIN outputs o ON o.job_id = j.id \
             WHERE j.finished_at IS NOT NULL AND j.finished_at < ? \
             AND j.status IN ('completed', 'failed', 'cancelled') AND o.pruned_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM job_parents p JOIN jobs c ON c.id = p.job_id \
                 WHERE p.parent_id = j.id \
                 AND c.status NOT IN ('completed', 'failed', 'cancelled')) \
             ORDER BY j.finished_at LIMIT ?",
        )
        .bind(fmt_time(before))
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StaleOutput {
                    job_id: r.try_get("job_id")?,
                    name: r.try_get("name")?,
                    size: r.try_get("size")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Marks outputs whose files were deleted.
    pub async fn outputs_pruned(&self, outputs: Vec<(String, String)>) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let now = fmt_time(Utc::now());
                    for (job, name) in &outputs {
                        sqlx::query(
                            "UPDATE outputs SET pruned_at = ? WHERE job_id = ? AND name = ?",
                        )
                        .bind(&now)
                        .bind(job)
                        .bind(name)
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .await
    }

    /// Deletes up to `limit` progress events older than `before`; how many.
    pub async fn prune_progress(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    Ok(sqlx::query(
                        "DELETE FROM job_events WHERE seq IN (SELECT seq FROM job_events \
                         INDEXED BY job_events_progress WHERE kind = 'progress' AND at < ? \
                         ORDER BY seq LIMIT ?)",
                    )
                    .bind(fmt_time(before))
                    .bind(limit)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected())
                })
            })
            .await
    }

    /// The database file's size in bytes (pages in use and free).
    pub async fn database_bytes(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        )
        .fetch_one(self.reader())
        .await?)
    }
}
