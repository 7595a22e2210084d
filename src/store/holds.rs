//! A batch the farm found broken is held: its jobs that have not started
//! are paused, and so is each job submitted for it after, until it is
//! resumed.
//!
//! Why in the store, in a table of its own (V19): a hold must outlive a
//! restart (a broken batch fed one shot at a time would otherwise run and
//! fail its next shots all night after one); a submission must read it in
//! the transaction of its insert (a hold let go an instant before is not
//! applied, one set an instant before is); and it must end when the
//! batch's last paused job stops being paused, however that happens
//! (resumed, cancelled, failed with a job it starts from), which a trigger
//! sees where no code of ours runs.

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection};

use super::batch::Batch;
use super::events::{push_event, EventInput};
use super::model::JobStatus;
use super::{fmt_time, parse_time, Store, StoreError};

/// A batch the farm holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldBatch {
    /// The metadata field naming a batch (`dispatch.batch_field`).
    pub field: String,
    /// The batch: the field's value as `job_metadata` keeps it.
    pub batch: String,
    /// The failure that broke it (`failure_cause`).
    pub cause: String,
    /// Each held job's `paused` event.
    pub why: String,
    /// What `GET /api/health` warns with while it is held.
    pub banner: String,
    /// Since when.
    pub held_at: DateTime<Utc>,
}

impl HeldBatch {
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, StoreError> {
        let held_at: String = row.try_get("held_at")?;
        Ok(HeldBatch {
            field: row.try_get("field")?,
            batch: row.try_get("batch")?,
            cause: row.try_get("cause")?,
            why: row.try_get("why")?,
            banner: row.try_get("banner")?,
            held_at: parse_time(&held_at).unwrap_or_default(),
        })
    }
}

impl Store {
    /// Holds a batch and pauses its jobs that have not started, in one
    /// transaction; their ids. Holding it again (another cause) replaces
    /// the hold.
    pub async fn hold_batch(&self, hold: HeldBatch) -> Result<Vec<String>, StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let mut b = Batch::default();
                    b.push(
                        "INSERT OR REPLACE INTO held_batches (field, batch, cause, why, banner, held_at) \
                         VALUES (?, ?, ?, ?, ?, ?)",
                    )
                    .bind(hold.field.clone())
                    .bind(hold.batch.clone())
                    .bind(hold.cause)
                    .bind(hold.why.clone())
                    .bind(hold.banner)
                    .bind(fmt_time(hold.held_at));
                    let ids = pause_into(conn, &mut b, &hold.field, &hold.batch, &hold.why).await?;
                    b.run(conn).await?;
                    Ok(ids)
                })
            })
            .await
    }

    /// Pauses every job of a batch (metadata `key` = `value`) that has not
    /// started and is not paused yet, each with a `paused` event whose
    /// message is `why`, in one transaction; their ids.
    pub async fn pause_batch(
        &self,
        key: &str,
        value: &str,
        why: String,
    ) -> Result<Vec<String>, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let mut b = Batch::default();
                    let ids = pause_into(conn, &mut b, &key, &value, &why).await?;
                    b.run(conn).await?;
                    Ok(ids)
                })
            })
            .await
    }

    /// Every batch held, oldest hold first.
    pub async fn held_batches(&self) -> Result<Vec<HeldBatch>, StoreError> {
        let rows = sqlx::query("SELECT * FROM held_batches ORDER BY held_at")
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(HeldBatch::from_row).collect()
    }

    /// The hold of one batch, if it is held.
    pub async fn held_batch(
        &self,
        field: &str,
        batch: &str,
    ) -> Result<Option<HeldBatch>, StoreError> {
        let row = sqlx::query("SELECT * FROM held_batches WHERE field = ? AND batch = ?")
            .bind(field)
            .bind(batch)
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(HeldBatch::from_row).transpose()
    }

    /// Lets a batch go: its jobs submitted from now are not held. Whether
    /// it was held. (Its paused jobs stay paused: each is resumed as a
    /// job, `Farm::resume_batch`.)
    pub async fn release_batch(&self, field: &str, batch: &str) -> Result<bool, StoreError> {
        let (field, batch) = (field.to_string(), batch.to_string());
        self.writer()
            .write_single(move |conn| {
                Box::pin(async move {
                    let done =
                        sqlx::query("DELETE FROM held_batches WHERE field = ? AND batch = ?")
                            .bind(field)
                            .bind(batch)
                            .execute(&mut *conn)
                            .await?;
                    Ok(done.rows_affected() > 0)
                })
            })
            .await
    }

    /// The ids of a batch's paused jobs, oldest first.
    pub async fn paused_in_batch(
        &self,
        field: &str,
        batch: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT j.id FROM job_metadata m JOIN jobs j ON j.seq = m.job_seq \
             WHERE m.key = ? AND m.value = ? AND j.paused_at IS NOT NULL ORDER BY j.seq",
        )
        .bind(field)
        .bind(batch)
        .fetch_all(self.reader())
        .await?)
    }
}

/// Whether a batch is held, read in the writer's transaction (a
/// submission's insert).
pub(super) async fn is_held(
    conn: &mut SqliteConnection,
    field: &str,
    batch: &str,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM held_batches WHERE field = ? AND batch = ?)",
    )
    .bind(field)
    .bind(batch)
    .fetch_one(&mut *conn)
    .await?)
}

/// Adds to `b` the pause of a batch's jobs that have not started and are
/// not paused, each with its `paused` event (`why`, by the farm); their ids.
async fn pause_into(
    conn: &mut SqliteConnection,
    b: &mut Batch<'_>,
    key: &str,
    value: &str,
    why: &str,
) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query(
        "SELECT j.id, j.status FROM job_metadata m JOIN jobs j ON j.seq = m.job_seq \
         WHERE m.key = ? AND m.value = ? AND j.status IN ('queued', 'waiting') \
         AND j.paused_at IS NULL",
    )
    .bind(key)
    .bind(value)
    .fetch_all(&mut *conn)
    .await?;
    let now = fmt_time(Utc::now());
    let mut ids = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.try_get("id")?;
        let status: JobStatus = r.try_get("status")?;
        b.push("UPDATE jobs SET paused_at = ?, updated_at = ? WHERE id = ?")
            .bind(now.clone())
            .bind(now.clone())
            .bind(id.clone());
        let ev = EventInput {
            kind: "paused",
            status: Some(status),
            message: Some(why.to_string()),
            data: Some(serde_json::json!({"batch": value, "by": "farm"})),
            ..Default::default()
        };
        push_event(b, &id, ev, &now);
        ids.push(id);
    }
    Ok(ids)
}
