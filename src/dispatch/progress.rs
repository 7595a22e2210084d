//! Live progress and previews of running jobs.
//!
//! Why in memory first: ComfyUI sends a message per sampler step; the API
//! reads the latest value from memory, and the database gets it at most
//! every [`PROGRESS_EVERY`] per job (what is still held back when the run
//! ends is dropped: the job's end says it all), so a fast sampler never
//! turns into a write per step. Previews are relayed as they come and
//! never stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Shared;

/// Least time between two stored progress updates of one job.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A live preview frame of a running job, relayed as it comes, never stored.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The job.
    pub job_id: String,
    /// `jpeg` or `png`.
    pub format: &'static str,
    /// The image bytes.
    pub image: bytes::Bytes,
}

/// Progress not yet stored, and when the job's last one was.
struct Pending {
    token: i64,
    written: Option<Instant>,
    value: Option<Value>,
}

/// One worker's progress bookkeeping.
pub(super) struct ProgressBook {
    shared: Arc<Shared>,
    pending: HashMap<String, Pending>,
}

/// A graph's node ids and their types (`"3"` → `"KSampler"`).
pub(super) type NodeTypes = HashMap<String, String>;

/// The node types of a graph (API format).
///
/// Why: ComfyUI's progress names a node by its id, which means nothing to
/// someone watching a job; its type (`KSampler`, `VAEDecode`) does.
pub(super) fn node_types(graph: &Value) -> NodeTypes {
    graph
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(id, node)| Some((id.clone(), node["class_type"].as_str()?.to_string())))
        .collect()
}

/// What a progress message says: a node started, or a step of it.
pub(super) enum Step {
    /// A node started (its steps are not known yet).
    Node(String),
    /// A step of a node.
    Value {
        node: Option<String>,
        value: f64,
        max: f64,
    },
}

impl ProgressBook {
    pub(super) fn new(shared: Arc<Shared>) -> ProgressBook {
        ProgressBook {
            shared,
            pending: HashMap::new(),
        }
    }

    /// Whether some progress waits to be stored (an idle worker then has no
    /// timer to wake for).
    pub(super) fn has_pending(&self) -> bool {
        self.pending.values().any(|p| p.value.is_some())
    }

    /// Keeps the live progress in memory, and stores it at most every
    /// `PROGRESS_EVERY` per job.
    /// `nodes` names the node's type beside its id (`node_type`).
    pub(super) async fn set(&mut self, job_id: &str, token: i64, step: Step, nodes: &NodeTypes) {
        let merged = {
            let mut map = self.shared.progress.lock().expect("progress");
            let entry = map.entry(job_id.to_string()).or_insert_with(|| json!({}));
            if let Some(e) = entry.as_object_mut() {
                let node = match step {
                    Step::Node(node) => {
                        e.remove("value");
                        e.remove("max");
                        Some(node)
                    }
                    Step::Value { node, value, max } => {
                        e.insert("value".into(), json!(value));
                        e.insert("max".into(), json!(max));
                        node
                    }
                };
                match node.as_ref().and_then(|n| nodes.get(n)) {
                    Some(t) => e.insert("node_type".into(), json!(t)),
                    None => e.remove("node_type"),
                };
                e.insert("node".into(), json!(node));
            }
            entry.clone()
        };
        let state = self.pending.entry(job_id.to_string()).or_insert(Pending {
            token,
            written: None,
            value: None,
        });
        state.token = token;
        // The first value waits one period too: a job shorter than that
        // needs no progress rows, its end says it all.
        let written = *state.written.get_or_insert_with(Instant::now);
        if written.elapsed() < PROGRESS_EVERY {
            state.value = Some(merged);
            return;
        }
        state.written = Some(Instant::now());
        state.value = None;
        self.store(job_id, token, merged).await;
    }

    async fn store(&self, job_id: &str, token: i64, value: Value) {
        if let Err(e) = self
            .shared
            .store
            .record_progress(job_id, token, value)
            .await
        {
            // Progress is a courtesy: the live value is still in memory.
            tracing::debug!(job_id, error = %e, "progress not stored");
        }
    }

    /// Stores progress held back by the rate limit.
    pub(super) async fn flush(&mut self) {
        let due: Vec<(String, i64, Value)> = self
            .pending
            .iter_mut()
            .filter(|(_, s)| {
                s.value.is_some() && s.written.is_none_or(|w| w.elapsed() >= PROGRESS_EVERY)
            })
            .filter_map(|(id, s)| {
                s.written = Some(Instant::now());
                Some((id.clone(), s.token, s.value.take()?))
            })
            .collect();
        for (job_id, token, value) in due {
            self.store(&job_id, token, value).await;
        }
    }

    /// The job's run ended: progress held back by the rate limit is not
    /// stored any more (its end says it all). Its finish may take a while
    /// (outputs to fetch, a busy writer): flushed then, it was a write per
    /// job that found the job no longer running (848 of 1,000 jobs on a
    /// farm of 1,000, `docs/PERFORMANCE.md`).
    pub(super) fn ended(&mut self, job_id: &str) {
        self.pending.remove(job_id);
    }

    /// The job left this backend: its live progress goes.
    pub(super) fn forget(&mut self, job_id: &str) {
        self.shared
            .progress
            .lock()
            .expect("progress")
            .remove(job_id);
        self.pending.remove(job_id);
    }

    /// Relays a preview frame of `job_id` to live subscribers.
    pub(super) fn relay(&self, job_id: &str, preview: crate::comfy::Preview) {
        if self.shared.previews.receiver_count() == 0 {
            return;
        }
        let _ = self.shared.previews.send(Preview {
            job_id: job_id.to_string(),
            format: preview.format,
            image: preview.image,
        });
    }
}
