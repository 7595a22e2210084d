//! The job manifest: what clients submit, checked field by field.
//!
//! Why by hand rather than a serde derive: every problem must come back as a
//! `422` that names the field (`parameters.width`, `max_attempts`) in a
//! sentence a person can act on, and the shape the earlier Python server
//! accepted (`workflow_id`, `parameters`, `metadata`, nothing else) must keep
//! working unchanged. Unknown top-level fields are accepted with a warning in
//! the answer, as the earlier server ignored them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::store::NewJob;
use crate::workflows::{validate_graph, BindError, Catalog};

/// The priorities a job may have: higher runs first. One range for the
/// manifest and for a change later (`POST /api/job/{id}/priority`).
pub const PRIORITIES: std::ops::RangeInclusive<i64> = -1000..=1000;

/// The manifest as documented (the parser below reads it from raw JSON).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "workflow_id": "image_blur",
    "parameters": {"width": 640, "blur_radius": 9},
    "metadata": {"source": "storyboard", "shot": "sc01_sh010"},
    "priority": 0,
    "idempotency_key": "storyboard-sc01_sh010-v3"
}))]
pub struct JobManifest {
    /// Template id; give this or `workflow`.
    pub workflow_id: Option<String>,
    /// Values of the template's parameters.
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// Free-form fields kept with the job and filterable (`metadata.shot=...`).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// Higher runs first (default 0, between -1000 and 1000).
    pub priority: Option<i64>,
    /// Submitting again with the same key returns the first job.
    pub idempotency_key: Option<String>,
    /// Backend tags the job needs.
    pub requires: Option<Vec<String>>,
    /// Run-time failures allowed before the job fails (1 to 100).
    pub max_attempts: Option<u32>,
    /// An inline ComfyUI API-format graph instead of `workflow_id`.
    #[schema(value_type = Option<Object>)]
    pub workflow: Option<Value>,
    /// URL to POST a summary to when the job ends.
    pub callback_url: Option<String>,
    /// Longest a run may take on a backend, in seconds (1 to 604800);
    /// default: the template's, else `dispatch.job_timeout_s`.
    pub timeout_s: Option<u32>,
    /// Store it paused: it keeps its place in the queue, but no backend
    /// takes it until `POST /api/job/{id}/resume` (a batch submitted by day
    /// and let go at night).
    pub paused: Option<bool>,
    /// No backend takes it before this time (RFC 3339): a batch submitted
    /// by day starts by itself at night.
    pub start_after: Option<String>,
}

const KNOWN: [&str; 12] = [
    "workflow_id",
    "parameters",
    "metadata",
    "priority",
    "idempotency_key",
    "requires",
    "max_attempts",
    "workflow",
    "callback_url",
    "timeout_s",
    "paused",
    "start_after",
];

/// A manifest turned into a job, with warnings for the client.
#[derive(Debug)]
pub struct Parsed {
    /// The job to store.
    pub job: NewJob,
    /// Things accepted but worth telling (ignored fields).
    pub warnings: Vec<String>,
    /// The input files the graph names, each with the field that named it.
    pub inputs: Vec<(String, String)>,
    /// The jobs whose outputs it starts from, each as the field that named
    /// it (`job:<id>` values) gave it.
    pub parents: Vec<ParentRef>,
    /// The template it was bound from, so later checks name the parameter
    /// (`parameters.NAME`) a graph input came from (looked up only then).
    pub template: Option<std::sync::Arc<crate::workflows::Template>>,
}

impl Parsed {
    /// The field a client set for `node.inputs.input`: the template
    /// parameter it came from, else the inline graph's input; `None` for a
    /// template's own constant.
    pub fn field_of(&self, node: &str, input: &str) -> Option<String> {
        if let Some(p) = self
            .template
            .as_ref()
            .and_then(|t| t.param_for(node, input))
        {
            return Some(format!("parameters.{}", p.name));
        }
        self.job
            .workflow_id
            .is_none()
            .then(|| format!("workflow.{node}.inputs.{input}"))
    }
}

fn err(field: &str, message: impl Into<String>) -> BindError {
    BindError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn opt_object(m: &Map<String, Value>, field: &str) -> Result<Map<String, Value>, BindError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o.clone()),
        Some(_) => Err(err(field, "must be an object")),
    }
}

fn opt_string(
    m: &Map<String, Value>,
    field: &str,
    max_len: usize,
) -> Result<Option<String>, BindError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Err(err(field, "must not be empty")),
        Some(Value::String(s)) if s.len() > max_len => {
            Err(err(field, format!("must be at most {max_len} characters")))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn opt_int(
    m: &Map<String, Value>,
    field: &str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, BindError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            Some(n) => Err(err(
                field,
                format!("must be between {min} and {max}, got {n}"),
            )),
            None => Err(err(field, "must be an integer")),
        },
    }
}

/// Parses and binds a manifest. `default_max_attempts` comes from the config.
pub fn parse(
    body: Value,
    catalog: &Catalog,
    default_max_attempts: u32,
) -> Result<Parsed, BindError> {
    let Value::Object(m) = &body else {
        return Err(err("", "the manifest must be a JSON object"));
    };
    let mut warnings = Vec::new();
    for key in m.keys() {
        if !KNOWN.contains(&key.as_str()) {
            warnings.push(format!("unknown field `{key}` was ignored"));
        }
    }
    let workflow_id = opt_string(m, "workflow_id", 200)?;
    let parameters = opt_object(m, "parameters")?;
    let metadata = opt_object(m, "metadata")?;
    let inline = match m.get("workflow") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.clone()),
    };
    let mut template_timeout = None;
    let mut bound_from = None;
    let inputs;
    let parents: Vec<ParentRef>;
    let (workflow_id, graph, bound) = match (workflow_id, inline) {
        (Some(_), Some(_)) => {
            return Err(err(
                "workflow",
                "give either `workflow_id` or `workflow`, not both",
            ))
        }
        // The body of ComfyUI's own `POST /prompt`, sent here as it is:
        // say where its graph goes rather than ask for a template.
        (None, None) if m.get("prompt").is_some_and(Value::is_object) => return Err(err(
            "prompt",
            "this is the body of ComfyUI's own POST /prompt; send its graph here as `workflow` \
                 ({\"workflow\": {…the API-format graph…}}), or name a template as `workflow_id`",
        )),
        (None, None) => {
            return Err(err(
                "workflow_id",
                "is required (or give an inline API-format graph as `workflow`)",
            ))
        }
        (Some(id), None) => {
            let template = catalog.get(&id).ok_or_else(|| {
                let (known, _) = catalog.list();
                let known = known
                    .iter()
                    .map(|t| t.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                err(
                    "workflow_id",
                    format!("unknown workflow `{id}` (known: {known})"),
                )
            })?;
            let (graph, bound) = template.bind(&parameters)?;
            check_file_names(&graph, |node, input| {
                template
                    .param_for(node, input)
                    .map(|p| format!("parameters.{}", p.name))
            })?;
            template_timeout = template.timeout_s;
            (inputs, parents) = input_refs(&graph, |node, input| {
                template
                    .param_for(node, input)
                    .map(|p| format!("parameters.{}", p.name))
            })?;
            bound_from = Some(template);
            (Some(id), graph, bound)
        }
        (None, Some(graph)) => {
            validate_graph(&graph)?;
            check_file_names(&graph, |_, _| None)?;
            (inputs, parents) = input_refs(&graph, |_, _| None)?;
            if !parameters.is_empty() {
                return Err(err(
                    "parameters",
                    "parameters apply to templates; an inline `workflow` carries its own values",
                ));
            }
            (None, graph, Value::Object(Map::new()))
        }
    };
    let priority = opt_int(m, "priority", *PRIORITIES.start(), *PRIORITIES.end())?.unwrap_or(0);
    let max_attempts = opt_int(m, "max_attempts", 1, 100)?
        .map(|n| n as u32)
        .unwrap_or(default_max_attempts);
    let idempotency_key = opt_string(m, "idempotency_key", 256)?;
    let start_after = match m.get("start_after") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(crate::store::parse_time)
                .ok_or_else(|| {
                    err(
                        "start_after",
                        format!("must be an RFC 3339 time such as 2026-12-07T20:00:00Z, got {v}"),
                    )
                })?,
        ),
    };
    let paused = match m.get("paused") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err("paused", "must be true or false")),
    };
    let requires = match m.get("requires") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
                _ => Err(err(&format!("requires[{i}]"), "must be a non-empty string")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(err("requires", "must be an array of tag strings")),
    };
    let timeout_s = opt_int(m, "timeout_s", 1, 604_800)?.or(template_timeout);
    let callback_url = opt_string(m, "callback_url", 2000)?;
    if let Some(url) = &callback_url {
        match reqwest::Url::parse(url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => return Err(err("callback_url", "must be an http:// or https:// URL")),
        }
    }
    let manifest_hash = {
        // serde_json's map is ordered by key, so equal manifests hash equally.
        let mut h = Sha256::new();
        h.update(body.to_string().as_bytes());
        format!("{:x}", h.finalize())
    };
    // What a backend that ran it keeps loaded: its checkpoint; else, for a
    // graph that loads other model files (a LoRA stack, an upscaler, a
    // custom loader), its template stands for them; a graph that names no
    // model file keeps nothing loaded, and any busy backend may take it.
    let affinity = crate::inventory::main_model(&graph).or_else(|| {
        workflow_id
            .as_ref()
            .filter(|_| crate::inventory::names_model_files(&graph))
            .map(|w| format!("workflow:{w}"))
    });
    Ok(Parsed {
        job: NewJob {
            affinity,
            id: uuid::Uuid::now_v7().to_string(),
            workflow_id,
            priority,
            requires,
            max_attempts,
            idempotency_key,
            manifest_hash,
            manifest: body,
            parameters: bound,
            metadata,
            graph,
            callback_url,
            timeout_s,
            inputs: distinct(&inputs),
            parents: parent_ids(&parents),
            paused,
            start_after,
            share: None,
            hold: None,
        },
        warnings,
        inputs,
        parents,
        template: bound_from,
    })
}

/// A value a graph names, with the field it came from: `(field, value)`.
type FieldRef = (String, String);

/// One `job:` reference of a graph: which job's output, and the field that
/// named it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentRef {
    /// `parameters.NAME`, or `workflow.NODE.inputs.INPUT`.
    pub field: String,
    /// The job whose output it starts from (empty until its key is looked
    /// up, for a reference by key).
    pub job: String,
    /// The output named (`job:<id>/<name>`), or none: its first picture.
    pub output: Option<String>,
    /// For a reference by key (`job:key:…`): the text after the prefix.
    pub by_key: Option<String>,
}

/// The jobs named, each once, in order: what the job stores (a reference by
/// key counts once its key is looked up).
pub fn parent_ids(parents: &[ParentRef]) -> Vec<String> {
    let ids: Vec<FieldRef> = parents
        .iter()
        .filter(|p| !p.job.is_empty())
        .map(|p| (p.field.clone(), p.job.clone()))
        .collect();
    distinct(&ids)
}

/// The values named, each once, in order: what the job stores.
fn distinct(refs: &[FieldRef]) -> Vec<String> {
    let mut values: Vec<String> = refs.iter().map(|(_, v)| v.clone()).collect();
    values.sort();
    values.dedup();
    values
}

/// The input files a graph names: every input value that is an input id
/// (`sha256:<hex>`), and the jobs whose outputs it starts from (`job:<id>`,
/// `job:<id>/<output name>`; the job's id), each with the field it came from
/// (`field_of` names the template parameter, when one did). A value that
/// starts like either but is not one is a mistake worth a `422`.
fn input_refs(
    graph: &Value,
    field_of: impl Fn(&str, &str) -> Option<String>,
) -> Result<(Vec<FieldRef>, Vec<ParentRef>), BindError> {
    let (mut files, mut jobs) = (Vec::new(), Vec::new());
    for (node, body) in graph.as_object().into_iter().flatten() {
        for (input, v) in body["inputs"].as_object().into_iter().flatten() {
            let Some(s) = v.as_str() else {
                continue;
            };
            let field = || {
                field_of(node, input).unwrap_or_else(|| format!("workflow.{node}.inputs.{input}"))
            };
            if crate::inputs::looks_like_id(s) {
                if crate::inputs::hex_of(s).is_none() {
                    return Err(err(
                        &field(),
                        format!("`{s}` is not an input id (sha256: and 64 lowercase hex digits)"),
                    ));
                }
                files.push((field(), s.to_string()));
            } else if let Some(rest) = crate::inputs::job_key_ref(s) {
                jobs.push(ParentRef {
                    field: field(),
                    job: String::new(),
                    output: None,
                    by_key: Some(rest.to_string()),
                });
            } else if crate::inputs::looks_like_job_ref(s) {
                let Some((job, output)) = crate::inputs::job_ref(s) else {
                    return Err(err(
                        &field(),
                        format!(
                            "`{s}` is not a job's output (job:<job id>, job:<job id>/<output name>, or job:key:<its idempotency key>)"
                        ),
                    ));
                };
                jobs.push(ParentRef {
                    field: field(),
                    job,
                    output,
                    by_key: None,
                });
            }
        }
    }
    Ok((files, jobs))
}

/// Inputs whose value ComfyUI turns into a path under its output folder.
const FILE_NAME_INPUTS: [&str; 1] = ["filename_prefix"];

/// Why ComfyUI would refuse this output name later, if it would: it saves
/// only inside its output folder, and its `/view` refuses such names, so
/// the job could never deliver.
fn file_name_problem(name: &str) -> Option<&'static str> {
    let bytes = name.as_bytes();
    if name.starts_with('/') || (bytes.len() >= 2 && bytes[1] == b':') {
        Some("must be a relative name inside ComfyUI's output folder, not an absolute path")
    } else if name.split('/').any(|part| part == "..") {
        Some("must not contain `..`")
    } else if name.contains('\\') {
        Some("must not contain a backslash (use `/` between folders)")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    }
}

/// Checks every output-name input of the graph; `field_of(node, input)`
/// names the template parameter the value came from, when it did.
fn check_file_names(
    graph: &Value,
    field_of: impl Fn(&str, &str) -> Option<String>,
) -> Result<(), BindError> {
    let Some(nodes) = graph.as_object() else {
        return Ok(());
    };
    for (node, body) in nodes {
        for input in FILE_NAME_INPUTS {
            let Some(name) = body["inputs"][input].as_str() else {
                continue;
            };
            if let Some(problem) = file_name_problem(name) {
                let field = field_of(node, input)
                    .unwrap_or_else(|| format!("workflow.{node}.inputs.{input}"));
                return Err(err(&field, format!("{problem} (got {name:?})")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn catalog() -> Catalog {
        Catalog::load(Path::new("/nonexistent"))
    }

    #[test]
    fn the_python_clients_shape_is_accepted() {
        let body = json!({"workflow_id": "image_blur", "parameters": {"width": 256}, "metadata": {"source": "storyboard"}});
        let p = parse(body, &catalog(), 3).unwrap();
        assert_eq!(p.job.max_attempts, 3);
        assert_eq!(p.job.graph["1"]["inputs"]["width"], 256);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn a_job_keeps_loaded_its_checkpoint_or_its_template_and_a_graph_without_models_nothing() {
        let blur = json!({"workflow_id": "image_blur", "parameters": {"width": 256}});
        assert_eq!(parse(blur, &catalog(), 3).unwrap().job.affinity, None);
        let xl = json!({"workflow_id": "txt2img_sdxl", "parameters": {"prompt": "a fox"}});
        let affinity = parse(xl, &catalog(), 3).unwrap().job.affinity.unwrap();
        assert!(affinity.ends_with(".safetensors"), "{affinity}");
    }

    #[test]
    fn each_bad_field_is_named() {
        let c = catalog();
        let cases = [
            (json!([1]), ""),
            (json!({}), "workflow_id"),
            (json!({"workflow_id": "nope"}), "workflow_id"),
            (
                json!({"workflow_id": "image_blur", "priority": "high"}),
                "priority",
            ),
            (
                json!({"workflow_id": "image_blur", "max_attempts": 0}),
                "max_attempts",
            ),
            (
                json!({"workflow_id": "image_blur", "requires": [1]}),
                "requires[0]",
            ),
            (
                json!({"workflow_id": "image_blur", "metadata": 5}),
                "metadata",
            ),
            (
                json!({"workflow_id": "image_blur", "callback_url": "ftp://x"}),
                "callback_url",
            ),
            (
                json!({"workflow": {"1": {"inputs": {}}}}),
                "workflow.1.class_type",
            ),
            (
                json!({"workflow_id": "image_blur", "workflow": {}}),
                "workflow",
            ),
            (
                json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}}, "client_id": "x"}),
                "prompt",
            ),
        ];
        for (body, field) in cases {
            let e = parse(body.clone(), &c, 3).unwrap_err();
            assert_eq!(e.field, field, "{body}: {}", e.message);
        }
    }

    #[test]
    fn output_names_comfyui_would_refuse_are_named_at_submit() {
        let c = catalog();
        for bad in ["/etc/x", "../up", "a/../../b", "a\\b", "C:/x", "a\u{7}b"] {
            let body = json!({"workflow_id": "image_blur", "parameters": {"filename_prefix": bad}});
            let e = parse(body, &c, 3).unwrap_err();
            assert_eq!(
                e.field, "parameters.filename_prefix",
                "{bad}: {}",
                e.message
            );
        }
        let inline = json!({"workflow": {"9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../x"}}}});
        let e = parse(inline, &c, 3).unwrap_err();
        assert_eq!(e.field, "workflow.9.inputs.filename_prefix");
        let fine = json!({"workflow_id": "image_blur", "parameters": {"filename_prefix": "shots/sc01..v2/x"}});
        assert!(parse(fine, &c, 3).is_ok());
    }

    #[test]
    fn equal_manifests_hash_equally_whatever_the_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"workflow_id":"image_blur","metadata":{"a":1,"b":2}}"#)
                .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"metadata":{"b":2,"a":1},"workflow_id":"image_blur"}"#)
                .unwrap();
        let c = catalog();
        assert_eq!(
            parse(a, &c, 3).unwrap().job.manifest_hash,
            parse(b, &c, 3).unwrap().job.manifest_hash
        );
    }
}
