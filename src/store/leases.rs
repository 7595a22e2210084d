//! The job lifecycle on backends: leasing, and every transition after it.
//!
//! Why here: each transition is one transaction with its event, and every
//! update after a lease is fenced by the lease token (`WHERE lease_token = ?`),
//! so a dispatcher that lost its lease (the job was taken back and leased
//! again) cannot overwrite the newer lease's state.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::{Row, SqliteConnection};

use super::jobs::{append_event, status, EventInput, OutputRecord};
use super::{fmt_time, parse_time, Store, StoreError};

/// A job leased to a backend.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Job id.
    pub job_id: String,
    /// Prompt id chosen for this lease; submitted at most once.
    pub prompt_id: String,
    /// Fencing token.
    pub token: i64,
    /// Attempt number this lease counts as.
    pub attempt: i64,
    /// The graph to submit.
    pub graph: Value,
}

/// A job a backend holds (assigned or running), for reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveJob {
    /// Job id.
    pub job_id: String,
    /// Prompt id of its lease.
    pub prompt_id: String,
    /// Fencing token.
    pub token: i64,
    /// `assigned` or `running`.
    pub status: String,
    /// Attempt number.
    pub attempt: i64,
    /// Did ComfyUI acknowledge the prompt?
    pub submitted: bool,
    /// Has a user asked to cancel it?
    pub cancel_requested: bool,
    /// When it was leased.
    pub leased_at: Option<DateTime<Utc>>,
}

/// What became of a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    /// Queued again, not before this time.
    Retry(DateTime<Utc>),
    /// Failed for good; the message says why.
    Failed(String),
    /// The lease was no longer ours.
    LeaseLost,
}

/// What a cancel request led to.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Cancelled at once (it was queued).
    Cancelled,
    /// A backend holds it; it has been asked to stop it.
    Requested {
        /// The backend.
        backend_id: String,
    },
}

async fn next_token(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE counters SET value = value + 1 WHERE name = 'lease_token' RETURNING value",
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Filters shared by the lease queries: due, tags covered, not excluded here.
const ELIGIBLE: &str = "j.status = 'queued' \
    AND (j.not_before IS NULL OR j.not_before <= ?1) \
    AND NOT (j.last_backend_id IS ?2 AND j.avoid_until IS NOT NULL AND j.avoid_until > ?1) \
    AND NOT EXISTS (SELECT 1 FROM json_each(j.requires) r WHERE r.value NOT IN (SELECT value FROM json_each(?3))) \
    AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.job_id = j.id AND l.backend_id = ?2 AND l.outcome = 'rejected') \
    AND (SELECT count(*) FROM leases l WHERE l.job_id = j.id AND l.backend_id = ?2 AND l.outcome = 'failed') < 2";

async fn lease_in(
    conn: &mut SqliteConnection,
    backend_id: &str,
) -> Result<Option<Lease>, StoreError> {
    let Some(b) = sqlx::query(
        "SELECT config_enabled, admin_state, state, tags, max_inflight, last_workflow_id \
         FROM backends WHERE id = ? AND configured = 1",
    )
    .bind(backend_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let config_enabled: i64 = b.try_get("config_enabled")?;
    let admin: Option<String> = b.try_get("admin_state")?;
    let enabled = match admin.as_deref() {
        Some("enabled") => true,
        Some(_) => false,
        None => config_enabled != 0,
    };
    let state: String = b.try_get("state")?;
    if !enabled || state != "online" {
        return Ok(None);
    }
    let max_inflight: i64 = b.try_get("max_inflight")?;
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE backend_id = ? AND status IN ('assigned', 'running')",
    )
    .bind(backend_id)
    .fetch_one(&mut *conn)
    .await?;
    if active >= max_inflight {
        return Ok(None);
    }
    let tags: String = b.try_get("tags")?;
    let last_workflow: Option<String> = b.try_get("last_workflow_id")?;
    let now = fmt_time(Utc::now());
    let best = sqlx::query(&format!(
        "SELECT j.seq, j.id, j.workflow_id, j.priority FROM jobs j INDEXED BY jobs_queue \
         WHERE {ELIGIBLE} ORDER BY j.priority DESC, j.seq LIMIT 1"
    ))
    .bind(&now)
    .bind(backend_id)
    .bind(&tags)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(best) = best else { return Ok(None) };
    let mut seq: i64 = best.try_get("seq")?;
    let workflow: Option<String> = best.try_get("workflow_id")?;
    let priority: i64 = best.try_get("priority")?;
    // Among jobs of the same priority, prefer the workflow this backend ran
    // last: its models are loaded already.
    if last_workflow.is_some() && workflow != last_workflow {
        let same: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT j.seq FROM jobs j INDEXED BY jobs_queue_workflow \
             WHERE j.workflow_id = ?4 AND j.priority = ?5 AND {ELIGIBLE} ORDER BY j.priority DESC, j.seq LIMIT 1"
        ))
        .bind(&now)
        .bind(backend_id)
        .bind(&tags)
        .bind(&last_workflow)
        .bind(priority)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(s) = same {
            seq = s;
        }
    }
    let token = next_token(conn).await?;
    let prompt_id = uuid::Uuid::new_v4().to_string();
    let row = sqlx::query(
        "UPDATE jobs SET status = 'assigned', backend_id = ?, prompt_id = ?, lease_token = ?, \
         attempts = attempts + 1, last_backend_id = ?, not_before = NULL, avoid_until = NULL, \
         progress = NULL, updated_at = ? WHERE seq = ? AND status = 'queued' \
         RETURNING id, attempts, graph, workflow_id",
    )
    .bind(backend_id)
    .bind(&prompt_id)
    .bind(token)
    .bind(backend_id)
    .bind(&now)
    .bind(seq)
    .fetch_one(&mut *conn)
    .await?;
    let job_id: String = row.try_get("id")?;
    let attempt: i64 = row.try_get("attempts")?;
    let graph: String = row.try_get("graph")?;
    let workflow_id: Option<String> = row.try_get("workflow_id")?;
    sqlx::query(
        "INSERT INTO leases (prompt_id, job_id, attempt, backend_id, lease_token, leased_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&prompt_id)
    .bind(&job_id)
    .bind(attempt)
    .bind(backend_id)
    .bind(token)
    .bind(&now)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE backends SET last_workflow_id = ? WHERE id = ?")
        .bind(&workflow_id)
        .bind(backend_id)
        .execute(&mut *conn)
        .await?;
    append_event(
        conn,
        &job_id,
        EventInput {
            kind: "assigned",
            status: Some(status::ASSIGNED),
            backend_id: Some(backend_id),
            attempt: Some(attempt),
            message: Some(format!(
                "leased to backend {backend_id} (attempt {attempt})"
            )),
            data: Some(json!({ "prompt_id": prompt_id })),
        },
    )
    .await?;
    Ok(Some(Lease {
        job_id,
        prompt_id,
        token,
        attempt,
        graph: serde_json::from_str(&graph)?,
    }))
}

/// Checks the fence: the job still carries this lease and is held by a backend.
async fn fenced(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
) -> Result<(String, i64, String), StoreError> {
    let row = sqlx::query(
        "SELECT status, attempts, backend_id FROM jobs WHERE id = ? AND lease_token = ?",
    )
    .bind(job_id)
    .bind(token)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => {
            let s: String = r.try_get("status")?;
            if s != status::ASSIGNED && s != status::RUNNING {
                return Err(StoreError::LeaseLost);
            }
            Ok((
                s,
                r.try_get("attempts")?,
                r.try_get::<Option<String>, _>("backend_id")?
                    .unwrap_or_default(),
            ))
        }
        None => Err(StoreError::LeaseLost),
    }
}

/// Like [`fenced`], for callers to whom a lost lease is an answer, not an error.
async fn held(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
) -> Result<Option<(String, i64, String)>, StoreError> {
    match fenced(conn, job_id, token).await {
        Ok(f) => Ok(Some(f)),
        Err(StoreError::LeaseLost) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records, once, that the backend accepted the lease's prompt.
async fn record_submitted(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
    attempt: i64,
    backend: &str,
) -> Result<(), StoreError> {
    let n = sqlx::query(
        "UPDATE leases SET submitted_at = ? WHERE job_id = ? AND lease_token = ? AND submitted_at IS NULL",
    )
    .bind(fmt_time(Utc::now()))
    .bind(job_id)
    .bind(token)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 1 {
        append_event(
            conn,
            job_id,
            EventInput {
                kind: "submitted_to_backend",
                status: None,
                backend_id: Some(backend),
                attempt: Some(attempt),
                message: Some(format!("backend {backend} accepted the prompt")),
                data: None,
            },
        )
        .await?;
    }
    Ok(())
}

async fn finish_lease(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
    outcome: &str,
    error: Option<&Value>,
    cleanup: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE leases SET finished_at = ?, outcome = ?, error = ?, cleanup_pending = ? \
         WHERE job_id = ? AND lease_token = ?",
    )
    .bind(fmt_time(Utc::now()))
    .bind(outcome)
    .bind(error.map(|e| e.to_string()))
    .bind(cleanup as i64)
    .bind(job_id)
    .bind(token)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Ends a job as cancelled, with its event, inside the caller's transaction.
async fn cancel_in(
    conn: &mut SqliteConnection,
    job_id: &str,
    backend: Option<&str>,
    attempt: Option<i64>,
    message: String,
) -> Result<(), StoreError> {
    set_final(conn, job_id, status::CANCELLED, None).await?;
    append_event(
        conn,
        job_id,
        EventInput {
            kind: "cancelled",
            status: Some(status::CANCELLED),
            backend_id: backend,
            attempt,
            message: Some(message),
            data: None,
        },
    )
    .await
}

/// Back to the queue without burning the attempt (the backend lost it).
async fn requeue(
    conn: &mut SqliteConnection,
    job_id: &str,
    backend: Option<&str>,
    attempt: Option<i64>,
    message: String,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE jobs SET status = 'queued', backend_id = NULL, prompt_id = NULL, lease_token = NULL, \
         attempts = attempts - 1, progress = NULL, updated_at = ? WHERE id = ?",
    )
    .bind(fmt_time(Utc::now()))
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    append_event(
        conn,
        job_id,
        EventInput {
            kind: "requeued",
            status: Some(status::QUEUED),
            backend_id: backend,
            attempt,
            message: Some(message),
            data: None,
        },
    )
    .await
}

/// Why no enabled backend can run a job, or `None` if one can.
async fn unrunnable_reason(
    conn: &mut SqliteConnection,
    job_id: &str,
) -> Result<Option<String>, StoreError> {
    let requires: String = sqlx::query_scalar("SELECT requires FROM jobs WHERE id = ?")
        .bind(job_id)
        .fetch_one(&mut *conn)
        .await?;
    let requires: Vec<String> = serde_json::from_str(&requires).unwrap_or_default();
    let backends = sqlx::query("SELECT id, tags, config_enabled, admin_state FROM backends WHERE configured = 1 ORDER BY id")
        .fetch_all(&mut *conn)
        .await?;
    if backends.is_empty() {
        // No farm configured yet: jobs wait for one.
        return Ok(None);
    }
    let mut reasons = Vec::new();
    for b in backends {
        let id: String = b.try_get("id")?;
        let tags: Vec<String> =
            serde_json::from_str(&b.try_get::<String, _>("tags")?).unwrap_or_default();
        let missing: Vec<&String> = requires.iter().filter(|t| !tags.contains(t)).collect();
        if !missing.is_empty() {
            reasons.push(format!("{id} lacks tags {missing:?}"));
            continue;
        }
        let admin: Option<String> = b.try_get("admin_state")?;
        if admin.as_deref() == Some("disabled")
            || (admin.is_none() && b.try_get::<i64, _>("config_enabled")? == 0)
        {
            // Disabled for now, not for ever: the job may wait for it.
            return Ok(None);
        }
        let rejected: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM leases WHERE job_id = ? AND backend_id = ? AND outcome = 'rejected'",
        )
        .bind(job_id)
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        let failed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM leases WHERE job_id = ? AND backend_id = ? AND outcome = 'failed'",
        )
        .bind(job_id)
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        if rejected > 0 {
            reasons.push(format!("{id} rejected the workflow"));
        } else if failed >= 2 {
            reasons.push(format!("{id} failed it {failed} times"));
        } else {
            return Ok(None);
        }
    }
    Ok(Some(format!(
        "no enabled backend can run this job: {}",
        reasons.join("; ")
    )))
}

async fn set_final(
    conn: &mut SqliteConnection,
    job_id: &str,
    new_status: &str,
    error: Option<&Value>,
) -> Result<(), StoreError> {
    let now = fmt_time(Utc::now());
    sqlx::query(
        "UPDATE jobs SET status = ?, error = coalesce(?, error), finished_at = ?, updated_at = ?, \
         progress = NULL, cancel_requested = 0 WHERE id = ?",
    )
    .bind(new_status)
    .bind(error.map(|e| e.to_string()))
    .bind(&now)
    .bind(&now)
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    // The webhook is queued in the same transaction: it cannot be lost.
    super::events::enqueue_webhook(conn, job_id, new_status).await
}

impl Store {
    /// Leases the best queued job to `backend_id` if it has a free slot and
    /// may take jobs: priority, then age; tags covered; not excluded there.
    pub async fn lease_next(&self, backend_id: &str) -> Result<Option<Lease>, StoreError> {
        let backend_id = backend_id.to_string();
        self.writer()
            .write(move |conn| Box::pin(async move { lease_in(conn, &backend_id).await }))
            .await
    }

    /// Records that ComfyUI accepted the prompt. Returns whether a cancel is pending.
    pub async fn mark_submitted(&self, job_id: &str, token: i64) -> Result<bool, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let (_, attempt, backend) = fenced(conn, &job_id, token).await?;
                    record_submitted(conn, &job_id, token, attempt, &backend).await?;
                    let cancel: i64 =
                        sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = ?")
                            .bind(&job_id)
                            .fetch_one(&mut *conn)
                            .await?;
                    Ok(cancel != 0)
                })
            })
            .await
    }

    /// `assigned` → `running`, once; later calls change nothing.
    pub async fn mark_running(&self, job_id: &str, token: i64) -> Result<bool, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let (current, attempt, backend) = fenced(conn, &job_id, token).await?;
                    if current == status::RUNNING {
                        return Ok(false);
                    }
                    // It runs, so the backend has it, even if the answer to
                    // the submit is still on its way.
                    record_submitted(conn, &job_id, token, attempt, &backend).await?;
                    let now = fmt_time(Utc::now());
                    sqlx::query(
                        "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?), updated_at = ? \
                         WHERE id = ? AND lease_token = ?",
                    )
                    .bind(&now)
                    .bind(&now)
                    .bind(&job_id)
                    .bind(token)
                    .execute(&mut *conn)
                    .await?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "running",
                            status: Some(status::RUNNING),
                            backend_id: Some(&backend),
                            attempt: Some(attempt),
                            message: Some(format!("running on backend {backend}")),
                            data: None,
                        },
                    )
                    .await?;
                    Ok(true)
                })
            })
            .await
    }

    /// Records the collected outputs and completes the job.
    pub async fn complete(
        &self,
        job_id: &str,
        token: i64,
        outputs: Vec<OutputRecord>,
    ) -> Result<(), StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let (_, attempt, backend) = fenced(conn, &job_id, token).await?;
                    for o in &outputs {
                        sqlx::query(
                            "INSERT OR REPLACE INTO outputs (job_id, name, kind, node_id, filename, subfolder, type, \
                             size, sha256, content_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        )
                        .bind(&job_id)
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
                    finish_lease(conn, &job_id, token, "completed", None, false).await?;
                    sqlx::query("UPDATE jobs SET error = NULL WHERE id = ?")
                        .bind(&job_id)
                        .execute(&mut *conn)
                        .await?;
                    set_final(conn, &job_id, status::COMPLETED, None).await?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "completed",
                            status: Some(status::COMPLETED),
                            backend_id: Some(&backend),
                            attempt: Some(attempt),
                            message: Some(format!("completed on backend {backend} with {} output(s)", outputs.len())),
                            data: Some(json!({ "outputs": outputs.iter().map(|o| &o.name).collect::<Vec<_>>() })),
                        },
                    )
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Ends an attempt that failed. `rejected` (a `400`) never retries on
    /// that backend; a run-time failure retries after `backoff`, preferring
    /// another backend. With no attempts left, or no backend that can run
    /// it, the job fails with `error`.
    pub async fn fail_attempt(
        &self,
        job_id: &str,
        token: i64,
        rejected: bool,
        error: Value,
        backoff: chrono::Duration,
    ) -> Result<AttemptOutcome, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let Some((_, attempt, backend)) = held(conn, &job_id, token).await? else {
                        return Ok(AttemptOutcome::LeaseLost);
                    };
                    let outcome = if rejected { "rejected" } else { "failed" };
                    finish_lease(conn, &job_id, token, outcome, Some(&error), false).await?;
                    let max_attempts: i64 = sqlx::query_scalar("SELECT max_attempts FROM jobs WHERE id = ?")
                        .bind(&job_id)
                        .fetch_one(&mut *conn)
                        .await?;
                    let message = error["message"].as_str().unwrap_or("the attempt failed").to_string();
                    let unrunnable = unrunnable_reason(conn, &job_id).await?;
                    let final_reason = if attempt >= max_attempts {
                        Some(format!("{message} (attempt {attempt} of {max_attempts}; no attempts left)"))
                    } else {
                        unrunnable.map(|why| format!("{message}; {why}"))
                    };
                    if let Some(reason) = final_reason {
                        let mut e = error.clone();
                        e["message"] = json!(reason);
                        set_final(conn, &job_id, status::FAILED, Some(&e)).await?;
                        append_event(
                            conn,
                            &job_id,
                            EventInput {
                                kind: "failed",
                                status: Some(status::FAILED),
                                backend_id: Some(&backend),
                                attempt: Some(attempt),
                                message: Some(reason.clone()),
                                data: Some(error),
                            },
                        )
                        .await?;
                        return Ok(AttemptOutcome::Failed(reason));
                    }
                    let now = Utc::now();
                    let not_before = if rejected { now } else { now + backoff };
                    // Keep it away from this backend for a while, so another gets the first chance.
                    let avoid_until = now + backoff * 2;
                    sqlx::query(
                        "UPDATE jobs SET status = 'queued', backend_id = NULL, prompt_id = NULL, lease_token = NULL, \
                         not_before = ?, avoid_until = ?, error = ?, progress = NULL, updated_at = ? WHERE id = ?",
                    )
                    .bind(fmt_time(not_before))
                    .bind(fmt_time(avoid_until))
                    .bind(error.to_string())
                    .bind(fmt_time(now))
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "retry_scheduled",
                            status: Some(status::QUEUED),
                            backend_id: Some(&backend),
                            attempt: Some(attempt),
                            message: Some(format!(
                                "{message}; attempt {attempt} of {max_attempts} failed, retrying{}",
                                if rejected { " on another backend".to_string() } else { format!(" after {} s", backoff.num_seconds().max(0)) }
                            )),
                            data: Some(error),
                        },
                    )
                    .await?;
                    Ok(AttemptOutcome::Retry(not_before))
                })
            })
            .await
    }

    /// Takes a job back from its backend without burning an attempt (the
    /// backend lost it, restarted, or is gone). With `cleanup`, the prompt is
    /// remembered so that it is deleted and interrupted there if it comes back.
    pub async fn requeue_lost(
        &self,
        job_id: &str,
        token: i64,
        reason: String,
        cleanup: bool,
    ) -> Result<bool, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let Some((_, attempt, backend)) = held(conn, &job_id, token).await? else {
                        return Ok(false);
                    };
                    finish_lease(conn, &job_id, token, "lost", Some(&json!({ "message": reason })), cleanup).await?;
                    let cancel: i64 = sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = ?")
                        .bind(&job_id)
                        .fetch_one(&mut *conn)
                        .await?;
                    if cancel != 0 {
                        let message = format!("cancelled; backend {backend} no longer has it ({reason})");
                        cancel_in(conn, &job_id, Some(&backend), Some(attempt), message).await?;
                        return Ok(true);
                    }
                    requeue(
                        conn,
                        &job_id,
                        Some(&backend),
                        Some(attempt),
                        format!("taken back from backend {backend}: {reason}; the attempt does not count"),
                    )
                    .await?;
                    Ok(true)
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
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let Some((_, attempt, backend)) = held(conn, &job_id, token).await? else {
                        return Ok(false);
                    };
                    finish_lease(conn, &job_id, token, "cancelled", None, false).await?;
                    cancel_in(conn, &job_id, Some(&backend), Some(attempt), how).await?;
                    Ok(true)
                })
            })
            .await
    }

    /// Cancels a queued job now, or flags a held one for its backend to stop.
    pub async fn request_cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row =
                        sqlx::query("SELECT status, backend_id, attempts FROM jobs WHERE id = ?")
                            .bind(&job_id)
                            .fetch_optional(&mut *conn)
                            .await?;
                    let Some(row) = row else {
                        return Err(StoreError::NotFound(format!("job `{job_id}`")));
                    };
                    let current: String = row.try_get("status")?;
                    if status::is_terminal(&current) {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` is already {current}"
                        )));
                    }
                    if current == status::QUEUED {
                        cancel_in(conn, &job_id, None, None, "cancelled while queued".into())
                            .await?;
                        return Ok(CancelOutcome::Cancelled);
                    }
                    let backend_id: String = row
                        .try_get::<Option<String>, _>("backend_id")?
                        .unwrap_or_default();
                    let attempt: i64 = row.try_get("attempts")?;
                    sqlx::query(
                        "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    )
                    .bind(fmt_time(Utc::now()))
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "cancel_requested",
                            status: Some(&current),
                            backend_id: Some(&backend_id),
                            attempt: Some(attempt),
                            message: Some(format!(
                                "cancel requested; asking backend {backend_id} to stop it"
                            )),
                            data: None,
                        },
                    )
                    .await?;
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
                    let row = sqlx::query("SELECT status, attempts, max_attempts FROM jobs WHERE id = ?")
                        .bind(&job_id)
                        .fetch_optional(&mut *conn)
                        .await?;
                    let Some(row) = row else {
                        return Err(StoreError::NotFound(format!("job `{job_id}`")));
                    };
                    let current: String = row.try_get("status")?;
                    if current != status::FAILED && current != status::CANCELLED {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` is {current}; only failed or cancelled jobs can be retried"
                        )));
                    }
                    let attempts: i64 = row.try_get("attempts")?;
                    let max_attempts: i64 = row.try_get("max_attempts")?;
                    sqlx::query(
                        "UPDATE jobs SET status = 'queued', max_attempts = ?, backend_id = NULL, prompt_id = NULL, \
                         lease_token = NULL, not_before = NULL, avoid_until = NULL, finished_at = NULL, \
                         cancel_requested = 0, updated_at = ? WHERE id = ?",
                    )
                    .bind(max_attempts.max(attempts + 1))
                    .bind(fmt_time(Utc::now()))
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "retried",
                            status: Some(status::QUEUED),
                            message: Some(format!("queued again by a user after it was {current}")),
                            ..Default::default()
                        },
                    )
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Jobs a backend holds now.
    pub async fn active_jobs(&self, backend_id: &str) -> Result<Vec<ActiveJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT j.id, j.prompt_id, j.lease_token, j.status, j.attempts, j.cancel_requested, \
             l.submitted_at, l.leased_at FROM jobs j JOIN leases l ON l.prompt_id = j.prompt_id \
             WHERE j.backend_id = ? AND j.status IN ('assigned', 'running')",
        )
        .bind(backend_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                let leased_at: Option<String> = r.try_get("leased_at")?;
                Ok(ActiveJob {
                    job_id: r.try_get("id")?,
                    prompt_id: r.try_get("prompt_id")?,
                    token: r.try_get("lease_token")?,
                    status: r.try_get("status")?,
                    attempt: r.try_get("attempts")?,
                    submitted: r.try_get::<Option<String>, _>("submitted_at")?.is_some(),
                    cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
                    leased_at: leased_at.as_deref().and_then(parse_time),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Prompts taken back from this backend that must be deleted and interrupted there.
    pub async fn cleanup_prompts(&self, backend_id: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT prompt_id FROM leases WHERE backend_id = ? AND cleanup_pending = 1",
        )
        .bind(backend_id)
        .fetch_all(self.reader())
        .await?)
    }

    /// The backend was told to drop these prompts.
    pub async fn cleanup_done(&self, prompt_ids: Vec<String>) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    for p in &prompt_ids {
                        sqlx::query("UPDATE leases SET cleanup_pending = 0 WHERE prompt_id = ?")
                            .bind(p)
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
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
                        "SELECT id, backend_id, attempts FROM jobs WHERE status IN ('assigned', 'running') \
                         AND backend_id NOT IN (SELECT id FROM backends WHERE configured = 1)",
                    )
                    .fetch_all(&mut *conn)
                    .await?;
                    for r in &rows {
                        let id: String = r.try_get("id")?;
                        let backend: Option<String> = r.try_get("backend_id")?;
                        sqlx::query(
                            "UPDATE leases SET finished_at = ?, outcome = 'lost', cleanup_pending = 0 \
                             WHERE job_id = ? AND outcome IS NULL",
                        )
                        .bind(fmt_time(Utc::now()))
                        .bind(&id)
                        .execute(&mut *conn)
                        .await?;
                        let message = format!(
                            "backend {} is no longer in the config; queued again",
                            backend.as_deref().unwrap_or("?")
                        );
                        requeue(conn, &id, backend.as_deref(), None, message).await?;
                    }
                    Ok(rows.len() as u64)
                })
            })
            .await
    }

    /// The job's current lease token, status and cancel flag (for the cancel path).
    pub async fn lease_of(&self, job_id: &str) -> Result<Option<ActiveJob>, StoreError> {
        let job = sqlx::query("SELECT backend_id FROM jobs WHERE id = ?")
            .bind(job_id)
            .fetch_optional(self.reader())
            .await?;
        let Some(job) = job else { return Ok(None) };
        let Some(backend): Option<String> = job.try_get("backend_id")? else {
            return Ok(None);
        };
        Ok(self
            .active_jobs(&backend)
            .await?
            .into_iter()
            .find(|a| a.job_id == job_id))
    }
}
