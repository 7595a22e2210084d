//! What a user asks of a job by hand: cancel it, queue it again, give it
//! another priority or start time, pause it and resume it.
//!
//! Why apart from `transitions.rs`: those are the steps of a job's run,
//! each fenced by the lease of the worker that takes it. These come from a
//! person (the API, the command line, the dashboard) at any moment of the
//! job's life, so they are checked against the job's state instead: a job
//! a backend holds is only flagged for its worker (a cancel, a pause that
//! interrupts), and a job that ended takes no new priority.

use chrono::Utc;
use serde_json::json;
use sqlx::Row;

use super::batch::Batch;
use super::events::{push_event, EventInput};
use super::model::*;
use super::writes::{job_row, push_back_to_queue, push_final, Requeue};
use super::{fmt_time, Store, StoreError};

/// What a change of priority did.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorityChange {
    /// The priority it had.
    pub from: i64,
    /// Its status when it changed.
    pub status: JobStatus,
}

/// What a pause or a resume did.
#[derive(Debug, Clone, PartialEq)]
pub struct PauseChange {
    /// Whether it was paused before.
    pub was_paused: bool,
    /// Its status.
    pub status: JobStatus,
    /// The backend tags it needs: a job resumed into the queue rings a
    /// worker that may take it, not the whole farm.
    pub requires: Vec<String>,
    /// Paused while this backend holds it: its worker is to stop it there.
    pub stopping: Option<String>,
}

/// What a change of a job's start time did.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleChange {
    /// Its status.
    pub status: JobStatus,
    /// The backend tags it needs: a job that may start now rings a worker
    /// that may take it.
    pub requires: Vec<String>,
}

impl Store {
    /// Sets when a job that has not started may start (its `start_after`;
    /// `None`: now), after it was submitted: a batch set for 20:00 moved
    /// to 22:00, or started now by someone leaving early. A waiting job
    /// keeps waiting for its parents too. A job that has run an attempt
    /// (its next one waits for its retry back-off), one a backend holds
    /// and one that ended are refused. The change is a `scheduled` event.
    pub async fn set_start_after(
        &self,
        job_id: &str,
        at: Option<chrono::DateTime<Utc>>,
    ) -> Result<ScheduleChange, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row = job_row(conn, &job_id, "status, backend_id, attempts, requires").await?;
                    let status: JobStatus = row.try_get("status")?;
                    let attempts: i64 = row.try_get("attempts")?;
                    let why = match row.try_get::<Option<String>, _>("backend_id")? {
                        Some(b) if status.is_held() => Some(format!("it is {status} on backend {b}")),
                        _ if !matches!(status, JobStatus::Queued | JobStatus::Waiting) => {
                            Some(format!("it is already {status}"))
                        }
                        _ if attempts > 0 => Some(format!(
                            "it has run {attempts} attempt{} already; its next waits for its retry back-off only",
                            if attempts == 1 { "" } else { "s" }
                        )),
                        _ => None,
                    };
                    if let Some(why) = why {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` cannot be given a start time: {why}"
                        )));
                    }
                    let requires: Vec<String> =
                        serde_json::from_str(&row.try_get::<String, _>("requires")?)?;
                    let now = fmt_time(Utc::now());
                    let mut b = Batch::default();
                    b.push("UPDATE jobs SET not_before = ?, updated_at = ? WHERE id = ?")
                        .bind(at.map(fmt_time))
                        .bind(now.clone())
                        .bind(job_id.clone());
                    let message = match at {
                        Some(t) => format!(
                            "start time set by a user: no backend takes it before {}",
                            fmt_time(t)
                        ),
                        None => "start time cleared by a user: it runs in its turn".into(),
                    };
                    let ev = EventInput {
                        kind: "scheduled",
                        status: Some(status),
                        message: Some(message),
                        data: Some(json!({ "start_after": at.map(fmt_time) })),
                        ..Default::default()
                    };
                    push_event(&mut b, &job_id, ev, &now);
                    b.run(conn).await?;
                    Ok(ScheduleChange { status, requires })
                })
            })
            .await
    }

    /// Pauses a job that has not started (`paused` true): it keeps its
    /// place in the queue and moves from `waiting` to `queued` as its
    /// parents complete, but no backend takes it; or resumes it. Both are
    /// idempotent (a batch's resume may name jobs never paused). A job a
    /// backend holds is paused only with `interrupt`: it is flagged for its
    /// worker to stop it there, and goes back to the queue in its place,
    /// paused, its run lost (the attempt does not count); without, it is
    /// refused, as an ended one is: a pause alone never throws away work.
    /// Resuming a job whose stop is pending withdraws it, if the worker has
    /// not begun it. The change is one of the job's events.
    pub async fn set_paused(
        &self,
        job_id: &str,
        paused: bool,
        interrupt: bool,
    ) -> Result<PauseChange, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row = job_row(
                        conn,
                        &job_id,
                        "status, backend_id, paused_at, requires, attempts, cancel_requested",
                    )
                    .await?;
                    let status: JobStatus = row.try_get("status")?;
                    let was_paused = row.try_get::<Option<String>, _>("paused_at")?.is_some();
                    let requires: Vec<String> =
                        serde_json::from_str(&row.try_get::<String, _>("requires")?)?;
                    let backend: Option<String> = row.try_get("backend_id")?;
                    let held_by = backend.filter(|_| status.is_held());
                    let mut change = PauseChange {
                        was_paused,
                        status,
                        requires,
                        stopping: None,
                    };
                    if was_paused == paused {
                        change.stopping = held_by.filter(|_| paused);
                        return Ok(change);
                    }
                    if paused && !matches!(status, JobStatus::Queued | JobStatus::Waiting) {
                        let refusal = match &held_by {
                            Some(b) if row.try_get::<i64, _>("cancel_requested")? != 0 => Some(
                                format!("it is {status} on backend {b}, and being cancelled"),
                            ),
                            Some(_) if interrupt => None,
                            Some(b) => Some(format!(
                                "it is {status} on backend {b}: a pause keeps a job from starting; cancel it, \
                                 or pause it with {{\"interrupt\": true}} to stop it there and queue it again paused (its run is lost)"
                            )),
                            None => Some(format!("it is already {status}")),
                        };
                        if let Some(why) = refusal {
                            return Err(StoreError::InvalidState(format!(
                                "job `{job_id}` cannot be paused: {why}"
                            )));
                        }
                    }
                    let now = fmt_time(Utc::now());
                    let mut b = Batch::default();
                    b.push("UPDATE jobs SET paused_at = ?, updated_at = ? WHERE id = ?")
                        .bind(paused.then(|| now.clone()))
                        .bind(now.clone())
                        .bind(job_id.clone());
                    let ev = match (&held_by, paused) {
                        (Some(backend), true) => EventInput {
                            kind: "pause_requested",
                            status: Some(status),
                            backend_id: Some(backend),
                            attempt: Some(row.try_get("attempts")?),
                            message: Some(format!(
                                "pause requested; asking backend {backend} to stop it: it goes back to the queue in its place, paused"
                            )),
                            data: None,
                        },
                        (Some(backend), false) => EventInput {
                            kind: "resumed",
                            status: Some(status),
                            backend_id: Some(backend),
                            message: Some(format!(
                                "resumed by a user while backend {backend} was being asked to stop it: stopped, it is queued again in its place, not paused"
                            )),
                            ..Default::default()
                        },
                        (None, _) => EventInput {
                            kind: if paused { "paused" } else { "resumed" },
                            status: Some(status),
                            message: Some(
                                if paused {
                                    "paused by a user: it keeps its place in the queue, and no backend takes it until it is resumed"
                                } else {
                                    "resumed by a user: it runs in its turn"
                                }
                                .into(),
                            ),
                            ..Default::default()
                        },
                    };
                    push_event(&mut b, &job_id, ev, &now);
                    b.run(conn).await?;
                    change.stopping = held_by.filter(|_| paused);
                    Ok(change)
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
                        job_row(conn, &job_id, "status, backend_id, attempts, lease_token").await?;
                    let current: JobStatus = row.try_get("status")?;
                    if current.is_terminal() {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` is already {current}"
                        )));
                    }
                    let now = fmt_time(Utc::now());
                    let mut b = Batch::default();
                    if matches!(current, JobStatus::Queued | JobStatus::Waiting) {
                        push_final(&mut b, &job_id, JobStatus::Cancelled, None, &now);
                        let ev = EventInput {
                            kind: "cancelled",
                            status: Some(JobStatus::Cancelled),
                            message: Some(format!("cancelled while {current}")),
                            ..Default::default()
                        };
                        push_event(&mut b, &job_id, ev, &now);
                        b.run(conn).await?;
                        return Ok(CancelOutcome::Cancelled);
                    }
                    let backend_id: String = row
                        .try_get::<Option<String>, _>("backend_id")?
                        .unwrap_or_default();
                    b.push("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?")
                        .bind(now.clone())
                        .bind(job_id.clone());
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
                    push_event(&mut b, &job_id, ev, &now);
                    b.run(conn).await?;
                    Ok(CancelOutcome::Requested { backend_id })
                })
            })
            .await
    }

    /// Queues a failed or cancelled job again, as a new attempt, and
    /// afresh: what its earlier attempts decided (a backend that refused
    /// it, failed it twice, died under it) no longer keeps it from any
    /// backend, and its lost runs count from none again (where it ran out
    /// of GPU memory still counts: a box's memory is not mended). A user retries
    /// once the cause is mended; were the bars kept, a job every backend
    /// had refused would wait for ever.
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
                    // One that starts from jobs not all completed waits for them again.
                    let waits_on: Vec<String> = sqlx::query_scalar(
                        "SELECT p.parent_id FROM job_parents p JOIN jobs j ON j.id = p.parent_id \
                         WHERE p.job_id = ? AND j.status <> 'completed' ORDER BY p.parent_id",
                    )
                    .bind(&job_id)
                    .fetch_all(&mut *conn)
                    .await?;
                    let now = fmt_time(Utc::now());
                    let mut b = Batch::default();
                    b.push(
                        "UPDATE jobs SET max_attempts = ?, finished_at = NULL, cancel_requested = 0, \
                         paused_at = NULL, retried_at = ? WHERE id = ?",
                    )
                    .bind(max_attempts.max(attempts + 1))
                    .bind(now.clone())
                    .bind(job_id.clone());
                    push_back_to_queue(&mut b, &job_id, Requeue::default(), &now);
                    let (status, message) = if waits_on.is_empty() {
                        (JobStatus::Queued, format!("queued again by a user after it was {current}"))
                    } else {
                        b.push("UPDATE jobs SET status = 'waiting' WHERE id = ?")
                            .bind(job_id.clone());
                        (
                            JobStatus::Waiting,
                            format!(
                                "retried by a user after it was {current}; it waits for {} to complete",
                                waits_on.join(", ")
                            ),
                        )
                    };
                    let ev = EventInput {
                        kind: "retried",
                        status: Some(status),
                        message: Some(message),
                        ..Default::default()
                    };
                    push_event(&mut b, &job_id, ev, &now);
                    b.run(conn).await
                })
            })
            .await
    }

    /// Gives a job that has not ended a new priority: a queued job takes
    /// its place in the queue at once; a held one keeps it for when it is
    /// queued again (a retry, a requeue). The change is one of the job's
    /// events, so its history says who moved it up the queue and when.
    pub async fn set_priority(
        &self,
        job_id: &str,
        priority: i64,
    ) -> Result<PriorityChange, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row = job_row(conn, &job_id, "status, priority, backend_id").await?;
                    let status: JobStatus = row.try_get("status")?;
                    if status.is_terminal() {
                        return Err(StoreError::InvalidState(format!(
                            "job `{job_id}` is already {status}; a priority orders jobs waiting to run"
                        )));
                    }
                    let from: i64 = row.try_get("priority")?;
                    if from == priority {
                        return Ok(PriorityChange { from, status });
                    }
                    let now = fmt_time(Utc::now());
                    let mut b = Batch::default();
                    b.push("UPDATE jobs SET priority = ?, updated_at = ? WHERE id = ?")
                        .bind(priority)
                        .bind(now.clone())
                        .bind(job_id.clone());
                    let backend: Option<String> = row.try_get("backend_id")?;
                    let when = match (&backend, status) {
                        (Some(b), s) if s.is_held() => {
                            format!("; backend {b} runs it already, it counts if it is queued again")
                        }
                        _ => String::new(),
                    };
                    let ev = EventInput {
                        kind: "priority_changed",
                        status: Some(status),
                        backend_id: backend.as_deref(),
                        message: Some(format!(
                            "priority changed from {from} to {priority} by a user{when}"
                        )),
                        data: Some(json!({"from": from, "to": priority})),
                        ..Default::default()
                    };
                    push_event(&mut b, &job_id, ev, &now);
                    b.run(conn).await?;
                    Ok(PriorityChange { from, status })
                })
            })
            .await
    }
}
