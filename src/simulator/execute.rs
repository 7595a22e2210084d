//! Running prompts, one at a time, with ComfyUI's messages in ComfyUI's
//! order, and the failures tests ask for.
//!
//! Why it never panics on a graph it accepted: a panic here would kill the
//! queue task and every later prompt with it; every lookup of a node is a
//! `get`, and a graph that validated runs (or fails as ComfyUI would).

use std::time::{Duration, Instant};

use axum::extract::ws::Message;
use serde_json::{json, Map, Value};

use super::nodes::{class_of, save_images, title_of};
use super::{now_ms, png, Prompt, Running, Sim, S};
use crate::comfy::graph::needed_by;

/// Inputs that load a checkpoint (what `load_ms` is about).
const MAIN_MODEL_INPUTS: &[&str] = &["ckpt_name", "unet_name"];

/// Node ids in an order where every node comes after its inputs, limited
/// to `wanted`.
fn execution_order(
    graph: &Map<String, Value>,
    wanted: &std::collections::HashSet<String>,
) -> Vec<String> {
    let mut order = Vec::new();
    let mut done = std::collections::HashSet::new();
    fn visit(
        id: &str,
        g: &Map<String, Value>,
        done: &mut std::collections::HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if done.contains(id) || depth > 1000 || !g.contains_key(id) {
            return;
        }
        done.insert(id.to_string());
        if let Some(inputs) = g.get(id).and_then(|n| n["inputs"].as_object()) {
            for v in inputs.values() {
                if let Some(src) = v.as_array().and_then(|a| a.first()).and_then(Value::as_str) {
                    visit(src, g, done, order, depth + 1);
                }
            }
        }
        order.push(id.to_string());
    }
    let mut ids: Vec<&String> = graph.keys().filter(|k| wanted.contains(*k)).collect();
    ids.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), (*k).clone()));
    for id in ids {
        visit(id, graph, &mut done, &mut order, 0);
    }
    order
}

/// Takes prompts from the queue and runs them, for ever.
pub(super) async fn run_queue(sim: S) {
    loop {
        let next = {
            let mut inner = sim.lock();
            match inner.queue.pop_front() {
                Some(p) => {
                    inner.running = Some(Running {
                        prompt: p.clone(),
                        node: None,
                        interrupt: false,
                    });
                    Some(p)
                }
                None => None,
            }
        };
        match next {
            Some(p) => execute(&sim, p).await,
            None => sim.work.notified().await,
        }
    }
}

/// Whether this run still is the server's (a crash ends it unheard).
fn still_running(sim: &Sim, pid: &str) -> bool {
    sim.lock()
        .running
        .as_ref()
        .is_some_and(|r| r.prompt.prompt_id == pid)
}

/// A sampler step's time, cut short by an interrupt or the prompt's end,
/// as ComfyUI's samplers look for an interrupt at every step and a long
/// step here stands for many of them.
async fn step_time(sim: &Sim, pid: &str, length: Duration) {
    let end = tokio::time::Instant::now() + length;
    while !interrupted(sim) && still_running(sim, pid) {
        let now = tokio::time::Instant::now();
        if now >= end {
            return;
        }
        tokio::time::sleep((end - now).min(Duration::from_millis(50))).await;
    }
}

fn interrupted(sim: &Sim) -> bool {
    sim.lock().running.as_ref().is_some_and(|r| r.interrupt)
}

fn set_node(sim: &Sim, node: &str) {
    if let Some(r) = sim.lock().running.as_mut() {
        r.node = Some(node.to_string());
    }
}

/// A preview frame for the prompt's socket: with metadata (event 4) when it
/// asked for it, else event 1 (format 2: PNG).
fn send_preview(sim: &Sim, client_id: &Option<String>, pid: &str, node: &str, image: Vec<u8>) {
    let metadata = client_id.as_ref().is_some_and(|cid| {
        sim.lock()
            .sockets
            .get(cid)
            .is_some_and(|s| s.preview_metadata)
    });
    let frame = if metadata {
        let meta = json!({"image_type": "image/png", "prompt_id": pid, "node_id": node, "display_node_id": node, "parent_node_id": null, "real_node_id": node}).to_string();
        let mut f = vec![0, 0, 0, 4];
        f.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        f.extend_from_slice(meta.as_bytes());
        f.extend(image);
        f
    } else {
        let mut f = vec![0, 0, 0, 1, 0, 0, 0, 2];
        f.extend(image);
        f
    };
    sim.send_for(client_id, Message::Binary(frame.into()));
}

enum End {
    Success,
    Error(Value),
    Interrupted(Value),
    /// The server crashed, or the run was dropped: nothing is written.
    Vanished,
}

/// The node that takes the prompt's time (the sampler, else a blur).
fn work_node(graph: &Map<String, Value>, order: &[String]) -> Option<String> {
    let of = |class: &str| order.iter().find(|id| class_of(graph, id) == class);
    of("KSampler")
        .or_else(|| of("ImageBlur"))
        .or(order.first())
        .cloned()
}

async fn execute(sim: &Sim, p: Prompt) {
    let started = Instant::now();
    let cid = p.client_id.clone();
    let pid = p.prompt_id.clone();
    let graph = p.graph.as_object().cloned().unwrap_or_default();
    let start = json!({"prompt_id": pid, "timestamp": now_ms()});
    let mut messages = vec![json!(["execution_start", start])];
    sim.event(&cid, "execution_start", start);
    let cached = sim.lock().last_graph.as_ref() == Some(&p.graph);
    let order = execution_order(&graph, &needed_by(&graph, &p.outputs));
    let cached_nodes: Vec<String> = if cached { order.clone() } else { vec![] };
    let cached_msg = json!({"nodes": cached_nodes, "prompt_id": pid, "timestamp": now_ms()});
    messages.push(json!(["execution_cached", cached_msg]));
    sim.event(&cid, "execution_cached", cached_msg);

    let mut outputs: Map<String, Value> = Map::new();
    let end = if cached {
        let last = sim.lock().last_outputs.clone();
        for (node, output) in last {
            sim.event(
                &cid,
                "executed",
                json!({"node": node, "display_node": node, "output": output, "prompt_id": pid}),
            );
            outputs.insert(node, output);
        }
        End::Success
    } else {
        run_nodes(sim, &p, &graph, &order, &mut outputs).await
    };
    let status = match &end {
        End::Vanished => return,
        End::Success => {
            let m = json!({"prompt_id": pid, "timestamp": now_ms()});
            messages.push(json!(["execution_success", m]));
            sim.event(&cid, "execution_success", m);
            json!({"status_str": "success", "completed": true, "messages": messages})
        }
        End::Error(data) => {
            messages.push(json!(["execution_error", data]));
            sim.event(&cid, "execution_error", data.clone());
            json!({"status_str": "error", "completed": false, "messages": messages})
        }
        End::Interrupted(data) => {
            messages.push(json!(["execution_interrupted", data]));
            sim.event(&cid, "execution_interrupted", data.clone());
            json!({"status_str": "error", "completed": false, "messages": messages})
        }
    };
    let meta: Map<String, Value> = outputs
        .keys()
        .map(|n| {
            (
                n.clone(),
                json!({"node_id": n, "display_node": n, "parent_node": null, "real_node_id": n}),
            )
        })
        .collect();
    {
        let mut inner = sim.lock();
        if inner
            .running
            .as_ref()
            .is_none_or(|r| r.prompt.prompt_id != pid)
        {
            return;
        }
        let entry = json!({"prompt": p.item(), "outputs": outputs, "status": status, "meta": meta});
        inner.history.insert(pid.clone(), (p.number, entry));
        if matches!(end, End::Success) {
            inner.last_graph = Some(p.graph.clone());
            inner.last_outputs = outputs.into_iter().collect();
        }
        inner.running = None;
        if inner.timeline.len() >= 100_000 {
            inner.timeline.drain(..50_000);
        }
        inner.timeline.push((pid.clone(), started, Instant::now()));
    }
    sim.broadcast_status();
    sim.event(&cid, "executing", json!({"node": null, "prompt_id": pid}));
}

/// Whether a graph's picture is more than this box's GPU holds.
fn too_big(sim: &Sim, graph: &Map<String, Value>) -> bool {
    let limit = sim.config.oom_above_pixels;
    limit > 0
        && graph.values().any(|n| {
            let size = |k: &str| n["inputs"][k].as_u64().unwrap_or(0);
            size("width") * size("height") > limit
        })
}

/// Runs the nodes of a prompt in order; how it ended.
async fn run_nodes(
    sim: &Sim,
    p: &Prompt,
    graph: &Map<String, Value>,
    order: &[String],
    outputs: &mut Map<String, Value>,
) -> End {
    let (cid, pid) = (&p.client_id, p.prompt_id.as_str());
    let fail_here = sim.config.fail_rate > 0.0 && sim.random() < sim.config.fail_rate;
    let crash_here = sim.config.crash_rate > 0.0 && sim.random() < sim.config.crash_rate;
    let work = work_node(graph, order);
    let mut executed: Vec<String> = Vec::new();
    let stopped = |id: &str, class: &str, executed: &[String]| {
        End::Interrupted(
            json!({"prompt_id": pid, "node_id": id, "node_type": class, "executed": executed, "timestamp": now_ms()}),
        )
    };
    for id in order {
        let class = class_of(graph, id);
        if !still_running(sim, pid) {
            return End::Vanished;
        }
        if interrupted(sim) {
            return stopped(id, class, &executed);
        }
        set_node(sim, id);
        sim.event(
            cid,
            "executing",
            json!({"node": id, "display_node": id, "prompt_id": pid}),
        );
        match title_of(graph, id) {
            "sim:crash" => {
                tracing::warn!(node = %id, "simulated ComfyUI crashes (node titled sim:crash)");
                sim.crash();
                return End::Vanished;
            }
            "sim:hang" => {
                // Never ends, ignores interrupts: only a crash or a stop ends it.
                let mut life = sim.life.subscribe();
                let _ = life.changed().await;
                return End::Vanished;
            }
            _ => {}
        }
        if MAIN_MODEL_INPUTS
            .iter()
            .any(|i| graph.get(id).is_some_and(|n| n["inputs"][i].is_string()))
        {
            let model = crate::inventory::main_model(&Value::Object(graph.clone()));
            let switched = {
                let mut inner = sim.lock();
                let switched = inner.loaded != model;
                if switched {
                    inner.loaded = model;
                    inner.switches += 1;
                }
                switched
            };
            if switched && sim.config.load_ms > 0 {
                tokio::time::sleep(Duration::from_millis(sim.config.load_ms)).await;
            }
        }
        if Some(id) == work.as_ref() {
            let steps = graph
                .get(id)
                .and_then(|n| n["inputs"]["steps"].as_u64())
                .unwrap_or(4)
                .clamp(1, 20);
            for step in 1..=steps {
                if sim.config.job_ms > 0 {
                    step_time(sim, pid, Duration::from_millis(sim.config.job_ms / steps)).await;
                }
                if crash_here && step == steps.div_ceil(2) {
                    tracing::warn!(node = %id, "simulated ComfyUI crashes (crash_rate)");
                    sim.crash();
                    return End::Vanished;
                }
                if !still_running(sim, pid) {
                    return End::Vanished;
                }
                if interrupted(sim) {
                    return stopped(id, class, &executed);
                }
                sim.event(
                    cid,
                    "progress",
                    json!({"value": step, "max": steps, "prompt_id": pid, "node": id}),
                );
                send_preview(sim, cid, pid, id, png::solid(8, 8, [step as u8 * 10, 0, 0]));
            }
            if too_big(sim, graph) {
                // As ComfyUI 0.3.64's execution.py words it (its OOM tips).
                return End::Error(json!({
                    "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                    "exception_message": "Allocation on device \nThis error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.",
                    "exception_type": "torch.OutOfMemoryError",
                    "traceback": ["  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n"], "current_inputs": {}, "current_outputs": order,
                    "timestamp": now_ms()
                }));
            }
            if fail_here {
                return End::Error(json!({
                    "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                    "exception_message": "simulated failure (fail_rate)\n", "exception_type": "RuntimeError",
                    "traceback": ["  File \"simulator\", line 1, in execute\n"], "current_inputs": {}, "current_outputs": order,
                    "timestamp": now_ms()
                }));
            }
        }
        let inputs = graph.get(id).map(|n| &n["inputs"]);
        if class == "ImageToMask" && inputs.is_some_and(|i| i["channel"] == "alpha") {
            return End::Error(json!({
                "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                "exception_message": "index 3 is out of bounds for dimension 3 with size 3\n",
                "exception_type": "IndexError",
                "traceback": ["  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n"],
                "current_inputs": {"image": ["<tensor>"], "channel": ["alpha"]}, "current_outputs": order, "timestamp": now_ms()
            }));
        }
        if class == "SaveImage" && sim.lock().disk_full {
            // As ComfyUI 0.3.64 reports it (PIL's save in nodes.py).
            return End::Error(json!({
                "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                "exception_message": "[Errno 28] No space left on device\n",
                "exception_type": "OSError",
                "traceback": ["  File \"/opt/ComfyUI/nodes.py\", line 1606, in save_images\n"],
                "current_inputs": {"images": ["<tensor>"]}, "current_outputs": order, "timestamp": now_ms()
            }));
        }
        if class == "SaveImage" || class == "PreviewImage" {
            let output = save_images(sim, graph, id);
            sim.event(
                cid,
                "executed",
                json!({"node": id, "display_node": id, "output": output, "prompt_id": pid}),
            );
            outputs.insert(id.clone(), output);
        }
        executed.push(id.clone());
    }
    End::Success
}
