//! Every change of a job after it was submitted: the steps of a leased job
//! (submitted, running, completed, failed, retried, lost, cancelled), and
//! the unleased ones (cancel while queued, retry by a user).
//!
//! Why one helper ([`Store::transition`]) and one step function
//! ([`apply`]): every change of a leased job is fenced by its lease token
//! (`WHERE lease_token = ?`), so a worker that lost its lease (the job was
//! taken back and leased again) cannot overwrite the newer lease's state;
//! and every change is one transaction with its event. Written once, neither
//! can be forgotten by the next transition someone adds.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use sqlx::{Row, SqliteConnection};

use super::events::{append_event, EventInput};
use super::model::*;
use super::webhooks::enqueue_webhook;
use super::{fmt_time, Store, StoreError};

/// The job as the fence found it: still held under the caller's lease.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) job_id: String,
    pub(super) token: i64,
    pub(super) status: JobStatus,
    pub(super) attempt: i64,
    pub(super) max_attempts: i64,
    pub(super) backend: String,
    pub(super) prompt_id: String,
    pub(super) cancel_requested: bool,
    /// The backend had accepted this lease's prompt.
    pub(super) submitted: bool,
    /// The backend had started running this lease's prompt.
    pub(super) started: bool,
    /// Its workflow and times, for the metrics of the caller (read with
    /// the fence, so a transition's caller need not read them again).
    pub(super) times: JobTimes,
}

/// Reads the job if it still carries this lease and a backend holds it.
async fn fence(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
) -> Result<Option<Held>, StoreError> {
    let row = sqlx::query(
        "SELECT j.status, j.attempts, j.max_attempts, j.backend_id, j.prompt_id, j.cancel_requested, \
         l.submitted_at IS NOT NULL AS submitted, l.started_at, j.workflow_id, j.submitted_at, j.started_at AS job_started_at \
         FROM jobs j LEFT JOIN leases l ON l.prompt_id = j.prompt_id \
         WHERE j.id = ? AND j.lease_token = ?",
    )
    .bind(job_id)
    .bind(token)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let status: JobStatus = r.try_get("status")?;
    if !status.is_held() {
        return Ok(None);
    }
    Ok(Some(Held {
        job_id: job_id.to_string(),
        token,
        status,
        attempt: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        backend: r
            .try_get::<Option<String>, _>("backend_id")?
            .unwrap_or_default(),
        prompt_id: r
            .try_get::<Option<String>, _>("prompt_id")?
            .unwrap_or_default(),
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        submitted: r.try_get::<Option<bool>, _>("submitted")?.unwrap_or(false),
        started: r.try_get::<Option<String>, _>("started_at")?.is_some(),
        times: JobTimes {
            workflow_id: r.try_get("workflow_id")?,
            submitted_at: r.try_get("submitted_at")?,
            started_at: r.try_get("job_started_at")?,
        },
    }))
}

/// One change of a job, with the event that records it.
pub(super) enum Step {
    /// ComfyUI accepted the prompt (recorded once).
    Submitted,
    /// ComfyUI started running it.
    Running,
    /// Finished; its outputs are collected.
    Completed(Vec<OutputRecord>),
    /// Ended for good without success.
    Failed {
        outcome: LeaseOutcome,
        error: Value,
        message: String,
    },
    /// An attempt failed; queued again.
    Retry {
        outcome: LeaseOutcome,
        error: Value,
        message: String,
        not_before: DateTime<Utc>,
        avoid_until: DateTime<Utc>,
    },
    /// The backend lost it: queued again, the attempt does not count.
    Requeued { reason: String, message: String },
    /// Cancelled.
    Cancelled { message: String },
}

/// Applies one step to a held job: the job row, its lease, its event.
pub(super) async fn apply(
    conn: &mut SqliteConnection,
    held: &Held,
    step: Step,
) -> Result<(), StoreError> {
    let now = fmt_time(Utc::now());
    let id = held.job_id.as_str();
    let event = |kind, status, message, data| EventInput {
        kind,
        status: Some(status),
        backend_id: Some(&held.backend),
        attempt: Some(held.attempt),
        message: Some(message),
        data,
    };
    match step {
        // Known accepted (read with the fence): nothing to record.
        Step::Submitted if held.submitted => {}
        // The leases_submitted trigger appends `submitted_to_backend` when
        // this sets the time (migration V9).
        Step::Submitted => {
            sqlx::query(
                "UPDATE leases SET submitted_at = ? WHERE prompt_id = ? AND submitted_at IS NULL",
            )
            .bind(&now)
            .bind(&held.prompt_id)
            .execute(&mut *conn)
            .await?;
        }
        // The jobs_running trigger records the lease's start and appends
        // the `running` event (migration V9).
        Step::Running => {
            sqlx::query(
                "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?1), updated_at = ?1 \
                 WHERE id = ?2",
            )
            .bind(&now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        }
        Step::Completed(outputs) => {
            for o in &outputs {
                sqlx::query(
                    "INSERT OR REPLACE INTO outputs (job_id, name, kind, node_id, filename, subfolder, type, \
                     size, sha256, content_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(id)
                .bind(&o.name)
                .bind(&o.kind)
                .bind(&o.node_id)
                .bind(&o.filename)
                .bind(&o.subfolder)
                .bind(&o.file_type)
                .bind(o.size)
                .bind(&o.sha256)
                .bind(&o.content_type)
                .execute(&mut *conn)
                .await?;
            }
            finish_lease(conn, held, LeaseOutcome::Completed, None).await?;
            set_final(conn, id, JobStatus::Completed, None).await?;
            let message = format!(
                "completed on backend {} with {} output(s)",
                held.backend,
                outputs.len()
            );
            let data = json!({ "outputs": outputs.iter().map(|o| &o.name).collect::<Vec<_>>() });
            let ev = event("completed", JobStatus::Completed, message, Some(data));
            append_event(conn, id, ev).await?;
            if held.cancel_requested {
                let message = format!(
                    "the cancel came too late: the prompt had already finished on backend {}, so the job is completed",
                    held.backend
                );
                let ev = event("cancel_too_late", JobStatus::Completed, message, None);
                append_event(conn, id, ev).await?;
            }
        }
        Step::Failed {
            outcome,
            error,
            message,
        } => {
            finish_lease(conn, held, outcome, Some(&error)).await?;
            let mut final_error = error.clone();
            final_error["message"] = json!(message);
            set_final(conn, id, JobStatus::Failed, Some(&final_error)).await?;
            let ev = event("failed", JobStatus::Failed, message, Some(error));
            append_event(conn, id, ev).await?;
        }
        Step::Retry {
            outcome,
            error,
            message,
            not_before,
            avoid_until,
        } => {
            finish_lease(conn, held, outcome, Some(&error)).await?;
            back_to_queue(
                conn,
                id,
                0,
                Some(not_before),
                Some(avoid_until),
                Some(&error),
            )
            .await?;
            let ev = event("retry_scheduled", JobStatus::Queued, message, Some(error));
            append_event(conn, id, ev).await?;
        }
        Step::Requeued { reason, message } => {
            let error = json!({ "message": reason, "while_running": held.started });
            finish_lease(conn, held, LeaseOutcome::Lost, Some(&error)).await?;
            back_to_queue(conn, id, -1, None, None, None).await?;
            append_event(
                conn,
                id,
                event("requeued", JobStatus::Queued, message, None),
            )
            .await?;
        }
        Step::Cancelled { message } => {
            finish_lease(conn, held, LeaseOutcome::Cancelled, None).await?;
            set_final(conn, id, JobStatus::Cancelled, None).await?;
            let ev = event("cancelled", JobStatus::Cancelled, message, None);
            append_event(conn, id, ev).await?;
        }
    }
    Ok(())
}

pub(super) async fn finish_lease(
    conn: &mut SqliteConnection,
    held: &Held,
    outcome: LeaseOutcome,
    error: Option<&Value>,
) -> Result<(), StoreError> {
    let q = sqlx::query(
        "UPDATE leases SET finished_at = ?, outcome = ?, error = ? WHERE job_id = ? AND lease_token = ?",
    );
    run(
        conn,
        q.bind(fmt_time(Utc::now()))
            .bind(outcome)
            .bind(error.map(|e| e.to_string()))
            .bind(&held.job_id)
            .bind(held.token),
    )
    .await
}

/// Back to the queue: no backend, no lease; `attempts_delta` -1 gives the attempt back.
async fn back_to_queue(
    conn: &mut SqliteConnection,
    job_id: &str,
    attempts_delta: i64,
    not_before: Option<DateTime<Utc>>,
    avoid_until: Option<DateTime<Utc>>,
    error: Option<&Value>,
) -> Result<(), StoreError> {
    let q = sqlx::query(
        "UPDATE jobs SET status = 'queued', backend_id = NULL, prompt_id = NULL, lease_token = NULL, \
         attempts = attempts + ?, not_before = ?, avoid_until = ?, error = coalesce(?, error), \
         progress = NULL, updated_at = ? WHERE id = ?",
    );
    run(
        conn,
        q.bind(attempts_delta)
            .bind(not_before.map(fmt_time))
            .bind(avoid_until.map(fmt_time))
            .bind(error.map(|e| e.to_string()))
            .bind(fmt_time(Utc::now()))
            .bind(job_id),
    )
    .await
}

/// The columns `cols` of job `job_id`; `NotFound` when there is none.
async fn job_row(
    conn: &mut SqliteConnection,
    job_id: &str,
    cols: &str,
) -> Result<sqlx::sqlite::SqliteRow, StoreError> {
    sqlx::query(&format!("SELECT {cols} FROM jobs WHERE id = ?"))
        .bind(job_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job `{job_id}`")))
}

/// Runs one statement whose answer is not needed.
async fn run<'q>(
    conn: &mut SqliteConnection,
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
) -> Result<(), StoreError> {
    q.execute(conn).await?;
    Ok(())
}

/// A terminal state, with the webhook queued in the same transaction.
async fn set_final(
    conn: &mut SqliteConnection,
    job_id: &str,
    status: JobStatus,
    error: Option<&Value>,
) -> Result<(), StoreError> {
    let now = fmt_time(Utc::now());
    // A completed job keeps no error of an earlier attempt; a failed or
    // cancelled one keeps the last it had unless given its own.
    let callback: Option<Option<String>> = sqlx::query_scalar(
        "UPDATE jobs SET status = ?1, \
         error = CASE WHEN ?1 = 'completed' THEN NULL ELSE coalesce(?2, error) END, \
         finished_at = ?3, updated_at = ?3, progress = NULL, cancel_requested = 0 \
         WHERE id = ?4 RETURNING callback_url",
    )
    .bind(status)
    .bind(error.map(|e| e.to_string()))
    .bind(&now)
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await?;
    // Most jobs name no callback: their end costs no outbox statement.
    match callback.flatten() {
        Some(url) => enqueue_webhook(conn, job_id, &url, status).await,
        None => Ok(()),
    }
}

/// Fails a queued job that no backend can run (found so when a backend's
/// inventory was checked), inside the caller's transaction.
pub(super) async fn fail_queued(
    conn: &mut SqliteConnection,
    job_id: &str,
    reason: String,
) -> Result<(), StoreError> {
    let error = json!({ "message": reason });
    set_final(conn, job_id, JobStatus::Failed, Some(&error)).await?;
    let ev = EventInput {
        kind: "failed",
        status: Some(JobStatus::Failed),
        message: Some(reason),
        data: Some(error),
        ..Default::default()
    };
    append_event(conn, job_id, ev).await
}

/// How a lost lease is given back.
#[derive(Debug, Clone)]
pub struct LostRun {
    /// Why, for the job's events.
    pub reason: String,
    /// Put the prompt on the cleanup list, to be removed from the backend
    /// (confirmed no earlier than this time): it may come back and run it.
    pub cleanup: Option<DateTime<Utc>>,
    /// Fail the job once this many of its runs were lost after they had
    /// started (`None`: never).
    pub max_lost_runs: Option<i64>,
}

/// What became of a lost lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LostOutcome {
    /// Queued again; the attempt did not count.
    Requeued,
    /// A cancel was pending: cancelled.
    Cancelled,
    /// Lost while running too many times: failed, with this message.
    Failed(String),
    /// The lease was no longer ours.
    LeaseLost,
}

impl Store {
    /// Runs `f` on the job if it still carries lease `token` and a backend
    /// holds it; `None` if the lease was lost. One transaction.
    pub(super) async fn transition<T, F>(
        &self,
        job_id: &str,
        token: i64,
        f: F,
    ) -> Result<Option<T>, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection, Held) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    match fence(conn, &job_id, token).await? {
                        Some(held) => f(conn, held).await.map(Some),
                        None => Ok(None),
                    }
                })
            })
            .await
    }

    /// As [`Store::transition`], for a change the caller's lease must
    /// still hold: a lost lease is an error.
    async fn fenced<T, F>(&self, job_id: &str, token: i64, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection, Held) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        self.transition(job_id, token, f)
            .await?
            .ok_or(StoreError::LeaseLost)
    }

    /// Records that ComfyUI accepted the prompt. Returns whether a cancel is pending.
    pub async fn mark_submitted(&self, job_id: &str, token: i64) -> Result<bool, StoreError> {
        self.fenced(job_id, token, |conn, held| {
            Box::pin(async move {
                apply(conn, &held, Step::Submitted).await?;
                Ok(held.cancel_requested)
            })
        })
        .await
    }

    /// `assigned` → `running`, once, with the job's workflow and times (for
    /// the queue-wait metric); later calls change nothing (`None`).
    pub async fn mark_running(
        &self,
        job_id: &str,
        token: i64,
    ) -> Result<Option<JobTimes>, StoreError> {
        self.fenced(job_id, token, |conn, held| {
            Box::pin(async move {
                if held.status == JobStatus::Running {
                    return Ok(None);
                }
                // It runs, so the backend has it, even if the answer to the
                // submit is still on its way.
                apply(conn, &held, Step::Submitted).await?;
                apply(conn, &held, Step::Running).await?;
                let mut times = held.times;
                times.started_at = times.started_at.or_else(|| Some(Utc::now()));
                Ok(Some(times))
            })
        })
        .await
    }

    /// Records the collected outputs and completes the job; returns its
    /// workflow and times (for the run-time metric).
    pub async fn complete(
        &self,
        job_id: &str,
        token: i64,
        outputs: Vec<OutputRecord>,
    ) -> Result<JobTimes, StoreError> {
        let step = Step::Completed(outputs);
        self.fenced(job_id, token, |conn, held| {
            Box::pin(async move {
                apply(conn, &held, step).await?;
                Ok(held.times)
            })
        })
        .await
    }

    /// The backend confirmed (or did not answer in time): the job is cancelled.
    pub async fn confirm_cancel(
        &self,
        job_id: &str,
        token: i64,
        how: String,
    ) -> Result<bool, StoreError> {
        let done = self
            .transition(job_id, token, |conn, held| {
                Box::pin(async move { apply(conn, &held, Step::Cancelled { message: how }).await })
            })
            .await?;
        Ok(done.is_some())
    }

    /// Cancels a queued job now, or flags a held one for its backend to stop.
    pub async fn request_cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row =
                        job_row(conn, &job_id, "status, backend_id, attempts, lease_token").await?;
                    let current: JobStatus = row.try_get("status")?;
                    if current.is_terminal() {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` is already {current}"
                        )));
                    }
                    if current == JobStatus::Queued {
                        set_final(conn, &job_id, JobStatus::Cancelled, None).await?;
                        let ev = EventInput {
                            kind: "cancelled",
                            status: Some(JobStatus::Cancelled),
                            message: Some("cancelled while queued".into()),
                            ..Default::default()
                        };
                        append_event(conn, &job_id, ev).await?;
                        return Ok(CancelOutcome::Cancelled);
                    }
                    let backend_id: String = row
                        .try_get::<Option<String>, _>("backend_id")?
                        .unwrap_or_default();
                    sqlx::query(
                        "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    )
                    .bind(fmt_time(Utc::now()))
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                    let ev = EventInput {
                        kind: "cancel_requested",
                        status: Some(current),
                        backend_id: Some(&backend_id),
                        attempt: Some(row.try_get("attempts")?),
                        message: Some(format!(
                            "cancel requested; asking backend {backend_id} to stop it"
                        )),
                        data: None,
                    };
                    append_event(conn, &job_id, ev).await?;
                    Ok(CancelOutcome::Requested { backend_id })
                })
            })
            .await
    }

    /// Queues a failed or cancelled job again, as a new attempt.
    pub async fn retry(&self, job_id: &str) -> Result<(), StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row = job_row(conn, &job_id, "status, attempts, max_attempts").await?;
                    let current: JobStatus = row.try_get("status")?;
                    if !matches!(current, JobStatus::Failed | JobStatus::Cancelled) {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` is {current}; only failed or cancelled jobs can be retried"
                        )));
                    }
                    let attempts: i64 = row.try_get("attempts")?;
                    let max_attempts: i64 = row.try_get("max_attempts")?;
                    sqlx::query(
                        "UPDATE jobs SET max_attempts = ?, finished_at = NULL, cancel_requested = 0 WHERE id = ?",
                    )
                    .bind(max_attempts.max(attempts + 1))
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                    back_to_queue(conn, &job_id, 0, None, None, None).await?;
                    let ev = EventInput {
                        kind: "retried",
                        status: Some(JobStatus::Queued),
                        message: Some(format!("queued again by a user after it was {current}")),
                        ..Default::default()
                    };
                    append_event(conn, &job_id, ev).await
                })
            })
            .await
    }

    /// Jobs held by backends no longer in the config go back to the queue.
    pub async fn release_unconfigured(&self) -> Result<u64, StoreError> {
        self.writer()
            .write(|conn| {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT id, lease_token FROM jobs WHERE status IN ('assigned', 'running') \
                         AND backend_id NOT IN (SELECT id FROM backends WHERE configured = 1)",
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    for r in &rows {
                        let id: String = r.try_get("id")?;
                        let token: i64 = r.try_get::<Option<i64>, _>("lease_token")?.unwrap_or(0);
                        let Some(held) = fence(conn, &id, token).await? else {
                            continue;
                        };
                        let reason = format!("backend {} is no longer in the config", held.backend);
                        let step = Step::Requeued {
                            message: format!("{reason}; queued again"),
                            reason,
                        };
                        apply(conn, &held, step).await?;
                    }
                    Ok(rows.len() as u64)
                })
            })
            .await
    }
}
