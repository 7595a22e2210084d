//! Workflow templates and parameter binding.
//!
//! Why: artists' tools send a workflow id and a few named values, not a
//! ComfyUI graph. A template is a graph exported from ComfyUI with "Save
//! (API)" plus a small YAML declaration of its parameters (type, default,
//! bounds or choices, and where each goes in the graph). Binding happens at
//! submit time, so a wrong value is a `422` naming the parameter, never a job
//! that fails at 3 a.m. on a backend. Built-in templates are embedded in the
//! binary; the configured folder adds to them (a folder template with a
//! built-in's id replaces it). See `docs/workflows.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "image_blur",
        include_str!("builtin/image_blur.json"),
        include_str!("builtin/image_blur.yaml"),
    ),
    (
        "txt2img_sdxl",
        include_str!("builtin/txt2img_sdxl.json"),
        include_str!("builtin/txt2img_sdxl.yaml"),
    ),
    (
        "image_invert",
        include_str!("builtin/image_invert.json"),
        include_str!("builtin/image_invert.yaml"),
    ),
    (
        "img2img_sdxl",
        include_str!("builtin/img2img_sdxl.json"),
        include_str!("builtin/img2img_sdxl.yaml"),
    ),
];

/// A problem with submitted values, named by the field at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct BindError {
    /// Dotted path of the field (`parameters.width`, `workflow_id`, `workflow.3`).
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl BindError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        BindError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A whole number.
    Int,
    /// Any number.
    Float,
    /// Text.
    String,
    /// `true` or `false`.
    Bool,
    /// A picture the job starts from: an input id (`sha256:<hex>`, from
    /// `POST /api/inputs`), uploaded to the backend before the job runs.
    Image,
    /// A mask picture, as `image`.
    Mask,
}

/// Where a value goes: `NODE.inputs.FIELD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Target {
    /// Node id in the graph.
    pub node: String,
    /// Input name of that node.
    pub input: String,
}

/// One declared parameter.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Param {
    /// Name used in `parameters`.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Value used when the manifest leaves it out.
    #[schema(value_type = Option<Object>)]
    pub default: Option<Value>,
    /// Smallest allowed number.
    pub min: Option<f64>,
    /// Largest allowed number.
    pub max: Option<f64>,
    /// The only allowed values.
    #[schema(value_type = Option<Vec<Object>>)]
    pub choices: Option<Vec<Value>>,
    /// Must the manifest give it?
    pub required: bool,
    /// For people.
    pub description: Option<String>,
    /// Where it goes in the graph.
    pub targets: Vec<Target>,
    /// The values the farm's backends offer for the input it sets (model
    /// files, samplers, …), from their inventories: what a form lists.
    /// Filled when the catalogue is served; absent for a free value.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub options: Option<Vec<serde_json::Value>>,
}

/// A workflow template.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Template {
    /// The id clients use as `workflow_id`.
    pub id: String,
    /// For people.
    pub description: Option<String>,
    /// `builtin` or the file it came from.
    pub source: String,
    /// Declared parameters, in declaration order.
    pub parameters: Vec<Param>,
    /// Longest a run of this workflow may take, in seconds, unless the
    /// manifest says (`timeout_s`).
    pub timeout_s: Option<i64>,
    /// The API-format graph with default values.
    #[serde(skip)]
    pub graph: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Declaration {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    timeout_s: Option<i64>,
    #[serde(default)]
    parameters: serde_yaml_ng::Mapping,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamDecl {
    #[serde(rename = "type")]
    ty: ParamType,
    #[serde(default)]
    default: Option<Value>,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default)]
    choices: Option<Vec<Value>>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    description: Option<String>,
    target: OneOrMany,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.len() > 40 => {
            format!("string \"{}...\"", &s[..s.floor_char_boundary(40)])
        }
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl Param {
    /// Checks one value against the declaration.
    fn check(&self, v: &Value) -> Result<(), String> {
        let type_ok = match self.ty {
            ParamType::Int => v.is_i64() || v.is_u64(),
            ParamType::Float => v.is_number(),
            ParamType::String => v.is_string(),
            ParamType::Bool => v.is_boolean(),
            ParamType::Image | ParamType::Mask => v.as_str().is_some_and(|s| {
                crate::inputs::hex_of(s).is_some()
                    || crate::inputs::job_ref(s).is_some()
                    || crate::inputs::job_key_ref(s).is_some()
            }),
        };
        if !type_ok {
            let want = match self.ty {
                ParamType::Int => "an integer",
                ParamType::Float => "a number",
                ParamType::String => "a string",
                ParamType::Bool => "true or false",
                ParamType::Image | ParamType::Mask => {
                    "an input id (sha256:<64 hex>, from POST /api/inputs) or another job's output (job:<job id>, or job:key:<its idempotency key>)"
                }
            };
            return Err(format!("must be {want}, got {}", describe(v)));
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = self.min {
                if n < min {
                    return Err(format!("must be at least {min}, got {n}"));
                }
            }
            if let Some(max) = self.max {
                if n > max {
                    return Err(format!("must be at most {max}, got {n}"));
                }
            }
        }
        if let Some(choices) = &self.choices {
            if !choices.contains(v) {
                let list = choices
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(format!("must be one of {list}, got {}", describe(v)));
            }
        }
        Ok(())
    }
}

impl Template {
    /// Parses a template from its graph and declaration texts, checking that
    /// every target exists in the graph and every default is valid.
    pub fn parse(
        id: &str,
        source: &str,
        graph: &str,
        declaration: Option<&str>,
    ) -> Result<Template, String> {
        let graph: Value =
            serde_json::from_str(graph).map_err(|e| format!("graph is not valid JSON: {e}"))?;
        validate_graph(&graph).map_err(|e| format!("{}: {}", e.field, e.message))?;
        let decl: Declaration = match declaration {
            Some(text) => serde_yaml_ng::from_str(text).map_err(|e| format!("declaration: {e}"))?,
            None => Declaration {
                description: None,
                timeout_s: None,
                parameters: Default::default(),
            },
        };
        let mut parameters = Vec::new();
        for (name, body) in decl.parameters {
            let name = name
                .as_str()
                .ok_or("declaration: parameter names must be strings")?
                .to_string();
            let p: ParamDecl = serde_yaml_ng::from_value(body)
                .map_err(|e| format!("declaration of parameter `{name}`: {e}"))?;
            let targets = match p.target {
                OneOrMany::One(t) => vec![t],
                OneOrMany::Many(ts) => ts,
            };
            let targets = targets
                .iter()
                .map(|t| parse_target(&graph, t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("parameter `{name}`: {e}"))?;
            if targets.is_empty() {
                return Err(format!("parameter `{name}`: needs at least one target"));
            }
            let param = Param {
                name: name.clone(),
                ty: p.ty,
                default: p.default,
                min: p.min,
                max: p.max,
                choices: p.choices,
                required: p.required,
                description: p.description,
                targets,
                options: None,
            };
            if let Some(d) = &param.default {
                param
                    .check(d)
                    .map_err(|e| format!("parameter `{name}`: default {e}"))?;
            }
            parameters.push(param);
        }
        if let Some(t) = decl.timeout_s {
            if !(1..=604_800).contains(&t) {
                return Err(format!("timeout_s must be between 1 and 604800, got {t}"));
            }
        }
        Ok(Template {
            id: id.to_string(),
            timeout_s: decl.timeout_s,
            description: decl.description.map(|d| d.trim().to_string()),
            source: source.to_string(),
            parameters,
            graph,
        })
    }

    /// The parameter whose value goes to `node.inputs.input`, if one does.
    pub fn param_for(&self, node: &str, input: &str) -> Option<&Param> {
        self.parameters
            .iter()
            .find(|p| p.targets.iter().any(|t| t.node == node && t.input == input))
    }

    /// Binds submitted values: checks each, fills defaults, and writes them
    /// into a copy of the graph. Returns the graph and every bound value.
    pub fn bind(&self, given: &Map<String, Value>) -> Result<(Value, Value), BindError> {
        for name in given.keys() {
            if !self.parameters.iter().any(|p| &p.name == name) {
                let known = self
                    .parameters
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(BindError::new(
                    format!("parameters.{name}"),
                    format!(
                        "workflow `{}` has no parameter `{name}` (it has: {known})",
                        self.id
                    ),
                ));
            }
        }
        let mut graph = self.graph.clone();
        let mut bound = Map::new();
        for p in &self.parameters {
            let value = match given.get(&p.name) {
                Some(v) => {
                    p.check(v)
                        .map_err(|m| BindError::new(format!("parameters.{}", p.name), m))?;
                    v.clone()
                }
                None if p.required => {
                    return Err(BindError::new(
                        format!("parameters.{}", p.name),
                        format!("is required by workflow `{}`", self.id),
                    ))
                }
                None => match &p.default {
                    Some(d) => d.clone(),
                    // No default: the graph's own value stays.
                    None => continue,
                },
            };
            for t in &p.targets {
                graph[&t.node]["inputs"][&t.input] = value.clone();
            }
            bound.insert(p.name.clone(), value);
        }
        Ok((graph, Value::Object(bound)))
    }
}

fn parse_target(graph: &Value, t: &str) -> Result<Target, String> {
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() != 3 || parts[1] != "inputs" {
        return Err(format!("target `{t}` must look like NODE.inputs.FIELD"));
    }
    let node = graph
        .get(parts[0])
        .ok_or_else(|| format!("target `{t}`: the graph has no node `{}`", parts[0]))?;
    let inputs = node
        .get("inputs")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("target `{t}`: node `{}` has no inputs", parts[0]))?;
    if !inputs.contains_key(parts[2]) {
        return Err(format!(
            "target `{t}`: node `{}` ({}) has no input `{}`",
            parts[0],
            node.get("class_type")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            parts[2]
        ));
    }
    Ok(Target {
        node: parts[0].to_string(),
        input: parts[2].to_string(),
    })
}

/// Checks that a value is a ComfyUI API-format graph: an object of nodes,
/// each with a `class_type` string and an `inputs` object.
pub fn validate_graph(graph: &Value) -> Result<(), BindError> {
    let nodes = graph.as_object().ok_or_else(|| {
        BindError::new(
            "workflow",
            "must be an object of nodes (ComfyUI API format)",
        )
    })?;
    if nodes.contains_key("nodes") && nodes.contains_key("links") {
        return Err(BindError::new(
            "workflow",
            "this is ComfyUI's UI format; export the graph with \"Save (API)\" instead",
        ));
    }
    if nodes.is_empty() {
        return Err(BindError::new("workflow", "has no nodes"));
    }
    for (id, node) in nodes {
        let field = format!("workflow.{id}");
        let node = node
            .as_object()
            .ok_or_else(|| BindError::new(&field, "must be an object"))?;
        if !node.get("class_type").is_some_and(Value::is_string) {
            return Err(BindError::new(
                format!("{field}.class_type"),
                "is required and must be a string",
            ));
        }
        if !node.get("inputs").is_some_and(Value::is_object) {
            return Err(BindError::new(
                format!("{field}.inputs"),
                "is required and must be an object",
            ));
        }
    }
    Ok(())
}

/// A template that could not be loaded, kept so that `GET /api/workflows` shows why.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TemplateError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub error: String,
}

struct CatalogState {
    templates: BTreeMap<String, Arc<Template>>,
    errors: Vec<TemplateError>,
    scanned_at: Instant,
}

/// The templates known to the service: built-ins plus the folder's.
pub struct Catalog {
    dir: PathBuf,
    state: RwLock<CatalogState>,
}

/// How often a lookup miss may rescan the folder.
const RESCAN_AFTER: Duration = Duration::from_secs(1);

impl Catalog {
    /// Loads the built-ins and the folder (a missing folder is fine).
    pub fn load(dir: &Path) -> Catalog {
        let catalog = Catalog {
            dir: dir.to_path_buf(),
            state: RwLock::new(CatalogState {
                templates: BTreeMap::new(),
                errors: Vec::new(),
                scanned_at: Instant::now(),
            }),
        };
        catalog.reload();
        catalog
    }

    /// Rescans the folder, so a template dropped there is served without a restart.
    pub fn reload(&self) {
        let mut templates = BTreeMap::new();
        let mut errors = Vec::new();
        for (id, graph, decl) in BUILTIN {
            match Template::parse(id, "builtin", graph, Some(decl)) {
                Ok(t) => {
                    templates.insert(id.to_string(), Arc::new(t));
                }
                Err(e) => errors.push(TemplateError {
                    file: format!("builtin/{id}"),
                    error: e,
                }),
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for path in paths {
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if id.starts_with('.') {
                    continue;
                }
                match load_file_template(id, &path) {
                    Ok(t) => {
                        templates.insert(id.to_string(), Arc::new(t));
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "workflow template not loaded");
                        errors.push(TemplateError {
                            file: path.display().to_string(),
                            error: e,
                        });
                    }
                }
            }
        }
        let mut state = self.state.write().expect("catalog lock");
        *state = CatalogState {
            templates,
            errors,
            scanned_at: Instant::now(),
        };
    }

    /// The template with this id, as last loaded.
    pub fn get(&self, id: &str) -> Option<Arc<Template>> {
        self.state
            .read()
            .expect("catalog lock")
            .templates
            .get(id)
            .cloned()
    }

    /// Whether a lookup of `id` should rescan the folder first: it is not
    /// known, and the last scan is over a second old (so a template dropped
    /// there is found without a restart, and a flood of unknown ids does not
    /// turn into a flood of scans).
    pub fn should_rescan_for(&self, id: &str) -> bool {
        let state = self.state.read().expect("catalog lock");
        !state.templates.contains_key(id) && state.scanned_at.elapsed() >= RESCAN_AFTER
    }

    /// Rescans the folder on a blocking thread (file reads stay off the
    /// async runtime).
    pub async fn reload_async(self: &Arc<Self>) {
        let catalog = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || catalog.reload()).await {
            tracing::error!(error = %e, "reloading the workflow templates failed");
        }
    }

    /// Every template, by id, and the files that failed to load.
    pub fn list(&self) -> (Vec<Arc<Template>>, Vec<TemplateError>) {
        let state = self.state.read().expect("catalog lock");
        (
            state.templates.values().cloned().collect(),
            state.errors.clone(),
        )
    }
}

fn load_file_template(id: &str, path: &Path) -> Result<Template, String> {
    let graph = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let yaml = ["yaml", "yml"]
        .iter()
        .map(|ext| path.with_extension(ext))
        .find(|p| p.exists());
    let decl = match &yaml {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    Template::parse(id, &path.display().to_string(), &graph, decl.as_deref())
}

#[cfg(test)]
mod tests;
