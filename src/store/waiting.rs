//! Why a job waits, or why no backend can run it, in a sentence for people.
//!
//! Why apart from leasing: these read the same rules leasing applies
//! ([`super::lease::bar_reason`]) but decide nothing; they explain a queued
//! job on its page, and name what each backend lacks when a job fails for
//! want of one.

use chrono::Utc;
use sqlx::{Row, SqliteConnection};

use super::lease::bar_reason;
use super::model::*;
use super::{fmt_time, StoreError};

/// Why no configured backend can run a job, or `None` if one can (enabled
/// or not: a disabled backend may come back, so the job waits for it).
pub(super) async fn unrunnable_reason(
    conn: &mut SqliteConnection,
    job_id: &str,
) -> Result<Option<String>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT b.id, {} AS bar FROM jobs j, backends b \
         WHERE j.id = ? AND b.configured = 1 ORDER BY b.id",
        bar_reason("j", "b")
    ))
    .bind(job_id)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        // No farm configured yet: jobs wait for one.
        return Ok(None);
    }
    let mut reasons = Vec::new();
    for r in rows {
        let id: String = r.try_get("id")?;
        match r.try_get::<Option<String>, _>("bar")? {
            Some(why) => reasons.push(format!("{id} {why}")),
            None => return Ok(None),
        }
    }
    Ok(Some(format!(
        "no enabled backend can run this job: {}",
        reasons.join("; ")
    )))
}

/// What only the running farm knows of its backends, which a queued job's
/// page needs beside the database to say truly why it waits.
#[derive(Debug, Clone, Default)]
pub struct LiveBackends {
    /// Prompts not ours in each backend's ComfyUI queue (they take its slots).
    pub not_ours: std::collections::HashMap<String, usize>,
    /// Prompts of each backend that finished and wait for space on the
    /// data folder's disk to save their outputs (they hold its slots).
    pub waiting_for_disk: std::collections::HashMap<String, usize>,
    /// Backends in quarantine, each with a sentence: until when, and why.
    pub quarantined: std::collections::HashMap<String, String>,
}

/// Why a job that starts from others' outputs waits: each of them not yet
/// completed, with where it stands.
async fn waiting_on_parents(
    conn: &mut SqliteConnection,
    job_id: &str,
) -> Result<String, StoreError> {
    let parents: Vec<(String, JobStatus, Option<String>)> = sqlx::query_as(
        "SELECT j.id, j.status, j.backend_id FROM job_parents p JOIN jobs j ON j.id = p.parent_id \
         WHERE p.job_id = ? AND j.status <> 'completed' ORDER BY j.seq",
    )
    .bind(job_id)
    .fetch_all(&mut *conn)
    .await?;
    let each: Vec<String> = parents
        .iter()
        .map(|(id, status, backend)| match (status, backend) {
            (s, Some(b)) if s.is_held() => format!("{id} ({s} on {b})"),
            (JobStatus::Failed | JobStatus::Cancelled, _) => {
                format!("{id} ({status}: retry it, or cancel this job)")
            }
            _ => format!("{id} ({status})"),
        })
        .collect();
    Ok(match each.len() {
        0 => "the jobs it starts from completed; it is being queued".into(),
        1 => format!(
            "waiting for the job it starts from to complete: {}",
            each[0]
        ),
        _ => format!(
            "waiting for the jobs it starts from to complete: {}",
            each.join(", ")
        ),
    })
}

/// Why a job submitted to start later (`start_after`, never tried) waits.
fn scheduled_until(t: &str) -> String {
    format!("scheduled: no backend takes it before {t} (its start_after)")
}

/// Why a queued job is not running yet, in a sentence: its retry back-off,
/// or what keeps each backend from taking it now (the same rules leasing
/// applies), or for a waiting one the jobs it starts from, or that a user
/// paused it. `None` for a job that is neither queued nor waiting. On the caller's
/// connection: the job's page reads it in the same snapshot as the job.
pub(super) async fn why_waiting_in(
    conn: &mut SqliteConnection,
    job_id: &str,
    live: &LiveBackends,
) -> Result<Option<String>, StoreError> {
    let job: Option<(JobStatus, Option<String>, Option<String>, i64)> =
        sqlx::query_as("SELECT status, not_before, paused_at, attempts FROM jobs WHERE id = ?")
            .bind(job_id)
            .fetch_optional(&mut *conn)
            .await?;
    let now = fmt_time(Utc::now());
    let (not_before, attempts) = match job {
        Some((
            status @ (JobStatus::Queued | JobStatus::Waiting),
            not_before,
            Some(at),
            attempts,
        )) => {
            // What else holds it back once resumed: its start time, its parents.
            let scheduled = match not_before.filter(|t| *t > now) {
                Some(t) if attempts == 0 => format!("; and {}", scheduled_until(&t)),
                _ => String::new(),
            };
            let parents = if status == JobStatus::Waiting {
                format!("; then {}", waiting_on_parents(conn, job_id).await?)
            } else {
                String::new()
            };
            // Paused by the farm with its batch (`causes.rs`): its event says why.
            let by_farm: Option<String> = sqlx::query_scalar(
                "SELECT message FROM job_events WHERE job_id = ? AND kind = 'paused' \
                 AND json_extract(data, '$.by') = 'farm' AND at = ? ORDER BY seq DESC LIMIT 1",
            )
            .bind(job_id)
            .bind(&at)
            .fetch_optional(&mut *conn)
            .await?;
            return Ok(Some(match by_farm {
                Some(why) => format!("{why}{scheduled}{parents}"),
                None => format!(
                    "paused by a user at {at}: no backend takes it until it is resumed \
                     (POST /api/job/{job_id}/resume){scheduled}{parents}"
                ),
            }));
        }
        Some((JobStatus::Queued, not_before, None, attempts)) => (not_before, attempts),
        Some((JobStatus::Waiting, _, None, _)) => {
            return waiting_on_parents(conn, job_id).await.map(Some)
        }
        _ => return Ok(None),
    };
    if let Some(t) = not_before.filter(|t| *t > now) {
        return Ok(Some(if attempts == 0 {
            scheduled_until(&t)
        } else {
            format!("waiting for its retry back-off to end at {t}")
        }));
    }
    let rows = sqlx::query(&format!(
        "SELECT b.id, b.config_enabled, b.admin_state, b.off_hours, b.hours, b.state, b.max_inflight, {} AS bar, \
         (SELECT count(*) FROM jobs h WHERE h.backend_id = b.id AND h.status IN ('assigned', 'running')) \
         AS active FROM jobs j, backends b WHERE j.id = ? AND b.configured = 1 ORDER BY b.id",
        bar_reason("j", "b")
    ))
    .bind(job_id)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(Some("no backends are configured; it waits for one".into()));
    }
    let mut kept = Vec::new();
    let mut free = Vec::new();
    for r in &rows {
        let id: String = r.try_get("id")?;
        let admin: Option<AdminState> = r.try_get("admin_state")?;
        let state: BackendState = r.try_get("state")?;
        let (active, max): (i64, i64) = (r.try_get("active")?, r.try_get("max_inflight")?);
        let others = live.not_ours.get(&id).copied().unwrap_or(0) as i64;
        let why = if let Some(bar) = r.try_get::<Option<String>, _>("bar")? {
            bar
        } else if !backend_admitted(r.try_get::<i64, _>("config_enabled")? != 0, admin) {
            format!(
                "is {}",
                admin.map_or("disabled in the config", |a| a.as_str())
            )
        } else if r.try_get::<i64, _>("off_hours")? != 0 {
            format!(
                "is outside its hours ({})",
                r.try_get::<Option<String>, _>("hours")?.unwrap_or_default()
            )
        } else if state != BackendState::Online {
            format!("is {}", state.as_str())
        } else if let Some(q) = live.quarantined.get(&id) {
            format!("is in quarantine {q}")
        } else if active + others >= max {
            let disk = match live.waiting_for_disk.get(&id) {
                Some(n) => format!(
                    "; {n} of them finished, their outputs waiting for space on the orchestrator's \
                     full disk: free space on it"
                ),
                None => String::new(),
            };
            match others {
                0 => format!("is busy ({active} of {max} slots{disk})"),
                n => format!(
                    "is busy ({active} of {max} slots ours{disk}, and {n} prompt{} in its queue not from the orchestrator)",
                    if n == 1 { "" } else { "s" }
                ),
            }
        } else {
            free.push(id);
            continue;
        };
        kept.push(format!("{id} {why}"));
    }
    let shared = super::shares::standing(conn, job_id)
        .await?
        .map(|g| format!("; {g}"))
        .unwrap_or_default();
    Ok(Some(if free.is_empty() {
        format!("no backend can take it now: {}{shared}", kept.join("; "))
    } else {
        format!(
            "next in line for a free slot on {} (behind jobs of higher priority or older{}){shared}",
            free.join(", "),
            if shared.is_empty() {
                ""
            } else {
                ", or of a group with fewer on the farm"
            }
        )
    }))
}

impl super::Store {
    /// Why a queued job waits (its page's `waiting_for`), on a read of its
    /// own, for a caller that needs the sentence alone (a batch's count),
    /// not the job's whole page.
    pub async fn why_waiting(
        &self,
        job_id: &str,
        live: &LiveBackends,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.reader().acquire().await?;
        why_waiting_in(&mut conn, job_id, live).await
    }
}
