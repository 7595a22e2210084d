//! What each backend can run: its node classes with their input specs, and
//! its model files, read from `/object_info` and `/models`.
//!
//! Why the orchestrator keeps it: real farms are not uniform (one box has
//! the SDXL checkpoints, another the Flux ones and a custom node pack). With
//! each backend's inventory, a graph that no box could run is a `422` at
//! submit, with the field at fault, instead of a GPU's `400` at 3 a.m.; a
//! job goes only to a box that has what it needs; and a box keeps the
//! models it has loaded. Checks follow ComfyUI's own validation
//! ([`crate::comfy::graph`]). Only what validation needs is kept: a stock
//! `/object_info` is 500 KB, with many custom nodes tens of MB.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::comfy::graph::{self, NodeRules, SELF_VALIDATED};
use crate::comfy::{ComfyClient, ComfyError};
use crate::store::Store;

/// One backend's inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Node definitions, kept to what validation needs; shared between
    /// backends that have the same ones (a farm of identical boxes holds
    /// one copy).
    pub defs: Arc<Map<String, Value>>,
    /// A digest of the node definitions alone.
    pub defs_hash: String,
    /// Model files per folder (`checkpoints`, `loras`, ...).
    pub models: BTreeMap<String, Vec<String>>,
    /// A digest of both: it changes when anything in them does.
    pub hash: String,
}

/// A writer that feeds a digest.
struct Hashing(Sha256);

impl std::io::Write for Hashing {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Inputs that name the model a graph loads first (a checkpoint switch costs
/// seconds on a GPU; this is what a backend prefers to keep).
const MAIN_MODEL_INPUTS: &[&str] = &["ckpt_name", "unet_name"];

/// The model folders read for the inventory.
const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "diffusion_models",
    "loras",
    "vae",
    "text_encoders",
    "clip_vision",
    "controlnet",
    "upscale_models",
    "embeddings",
];

/// One input spec kept to its type and the keys validation reads.
fn compact_spec(spec: &Value) -> Value {
    let mut extra = Map::new();
    if let Some(e) = spec.get(1).and_then(Value::as_object) {
        for k in ["min", "max", "options"] {
            if let Some(v) = e.get(k) {
                extra.insert(k.into(), v.clone());
            }
        }
    }
    json!([spec[0], extra])
}

/// A node definition kept to what validation needs.
fn compact_def(def: &Value) -> Value {
    let mut input = Map::new();
    for category in ["required", "optional"] {
        if let Some(m) = def["input"][category].as_object() {
            let kept: Map<String, Value> = m
                .iter()
                .map(|(k, s)| (k.clone(), compact_spec(s)))
                .collect();
            input.insert(category.into(), Value::Object(kept));
        }
    }
    json!({
        "input": input,
        "input_order": def["input_order"],
        "output": def["output"],
        "output_node": def["output_node"],
    })
}

impl Inventory {
    /// The values this backend offers for `class.input` when it is a combo
    /// (model files, samplers, …).
    pub fn options(&self, class: &str, input: &str) -> Option<&Vec<Value>> {
        let inputs = &self.defs.get(class)?["input"];
        let spec = inputs["required"]
            .get(input)
            .or_else(|| inputs["optional"].get(input))?;
        graph::combo_options(spec)
    }

    /// Builds an inventory from `/object_info` and the model folders.
    pub fn new(
        object_info: &Map<String, Value>,
        models: BTreeMap<String, Vec<String>>,
    ) -> Inventory {
        let defs: Map<String, Value> = object_info
            .iter()
            .map(|(k, d)| (k.clone(), compact_def(d)))
            .collect();
        // Hashed as it is written out: no copy of the definitions (a farm
        // coming up reads hundreds of inventories at once).
        let mut hasher = Hashing(Sha256::new());
        serde_json::to_writer(&mut hasher, &defs).expect("a hash takes every byte");
        let defs_hash = format!("{:x}", hasher.0.finalize());
        Inventory::from_parts(Arc::new(defs), defs_hash, models)
    }

    /// An inventory of node definitions already compacted (and maybe
    /// shared) and model lists.
    pub fn from_parts(
        defs: Arc<Map<String, Value>>,
        defs_hash: String,
        models: BTreeMap<String, Vec<String>>,
    ) -> Inventory {
        let mut h = Sha256::new();
        h.update(&defs_hash);
        h.update(serde_json::to_string(&models).unwrap_or_default());
        Inventory {
            defs,
            defs_hash,
            models,
            hash: format!("{:x}", h.finalize()),
        }
    }

    /// The same inventory, holding `other`'s node definitions when they are
    /// the same (one copy in memory for identical boxes).
    pub fn sharing_with(mut self, other: &Inventory) -> Inventory {
        if self.defs_hash == other.defs_hash {
            self.defs = other.defs.clone();
        }
        self
    }

    /// Reads a backend's inventory (within the client's reply cap). A few
    /// at a time: `/object_info` is megabytes of JSON, and a farm of
    /// hundreds of boxes coming up at once must not hold hundreds of them
    /// in memory together.
    pub async fn read(client: &ComfyClient) -> Result<Inventory, ComfyError> {
        static READS: std::sync::LazyLock<tokio::sync::Semaphore> =
            std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(2));
        let _turn = READS.acquire().await.expect("never closed");
        let object_info = client.object_info().await?;
        let mut models = BTreeMap::new();
        for folder in MODEL_FOLDERS {
            if let Some(files) = client.models(folder).await? {
                models.insert(folder.to_string(), files);
            }
        }
        Ok(Inventory::new(&object_info, models))
    }

    /// Checks a graph as ComfyUI would on this backend: the refusal, if any
    /// part of it would be refused (a graph ComfyUI would run only in part
    /// is a refusal too).
    pub fn check(&self, graph: &Value, rules: &Rules) -> Result<(), graph::Refusal> {
        match graph::validate(graph, &self.defs, rules) {
            Ok(a) if a.node_errors.is_empty() => Ok(()),
            Ok(a) => Err(graph::Refusal {
                error: json!({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}),
                node_errors: a.node_errors,
            }),
            Err(r) => Err(r),
        }
    }
}

/// The model a graph loads first (its checkpoint): what a backend that ran
/// it keeps loaded.
pub fn main_model(graph: &Value) -> Option<String> {
    let mut found: Vec<&str> = graph
        .as_object()?
        .values()
        .flat_map(|n| {
            MAIN_MODEL_INPUTS
                .iter()
                .filter_map(move |i| n["inputs"][*i].as_str())
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    (!found.is_empty()).then(|| found.join("+"))
}

/// The endings of model files: ComfyUI's `supported_pt_extensions`
/// (folder_paths.py), and `.gguf` and `.onnx`, which common custom node
/// packs load.
const MODEL_FILE_ENDINGS: &[&str] = &[
    ".ckpt",
    ".pt",
    ".pt2",
    ".bin",
    ".pth",
    ".safetensors",
    ".pkl",
    ".sft",
    ".gguf",
    ".onnx",
];

/// Whether a graph names any model file (whatever node loads it): one that
/// names none loads nothing into a GPU's memory, so running it costs a
/// backend no model switch.
pub fn names_model_files(graph: &Value) -> bool {
    let Some(nodes) = graph.as_object() else {
        return false;
    };
    nodes
        .values()
        .filter_map(|n| n["inputs"].as_object())
        .flat_map(|inputs| inputs.values())
        .filter_map(Value::as_str)
        .any(|v| {
            let v = v.to_ascii_lowercase();
            MODEL_FILE_ENDINGS.iter().any(|e| v.ends_with(e))
        })
}

/// The rules submit-time and lease-time checks run with: the core nodes'
/// self-checked inputs, the operator's exemptions (`inventory.exempt`:
/// `Class` or `Class.input`), and inputs the orchestrator provides itself
/// (uploaded files, named by their input id).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    exempt: Vec<String>,
}

impl Rules {
    /// With the operator's exemptions.
    pub fn new(exempt: &[String]) -> Rules {
        Rules {
            exempt: exempt.to_vec(),
        }
    }
}

impl NodeRules for Rules {
    fn self_validated(&self, class: &str, input: &str) -> bool {
        SELF_VALIDATED.contains(&(class, input))
            || self
                .exempt
                .iter()
                .any(|e| e == class || e.split_once('.') == Some((class, input)))
    }

    fn provided(&self, value: &Value) -> bool {
        // An uploaded file, by its input id, or another job's output: it is
        // put there before the job runs.
        value.as_str().is_some_and(|s| {
            crate::inputs::looks_like_id(s) || crate::inputs::looks_like_job_ref(s)
        })
    }
}

/// Reads a backend's inventory and stores it; what it read.
pub async fn refresh(
    store: &Store,
    client: &ComfyClient,
    backend_id: &str,
    comfyui_version: Option<String>,
) -> Result<Inventory, String> {
    let inventory = Inventory::read(client).await.map_err(|e| e.to_string())?;
    store
        .save_inventory(backend_id, &inventory, comfyui_version)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        backend_id,
        node_classes = inventory.defs.len(),
        checkpoints = inventory.models.get("checkpoints").map_or(0, Vec::len),
        "backend inventory read"
    );
    Ok(inventory)
}

/// What a refusal says a backend lacks, in one sentence.
pub fn lacks(refusal: &graph::Refusal) -> String {
    crate::comfy::rejection_summary(&refusal.body())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock() -> Inventory {
        let all: Value =
            serde_json::from_str(include_str!("../tests/fixtures/comfyui/object_info.json"))
                .unwrap();
        let mut models = BTreeMap::new();
        models.insert(
            "checkpoints".into(),
            vec!["sd_xl_base_1.0.safetensors".into()],
        );
        Inventory::new(all.as_object().unwrap(), models)
    }

    #[test]
    fn a_graph_names_model_files_whatever_node_loads_them() {
        let blur = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0, "blur_mode": "gaussian"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "blur.pt"}}
        });
        // Any value ending like a model file counts, an output's prefix too:
        // such a graph keeps its template's affinity, as every graph without
        // a checkpoint did before.
        assert!(names_model_files(&blur));
        let mut blur = blur;
        blur["3"]["inputs"]["filename_prefix"] = json!("blur");
        assert!(!names_model_files(&blur));
        let upscale = json!({
            "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.PTH"}}
        });
        assert!(names_model_files(&upscale));
        let custom = json!({
            "1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "flux1-dev-Q4_K_S.gguf"}}
        });
        assert!(names_model_files(&custom));
        assert!(main_model(&custom).is_some() && main_model(&upscale).is_none());
    }

    #[test]
    fn the_definitions_digest_is_the_one_stored_databases_hold() {
        // Databases in the field hold digests of the definitions written out
        // as one compact JSON string: the streamed digest must not differ.
        let a = stock();
        let written = Value::Object(a.defs.as_ref().clone()).to_string();
        assert_eq!(a.defs_hash, format!("{:x}", Sha256::digest(written)));
    }

    #[test]
    fn identical_boxes_share_one_copy_of_their_node_definitions() {
        let a = stock();
        let b = stock();
        assert!(!Arc::ptr_eq(&a.defs, &b.defs));
        let b = b.sharing_with(&a);
        assert!(Arc::ptr_eq(&a.defs, &b.defs));
        assert_eq!(a.hash, b.hash);
        // Other models, same nodes: still shared, but a different inventory.
        let mut models = BTreeMap::new();
        models.insert("loras".to_string(), vec!["x.safetensors".to_string()]);
        let c = Inventory::from_parts(a.defs.clone(), a.defs_hash.clone(), models);
        assert_ne!(c.hash, a.hash);
        let d = Inventory::new(&BTreeMap::new().into_iter().collect(), BTreeMap::new())
            .sharing_with(&a);
        assert!(
            !Arc::ptr_eq(&a.defs, &d.defs),
            "different nodes are not shared"
        );
    }

    #[test]
    fn an_inventory_keeps_what_validation_needs_and_is_much_smaller() {
        let inv = stock();
        assert_eq!(inv.defs.len(), 478);
        let kept = Value::Object((*inv.defs).clone()).to_string().len();
        assert!(kept < 400_000, "{kept} bytes");
        assert_eq!(
            inv.defs["ImageBlur"]["input"]["required"]["blur_radius"],
            json!(["INT", {"min": 1, "max": 31}])
        );
        let other = Inventory::new(&inv.defs, BTreeMap::new());
        assert_ne!(inv.hash, other.hash, "models are part of it");
    }

    #[test]
    fn the_main_model_of_a_graph_is_its_checkpoint() {
        let g = json!({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux.safetensors"}},
                       "5": {"class_type": "KSampler", "inputs": {}}});
        assert_eq!(main_model(&g).as_deref(), Some("flux.safetensors"));
        assert_eq!(
            main_model(&json!({"1": {"class_type": "EmptyImage", "inputs": {}}})),
            None
        );
    }

    #[test]
    fn operators_exempt_a_class_or_one_input() {
        let r = Rules::new(&["MyNode".into(), "Other.choice".into()]);
        assert!(r.self_validated("MyNode", "anything"));
        assert!(r.self_validated("Other", "choice"));
        assert!(!r.self_validated("Other", "else"));
        assert!(r.self_validated("LoadImage", "image"));
    }
}
