//! Storing new jobs: many concurrent submissions share one statement and
//! one commit.
//!
//! Why batch here and not in the writer: a submission is one row, and a
//! burst of them is best written as one multi-row `INSERT` (a trigger adds
//! each job's metadata rows and first event), with one read for all their
//! idempotency keys. The caller still gets its own answer, once the batch is
//! on disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Timelike, Utc};
use serde_json::Value;
use sqlx::{FromRow, QueryBuilder, Row, Sqlite, SqliteConnection};

use super::model::{JobStatus, JobSummary, NewJob, SubmitOutcome};
use super::{fmt_time, parse_time, writer, Store, StoreError};

/// A submission waiting for its batch, and where its answer goes.
pub(super) type PendingSubmission = (
    EncodedJob,
    tokio::sync::oneshot::Sender<Result<SubmitOutcome, StoreError>>,
);

/// A new job with its JSON columns already written out.
///
/// Why: every batch of submissions is stored by the one writer, one batch
/// after the other, so whatever the writer does for a job limits how many
/// jobs a second the service stores. Serializing a job's JSON (and freeing
/// its parsed trees) is work each submission can do on its own task, in
/// parallel with the others, before it joins a batch.
pub(super) struct EncodedJob {
    id: String,
    workflow_id: Option<String>,
    priority: i64,
    requires: String,
    max_attempts: i64,
    idempotency_key: Option<String>,
    manifest_hash: String,
    manifest: String,
    parameters: String,
    metadata: String,
    graph: String,
    callback_url: Option<String>,
    timeout_s: Option<i64>,
    inputs: String,
    affinity: Option<String>,
    parents: Vec<String>,
    paused: bool,
    not_before: Option<String>,
    share: Option<String>,
    hold: Option<(String, String)>,
}

impl From<NewJob> for EncodedJob {
    fn from(job: NewJob) -> Self {
        EncodedJob {
            id: job.id,
            workflow_id: job.workflow_id,
            priority: job.priority,
            requires: Value::from(job.requires).to_string(),
            max_attempts: job.max_attempts as i64,
            idempotency_key: job.idempotency_key,
            manifest_hash: job.manifest_hash,
            manifest: job.manifest.to_string(),
            parameters: job.parameters.to_string(),
            metadata: Value::Object(job.metadata).to_string(),
            graph: job.graph.to_string(),
            callback_url: job.callback_url,
            timeout_s: job.timeout_s,
            inputs: Value::from(job.inputs).to_string(),
            affinity: job.affinity,
            parents: job.parents,
            paused: job.paused,
            not_before: job.start_after.map(fmt_time),
            share: job.share,
            hold: job.hold,
        }
    }
}

/// Hands out submission times that never go backwards, so that the order of
/// `seq` is the order of `submitted_at` and time filters become seq ranges.
#[derive(Clone, Default)]
pub(super) struct SubmitClock(Arc<Mutex<DateTime<Utc>>>);

impl SubmitClock {
    fn starting_after(t: DateTime<Utc>) -> Self {
        SubmitClock(Arc::new(Mutex::new(t)))
    }

    pub(super) fn next(&self) -> DateTime<Utc> {
        let mut last = self.0.lock().expect("clock");
        let now = Utc::now();
        let t = if now > *last {
            now
        } else {
            *last + chrono::Duration::microseconds(1)
        };
        // Stored with microsecond precision: keep the in-memory value equal.
        let t = t
            .with_nanosecond(t.nanosecond() / 1_000 * 1_000)
            .unwrap_or(t);
        *last = t;
        t
    }

    /// Moves the clock past `t` (after rows were written with other times).
    #[cfg_attr(not(feature = "bench-support"), allow(dead_code))]
    pub(super) fn advance_to(&self, t: DateTime<Utc>) {
        let mut last = self.0.lock().expect("clock");
        if t > *last {
            *last = t;
        }
    }
}

/// Gathers the submissions waiting while the previous batch was written and
/// stores them together. Ends when every `Store` (holding the sending side)
/// is gone.
pub(super) async fn batch_submissions(
    writer: writer::Writer,
    clock: SubmitClock,
    mut rx: tokio::sync::mpsc::Receiver<PendingSubmission>,
    max_batch: usize,
) {
    while let Some(first) = rx.recv().await {
        let mut pending = vec![first];
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => pending.push(p),
                Err(_) => break,
            }
        }
        let (jobs, answers): (Vec<EncodedJob>, Vec<_>) = pending.into_iter().unzip();
        let clock = clock.clone();
        // One INSERT, plus a read: atomic without a savepoint.
        let stored = writer
            .write_single(move |conn| {
                Box::pin(async move { insert_jobs(conn, jobs, &clock).await })
            })
            .await;
        match stored {
            Ok(outcomes) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
            }
            Err(e) => {
                for answer in answers {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Store {
    pub(super) async fn load_submit_clock(&self) -> Result<SubmitClock, StoreError> {
        let last: Option<String> = sqlx::query_scalar("SELECT max(submitted_at) FROM jobs")
            .fetch_one(self.reader())
            .await?;
        Ok(SubmitClock::starting_after(
            last.as_deref().and_then(parse_time).unwrap_or_default(),
        ))
    }

    /// The statuses of these jobs, of those that exist (a submission that
    /// starts from them checks them first).
    pub async fn job_statuses(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, JobStatus>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT id, status FROM jobs WHERE 1 = 1");
        super::rows::push_in(&mut q, "id", ids);
        let rows: Vec<(String, JobStatus)> = q.build_query_as().fetch_all(self.reader()).await?;
        Ok(rows.into_iter().collect())
    }

    /// The jobs holding these idempotency keys, of those that exist: key →
    /// job id (a submission that starts from a job named by its key).
    pub async fn jobs_by_keys(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, String>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT idempotency_key, id FROM jobs WHERE 1 = 1");
        super::rows::push_in(&mut q, "idempotency_key", keys);
        let rows: Vec<(String, String)> = q.build_query_as().fetch_all(self.reader()).await?;
        Ok(rows.into_iter().collect())
    }

    /// Stores a job durably (or finds the earlier one with the same
    /// idempotency key). Returns once the commit is on disk.
    pub async fn submit(&self, job: NewJob) -> Result<SubmitOutcome, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submissions
            .send((job.into(), tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Earlier jobs holding any of these idempotency keys: key → (manifest hash, job).
async fn known_keys(
    conn: &mut SqliteConnection,
    keys: &[String],
) -> Result<HashMap<String, (String, JobSummary)>, StoreError> {
    let mut known = HashMap::new();
    if keys.is_empty() {
        return Ok(known);
    }
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT id, status, submitted_at, manifest_hash, idempotency_key FROM jobs WHERE 1 = 1",
    );
    super::rows::push_in(&mut q, "idempotency_key", keys);
    for row in q.build().fetch_all(&mut *conn).await? {
        known.insert(
            row.try_get("idempotency_key")?,
            (row.try_get("manifest_hash")?, JobSummary::from_row(&row)?),
        );
    }
    Ok(known)
}

/// Of the jobs these new ones start from, those that have not completed,
/// with their status (most submissions name none, and cost no read).
async fn unfinished_parents(
    conn: &mut SqliteConnection,
    jobs: &[EncodedJob],
) -> Result<HashMap<String, JobStatus>, StoreError> {
    let mut ids: Vec<String> = jobs.iter().flat_map(|j| j.parents.clone()).collect();
    if ids.is_empty() {
        return Ok(Default::default());
    }
    ids.sort();
    ids.dedup();
    let mut q: QueryBuilder<Sqlite> =
        QueryBuilder::new("SELECT id, status FROM jobs WHERE status <> 'completed'");
    super::rows::push_in(&mut q, "id", &ids);
    let found: Vec<(String, JobStatus)> = q.build_query_as().fetch_all(&mut *conn).await?;
    Ok(found.into_iter().collect())
}

/// Stores a batch of submissions with one multi-row INSERT (plus one read
/// for their idempotency keys), in submission order. Each gets its own
/// outcome: created, the earlier job with the same key, or a conflict.
async fn insert_jobs(
    conn: &mut SqliteConnection,
    jobs: Vec<EncodedJob>,
    clock: &SubmitClock,
) -> Result<Vec<Result<SubmitOutcome, StoreError>>, StoreError> {
    let keys: Vec<String> = jobs
        .iter()
        .filter_map(|j| j.idempotency_key.clone())
        .collect();
    let mut known = known_keys(conn, &keys).await?;
    let unfinished = unfinished_parents(conn, &jobs).await?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut rows: Vec<(EncodedJob, DateTime<Utc>, JobStatus)> = Vec::new();
    // Batches the farm may hold, as this transaction finds them.
    let mut held: HashMap<(String, String), bool> = HashMap::new();
    for mut job in jobs {
        if let Some(key) = &job.idempotency_key {
            if let Some((hash, summary)) = known.get(key) {
                outcomes.push(if *hash == job.manifest_hash {
                    Ok(SubmitOutcome::Existing(summary.clone()))
                } else {
                    Err(StoreError::Conflict(format!(
                        "idempotency_key `{key}` was already used by job {} with a different manifest",
                        summary.id
                    )))
                });
                continue;
            }
        }
        // Read in the writer's transaction: no parent can end in between.
        // One that ended unsuccessfully since the submission's check (which
        // refuses the ordinary case) is refused the same way: stored, the
        // job would wait for a parent that ended, its failure never coming.
        let ended = job.parents.iter().find_map(|p| {
            unfinished
                .get(p)
                .filter(|s| matches!(s, JobStatus::Failed | JobStatus::Cancelled))
                .map(|s| (p, s))
        });
        if let Some((parent, s)) = ended {
            outcomes.push(Err(StoreError::Conflict(format!(
                "job {parent} is {s}; retry it first (POST /api/job/{parent}/retry), then submit this one"
            ))));
            continue;
        }
        let now = clock.next();
        let status = if job.parents.iter().any(|p| unfinished.contains_key(p)) {
            JobStatus::Waiting
        } else {
            JobStatus::Queued
        };
        if let Some(hold) = job.hold.take() {
            let is_held = match held.get(&hold) {
                Some(h) => *h,
                None => {
                    let h = super::holds::is_held(conn, &hold.0, &hold.1).await?;
                    held.insert(hold, h);
                    h
                }
            };
            job.paused |= is_held;
        }
        let summary = JobSummary {
            id: job.id.clone(),
            status,
            submitted_at: now,
            paused: job.paused,
        };
        if let Some(key) = &job.idempotency_key {
            // A second submission with this key in the same batch finds this one.
            known.insert(key.clone(), (job.manifest_hash.clone(), summary.clone()));
        }
        outcomes.push(Ok(SubmitOutcome::Created(summary)));
        rows.push((job, now, status));
    }
    if rows.is_empty() {
        return Ok(outcomes);
    }
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "INSERT INTO jobs (id, workflow_id, status, priority, requires, max_attempts, \
         idempotency_key, manifest_hash, manifest, parameters, metadata, graph, callback_url, \
         timeout_s, inputs, affinity, parents, paused_at, not_before, share, submitted_at, updated_at) ",
    );
    q.push_values(rows, |mut b, (job, now, status)| {
        let now_s = fmt_time(now);
        b.push_bind(job.id)
            .push_bind(job.workflow_id)
            .push_bind(status)
            .push_bind(job.priority)
            .push_bind(job.requires)
            .push_bind(job.max_attempts)
            .push_bind(job.idempotency_key)
            .push_bind(job.manifest_hash)
            .push_bind(job.manifest)
            .push_bind(job.parameters)
            .push_bind(job.metadata)
            .push_bind(job.graph)
            .push_bind(job.callback_url)
            .push_bind(job.timeout_s)
            .push_bind(job.inputs)
            .push_bind(job.affinity)
            .push_bind(Value::from(job.parents).to_string())
            .push_bind(job.paused.then(|| now_s.clone()))
            .push_bind(job.not_before)
            .push_bind(job.share)
            .push_bind(now_s.clone())
            .push_bind(now_s);
    });
    // Metadata rows and the `submitted` event come from the jobs_submitted trigger.
    q.build().execute(&mut *conn).await?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blur with no backend to run it, starting from `parents`.
    fn job(parents: &[&str]) -> NewJob {
        NewJob {
            id: uuid::Uuid::now_v7().to_string(),
            workflow_id: None,
            priority: 0,
            requires: vec![],
            max_attempts: 3,
            idempotency_key: None,
            manifest_hash: "h".into(),
            manifest: serde_json::json!({}),
            parameters: serde_json::json!({}),
            metadata: Default::default(),
            graph: serde_json::json!({}),
            callback_url: None,
            timeout_s: None,
            inputs: vec![],
            parents: parents.iter().map(|p| p.to_string()).collect(),
            affinity: None,
            paused: false,
            start_after: None,
            share: None,
            hold: None,
        }
    }

    /// The submission's check refuses a job whose parent failed or was
    /// cancelled; one that ends between that check and the insert is
    /// refused at the insert, not stored waiting for ever.
    #[tokio::test]
    async fn a_job_whose_parent_ended_unsuccessfully_before_its_insert_is_refused() {
        let (_dir, store) = super::super::Store::temporary().await;
        let created = |o: SubmitOutcome| match o {
            SubmitOutcome::Created(s) => s,
            other => panic!("{other:?}"),
        };
        let parent = created(store.submit(job(&[])).await.unwrap());
        let waiting = created(store.submit(job(&[&parent.id])).await.unwrap());
        assert_eq!(waiting.status, JobStatus::Waiting);
        store.request_cancel(&parent.id).await.unwrap();
        match store.submit(job(&[&parent.id])).await {
            Err(StoreError::Conflict(m)) => assert!(
                m.contains(&format!("job {} is cancelled; retry it first", parent.id)),
                "{m}"
            ),
            other => panic!("stored: {other:?}"),
        }
        // The one stored before the cancel failed with it.
        let statuses = store
            .job_statuses(std::slice::from_ref(&waiting.id))
            .await
            .unwrap();
        assert_eq!(statuses[&waiting.id], JobStatus::Failed);
    }

    #[test]
    fn submission_times_only_go_forward_and_read_back_as_stored() {
        let clock = SubmitClock::starting_after(Utc::now() + chrono::Duration::seconds(1));
        let mut last = None;
        for _ in 0..1_000 {
            let t = clock.next();
            assert_eq!(parse_time(&fmt_time(t)), Some(t), "microseconds, as stored");
            if let Some(l) = last {
                assert!(t > l, "{t} after {l}");
            }
            last = Some(t);
        }
    }
}
