//! Every change a job's run makes after it was submitted: the steps of a
//! leased job (submitted, running, completed, failed, retried, lost,
//! cancelled, stopped for a pause). What a user asks of a job by hand
//! (cancel, retry, a new priority) is in `requests.rs`; the statements a
//! step is made of in `writes.rs`.
//!
//! Why one helper ([`Store::transition`]) and one step function
//! ([`apply`]): every change of a leased job is fenced by its lease token
//! (`WHERE lease_token = ?`), so a worker that lost its lease (the job was
//! taken back and leased again) cannot overwrite the newer lease's state;
//! and every change is one transaction with its event. Written once, neither
//! can be forgotten by the next transition someone adds. The fence's
//! condition is written once too ([`with_fence`]): the two steps of a job's start
//! (accepted, running), which every job takes, carry it in their one
//! `UPDATE` instead of reading first; each statement is a round trip to
//! SQLite's thread while the farm's other writes wait.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use sqlx::{Row, SqliteConnection};

use super::batch::Batch;
use super::events::{push_event, EventInput};
use super::lease::HELD;
use super::model::*;
use super::writes::{
    push_back_to_queue, push_final, push_finish_lease, push_outputs, push_ran_at, Requeue,
};
use super::{fmt_time, Store, StoreError};

/// The job as the fence found it: still held under the caller's lease.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) job_id: String,
    pub(super) token: i64,
    pub(super) attempt: i64,
    pub(super) max_attempts: i64,
    pub(super) backend: String,
    pub(super) prompt_id: String,
    pub(super) cancel_requested: bool,
    /// A user paused it while a backend held it: stopped there, it goes
    /// back to the queue paused (a cancel, when both are asked, wins).
    pub(super) paused: bool,
    /// The backend had started running this lease's prompt.
    pub(super) started: bool,
    /// Its workflow and times, for the metrics of the caller (read with
    /// the fence, so a transition's caller need not read them again).
    pub(super) times: JobTimes,
}

/// A fenced statement's text: `{held}` in `sql` becomes the fence, job
/// `?1` still carries lease `?2` and a backend holds it (the job named
/// `j`), the one condition every fenced statement uses. Each text is built
/// once, into a `LazyLock`: these run for every job.
fn with_fence(sql: &str) -> String {
    sql.replace(
        "{held}",
        &format!("j.id = ?1 AND j.lease_token = ?2 AND {HELD}"),
    )
}

/// Reads the job if it still carries this lease and a backend holds it.
async fn fence(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
) -> Result<Option<Held>, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        with_fence(
            "SELECT j.attempts, j.max_attempts, j.backend_id, j.prompt_id, j.cancel_requested, \
             j.paused_at IS NOT NULL AS paused, l.started_at, j.workflow_id, j.submitted_at, j.started_at AS job_started_at \
             FROM jobs j LEFT JOIN leases l ON l.prompt_id = j.prompt_id WHERE {held}",
        )
    });
    let row = sqlx::query(&SQL)
        .bind(job_id)
        .bind(token)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(Held {
        job_id: job_id.to_string(),
        token,
        attempt: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        backend: r
            .try_get::<Option<String>, _>("backend_id")?
            .unwrap_or_default(),
        prompt_id: r
            .try_get::<Option<String>, _>("prompt_id")?
            .unwrap_or_default(),
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        paused: r.try_get::<i64, _>("paused")? != 0,
        started: r.try_get::<Option<String>, _>("started_at")?.is_some(),
        times: JobTimes {
            workflow_id: r.try_get("workflow_id")?,
            submitted_at: r.try_get("submitted_at")?,
            started_at: r.try_get("job_started_at")?,
        },
    }))
}

/// What a step fenced in itself came to (the lease held).
enum Stepped {
    /// It changed the job: the row its statement returned.
    Changed(sqlx::sqlite::SqliteRow),
    /// It had nothing to change (the step was recorded already).
    Unchanged { stop_requested: bool },
}

/// Whether a user asked that the held job `j` be stopped on its backend:
/// to cancel it, or to pause it (see [`Store::set_paused`]). A macro, so
/// that `concat!` can put it into the constant statements.
macro_rules! stop_requested {
    () => {
        "(j.cancel_requested OR j.paused_at IS NOT NULL)"
    };
}
pub(super) use stop_requested;

/// Whether the job still carries this lease and a backend holds it (and
/// then whether a stop was asked for): the fence alone, for a step whose
/// own statement found nothing to change.
async fn still_held(
    conn: &mut SqliteConnection,
    job_id: &str,
    token: i64,
) -> Result<Option<bool>, StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        with_fence(concat!(
            "SELECT ",
            stop_requested!(),
            " FROM jobs j WHERE {held}"
        ))
    });
    let stop: Option<i64> = sqlx::query_scalar(&SQL)
        .bind(job_id)
        .bind(token)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(stop.map(|c| c != 0))
}

/// One way a held job ends or goes back to the queue, with the event that
/// records it.
pub(super) enum Step {
    /// Finished; its outputs are collected. With when it ran, when that was
    /// learned late (see [`Store::complete_at`]).
    Completed(Vec<OutputRecord>, Option<RanAt>),
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
    /// The backend lost it: queued again, the attempt does not count;
    /// with `avoid_until`, that backend takes it again only after then.
    Requeued {
        reason: String,
        message: String,
        avoid_until: Option<DateTime<Utc>>,
        /// The backend died under the job this many times, and no other
        /// has: it takes the job no more (`lease::bar_reason`).
        died_here: Option<i64>,
    },
    /// Cancelled.
    Cancelled { message: String },
    /// Stopped for a user's pause: queued again (paused, unless resumed
    /// meanwhile), the attempt does not count.
    Stopped { message: String },
}

/// Applies one step to a held job: the job row, its lease, its event (and
/// its outputs, its webhook), in one round trip.
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
    let mut b = Batch::default();
    match step {
        Step::Completed(outputs, ran) => {
            push_outputs(&mut b, id, &outputs)?;
            push_finish_lease(&mut b, held, LeaseOutcome::Completed, None, &now);
            push_final(&mut b, id, JobStatus::Completed, None, &now);
            let mut message = format!(
                "completed on backend {} with {} output(s)",
                held.backend,
                outputs.len()
            );
            if let Some(ran) = ran {
                message.push_str(&push_ran_at(&mut b, held, ran, true));
            }
            let data = json!({ "outputs": outputs.iter().map(|o| &o.name).collect::<Vec<_>>() });
            let ev = event("completed", JobStatus::Completed, message, Some(data));
            push_event(&mut b, id, ev, &now);
            if held.cancel_requested {
                let message = format!(
                    "the cancel came too late: the prompt had already finished on backend {}, so the job is completed",
                    held.backend
                );
                let ev = event("cancel_too_late", JobStatus::Completed, message, None);
                push_event(&mut b, id, ev, &now);
            } else if held.paused {
                // No longer paused: an ended job is not (migration V14).
                let message = format!(
                    "the pause came too late: the prompt had already finished on backend {}, so the job is completed",
                    held.backend
                );
                let ev = event("pause_too_late", JobStatus::Completed, message, None);
                push_event(&mut b, id, ev, &now);
            }
        }
        Step::Failed {
            outcome,
            error,
            message,
        } => {
            push_finish_lease(&mut b, held, outcome, Some(&error), &now);
            let mut final_error = error.clone();
            final_error["message"] = json!(message);
            push_final(&mut b, id, JobStatus::Failed, Some(&final_error), &now);
            let ev = event("failed", JobStatus::Failed, message, Some(error));
            push_event(&mut b, id, ev, &now);
        }
        Step::Retry {
            outcome,
            error,
            message,
            not_before,
            avoid_until,
        } => {
            push_finish_lease(&mut b, held, outcome, Some(&error), &now);
            let requeue = Requeue {
                attempts_delta: 0,
                not_before: Some(not_before),
                avoid_until: Some(avoid_until),
                error: Some(&error),
            };
            push_back_to_queue(&mut b, id, requeue, &now);
            let ev = event("retry_scheduled", JobStatus::Queued, message, Some(error));
            push_event(&mut b, id, ev, &now);
        }
        Step::Requeued {
            reason,
            message,
            avoid_until,
            died_here,
        } => {
            let mut error = json!({ "message": reason, "while_running": held.started });
            if let Some(n) = died_here {
                error["died_here"] = json!(n);
            }
            push_finish_lease(&mut b, held, LeaseOutcome::Lost, Some(&error), &now);
            let requeue = Requeue {
                attempts_delta: -1,
                avoid_until,
                ..Requeue::default()
            };
            push_back_to_queue(&mut b, id, requeue, &now);
            let ev = event("requeued", JobStatus::Queued, message, None);
            push_event(&mut b, id, ev, &now);
        }
        Step::Cancelled { message } => {
            push_finish_lease(&mut b, held, LeaseOutcome::Cancelled, None, &now);
            push_final(&mut b, id, JobStatus::Cancelled, None, &now);
            let ev = event("cancelled", JobStatus::Cancelled, message, None);
            push_event(&mut b, id, ev, &now);
        }
        Step::Stopped { message } => {
            push_finish_lease(&mut b, held, LeaseOutcome::Paused, None, &now);
            let requeue = Requeue {
                attempts_delta: -1,
                ..Requeue::default()
            };
            push_back_to_queue(&mut b, id, requeue, &now);
            let kind = if held.paused { "paused" } else { "requeued" };
            push_event(
                &mut b,
                id,
                event(kind, JobStatus::Queued, message, None),
                &now,
            );
        }
    }
    b.run(conn).await
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
    /// A run lost after it had started keeps away from that backend for
    /// this long (its box died under it: another gets the first chance).
    pub avoid: Option<chrono::Duration>,
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

    /// Runs a step that carries the fence in itself (`sql`, built by
    /// [`with_fence`], with `?3` the time now) as one
    /// statement of the writer's; when it changes nothing, the fence alone
    /// says whether the lease still holds (`LeaseLost` if not).
    async fn fenced_statement(
        &self,
        job_id: &str,
        token: i64,
        sql: &'static str,
    ) -> Result<Stepped, StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write_statement(move |conn| {
                Box::pin(async move {
                    let row = sqlx::query(sql)
                        .bind(&job_id)
                        .bind(token)
                        .bind(fmt_time(Utc::now()))
                        .fetch_optional(&mut *conn)
                        .await?;
                    if let Some(row) = row {
                        return Ok(Stepped::Changed(row));
                    }
                    match still_held(conn, &job_id, token).await? {
                        Some(stop_requested) => Ok(Stepped::Unchanged { stop_requested }),
                        None => Err(StoreError::LeaseLost),
                    }
                })
            })
            .await
    }

    /// Records that ComfyUI accepted the prompt. Returns whether a stop (a
    /// cancel, a pause) is pending.
    ///
    /// One statement, fenced in itself: the lease's `submitted_at`, set
    /// once (the `leases_submitted` trigger appends `submitted_to_backend`,
    /// migration V9). Only when it changes nothing (the start recorded it
    /// first, or the lease is lost) does the fence read again.
    pub async fn mark_submitted(&self, job_id: &str, token: i64) -> Result<bool, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            with_fence(concat!(
                "UPDATE leases SET submitted_at = ?3 WHERE submitted_at IS NULL \
                 AND prompt_id = (SELECT j.prompt_id FROM jobs j WHERE {held}) \
                 RETURNING (SELECT ",
                stop_requested!(),
                " FROM jobs j WHERE j.id = ?1)"
            ))
        });
        match self.fenced_statement(job_id, token, &SQL).await? {
            Stepped::Changed(row) => Ok(row.try_get::<i64, _>(0)? != 0),
            Stepped::Unchanged { stop_requested } => Ok(stop_requested),
        }
    }

    /// `assigned` → `running`, once, with the job's workflow and times (for
    /// the queue-wait metric); later calls change nothing (`None`).
    ///
    /// One statement, fenced in itself: the `jobs_running` trigger records
    /// the lease's start (and its submission, if the answer to the submit
    /// is still on its way: it runs, so the backend has it) and appends the
    /// events (migration V10). Only when it changes nothing (running
    /// already, or the lease is lost) does the fence read again.
    pub async fn mark_running(
        &self,
        job_id: &str,
        token: i64,
    ) -> Result<Option<JobTimes>, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            with_fence(
                "UPDATE jobs AS j SET status = 'running', \
                 started_at = coalesce(started_at, ?3), updated_at = ?3 \
                 WHERE {held} AND j.status = 'assigned' \
                 RETURNING workflow_id, submitted_at, started_at",
            )
        });
        match self.fenced_statement(job_id, token, &SQL).await? {
            Stepped::Changed(r) => Ok(Some(JobTimes {
                workflow_id: r.try_get("workflow_id")?,
                submitted_at: r.try_get("submitted_at")?,
                started_at: r.try_get("started_at")?,
            })),
            Stepped::Unchanged { .. } => Ok(None),
        }
    }

    /// Records the collected outputs and completes the job; returns its
    /// workflow and times (for the run-time metric).
    pub async fn complete(
        &self,
        job_id: &str,
        token: i64,
        outputs: Vec<OutputRecord>,
    ) -> Result<Completion, StoreError> {
        self.complete_at(job_id, token, outputs, None).await
    }

    /// [`Store::complete`], for an end learned late (the orchestrator was
    /// down, or deaf to the box): the job's and its lease's end are `ran`'s,
    /// when the box ended it, not now; the farm view's bar and the job's
    /// run time stay true.
    pub async fn complete_at(
        &self,
        job_id: &str,
        token: i64,
        outputs: Vec<OutputRecord>,
        ran: Option<RanAt>,
    ) -> Result<Completion, StoreError> {
        let step = Step::Completed(outputs, ran);
        let id = job_id.to_string();
        self.fenced(job_id, token, |conn, held| {
            Box::pin(async move {
                apply(conn, &held, step).await?;
                // Queued by this completion (V11's trigger): the tags each needs.
                let released: Vec<String> = sqlx::query_scalar(
                    "SELECT requires FROM jobs WHERE status = 'queued' AND id IN \
                     (SELECT job_id FROM job_parents WHERE parent_id = ?)",
                )
                .bind(&id)
                .fetch_all(&mut *conn)
                .await?;
                let released = released
                    .iter()
                    .map(|r| serde_json::from_str(r).unwrap_or_default())
                    .collect();
                let failed_before: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM leases WHERE job_id = ? \
                     AND (outcome = 'failed' OR (outcome = 'lost' AND started_at IS NOT NULL)))",
                )
                .bind(&id)
                .fetch_one(&mut *conn)
                .await?;
                Ok(Completion {
                    times: held.times,
                    released,
                    failed_before,
                })
            })
        })
        .await
    }

    /// The backend confirmed the stop a user asked for (or did not answer
    /// in time; `how` says which): the job is cancelled, or, stopped for a
    /// pause, queued again paused (a resume that came meanwhile: queued).
    pub async fn confirm_stop(
        &self,
        job_id: &str,
        token: i64,
        how: String,
    ) -> Result<bool, StoreError> {
        let done = self
            .transition(job_id, token, |conn, held| {
                Box::pin(async move {
                    let step = if held.cancel_requested {
                        Step::Cancelled {
                            message: format!("cancelled: {how}"),
                        }
                    } else if held.paused {
                        Step::Stopped {
                            message: format!(
                                "paused: {how}; back in the queue in its place, no backend takes it until it is resumed"
                            ),
                        }
                    } else {
                        Step::Stopped {
                            message: format!(
                                "{how} for a pause, resumed since: queued again in its place"
                            ),
                        }
                    };
                    apply(conn, &held, step).await
                })
            })
            .await?;
        Ok(done.is_some())
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
                            avoid_until: None,
                            died_here: None,
                        };
                        apply(conn, &held, step).await?;
                    }
                    Ok(rows.len() as u64)
                })
            })
            .await
    }
}
