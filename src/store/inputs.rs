//! Input files: their records, which jobs use them, and what retention may
//! delete.
//!
//! Why records beside the files: the files are content-addressed on disk
//! (`data/inputs/<hex>`), but whether one may be deleted depends on the jobs
//! that name it, which only the database knows.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::model::JobStatus;
use super::{fmt_time, Store, StoreError};

/// An input file as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InputRecord {
    /// `sha256:<64 hex>`.
    pub id: String,
    /// Bytes.
    pub size: i64,
    /// Its type, checked from the bytes.
    pub content_type: String,
    /// The name it was first given, if any.
    pub filename: Option<String>,
    /// When it was first stored.
    pub created_at: DateTime<Utc>,
    /// When a submission last named it.
    pub last_used_at: DateTime<Utc>,
}

/// An input with the jobs that use it.
#[derive(Debug, Clone)]
pub struct InputUse {
    /// The input.
    pub input: InputRecord,
    /// Jobs that name it, newest first, with their status.
    pub jobs: Vec<(String, JobStatus)>,
}

/// What deleting an input led to.
#[derive(Debug, Clone, PartialEq)]
pub enum InputDeletion {
    /// Its record is gone; its file may go.
    Deleted,
    /// Unfinished jobs still need it.
    InUse(Vec<String>),
    /// A submission naming it, or an upload of it, is being stored now.
    Named,
    /// No such input.
    NotFound,
}

/// Inputs named by submissions (or uploads) on their way to the database,
/// and inputs being deleted: the two exclude each other.
///
/// Why: a submission checks that its inputs are stored, and its job is
/// stored a few milliseconds later, with the next batch; a deletion in
/// between left a stored job naming a file that was gone, accepted with a
/// `2xx` and doomed. Likewise an upload of the same bytes during a deletion
/// could have its file removed under its new record. In memory, because
/// both sides are this process: a deletion refuses an input that is named
/// now, and a submission waits for a deletion under way to end (then finds
/// the input missing, and says so).
#[derive(Debug, Default)]
pub(crate) struct InputClaims {
    state: std::sync::Mutex<Claims>,
    /// Rung when a deletion ends.
    deleted: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Claims {
    named: std::collections::HashMap<String, usize>,
    deleting: std::collections::HashSet<String>,
}

/// Inputs a submission or an upload names, held until it is stored or
/// refused: no deletion takes them meanwhile.
#[must_use = "the inputs are free to be deleted once this is dropped"]
pub struct InputsNamed {
    claims: Arc<InputClaims>,
    ids: Vec<String>,
}

impl Drop for InputsNamed {
    fn drop(&mut self) {
        let mut c = self.claims.state.lock().expect("input claims");
        for id in &self.ids {
            if let Some(n) = c.named.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    c.named.remove(id);
                }
            }
        }
    }
}

/// An input being deleted; submissions naming it wait until this drops.
#[must_use = "the deletion is over once this is dropped"]
pub struct InputDeleting {
    claims: Arc<InputClaims>,
    id: String,
}

impl Drop for InputDeleting {
    fn drop(&mut self) {
        self.claims
            .state
            .lock()
            .expect("input claims")
            .deleting
            .remove(&self.id);
        self.claims.deleted.notify_waiters();
    }
}

const INPUT_COLUMNS: &str = "id, size, content_type, filename, created_at, last_used_at";

/// Unfinished jobs that name input `?`.
const UNFINISHED_USERS: &str = "SELECT j.id FROM job_inputs ji JOIN jobs j ON j.id = ji.job_id \
     WHERE ji.input_id = ? AND j.status IN ('queued', 'assigned', 'running')";

impl Store {
    /// Records a stored input file (`false` when it was known already).
    pub async fn add_input(&self, input: InputRecord) -> Result<bool, StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "INSERT INTO inputs (id, size, content_type, filename, created_at, last_used_at) \
                         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                    )
                    .bind(&input.id)
                    .bind(input.size)
                    .bind(&input.content_type)
                    .bind(&input.filename)
                    .bind(fmt_time(input.created_at))
                    .bind(fmt_time(input.last_used_at))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    Ok(n == 1)
                })
            })
            .await
    }

    /// One input.
    pub async fn input(&self, id: &str) -> Result<Option<InputRecord>, StoreError> {
        self.one_by(
            &format!("SELECT {INPUT_COLUMNS} FROM inputs WHERE id = ?"),
            id,
        )
        .await
    }

    /// The size of each of these inputs that is stored, by id (one not
    /// stored is not in the answer).
    pub async fn input_sizes(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let mut sizes = std::collections::HashMap::new();
        for id in ids {
            if let Some(input) = self.input(id).await? {
                sizes.insert(id.clone(), input.size);
            }
        }
        Ok(sizes)
    }

    /// Every input, newest first, with the jobs that use it.
    pub async fn inputs(&self) -> Result<Vec<InputUse>, StoreError> {
        let inputs: Vec<InputRecord> = sqlx::query_as(&format!(
            "SELECT {INPUT_COLUMNS} FROM inputs ORDER BY created_at DESC"
        ))
        .fetch_all(self.reader())
        .await?;
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            let jobs = sqlx::query(
                "SELECT j.id, j.status FROM job_inputs ji JOIN jobs j ON j.id = ji.job_id \
                 WHERE ji.input_id = ? ORDER BY j.seq DESC",
            )
            .bind(&input.id)
            .fetch_all(self.reader())
            .await?
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("status")?)))
            .collect::<Result<_, sqlx::Error>>()?;
            out.push(InputUse { input, jobs });
        }
        Ok(out)
    }

    /// The input ids a job names.
    pub async fn job_input_ids(&self, job_id: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar(
                "SELECT input_id FROM job_inputs WHERE job_id = ? ORDER BY input_id",
            )
            .bind(job_id)
            .fetch_all(self.reader())
            .await?,
        )
    }

    /// Holds `ids` for a submission or an upload until the answer drops:
    /// deletions refuse them meanwhile. Waits for a deletion of any of them
    /// that is under way to end first.
    pub async fn name_inputs(&self, ids: &[String]) -> InputsNamed {
        let claims = &self.input_claims;
        loop {
            let ended = claims.deleted.notified();
            let mut ended = std::pin::pin!(ended);
            // Registered before the look, so an end between the two is not missed.
            ended.as_mut().enable();
            {
                let mut c = claims.state.lock().expect("input claims");
                if !ids.iter().any(|id| c.deleting.contains(id)) {
                    for id in ids {
                        *c.named.entry(id.clone()).or_default() += 1;
                    }
                    return InputsNamed {
                        claims: claims.clone(),
                        ids: ids.to_vec(),
                    };
                }
            }
            ended.await;
        }
    }

    /// Marks `id` as being deleted until the answer drops; `None` while a
    /// submission or an upload names it.
    pub fn start_deleting_input(&self, id: &str) -> Option<InputDeleting> {
        let mut c = self.input_claims.state.lock().expect("input claims");
        if c.named.contains_key(id) || !c.deleting.insert(id.to_string()) {
            return None;
        }
        Some(InputDeleting {
            claims: self.input_claims.clone(),
            id: id.to_string(),
        })
    }

    /// Deletes an input's record unless an unfinished job needs it (the
    /// caller holds [`Store::start_deleting_input`]'s mark).
    pub async fn delete_input(&self, id: &str) -> Result<InputDeletion, StoreError> {
        let id = id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let users: Vec<String> = sqlx::query_scalar(UNFINISHED_USERS)
                        .bind(&id)
                        .fetch_all(&mut *conn)
                        .await?;
                    if !users.is_empty() {
                        return Ok(InputDeletion::InUse(users));
                    }
                    let n = sqlx::query("DELETE FROM inputs WHERE id = ?")
                        .bind(&id)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    Ok(if n == 1 {
                        InputDeletion::Deleted
                    } else {
                        InputDeletion::NotFound
                    })
                })
            })
            .await
    }

    /// Inputs that no unfinished job uses and that nothing used since
    /// `before`: retention may delete them.
    pub async fn stale_inputs(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<InputRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {INPUT_COLUMNS} FROM inputs i WHERE last_used_at < ? AND NOT EXISTS \
             (SELECT 1 FROM job_inputs ji JOIN jobs j ON j.id = ji.job_id \
              WHERE ji.input_id = i.id AND j.status IN ('queued', 'assigned', 'running')) \
             ORDER BY last_used_at LIMIT ?"
        ))
        .bind(fmt_time(before))
        .bind(limit)
        .fetch_all(self.reader())
        .await?)
    }
}
