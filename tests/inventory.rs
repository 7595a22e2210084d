//! What each backend can run: its inventory read and kept, graphs checked
//! against it at submit, jobs routed by it, and models kept loaded.

mod common;

use common::*;
use orchestrator::simulator::SimConfig;
use serde_json::{json, Value};

const XL: &str = "sd_xl_base_1.0.safetensors";
const FLUX: &str = "flux1-dev.safetensors";

/// The blur graph every check below breaks in one place.
fn blur() -> Value {
    json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur",
              "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
        "3": {"class_type": "SaveImage",
              "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
    })
}

fn txt2img(checkpoint: &str, prompt: &str) -> Value {
    json!({
        "workflow_id": "txt2img_sdxl",
        "parameters": {"prompt": prompt, "checkpoint": checkpoint, "steps": 1}
    })
}

async fn sim_with(checkpoints: &[&str], job_ms: u64) -> orchestrator::simulator::SimHandle {
    start_sim_with(SimConfig {
        job_ms,
        checkpoints: checkpoints.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    })
    .await
}

async fn submit(app: &TestApp, body: &Value) -> String {
    let (status, b) = app.post_json("/api/job", body).await;
    assert_eq!(status, 201, "{b}");
    b["job_id"].as_str().unwrap().to_string()
}

/// A 422 whose `field` is `field` and whose message says each of `says`.
async fn refused(app: &TestApp, body: Value, field: &str, says: &[&str]) {
    let (status, b) = app.post_json("/api/job", &body).await;
    assert_eq!(status, 422, "{b}");
    assert_eq!(b["error"]["field"], field, "{b}");
    let message = b["error"]["message"].as_str().unwrap();
    for s in says {
        assert!(message.contains(s), "{message:?} lacks {s:?}");
    }
}

#[tokio::test]
async fn each_kind_of_graph_error_is_a_422_naming_its_field() {
    let sim = sim_with(&[XL], 100).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_inventory("a").await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut g = blur();
        f(&mut g);
        json!({ "workflow": g })
    };
    refused(
        &app,
        with(&|g| g["2"]["class_type"] = json!("ImageBlurr")),
        "workflow.2.class_type",
        &["ImageBlurr", "node 2"],
    )
    .await;
    // No output node: the graph as a whole (it said `workflow_id` and
    // "workflow ``" for an inline graph, seen on the real ComfyUI).
    refused(
        &app,
        with(&|g| {
            g.as_object_mut().unwrap().remove("3");
        }),
        "workflow",
        &["the workflow cannot run on this farm: Prompt has no outputs"],
    )
    .await;
    refused(
        &app,
        with(&|g| {
            g["2"]["inputs"].as_object_mut().unwrap().remove("sigma");
        }),
        "workflow.2.inputs.sigma",
        &["node 2 (ImageBlur)", "Required input is missing"],
    )
    .await;
    refused(
        &app,
        with(&|g| g["2"]["inputs"]["image"] = json!(["9", 0])),
        "workflow.2.inputs.image",
        &["node 2 (ImageBlur)"],
    )
    .await;
    refused(
        &app,
        with(&|g| g["2"]["inputs"]["image"] = json!(["1", 3])),
        "workflow.2.inputs.image",
        &["node 2 (ImageBlur)"],
    )
    .await;
    refused(
        &app,
        with(&|g| {
            g["1"] = json!({"class_type": "EmptyLatentImage",
                            "inputs": {"width": 64, "height": 64, "batch_size": 1}});
        }),
        "workflow.2.inputs.image",
        &["node 2 (ImageBlur)", "LATENT", "IMAGE"],
    )
    .await;
    refused(
        &app,
        with(&|g| g["2"]["inputs"]["blur_radius"] = json!(32)),
        "workflow.2.inputs.blur_radius",
        &["node 2 (ImageBlur)", "bigger than max of 31"],
    )
    .await;
    refused(
        &app,
        with(&|g| g["2"]["inputs"]["sigma"] = json!(0.01)),
        "workflow.2.inputs.sigma",
        &["node 2 (ImageBlur)", "smaller than min of 0.1"],
    )
    .await;
    // A combo in the newer COMBO form.
    refused(
        &app,
        json!({"workflow": {
            "1": {"class_type": "EmptyLatentImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": {"class_type": "LatentBatchSeedBehavior",
                  "inputs": {"samples": ["1", 0], "seed_behavior": "sometimes"}},
            "3": {"class_type": "SaveLatent",
                  "inputs": {"samples": ["2", 0], "filename_prefix": "l"}}
        }}),
        "workflow.2.inputs.seed_behavior",
        &["node 2 (LatentBatchSeedBehavior)", "sometimes"],
    )
    .await;
    // A combo in the old list form, through a template parameter: a model
    // file no backend has, and which backends were checked.
    refused(
        &app,
        txt2img("sd_xl_typo.safetensors", "a fox"),
        "parameters.checkpoint",
        &[
            "node 4 (CheckpointLoaderSimple)",
            "no enabled backend has `sd_xl_typo.safetensors`",
            "(checked: a)",
        ],
    )
    .await;
    // A sampler, through the graph itself.
    let mut graph: Value =
        serde_json::from_str(include_str!("../src/workflows/builtin/txt2img_sdxl.json")).unwrap();
    graph["3"]["inputs"]["sampler_name"] = json!("euler_typo");
    graph["6"]["inputs"]["text"] = json!("a fox");
    graph["7"]["inputs"]["text"] = json!("");
    refused(
        &app,
        json!({ "workflow": graph }),
        "workflow.3.inputs.sampler_name",
        &["node 3 (KSampler)", "euler_typo"],
    )
    .await;
    // Nothing refused was stored, and the good graph still goes through.
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");
    let ok = submit(&app, &json!({ "workflow": blur() })).await;
    app.wait_status(&ok, "completed").await;
    let ok = submit(&app, &txt2img(XL, "a fox")).await;
    app.wait_status(&ok, "completed").await;
}

#[tokio::test]
async fn the_backend_page_shows_the_inventory_and_a_refresh_answers_with_the_new_one() {
    let sim = sim_with(&[XL], 100).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    let b = app.wait_inventory("a").await;
    let recorded: Value =
        serde_json::from_str(include_str!("fixtures/comfyui/object_info.json")).unwrap();
    let inv = &b["inventory"];
    assert_eq!(
        inv["node_count"].as_u64().unwrap() as usize,
        recorded.as_object().unwrap().len(),
        "{inv}"
    );
    assert_eq!(inv["models"]["checkpoints"], json!([XL]), "{inv}");
    assert_eq!(inv["comfyui_version"], "0.3.64");
    // Submissions are checked against what the farm has, as it is now.
    refused(
        &app,
        txt2img(FLUX, "before"),
        "parameters.checkpoint",
        &["no enabled backend has"],
    )
    .await;
    sim.set_checkpoints(&[XL, FLUX]);
    let (status, fresh) = app.post_json("/api/backends/a/refresh", &json!({})).await;
    assert_eq!(status, 200, "{fresh}");
    submit(&app, &txt2img(FLUX, "after the refresh")).await;
    assert_eq!(
        fresh["inventory"]["models"]["checkpoints"],
        json!([XL, FLUX])
    );
    assert!(fresh["inventory"]["read_at"].as_str() > inv["read_at"].as_str());
    let (status, e) = app
        .post_json("/api/backends/nope/refresh", &json!({}))
        .await;
    assert_eq!(status, 404, "{e}");
}

#[tokio::test]
async fn a_model_only_one_backend_has_goes_only_there() {
    let a = sim_with(&[XL], 50).await;
    let b = sim_with(&[FLUX], 50).await;
    let app = spawn_farm(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.wait_inventory("a").await;
    app.wait_inventory("b").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(submit(&app, &txt2img(FLUX, &format!("flux {i}"))).await);
    }
    for id in &ids {
        let job = app.wait_status(id, "completed").await;
        assert_eq!(job["backend_id"], "b");
        assert_eq!(job["leases"].as_array().unwrap().len(), 1, "{job}");
    }
    assert!(a.prompt_posts().is_empty(), "nothing was tried on a");
}

#[tokio::test]
async fn a_backend_that_gains_a_model_after_a_refresh_gets_the_job() {
    // a has FLUX and is busy for a long time; b has only XL.
    let a = sim_with(&[XL, FLUX], 30_000).await;
    let b = sim_with(&[XL], 50).await;
    let app = spawn_farm(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.wait_inventory("a").await;
    app.wait_inventory("b").await;
    let first = submit(&app, &txt2img(FLUX, "first")).await;
    app.wait_status(&first, "running").await;
    let second = submit(&app, &txt2img(FLUX, "second")).await;
    // b looks at it and says why it cannot take it.
    let unfit = poll("b to find it cannot run the job", || async {
        app.events(&second)
            .await
            .into_iter()
            .find(|e| e["kind"] == "unfit" && e["backend_id"] == "b")
    })
    .await;
    assert!(unfit["message"].as_str().unwrap().contains(FLUX), "{unfit}");
    // The operator copies the model over and refreshes b.
    b.set_checkpoints(&[XL, FLUX]);
    let (status, _) = app.post_json("/api/backends/b/refresh", &json!({})).await;
    assert_eq!(status, 200);
    let job = app.wait_status(&second, "completed").await;
    assert_eq!(job["backend_id"], "b");
    assert_eq!(app.job(&first).await["status"], "running");
}

#[tokio::test]
async fn a_job_no_backend_can_run_any_more_fails_saying_what_each_lacks() {
    let a = sim_with(&[XL], 50).await;
    let b = sim_with(&[XL, FLUX], 5_000).await;
    let app = spawn_farm(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.wait_inventory("a").await;
    app.wait_inventory("b").await;
    let busy = submit(&app, &txt2img(FLUX, "busy")).await;
    app.wait_status(&busy, "running").await;
    let waiting = submit(&app, &txt2img(FLUX, "waiting")).await;
    // b loses the model while the job waits for it.
    b.set_checkpoints(&[XL]);
    let (status, _) = app.post_json("/api/backends/b/refresh", &json!({})).await;
    assert_eq!(status, 200);
    let job = app.wait_status(&waiting, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no enabled backend can run this job")
            && message.contains("a cannot run it")
            && message.contains("b cannot run it")
            && message.contains(FLUX),
        "{message}"
    );
    assert!(job["leases"].as_array().unwrap().is_empty(), "{job}");
}

#[tokio::test]
async fn the_preference_keeps_a_model_loaded_and_priority_still_wins() {
    async fn run(affinity: bool) -> (usize, Vec<String>) {
        let sim = sim_with(&[XL, FLUX], 50).await;
        let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
            c.dispatch.model_affinity = affinity;
        })
        .await;
        app.wait_inventory("a").await;
        app.post_json("/api/backends/a/disable", &json!({})).await;
        let mut ids = Vec::new();
        for (i, ckpt) in [XL, FLUX, XL, FLUX, XL, FLUX].iter().enumerate() {
            ids.push(submit(&app, &txt2img(ckpt, &format!("shot {i}"))).await);
        }
        let mut urgent = txt2img(FLUX, "urgent");
        urgent["priority"] = json!(5);
        ids.push(submit(&app, &urgent).await);
        app.post_json("/api/backends/a/enable", &json!({})).await;
        let mut order = Vec::new();
        for id in &ids {
            let job = app.wait_status(id, "completed").await;
            let started = job["leases"][0]["leased_at"].as_str().unwrap().to_string();
            let prompt = job["parameters"]["prompt"].as_str().unwrap().to_string();
            order.push((started, prompt));
        }
        order.sort();
        (sim.loads(), order.into_iter().map(|(_, p)| p).collect())
    }
    let (loads, order) = run(true).await;
    // The urgent job first; then the rest of its model; then the other.
    assert_eq!(
        order,
        ["urgent", "shot 1", "shot 3", "shot 5", "shot 0", "shot 2", "shot 4"],
        "{loads}"
    );
    assert_eq!(loads, 2);
    let (loads, order) = run(false).await;
    assert_eq!(
        order,
        ["urgent", "shot 0", "shot 1", "shot 2", "shot 3", "shot 4", "shot 5"]
    );
    assert_eq!(loads, 7);
}

#[tokio::test]
async fn the_preference_never_holds_an_old_job_back_beyond_its_bound() {
    let sim = sim_with(&[XL, FLUX], 150).await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.dispatch.affinity_max_wait_s = 1;
    })
    .await;
    app.wait_inventory("a").await;
    let first = submit(&app, &txt2img(XL, "xl 0")).await;
    app.wait_status(&first, "running").await;
    let old = submit(&app, &txt2img(FLUX, "old flux")).await;
    // XL work keeps arriving, so there is always an XL job to prefer.
    let xl = std::sync::Mutex::new(Vec::<String>::new());
    let job = poll("the old job to run", || async {
        let mine = xl.lock().unwrap().clone();
        let mut queued_xl = 0;
        for id in &mine {
            queued_xl += (app.job(id).await["status"] == "queued") as usize;
        }
        if queued_xl < 2 {
            let id = submit(&app, &txt2img(XL, &format!("xl {}", mine.len() + 1))).await;
            xl.lock().unwrap().push(id);
        }
        let job = app.job(&old).await;
        (job["status"] == "completed").then_some(job)
    })
    .await;
    let xl = xl.into_inner().unwrap();
    let old_started = job["leases"][0]["leased_at"].as_str().unwrap().to_string();
    let submitted = job["submitted_at"].as_str().unwrap();
    let mut ran_before = 0;
    for id in &xl {
        let j = app.job(id).await;
        if let Some(t) = j["leases"][0]["leased_at"].as_str() {
            ran_before += (t < old_started.as_str()) as usize;
        }
    }
    assert!(ran_before > 0, "newer XL jobs were preferred for a while");
    let waited = chrono::DateTime::parse_from_rfc3339(&old_started).unwrap()
        - chrono::DateTime::parse_from_rfc3339(submitted).unwrap();
    assert!(
        waited < chrono::Duration::seconds(5),
        "held back {waited} with a bound of 1 s"
    );
}

#[tokio::test]
async fn a_restart_keeps_the_inventories_and_checks_with_them() {
    let mut sim = sim_with(&[XL], 50).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    let before = app.wait_inventory("a").await;
    sim.disconnect().await;
    let app = app.restart().await;
    let b = app.wait_backend("a", "offline").await;
    assert_eq!(b["inventory"], before["inventory"]);
    refused(
        &app,
        txt2img("sd_xl_typo.safetensors", "a fox"),
        "parameters.checkpoint",
        &["(checked: a)"],
    )
    .await;
    let (status, _) = app.post_json("/api/job", &txt2img(XL, "a fox")).await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn a_farm_that_was_never_seen_accepts_work_and_checks_it_once_a_backend_is_known() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let app = spawn_farm(vec![backend("a", port, &[], 1)]).await;
    let typo = submit(&app, &txt2img("sd_xl_typo.safetensors", "typo")).await;
    let good = submit(&app, &txt2img(XL, "good")).await;
    let _sim = restart_sim_on(port, 50).await;
    let job = app.wait_status(&good, "completed").await;
    assert_eq!(job["backend_id"], "a");
    let job = app.wait_status(&typo, "failed").await;
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("sd_xl_typo.safetensors"), "{message}");
    let events: Vec<String> = app
        .events(&typo)
        .await
        .iter()
        .map(|e| format!("{} {} {}", e["at"], e["kind"], e["message"]))
        .collect();
    let (_, backend) = app.get("/api/backends/a").await;
    assert!(
        job["leases"].as_array().unwrap().is_empty(),
        "{events:#?}\n{backend}"
    );
}

#[tokio::test]
async fn an_exempted_input_is_left_to_the_backend() {
    let sim = sim_with(&[XL], 50).await;
    let app = spawn_farm_with(vec![backend("a", sim.port, &[], 1)], |c| {
        c.inventory.exempt = vec!["CheckpointLoaderSimple.ckpt_name".into()];
    })
    .await;
    app.wait_inventory("a").await;
    // Accepted; the backend itself is then the judge.
    let id = submit(&app, &txt2img("made_by_a_custom_loader.safetensors", "x")).await;
    let job = app.wait_status(&id, "failed").await;
    assert_eq!(job["leases"][0]["outcome"], "rejected", "{job}");
}

#[tokio::test]
async fn a_busy_box_keeps_its_model_but_fills_a_free_slot_with_work_that_loads_none() {
    let sim = sim_with(&[XL, FLUX], 1_500).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 2)]).await;
    app.wait_inventory("a").await;
    let xl = submit(&app, &txt2img(XL, "a fox")).await;
    app.wait_status(&xl, "running").await;
    // A graph that names no model file: nothing to switch, so the second
    // slot takes it while the XL job runs.
    let blur = submit(
        &app,
        &json!({"workflow_id": "image_blur", "parameters": {"width": 64, "height": 64}}),
    )
    .await;
    let blur = poll("the blur job sent to the busy box", || async {
        let job = app.job(&blur).await;
        (job["leases"].as_array().is_some_and(|l| !l.is_empty())).then_some(job)
    })
    .await;
    assert_eq!(blur["backend_id"], "a");
    assert_eq!(app.job(&xl).await["status"], "running", "{blur}");
    app.wait_status(blur["job_id"].as_str().unwrap(), "completed")
        .await;
    app.wait_status(&xl, "completed").await;
    assert_eq!(sim.loads(), 1, "one model loaded, never switched");
}
