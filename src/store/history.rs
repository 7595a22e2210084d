//! Reading the history: one job with its leases and outputs, its events,
//! and filtered pages of jobs, newest first.
//!
//! Why keyset pagination on `seq`: pages stay correct while new jobs arrive
//! (each job is returned once), and a deep page costs what the first does.
//! Every filter is served by an index; `explain_list` lets a test check it.

use sqlx::{QueryBuilder, Row, Sqlite};

use super::model::*;
use super::rows::*;
use super::{fmt_time, Store, StoreError};

/// A job's outputs, by name.
const OUTPUTS_OF: &str = "SELECT name, kind, node_id, filename, subfolder, type, size, sha256, \
     content_type, pruned_at FROM outputs WHERE job_id = ? ORDER BY name";

/// A job's leases, oldest first.
const LEASES_OF: &str = "SELECT prompt_id, attempt, backend_id, leased_at, submitted_at, \
     started_at, finished_at, outcome, error FROM leases WHERE job_id = ? ORDER BY leased_at";

/// One job, with every column its record has.
fn one_job() -> String {
    format!(
        "SELECT {} FROM jobs j WHERE j.id = ?",
        job_columns("j", true)
    )
}

/// The `FROM` and `WHERE` of the history's queries: the jobs `filter`
/// matches within the positions `lower..=upper`. Returns the column that
/// orders them by position (the first metadata filter drives the scan
/// through its index).
fn push_filtered<'a>(
    q: &mut QueryBuilder<'a, Sqlite>,
    filter: &'a JobFilter,
    lower: Option<i64>,
    upper: Option<i64>,
) -> &'static str {
    let mut metadata = filter.metadata.iter();
    let order_col;
    if let Some((key, value)) = metadata.next() {
        q.push("job_metadata m JOIN jobs j ON j.seq = m.job_seq WHERE m.key = ");
        q.push_bind(key);
        q.push(" AND m.value = ");
        q.push_bind(value);
        order_col = "m.job_seq";
    } else {
        q.push("jobs j WHERE 1 = 1");
        order_col = "j.seq";
    }
    for (key, value) in metadata {
        q.push(" AND EXISTS (SELECT 1 FROM job_metadata m2 WHERE m2.key = ");
        q.push_bind(key);
        q.push(" AND m2.value = ");
        q.push_bind(value);
        q.push(" AND m2.job_seq = j.seq)");
    }
    if let Some(l) = lower {
        q.push(format!(" AND {order_col} >= ")).push_bind(l);
    }
    if let Some(u) = upper {
        q.push(format!(" AND {order_col} <= ")).push_bind(u);
    }
    push_in(q, "j.status", &filter.statuses);
    if let Some(w) = &filter.workflow_id {
        q.push(" AND j.workflow_id = ").push_bind(w);
    }
    if let Some(b) = &filter.backend_id {
        q.push(" AND j.backend_id = ").push_bind(b);
    }
    match filter.paused {
        Some(true) => q.push(" AND j.paused_at IS NOT NULL"),
        Some(false) => q.push(" AND j.paused_at IS NULL"),
        None => &mut *q,
    };
    order_col
}

/// Builds the history query; `prefix` lets tests ask for its plan.
fn list_query<'a>(
    prefix: &str,
    filter: &'a JobFilter,
    lower: Option<i64>,
    upper: Option<i64>,
) -> QueryBuilder<'a, Sqlite> {
    let cols = job_columns("j", false);
    newest_query(
        &format!("{prefix}SELECT {cols}"),
        filter,
        lower,
        upper,
        filter.limit as i64 + 1,
    )
}

/// `select` (its columns of the job `j`) of the newest `limit` jobs the
/// filter matches within the positions `lower..=upper`.
fn newest_query<'a>(
    select: &str,
    filter: &'a JobFilter,
    lower: Option<i64>,
    upper: Option<i64>,
    limit: i64,
) -> QueryBuilder<'a, Sqlite> {
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{select} FROM "));
    let order_col = push_filtered(&mut q, filter, lower, upper);
    q.push(format!(" ORDER BY {order_col} DESC LIMIT "));
    q.push_bind(limit);
    q
}

/// One status's row of a count: the status, its jobs, how many of them
/// are paused, the first submission, the last finish, and how many ended
/// recently after they ran.
type CountRow = (JobStatus, i64, i64, Option<String>, Option<String>, i64);

/// Builds the count of the jobs a filter matches, by status (those that
/// ended at or after `recent`, having run, counted apart).
fn count_query<'a>(
    prefix: &str,
    filter: &'a JobFilter,
    lower: Option<i64>,
    upper: Option<i64>,
    recent: String,
) -> QueryBuilder<'a, Sqlite> {
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
        "{prefix}SELECT j.status, count(*), count(j.paused_at), min(j.submitted_at), \
         max(j.finished_at), count(CASE WHEN j.started_at IS NOT NULL AND j.finished_at >= "
    ));
    q.push_bind(recent);
    q.push(" THEN 1 END) FROM ");
    push_filtered(&mut q, filter, lower, upper);
    q.push(" GROUP BY j.status");
    q
}

impl Store {
    /// One job, with its manifest and graph.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.one_by(&one_job(), id).await
    }

    /// A job's workflow and times, without its manifest and graph (for metrics).
    pub async fn job_times(&self, id: &str) -> Result<Option<JobTimes>, StoreError> {
        self.one_by(
            "SELECT workflow_id, submitted_at, started_at FROM jobs WHERE id = ?",
            id,
        )
        .await
    }

    /// A job's leases, oldest first: where each attempt ran and how it
    /// ended (a completion judges the backends that failed the job before).
    pub async fn job_leases(&self, id: &str) -> Result<Vec<LeaseRecord>, StoreError> {
        self.all_by(LEASES_OF, id).await
    }

    /// The event log of one job, oldest first.
    pub async fn job_events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? ORDER BY seq");
        self.all_by(&sql, id).await
    }

    /// The first job position submitted at or after `t` (`>=`), or the last
    /// one submitted before it (`<`).
    async fn seq_at(
        &self,
        t: chrono::DateTime<chrono::Utc>,
        after: bool,
    ) -> Result<Option<i64>, StoreError> {
        let sql = if after {
            "SELECT seq FROM jobs WHERE submitted_at >= ? ORDER BY submitted_at LIMIT 1"
        } else {
            "SELECT seq FROM jobs WHERE submitted_at < ? ORDER BY submitted_at DESC LIMIT 1"
        };
        Ok(sqlx::query_scalar(sql)
            .bind(fmt_time(t))
            .fetch_optional(self.reader())
            .await?)
    }

    /// The positions the filter's time range and cursor span (submission
    /// times only grow with `seq`: a time range is a seq range), or `None`
    /// when no job can be in it.
    async fn seq_bounds(
        &self,
        filter: &JobFilter,
    ) -> Result<Option<(Option<i64>, Option<i64>)>, StoreError> {
        let mut lower: Option<i64> = None;
        let mut upper: Option<i64> = filter.before_seq.map(|s| s - 1);
        if let Some(after) = filter.submitted_after {
            match self.seq_at(after, true).await? {
                Some(s) => lower = Some(s),
                None => return Ok(None),
            }
        }
        if let Some(before) = filter.submitted_before {
            match self.seq_at(before, false).await? {
                Some(s) => upper = Some(upper.map_or(s, |u| u.min(s))),
                None => return Ok(None),
            }
        }
        Ok(Some((lower, upper)))
    }

    /// A page of history, newest first, with keyset pagination on `seq`.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let Some((lower, upper)) = self.seq_bounds(filter).await? else {
            return Ok(JobPage {
                jobs: vec![],
                next_before_seq: None,
            });
        };
        let mut q = list_query("", filter, lower, upper);
        let mut jobs: Vec<JobRecord> = q.build_query_as().fetch_all(self.reader()).await?;
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

    /// How many jobs the filter matches, by status, and when the first of
    /// them was submitted and the last finished: how far a batch got (its
    /// `metadata`), in one read. Every job matching, not a page: the
    /// filter's `limit` and cursor do not apply. With no filter at all it
    /// reads the counts the triggers keep.
    pub async fn count_jobs(&self, filter: &JobFilter) -> Result<JobCounts, StoreError> {
        let mut counts = JobCounts {
            recent_since: chrono::Utc::now() - PACE_WINDOW,
            ..Default::default()
        };
        let recent = fmt_time(counts.recent_since);
        let unfiltered = JobFilter {
            limit: filter.limit,
            ..Default::default()
        };
        if *filter == unfiltered {
            counts.by_status = self.job_counts().await?;
            counts.paused = self.paused_count().await?;
            let (first, last, ended): (Option<String>, Option<String>, i64) = sqlx::query_as(
                "SELECT (SELECT min(submitted_at) FROM jobs), \
                 (SELECT max(finished_at) FROM jobs INDEXED BY jobs_by_finished WHERE finished_at IS NOT NULL), \
                 (SELECT count(*) FROM jobs INDEXED BY jobs_by_finished \
                  WHERE finished_at >= ? AND started_at IS NOT NULL)",
            )
            .bind(recent)
            .fetch_one(self.reader())
            .await?;
            counts.first_submitted_at = first.as_deref().and_then(super::parse_time);
            counts.last_finished_at = last.as_deref().and_then(super::parse_time);
            counts.ended_recently = ended;
            return Ok(counts);
        }
        let Some((lower, upper)) = self.seq_bounds(filter).await? else {
            return Ok(counts);
        };
        let rows: Vec<CountRow> = count_query("", filter, lower, upper, recent)
            .build_query_as()
            .fetch_all(self.reader())
            .await?;
        let (mut first, mut last): (Option<String>, Option<String>) = (None, None);
        for (status, n, paused, f, l, ended) in rows {
            counts.by_status.push((status, n));
            counts.paused += paused;
            counts.ended_recently += ended;
            // Stored times are of one width: their order as text is theirs.
            first = match (first, f) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last = last.max(l);
        }
        counts.first_submitted_at = first.as_deref().and_then(super::parse_time);
        counts.last_finished_at = last.as_deref().and_then(super::parse_time);
        Ok(counts)
    }

    /// The errors of the failed jobs `filter` matches, newest first, at
    /// most `max` of them: what a batch's failures have in common.
    pub async fn failed_errors(
        &self,
        filter: &JobFilter,
        max: i64,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        if !filter.statuses.is_empty() && !filter.statuses.contains(&JobStatus::Failed) {
            return Ok(Vec::new());
        }
        let failed = JobFilter {
            statuses: vec![JobStatus::Failed],
            ..filter.clone()
        };
        let Some((lower, upper)) = self.seq_bounds(&failed).await? else {
            return Ok(Vec::new());
        };
        Ok(
            newest_query("SELECT j.id, j.error", &failed, lower, upper, max)
                .build_query_as()
                .fetch_all(self.reader())
                .await?,
        )
    }

    /// SQLite's plan for the count of `filter` (with both seq bounds
    /// present), so tests can check that an index serves it.
    pub async fn explain_count(&self, filter: &JobFilter) -> Result<Vec<String>, StoreError> {
        let mut q = count_query(
            "EXPLAIN QUERY PLAN ",
            filter,
            Some(1),
            Some(i64::MAX),
            String::new(),
        );
        let rows = q.build().fetch_all(self.reader()).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("detail").map_err(StoreError::from))
            .collect()
    }

    /// Counts of jobs by status (kept by triggers: one small read).
    pub async fn job_counts(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows: Vec<(JobStatus, i64)> = sqlx::query_as("SELECT status, n FROM job_counts")
            .fetch_all(self.reader())
            .await?;
        Ok(rows)
    }

    /// How many jobs a user paused (queued or waiting: counted there too).
    pub async fn paused_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM jobs INDEXED BY jobs_paused WHERE paused_at IS NOT NULL",
        )
        .fetch_one(self.reader())
        .await?)
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

    /// Outputs of a job, by name.
    pub async fn job_outputs(&self, id: &str) -> Result<Vec<OutputRecord>, StoreError> {
        self.all_by(OUTPUTS_OF, id).await
    }

    /// A job with everything its page shows, read in one snapshot: separate
    /// reads could show a job still `queued` beside the lease that took it,
    /// or `running` beside the outputs of its end. `not_ours`: prompts not
    /// ours in each backend's queue (only the running farm knows them),
    /// for why a queued job waits.
    pub async fn job_detail(
        &self,
        id: &str,
        live: &super::LiveBackends,
    ) -> Result<Option<JobDetailRecord>, StoreError> {
        let mut tx = self.reader().begin().await?;
        let Some(job) = sqlx::query_as::<_, JobRecord>(&one_job())
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let outputs = sqlx::query_as(OUTPUTS_OF)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let leases = sqlx::query_as(LEASES_OF)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let webhooks = sqlx::query_as(super::webhooks::WEBHOOKS_OF)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let waiting_for = super::waiting::why_waiting_in(&mut tx, id, live).await?;
        let followed_by = sqlx::query_scalar(
            "SELECT p.job_id FROM job_parents p JOIN jobs j ON j.id = p.job_id \
             WHERE p.parent_id = ? ORDER BY j.seq",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        // Read only: nothing to commit.
        tx.rollback().await?;
        Ok(Some(JobDetailRecord {
            job,
            outputs,
            leases,
            webhooks,
            waiting_for,
            followed_by,
        }))
    }
}
