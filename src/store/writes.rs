//! The statements a job's change is made of, shared by the steps of its
//! run (`transitions.rs`), what becomes of a lost one (`outcomes.rs`) and
//! what a user asks of it (`requests.rs`).
//!
//! Why apart: each piece is pushed onto the caller's [`Batch`], so that a
//! change and its event go to SQLite in one round trip whoever makes it;
//! written once here, a job put back in the queue or ended is put back or
//! ended the same way by all three.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::SqliteConnection;

use super::batch::Batch;
use super::events::{push_event, EventInput};
use super::model::*;
use super::transitions::Held;
use super::webhooks::push_webhook;
use super::{fmt_time, StoreError};

/// The collected outputs, as one statement whatever their number (a JSON
/// array read by `json_each`).
pub(super) fn push_outputs(
    b: &mut Batch<'_>,
    job_id: &str,
    outputs: &[OutputRecord],
) -> Result<(), StoreError> {
    if outputs.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = outputs
        .iter()
        .map(|o| {
            json!([
                o.name,
                o.kind,
                o.node_id,
                o.filename,
                o.subfolder,
                o.file_type,
                o.size,
                o.sha256,
                o.content_type
            ])
        })
        .collect();
    b.push(
        "INSERT OR REPLACE INTO outputs (job_id, name, kind, node_id, filename, subfolder, type, \
         size, sha256, content_type) SELECT ?, o.value ->> 0, o.value ->> 1, o.value ->> 2, \
         o.value ->> 3, o.value ->> 4, o.value ->> 5, o.value ->> 6, o.value ->> 7, o.value ->> 8 \
         FROM json_each(?) o ORDER BY o.key",
    )
    .bind(job_id.to_string())
    .bind(serde_json::to_string(&rows)?);
    Ok(())
}

/// Closes the held lease with its outcome.
pub(super) fn push_finish_lease(
    b: &mut Batch<'_>,
    held: &Held,
    outcome: LeaseOutcome,
    error: Option<&Value>,
    now: &str,
) {
    b.push(
        "UPDATE leases SET finished_at = ?, outcome = ?, error = ? WHERE job_id = ? AND lease_token = ?",
    )
    .bind(now.to_string())
    .bind(outcome)
    .bind(error.map(|e| e.to_string()))
    .bind(held.job_id.clone())
    .bind(held.token);
}

/// A run whose end was learned late: its lease's end (and start, if it
/// was never seen) are when the box says, never before the lease began,
/// and so is the job's end when `job_ended` (it ends with this run). The
/// words its event adds; the event itself stays in the log's order.
pub(super) fn push_ran_at(b: &mut Batch<'_>, held: &Held, ran: RanAt, job_ended: bool) -> String {
    let (id, ended) = (held.job_id.as_str(), fmt_time(ran.ended));
    // A start the box puts after its end is its end.
    let started = ran.started.map(|s| fmt_time(s.min(ran.ended)));
    b.push(
        "UPDATE leases SET finished_at = max(?, leased_at), \
         started_at = coalesce(started_at, max(coalesce(?, leased_at), leased_at)) \
         WHERE job_id = ? AND lease_token = ?",
    )
    .bind(ended.clone())
    .bind(started)
    .bind(id.to_string())
    .bind(held.token);
    if job_ended {
        b.push(
            "UPDATE jobs SET finished_at = (SELECT finished_at FROM leases \
             WHERE job_id = ? AND lease_token = ?) WHERE id = ?",
        )
        .bind(id.to_string())
        .bind(held.token)
        .bind(id.to_string());
    }
    format!("; it ended there at {ended}, before the orchestrator heard of it")
}

/// Closes the held lease with its outcome, now (before the caller's rules
/// read the job's leases).
pub(super) async fn finish_lease(
    conn: &mut SqliteConnection,
    held: &Held,
    outcome: LeaseOutcome,
    error: Option<&Value>,
) -> Result<(), StoreError> {
    let mut b = Batch::default();
    push_finish_lease(&mut b, held, outcome, error, &fmt_time(Utc::now()));
    b.run(conn).await
}

/// How a job goes back to the queue.
#[derive(Default)]
pub(super) struct Requeue<'e> {
    /// Added to its attempts: -1 gives the attempt back.
    pub(super) attempts_delta: i64,
    /// No backend takes it before then (a retry's back-off).
    pub(super) not_before: Option<DateTime<Utc>>,
    /// Its last backend takes it again only after then.
    pub(super) avoid_until: Option<DateTime<Utc>>,
    /// Kept as the job's last error.
    pub(super) error: Option<&'e Value>,
}

/// Back to the queue: no backend, no lease.
pub(super) fn push_back_to_queue(b: &mut Batch<'_>, job_id: &str, r: Requeue<'_>, now: &str) {
    b.push(
        "UPDATE jobs SET status = 'queued', backend_id = NULL, prompt_id = NULL, lease_token = NULL, \
         attempts = attempts + ?, not_before = ?, avoid_until = ?, error = coalesce(?, error), \
         progress = NULL, updated_at = ? WHERE id = ?",
    )
    .bind(r.attempts_delta)
    .bind(r.not_before.map(fmt_time))
    .bind(r.avoid_until.map(fmt_time))
    .bind(r.error.map(|e| e.to_string()))
    .bind(now.to_string())
    .bind(job_id.to_string());
}

/// The columns `cols` of job `job_id`; `NotFound` when there is none.
pub(super) async fn job_row(
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

/// A terminal state, with the job's webhook queued if it names one.
pub(super) fn push_final(
    b: &mut Batch<'_>,
    job_id: &str,
    status: JobStatus,
    error: Option<&Value>,
    now: &str,
) {
    // A completed job keeps no error of an earlier attempt; a failed or
    // cancelled one keeps the last it had unless given its own.
    b.push(
        "UPDATE jobs SET status = ?, \
         error = CASE WHEN ? THEN NULL ELSE coalesce(?, error) END, \
         finished_at = ?, updated_at = ?, progress = NULL, cancel_requested = 0 WHERE id = ?",
    )
    .bind(status)
    .bind(status == JobStatus::Completed)
    .bind(error.map(|e| e.to_string()))
    .bind(now.to_string())
    .bind(now.to_string())
    .bind(job_id.to_string());
    push_webhook(b, job_id, status, now);
}

/// Fails a queued job that no backend can run (found so when a backend's
/// inventory was checked), inside the caller's transaction.
pub(super) async fn fail_queued(
    conn: &mut SqliteConnection,
    job_id: &str,
    reason: String,
) -> Result<(), StoreError> {
    let error = json!({ "message": reason });
    let now = fmt_time(Utc::now());
    let mut b = Batch::default();
    push_final(&mut b, job_id, JobStatus::Failed, Some(&error), &now);
    let ev = EventInput {
        kind: "failed",
        status: Some(JobStatus::Failed),
        message: Some(reason),
        data: Some(error),
        ..Default::default()
    };
    push_event(&mut b, job_id, ev, &now);
    b.run(conn).await
}
