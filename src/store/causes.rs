//! What a failed attempt's error says of its cause, and a batch that
//! fails the same way on job after job.
//!
//! Why in the store: the cause is read from the error the store keeps, by
//! the morning's count of a batch's failures (`GET /api/jobs/counts`) and
//! by the farm as the night goes (`dispatch/batches.rs`), which must agree
//! on what "the same cause" is.

use super::{Store, StoreError};

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
/// raised (not for want of GPU memory: a bigger box may run it; not for a
/// full disk on the box: another box saves it), a refusal
/// of the graph, a run past its time limit. Only these count towards
/// pausing a batch; a lost connection or a dead box says nothing of it.
pub fn against_the_job(error: &serde_json::Value) -> bool {
    if super::out_of_memory(error) || super::box_disk_full(error) {
        return false;
    }
    error["exception_type"].is_string()
        || error.get("node_errors").is_some()
        || error.get("timeout_s").is_some()
}

/// The value of metadata field `key` as `job_metadata` holds it (text as
/// it was given, other values as JSON), `None` without it: a batch named
/// by a submission's metadata compares equal to the same batch read back.
pub fn metadata_value(
    metadata: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<String> {
    match metadata.get(key)? {
        serde_json::Value::String(text) => Some(text.clone()),
        v => Some(v.to_string()),
    }
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
        let metadata: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&metadata)?;
        Ok(metadata_value(&metadata, key))
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
