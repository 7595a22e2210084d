//! The store's records: what callers hand in and get back, and the states
//! a job and a backend can be in.
//!
//! Why here and not in the API: these are the database's view of things.
//! The HTTP wire format lives in `api` and is built from these, so a column
//! can change without changing what clients see, and the other way round.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use super::backend_records::*;

/// The states of a job (see `docs/architecture.md`, "A job's states").
///
/// `queued → assigned → running → completed | failed | cancelled`, with
/// `assigned/running → queued` when an attempt fails in a retryable way or
/// its backend loses it. Terminal states are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for the jobs it starts from (its parents) to complete; queued
    /// when the last one does.
    Waiting,
    /// Waiting for a backend.
    Queued,
    /// Leased to a backend, prompt id chosen; submitted or about to be.
    Assigned,
    /// The backend started it.
    Running,
    /// Finished, outputs collected.
    Completed,
    /// Finished without success, no attempts left (or not retryable).
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl JobStatus {
    /// Every state, in lifecycle order.
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Waiting,
        JobStatus::Queued,
        JobStatus::Assigned,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The name stored and shown (`queued`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Queued => "queued",
            JobStatus::Assigned => "assigned",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// A backend holds the job (its lease is live).
    pub fn is_held(self) -> bool {
        matches!(self, JobStatus::Assigned | JobStatus::Running)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum LeaseOutcome {
    /// The job completed under it.
    Completed,
    /// A run-time failure.
    Failed,
    /// The backend refused the graph.
    Rejected,
    /// The backend lost it, or was given up on; the attempt did not count.
    Lost,
    /// Cancelled by a user.
    Cancelled,
    /// Stopped for a user's pause (the job went back to the queue,
    /// paused); the attempt did not count.
    Paused,
}

impl LeaseOutcome {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseOutcome::Completed => "completed",
            LeaseOutcome::Failed => "failed",
            LeaseOutcome::Rejected => "rejected",
            LeaseOutcome::Lost => "lost",
            LeaseOutcome::Cancelled => "cancelled",
            LeaseOutcome::Paused => "paused",
        }
    }
}

/// A validated, bound job ready to be stored.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job id, chosen before the write.
    pub id: String,
    /// Template id, or `None` for an inline graph.
    pub workflow_id: Option<String>,
    /// Higher runs first.
    pub priority: i64,
    /// Backend tags the job needs.
    pub requires: Vec<String>,
    /// Run-time failures allowed before the job fails.
    pub max_attempts: u32,
    /// Client's key for safe re-submission.
    pub idempotency_key: Option<String>,
    /// Hash of the manifest, to tell a retry from a different job under the same key.
    pub manifest_hash: String,
    /// The manifest as submitted.
    pub manifest: Value,
    /// Every parameter with its bound value (defaults included).
    pub parameters: Value,
    /// Client metadata (an object).
    pub metadata: serde_json::Map<String, Value>,
    /// The ComfyUI API-format graph to run.
    pub graph: Value,
    /// Where to POST the summary when the job ends.
    pub callback_url: Option<String>,
    /// Longest a run may take on a backend, in seconds (`None`: the farm's default).
    pub timeout_s: Option<i64>,
    /// The input files the graph names (`sha256:<hex>` ids).
    pub inputs: Vec<String>,
    /// The jobs whose outputs it starts from (`job:<id>` inputs): it waits
    /// until they complete.
    pub parents: Vec<String>,
    /// What it needs loaded (its checkpoint, or its workflow): a backend
    /// that ran the same last prefers it.
    pub affinity: Option<String>,
    /// Stored paused: it keeps its place, but no backend takes it until
    /// it is resumed.
    pub paused: bool,
    /// No backend takes it before then (its first attempt's `not_before`).
    pub start_after: Option<DateTime<Utc>>,
    /// Its group, where the farm is shared between groups
    /// (`dispatch.share_by`; see [`crate::store::share_of`]); `None` where
    /// it is not.
    pub share: Option<String>,
    /// Its batch (metadata field, value) when the farm may hold it
    /// (`Farm::held_batch_of`): stored paused if the hold still stands
    /// when it is written.
    pub hold: Option<(String, String)>,
}

/// What a submission led to.
#[derive(Debug, Clone)]
pub enum SubmitOutcome {
    /// A new job was stored.
    Created(JobSummary),
    /// The idempotency key named an earlier job with the same manifest.
    Existing(JobSummary),
}

/// The few fields a submission answers with.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Current status.
    pub status: JobStatus,
    /// When it was stored.
    pub submitted_at: DateTime<Utc>,
    /// A new job stored paused (asked to be, or its batch held).
    #[sqlx(default)]
    pub paused: bool,
}

/// Everything known about a job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRecord {
    /// Position in the history (the keyset of pagination).
    pub seq: i64,
    /// Job id.
    #[sqlx(rename = "id")]
    pub job_id: String,
    /// Template id; `None` for an inline graph.
    pub workflow_id: Option<String>,
    /// Its state.
    pub status: JobStatus,
    /// Higher runs first.
    pub priority: i64,
    /// Backend tags the job needs.
    #[sqlx(json)]
    pub requires: Vec<String>,
    /// Run-time failures allowed.
    pub max_attempts: i64,
    /// Attempts made so far (a lost backend does not count).
    pub attempts: i64,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Bound parameter values, defaults included.
    #[sqlx(json)]
    pub parameters: Value,
    /// Client metadata.
    #[sqlx(json)]
    pub metadata: Value,
    /// Backend holding the job now (or that ran it last).
    pub backend_id: Option<String>,
    /// ComfyUI prompt id of the current attempt.
    pub prompt_id: Option<String>,
    /// Progress of a running job: node, step value and max.
    #[sqlx(json(nullable))]
    pub progress: Option<Value>,
    /// Why the job failed, as the backend said it.
    #[sqlx(json(nullable))]
    pub error: Option<Value>,
    /// Webhook URL.
    pub callback_url: Option<String>,
    /// Longest a run may take, in seconds, when the manifest set one.
    pub timeout_s: Option<i64>,
    /// When it was stored.
    pub submitted_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When a backend first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Earliest time of the next attempt (retry back-off).
    pub not_before: Option<DateTime<Utc>>,
    /// The manifest as submitted (only when asked for one job).
    #[sqlx(json(nullable))]
    pub manifest: Option<Value>,
    /// The bound graph (only when asked for one job).
    #[sqlx(json(nullable))]
    pub graph: Option<Value>,
    /// The name of its first image output (only in lists).
    #[sqlx(default)]
    pub preview: Option<String>,
    /// The jobs whose outputs it starts from (`job:<id>` inputs).
    #[sqlx(json)]
    pub parents: Vec<String>,
    /// When it was paused: no backend takes it until it is resumed.
    pub paused_at: Option<DateTime<Utc>>,
}

/// A job's workflow and times.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobTimes {
    /// Template id.
    pub workflow_id: Option<String>,
    /// When it was stored.
    pub submitted_at: DateTime<Utc>,
    /// When a backend first started it.
    pub started_at: Option<DateTime<Utc>>,
}

/// When a prompt ran on its box, on the orchestrator's clock, as the box
/// told it afterwards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RanAt {
    /// When it started there, if the box said.
    pub started: Option<DateTime<Utc>>,
    /// When it ended there.
    pub ended: DateTime<Utc>,
}

/// What a job's completion did.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The job's times, for its metrics.
    pub times: JobTimes,
    /// The jobs waiting on it that it queued (its last parent to complete),
    /// by the tags each needs: their workers are woken.
    pub released: Vec<Vec<String>>,
    /// An earlier attempt failed, or a backend lost it while running it:
    /// where, is evidence against that backend (`dispatch::health`).
    pub failed_before: bool,
}

/// One entry of the event log.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobEvent {
    /// Global order of events (the SSE event id).
    pub seq: i64,
    /// The job; `None` for a backend event.
    pub job_id: Option<String>,
    /// The job's workflow.
    pub workflow_id: Option<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// What happened (`submitted`, `assigned`, ..., `backend_online`).
    pub kind: String,
    /// Job status after the event.
    pub status: Option<JobStatus>,
    /// Backend involved.
    pub backend_id: Option<String>,
    /// Attempt number.
    pub attempt: Option<i64>,
    /// A sentence for people.
    pub message: Option<String>,
    /// Details (error bodies, prompt ids).
    #[sqlx(json(nullable))]
    pub data: Option<Value>,
}

/// Filters of the history query; every one is served by an index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    /// Any of these statuses.
    pub statuses: Vec<JobStatus>,
    /// Template id.
    pub workflow_id: Option<String>,
    /// Backend that holds or ran the job.
    pub backend_id: Option<String>,
    /// Submitted at or after.
    pub submitted_after: Option<DateTime<Utc>>,
    /// Submitted strictly before.
    pub submitted_before: Option<DateTime<Utc>>,
    /// `metadata.KEY=VALUE` pairs, all of which must match.
    pub metadata: Vec<(String, String)>,
    /// Only paused jobs (`true`) or only jobs not paused (`false`).
    pub paused: Option<bool>,
    /// Page size.
    pub limit: u32,
    /// Keyset: only jobs older than this position (from a cursor).
    pub before_seq: Option<i64>,
}

/// How many jobs a filter matches: how far a batch got.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobCounts {
    /// By status; a status no job has is left out.
    pub by_status: Vec<(JobStatus, i64)>,
    /// Of those, how many a user paused (queued or waiting).
    pub paused: i64,
    /// When the first of them was submitted.
    pub first_submitted_at: Option<DateTime<Utc>>,
    /// When the last of them to finish finished.
    pub last_finished_at: Option<DateTime<Utc>>,
    /// How many of them ended (completed, failed or cancelled) at or
    /// after [`JobCounts::recent_since`], having run: the pace of the
    /// batch now (a queue cancelled at once, or jobs failed with the one
    /// they start from, took no farm time and say nothing of it).
    pub ended_recently: i64,
    /// Where "recently" starts ([`PACE_WINDOW`] before the count).
    pub recent_since: DateTime<Utc>,
}

/// How far back a count looks for the pace at which jobs end: long enough
/// to span several jobs of minutes each, short enough to follow a farm
/// that lost or gained a box.
pub const PACE_WINDOW: chrono::Duration = chrono::Duration::minutes(15);

/// One page of history, newest first.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobRecord>,
    /// Position to continue from, if there may be more.
    pub next_before_seq: Option<i64>,
}

/// A file collected from a backend for a job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutputRecord {
    /// Name under which it is served (`/api/job/{id}/outputs/{name}`).
    pub name: String,
    /// Kind as ComfyUI lists it (`images`, `gifs`, `videos`, `audio`, ...).
    pub kind: String,
    /// Node that produced it.
    pub node_id: String,
    /// File name on the backend.
    pub filename: String,
    /// Sub-folder on the backend.
    pub subfolder: String,
    /// `output` or `temp`.
    #[sqlx(rename = "type")]
    pub file_type: String,
    /// Bytes.
    pub size: i64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// MIME type it is served with.
    pub content_type: String,
    /// When retention deleted its file (the record stays).
    #[sqlx(default)]
    pub pruned_at: Option<DateTime<Utc>>,
}

/// A job and everything its page shows, from one snapshot of the database.
#[derive(Debug, Clone)]
pub struct JobDetailRecord {
    /// The job.
    pub job: JobRecord,
    /// Its collected files.
    pub outputs: Vec<OutputRecord>,
    /// Its leases, oldest first.
    pub leases: Vec<LeaseRecord>,
    /// Its webhook deliveries.
    pub webhooks: Vec<WebhookRecord>,
    /// Why it is still queued, when it is.
    pub waiting_for: Option<String>,
    /// The jobs that start from its outputs, oldest first (the ones it
    /// starts from are the job's `parents`).
    pub followed_by: Vec<String>,
}

/// One lease of a job: which backend got which prompt id, and how it ended.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeaseRecord {
    /// The ComfyUI prompt id of this lease (submitted at most once).
    pub prompt_id: String,
    /// Attempt number it counted as.
    pub attempt: i64,
    /// Backend.
    pub backend_id: String,
    /// When it was leased.
    pub leased_at: DateTime<Utc>,
    /// When ComfyUI accepted the prompt.
    pub submitted_at: Option<DateTime<Utc>>,
    /// When ComfyUI started running it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// How it ended; `None` while it is live.
    pub outcome: Option<LeaseOutcome>,
    /// What went wrong.
    #[sqlx(json(nullable))]
    pub error: Option<Value>,
}

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
    /// Longest the run may take, in seconds, when the manifest set one.
    pub timeout_s: Option<i64>,
}

/// A job a backend holds (assigned or running), for reconciliation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActiveJob {
    /// Job id.
    #[sqlx(rename = "id")]
    pub job_id: String,
    /// Prompt id of its lease.
    pub prompt_id: String,
    /// Fencing token.
    #[sqlx(rename = "lease_token")]
    pub token: i64,
    /// `assigned` or `running`.
    pub status: JobStatus,
    /// Attempt number.
    #[sqlx(rename = "attempts")]
    pub attempt: i64,
    /// Did ComfyUI acknowledge the prompt?
    pub submitted: bool,
    /// Has a user asked to stop it (to cancel it, or to pause it)?
    pub stop_requested: bool,
    /// When it was leased.
    pub leased_at: Option<DateTime<Utc>>,
    /// When the backend started running it (this lease).
    #[sqlx(rename = "lease_started_at")]
    pub started_at: Option<DateTime<Utc>>,
    /// Longest the run may take, in seconds, when the manifest set one.
    pub timeout_s: Option<i64>,
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

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only these jobs (any, when empty).
    pub job_ids: Vec<String>,
    /// Only events that leave a job in one of these statuses.
    pub statuses: Vec<JobStatus>,
    /// Only jobs of this workflow.
    pub workflow_id: Option<String>,
}

impl EventFilter {
    /// Whether `ev` passes the filter (the same rule as the log query's).
    pub fn matches(&self, ev: &JobEvent) -> bool {
        (self.job_ids.is_empty() || ev.job_id.as_ref().is_some_and(|j| self.job_ids.contains(j)))
            && (self.statuses.is_empty() || ev.status.is_some_and(|s| self.statuses.contains(&s)))
            && (self.workflow_id.is_none() || ev.workflow_id == self.workflow_id)
    }
}

/// A webhook due for delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Webhook {
    /// Outbox row.
    pub id: i64,
    /// The job that ended.
    pub job_id: String,
    /// Where to POST.
    pub url: String,
    /// Tries so far.
    pub attempts: i64,
}

/// One delivery record of a job's webhook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookRecord {
    /// The receiver.
    pub url: String,
    /// The job status it reports.
    pub status: JobStatus,
    /// Tries so far.
    pub attempts: i64,
    /// When it was delivered.
    pub delivered_at: Option<String>,
    /// When it was given up.
    pub gave_up_at: Option<String>,
    /// The last try's error.
    pub last_error: Option<String>,
}
