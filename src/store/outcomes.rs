//! What a failed or lost attempt leads to: another try after a back-off, a
//! try elsewhere, the job failed for good, or queued again without the
//! attempt counting.
//!
//! Why apart from the transition mechanics: these are the farm's policies
//! (attempts, the per-backend rules, lost runs); each is decided here, once,
//! inside the transaction that records the attempt's end.

use chrono::Utc;
use serde_json::{json, Value};
use sqlx::SqliteConnection;

use super::batch::Batch;
use super::cleanup::{add_cleanup, CleanupEntry};
use super::model::*;
use super::transitions::{apply, Held, LostOutcome, LostRun, Step};
use super::waiting::unrunnable_reason;
use super::writes::{finish_lease, push_ran_at};
use super::{Store, StoreError};

/// How long a retried job keeps away from the backend that failed it:
/// another backend gets the first chance, then this one may take it again
/// (and its worker is woken then: it may be the only one that can). Only
/// while another that may run the job is online (`lease::eligible`): with
/// none, waiting would only hold the job back.
pub fn avoid_span(backoff: chrono::Duration) -> chrono::Duration {
    backoff * 2
}

/// How an attempt failed, which decides whether the job is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    /// At run time: tried again after a back-off, another backend first.
    Failed,
    /// The backend refused the graph: tried on another backend at once.
    Rejected,
    /// Nothing any backend could do (a file the job names is gone): the
    /// job fails now, its attempts left unused.
    Hopeless,
}

/// Ends an attempt that failed, inside the fenced transaction.
async fn fail_in(
    conn: &mut SqliteConnection,
    held: Held,
    how: Failure,
    error: Value,
    backoff: chrono::Duration,
    ran: Option<RanAt>,
) -> Result<AttemptOutcome, StoreError> {
    let rejected = how == Failure::Rejected;
    let outcome = if rejected {
        LeaseOutcome::Rejected
    } else {
        LeaseOutcome::Failed
    };
    // Recorded first, so that the backend rules below count this lease.
    finish_lease(conn, &held, outcome, Some(&error)).await?;
    let message = error["message"]
        .as_str()
        .unwrap_or("the attempt failed")
        .to_string();
    let (attempt, max) = (held.attempt, held.max_attempts);
    let final_reason = if how == Failure::Hopeless {
        Some(format!(
            "{message} (attempt {attempt} of {max}; no attempt can succeed)"
        ))
    } else if attempt >= max {
        Some(format!(
            "{message} (attempt {attempt} of {max}; no attempts left)"
        ))
    } else {
        unrunnable_reason(conn, &held.job_id)
            .await?
            .map(|why| format!("{message}; {why}"))
    };
    // Heard of late: the run's times are the box's (after the step, which
    // stamps them now), said in the step's event.
    let mut late = Batch::default();
    let said = ran.map(|r| push_ran_at(&mut late, &held, r, final_reason.is_some()));
    let said = said.as_deref().unwrap_or_default();
    if let Some(reason) = final_reason {
        let step = Step::Failed {
            outcome,
            error,
            message: format!("{reason}{said}"),
        };
        apply(conn, &held, step).await?;
        late.run(conn).await?;
        return Ok(AttemptOutcome::Failed(reason));
    }
    let now = Utc::now();
    let not_before = if rejected { now } else { now + backoff };
    let retrying = if rejected {
        " on another backend".to_string()
    } else {
        format!(" after {} s", backoff.num_seconds().max(0))
    };
    let step = Step::Retry {
        outcome,
        message: format!("{message}; attempt {attempt} of {max} failed, retrying{retrying}{said}"),
        error,
        not_before,
        avoid_until: now + avoid_span(backoff),
    };
    apply(conn, &held, step).await?;
    late.run(conn).await?;
    Ok(AttemptOutcome::Retry(not_before))
}

/// Takes a job back from its backend, inside the fenced transaction.
async fn lose_in(
    conn: &mut SqliteConnection,
    held: Held,
    run: LostRun,
) -> Result<LostOutcome, StoreError> {
    let backend = held.backend.clone();
    if let Some(not_before) = run.cleanup {
        let entry = CleanupEntry::new(
            &held.prompt_id,
            &backend,
            Some(&held.job_id),
            run.reason.as_str(),
            not_before,
        );
        add_cleanup(conn, &entry).await?;
    }
    if held.cancel_requested {
        let message = format!(
            "cancelled; backend {backend} no longer has it ({})",
            run.reason
        );
        apply(conn, &held, Step::Cancelled { message }).await?;
        return Ok(LostOutcome::Cancelled);
    }
    if held.paused {
        // Stopped for the pause, if not the way it was asked: not a lost run.
        let message = format!(
            "paused: backend {backend} no longer has it ({}); back in the queue in its place, no backend takes it until it is resumed",
            run.reason
        );
        apply(conn, &held, Step::Stopped { message }).await?;
        return Ok(LostOutcome::Requeued);
    }
    let lost = if held.started {
        lost_so_far(conn, &held).await?
    } else {
        LostSoFar::default()
    };
    let lost_runs = lost.runs;
    // The limit judges the job only where its runs died on more than one
    // box, or no other may run it: a box that died under it every time
    // may be what is wrong (a GPU that faults), so it keeps off the job
    // and another box has its turn.
    let mut keeps_off = false;
    if let Some(max) = run
        .max_lost_runs
        .filter(|m| held.started && lost_runs >= *m)
    {
        keeps_off = lost.elsewhere == 0 && another_may_run(conn, &held).await?;
        if !keeps_off {
            let message = format!(
                "backend {backend} lost this job while running it ({}); its backends died \
                 under it {lost_runs} times (dispatch.max_lost_runs is {max}): the job may be \
                 what crashes them",
                run.reason
            );
            let error = json!({
                "message": message,
                "backend_id": backend,
                "attempt": held.attempt,
                "lost_runs": lost_runs,
            });
            let step = Step::Failed {
                outcome: LeaseOutcome::Lost,
                error,
                message: message.clone(),
            };
            apply(conn, &held, step).await?;
            return Ok(LostOutcome::Failed(message));
        }
    }
    let counted = match (held.started, run.max_lost_runs) {
        (false, _) => String::new(),
        (true, _) if keeps_off => format!(
            " ({backend} died under it {lost_runs} times, dispatch.max_lost_runs, and no other \
             backend has run it: {backend} takes it no more, another will; the job fails for \
             this only once another box dies under it too)"
        ),
        (true, Some(max)) => format!(" (lost while running: {lost_runs} of {max})"),
        (true, None) => " (lost while running)".to_string(),
    };
    let avoid_until = run
        .avoid
        .filter(|_| held.started && !keeps_off)
        .map(|span| Utc::now() + span);
    let avoiding = avoid_until.map_or(String::new(), |t| {
        format!(
            "; another backend gets it first, {backend} from {} (at once while no other may run it)",
            t.format("%H:%M:%S UTC")
        )
    });
    let message = format!(
        "taken back from backend {backend}: {}; the attempt does not count{counted}{avoiding}",
        run.reason
    );
    let step = Step::Requeued {
        reason: run.reason,
        message,
        avoid_until,
        died_here: keeps_off.then_some(lost_runs),
    };
    apply(conn, &held, step).await?;
    Ok(LostOutcome::Requeued)
}

/// A job's runs lost after they had started, this one counted.
#[derive(Default)]
struct LostSoFar {
    /// All of them.
    runs: i64,
    /// Those lost on another backend than the one losing it now.
    elsewhere: i64,
}

async fn lost_so_far(conn: &mut SqliteConnection, held: &Held) -> Result<LostSoFar, StoreError> {
    let (runs, elsewhere): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE l.backend_id IS NOT ?2) FROM leases l \
         JOIN jobs j ON j.id = l.job_id \
         WHERE l.job_id = ?1 AND l.outcome = 'lost' AND l.started_at IS NOT NULL AND {}",
        super::lease::since_retry("l", "j")
    ))
    .bind(&held.job_id)
    .bind(&held.backend)
    .fetch_one(&mut *conn)
    .await?;
    Ok(LostSoFar {
        runs: runs + 1,
        elsewhere,
    })
}

/// Whether a configured backend other than the one holding the job may run
/// it (enabled or not, online or not: one that may come back is a turn).
async fn another_may_run(conn: &mut SqliteConnection, held: &Held) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM jobs j, backends b WHERE j.id = ?1 AND b.configured = 1 \
         AND b.id IS NOT ?2 AND ({}) IS NULL)",
        super::lease::bar_reason("j", "b")
    ))
    .bind(&held.job_id)
    .bind(&held.backend)
    .fetch_one(&mut *conn)
    .await?)
}

impl Store {
    /// Ends an attempt that failed. `rejected` (the backend refused the
    /// graph) never retries on that backend; a run-time failure retries
    /// after `backoff`, preferring another backend. With no attempts left,
    /// or no backend that can run it, the job fails with `error`.
    pub async fn fail_attempt(
        &self,
        job_id: &str,
        token: i64,
        rejected: bool,
        error: Value,
        backoff: chrono::Duration,
    ) -> Result<AttemptOutcome, StoreError> {
        self.fail_attempt_at(job_id, token, rejected, error, backoff, None)
            .await
    }

    /// [`Store::fail_attempt`], for a failure learned late: the attempt's
    /// (and a failed job's) end are `ran`'s, when the box ended it.
    pub async fn fail_attempt_at(
        &self,
        job_id: &str,
        token: i64,
        rejected: bool,
        error: Value,
        backoff: chrono::Duration,
        ran: Option<RanAt>,
    ) -> Result<AttemptOutcome, StoreError> {
        let how = if rejected {
            Failure::Rejected
        } else {
            Failure::Failed
        };
        self.fail_with(job_id, token, how, error, backoff, ran)
            .await
    }

    /// Ends an attempt that no backend could have made succeed (a file the
    /// job names is gone for good): the job fails now with `error`, its
    /// attempts left unused, rather than failing each of them in turn.
    pub async fn fail_hopeless(
        &self,
        job_id: &str,
        token: i64,
        error: Value,
    ) -> Result<AttemptOutcome, StoreError> {
        let none = chrono::Duration::zero();
        self.fail_with(job_id, token, Failure::Hopeless, error, none, None)
            .await
    }

    async fn fail_with(
        &self,
        job_id: &str,
        token: i64,
        how: Failure,
        error: Value,
        backoff: chrono::Duration,
        ran: Option<RanAt>,
    ) -> Result<AttemptOutcome, StoreError> {
        let outcome = self
            .transition(job_id, token, move |conn, held| {
                Box::pin(fail_in(conn, held, how, error, backoff, ran))
            })
            .await?;
        Ok(outcome.unwrap_or(AttemptOutcome::LeaseLost))
    }

    /// Takes a job back from its backend without burning an attempt (the
    /// backend lost it, restarted, or is gone). With `cleanup`, the prompt
    /// goes on the cleanup list, to be removed there if the backend comes
    /// back. Returns whether the lease was still ours.
    pub async fn requeue_lost(
        &self,
        job_id: &str,
        token: i64,
        reason: String,
        cleanup: bool,
    ) -> Result<bool, StoreError> {
        let run = LostRun {
            reason,
            cleanup: cleanup.then(Utc::now),
            max_lost_runs: None,
            avoid: None,
        };
        Ok(self.give_back(job_id, token, run).await? != LostOutcome::LeaseLost)
    }

    /// Takes a job back from its backend as `run` says; a run lost after it
    /// had started counts towards `max_lost_runs`.
    pub async fn give_back(
        &self,
        job_id: &str,
        token: i64,
        run: LostRun,
    ) -> Result<LostOutcome, StoreError> {
        let outcome = self
            .transition(job_id, token, move |conn, held| {
                Box::pin(lose_in(conn, held, run))
            })
            .await?;
        Ok(outcome.unwrap_or(LostOutcome::LeaseLost))
    }
}
