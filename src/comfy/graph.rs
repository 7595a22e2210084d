//! ComfyUI's validation of a graph against node definitions, as its
//! `validate_prompt` and `validate_inputs` (`execution.py`) do it.
//!
//! Why here: the definitions are what `/object_info` serves, so one
//! implementation serves both sides of the protocol: the simulator answers
//! `POST /prompt` with it (a `400`, or a `200` whose `node_errors` name the
//! outputs it drops), and the orchestrator checks a graph against its
//! backends' inventories before anything reaches a GPU. The rules:
//!
//! - every node has a `class_type` the server knows, and there is at least
//!   one output node;
//! - each output is valid when all its inputs are: every required input is
//!   given; a link is `[node, slot]`, its node exists and has that slot, of a
//!   type the input accepts, and that node is valid in turn; an `INT` or
//!   `FLOAT` converts and lies within `min` and `max`; a combo value (the old
//!   form, a list of options, or the newer `COMBO` with `options`) is one of
//!   the options, unless the node validates that input itself;
//! - the graph runs when at least one output is valid; the others are
//!   dropped and named in `node_errors`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

/// Inputs that core nodes validate themselves (`VALIDATE_INPUTS`), so
/// ComfyUI skips their combo check: `LoadImage` lists only the top of the
/// input folder, yet takes `SUBFOLDER/NAME`.
pub const SELF_VALIDATED: &[(&str, &str)] = &[
    ("LoadImage", "image"),
    ("LoadImageMask", "image"),
    ("LoadImageOutput", "image"),
    ("LoadAudio", "audio"),
    ("LoadVideo", "file"),
];

/// A graph that ComfyUI would refuse as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// ComfyUI's `error` object (`type`, `message`, `details`, `extra_info`).
    pub error: Value,
    /// Its `node_errors`.
    pub node_errors: Map<String, Value>,
}

impl Refusal {
    /// The body of ComfyUI's `400`.
    pub fn body(&self) -> Value {
        json!({"error": self.error, "node_errors": self.node_errors})
    }
}

/// A graph that runs, perhaps only in part.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The output nodes that validate (the ones that run).
    pub good_outputs: Vec<String>,
    /// The dropped outputs' errors (empty when the whole graph is valid).
    pub node_errors: Map<String, Value>,
}

/// What a validator knows beyond the definitions: which inputs a node
/// checks itself (`VALIDATE_INPUTS`: ComfyUI then skips its combo check),
/// and, where it can run it, that check.
pub trait NodeRules {
    /// Whether `input` of `class` is checked by the node itself.
    fn self_validated(&self, class: &str, input: &str) -> bool;

    /// The node's own check of a literal value: why it fails, if it does.
    fn check(&self, _class: &str, _input: &str, _value: &Value) -> Option<String> {
        None
    }

    /// A value the caller provides itself (put in place before the graph
    /// runs): not checked here.
    fn provided(&self, _value: &Value) -> bool {
        false
    }
}

/// The core nodes' self-checked inputs ([`SELF_VALIDATED`]), and no check run.
pub struct CoreRules;

impl NodeRules for CoreRules {
    fn self_validated(&self, class: &str, input: &str) -> bool {
        SELF_VALIDATED.contains(&(class, input))
    }
}

/// The rules a validation runs with.
pub type Exempt<'a> = &'a dyn NodeRules;

fn invalid_prompt(kind: &str, message: String, details: String) -> Refusal {
    Refusal {
        error: json!({"type": kind, "message": message, "details": details, "extra_info": {}}),
        node_errors: Map::new(),
    }
}

/// Node ids in ComfyUI's usual order (numeric ids first, by number).
fn ordered<'a>(ids: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut ids: Vec<&String> = ids.collect();
    ids.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), (*k).clone()));
    ids
}

/// Validates `graph` against `defs` (the shape of `/object_info`).
pub fn validate(
    graph: &Value,
    defs: &Map<String, Value>,
    exempt: Exempt,
) -> Result<Accepted, Refusal> {
    let Some(nodes) = graph.as_object() else {
        return Err(invalid_prompt(
            "invalid_prompt",
            "Cannot execute because the prompt is not an object.".into(),
            String::new(),
        ));
    };
    let mut outputs = Vec::new();
    for id in ordered(nodes.keys()) {
        let Some(class) = nodes[id].get("class_type").and_then(Value::as_str) else {
            return Err(invalid_prompt(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.".into(),
                format!("Node ID '#{id}'"),
            ));
        };
        let Some(def) = defs.get(class) else {
            return Err(invalid_prompt(
                "invalid_prompt",
                format!("Cannot execute because node {class} does not exist."),
                format!("Node ID '#{id}'"),
            ));
        };
        if def["output_node"] == true {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(invalid_prompt(
            "prompt_no_outputs",
            "Prompt has no outputs".into(),
            String::new(),
        ));
    }
    let mut checker = Checker {
        nodes,
        defs,
        exempt,
        validated: HashMap::new(),
    };
    let mut good = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        if checker.node(o, 0) {
            good.push(o.clone());
            continue;
        }
        for id in ordered(checker.validated.keys()) {
            let (valid, reasons) = &checker.validated[id];
            // Nodes downstream of a broken one are invalid without errors of their own.
            if *valid || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(id.clone()).or_insert_with(|| {
                json!({"errors": reasons, "dependent_outputs": [], "class_type": nodes[id]["class_type"]})
            });
            if let Some(deps) = entry["dependent_outputs"].as_array_mut() {
                deps.push(json!(o));
            }
        }
    }
    if good.is_empty() {
        return Err(Refusal {
            error: json!({
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                // As a real 0.3.64 answers (the errors are in node_errors).
                "details": "",
                "extra_info": {},
            }),
            node_errors,
        });
    }
    Ok(Accepted {
        good_outputs: good,
        node_errors,
    })
}

/// Whether a value of type `received` may feed an input of type `wanted`
/// (types are `T1,T2` lists that must overlap; `*` takes anything).
pub fn types_match(received: &str, wanted: &str) -> bool {
    if received == wanted || received == "*" || wanted == "*" {
        return true;
    }
    let r: Vec<&str> = received.split(',').map(str::trim).collect();
    wanted.split(',').map(str::trim).any(|w| r.contains(&w))
}

/// The options of a combo input, in either form, or `None` for other inputs.
pub fn combo_options(spec: &Value) -> Option<&Vec<Value>> {
    match &spec[0] {
        Value::Array(options) => Some(options),
        Value::String(t) if t == "COMBO" => spec[1]["options"].as_array(),
        _ => None,
    }
}

/// The declared inputs of a node definition, `(name, spec, required)`, in
/// the definition's `input_order` when it gives one.
pub fn inputs_of(def: &Value) -> Vec<(&String, &Value, bool)> {
    let mut all = Vec::new();
    for (category, required) in [("required", true), ("optional", false)] {
        let Some(m) = def["input"][category].as_object() else {
            continue;
        };
        let order = def["input_order"][category].as_array();
        let mut names: Vec<&String> = m.keys().collect();
        if let Some(order) = order {
            let at = |n: &String| {
                order
                    .iter()
                    .position(|o| o == n.as_str())
                    .unwrap_or(usize::MAX)
            };
            names.sort_by_key(|n| at(n));
        }
        all.extend(names.into_iter().map(|n| (n, &m[n], required)));
    }
    all
}

struct Checker<'a> {
    nodes: &'a Map<String, Value>,
    defs: &'a Map<String, Value>,
    exempt: Exempt<'a>,
    /// Node id → (valid, its own errors).
    validated: HashMap<String, (bool, Vec<Value>)>,
}

fn error(kind: &str, message: String, details: String, extra: Value) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": extra})
}

/// Python's `str()` of a JSON number or value, as ComfyUI's messages show it.
fn py(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e16 {
                format!("{f:.1}")
            } else {
                f.to_string()
            }
        }
        other => other.to_string(),
    }
}

impl Checker<'_> {
    /// Validates node `id` and everything it links to; whether it is valid.
    fn node(&mut self, id: &str, depth: usize) -> bool {
        if let Some((valid, _)) = self.validated.get(id) {
            return *valid;
        }
        // A cycle or a graph deeper than any real one: refuse rather than recurse for ever.
        self.validated.insert(id.to_string(), (false, vec![]));
        if depth > 512 {
            return false;
        }
        let node = &self.nodes[id];
        let class = node["class_type"].as_str().unwrap_or("");
        let def = &self.defs[class];
        let given = node["inputs"].as_object();
        let mut errors = Vec::new();
        let mut valid = true;
        for (name, spec, required) in inputs_of(def) {
            let extra_info = spec.get(1).cloned().unwrap_or_else(|| json!({}));
            let config = json!([spec[0], extra_info]);
            let Some(v) = given.and_then(|g| g.get(name.as_str())) else {
                if required {
                    errors.push(error(
                        "required_input_missing",
                        "Required input is missing".into(),
                        name.clone(),
                        json!({"input_name": name}),
                    ));
                }
                continue;
            };
            if let Some(link) = v.as_array() {
                match self.link(name, &spec[0], link, &config) {
                    Err(e) => errors.push(e),
                    Ok(source) => {
                        if !self.node(&source, depth + 1) {
                            valid = false;
                        }
                    }
                }
                continue;
            }
            if let Some(e) = self.value(class, name, spec, v, &config) {
                errors.push(e);
            }
        }
        let ok = errors.is_empty() && valid;
        self.validated.insert(id.to_string(), (ok, errors));
        ok
    }

    /// Checks a link; the source node's id when it is sound.
    fn link(
        &self,
        name: &str,
        wanted: &Value,
        link: &[Value],
        config: &Value,
    ) -> Result<String, Value> {
        let bad = |details: String| {
            error(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]".into(),
                details,
                json!({"input_name": name, "input_config": config, "received_value": link}),
            )
        };
        if link.len() != 2 {
            return Err(bad(name.to_string()));
        }
        let source = match &link[0] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(bad(name.to_string())),
        };
        let Some(src) = self.nodes.get(&source) else {
            return Err(bad(format!("{name}: node {source} does not exist")));
        };
        let src_class = src["class_type"].as_str().unwrap_or("");
        let slot = link[1].as_u64().unwrap_or(u64::MAX) as usize;
        let Some(received) = self.defs[src_class]["output"]
            .get(slot)
            .and_then(Value::as_str)
        else {
            return Err(bad(format!(
                "{name}: node {source} ({src_class}) has no output {}",
                link[1]
            )));
        };
        let wanted = match wanted {
            Value::String(w) if w != "COMBO" => w.as_str(),
            // A combo fed by a link: what feeds it is the node's own affair.
            _ => "*",
        };
        if !types_match(received, wanted) {
            return Err(error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes".into(),
                format!("{name}, received_type({received}) mismatch input_type({wanted})"),
                json!({"input_name": name, "input_config": config, "received_type": received, "linked_node": link}),
            ));
        }
        Ok(source)
    }

    /// Checks a literal value; the error when it is wrong.
    fn value(
        &self,
        class: &str,
        name: &str,
        spec: &Value,
        v: &Value,
        config: &Value,
    ) -> Option<Value> {
        if self.exempt.provided(v) {
            return None;
        }
        let extra = |more: Value| {
            let mut e = json!({"input_name": name, "input_config": config, "received_value": v});
            if let (Some(o), Some(m)) = (e.as_object_mut(), more.as_object()) {
                o.extend(m.clone());
            }
            e
        };
        let kind = spec[0].as_str().unwrap_or("");
        if kind == "INT" || kind == "FLOAT" {
            let number = match v {
                Value::Number(n) => n
                    .as_f64()
                    .map(|f| if kind == "INT" { f.trunc() } else { f }),
                Value::Bool(b) => Some(*b as u8 as f64),
                Value::String(s) if kind == "INT" => s.trim().parse::<i64>().ok().map(|i| i as f64),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            let Some(n) = number else {
                let exc = if kind == "INT" {
                    format!("invalid literal for int() with base 10: '{}'", py(v))
                } else {
                    format!("could not convert string to float: '{}'", py(v))
                };
                return Some(error(
                    "invalid_input_type",
                    format!("Failed to convert an input value to a {kind} value"),
                    format!("{name}, {}, {exc}", py(v)),
                    extra(json!({"exception_message": exc})),
                ));
            };
            let shown = if kind == "INT" {
                format!("{}", n as i128)
            } else {
                py(&json!(n))
            };
            let limit = |k: &str| spec[1][k].as_f64().map(|l| (l, py(&spec[1][k])));
            if let Some((_, m)) = limit("min").filter(|(l, _)| n < *l) {
                return Some(error(
                    "value_smaller_than_min",
                    format!("Value {shown} smaller than min of {m}"),
                    name.to_string(),
                    extra(json!({})),
                ));
            }
            if let Some((_, m)) = limit("max").filter(|(l, _)| n > *l) {
                return Some(error(
                    "value_bigger_than_max",
                    format!("Value {shown} bigger than max of {m}"),
                    name.to_string(),
                    extra(json!({})),
                ));
            }
            return None;
        }
        if let Some(why) = self.exempt.check(class, name, v) {
            return Some(error(
                "custom_validation_failed",
                "Custom validation failed for node".into(),
                format!("{name} - {why}"),
                json!({"input_name": name}),
            ));
        }
        let options = combo_options(spec)?;
        if self.exempt.self_validated(class, name) || options.contains(v) {
            return None;
        }
        let list = if options.len() > 20 {
            format!("(list of length {})", options.len())
        } else {
            format!("{:?}", options.iter().map(py).collect::<Vec<_>>())
        };
        Some(error(
            "value_not_in_list",
            "Value not in list".into(),
            format!("{name}: '{}' not in {list}", py(v)),
            extra(json!({})),
        ))
    }
}

/// The nodes an output needs (itself and every node it links to).
pub fn needed_by(
    graph: &Map<String, Value>,
    outputs: &[String],
) -> std::collections::HashSet<String> {
    let mut seen = std::collections::HashSet::new();
    let mut todo: Vec<String> = outputs.to_vec();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(inputs) = graph.get(&id).and_then(|n| n["inputs"].as_object()) else {
            continue;
        };
        for v in inputs.values() {
            if let Some(src) = v.as_array().and_then(|a| a.first()).and_then(Value::as_str) {
                todo.push(src.to_string());
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defs() -> Map<String, Value> {
        let all: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/comfyui/object_info.json"
        ))
        .unwrap();
        all.as_object().unwrap().clone()
    }

    struct NoRules;

    impl NodeRules for NoRules {
        fn self_validated(&self, _: &str, _: &str) -> bool {
            false
        }
    }

    #[allow(non_upper_case_globals)]
    const none: NoRules = NoRules;

    #[test]
    fn one_bad_branch_drops_only_its_output() {
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ok"}},
            "3": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 99, "sigma": 2.0}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}},
        });
        let a = validate(&graph, &defs(), &none).unwrap();
        assert_eq!(a.good_outputs, ["2"]);
        assert_eq!(a.node_errors["3"]["dependent_outputs"], json!(["4"]));
        assert_eq!(
            a.node_errors["3"]["errors"][0]["message"],
            "Value 99 bigger than max of 31"
        );
        assert!(
            a.node_errors.get("4").is_none(),
            "downstream nodes carry no errors"
        );
    }

    #[test]
    fn links_must_name_a_node_with_that_output_of_a_fitting_type() {
        let d = defs();
        let save = |link: Value| {
            json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "SaveImage", "inputs": {"images": link, "filename_prefix": "x"}},
            })
        };
        let kind = |g: Value| {
            validate(&g, &d, &none).unwrap_err().node_errors["2"]["errors"][0]["type"].clone()
        };
        assert_eq!(kind(save(json!(["9", 0]))), "bad_linked_input");
        assert_eq!(kind(save(json!(["1", 3]))), "bad_linked_input");
        assert_eq!(kind(save(json!(["1"]))), "bad_linked_input");
        let mask = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "red"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        });
        let e = validate(&mask, &d, &none).unwrap_err();
        assert_eq!(
            e.node_errors["3"]["errors"][0]["type"],
            "return_type_mismatch"
        );
    }

    #[test]
    fn combos_in_both_forms_and_self_validated_inputs() {
        let d = defs();
        let load = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "orchestrator/ab.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        });
        assert!(
            validate(&load, &d, &none).is_err(),
            "not in the listed options"
        );
        assert!(validate(&load, &d, &CoreRules).is_ok());
        let spec = json!(["COMBO", {"options": ["480P", "720P"]}]);
        assert_eq!(combo_options(&spec).unwrap().len(), 2);
        assert!(combo_options(&json!(["INT", {}])).is_none());
    }

    #[test]
    fn a_cycle_is_refused_not_followed_for_ever() {
        let g = json!({
            "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        });
        assert!(validate(&g, &defs(), &none).is_err());
    }
}
