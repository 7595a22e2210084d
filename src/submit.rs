//! Submitting a job: check the manifest, bind its parameters, check it can
//! run on this farm, store it, wake the dispatchers.
//!
//! Why one function for every front door: HTTP (`POST /api/job`), the inbox
//! folder and the dashboard's form must accept and refuse exactly the same
//! manifests with the same words, so they all call [`Submitter::submit`].
//! Its error type says what went wrong in terms any front door can render
//! (the API as a status and JSON body, the inbox as an `.error.json` file).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::Config;
use crate::dispatch::Farm;
use crate::manifest;
use crate::store::{JobStatus, Store, StoreError, SubmitOutcome};
use crate::workflows::{BindError, Catalog};

/// Why a manifest was not stored. Nothing is stored in any of these cases.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// A field or parameter is wrong (`field` names it when there is one).
    #[error("{message}")]
    Invalid {
        /// Dotted path of the field at fault (`parameters.width`).
        field: Option<String>,
        /// What is wrong, for a person (starts with the field when there is one).
        message: String,
    },
    /// A job it starts from is named by an idempotency key no stored job
    /// has (yet: the inbox waits a while for it, as a drop's files come in
    /// any order).
    #[error("{message}")]
    UnknownKey {
        /// The field that named it.
        field: String,
        /// For a person (starts with the field).
        message: String,
    },
    /// The idempotency key was used before with another manifest.
    #[error("{0}")]
    Conflict(String),
    /// The database cannot take it now (full disk, shutting down, broken).
    #[error("{message}")]
    Unavailable {
        /// `storage_full`, `shutting_down` or `database_unavailable`.
        code: &'static str,
        /// For a person.
        message: String,
    },
}

impl SubmitError {
    /// The HTTP status a front door answers with.
    pub fn status(&self) -> u16 {
        match self {
            SubmitError::Invalid { .. } | SubmitError::UnknownKey { .. } => 422,
            SubmitError::Conflict(_) => 409,
            SubmitError::Unavailable { .. } => 503,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::Invalid { .. } | SubmitError::UnknownKey { .. } => "validation_failed",
            SubmitError::Conflict(_) => "conflict",
            SubmitError::Unavailable { code, .. } => code,
        }
    }

    /// The field at fault.
    pub fn field(&self) -> Option<&str> {
        match self {
            SubmitError::Invalid { field, .. } => field.as_deref(),
            SubmitError::UnknownKey { field, .. } => Some(field),
            _ => None,
        }
    }

    /// A `422` for a field.
    pub fn invalid(field: &str, message: impl Into<String>) -> SubmitError {
        SubmitError::from(BindError {
            field: field.to_string(),
            message: message.into(),
        })
    }
}

impl From<BindError> for SubmitError {
    fn from(e: BindError) -> Self {
        if e.field.is_empty() {
            SubmitError::Invalid {
                field: None,
                message: e.message,
            }
        } else {
            SubmitError::Invalid {
                message: format!("{}: {}", e.field, e.message),
                field: Some(e.field),
            }
        }
    }
}

impl From<StoreError> for SubmitError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => SubmitError::Conflict(m),
            StoreError::Full => SubmitError::Unavailable {
                code: "storage_full",
                message: "the database disk is full; nothing was stored. Free space and retry"
                    .into(),
            },
            StoreError::Closed => SubmitError::Unavailable {
                code: "shutting_down",
                message: "the service is stopping; retry in a moment".into(),
            },
            other if other.locked() => {
                tracing::error!(error = %other, "the database is locked by another program");
                SubmitError::Unavailable {
                    code: "database_unavailable",
                    message: StoreError::LOCKED.into(),
                }
            }
            other => {
                tracing::error!(error = %other, "database error on submit");
                SubmitError::Unavailable {
                    code: "database_unavailable",
                    message: format!("the database is not usable: {other}"),
                }
            }
        }
    }
}

/// Backends a refusal names at most: on a farm of a thousand, the message
/// would otherwise be a thousand ids long.
const NAMED_AT_MOST: usize = 8;

/// The backends a graph was checked against, as a refusal says it.
fn checked_list(ids: &[String]) -> String {
    match ids.len() {
        n if n <= NAMED_AT_MOST => ids.join(", "),
        n => format!(
            "{} and {} more",
            ids[..NAMED_AT_MOST].join(", "),
            n - NAMED_AT_MOST
        ),
    }
}

/// A `422` from a backend's refusal: the field a client set (the template
/// parameter, or the inline graph's input), and what is wrong in words.
fn refusal_error(
    parsed: &manifest::Parsed,
    r: &crate::comfy::graph::Refusal,
    checked: &str,
) -> SubmitError {
    let graph = &parsed.job.graph;
    let first = r
        .node_errors
        .iter()
        .min_by_key(|(id, _)| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));
    let (field, what) = match first {
        Some((node, entry)) => {
            let class = entry["class_type"].as_str().unwrap_or("?");
            let e = &entry["errors"][0];
            let input = e["extra_info"]["input_name"].as_str().unwrap_or("");
            let what = match e["type"].as_str() {
                Some("value_not_in_list") => format!(
                    "no enabled backend has `{}` for {input}",
                    e["extra_info"]["received_value"].as_str().unwrap_or("?")
                ),
                _ => format!(
                    "{} ({})",
                    e["message"].as_str().unwrap_or("invalid"),
                    e["details"].as_str().unwrap_or("")
                ),
            };
            (
                parsed.field_of(node, input),
                format!("node {node} ({class}): {what}"),
            )
        }
        None => {
            // A refusal of the whole graph: an unknown node class (or no output).
            let details = r.error["details"].as_str().unwrap_or("");
            let node = details
                .trim_start_matches("Node ID '#")
                .trim_end_matches('\'');
            let class = graph[node]["class_type"].as_str();
            match class {
                Some(class) if !node.is_empty() => (
                    parsed
                        .job
                        .workflow_id
                        .is_none()
                        .then(|| format!("workflow.{node}.class_type")),
                    format!("node {node}: no enabled backend has the node class `{class}`"),
                ),
                _ => (
                    None,
                    r.error["message"]
                        .as_str()
                        .unwrap_or("the graph is invalid")
                        .to_string(),
                ),
            }
        }
    };
    let message = format!("{what} (checked: {checked})");
    match (field, parsed.job.workflow_id.as_deref()) {
        (Some(f), _) => SubmitError::invalid(&f, message),
        (None, Some(id)) => SubmitError::invalid(
            "workflow_id",
            format!("workflow `{id}` cannot run on this farm: {message}"),
        ),
        // An inline graph refused as a whole (no output node, say).
        (None, None) => SubmitError::invalid(
            "workflow",
            format!("the workflow cannot run on this farm: {message}"),
        ),
    }
}

/// A stored job (or the earlier one with the same idempotency key).
#[derive(Debug, Clone)]
pub struct Submitted {
    /// A new job was stored (`false`: an earlier one with the same key and manifest).
    pub created: bool,
    /// Its id.
    pub job_id: String,
    /// Its status now.
    pub status: JobStatus,
    /// When it was stored.
    pub submitted_at: DateTime<Utc>,
    /// Things accepted but worth telling (ignored fields).
    pub warnings: Vec<String>,
    /// A new job stored paused.
    pub paused: bool,
    /// Stored paused because the farm holds its batch (field, batch).
    pub held_with: Option<(String, String)>,
    /// A new job stored to start at this time, still to come.
    pub starts_at: Option<DateTime<Utc>>,
}

/// What submitting needs. Cheap to clone.
#[derive(Clone)]
pub struct Submitter {
    /// The database.
    pub store: Store,
    /// Workflow templates.
    pub catalog: Arc<Catalog>,
    /// Settings.
    pub config: Arc<Config>,
    /// Woken when a job is stored.
    pub farm: Farm,
}

impl Submitter {
    /// Checks, binds and stores one manifest. A `Ok` means it is on disk.
    pub async fn submit(&self, manifest: Value) -> Result<Submitted, SubmitError> {
        if let Some(id) = manifest.get("workflow_id").and_then(Value::as_str) {
            if self.catalog.should_rescan_for(id) {
                self.catalog.reload_async().await;
            }
        }
        let mut parsed = manifest::parse(
            manifest,
            &self.catalog,
            self.config.dispatch.default_max_attempts,
        )?;
        parsed.job.share = crate::store::share_of(
            &parsed.job.metadata,
            self.config.dispatch.share_by.as_deref(),
        );
        self.look_up_keys(&mut parsed).await?;
        self.check_requires(&parsed.job.requires).await?;
        // Held until the job is stored or refused.
        let (_inputs, sizes) = self.check_inputs(&parsed).await?;
        self.check_parents(&parsed).await?;
        self.check_runs_somewhere(&parsed).await?;
        self.check_upload_limits(&parsed, &sizes).await?;
        // A batch the farm found broken: stored paused if still held
        // when it is written.
        parsed.job.hold = self.farm.held_batch_of(&parsed.job.metadata);
        let workflow_id = parsed.job.workflow_id.clone();
        let requires = parsed.job.requires.clone();
        let asked_paused = parsed.job.paused;
        let hold = parsed.job.hold.clone();
        let later = parsed.job.start_after.filter(|t| *t > Utc::now());
        let mut warnings = parsed.warnings;
        let mut held_with = None;
        let (created, summary) = match self.store.submit(parsed.job).await? {
            SubmitOutcome::Created(s) => {
                // A waiting one is rung for when its last parent completes,
                // a paused one when it is resumed, a later one at its time.
                if let Some(at) = later {
                    self.farm.job_due_at(at);
                } else if s.status == JobStatus::Queued && !s.paused {
                    self.farm.job_queued(&requires);
                }
                crate::metrics::submitted(workflow_id.as_deref());
                match hold.filter(|_| s.paused && !asked_paused) {
                    Some((field, batch)) => {
                        tracing::info!(job_id = %s.id, %batch, "job submitted paused: its batch is held");
                        warnings.push(format!(
                            "stored paused: the farm holds its batch ({field} {batch}), found failing \
                             job after job alike (its `paused` event says how); once it is mended: \
                             orchestrator resume --batch {batch}"
                        ));
                        held_with = Some((field, batch));
                    }
                    None => tracing::info!(job_id = %s.id, "job submitted"),
                }
                (true, s)
            }
            SubmitOutcome::Existing(s) => (false, s),
        };
        Ok(Submitted {
            created,
            job_id: summary.id,
            status: summary.status,
            submitted_at: summary.submitted_at,
            warnings,
            paused: created && summary.paused,
            held_with,
            starts_at: later.filter(|_| created),
        })
    }

    /// The graph must be one some enabled backend could run, as ComfyUI's
    /// own validation would judge it on that backend's inventory. While an
    /// enabled backend's inventory is not known (the farm was down since
    /// start), the job is accepted: it is checked when it is leased, and a
    /// farm outage never refuses work.
    async fn check_runs_somewhere(&self, parsed: &manifest::Parsed) -> Result<(), SubmitError> {
        let enabled = self
            .store
            .enabled_backends_with_tags(&parsed.job.requires)
            .await?;
        let Some(distinct) = self.farm.distinct_inventories(&enabled) else {
            return Ok(());
        };
        if distinct.is_empty() {
            return Ok(());
        }
        let rules = self.farm.rules();
        let mut first = None;
        // Identical boxes are checked once.
        for inventory in &distinct {
            match inventory.check(&parsed.job.graph, &rules) {
                Ok(()) => return Ok(()),
                Err(r) => {
                    first.get_or_insert(r);
                }
            }
        }
        Err(refusal_error(
            parsed,
            &first.expect("checked at least one"),
            &checked_list(&enabled),
        ))
    }

    /// A file larger than every enabled backend takes (ComfyUI's
    /// `--max-upload-size`, as each said it) could never reach one: refused
    /// now, naming its field, rather than left to wait all night. While an
    /// enabled backend has not said its limit, the job is accepted (leasing
    /// applies the same rule, `store::lease::bar_reason`).
    /// `sizes`: the job's stored inputs' sizes, by id.
    async fn check_upload_limits(
        &self,
        parsed: &manifest::Parsed,
        sizes: &HashMap<String, i64>,
    ) -> Result<(), SubmitError> {
        if parsed.inputs.is_empty() {
            return Ok(());
        }
        let enabled = self
            .store
            .enabled_backends_with_tags(&parsed.job.requires)
            .await?;
        let limits = self.store.upload_limits(&enabled).await?;
        let Some(said) = limits
            .iter()
            .map(|(id, limit)| limit.map(|l| (id, l)))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(());
        };
        let Some(largest) = said.iter().map(|(_, l)| *l).max() else {
            return Ok(());
        };
        for (field, id) in &parsed.inputs {
            let Some(&size) = sizes.get(id) else {
                continue;
            };
            if size + crate::store::UPLOAD_MARGIN_BYTES > largest {
                let mb = crate::inputs::megabytes;
                let each: Vec<String> = said
                    .iter()
                    .map(|(id, l)| format!("{id} {}", mb(*l)))
                    .collect();
                return Err(SubmitError::invalid(
                    field,
                    format!(
                        "input {id} is {}, larger than any enabled backend takes ({}: its ComfyUI's \
                         --max-upload-size); start one with a larger --max-upload-size (in MB), or give \
                         the job a smaller file",
                        mb(size),
                        each.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every input file the graph names must be stored: the job could
    /// never run otherwise. The answer holds them until the job is stored
    /// (no deletion takes them in between), and gives their sizes by id.
    async fn check_inputs(
        &self,
        parsed: &manifest::Parsed,
    ) -> Result<(crate::store::InputsNamed, HashMap<String, i64>), SubmitError> {
        // The job's distinct ids; each reference for the field to name.
        let ids = &parsed.job.inputs;
        let named = self.store.name_inputs(ids).await;
        let sizes = self.store.input_sizes(ids).await?;
        match parsed.inputs.iter().find(|(_, id)| !sizes.contains_key(id)) {
            None => Ok((named, sizes)),
            Some((field, id)) => Err(SubmitError::invalid(
                field,
                format!(
                    "input {id} is not stored here; upload the file with POST /api/inputs first"
                ),
            )),
        }
    }

    /// Puts the ids of the jobs it names by idempotency key (`job:key:`) in
    /// place, in the graph and its list of parents, so that from here on
    /// (the checks, the store, dispatch) a reference is a reference by id.
    async fn look_up_keys(&self, parsed: &mut manifest::Parsed) -> Result<(), SubmitError> {
        let readings: Vec<_> = parsed
            .parents
            .iter()
            .filter_map(|p| p.by_key.as_deref())
            .map(|rest| (rest.to_string(), crate::inputs::key_readings(rest)))
            .collect();
        if readings.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = readings
            .iter()
            .flat_map(|(_, r)| r.iter().map(|(k, _)| k.clone()))
            .collect();
        let found = self.store.jobs_by_keys(&keys).await?;
        // Each reference's text → the job and output it reads as.
        let mut resolved = HashMap::new();
        for (rest, readings) in readings {
            let hit = readings
                .into_iter()
                .find_map(|(key, name)| found.get(&key).map(|id| (id.clone(), name)));
            if let Some(hit) = hit {
                resolved.insert(rest, hit);
            }
        }
        for p in &mut parsed.parents {
            let Some(rest) = &p.by_key else { continue };
            match resolved.get(rest) {
                Some((id, name)) => (p.job, p.output) = (id.clone(), name.clone()),
                None => {
                    return Err(SubmitError::UnknownKey {
                        message: format!(
                            "{}: no job here has the idempotency key `{rest}` (submit the job it starts from first)",
                            p.field
                        ),
                        field: p.field.clone(),
                    })
                }
            }
        }
        let nodes = parsed.job.graph.as_object_mut().into_iter().flatten();
        for (_, node) in nodes {
            let inputs = node.get_mut("inputs").and_then(Value::as_object_mut);
            for v in inputs.into_iter().flat_map(|i| i.values_mut()) {
                let Some(rest) = v.as_str().and_then(crate::inputs::job_key_ref) else {
                    continue;
                };
                if let Some((id, name)) = resolved.get(rest) {
                    *v = Value::String(match name {
                        Some(n) => format!("{}{id}/{n}", crate::inputs::JOB_PREFIX),
                        None => format!("{}{id}", crate::inputs::JOB_PREFIX),
                    });
                }
            }
        }
        parsed.job.parents = manifest::parent_ids(&parsed.parents);
        Ok(())
    }

    /// Every job it starts from must be stored and able still to complete:
    /// a job waiting on one that failed would only fail in its turn. One
    /// that has completed must have the output named, still on disk: a
    /// wrong name or a file retention deleted is said now, not when the job
    /// runs.
    async fn check_parents(&self, parsed: &manifest::Parsed) -> Result<(), SubmitError> {
        let statuses = self.store.job_statuses(&parsed.job.parents).await?;
        for parent in &parsed.parents {
            let id = &parent.job;
            let problem = match statuses.get(id) {
                None => format!("job {id} is not known here (start from a job submitted to this orchestrator)"),
                Some(s @ (JobStatus::Failed | JobStatus::Cancelled)) => format!(
                    "job {id} is {s}; retry it first (POST /api/job/{id}/retry), then submit this one"
                ),
                Some(JobStatus::Completed) => {
                    let outputs = self.store.job_outputs(id).await?;
                    match crate::inputs::output_of_job(id, parent.output.as_deref(), &outputs) {
                        Ok(_) => continue,
                        Err(problem) => problem,
                    }
                }
                Some(_) => continue,
            };
            return Err(SubmitError::invalid(&parent.field, problem));
        }
        Ok(())
    }

    /// With a farm configured, a job that needs tags no backend has could
    /// never run: say so now rather than let it wait for ever.
    async fn check_requires(&self, requires: &[String]) -> Result<(), SubmitError> {
        let backends = &self.config.backends;
        if backends.is_empty() || requires.is_empty() {
            return Ok(());
        }
        if !self.store.backends_with_tags(requires).await?.is_empty() {
            return Ok(());
        }
        let farm = backends
            .iter()
            .map(|b| format!("{} {:?}", b.id, b.tags))
            .collect::<Vec<_>>()
            .join(", ");
        Err(SubmitError::Invalid {
            field: Some("requires".into()),
            message: format!(
                "no configured backend has all of the tags {requires:?} (backends: {farm})"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_a_few_of_the_backends_checked_and_counts_the_rest() {
        let ids = |n: usize| (0..n).map(|i| format!("gpu{i}")).collect::<Vec<_>>();
        assert_eq!(checked_list(&ids(2)), "gpu0, gpu1");
        assert_eq!(checked_list(&ids(8)), ids(8).join(", "));
        assert_eq!(
            checked_list(&ids(1000)),
            "gpu0, gpu1, gpu2, gpu3, gpu4, gpu5, gpu6, gpu7 and 992 more"
        );
    }
}
