//! What a failed attempt's error says of its cause, and a batch that
//! fails the same way on job after job.
//!
//! Why in the store: the cause is read from the error the store keeps, by
//! the morning's count of a batch's failures (`GET /api/jobs/counts`) and
//! by the farm as the night goes (`dispatch/batches.rs`), which must agree
//! on what "the same cause" is; and pausing a batch is one transaction.

use chrono::Utc;
use sqlx::Row;

use super::batch::Batch;
use super::events::{push_event, EventInput};
use super::model::JobStatus;
use super::{fmt_time, Store, StoreError};

/// What a failed job's error says of its cause, in a few words that the
/// same cause on another backend, or at another attempt, says alike.
pub fn failure_cause(error: &serde_json::Value) -> String {
    if let Some(code) = error["code"].as_str() {
        return code.to_string();
    }
    if let Some(t) = error["exception_type"].as_str() {
        return match error["node_type"].as_str() {
            Some(node) => format!("{t} in {node}"),
            None => t.to_string(),
        };
    }
    if error.get("timeout_s").is_some() {
        return "timed out".into();
    }
    if error.get("lost_runs").is_some() {
        return "its backends died under it too many times".into();
    }
    if error.get("node_errors").is_some() || error.get("http_status").is_some() {
        return match error["comfyui_error"]["type"].as_str() {
            Some(t) => format!("rejected by the backend ({t})"),
            None => "rejected by the backend".into(),
        };
    }
    if error["interrupted"] == true {
        return "interrupted at the backend, not by this orchestrator".into();
    }
    // The message, without the backend it happened on and the details
    // after its first clause.
    let message = error["message"].as_str().unwrap_or("no error recorded");
    let message = match message.strip_prefix("backend ") {
        Some(rest) => rest.split_once(": ").map_or(message, |(_, m)| m),
        None => message,
    };
    let end = message.find([':', ';', '(']).unwrap_or(message.len()).min(
        message
            .char_indices()
            .nth(80)
            .map_or(message.len(), |(i, _)| i),
    );
    message[..end].trim().to_string()
}

/// Whether an attempt's error says something against the job (its graph
/// or its settings) rather than against the box or the farm: a node that
/// raised (not for want of GPU memory: a bigger box may run it), a refusal
/// of the graph, a run past its time limit. Only these count towards
/// pausing a batch; a lost connection or a dead box says nothing of it.
pub fn against_the_job(error: &serde_json::Value) -> bool {
    if super::out_of_memory(error) {
        return false;
    }
    error["exception_type"].is_string()
        || error.get("node_errors").is_some()
        || error.get("timeout_s").is_some()
}

impl Store {
    /// The value of metadata field `key` of a job as `job_metadata` holds
    /// it (text as it was given, other values as JSON), `None` without it.
    /// Read from the job's row (its id is indexed; `job_metadata` is keyed
    /// by field and value, not by job).
    pub async fn job_metadata(
        &self,
        job_id: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let metadata: Option<String> = sqlx::query_scalar("SELECT metadata FROM jobs WHERE id = ?")
            .bind(job_id)
            .fetch_optional(self.reader())
            .await?;
        let Some(metadata) = metadata else {
            return Ok(None);
        };
        let metadata: serde_json::Value = serde_json::from_str(&metadata)?;
        Ok(match metadata.get(key) {
            None => None,
            Some(serde_json::Value::String(text)) => Some(text.clone()),
            Some(v) => Some(v.to_string()),
        })
    }

    /// Whether a job of a batch (metadata `key` = `value`) is paused.
    pub async fn batch_has_paused(&self, key: &str, value: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM job_metadata m JOIN jobs j ON j.seq = m.job_seq \
             WHERE m.key = ? AND m.value = ? AND j.paused_at IS NOT NULL)",
        )
        .bind(key)
        .bind(value)
        .fetch_one(self.reader())
        .await?)
    }

    /// Pauses every job of a batch (metadata `key` = `value`) that has not
    /// started and is not paused yet, each with a `paused` event whose
    /// message is `why`, in one transaction; their ids.
    pub async fn pause_batch(
        &self,
        key: &str,
        value: &str,
        why: String,
    ) -> Result<Vec<String>, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT j.id, j.status FROM job_metadata m JOIN jobs j ON j.seq = m.job_seq \
                         WHERE m.key = ? AND m.value = ? AND j.status IN ('queued', 'waiting') \
                         AND j.paused_at IS NULL",
                    )
                    .bind(&key)
                    .bind(&value)
                    .fetch_all(&mut *conn)
                    .await?;
                    let now = fmt_time(Utc::now());
                    let mut b = Batch::default();
                    let mut ids = Vec::with_capacity(rows.len());
                    for r in &rows {
                        let id: String = r.try_get("id")?;
                        let status: JobStatus = r.try_get("status")?;
                        b.push("UPDATE jobs SET paused_at = ?, updated_at = ? WHERE id = ?")
                            .bind(now.clone())
                            .bind(now.clone())
                            .bind(id.clone());
                        let ev = EventInput {
                            kind: "paused",
                            status: Some(status),
                            message: Some(why.clone()),
                            data: Some(serde_json::json!({"batch": value, "by": "farm"})),
                            ..Default::default()
                        };
                        push_event(&mut b, &id, ev, &now);
                        ids.push(id);
                    }
                    b.run(conn).await?;
                    Ok(ids)
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_what_says_something_of_the_job_counts_against_its_batch() {
        for (error, against) in [
            (
                json!({"exception_type": "IndexError", "node_type": "ImageToMask"}),
                true,
            ),
            (
                json!({"message": "rejected", "http_status": 400, "node_errors": {}}),
                true,
            ),
            (
                json!({"message": "timed out after 60 s", "timeout_s": 60}),
                true,
            ),
            // A bigger box may run it; a lost box says nothing of the job.
            (json!({"exception_type": "torch.OutOfMemoryError"}), false),
            (
                json!({"message": "backend b: cannot upload the job's input files: reset"}),
                false,
            ),
            (json!({"message": "lost", "lost_runs": 2}), false),
        ] {
            assert_eq!(against_the_job(&error), against, "{error}");
        }
    }
}
