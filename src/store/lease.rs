//! Leasing: giving a backend the job it should take next (which one among
//! those it may run is `choice.rs`), and the rules that keep a job away
//! from a backend. Also what a backend holds now.
//!
//! Why the rules are one SQL expression ([`bar_reason`]): the lease query
//! uses it to skip jobs, the failure path and a queued job's page use it
//! to tell whether any backend is left for a job and to say why not
//! (`waiting.rs`), and the submit check (`takers.rs`) uses its tag part, so
//! they can never disagree.

use chrono::Utc;
use sqlx::{Row, SqliteConnection};

use super::choice::{choose, Choice, Preference};
use super::events::{append_event, EventInput};
use super::model::*;
use super::waiting::unrunnable_reason;
use super::{fmt_time, Store, StoreError};

/// Run-time failures of one job on one backend before that backend is not
/// offered the job again.
pub const MAX_FAILURES_PER_BACKEND: i64 = 2;

/// The tags in the JSON array `requires` that the JSON array `tags` lacks.
pub(super) fn missing_tags(requires: &str, tags: &str) -> String {
    format!(
        "(SELECT r.value FROM json_each({requires}) r \
         WHERE r.value NOT IN (SELECT value FROM json_each({tags})))"
    )
}

/// Whether lease `lease` (a `leases` row alias) counts for the rules of job
/// `job` (a `jobs` row alias): taken since the user's last retry, if any.
/// A retry starts the job afresh (migration V18): the box that refused it
/// may have been mended since.
pub(super) fn since_retry(lease: &str, job: &str) -> String {
    format!("({job}.retried_at IS NULL OR {lease}.leased_at >= {job}.retried_at)")
}

/// Room left in a backend's upload limit for what a file's upload carries
/// besides the file (ComfyUI counts the whole form: the part headers and
/// the other fields, a few hundred bytes).
pub const UPLOAD_MARGIN_BYTES: i64 = 64 * 1024;

/// The error `code` of an attempt whose file a backend refused as larger
/// than it takes (a `413` to the upload): that backend is not offered the
/// job again, and the failure says nothing against it.
pub const UPLOAD_TOO_LARGE: &str = "upload_too_large";

/// Why backend `backend` (a `backends` row alias) may not run job `job` (a
/// `jobs` row alias), or NULL when it may: the one place these rules live.
pub(super) fn bar_reason(job: &str, backend: &str) -> String {
    let missing = missing_tags(&format!("{job}.requires"), &format!("{backend}.tags"));
    let since = since_retry("l", job);
    let leases = |outcome: &str| {
        format!(
            "(SELECT count(*) FROM leases l WHERE l.job_id = {job}.id \
             AND l.backend_id = {backend}.id AND l.outcome = '{outcome}' AND {since})"
        )
    };
    let unfit = format!(
        "(SELECT u.reason FROM job_unfit u WHERE u.job_id = {job}.id AND u.backend_id = {backend}.id \
         AND u.inventory_hash = {backend}.inventory_hash)"
    );
    // A backend that died under the job at every run up to the limit of
    // lost runs, where no other had (`outcomes::lose_in`): the job may be
    // sound and the box sick, so it goes to another.
    let died = format!(
        "(SELECT max(json_extract(l.error, '$.died_here')) FROM leases l WHERE l.job_id = {job}.id \
         AND l.backend_id = {backend}.id AND l.outcome = 'lost' AND {since})"
    );
    // The most GPU memory a backend had where the job ran out of it: a
    // backend with no more leaves it to a bigger one while one is online
    // (one outside its hours too: the job waits for the night's big
    // workstation rather than fail on the small box again). Kept across a
    // user's retry, unlike the rules above: a box's memory is not mended,
    // and the retry's one attempt would be spent on the small box again.
    let ran_out = format!(
        "(SELECT max(ob.vram_total) FROM leases l JOIN backends ob ON ob.id = l.backend_id \
         WHERE l.job_id = {job}.id AND l.outcome = 'failed' AND {})",
        super::backend_records::out_of_memory_sql("l.error")
    );
    let bigger_online = format!(
        "EXISTS (SELECT 1 FROM backends big WHERE big.configured = 1 AND big.state = 'online' \
         AND {} AND big.vram_total > {ran_out})",
        super::backend_records::admitted_sql("big")
    );
    // The largest stored file the job starts from, against the largest
    // upload the backend said it takes (known once its socket has said).
    let largest = format!(
        "(SELECT max(i.size) FROM json_each({job}.inputs) f JOIN inputs i ON i.id = f.value)"
    );
    let too_large = format!(
        "{backend}.max_upload_bytes IS NOT NULL AND {job}.inputs <> '[]' \
         AND {largest} > {backend}.max_upload_bytes - {UPLOAD_MARGIN_BYTES}"
    );
    let refused_upload = format!(
        "(SELECT count(*) FROM leases l WHERE l.job_id = {job}.id AND l.backend_id = {backend}.id \
         AND l.outcome = 'rejected' AND json_extract(l.error, '$.code') = '{UPLOAD_TOO_LARGE}' AND {since})"
    );
    format!(
        "CASE \
         WHEN EXISTS {missing} THEN 'lacks tags ' || (SELECT json_group_array(value) FROM {missing}) \
         WHEN {unfit} IS NOT NULL THEN 'cannot run it: ' || {unfit} \
         WHEN {too_large} THEN 'takes uploads up to ' || \
         printf('%.1f MB', {backend}.max_upload_bytes / 1048576.0) || \
         ' (its ComfyUI''s --max-upload-size), and the job starts from a file of ' || \
         printf('%.1f MB', {largest} / 1048576.0) \
         WHEN {refused_upload} > 0 THEN 'refused a file of the job as too large (HTTP 413)' \
         WHEN {rejected} > 0 THEN 'rejected the workflow' \
         WHEN {failed} >= {MAX_FAILURES_PER_BACKEND} THEN 'failed it ' || {failed} || ' times' \
         WHEN {died} IS NOT NULL THEN 'died under it ' || {died} || ' times (dispatch.max_lost_runs)' \
         WHEN {job}.attempts > 0 AND {backend}.vram_total <= {ran_out} AND {bigger_online} \
         THEN 'has no more GPU memory than a backend where it ran out of it (' || \
         printf('%.1f GiB', {ran_out} / 1073741824.0) || '); a bigger one is online' \
         END",
        missing = missing,
        unfit = unfit,
        rejected = leases("rejected"),
        failed = leases("failed"),
        died = died,
    )
}

/// The best eligible queued job for backend `b` (`?1` now, `?2` the backend
/// id): due, not avoided here, not barred here.
///
/// An avoidance (a retry's, a run lost mid-run) gives another backend the
/// first chance; it holds only while one that may run the job is online, so
/// a farm of one box (or one whose other boxes are off, or lack the job's
/// tags) takes its retry back at once rather than at the avoidance's end.
pub(super) fn eligible() -> String {
    format!(
        "j.status = 'queued' AND j.paused_at IS NULL \
         AND (j.not_before IS NULL OR j.not_before <= ?1) \
         AND NOT (j.last_backend_id IS ?2 AND j.avoid_until IS NOT NULL AND j.avoid_until > ?1 \
         AND EXISTS (SELECT 1 FROM backends o WHERE o.id IS NOT ?2 AND o.configured = 1 \
         AND o.state = 'online' AND {} AND ({}) IS NULL)) \
         AND ({}) IS NULL",
        super::backend_records::enabled_sql("o"),
        bar_reason("j", "o"),
        bar_reason("j", "b")
    )
}

/// The check of a [`Fit`].
pub type FitCheck = dyn Fn(&serde_json::Value) -> Result<(), String> + Send + Sync;

/// Whether a backend's inventory covers a job's graph: `Err` says what it
/// lacks. Runs inside the lease's transaction, on candidates in order.
#[derive(Clone)]
pub struct Fit {
    /// The hash of the inventory `check` judges by: a verdict is recorded
    /// under it, so one reached with an inventory that has since been
    /// replaced never bars the job.
    pub hash: String,
    /// The check.
    pub check: std::sync::Arc<FitCheck>,
}

/// What a lease attempt came to.
#[derive(Debug)]
pub enum LeaseTry {
    /// A job, now assigned to the backend.
    Leased(Lease),
    /// No queued job is due now, for this backend or any other.
    Nothing,
    /// Jobs are queued and due, but none that this backend may run now
    /// (its tags, its inventory, its failures, a retry avoiding it): another
    /// backend may.
    Elsewhere,
    /// The backend takes no jobs now: disabled, draining or not online.
    Closed,
}

/// The farm at a glance, for safety nets: read once for all the workers
/// whose nets fall due together instead of a few reads by each of them.
#[derive(Debug, Clone, Default)]
pub struct FarmGlance {
    /// Some queued job is due now.
    pub due: bool,
    /// Backends that hold a job (assigned or running) or have prompts on
    /// their cleanup list.
    pub holders: std::collections::HashSet<String>,
}

/// Candidates a lease looks at before it gives up for now (each unfit one
/// is recorded, so the next lease skips it).
const MAX_CANDIDATES: usize = 32;

/// Records that a backend's inventory cannot run a job (it is skipped there
/// until that inventory changes); fails the job when no backend is left.
async fn unfit(
    conn: &mut SqliteConnection,
    job_id: &str,
    backend_id: &str,
    inventory_hash: &str,
    why: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT OR REPLACE INTO job_unfit (job_id, backend_id, inventory_hash, reason) VALUES (?, ?, ?, ?)",
    )
    .bind(job_id)
    .bind(backend_id)
    .bind(inventory_hash)
    .bind(why)
    .execute(&mut *conn)
    .await?;
    let ev = EventInput {
        kind: "unfit",
        status: Some(JobStatus::Queued),
        backend_id: Some(backend_id),
        attempt: None,
        message: Some(format!("backend {backend_id} cannot run it: {why}")),
        data: None,
    };
    append_event(conn, job_id, ev).await?;
    if let Some(reason) = unrunnable_reason(conn, job_id).await? {
        super::writes::fail_queued(conn, job_id, reason).await?;
    }
    Ok(())
}

async fn lease_in(
    conn: &mut SqliteConnection,
    backend_id: &str,
    fit: Option<&Fit>,
    prefer: Preference,
) -> Result<Option<Lease>, StoreError> {
    // The backend and what it holds in one statement: each is a round trip
    // to SQLite's thread while the whole farm's writes wait.
    let Some(b) = sqlx::query(
        "SELECT config_enabled, admin_state, off_hours, state, max_inflight, last_affinity, inventory_hash, \
         (SELECT count(*) FROM jobs WHERE backend_id = b.id AND status IN ('assigned', 'running')) \
         AS active FROM backends b WHERE id = ? AND configured = 1",
    )
    .bind(backend_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let enabled = backend_enabled(
        b.try_get::<i64, _>("config_enabled")? != 0,
        b.try_get("admin_state")?,
        b.try_get::<i64, _>("off_hours")? != 0,
    );
    let state: BackendState = b.try_get("state")?;
    if !enabled || state != BackendState::Online {
        return Ok(None);
    }
    let max_inflight: i64 = b.try_get("max_inflight")?;
    let active: i64 = b.try_get("active")?;
    if active >= max_inflight {
        return Ok(None);
    }
    let last_affinity: Option<String> = b.try_get("last_affinity")?;
    // The worker judged by an inventory older than the stored one (it was
    // read while this lease waited for the writer): lease nothing now; the
    // new inventory wakes the worker, which asks again with it.
    let stored: Option<String> = b.try_get("inventory_hash")?;
    if stored.is_some() && fit.map(|f| &f.hash) != stored.as_ref() {
        return Ok(None);
    }
    let now = fmt_time(Utc::now());
    for _ in 0..MAX_CANDIDATES {
        let Some(Choice { seq, job }) = choose(
            conn,
            backend_id,
            last_affinity.as_deref(),
            active > 0,
            prefer,
            &now,
            fit.is_some(),
        )
        .await?
        else {
            return Ok(None);
        };
        if let Some(fit) = fit {
            let (job_id, graph): (String, String) = match job {
                Some(job) => job,
                None => {
                    sqlx::query_as("SELECT id, graph FROM jobs WHERE seq = ?")
                        .bind(seq)
                        .fetch_one(&mut *conn)
                        .await?
                }
            };
            let graph: serde_json::Value = serde_json::from_str(&graph)?;
            if let Err(why) = (fit.check)(&graph) {
                unfit(conn, &job_id, backend_id, &fit.hash, &why).await?;
                continue;
            }
        }
        return assign(conn, backend_id, seq, &now, last_affinity.as_deref())
            .await
            .map(Some);
    }
    Ok(None)
}

/// Leases the queued job at `seq` to the backend: a fresh prompt id and
/// fencing token, the attempt counted, the event written.
async fn assign(
    conn: &mut SqliteConnection,
    backend_id: &str,
    seq: i64,
    now: &str,
    last_affinity: Option<&str>,
) -> Result<Lease, StoreError> {
    let prompt_id = uuid::Uuid::new_v4().to_string();
    // The jobs_leased trigger writes the lease's row, moves the token
    // counter and appends the `assigned` event (migration V8).
    let row = sqlx::query(
        "UPDATE jobs SET status = 'assigned', backend_id = ?1, prompt_id = ?2, \
         lease_token = (SELECT value + 1 FROM counters WHERE name = 'lease_token'), \
         attempts = attempts + 1, last_backend_id = ?1, not_before = NULL, avoid_until = NULL, \
         progress = NULL, updated_at = ?3 WHERE seq = ?4 AND status = 'queued' \
         RETURNING id, attempts, lease_token, graph, affinity, timeout_s",
    )
    .bind(backend_id)
    .bind(&prompt_id)
    .bind(now)
    .bind(seq)
    .fetch_one(&mut *conn)
    .await?;
    let job_id: String = row.try_get("id")?;
    let attempt: i64 = row.try_get("attempts")?;
    let token: i64 = row.try_get("lease_token")?;
    let graph: String = row.try_get("graph")?;
    let affinity: Option<String> = row.try_get("affinity")?;
    let timeout_s: Option<i64> = row.try_get("timeout_s")?;
    // `last_affinity` was read at the start of this lease, in this
    // transaction: an unchanged model costs no statement (nor the index's write).
    if affinity.is_some() && affinity.as_deref() != last_affinity {
        sqlx::query("UPDATE backends SET last_affinity = ?1 WHERE id = ?2")
            .bind(&affinity)
            .bind(backend_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Lease {
        job_id,
        prompt_id,
        token,
        attempt,
        graph: serde_json::from_str(&graph)?,
        timeout_s,
    })
}

/// The jobs a backend holds.
pub(super) const HELD: &str = "j.status IN ('assigned', 'running')";

/// Whether any queued job is due at `?1` (for any backend).
const ANY_DUE: &str = "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_queue \
     WHERE status = 'queued' AND paused_at IS NULL AND (not_before IS NULL OR not_before <= ?1))";

const ACTIVE_SELECT: &str = concat!(
    "SELECT j.id, j.prompt_id, j.lease_token, j.status, j.attempts, ",
    super::transitions::stop_requested!(),
    " AS stop_requested, \
     j.timeout_s, l.submitted_at IS NOT NULL AS submitted, l.leased_at, \
     l.started_at AS lease_started_at FROM jobs j JOIN leases l ON l.prompt_id = j.prompt_id"
);

impl Store {
    /// Leases the best queued job to `backend_id` if it has a free slot and
    /// may take jobs: priority, then age; not barred there (tags, a refusal,
    /// too many failures).
    pub async fn lease_next(&self, backend_id: &str) -> Result<Option<Lease>, StoreError> {
        Ok(
            match self
                .lease_for(backend_id, None, Preference::default())
                .await?
            {
                LeaseTry::Leased(lease) => Some(lease),
                LeaseTry::Nothing | LeaseTry::Elsewhere | LeaseTry::Closed => None,
            },
        )
    }

    /// Leases as [`Store::lease_next`] does, skipping (and recording) jobs
    /// `fit` says the backend's inventory cannot run, and choosing among
    /// equals as `prefer` says; and tells a backend that takes no jobs now
    /// (disabled, draining, not online) from one that found none: the
    /// first should not wait to be rung for every queued job.
    pub async fn lease_for(
        &self,
        backend_id: &str,
        fit: Option<Fit>,
        prefer: Preference,
    ) -> Result<LeaseTry, StoreError> {
        // A worker that would find nothing costs a read, not a write: the
        // writer is shared by the whole farm.
        if let Some(none_here) = self.may_lease(backend_id).await? {
            return Ok(none_here);
        }
        let id = backend_id.to_string();
        let lease = self
            .writer()
            .write(move |conn| {
                Box::pin(async move { lease_in(conn, &id, fit.as_ref(), prefer).await })
            })
            .await?;
        Ok(match lease {
            Some(lease) => LeaseTry::Leased(lease),
            // Another backend took it first, or the inventory does not fit.
            None => self.nothing_or_elsewhere().await?,
        })
    }

    /// Found nothing to lease: whether some queued job is due anyway (then
    /// another backend may run it), which a worker that was rung for a job
    /// needs to know: to pass the ring on, or to end it there.
    async fn nothing_or_elsewhere(&self) -> Result<LeaseTry, StoreError> {
        let due: bool = sqlx::query_scalar(ANY_DUE)
            .bind(fmt_time(Utc::now()))
            .fetch_one(self.reader())
            .await?;
        Ok(if due {
            LeaseTry::Elsewhere
        } else {
            LeaseTry::Nothing
        })
    }

    /// Whether the backend takes jobs now and some queued job is eligible
    /// there (read-only): `None` if one is, else why there is nothing to
    /// lease (`Closed`, `Nothing` or `Elsewhere`). A closed backend is
    /// `Closed` even with a job eligible there: it would otherwise take a
    /// writer's turn to learn it is closed.
    async fn may_lease(&self, backend_id: &str) -> Result<Option<LeaseTry>, StoreError> {
        // One read for both (each read is a round trip to SQLite's thread,
        // and every lease of a busy farm asks this first).
        let backend: Option<(bool, Option<AdminState>, bool, BackendState, bool)> =
            sqlx::query_as(&format!(
                "SELECT b.config_enabled, b.admin_state, b.off_hours, b.state, \
                 EXISTS (SELECT 1 FROM jobs j INDEXED BY jobs_queue WHERE {}) \
                 FROM backends b WHERE b.id = ?2 AND b.configured = 1",
                eligible()
            ))
            .bind(fmt_time(Utc::now()))
            .bind(backend_id)
            .fetch_optional(self.reader())
            .await?;
        Ok(match backend {
            Some((config, admin, off_hours, BackendState::Online, found))
                if backend_enabled(config, admin, off_hours) =>
            {
                if found {
                    None
                } else {
                    Some(self.nothing_or_elsewhere().await?)
                }
            }
            _ => Some(LeaseTry::Closed),
        })
    }

    /// What the idle workers' safety nets need to know, for the whole farm
    /// at once: whether any queued job is due, and which backends hold jobs
    /// or have prompts to clean up (see `dispatch::glance`).
    pub async fn farm_glance(&self) -> Result<FarmGlance, StoreError> {
        let mut conn = self.reader().acquire().await?;
        let due: bool = sqlx::query_scalar(ANY_DUE)
            .bind(fmt_time(Utc::now()))
            .fetch_one(&mut *conn)
            .await?;
        let holders: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT j.backend_id FROM jobs j WHERE {HELD} AND j.backend_id IS NOT NULL \
             UNION SELECT backend_id FROM prompt_cleanup"
        ))
        .fetch_all(&mut *conn)
        .await?;
        Ok(FarmGlance {
            due,
            holders: holders.into_iter().collect(),
        })
    }

    /// When queued jobs that wait out a retry become eligible again (their
    /// back-off ends, and later the backend that failed them may take them
    /// again): distinct times, the earliest `limit`. A service that starts
    /// wakes its workers then, as the attempts that failed them would have.
    pub async fn retry_times(
        &self,
        limit: usize,
    ) -> Result<Vec<chrono::DateTime<Utc>>, StoreError> {
        let times: Vec<String> = sqlx::query_scalar(
            "SELECT t FROM (SELECT not_before AS t FROM jobs INDEXED BY jobs_queue \
             WHERE status = 'queued' AND not_before > ?1 \
             UNION SELECT avoid_until FROM jobs INDEXED BY jobs_queue \
             WHERE status = 'queued' AND avoid_until > ?1) ORDER BY t LIMIT ?2",
        )
        .bind(fmt_time(Utc::now()))
        .bind(limit as i64)
        .fetch_all(self.reader())
        .await?;
        Ok(times.iter().filter_map(|t| super::parse_time(t)).collect())
    }

    /// Jobs a backend holds now.
    pub async fn active_jobs(&self, backend_id: &str) -> Result<Vec<ActiveJob>, StoreError> {
        let sql = format!("{ACTIVE_SELECT} WHERE j.backend_id = ? AND {HELD}");
        self.all_by(&sql, backend_id).await
    }

    /// The job's current lease, when a backend holds it.
    pub async fn lease_of(&self, job_id: &str) -> Result<Option<ActiveJob>, StoreError> {
        self.one_by(
            &format!("{ACTIVE_SELECT} WHERE j.id = ? AND {HELD}"),
            job_id,
        )
        .await
    }
}
