//! What clients see: the JSON shapes of jobs, outputs, leases, events,
//! backends, a submission's answer and a held batch, built from the
//! store's records.
//!
//! Why a layer of its own: these shapes are a contract (the names clients
//! depend on never change, fields are only added), while the store's
//! records follow the database. The two meet only in the `From` impls here.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::store::{
    AdminState, BackendRecord, BackendState, JobEvent, JobRecord, JobStatus, LeaseOutcome,
    LeaseRecord, OutputRecord, WebhookRecord,
};

/// A job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    /// Job id.
    pub job_id: String,
    /// Template id; `null` for an inline graph.
    pub workflow_id: Option<String>,
    /// Its state.
    pub status: JobStatus,
    /// Higher runs first.
    pub priority: i64,
    /// Backend tags the job needs.
    pub requires: Vec<String>,
    /// Run-time failures allowed.
    pub max_attempts: i64,
    /// Attempts made so far (a lost backend does not count).
    pub attempts: i64,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Bound parameter values, defaults included.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// Client metadata.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Backend holding the job now (or that ran it last).
    pub backend_id: Option<String>,
    /// ComfyUI prompt id of the current attempt.
    pub prompt_id: Option<String>,
    /// Progress of a running job: node, step value and max.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Value>,
    /// Why the job failed, as the backend said it.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// Webhook URL.
    pub callback_url: Option<String>,
    /// Longest a run may take, in seconds, when the manifest or template set one.
    pub timeout_s: Option<i64>,
    /// RFC 3339 UTC.
    pub submitted_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When a backend first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Earliest time of the next attempt: a retry's back-off, or for the
    /// first its manifest's `start_after`.
    pub not_before: Option<DateTime<Utc>>,
    /// The manifest as submitted (one job's view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub manifest: Option<Value>,
    /// The bound graph sent to ComfyUI (one job's view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub graph: Option<Value>,
    /// In lists: the name of its first image output, for a thumbnail
    /// (`/api/job/{id}/outputs/{preview}?thumb=128`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// The jobs whose outputs it starts from (its `job:<id>` inputs): it
    /// is `waiting` until they complete, and fails if one of them does.
    /// In lists too, so a list of waiting jobs says what each waits for.
    pub starts_from: Vec<String>,
    /// When a user paused it (`POST /api/job/{id}/pause`, or `paused` in
    /// its manifest): it keeps its place, but no backend takes it until it
    /// is resumed. `null` when it is not paused.
    pub paused_at: Option<DateTime<Utc>>,
}

impl From<JobRecord> for Job {
    fn from(j: JobRecord) -> Job {
        Job {
            job_id: j.job_id,
            workflow_id: j.workflow_id,
            status: j.status,
            priority: j.priority,
            requires: j.requires,
            max_attempts: j.max_attempts,
            attempts: j.attempts,
            idempotency_key: j.idempotency_key,
            parameters: j.parameters,
            metadata: j.metadata,
            backend_id: j.backend_id,
            prompt_id: j.prompt_id,
            progress: j.progress,
            error: j.error,
            callback_url: j.callback_url,
            timeout_s: j.timeout_s,
            submitted_at: j.submitted_at,
            updated_at: j.updated_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            not_before: j.not_before,
            manifest: j.manifest,
            graph: j.graph,
            preview: j.preview,
            starts_from: j.parents,
            paused_at: j.paused_at,
        }
    }
}

/// A file collected from a backend for a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Output {
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
    #[serde(rename = "type")]
    pub file_type: String,
    /// Bytes.
    pub size: i64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// MIME type it is served with.
    pub content_type: String,
    /// Whether `?thumb=SIZE` serves a small JPEG of it (PNG, JPEG, WebP and
    /// GIF pictures, an animation's first frame).
    pub thumbnail: bool,
    /// When retention deleted its file (`retention.outputs_days`); the record stays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned_at: Option<DateTime<Utc>>,
}

impl From<OutputRecord> for Output {
    fn from(o: OutputRecord) -> Output {
        Output {
            name: o.name,
            kind: o.kind,
            node_id: o.node_id,
            filename: o.filename,
            subfolder: o.subfolder,
            file_type: o.file_type,
            size: o.size,
            sha256: o.sha256,
            thumbnail: crate::thumbs::of_a_picture(&o.content_type) && o.pruned_at.is_none(),
            content_type: o.content_type,
            pruned_at: o.pruned_at,
        }
    }
}

/// One lease of a job: which backend got which prompt id, and how it ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Lease {
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
    /// `completed`, `failed`, `rejected`, `lost`, `cancelled`, or `null` while it runs.
    pub outcome: Option<LeaseOutcome>,
    /// What went wrong.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
}

impl From<LeaseRecord> for Lease {
    fn from(l: LeaseRecord) -> Lease {
        Lease {
            prompt_id: l.prompt_id,
            attempt: l.attempt,
            backend_id: l.backend_id,
            leased_at: l.leased_at,
            submitted_at: l.submitted_at,
            started_at: l.started_at,
            finished_at: l.finished_at,
            outcome: l.outcome,
            error: l.error,
        }
    }
}

/// One delivery record of a job's webhook.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WebhookDelivery {
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

impl From<WebhookRecord> for WebhookDelivery {
    fn from(w: WebhookRecord) -> WebhookDelivery {
        WebhookDelivery {
            url: w.url,
            status: w.status,
            attempts: w.attempts,
            delivered_at: w.delivered_at,
            gave_up_at: w.gave_up_at,
            last_error: w.last_error,
        }
    }
}

/// One entry of the event log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// Global order of events (the SSE event id).
    pub seq: i64,
    /// The job; `null` for a backend event.
    pub job_id: Option<String>,
    /// The job's workflow.
    pub workflow_id: Option<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Job events: `submitted`, `assigned`, `submitted_to_backend`, `running`,
    /// `progress`, `completed`, `failed`, `retry_scheduled`, `requeued`,
    /// `cancel_requested`, `cancelled`, `cancel_too_late`, `retried`,
    /// `priority_changed`, `scheduled`, `paused`, `resumed`,
    /// `pause_requested`, `pause_too_late`, `backend_socket_deaf`. Backend events: `backend_online`,
    /// `backend_offline`, `backend_incompatible`, `backend_quarantined`,
    /// `backend_quarantine_over`, `backend_quarantine_lifted`.
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
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

impl From<JobEvent> for Event {
    fn from(e: JobEvent) -> Event {
        Event {
            seq: e.seq,
            job_id: e.job_id,
            workflow_id: e.workflow_id,
            at: e.at,
            kind: e.kind,
            status: e.status,
            backend_id: e.backend_id,
            attempt: e.attempt,
            message: e.message,
            data: e.data,
        }
    }
}

/// One backend.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Backend {
    /// Stable id from the config.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Host of the ComfyUI server.
    pub host: String,
    /// Port of the ComfyUI server.
    pub port: i64,
    /// Where its ComfyUI answers: scheme, host, port and path
    /// (`https://gpu7.example.com/comfyui` for a box behind a proxy), as
    /// the config gives it. Its own page, for a look at the box.
    pub url: String,
    /// Enabled in the config file.
    pub config_enabled: bool,
    /// Operator override: `enabled`, `disabled`, `draining`, or `null` to follow the config.
    pub admin_state: Option<AdminState>,
    /// Whether new jobs may be leased to it now (config, override, hours,
    /// health).
    pub accepting_jobs: bool,
    /// When it takes the farm's jobs, in the orchestrator's local time
    /// (`20:00-08:00`: a workstation at night); `null`: at any time.
    pub hours: Option<String>,
    /// Outside its hours now: it takes no new jobs (those it runs finish).
    pub off_hours: bool,
    /// Lent to the farm outside its hours by an operator (its Enable) until
    /// this time, the end of its next hours, when they hold again; `null`
    /// when not lent. A disable or a drain ends the loan.
    pub hours_override_until: Option<DateTime<Utc>>,
    /// Capabilities jobs may require.
    pub tags: Vec<String>,
    /// Prompts held at once.
    pub max_inflight: i64,
    /// The WebSocket client id used with this backend, kept across restarts.
    pub client_id: String,
    /// `unknown`, `online`, `offline`, or `incompatible` (too old; `last_error` says why).
    pub state: BackendState,
    /// `system.comfyui_version` of `/system_stats`.
    pub comfyui_version: Option<String>,
    /// VRAM of the first device, bytes.
    pub vram_total: Option<i64>,
    /// Free VRAM of the first device, bytes.
    pub vram_free: Option<i64>,
    /// The largest upload it takes, bytes: its ComfyUI's
    /// `--max-upload-size` (100 MB unless started with another), as it
    /// last said; `null` until it has. A job that starts from a larger
    /// file is left to a backend that takes it.
    pub max_upload_bytes: Option<i64>,
    /// Prompts in ComfyUI's queue (running and pending).
    pub queue_remaining: Option<i64>,
    /// Jobs this orchestrator has on it now (assigned or running).
    pub active_jobs: i64,
    /// Prompts in its ComfyUI queue that this orchestrator did not send (an
    /// artist's, queued from ComfyUI's own page), as last heard on its
    /// socket: they take its `max_inflight` slots as ours do, so work goes
    /// to a free box rather than waiting behind them.
    pub prompts_not_ours: i64,
    /// Of its jobs, those that finished and whose outputs wait for space on
    /// the orchestrator's full disk: they hold their slots (no attempt
    /// spent) and are collected once space is freed.
    pub outputs_waiting_for_disk: i64,
    /// Until when it takes no jobs because its jobs failed while the same
    /// jobs completed on other backends (a sick box: a broken driver, a
    /// full disk); `null` when it is not in quarantine. Enabling it ends
    /// the quarantine now.
    pub quarantined_until: Option<DateTime<Utc>>,
    /// Why it is in quarantine: how many jobs, and the last one's error.
    pub quarantine_reason: Option<String>,
    /// Last error talking to it, or why it gets no jobs.
    pub last_error: Option<String>,
    /// Last successful contact.
    pub last_seen: Option<DateTime<Utc>>,
    /// Since when it has not answered.
    pub offline_since: Option<DateTime<Utc>>,
    /// The model its last job loaded (a checkpoint file, or
    /// `workflow:ID` for a graph without one that names other model files;
    /// a graph naming none leaves it as it was): what it likely has loaded,
    /// and what it prefers next.
    pub loaded_model: Option<String>,
}

impl From<BackendRecord> for Backend {
    fn from(b: BackendRecord) -> Backend {
        Backend {
            accepting_jobs: b.accepting_jobs(),
            id: b.id,
            name: b.name,
            url: b
                .url
                .unwrap_or_else(|| format!("http://{}:{}", b.host, b.port)),
            host: b.host,
            port: b.port,
            config_enabled: b.config_enabled,
            admin_state: b.admin_state,
            hours: b.hours,
            off_hours: b.off_hours,
            hours_override_until: b.hours_override_until,
            tags: b.tags,
            max_inflight: b.max_inflight,
            client_id: b.client_id,
            state: b.state,
            comfyui_version: b.comfyui_version,
            vram_total: b.vram_total,
            vram_free: b.vram_free,
            max_upload_bytes: b.max_upload_bytes,
            queue_remaining: b.queue_remaining,
            active_jobs: b.active_jobs,
            prompts_not_ours: 0,
            outputs_waiting_for_disk: 0,
            quarantined_until: None,
            quarantine_reason: None,
            last_error: b.last_error,
            last_seen: b.last_seen,
            offline_since: b.offline_since,
            loaded_model: b.last_affinity,
        }
    }
}

/// A batch the farm holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeldBatch {
    /// The metadata field naming a batch (`dispatch.batch_field`).
    pub field: String,
    /// The batch.
    pub batch: String,
    /// The failure that broke it.
    pub cause: String,
    /// Since when.
    pub held_at: chrono::DateTime<chrono::Utc>,
    /// For people: what broke it and how to let it go.
    pub message: String,
}

impl From<crate::store::HeldBatch> for HeldBatch {
    fn from(h: crate::store::HeldBatch) -> Self {
        HeldBatch {
            field: h.field,
            batch: h.batch,
            cause: h.cause,
            held_at: h.held_at,
            message: h.banner,
        }
    }
}

/// Answer to a submission.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubmitResponse {
    /// The job's id.
    pub job_id: String,
    /// `queued` for a new job; the current status for an idempotent repeat.
    pub status: JobStatus,
    /// A sentence for people.
    pub message: String,
    /// When the job was stored (RFC 3339 UTC).
    pub submitted_at: DateTime<Utc>,
    /// Things accepted but worth knowing (ignored fields; a batch the
    /// farm holds).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Stored paused (asked to be, or its batch held by the farm): no
    /// backend takes it until it is resumed. Absent when not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl From<crate::submit::Submitted> for SubmitResponse {
    fn from(s: crate::submit::Submitted) -> SubmitResponse {
        SubmitResponse {
            message: if let Some((field, batch)) = &s.held_with {
                format!(
                    "Job stored paused: the farm holds its batch ({field} {batch}), found failing job \
                     after job alike; once it is mended, let the batch go: POST /api/batch/{batch}/resume"
                )
            } else if s.paused {
                format!(
                    "Job stored paused: no backend takes it until it is resumed (POST /api/job/{}/resume)",
                    s.job_id
                )
            } else if let Some(at) = s.starts_at {
                format!(
                    "Job stored; no backend takes it before {} (its start_after)",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            } else if s.created && s.status == JobStatus::Waiting {
                "Job stored; it waits for the jobs it starts from to complete".to_string()
            } else if s.created {
                "Job stored and queued".to_string()
            } else {
                "A job with this idempotency key and manifest exists; this is it".to_string()
            },
            job_id: s.job_id,
            status: s.status,
            submitted_at: s.submitted_at,
            warnings: s.warnings,
            paused: s.paused,
        }
    }
}
