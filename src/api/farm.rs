//! The farm view's data: what each backend did over a time window.
//!
//! Why one route: the page draws a timeline, busy shares, the queue and the
//! completions from one answer, so they always agree.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState};
use crate::store::{Attempt, BackendState, QueueSample};

/// The longest window one answer covers.
const MAX_WINDOW_H: i64 = 24;

/// The most attempts one answer lists.
const MAX_ATTEMPTS: i64 = 20_000;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/api/farm", get(farm))
}

/// The window.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct FarmQuery {
    /// Start (RFC 3339); default: an hour before `to`.
    from: Option<String>,
    /// End (RFC 3339); default: now.
    to: Option<String>,
}

/// One backend over the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct FarmBackend {
    /// Backend id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Its state now.
    pub state: BackendState,
    /// Share of the window it was running a prompt (0 to 1).
    pub busy_share: f64,
}

/// Completions in one minute.
#[derive(Debug, Serialize, ToSchema)]
pub struct Completions {
    /// The minute's start.
    pub at: DateTime<Utc>,
    /// Jobs completed in it.
    pub count: u32,
}

/// How a shared farm stands now (`dispatch.share_by`).
#[derive(Debug, Serialize, ToSchema)]
pub struct FarmSharing {
    /// The metadata field the farm is shared by.
    pub by: String,
    /// The groups with jobs queued or on the farm, by name (at most 100).
    pub groups: Vec<FarmShareGroup>,
}

/// One group of a shared farm.
#[derive(Debug, Serialize, ToSchema)]
pub struct FarmShareGroup {
    /// The field's value; `""` for the jobs without the field.
    pub group: String,
    /// Its jobs assigned or running: the group with the fewest takes the
    /// next free slot (at the same priority).
    pub on_farm: i64,
    /// Its jobs queued, paused ones included.
    pub queued: i64,
}

/// What the farm did between `from` and `to`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FarmView {
    /// Start of the window.
    pub from: DateTime<Utc>,
    /// End of the window.
    pub to: DateTime<Utc>,
    /// Every configured backend, with its busy share.
    pub backends: Vec<FarmBackend>,
    /// Every attempt that overlaps the window, oldest lease first: a bar
    /// from `leased_at` to `finished_at` (still open when `null`).
    pub attempts: Vec<Attempt>,
    /// More attempts than one answer lists (20,000): narrow the window.
    pub truncated: bool,
    /// Completions per minute, every minute of the window.
    pub completions: Vec<Completions>,
    /// The queue, sampled each minute.
    pub queue: Vec<QueueSample>,
    /// How the farm is shared between groups of jobs now; `null` when it
    /// is not (`dispatch.share_by` unset).
    pub sharing: Option<FarmSharing>,
}

/// Attempts per backend, busy shares, completions and the queue over a
/// window of at most a day (the last hour by default).
#[utoipa::path(
    get,
    path = "/api/farm",
    tag = "backends",
    params(FarmQuery),
    responses((status = 200, body = FarmView), (status = 422, body = super::ErrorBody))
)]
pub(super) async fn farm(
    State(state): State<AppState>,
    Query(q): Query<FarmQuery>,
) -> Result<Json<FarmView>, ApiError> {
    let now = Utc::now();
    let to =
        q.to.as_deref()
            .map(|v| super::history::time_param("to", v))
            .transpose()?
            .unwrap_or(now);
    let from = match q.from.as_deref() {
        Some(v) => super::history::time_param("from", v)?,
        None => to - Duration::hours(1),
    };
    if from >= to {
        return Err(ApiError::invalid("from", "from: must be before `to`"));
    }
    if to - from > Duration::hours(MAX_WINDOW_H) {
        return Err(ApiError::invalid(
            "from",
            format!("from: the window may cover at most {MAX_WINDOW_H} hours"),
        ));
    }
    let (attempts, truncated) = state.store.attempts_between(from, to, MAX_ATTEMPTS).await?;
    let end = to.min(now);
    let backends = state
        .store
        .backends()
        .await?
        .into_iter()
        .map(|b| FarmBackend {
            busy_share: busy_share(&attempts, &b.id, from, end, to),
            id: b.id,
            name: b.name,
            state: b.state,
        })
        .collect();
    let completions = per_minute(&state.store.completions_between(from, to).await?, from, to);
    let queue = state.store.queue_samples(from, to).await?;
    let sharing = sharing_now(&state.store).await?;
    Ok(Json(FarmView {
        from,
        to,
        backends,
        attempts,
        truncated,
        completions,
        queue,
        sharing,
    }))
}

/// How a shared farm stands now; `None` when it is not shared.
pub(super) async fn sharing_now(
    store: &crate::store::Store,
) -> Result<Option<FarmSharing>, crate::store::StoreError> {
    Ok(store.farm_shares().await?.map(|s| FarmSharing {
        by: s.field,
        groups: s
            .groups
            .into_iter()
            .map(|g| FarmShareGroup {
                group: g.group,
                on_farm: g.on_farm,
                queued: g.queued,
            })
            .collect(),
    }))
}

/// The share of `[from, to)` in which the backend ran a prompt: the union
/// of its runs (a second prompt waiting in its queue does not count twice).
fn busy_share(
    attempts: &[Attempt],
    backend: &str,
    from: DateTime<Utc>,
    now: DateTime<Utc>,
    to: DateTime<Utc>,
) -> f64 {
    let mut runs: Vec<(DateTime<Utc>, DateTime<Utc>)> = attempts
        .iter()
        .filter(|a| a.backend_id == backend)
        .filter_map(|a| {
            let start = a.started_at?.max(from);
            let end = a.finished_at.unwrap_or(now).min(now);
            (end > start).then_some((start, end))
        })
        .collect();
    runs.sort();
    let mut busy = Duration::zero();
    let mut current: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
    for (s, e) in runs {
        match current {
            Some((cs, ce)) if s <= ce => current = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                busy += ce - cs;
                current = Some((s, e));
            }
            None => current = Some((s, e)),
        }
    }
    if let Some((cs, ce)) = current {
        busy += ce - cs;
    }
    let window = (to - from).num_milliseconds().max(1) as f64;
    (busy.num_milliseconds() as f64 / window).clamp(0.0, 1.0)
}

/// Counts per minute from the minute of `from` to `to`.
fn per_minute(times: &[DateTime<Utc>], from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Completions> {
    let minute = Duration::minutes(1);
    let start = from.duration_trunc(minute).unwrap_or(from);
    let n = ((to - start).num_seconds() / 60 + 1) as usize;
    let mut buckets: Vec<Completions> = (0..n)
        .map(|i| Completions {
            at: start + minute * i as i32,
            count: 0,
        })
        .collect();
    for t in times {
        let i = ((*t - start).num_seconds() / 60) as usize;
        if let Some(b) = buckets.get_mut(i) {
            b.count += 1;
        }
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LeaseOutcome;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn run(backend: &str, start: &str, end: Option<&str>) -> Attempt {
        Attempt {
            job_id: "j".into(),
            attempt: 1,
            backend_id: backend.into(),
            workflow_id: None,
            leased_at: at(start),
            started_at: Some(at(start)),
            finished_at: end.map(at),
            outcome: end.map(|_| LeaseOutcome::Completed),
        }
    }

    #[test]
    fn busy_share_is_the_union_of_runs_within_the_window() {
        let from = at("2026-11-25T22:00:00Z");
        let to = at("2026-11-25T23:00:00Z");
        let attempts = [
            // Before the window, partly inside: 10 min count.
            run("a", "2026-11-25T21:50:00Z", Some("2026-11-25T22:10:00Z")),
            // Two overlapping runs: 22:20-22:40 counts once.
            run("a", "2026-11-25T22:20:00Z", Some("2026-11-25T22:35:00Z")),
            run("a", "2026-11-25T22:30:00Z", Some("2026-11-25T22:40:00Z")),
            // Still running at 22:50 ("now"): 22:45-22:50.
            run("a", "2026-11-25T22:45:00Z", None),
            run("b", "2026-11-25T22:00:00Z", Some("2026-11-25T22:06:00Z")),
        ];
        let now = at("2026-11-25T22:50:00Z");
        let a = busy_share(&attempts, "a", from, now, to);
        assert!((a - 35.0 / 60.0).abs() < 1e-9, "{a}");
        let b = busy_share(&attempts, "b", from, now, to);
        assert!((b - 0.1).abs() < 1e-9, "{b}");
        assert_eq!(busy_share(&attempts, "c", from, now, to), 0.0);
    }

    #[test]
    fn completions_fall_in_their_minute() {
        let from = at("2026-11-25T22:00:30Z");
        let to = at("2026-11-25T22:03:00Z");
        let b = per_minute(
            &[
                at("2026-11-25T22:00:10Z"),
                at("2026-11-25T22:00:59Z"),
                at("2026-11-25T22:02:00Z"),
            ],
            from,
            to,
        );
        let counts: Vec<u32> = b.iter().map(|c| c.count).collect();
        assert_eq!(counts, [2, 0, 1, 0]);
        assert_eq!(b[0].at, at("2026-11-25T22:00:00Z"));
    }
}
