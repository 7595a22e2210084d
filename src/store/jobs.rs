//! Jobs: submission, lookup, history and the events of each job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use utoipa::ToSchema;

use super::{fmt_time, parse_time, Store, StoreError};

/// States a job can be in; see DESIGN.md.
pub mod status {
    /// Waiting for a backend.
    pub const QUEUED: &str = "queued";
    /// Leased to a backend, prompt id chosen; submitted or about to be.
    pub const ASSIGNED: &str = "assigned";
    /// The backend started it.
    pub const RUNNING: &str = "running";
    /// Finished, outputs collected.
    pub const COMPLETED: &str = "completed";
    /// Finished without success, no attempts left (or not retryable).
    pub const FAILED: &str = "failed";
    /// Cancelled by a user.
    pub const CANCELLED: &str = "cancelled";
    /// Every state, in lifecycle order.
    pub const ALL: [&str; 6] = [QUEUED, ASSIGNED, RUNNING, COMPLETED, FAILED, CANCELLED];
    /// States a job never leaves.
    pub fn is_terminal(s: &str) -> bool {
        matches!(s, COMPLETED | FAILED | CANCELLED)
    }
}

/// A validated, bound job ready to be stored.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job id, chosen before the write.
    pub id: String,
    /// Template id, or `None` for an inline graph.
    pub workflow_id: Option<String>,
    /// Higher runs first.
    pub priority: i64,
    /// Backend tags the job needs.
    pub requires: Vec<String>,
    /// Run-time failures allowed before the job fails.
    pub max_attempts: u32,
    /// Client's key for safe re-submission.
    pub idempotency_key: Option<String>,
    /// Hash of the manifest, to tell a retry from a different job under the same key.
    pub manifest_hash: String,
    /// The manifest as submitted.
    pub manifest: Value,
    /// Every parameter with its bound value (defaults included).
    pub parameters: Value,
    /// Client metadata (an object).
    pub metadata: serde_json::Map<String, Value>,
    /// The ComfyUI API-format graph to run.
    pub graph: Value,
    /// Where to POST the summary when the job ends.
    pub callback_url: Option<String>,
}

/// What a submission led to.
#[derive(Debug, Clone)]
pub enum SubmitOutcome {
    /// A new job was stored.
    Created(JobSummary),
    /// The idempotency key named an earlier job with the same manifest.
    Existing(JobSummary),
}

/// The few fields a submission answers with.
#[derive(Debug, Clone)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Current status.
    pub status: String,
    /// When it was stored.
    pub submitted_at: DateTime<Utc>,
}

/// Everything known about a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// Template id; `null` for an inline graph.
    pub workflow_id: Option<String>,
    /// `queued`, `assigned`, `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// Higher runs first.
    pub priority: i64,
    /// Backend tags the job needs.
    pub requires: Vec<String>,
    /// Run-time failures allowed.
    pub max_attempts: i64,
    /// Attempts made so far (a lost backend does not count).
    pub attempts: i64,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Bound parameter values, defaults included.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// Client metadata.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Backend holding the job now (or that ran it last).
    pub backend_id: Option<String>,
    /// ComfyUI prompt id of the current attempt.
    pub prompt_id: Option<String>,
    /// Progress of a running job: node, step value and max.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Value>,
    /// Why the job failed, as the backend said it.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// Webhook URL.
    pub callback_url: Option<String>,
    /// RFC 3339 UTC.
    pub submitted_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When a backend first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Earliest time of the next attempt (retry back-off).
    pub not_before: Option<DateTime<Utc>>,
    /// The manifest as submitted (full view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub manifest: Option<Value>,
    /// The bound graph sent to ComfyUI (full view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub graph: Option<Value>,
    #[serde(skip)]
    pub(crate) seq: i64,
}

/// A job's workflow and times.
#[derive(Debug, Clone)]
pub struct JobTimes {
    /// Template id.
    pub workflow_id: Option<String>,
    /// When it was stored.
    pub submitted_at: DateTime<Utc>,
    /// When a backend first started it.
    pub started_at: Option<DateTime<Utc>>,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobEvent {
    /// Global order of events (the SSE event id).
    pub seq: i64,
    /// The job; `null` for a backend event.
    pub job_id: Option<String>,
    /// The job's workflow.
    pub workflow_id: Option<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Job events: `submitted`, `assigned`, `submitted_to_backend`, `running`,
    /// `progress`, `completed`, `failed`, `retry_scheduled`, `requeued`,
    /// `cancel_requested`, `cancelled`, `retried`. Backend events:
    /// `backend_online`, `backend_offline`.
    pub kind: String,
    /// Job status after the event.
    pub status: Option<String>,
    /// Backend involved.
    pub backend_id: Option<String>,
    /// Attempt number.
    pub attempt: Option<i64>,
    /// A sentence for people.
    pub message: Option<String>,
    /// Details (error bodies, prompt ids).
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// Filters of the history query; every one is served by an index.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Any of these statuses.
    pub statuses: Vec<String>,
    /// Template id.
    pub workflow_id: Option<String>,
    /// Backend that holds or ran the job.
    pub backend_id: Option<String>,
    /// Submitted at or after.
    pub submitted_after: Option<DateTime<Utc>>,
    /// Submitted strictly before.
    pub submitted_before: Option<DateTime<Utc>>,
    /// `metadata.KEY=VALUE` pairs, all of which must match.
    pub metadata: Vec<(String, String)>,
    /// Page size.
    pub limit: u32,
    /// Keyset: only jobs older than this position (from a cursor).
    pub before_seq: Option<i64>,
}

/// One page of history, newest first.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobRecord>,
    /// Position to continue from, if there may be more.
    pub next_before_seq: Option<i64>,
}

const JOB_COLUMNS: &str =
    "seq, id, workflow_id, status, priority, requires, max_attempts, attempts, \
    idempotency_key, parameters, metadata, backend_id, prompt_id, progress, error, callback_url, \
    submitted_at, updated_at, started_at, finished_at, not_before, lease_token, last_backend_id";

fn time_col(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let s: Option<String> = row.try_get(col)?;
    Ok(s.as_deref().and_then(parse_time))
}

fn json_col(row: &SqliteRow, col: &str) -> Result<Option<Value>, sqlx::Error> {
    let s: Option<String> = row.try_get(col)?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
}

pub(crate) fn job_from_row(row: &SqliteRow) -> Result<JobRecord, sqlx::Error> {
    Ok(JobRecord {
        seq: row.try_get("seq")?,
        job_id: row.try_get("id")?,
        workflow_id: row.try_get("workflow_id")?,
        status: row.try_get("status")?,
        priority: row.try_get("priority")?,
        requires: json_col(row, "requires")?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
        max_attempts: row.try_get("max_attempts")?,
        attempts: row.try_get("attempts")?,
        idempotency_key: row.try_get("idempotency_key")?,
        parameters: json_col(row, "parameters")?.unwrap_or(Value::Null),
        metadata: json_col(row, "metadata")?.unwrap_or(Value::Null),
        backend_id: row.try_get("backend_id")?,
        prompt_id: row.try_get("prompt_id")?,
        progress: json_col(row, "progress")?,
        error: json_col(row, "error")?,
        callback_url: row.try_get("callback_url")?,
        submitted_at: time_col(row, "submitted_at")?.unwrap_or_default(),
        updated_at: time_col(row, "updated_at")?.unwrap_or_default(),
        started_at: time_col(row, "started_at")?,
        finished_at: time_col(row, "finished_at")?,
        not_before: time_col(row, "not_before")?,
        manifest: None,
        graph: None,
    })
}

pub(crate) const EVENT_COLUMNS: &str =
    "seq, job_id, workflow_id, at, kind, status, backend_id, attempt, message, data";

pub(crate) fn event_from_row(row: &SqliteRow) -> Result<JobEvent, sqlx::Error> {
    Ok(JobEvent {
        seq: row.try_get("seq")?,
        job_id: row.try_get("job_id")?,
        workflow_id: row.try_get("workflow_id")?,
        at: time_col(row, "at")?.unwrap_or_default(),
        kind: row.try_get("kind")?,
        status: row.try_get("status")?,
        backend_id: row.try_get("backend_id")?,
        attempt: row.try_get("attempt")?,
        message: row.try_get("message")?,
        data: json_col(row, "data")?,
    })
}

/// Fields of one event to append.
#[derive(Debug, Clone, Default)]
pub struct EventInput<'a> {
    /// Kind of event.
    pub kind: &'a str,
    /// Status after it.
    pub status: Option<&'a str>,
    /// Backend involved.
    pub backend_id: Option<&'a str>,
    /// Attempt number.
    pub attempt: Option<i64>,
    /// Sentence for people.
    pub message: Option<String>,
    /// Details.
    pub data: Option<Value>,
}

/// Appends one event to a job's log, inside the caller's transaction.
pub(crate) async fn append_event(
    conn: &mut SqliteConnection,
    job_id: &str,
    ev: EventInput<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, attempt, message, data) \
         VALUES (?1, (SELECT workflow_id FROM jobs WHERE id = ?1), ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(job_id)
    .bind(fmt_time(Utc::now()))
    .bind(ev.kind)
    .bind(ev.status)
    .bind(ev.backend_id)
    .bind(ev.attempt)
    .bind(ev.message)
    .bind(ev.data.map(|d| d.to_string()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Hands out submission times that never go backwards, so that the order of
/// `seq` is the order of `submitted_at` and time filters become seq ranges.
#[derive(Clone, Default)]
pub(crate) struct SubmitClock(Arc<Mutex<DateTime<Utc>>>);

impl SubmitClock {
    pub(crate) fn starting_after(t: DateTime<Utc>) -> Self {
        SubmitClock(Arc::new(Mutex::new(t)))
    }
    fn next(&self) -> DateTime<Utc> {
        let mut last = self.0.lock().expect("clock");
        let now = Utc::now();
        let t = if now > *last {
            now
        } else {
            *last + chrono::Duration::microseconds(1)
        };
        // Stored with microsecond precision: keep the in-memory value equal.
        let t = parse_time(&fmt_time(t)).unwrap_or(t);
        *last = t;
        t
    }
}

impl Store {
    pub(crate) async fn load_submit_clock(&self) -> Result<SubmitClock, StoreError> {
        let last: Option<String> = sqlx::query_scalar("SELECT max(submitted_at) FROM jobs")
            .fetch_one(self.reader())
            .await?;
        Ok(SubmitClock::starting_after(
            last.as_deref().and_then(parse_time).unwrap_or_default(),
        ))
    }

    /// Stores a job durably (or finds the earlier one with the same
    /// idempotency key). Returns once the commit is on disk.
    pub async fn submit(&self, job: NewJob) -> Result<SubmitOutcome, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submissions
            .send((job, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// One job, with its manifest and graph.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS}, manifest, graph FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.reader())
            .await?;
        row.map(|row| {
            let mut job = job_from_row(&row)?;
            job.manifest = json_col(&row, "manifest")?;
            job.graph = json_col(&row, "graph")?;
            Ok::<_, sqlx::Error>(job)
        })
        .transpose()
        .map_err(StoreError::from)
    }

    /// A job's workflow and times, without its manifest and graph (for metrics).
    pub async fn job_times(&self, id: &str) -> Result<Option<JobTimes>, StoreError> {
        let row =
            sqlx::query("SELECT workflow_id, submitted_at, started_at FROM jobs WHERE id = ?")
                .bind(id)
                .fetch_optional(self.reader())
                .await?;
        row.map(|r| {
            Ok::<_, sqlx::Error>(JobTimes {
                workflow_id: r.try_get("workflow_id")?,
                submitted_at: time_col(&r, "submitted_at")?.unwrap_or_default(),
                started_at: time_col(&r, "started_at")?,
            })
        })
        .transpose()
        .map_err(StoreError::from)
    }

    /// The event log of one job, oldest first.
    pub async fn job_events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? ORDER BY seq"
        ))
        .bind(id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// A page of history, newest first, with keyset pagination on `seq`.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let mut lower: Option<i64> = None;
        let mut upper: Option<i64> = filter.before_seq.map(|s| s - 1);
        if let Some(after) = filter.submitted_after {
            let seq: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM jobs WHERE submitted_at >= ? ORDER BY submitted_at LIMIT 1",
            )
            .bind(fmt_time(after))
            .fetch_optional(self.reader())
            .await?;
            match seq {
                Some(s) => lower = Some(s),
                None => {
                    return Ok(JobPage {
                        jobs: vec![],
                        next_before_seq: None,
                    })
                }
            }
        }
        if let Some(before) = filter.submitted_before {
            let seq: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM jobs WHERE submitted_at < ? ORDER BY submitted_at DESC LIMIT 1",
            )
            .bind(fmt_time(before))
            .fetch_optional(self.reader())
            .await?;
            match seq {
                Some(s) => upper = Some(upper.map_or(s, |u| u.min(s))),
                None => {
                    return Ok(JobPage {
                        jobs: vec![],
                        next_before_seq: None,
                    })
                }
            }
        }
        let mut q = list_query("", filter, lower, upper);
        let rows = q.build().fetch_all(self.reader()).await?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if jobs.len() > filter.limit as usize {
            jobs.truncate(filter.limit as usize);
            jobs.last().map(|j| j.seq)
        } else {
            None
        };
        Ok(JobPage {
            jobs,
            next_before_seq: next,
        })
    }

    /// Counts of jobs by status (kept by triggers: one small read).
    pub async fn job_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, n FROM job_counts")
            .fetch_all(self.reader())
            .await?;
        Ok(rows)
    }

    /// SQLite's plan for the history query of `filter` (with both seq
    /// bounds present), so tests can check that an index serves it.
    pub async fn explain_list(&self, filter: &JobFilter) -> Result<Vec<String>, StoreError> {
        let mut q = list_query("EXPLAIN QUERY PLAN ", filter, Some(1), Some(i64::MAX));
        let rows = q.build().fetch_all(self.reader()).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("detail").map_err(StoreError::from))
            .collect()
    }
}

/// Builds the history query; `prefix` lets tests ask for its plan.
fn list_query(
    prefix: &str,
    filter: &JobFilter,
    lower: Option<i64>,
    upper: Option<i64>,
) -> QueryBuilder<'static, Sqlite> {
    let cols = JOB_COLUMNS
        .split(", ")
        .map(|c| format!("j.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{prefix}SELECT {cols} FROM "));
    // The first metadata filter drives the scan through its index.
    let mut metadata = filter.metadata.iter();
    let order_col;
    if let Some((key, value)) = metadata.next() {
        q.push("job_metadata m JOIN jobs j ON j.seq = m.job_seq WHERE m.key = ");
        q.push_bind(key.clone());
        q.push(" AND m.value = ");
        q.push_bind(value.clone());
        order_col = "m.job_seq";
    } else {
        q.push("jobs j WHERE 1 = 1");
        order_col = "j.seq";
    }
    for (key, value) in metadata {
        q.push(" AND EXISTS (SELECT 1 FROM job_metadata m2 WHERE m2.key = ");
        q.push_bind(key.clone());
        q.push(" AND m2.value = ");
        q.push_bind(value.clone());
        q.push(" AND m2.job_seq = j.seq)");
    }
    if let Some(l) = lower {
        q.push(format!(" AND {order_col} >= ")).push_bind(l);
    }
    if let Some(u) = upper {
        q.push(format!(" AND {order_col} <= ")).push_bind(u);
    }
    if !filter.statuses.is_empty() {
        q.push(" AND j.status IN (");
        let mut sep = q.separated(", ");
        for s in &filter.statuses {
            sep.push_bind(s.clone());
        }
        q.push(")");
    }
    if let Some(w) = &filter.workflow_id {
        q.push(" AND j.workflow_id = ").push_bind(w.clone());
    }
    if let Some(b) = &filter.backend_id {
        q.push(" AND j.backend_id = ").push_bind(b.clone());
    }
    q.push(format!(" ORDER BY {order_col} DESC LIMIT "));
    q.push_bind(filter.limit as i64 + 1);
    q
}

/// Stores a batch of submissions in one write (one INSERT, plus a read:
/// atomic without a savepoint).
pub(crate) async fn store_batch(
    writer: &super::writer::Writer,
    clock: &SubmitClock,
    jobs: Vec<NewJob>,
) -> Result<Vec<Result<SubmitOutcome, StoreError>>, StoreError> {
    let clock = clock.clone();
    writer
        .write_single(move |conn| Box::pin(async move { insert_jobs(conn, jobs, &clock).await }))
        .await
}

/// Stores a batch of submissions with one multi-row INSERT (plus one read
/// for their idempotency keys), in submission order. Each gets its own
/// outcome: created, the earlier job with the same key, or a conflict.
async fn insert_jobs(
    conn: &mut SqliteConnection,
    jobs: Vec<NewJob>,
    clock: &SubmitClock,
) -> Result<Vec<Result<SubmitOutcome, StoreError>>, StoreError> {
    // Earlier jobs holding any of these keys.
    let keys: Vec<&String> = jobs
        .iter()
        .filter_map(|j| j.idempotency_key.as_ref())
        .collect();
    let mut known: HashMap<String, (String, JobSummary)> = HashMap::new();
    if !keys.is_empty() {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, status, submitted_at, manifest_hash, idempotency_key FROM jobs WHERE idempotency_key IN (",
        );
        let mut sep = q.separated(", ");
        for k in &keys {
            sep.push_bind((*k).clone());
        }
        q.push(")");
        for row in q.build().fetch_all(&mut *conn).await? {
            let summary = JobSummary {
                id: row.try_get("id")?,
                status: row.try_get("status")?,
                submitted_at: time_col(&row, "submitted_at")?.unwrap_or_default(),
            };
            known.insert(
                row.try_get("idempotency_key")?,
                (row.try_get("manifest_hash")?, summary),
            );
        }
    }
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut rows: Vec<(NewJob, DateTime<Utc>)> = Vec::new();
    for job in jobs {
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
        let now = clock.next();
        let summary = JobSummary {
            id: job.id.clone(),
            status: status::QUEUED.to_string(),
            submitted_at: now,
        };
        if let Some(key) = &job.idempotency_key {
            // A second submission with this key in the same batch finds this one.
            known.insert(key.clone(), (job.manifest_hash.clone(), summary.clone()));
        }
        outcomes.push(Ok(SubmitOutcome::Created(summary)));
        rows.push((job, now));
    }
    if rows.is_empty() {
        return Ok(outcomes);
    }
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "INSERT INTO jobs (id, workflow_id, status, priority, requires, max_attempts, \
         idempotency_key, manifest_hash, manifest, parameters, metadata, graph, callback_url, \
         submitted_at, updated_at) ",
    );
    let mut failed: Option<StoreError> = None;
    q.push_values(rows, |mut b, (job, now)| {
        let now_s = fmt_time(now);
        let requires = serde_json::to_string(&job.requires).unwrap_or_else(|e| {
            failed = Some(e.into());
            "[]".into()
        });
        b.push_bind(job.id)
            .push_bind(job.workflow_id)
            .push_bind(status::QUEUED)
            .push_bind(job.priority)
            .push_bind(requires)
            .push_bind(job.max_attempts as i64)
            .push_bind(job.idempotency_key)
            .push_bind(job.manifest_hash)
            .push_bind(job.manifest.to_string())
            .push_bind(job.parameters.to_string())
            .push_bind(Value::Object(job.metadata).to_string())
            .push_bind(job.graph.to_string())
            .push_bind(job.callback_url)
            .push_bind(now_s.clone())
            .push_bind(now_s);
    });
    if let Some(e) = failed {
        return Err(e);
    }
    // Metadata rows and the `submitted` event come from the jobs_submitted trigger.
    q.build().execute(&mut *conn).await?;
    Ok(outcomes)
}

/// A file collected from a backend for a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputRecord {
    /// Name under which it is served (`/api/job/{id}/outputs/{name}`).
    pub name: String,
    /// Kind as ComfyUI lists it (`images`, `gifs`, `videos`, `audio`, ...).
    pub kind: String,
    /// Node that produced it.
    pub node_id: String,
    /// File name on the backend.
    pub filename: String,
    /// Sub-folder on the backend.
    pub subfolder: String,
    /// `output` or `temp`.
    #[serde(rename = "type")]
    pub file_type: String,
    /// Bytes.
    pub size: i64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// MIME type it is served with.
    pub content_type: String,
}

/// One lease of a job: which backend got which prompt id, and how it ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LeaseRecord {
    /// The ComfyUI prompt id of this lease (submitted at most once).
    pub prompt_id: String,
    /// Attempt number it counted as.
    pub attempt: i64,
    /// Backend.
    pub backend_id: String,
    /// When it was leased.
    pub leased_at: DateTime<Utc>,
    /// When ComfyUI accepted the prompt.
    pub submitted_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// `completed`, `failed`, `rejected`, `lost`, `cancelled`, or `null` while it runs.
    pub outcome: Option<String>,
    /// What went wrong.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
}

impl Store {
    /// Outputs of a job, by name.
    pub async fn job_outputs(&self, id: &str) -> Result<Vec<OutputRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, kind, node_id, filename, subfolder, type, size, sha256, content_type \
             FROM outputs WHERE job_id = ? ORDER BY name",
        )
        .bind(id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutputRecord {
                    name: r.try_get("name")?,
                    kind: r.try_get("kind")?,
                    node_id: r.try_get("node_id")?,
                    filename: r.try_get("filename")?,
                    subfolder: r.try_get("subfolder")?,
                    file_type: r.try_get("type")?,
                    size: r.try_get("size")?,
                    sha256: r.try_get("sha256")?,
                    content_type: r.try_get("content_type")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Leases of a job, oldest first.
    pub async fn job_leases(&self, id: &str) -> Result<Vec<LeaseRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT prompt_id, attempt, backend_id, leased_at, submitted_at, finished_at, outcome, error \
             FROM leases WHERE job_id = ? ORDER BY leased_at",
        )
        .bind(id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseRecord {
                    prompt_id: r.try_get("prompt_id")?,
                    attempt: r.try_get("attempt")?,
                    backend_id: r.try_get("backend_id")?,
                    leased_at: time_col(r, "leased_at")?.unwrap_or_default(),
                    submitted_at: time_col(r, "submitted_at")?,
                    finished_at: time_col(r, "finished_at")?,
                    outcome: r.try_get("outcome")?,
                    error: json_col(r, "error")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

impl Store {
    /// Fills the database with `n` generated jobs in one statement per table,
    /// for benchmarks of large histories (never used by the service). Jobs
    /// rotate over `statuses` and `workflows`; each has metadata `shot` =
    /// `sh{i % 1000}`. Jobs in `assigned` or `running` are leased to
    /// `backends` in turn, each with a lease row.
    #[doc(hidden)]
    pub async fn bench_fill(
        &self,
        n: i64,
        statuses: Vec<String>,
        workflows: Vec<String>,
        backends: Vec<String>,
        graph: Value,
    ) -> Result<(), StoreError> {
        let clock = self.clock.clone();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let start: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM jobs")
                        .fetch_one(&mut *conn)
                        .await?;
                    let t0 = clock.next();
                    let statuses = serde_json::to_string(&statuses)?;
                    let workflows = serde_json::to_string(&workflows)?;
                    let backends = serde_json::to_string(&backends)?;
                    sqlx::query(
                        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) \
                         INSERT INTO jobs (seq, id, workflow_id, status, priority, requires, max_attempts, attempts, \
                           manifest_hash, manifest, parameters, metadata, graph, backend_id, prompt_id, lease_token, \
                           submitted_at, updated_at) \
                         SELECT ?2 + x, 'bench-' || (?2 + x), \
                           json_extract(?4, '$[' || (x % json_array_length(?4)) || ']'), \
                           json_extract(?3, '$[' || (x % json_array_length(?3)) || ']'), \
                           0, '[]', 3, 0, 'h', '{}', '{}', json_object('shot', 'sh' || (x % 1000)), ?6, \
                           NULL, NULL, NULL, \
                           strftime('%Y-%m-%dT%H:%M:%f', ?7, '+' || (x / 1000.0) || ' seconds') || 'Z', ?7 \
                         FROM c",
                    )
                    .bind(n)
                    .bind(start)
                    .bind(&statuses)
                    .bind(&workflows)
                    .bind(&backends)
                    .bind(graph.to_string())
                    .bind(fmt_time(t0))
                    .execute(&mut *conn)
                    .await?;
                    // The jobs_submitted trigger wrote their metadata rows and first events.
                    // Held jobs: a backend, a prompt id, a fencing token and a lease each.
                    sqlx::query(
                        "UPDATE jobs SET backend_id = json_extract(?1, '$[' || (seq % json_array_length(?1)) || ']'), \
                         prompt_id = 'bench-prompt-' || seq, lease_token = seq, attempts = 1 \
                         WHERE seq > ?2 AND status IN ('assigned', 'running')",
                    )
                    .bind(&backends)
                    .bind(start)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query(
                        "INSERT INTO leases (prompt_id, job_id, attempt, backend_id, lease_token, leased_at, submitted_at) \
                         SELECT prompt_id, id, 1, backend_id, lease_token, submitted_at, submitted_at FROM jobs \
                         WHERE seq > ? AND status IN ('assigned', 'running')",
                    )
                    .bind(start)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query("UPDATE counters SET value = (SELECT max(seq) FROM jobs) WHERE name = 'lease_token'")
                        .execute(&mut *conn)
                        .await?;
                    // Triggers kept job_counts; the clock moves past the generated times.
                    let last: String = sqlx::query_scalar("SELECT max(submitted_at) FROM jobs")
                        .fetch_one(&mut *conn)
                        .await?;
                    if let Some(t) = parse_time(&last) {
                        *clock.0.lock().expect("clock") = t;
                    }
                    Ok(())
                })
            })
            .await
    }

    /// Leases made by `bench_fill` still open (benchmarks: reconciliation).
    #[doc(hidden)]
    pub async fn open_bench_leases(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM leases WHERE outcome IS NULL AND prompt_id LIKE 'bench-prompt-%'",
        )
        .fetch_one(self.reader())
        .await?)
    }
}
