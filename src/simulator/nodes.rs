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

/// Checks a graph as ComfyUI does.
pub(super) fn validate(sim: &Sim, graph: &Value) -> Result<Accepted, Refusal> {
    graph::validate(graph, &sim.defs, &|class, input| {
        SELF_VALIDATED.contains(&(class, input))
    })
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

/// Finds the `EmptyImage` feeding a node: the saved image's size, count and
/// colour (inverted once per `ImageInvert` on the way).
fn source_image(graph: &Map<String, Value>, id: &str) -> (u32, u32, u32, [u8; 3]) {
    let mut cur = id.to_string();
    let mut invert = false;
    for _ in 0..64 {
        let Some(node) = graph.get(&cur) else { break };
        match node["class_type"].as_str().unwrap_or("") {
            "EmptyImage" => {
                let i = &node["inputs"];
                let c = i["color"].as_u64().unwrap_or(0) as u32;
                let mut rgb = [(c >> 16) as u8, (c >> 8) as u8, c as u8];
                if invert {
                    rgb = [255 - rgb[0], 255 - rgb[1], 255 - rgb[2]];
                }
                return (
                    i["width"].as_u64().unwrap_or(64) as u32,
                    i["height"].as_u64().unwrap_or(64) as u32,
                    i["batch_size"].as_u64().unwrap_or(1) as u32,
                    rgb,
                );
            }
            "ImageInvert" => invert = !invert,
            _ => {}
        }
        let next = node["inputs"].as_object().and_then(|i| {
            i.values()
                .find_map(|v| v.as_array().and_then(|a| a.first()).and_then(Value::as_str))
        });
        match next {
            Some(n) => cur = n.to_string(),
            None => break,
        }
    }
    (512, 512, 1, [128, 128, 128])
}

/// Saves the images of output node `id` (`SaveImage` into `output`,
/// `PreviewImage` into `temp`) and returns its `output` entry.
pub(super) fn save_images(sim: &Sim, graph: &Map<String, Value>, id: &str) -> Value {
    let (w, h, batch, rgb) = source_image(graph, id);
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
    let mut images = Vec::new();
    let mut inner = sim.lock();
    for _ in 0..batch.min(64) {
        let counter = inner.counters.entry(prefix.clone()).or_insert(0);
        *counter += 1;
        let filename = format!("{base}_{:05}_.png", *counter);
        let bytes = axum::body::Bytes::from(png::solid(w.min(256), h.min(256), rgb));
        inner.files.insert(
            (file_type.to_string(), subfolder.clone(), filename.clone()),
            bytes,
        );
        images.push(json!({"filename": filename, "subfolder": subfolder, "type": file_type}));
    }
    json!({"images": images})
}
