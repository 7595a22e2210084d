//! The history: filtered pages of jobs, newest first, and how many jobs
//! a filter matches (how far a batch got).
//!
//! Why apart from the job routes: these read many jobs through one filter
//! language (`status`, `workflow_id`, `backend`, times, `paused`,
//! `metadata.KEY`), which the page and the count share, and which the
//! command line and the dashboard speak.

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::jobs::with_progress;
use super::wire::Job;
use super::{ApiError, AppState};
use crate::store::{JobFilter, JobStatus};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/counts", get(count_jobs))
}

/// A page of history.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(seq: i64) -> String {
    format!("j{seq:x}")
}

fn decode_cursor(s: &str) -> Option<i64> {
    s.strip_prefix('j')
        .and_then(|h| i64::from_str_radix(h, 16).ok())
}

/// An RFC 3339 time in a query parameter, or a `422` naming the parameter.
/// Shared by the history and the farm view.
pub(super) fn time_param(field: &str, v: &str) -> Result<DateTime<Utc>, ApiError> {
    crate::store::parse_time(v).ok_or_else(|| {
        ApiError::invalid(
            field,
            format!("{field}: must be an RFC 3339 time such as 2026-12-07T20:00:00Z, got `{v}`"),
        )
    })
}

/// Adds the statuses of one `status` parameter (comma-separated), refusing
/// unknown ones. Shared by the history and the event stream.
pub(super) fn parse_statuses(value: &str, into: &mut Vec<JobStatus>) -> Result<(), ApiError> {
    for s in value.split(',').filter(|s| !s.is_empty()) {
        let status = JobStatus::parse(s).ok_or_else(|| {
            let all: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::invalid(
                "status",
                format!("unknown status `{s}` (one of {})", all.join(", ")),
            )
        })?;
        into.push(status);
    }
    Ok(())
}

/// What a query string asks for: a page of jobs, or the count of them all.
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    Page,
    Count,
}

/// Parses the history query string into a filter.
fn parse_filter(query: Option<&str>, ask: Ask) -> Result<JobFilter, ApiError> {
    let mut f = JobFilter {
        limit: 50,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let (key, value) = (key.as_ref(), value.as_ref());
        if ask == Ask::Count && matches!(key, "limit" | "cursor") {
            return Err(ApiError::invalid(
                key,
                format!("`{key}` is for pages of jobs: a count counts every job the filters match"),
            ));
        }
        match key {
            "status" => parse_statuses(value, &mut f.statuses)?,
            "workflow_id" => f.workflow_id = Some(value.to_string()),
            "backend" | "backend_id" => f.backend_id = Some(value.to_string()),
            "submitted_after" => f.submitted_after = Some(time_param(key, value)?),
            "submitted_before" => f.submitted_before = Some(time_param(key, value)?),
            "paused" => {
                f.paused = Some(value.parse::<bool>().map_err(|_| {
                    ApiError::invalid("paused", "must be true (only paused jobs) or false")
                })?)
            }
            "limit" => {
                f.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", "must be an integer from 1 to 1000")
                    })?
            }
            "cursor" => {
                f.before_seq = Some(decode_cursor(value).ok_or_else(|| {
                    ApiError::invalid("cursor", "is not a cursor this server gave out")
                })?)
            }
            k if k.starts_with("metadata.") && k.len() > "metadata.".len() => {
                f.metadata
                    .push((k["metadata.".len()..].to_string(), value.to_string()));
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!(
                        "unknown query parameter `{other}` (filters: status, workflow_id, backend, \
                         submitted_after, submitted_before, paused, metadata.KEY, limit, cursor)"
                    ),
                ))
            }
        }
    }
    Ok(f)
}

/// The history's filters, as the OpenAPI document shows them (the page and
/// the count take the same ones; [`parse_filter`] reads them).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct Filters {
    /// One or several statuses, repeated or comma-separated.
    status: Option<String>,
    /// Template id.
    workflow_id: Option<String>,
    /// Backend id.
    backend: Option<String>,
    /// RFC 3339, inclusive.
    submitted_after: Option<String>,
    /// RFC 3339, exclusive.
    submitted_before: Option<String>,
    /// `true`: only paused jobs; `false`: only jobs not paused.
    paused: Option<bool>,
    /// A metadata field equals the value, e.g. `metadata.batch=night1`
    /// (repeat for several fields).
    #[param(rename = "metadata.KEY")]
    metadata: Option<String>,
}

/// The history, newest first, filtered and paginated.
#[utoipa::path(
    get,
    path = "/api/jobs",
    tag = "jobs",
    params(
        Filters,
        ("limit" = Option<u32>, Query, description = "Page size, default 50, at most 1000"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses((status = 200, body = JobList), (status = 422, body = super::ErrorBody))
)]
pub(super) async fn list_jobs(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobList>, ApiError> {
    let filter = parse_filter(query.as_deref(), Ask::Page)?;
    let page = state.store.list_jobs(&filter).await?;
    Ok(Json(JobList {
        jobs: page
            .jobs
            .into_iter()
            .map(|j| with_progress(&state, j.into()))
            .collect(),
        next_cursor: page.next_before_seq.map(encode_cursor),
    }))
}

/// How many jobs the filters match.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobCounts {
    /// Every job the filters match.
    pub total: i64,
    /// By status (every status, 0 where none).
    pub jobs: BTreeMap<String, i64>,
    /// Of those, how many a user paused (counted in `queued` or `waiting`
    /// too).
    pub paused: i64,
    /// When the first of them was submitted.
    pub first_submitted_at: Option<DateTime<Utc>>,
    /// When the last of them to finish finished (completed, failed or
    /// cancelled).
    pub last_finished_at: Option<DateTime<Utc>>,
    /// Where the batch's present pace is measured from: 15 minutes ago, or
    /// its first submission if later.
    pub pace_since: DateTime<Utc>,
    /// How many of them ended (completed, failed or cancelled) since
    /// `pace_since`, having run (a backend had started them): those
    /// cancelled or failed before they ran took no farm time.
    pub ended_recently: i64,
    /// When those not ended would all have ended at that pace (paused ones
    /// left out: they wait for a user); `null` when none is left, none
    /// ended since `pace_since`, or that was under a minute ago. A guess
    /// for the morning: it follows the farm (a box lost, one added) within
    /// 15 minutes.
    pub estimated_end: Option<DateTime<Utc>>,
    /// Why they failed: the failed ones (the newest 10,000) grouped by
    /// cause, the commonest first, at most 10 causes; empty when none
    /// failed.
    pub failures: Vec<FailureCause>,
    /// Why the queued ones wait: the newest queued job not paused, and its
    /// page's `waiting_for` (a batch stuck in the morning: "no backend can
    /// take it now: gpu-2 is outside its hours"); `null` when none is
    /// queued, or it is about to start.
    pub waiting: Option<Waiting>,
    /// When the filters name a batch (`metadata.batch=night1`, by
    /// `dispatch.batch_field`) that the farm holds, found failing job after
    /// job alike: why, and since when (its new jobs are stored paused until
    /// `POST /api/batch/{batch}/resume`). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<super::wire::HeldBatch>,
}

/// A queued job, and why it waits.
#[derive(Debug, Serialize, ToSchema)]
pub struct Waiting {
    /// The job.
    pub job_id: String,
    /// As its page says it.
    pub waiting_for: String,
}

/// Failed jobs with one cause.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct FailureCause {
    /// The cause in a few words: ComfyUI's exception and the node type
    /// that raised it (`torch.OutOfMemoryError in KSampler`), `timed out`,
    /// `rejected by the backend (…)`, `parent_failed`, `input_missing`,
    /// or the start of the error's message.
    pub cause: String,
    /// How many failed so.
    pub jobs: i64,
    /// The newest of them, to look at.
    pub example: String,
}

/// Failed jobs a count reads to say why they failed (the newest).
const FAILURES_READ: i64 = 10_000;

/// Causes a count names at most.
const CAUSES_SHOWN: usize = 10;

/// The failed jobs' `(id, error)`, newest first, grouped by cause.
fn failure_causes(failed: Vec<(String, Option<String>)>) -> Vec<FailureCause> {
    let mut causes: Vec<FailureCause> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = Default::default();
    for (id, error) in failed {
        let error = error
            .and_then(|e| serde_json::from_str(&e).ok())
            .unwrap_or(serde_json::Value::Null);
        let cause = crate::store::failure_cause(&error);
        match at.get(&cause) {
            Some(&i) => causes[i].jobs += 1,
            None => {
                at.insert(cause.clone(), causes.len());
                causes.push(FailureCause {
                    cause,
                    jobs: 1,
                    example: id,
                });
            }
        }
    }
    // Stable: of causes as common, the one seen most recently first.
    causes.sort_by_key(|c| std::cmp::Reverse(c.jobs));
    causes.truncate(CAUSES_SHOWN);
    causes
}

/// Shortest span a pace is measured over: one job that ended in the first
/// seconds of a batch says nothing of its end.
const PACE_MIN: chrono::Duration = chrono::Duration::minutes(1);

/// When `left` more jobs will have ended if they end as `ended` did over
/// `since`..`now`.
fn estimate_end(
    left: i64,
    ended: i64,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let span = now - since;
    if left <= 0 || ended <= 0 || span < PACE_MIN {
        return None;
    }
    let ms = span.num_milliseconds() as f64 * left as f64 / ended as f64;
    Some(now + chrono::Duration::milliseconds(ms.min(1e15) as i64))
}

/// How far a batch got: how many jobs the filters match (those of
/// `GET /api/jobs`, without `limit` and `cursor`: every job, not a page),
/// by status, and when the first was submitted and the last finished.
/// `GET /api/jobs/counts?metadata.batch=night1` in the morning.
#[utoipa::path(
    get,
    path = "/api/jobs/counts",
    tag = "jobs",
    params(Filters),
    responses((status = 200, body = JobCounts), (status = 422, body = super::ErrorBody))
)]
pub(super) async fn count_jobs(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobCounts>, ApiError> {
    let filter = parse_filter(query.as_deref(), Ask::Count)?;
    let counts = state.store.count_jobs(&filter).await?;
    let failures = match counts
        .by_status
        .iter()
        .any(|(s, _)| *s == JobStatus::Failed)
    {
        true => failure_causes(state.store.failed_errors(&filter, FAILURES_READ).await?),
        false => Vec::new(),
    };
    let mut jobs: BTreeMap<String, i64> = JobStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    for (status, n) in &counts.by_status {
        jobs.insert(status.as_str().to_string(), *n);
    }
    let now = Utc::now();
    let pace_since = counts
        .first_submitted_at
        .map_or(counts.recent_since, |f| f.max(counts.recent_since));
    let waiting = match jobs[JobStatus::Queued.as_str()] > 0 {
        true => why_queued_wait(&state, &filter).await?,
        false => None,
    };
    let held = state
        .farm
        .held_batch_named(&filter.metadata)
        .await?
        .map(super::wire::HeldBatch::from);
    let total: i64 = jobs.values().sum();
    let ended: i64 = JobStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| jobs[s.as_str()])
        .sum();
    Ok(Json(JobCounts {
        total,
        estimated_end: estimate_end(
            total - ended - counts.paused,
            counts.ended_recently,
            pace_since,
            now,
        ),
        jobs,
        paused: counts.paused,
        first_submitted_at: counts.first_submitted_at,
        last_finished_at: counts.last_finished_at,
        pace_since,
        ended_recently: counts.ended_recently,
        failures,
        waiting,
        held,
    }))
}

/// The newest queued job `filter` matches that is not paused, and why it
/// waits.
async fn why_queued_wait(
    state: &AppState,
    filter: &JobFilter,
) -> Result<Option<Waiting>, ApiError> {
    let queued = JobFilter {
        statuses: vec![JobStatus::Queued],
        paused: Some(false),
        limit: 1,
        before_seq: None,
        ..filter.clone()
    };
    let Some(job) = state
        .store
        .list_jobs(&queued)
        .await?
        .jobs
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let live = state.farm.live_backends();
    let why = state.store.why_waiting(&job.job_id, &live).await?;
    Ok(why.map(|waiting_for| Waiting {
        waiting_for,
        job_id: job.job_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn failures_are_grouped_by_what_caused_them_whatever_the_backend() {
        let oom = |backend: &str| {
            json!({"message": format!("backend {backend}: node 3 (KSampler) raised torch.OutOfMemoryError: Allocation on device (attempt 3 of 3; no attempts left)"),
                   "exception_type": "torch.OutOfMemoryError", "node_type": "KSampler", "backend_id": backend})
        };
        let failed: Vec<(String, Option<String>)> = [
            ("j6", oom("small1")),
            ("j5", json!({"message": "timed out after 60 s on backend b", "timeout_s": 60})),
            ("j4", json!({"message": "backend b: the prompt finished but its outputs could not be collected after 3 tries: HTTP 500", "backend_id": "b"})),
            ("j3", oom("small2")),
            ("j2", json!({"code": "parent_failed", "message": "job x failed"})),
            ("j1", json!({"message": "backend b rejected the workflow: ...", "http_status": 400, "node_errors": {}, "comfyui_error": {"type": "prompt_outputs_failed_validation"}})),
            ("j0", json!({"message": "backend c: the prompt finished but its outputs could not be collected after 3 tries: timed out", "backend_id": "c"})),
        ]
        .into_iter()
        .map(|(id, e)| (id.to_string(), Some(e.to_string())))
        .collect();
        let causes: Vec<(String, i64, String)> = failure_causes(failed)
            .into_iter()
            .map(|c| (c.cause, c.jobs, c.example))
            .collect();
        let c = |cause: &str, jobs, example: &str| (cause.to_string(), jobs, example.to_string());
        assert_eq!(
            causes,
            [
                c("torch.OutOfMemoryError in KSampler", 2, "j6"),
                c(
                    "the prompt finished but its outputs could not be collected after 3 tries",
                    2,
                    "j4"
                ),
                c("timed out", 1, "j5"),
                c("parent_failed", 1, "j2"),
                c(
                    "rejected by the backend (prompt_outputs_failed_validation)",
                    1,
                    "j1"
                ),
            ]
        );
        assert_eq!(
            crate::store::failure_cause(&serde_json::Value::Null),
            "no error recorded"
        );
    }

    #[test]
    fn a_batch_ends_at_its_present_pace_once_it_has_one() {
        let now = Utc::now();
        let ago = |m| now - chrono::Duration::minutes(m);
        // 30 ended in 15 minutes: 60 more take 30.
        assert_eq!(
            estimate_end(60, 30, ago(15), now),
            Some(now + chrono::Duration::minutes(30))
        );
        assert_eq!(estimate_end(0, 30, ago(15), now), None, "none left");
        assert_eq!(estimate_end(60, 0, ago(15), now), None, "no pace yet");
        assert_eq!(
            estimate_end(60, 2, now - chrono::Duration::seconds(20), now),
            None,
            "too soon to tell"
        );
    }

    #[test]
    fn filters_parse_and_unknown_ones_are_named() {
        let f = parse_filter(
            Some("status=queued,running&status=failed&metadata.shot=sc01&limit=10"),
            Ask::Page,
        )
        .unwrap();
        assert_eq!(
            f.statuses,
            [JobStatus::Queued, JobStatus::Running, JobStatus::Failed]
        );
        assert_eq!(f.metadata, [("shot".to_string(), "sc01".to_string())]);
        assert_eq!(f.limit, 10);
        let e = parse_filter(Some("colour=red"), Ask::Page).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("colour"));
        let e = parse_filter(Some("status=done"), Ask::Page).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("status"));
        let e = parse_filter(Some("limit=5000"), Ask::Page).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limit"));
        assert_eq!(decode_cursor(&encode_cursor(12345)), Some(12345));
        let e = parse_filter(Some("metadata.batch=n1&limit=10"), Ask::Count).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("limit"));
        let e = parse_filter(Some("submitted_after=yesterday"), Ask::Count).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("submitted_after"));
    }
}
