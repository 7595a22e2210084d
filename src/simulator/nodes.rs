//! What the simulator knows of nodes beyond their definitions: where the
//! checkpoints it "has" go, how it checks a graph, and what its few real
//! nodes make (solid-colour images from `EmptyImage`, through inverts).
//!
//! Why the recorded definitions: the simulator validates against the same
//! `/object_info` a stock ComfyUI 0.3.64 serves, through the same rules the
//! orchestrator uses on its backends' inventories
//! ([`crate::comfy::graph`]), so a graph that a real server refuses is
//! refused here the same way.

use serde_json::{json, Map, Value};

use super::{png, Sim};
use crate::comfy::graph::{self, Accepted, Refusal, SELF_VALIDATED};

/// Inputs whose options are the checkpoints folder.
pub(super) const CHECKPOINT_INPUTS: &[(&str, &str)] = &[
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("CheckpointLoader", "ckpt_name"),
    ("ImageOnlyCheckpointLoader", "ckpt_name"),
    ("unCLIPCheckpointLoader", "ckpt_name"),
];

/// The simulator's node rules: the core self-checked inputs, and the one
/// check it runs as ComfyUI does (a loader's file must be in its input folder).
struct SimRules<'a>(&'a Sim);

impl graph::NodeRules for SimRules<'_> {
    fn self_validated(&self, class: &str, input: &str) -> bool {
        SELF_VALIDATED.contains(&(class, input))
    }

    fn check(&self, class: &str, input: &str, value: &Value) -> Option<String> {
        let loader = matches!((class, input), ("LoadImage" | "LoadImageMask", "image"));
        let name = value.as_str()?;
        (loader && input_file(self.0, name).is_none())
            .then(|| format!("Invalid image file: {name}"))
    }
}

/// Checks a graph as ComfyUI does.
pub(super) fn validate(sim: &Sim, graph: &Value) -> Result<Accepted, Refusal> {
    graph::validate(graph, &sim.defs.read().expect("defs"), &SimRules(sim))
}

/// The bytes of a file in the input folder, named as a loader names it
/// (`SUBFOLDER/NAME` or `NAME`).
pub(super) fn input_file(sim: &Sim, name: &str) -> Option<axum::body::Bytes> {
    let (sub, file) = name.rsplit_once('/').unwrap_or(("", name));
    sim.lock()
        .input_files
        .get(&(sub.to_string(), file.to_string()))
        .cloned()
}

/// The class of node `id`, or `""` when there is no such node.
pub(super) fn class_of<'a>(graph: &'a Map<String, Value>, id: &str) -> &'a str {
    graph
        .get(id)
        .and_then(|n| n["class_type"].as_str())
        .unwrap_or("")
}

/// The `_meta.title` of node `id` (where tests mark nodes that crash or hang).
pub(super) fn title_of<'a>(graph: &'a Map<String, Value>, id: &str) -> &'a str {
    graph
        .get(id)
        .and_then(|n| n["_meta"]["title"].as_str())
        .unwrap_or("")
}

/// An RGB picture flowing between nodes.
#[derive(Clone)]
pub(super) struct Img {
    w: u32,
    h: u32,
    rgb: Vec<u8>,
}

impl Img {
    fn solid(w: u32, h: u32, rgb: [u8; 3]) -> Img {
        // Large pictures are made smaller (keeping their shape): the
        // simulator's outputs stay cheap to encode.
        let scale = (256.0 / w.max(h) as f64).min(1.0);
        let fit = |v: u32| ((v as f64 * scale).round() as u32).max(1);
        let (w, h) = (fit(w), fit(h));
        Img {
            w,
            h,
            rgb: rgb.repeat((w * h) as usize),
        }
    }
}

/// The first node linked into `id`'s inputs.
fn first_link<'a>(graph: &'a Map<String, Value>, id: &str, input: Option<&str>) -> Option<&'a str> {
    let inputs = graph.get(id)?["inputs"].as_object()?;
    let link = |v: &'a Value| v.as_array().and_then(|a| a.first()).and_then(Value::as_str);
    match input {
        Some(name) => inputs.get(name).and_then(link),
        None => inputs.values().find_map(link),
    }
}

/// The pictures node `id` makes, computed from its inputs: `EmptyImage`
/// makes solid colours, `LoadImage` decodes an uploaded file, `ImageInvert`
/// inverts every pixel; other nodes pass on what they are given (or grey).
pub(super) fn images_of(sim: &Sim, graph: &Map<String, Value>, id: &str, depth: usize) -> Vec<Img> {
    let grey = || vec![Img::solid(64, 64, [128, 128, 128])];
    let Some(node) = graph.get(id).filter(|_| depth < 64) else {
        return grey();
    };
    let i = &node["inputs"];
    match class_of(graph, id) {
        "EmptyImage" => {
            let c = i["color"].as_u64().unwrap_or(0) as u32;
            let rgb = [(c >> 16) as u8, (c >> 8) as u8, c as u8];
            let (w, h) = (
                i["width"].as_u64().unwrap_or(64),
                i["height"].as_u64().unwrap_or(64),
            );
            let batch = i["batch_size"].as_u64().unwrap_or(1).clamp(1, 64) as usize;
            vec![Img::solid(w as u32, h as u32, rgb); batch]
        }
        "LoadImage" => i["image"]
            .as_str()
            .and_then(|name| input_file(sim, name))
            .and_then(|bytes| png::decode(&bytes))
            .map(|(w, h, rgb)| vec![Img { w, h, rgb }])
            .unwrap_or_else(grey),
        "ImageInvert" => first_link(graph, id, Some("image"))
            .map(|src| images_of(sim, graph, src, depth + 1))
            .unwrap_or_else(grey)
            .into_iter()
            .map(|mut img| {
                img.rgb.iter_mut().for_each(|v| *v = 255 - *v);
                img
            })
            .collect(),
        _ => first_link(graph, id, None)
            .map(|src| images_of(sim, graph, src, depth + 1))
            .unwrap_or_else(grey),
    }
}

/// Saves the images of output node `id` (`SaveImage` into `output`,
/// `PreviewImage` into `temp`) and returns its `output` entry.
pub(super) fn save_images(sim: &Sim, graph: &Map<String, Value>, id: &str) -> Value {
    let images = first_link(graph, id, Some("images"))
        .map(|src| images_of(sim, graph, src, 0))
        .unwrap_or_default();
    let (file_type, prefix) = if class_of(graph, id) == "SaveImage" {
        (
            "output",
            graph
                .get(id)
                .and_then(|n| n["inputs"]["filename_prefix"].as_str())
                .unwrap_or("ComfyUI")
                .to_string(),
        )
    } else {
        ("temp", "ComfyUI_temp".to_string())
    };
    let (subfolder, base) = match prefix.rsplit_once('/') {
        Some((s, b)) => (s.to_string(), b.to_string()),
        None => (String::new(), prefix.clone()),
    };
    let mut entries = Vec::new();
    let mut inner = sim.lock();
    for img in images {
        let counter = inner.counters.entry(prefix.clone()).or_insert(0);
        *counter += 1;
        let filename = format!("{base}_{:05}_.png", *counter);
        let bytes = axum::body::Bytes::from(png::encode(img.w, img.h, &img.rgb));
        inner.files.insert(
            (file_type.to_string(), subfolder.clone(), filename.clone()),
            bytes,
        );
        entries.push(json!({"filename": filename, "subfolder": subfolder, "type": file_type}));
    }
    json!({"images": entries})
}
