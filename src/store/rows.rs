//! Turning rows into records, and the few SQL-building helpers every query
//! shares.
//!
//! Why one place: each record is read by several queries (a job by id, a
//! page of history); one decoder per record keeps their columns in step.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::model::*;
use super::parse_time;

/// A stored time column.
pub(super) fn time_col(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let s: Option<String> = row.try_get(col)?;
    Ok(s.as_deref().and_then(parse_time))
}

/// A stored JSON column (a damaged value reads as absent, never as an error).
pub(super) fn json_col(row: &SqliteRow, col: &str) -> Result<Option<Value>, sqlx::Error> {
    let s: Option<String> = row.try_get(col)?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
}

/// Appends ` AND {column} IN (?, ?, ...)` for a non-empty list.
pub(super) fn push_in<'a, T>(q: &mut QueryBuilder<'a, Sqlite>, column: &str, values: &'a [T])
where
    T: sqlx::Encode<'a, Sqlite> + sqlx::Type<Sqlite> + Send + Sync + 'a,
{
    if values.is_empty() {
        return;
    }
    q.push(format!(" AND {column} IN ("));
    let mut sep = q.separated(", ");
    for v in values {
        sep.push_bind(v);
    }
    q.push(")");
}

/// Columns of [`job_from_row`].
pub(super) const JOB_COLUMNS: &str =
    "seq, id, workflow_id, status, priority, requires, max_attempts, attempts, \
    idempotency_key, parameters, metadata, backend_id, prompt_id, progress, error, callback_url, \
    timeout_s, submitted_at, updated_at, started_at, finished_at, not_before";

pub(super) fn job_from_row(row: &SqliteRow) -> Result<JobRecord, sqlx::Error> {
    Ok(JobRecord {
        seq: row.try_get("seq")?,
        job_id: row.try_get("id")?,
        workflow_id: row.try_get("workflow_id")?,
        status: row.try_get("status")?,
        priority: row.try_get("priority")?,
        requires: json_col(row, "requires")?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default(),
        max_attempts: row.try_get("max_attempts")?,
        attempts: row.try_get("attempts")?,
        idempotency_key: row.try_get("idempotency_key")?,
        parameters: json_col(row, "parameters")?.unwrap_or(Value::Null),
        metadata: json_col(row, "metadata")?.unwrap_or(Value::Null),
        backend_id: row.try_get("backend_id")?,
        prompt_id: row.try_get("prompt_id")?,
        progress: json_col(row, "progress")?,
        error: json_col(row, "error")?,
        callback_url: row.try_get("callback_url")?,
        timeout_s: row.try_get("timeout_s")?,
        submitted_at: time_col(row, "submitted_at")?.unwrap_or_default(),
        updated_at: time_col(row, "updated_at")?.unwrap_or_default(),
        started_at: time_col(row, "started_at")?,
        finished_at: time_col(row, "finished_at")?,
        not_before: time_col(row, "not_before")?,
        manifest: None,
        graph: None,
    })
}

/// Columns of [`event_from_row`].
pub(super) const EVENT_COLUMNS: &str =
    "seq, job_id, workflow_id, at, kind, status, backend_id, attempt, message, data";

pub(super) fn event_from_row(row: &SqliteRow) -> Result<JobEvent, sqlx::Error> {
    Ok(JobEvent {
        seq: row.try_get("seq")?,
        job_id: row.try_get("job_id")?,
        workflow_id: row.try_get("workflow_id")?,
        at: time_col(row, "at")?.unwrap_or_default(),
        kind: row.try_get("kind")?,
        status: row.try_get("status")?,
        backend_id: row.try_get("backend_id")?,
        attempt: row.try_get("attempt")?,
        message: row.try_get("message")?,
        data: json_col(row, "data")?,
    })
}

pub(super) fn output_from_row(r: &SqliteRow) -> Result<OutputRecord, sqlx::Error> {
    Ok(OutputRecord {
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        node_id: r.try_get("node_id")?,
        filename: r.try_get("filename")?,
        subfolder: r.try_get("subfolder")?,
        file_type: r.try_get("type")?,
        size: r.try_get("size")?,
        sha256: r.try_get("sha256")?,
        content_type: r.try_get("content_type")?,
    })
}

pub(super) fn lease_from_row(r: &SqliteRow) -> Result<LeaseRecord, sqlx::Error> {
    Ok(LeaseRecord {
        prompt_id: r.try_get("prompt_id")?,
        attempt: r.try_get("attempt")?,
        backend_id: r.try_get("backend_id")?,
        leased_at: time_col(r, "leased_at")?.unwrap_or_default(),
        submitted_at: time_col(r, "submitted_at")?,
        started_at: time_col(r, "started_at")?,
        finished_at: time_col(r, "finished_at")?,
        outcome: r.try_get("outcome")?,
        error: json_col(r, "error")?,
    })
}

pub(super) fn active_from_row(r: &SqliteRow) -> Result<ActiveJob, sqlx::Error> {
    Ok(ActiveJob {
        job_id: r.try_get("id")?,
        prompt_id: r.try_get("prompt_id")?,
        token: r.try_get("lease_token")?,
        status: r.try_get("status")?,
        attempt: r.try_get("attempts")?,
        submitted: r.try_get::<Option<String>, _>("submitted_at")?.is_some(),
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        leased_at: time_col(r, "leased_at")?,
        started_at: time_col(r, "lease_started_at")?,
        timeout_s: r.try_get("timeout_s")?,
    })
}

pub(super) fn backend_from_row(row: &SqliteRow) -> Result<BackendRecord, sqlx::Error> {
    let tags: String = row.try_get("tags")?;
    Ok(BackendRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        host: row.try_get("host")?,
        port: row.try_get("port")?,
        config_enabled: row.try_get::<i64, _>("config_enabled")? != 0,
        admin_state: row.try_get("admin_state")?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        max_inflight: row.try_get("max_inflight")?,
        client_id: row.try_get("client_id")?,
        state: row.try_get("state")?,
        comfyui_version: row.try_get("comfyui_version")?,
        vram_total: row.try_get("vram_total")?,
        vram_free: row.try_get("vram_free")?,
        queue_remaining: row.try_get("queue_remaining")?,
        active_jobs: row.try_get("active_jobs")?,
        last_error: row.try_get("last_error")?,
        last_seen: time_col(row, "last_seen")?,
        offline_since: time_col(row, "offline_since")?,
    })
}
