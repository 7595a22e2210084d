//! What the dashboard reads: thumbnails of outputs, the farm over a time
//! window, and the values a submit form offers.

mod common;

use common::*;
use serde_json::{json, Value};

async fn get_bytes(app: &TestApp, path: &str) -> (u16, String, Vec<u8>) {
    let r = reqwest::get(format!("{}{path}", app.url)).await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn a_finished_job_has_a_small_thumbnail_made_once_and_listed() {
    let sim = start_sim(50).await;
    let app = spawn_farm(vec![backend("a", sim.port, &[], 1)]).await;
    app.wait_backend("a", "online").await;
    let id = app
        .submit_blur(json!({"parameters": {"width": 1024, "height": 512, "color": 255}}))
        .await;
    let job = app.wait_status(&id, "completed").await;
    let name = job["outputs"][0]["name"].as_str().unwrap().to_string();
    // The list names the picture to show.
    let (_, list) = app.get("/api/jobs?limit=5").await;
    assert_eq!(list["jobs"][0]["preview"], name.as_str(), "{list}");
    let path = format!("/api/job/{id}/outputs/{name}?thumb=128");
    let (status, ct, bytes) = get_bytes(&app, &path).await;
    assert_eq!(status, 200);
    assert_eq!(ct, "image/jpeg");
    let thumb = image::load_from_memory(&bytes).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (128, 64));
    let full = job["outputs"][0]["size"].as_u64().unwrap();
    assert!((bytes.len() as u64) < full, "{} vs {full}", bytes.len());
    // Kept beside the output, served again without being made again.
    let kept = app
        .config
        .outputs_dir()
        .join(&id)
        .join(format!(".thumb-128-{name}"));
    let made = std::fs::metadata(&kept).unwrap().modified().unwrap();
    let (_, _, again) = get_bytes(&app, &path).await;
    assert_eq!(again, bytes);
    assert_eq!(std::fs::metadata(&kept).unwrap().modified().unwrap(), made);
    // Bounded sizes; unknown outputs.
    let (status, b) = app
        .get(&format!("/api/job/{id}/outputs/{name}?thumb=100"))
        .await;
    assert_eq!(status, 422);
    assert_eq!(b["error"]["field"], "thumb", "{b}");
    let (status, _) = app
        .get(&format!("/api/job/{id}/outputs/nope.png?thumb=64"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_farm_view_shows_each_attempt_where_it_ran_and_the_busy_share() {
    let a = start_sim(200).await;
    let b = start_sim(200).await;
    let app = spawn_farm_online(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(app.submit_blur(json!({"parameters": {"color": i}})).await);
    }
    for id in &ids {
        app.wait_status(id, "completed").await;
    }
    let (status, farm) = app.get("/api/farm").await;
    assert_eq!(status, 200, "{farm}");
    let attempts = farm["attempts"].as_array().unwrap();
    for id in &ids {
        let job = app.job(id).await;
        let bar = attempts
            .iter()
            .find(|x| x["job_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no bar for {id}: {farm}"));
        assert_eq!(bar["backend_id"], job["backend_id"]);
        assert_eq!(bar["outcome"], "completed");
        assert!(bar["finished_at"].as_str() >= bar["leased_at"].as_str());
    }
    let backends = farm["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    for b in backends {
        let ran = attempts.iter().any(|x| x["backend_id"] == b["id"]);
        let share = b["busy_share"].as_f64().unwrap();
        assert_eq!(share > 0.0, ran, "{b}");
        assert!(share < 1.0, "{b}");
    }
    let completed: u64 = farm["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap())
        .sum();
    assert_eq!(completed, 4);
    // The queue is sampled from the start.
    assert!(!farm["queue"].as_array().unwrap().is_empty(), "{farm}");
    // Not shared between groups of jobs.
    assert!(farm["sharing"].is_null(), "{farm}");
    // A window before all this is empty.
    let (_, old) = app
        .get("/api/farm?from=2020-01-01T00:00:00Z&to=2020-01-01T01:00:00Z")
        .await;
    assert!(old["attempts"].as_array().unwrap().is_empty(), "{old}");
    // Bad windows name their field.
    for (q, field) in [
        ("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "from"),
        ("from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z", "from"),
        ("to=yesterday", "to"),
    ] {
        let (status, e) = app.get(&format!("/api/farm?{q}")).await;
        assert_eq!(status, 422, "{q}: {e}");
        assert_eq!(e["error"]["field"], field, "{q}: {e}");
    }
}

/// A farm shared by `batch` says how each batch stands on it: what it
/// has on the farm (the fewest takes the next slot) and what waits.
#[tokio::test]
async fn the_farm_view_of_a_shared_farm_counts_each_batch_on_the_farm_and_queued() {
    let (_sim, app) = one_box_shared_by_batch("a", 60_000).await;
    let first = app
        .submit_blur(json!({"metadata": {"batch": "anna"}}))
        .await;
    app.wait_status(&first, "running").await;
    for meta in [json!({"batch": "anna"}), json!({"batch": "ben"}), json!({})] {
        app.submit_blur(json!({ "metadata": meta })).await;
    }
    let (status, farm) = app.get("/api/farm").await;
    assert_eq!(status, 200, "{farm}");
    assert_eq!(
        farm["sharing"],
        json!({"by": "batch", "groups": [
            {"group": "", "on_farm": 0, "queued": 1},
            {"group": "anna", "on_farm": 1, "queued": 1},
            {"group": "ben", "on_farm": 0, "queued": 1},
        ]})
    );
}

#[tokio::test]
async fn the_catalogue_offers_the_models_the_farm_has() {
    let a = start_sim_with(orchestrator::simulator::SimConfig {
        checkpoints: vec!["a.safetensors".into()],
        ..Default::default()
    })
    .await;
    let b = start_sim_with(orchestrator::simulator::SimConfig {
        checkpoints: vec!["b.safetensors".into(), "a.safetensors".into()],
        ..Default::default()
    })
    .await;
    let app = spawn_farm(vec![
        backend("a", a.port, &[], 1),
        backend("b", b.port, &[], 1),
    ])
    .await;
    app.wait_inventory("a").await;
    app.wait_inventory("b").await;
    // The backend's record shows its inventory a moment before the
    // catalogue has it: wait for the catalogue itself.
    let list = poll("the catalogue to offer both backends' models", || async {
        let (_, list) = app.get("/api/workflows").await;
        list.to_string().contains("b.safetensors").then_some(list)
    })
    .await;
    let param = |wf: &str, name: &str| -> Value {
        list["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == wf)
            .and_then(|w| {
                w["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == name)
                    .cloned()
            })
            .unwrap()
    };
    let mut options: Vec<String> = param("txt2img_sdxl", "checkpoint")["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    options.sort();
    assert_eq!(options, ["a.safetensors", "b.safetensors"]);
    assert!(param("image_blur", "width").get("options").is_none());
    assert!(param("image_invert", "image").get("options").is_none());
}
