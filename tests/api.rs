//! The HTTP API against the real server and a real SQLite file.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn a_python_client_submission_is_stored_and_queued() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_blur", "parameters": {"width": 640, "blur_radius": 9}, "metadata": {"source": "storyboard", "shot": "sc01_sh010"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "queued");
    assert!(body["message"].as_str().unwrap().len() > 3);
    let submitted_at = body["submitted_at"].as_str().unwrap();
    assert!(submitted_at.ends_with('Z'), "{submitted_at}");
    chrono::DateTime::parse_from_rfc3339(submitted_at).unwrap();

    let id = body["job_id"].as_str().unwrap();
    let job = app.job(id).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["workflow_id"], "image_blur");
    assert_eq!(job["parameters"]["width"], 640);
    assert_eq!(job["parameters"]["height"], 512, "defaults are bound");
    assert_eq!(job["graph"]["2"]["inputs"]["blur_radius"], 9);
    assert_eq!(job["graph"]["1"]["inputs"]["width"], 640);
    assert_eq!(job["manifest"]["metadata"]["shot"], "sc01_sh010");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["max_attempts"], 3);
    assert_eq!(job["outputs"], json!([]));

    let (status, events) = app.get(&format!("/api/job/{id}/events")).await;
    assert_eq!(status, 200);
    assert_eq!(events["events"][0]["kind"], "submitted");
    assert_eq!(events["events"][0]["status"], "queued");
}

#[tokio::test]
async fn optional_manifest_fields_are_kept_and_unknown_ones_warned_about() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "txt2img_sdxl", "parameters": {"prompt": "a lighthouse", "steps": 4},
                    "priority": 5, "requires": ["sdxl"], "max_attempts": 2, "priorty": 9}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body["warnings"][0].as_str().unwrap().contains("priorty"));
    let job = app.job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["priority"], 5);
    assert_eq!(job["requires"], json!(["sdxl"]));
    assert_eq!(job["max_attempts"], 2);
    assert_eq!(job["graph"]["6"]["inputs"]["text"], "a lighthouse");
}

#[tokio::test]
async fn an_inline_workflow_is_accepted_as_given() {
    let app = spawn_app().await;
    let graph = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}});
    let (status, body) = app.post_json("/api/job", &json!({"workflow": graph})).await;
    assert_eq!(status, 201, "{body}");
    let job = app.job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["graph"], graph);
    assert_eq!(job["workflow_id"], Value::Null);
}

async fn job_count(app: &TestApp) -> usize {
    let (_, body) = app.get("/api/jobs?limit=1000").await;
    body["jobs"].as_array().unwrap().len()
}

#[tokio::test]
async fn every_bad_submission_gets_its_status_and_names_the_problem_and_stores_nothing() {
    let app = spawn_app().await;
    let url = format!("{}/api/job", app.url);
    let c = &app.client;

    // Malformed JSON.
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"workflow_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "malformed_json");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("line 1"),
        "{b}"
    );

    // Wrong content type.
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "unsupported_media_type");

    // Body over the limit (16 MiB by default).
    let huge = format!(
        "{{\"workflow_id\": \"image_blur\", \"metadata\": {{\"x\": \"{}\"}}}}",
        "a".repeat(17 * 1024 * 1024)
    );
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "payload_too_large");

    let cases = [
        (
            json!({"workflow_id": "no_such_flow"}),
            "workflow_id",
            "unknown workflow",
        ),
        (
            json!({"workflow_id": "image_blur", "parameters": {"wdth": 5}}),
            "parameters.wdth",
            "no parameter",
        ),
        (
            json!({"workflow_id": "image_blur", "parameters": {"width": "wide"}}),
            "parameters.width",
            "integer",
        ),
        (
            json!({"workflow_id": "image_blur", "parameters": {"width": 9000}}),
            "parameters.width",
            "at most 8192",
        ),
        (
            json!({"workflow_id": "image_blur", "parameters": {"blur_radius": 0}}),
            "parameters.blur_radius",
            "at least 1",
        ),
        (
            json!({"workflow_id": "txt2img_sdxl", "parameters": {}}),
            "parameters.prompt",
            "required",
        ),
        (json!({"parameters": {}}), "workflow_id", "required"),
        (
            json!({"workflow_id": "image_blur", "max_attempts": 1000}),
            "max_attempts",
            "between",
        ),
        (
            json!({"workflow_id": "image_blur", "parameters": [1, 2]}),
            "parameters",
            "object",
        ),
    ];
    for (body, field, needle) in cases {
        let (status, resp) = app.post_json("/api/job", &body).await;
        assert_eq!(status, 422, "{body} -> {resp}");
        assert_eq!(resp["error"]["code"], "validation_failed");
        assert_eq!(resp["error"]["field"], field, "{resp}");
        let message = resp["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    assert_eq!(job_count(&app).await, 0, "nothing was stored");

    // Unknown ids and routes.
    let (status, b) = app
        .get("/api/job/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(status, 404);
    assert_eq!(b["error"]["code"], "not_found");
    let (status, _) = app.get("/api/job/nope/events").await;
    assert_eq!(status, 404);
    let (status, _) = app.post_json("/api/job/nope/cancel", &json!({})).await;
    assert_eq!(status, 404);
    let (status, b) = app.get("/api/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(b["error"]["code"], "not_found");
    let r = c
        .delete(format!("{}/api/jobs", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "method_not_allowed");

    // Bad history filters.
    let (status, b) = app.get("/api/jobs?status=done").await;
    assert_eq!(
        (status, b["error"]["field"].as_str()),
        (422, Some("status"))
    );
    let (status, b) = app.get("/api/jobs?submitted_after=yesterday").await;
    assert_eq!(
        (status, b["error"]["field"].as_str()),
        (422, Some("submitted_after"))
    );
    let (status, b) = app.get("/api/jobs?cursor=xyz").await;
    assert_eq!(
        (status, b["error"]["field"].as_str()),
        (422, Some("cursor"))
    );
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job_and_refuses_another_manifest_across_restarts() {
    let app = spawn_app().await;
    let manifest = json!({"workflow_id": "image_blur", "idempotency_key": "sb-sc01-v3", "metadata": {"shot": "sc01"}});
    let (s1, first) = app.post_json("/api/job", &manifest).await;
    assert_eq!(s1, 201);
    let (s2, again) = app.post_json("/api/job", &manifest).await;
    assert_eq!(s2, 200, "{again}");
    assert_eq!(again["job_id"], first["job_id"]);

    let app = app.restart().await;
    let (s3, after) = app.post_json("/api/job", &manifest).await;
    assert_eq!(s3, 200);
    assert_eq!(after["job_id"], first["job_id"]);
    let other = json!({"workflow_id": "image_blur", "idempotency_key": "sb-sc01-v3", "metadata": {"shot": "sc02"}});
    let (s4, conflict) = app.post_json("/api/job", &other).await;
    assert_eq!(s4, 409, "{conflict}");
    assert!(conflict["error"]["message"]
        .as_str()
        .unwrap()
        .contains(first["job_id"].as_str().unwrap()));
    assert_eq!(job_count(&app).await, 1);
}

#[tokio::test]
async fn a_job_survives_a_restart_of_the_server() {
    let app = spawn_app().await;
    let id = app
        .submit_blur(json!({"metadata": {"shot": "sh010"}}))
        .await;
    let before = app.job(&id).await;
    let app = app.restart().await;
    let after = app.job(&id).await;
    assert_eq!(before, after);
    let (_, events) = app.get(&format!("/api/job/{id}/events")).await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_history_filters_by_status_workflow_metadata_and_time() {
    let app = spawn_app().await;
    let a = app
        .submit_blur(json!({"metadata": {"shot": "sc01_sh010", "take": 1}}))
        .await;
    let b = app
        .submit_blur(json!({"metadata": {"shot": "sc01_sh020"}}))
        .await;
    let (_, c) = app
        .post_json("/api/job", &json!({"workflow_id": "txt2img_sdxl", "parameters": {"prompt": "x"}, "metadata": {"shot": "sc01_sh010"}}))
        .await;
    let c = c["job_id"].as_str().unwrap().to_string();
    let (status, _) = app
        .post_json(&format!("/api/job/{b}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);

    let ids = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = app.get("/api/jobs").await;
    assert_eq!(ids(&all), [c.clone(), b.clone(), a.clone()], "newest first");
    let (_, v) = app.get("/api/jobs?status=cancelled").await;
    assert_eq!(ids(&v), vec![b.clone()]);
    let (_, v) = app.get("/api/jobs?status=queued&status=cancelled").await;
    assert_eq!(ids(&v).len(), 3);
    let (_, v) = app.get("/api/jobs?workflow_id=txt2img_sdxl").await;
    assert_eq!(ids(&v), vec![c.clone()]);
    let (_, v) = app.get("/api/jobs?metadata.shot=sc01_sh010").await;
    assert_eq!(ids(&v), [c.clone(), a.clone()]);
    let (_, v) = app
        .get("/api/jobs?metadata.shot=sc01_sh010&metadata.take=1")
        .await;
    assert_eq!(ids(&v), vec![a.clone()]);
    let (_, v) = app
        .get("/api/jobs?metadata.shot=sc01_sh010&workflow_id=image_blur&status=queued")
        .await;
    assert_eq!(ids(&v), vec![a.clone()]);

    let b_time = app.job(&b).await["submitted_at"]
        .as_str()
        .unwrap()
        .to_string();
    let enc = |s: &str| s.replace('+', "%2B");
    let (_, v) = app
        .get(&format!("/api/jobs?submitted_after={}", enc(&b_time)))
        .await;
    assert_eq!(ids(&v), [c.clone(), b.clone()]);
    let (_, v) = app
        .get(&format!("/api/jobs?submitted_before={}", enc(&b_time)))
        .await;
    assert_eq!(ids(&v), vec![a.clone()]);
    let (_, v) = app
        .get("/api/jobs?submitted_after=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(ids(&v), Vec::<String>::new());
}

#[tokio::test]
async fn how_far_a_batch_got_is_counted_with_the_historys_filters() {
    let app = spawn_app().await;
    let night = |n: u32| json!({"metadata": {"batch": "night1", "n": n}});
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(app.submit_blur(night(n)).await);
    }
    let other = app
        .submit_blur(json!({"metadata": {"batch": "day1"}}))
        .await;
    app.post_json(&format!("/api/job/{}/cancel", ids[0]), &json!({}))
        .await;
    app.post_json(&format!("/api/job/{}/pause", ids[1]), &json!({}))
        .await;
    app.post_json(&format!("/api/job/{other}/cancel"), &json!({}))
        .await;

    let (status, c) = app.get("/api/jobs/counts?metadata.batch=night1").await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["total"], 5, "{c}");
    assert_eq!(c["jobs"]["queued"], 4, "{c}");
    assert_eq!(c["jobs"]["cancelled"], 1, "{c}");
    assert_eq!(c["jobs"]["completed"], 0, "every status is named: {c}");
    assert_eq!(c["paused"], 1, "{c}");
    let first = app.job(&ids[0]).await;
    assert_eq!(c["first_submitted_at"], first["submitted_at"], "{c}");
    assert_eq!(c["last_finished_at"], first["finished_at"], "{c}");
    // Its pace: since its first submission (under 15 minutes ago), none
    // that ran ended (the cancelled one never ran): no estimate.
    assert_eq!(c["pace_since"], first["submitted_at"], "{c}");
    assert_eq!(c["ended_recently"], 0, "{c}");
    assert_eq!(c["estimated_end"], Value::Null, "{c}");
    // Every filter of the history applies, the status too.
    let (_, c) = app
        .get("/api/jobs/counts?metadata.batch=night1&status=cancelled")
        .await;
    assert_eq!(
        (c["total"].clone(), c["paused"].clone()),
        (json!(1), json!(0)),
        "{c}"
    );
    let (_, c) = app.get("/api/jobs/counts?paused=true").await;
    assert_eq!(c["total"], 1, "{c}");
    let (_, c) = app.get("/api/jobs/counts?metadata.batch=none").await;
    assert_eq!(c["total"], 0, "{c}");
    assert_eq!(c["first_submitted_at"], Value::Null, "{c}");
    // With no filter: every job (from the counts the triggers keep).
    let (_, c) = app.get("/api/jobs/counts").await;
    assert_eq!(c["total"], 6, "{c}");
    assert_eq!(c["jobs"]["cancelled"], 2, "{c}");
    assert_eq!(c["paused"], 1, "{c}");
    assert_eq!(c["last_finished_at"], app.job(&other).await["finished_at"]);
    assert_eq!(c["ended_recently"], 0, "{c}");
    // A count is of every job: a page's parameters are refused, by name.
    let (status, body) = app
        .get("/api/jobs/counts?metadata.batch=night1&limit=10")
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "limit", "{body}");
    // The counts of a batch are read through its metadata's index.
    let plan = app
        .store
        .explain_count(&orchestrator::store::JobFilter {
            metadata: vec![("batch".into(), "night1".into())],
            ..Default::default()
        })
        .await
        .unwrap()
        .join(" | ");
    assert!(!plan.contains("SCAN"), "{plan}");
}

#[tokio::test]
async fn pagination_returns_each_job_exactly_once_while_new_jobs_arrive() {
    let app = spawn_app().await;
    let mut expected = Vec::new();
    for _ in 0..45 {
        expected.push(app.submit_blur(json!({})).await);
    }
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/jobs?limit=10&cursor={c}"),
            None => "/api/jobs?limit=10".to_string(),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["job_id"].as_str().unwrap().to_string());
        }
        // New jobs keep arriving between pages.
        app.submit_blur(json!({})).await;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no job twice");
    expected.reverse();
    assert_eq!(
        seen, expected,
        "every job that existed at the start, newest first"
    );
}

#[tokio::test]
async fn cancel_of_a_queued_job_is_final() {
    let app = spawn_app().await;
    let id = app.submit_blur(json!({})).await;
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    let job = app.job(&id).await;
    assert_eq!(job["status"], "cancelled");
    assert!(job["finished_at"].is_string());
    let (status, body) = app
        .post_json(&format!("/api/job/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "invalid_state");
    let (_, events) = app.get(&format!("/api/job/{id}/events")).await;
    let kinds: Vec<_> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["submitted", "cancelled"]);
}

#[tokio::test]
async fn a_priority_change_answers_with_the_job_and_refuses_what_it_cannot_do() {
    let app = spawn_app().await;
    let id = app.submit_blur(json!({})).await;
    let path = format!("/api/job/{id}/priority");
    let (status, job) = app.post_json(&path, &json!({"priority": -7})).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["job_id"], id.as_str());
    assert_eq!(job["priority"], -7);
    assert_eq!(job["status"], "queued");
    assert!(job["waiting_for"].is_string(), "{job}");
    assert_eq!(app.job(&id).await["priority"], -7);

    // Each bad body names `priority` and changes nothing.
    for (body, says) in [
        (json!({}), "is required"),
        (json!({"priority": null}), "is required"),
        (
            json!({"priority": "high"}),
            "must be an integer from -1000 to 1000, got \"high\"",
        ),
        (json!({"priority": 1.5}), "got 1.5"),
        (json!({"priority": 5000}), "got 5000"),
        (json!([3]), "is required"),
    ] {
        let (status, b) = app.post_json(&path, &body).await;
        assert_eq!(status, 422, "{body} -> {b}");
        assert_eq!(b["error"]["field"], "priority", "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(says),
            "{body} -> {b}"
        );
    }
    let r = app
        .client
        .post(format!("{}{path}", app.url))
        .header("content-type", "application/json")
        .body("{\"priority\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(app.job(&id).await["priority"], -7);

    let (status, b) = app
        .post_json("/api/job/no-such-job/priority", &json!({"priority": 1}))
        .await;
    assert_eq!(status, 404, "{b}");

    // A job that ended takes no new priority.
    app.post_json(&format!("/api/job/{id}/cancel"), &json!({}))
        .await;
    let (status, b) = app.post_json(&path, &json!({"priority": 9})).await;
    assert_eq!(status, 409, "{b}");
    assert_eq!(b["error"]["code"], "invalid_state");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already cancelled"),
        "{b}"
    );
    assert_eq!(app.job(&id).await["priority"], -7);
    let kinds = app.event_kinds(&id).await;
    assert_eq!(kinds, ["submitted", "priority_changed", "cancelled"]);
}

#[tokio::test]
async fn health_reports_the_database_and_job_counts() {
    let app = spawn_app().await;
    app.submit_blur(json!({})).await;
    app.submit_blur(json!({})).await;
    let (status, h) = app.get("/api/health").await;
    assert_eq!(status, 200);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["database"], "ok");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_s"].is_u64());
    assert_eq!(h["jobs"]["queued"], 2);
    assert_eq!(h["jobs"]["running"], 0);
}

#[tokio::test]
async fn health_answers_503_when_the_database_is_not_usable() {
    let app = spawn_app().await;
    app.store.close().await;
    let (status, h) = app.get("/api/health").await;
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "error");
    assert_ne!(h["database"], "ok");
}

#[tokio::test]
async fn backends_from_the_config_are_listed_and_stored() {
    let (mut config, dir) = test_config();
    config.backends = orchestrator::config::Config::from_yaml(
        "backends:\n  - {id: node1, name: \"Beast (5090)\", host: 127.0.0.1, port: 1, enabled: true}\n",
    )
    .unwrap()
    .backends;
    let app = spawn_with(config).await;
    let (status, b) = app.get("/api/backends").await;
    assert_eq!(status, 200);
    assert_eq!(b["backends"][0]["id"], "node1");
    assert_eq!(b["backends"][0]["name"], "Beast (5090)");
    assert_eq!(b["backends"][0]["url"], "http://127.0.0.1:1");
    assert!(b["backends"][0]["client_id"].as_str().unwrap().len() == 36);
    let client_id = b["backends"][0]["client_id"].clone();
    let app = app.restart().await;
    let (_, b) = app.get("/api/backends").await;
    assert_eq!(
        b["backends"][0]["client_id"], client_id,
        "client id kept across restarts"
    );
    drop(dir);
}

#[tokio::test]
async fn with_no_backends_the_api_says_jobs_wait() {
    let app = spawn_app().await;
    let (status, b) = app.get("/api/backends").await;
    assert_eq!(status, 200);
    assert_eq!(b["backends"], json!([]));
    assert!(b["message"].as_str().unwrap().contains("wait"));
}

#[tokio::test]
async fn workflows_are_listed_with_their_parameters() {
    let app = spawn_app().await;
    let (status, w) = app.get("/api/workflows").await;
    assert_eq!(status, 200);
    let blur = w["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "image_blur")
        .unwrap();
    let width = blur["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "width")
        .unwrap();
    assert_eq!(width["type"], "int");
    assert_eq!(width["default"], 512);
    assert_eq!(width["min"], 16.0);
    assert_eq!(width["max"], 8192.0);
}

#[tokio::test]
async fn a_template_dropped_in_the_folder_is_usable_without_restart() {
    let app = spawn_app().await;
    std::fs::create_dir_all(&app.config.workflows_dir).unwrap();
    let graph = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}});
    std::fs::write(
        app.config.workflows_dir.join("tiny.json"),
        graph.to_string(),
    )
    .unwrap();
    std::fs::write(
        app.config.workflows_dir.join("tiny.yaml"),
        "parameters:\n  size:\n    type: int\n    default: 8\n    min: 1\n    max: 64\n    target: [1.inputs.width, 1.inputs.height]\n",
    )
    .unwrap();
    let (status, _) = app.post_json("/api/workflows/reload", &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "tiny", "parameters": {"size": 32}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let job = app.job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["graph"]["1"]["inputs"]["width"], 32);
    assert_eq!(job["graph"]["1"]["inputs"]["height"], 32);
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_the_docs_page_is_served() {
    let app = spawn_app().await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/job",
        "/api/job/{id}",
        "/api/job/{id}/events",
        "/api/job/{id}/cancel",
        "/api/job/{id}/priority",
        "/api/job/{id}/pause",
        "/api/batch/{batch}/resume",
        "/api/jobs",
        "/api/jobs/counts",
        "/api/health",
        "/api/backends",
        "/api/workflows",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    // Every schema a route or a schema names is in the document (a client
    // generated from it would fail on one that is not).
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v.as_str()) {
                        ("$ref", Some(r)) => out.push(r.to_string()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut named = Vec::new();
    refs(&doc, &mut named);
    assert!(named.len() > 20, "{named:?}");
    for r in &named {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(r);
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} is named but not in the document"
        );
    }
    let counts = &doc["components"]["schemas"]["JobCounts"]["properties"];
    for field in ["estimated_end", "failures", "pace_since", "ended_recently"] {
        assert!(counts[field].is_object(), "JobCounts.{field}: {counts}");
    }
    // The page and the count take the history's filters; only the page a
    // limit and a cursor.
    let names = |path: &str| -> Vec<String> {
        paths[path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    for path in ["/api/jobs", "/api/jobs/counts"] {
        for name in ["status", "workflow_id", "backend", "paused", "metadata.KEY"] {
            assert!(names(path).contains(&name.to_string()), "{path}: {name}");
        }
    }
    assert!(names("/api/jobs").contains(&"limit".to_string()));
    assert!(!names("/api/jobs/counts").contains(&"limit".to_string()));
    let r = app
        .client
        .get(format!("{}/docs/", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    assert!(
        !html.contains("unpkg.com") && !html.contains("cdn."),
        "the docs page must not need the internet"
    );
}

#[tokio::test]
async fn connection_settings_reach_every_connection() {
    let app = spawn_app().await;
    for _ in 0..4 {
        assert_eq!(app.store.pragma("journal_mode").await.unwrap(), "wal");
        assert_eq!(app.store.pragma("synchronous").await.unwrap(), "2", "FULL");
        assert_eq!(app.store.pragma("foreign_keys").await.unwrap(), "1");
        assert_eq!(app.store.pragma("busy_timeout").await.unwrap(), "5000");
    }
    assert_eq!(
        app.store.writer_pragma("journal_mode").await.unwrap(),
        "wal"
    );
    assert_eq!(app.store.writer_pragma("synchronous").await.unwrap(), "2");
    assert_eq!(app.store.writer_pragma("foreign_keys").await.unwrap(), "1");
}

#[tokio::test]
async fn a_second_orchestrator_on_the_same_data_folder_refuses_to_start() {
    let app = spawn_app().await;
    let err = orchestrator::server::Service::start(app.config.clone())
        .await
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("another orchestrator is already running"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_full_disk_answers_503_and_stores_nothing_half_written() {
    let app = spawn_app().await;
    let id = app.submit_blur(json!({})).await;
    let pages: i64 = app
        .store
        .writer_pragma("page_count")
        .await
        .unwrap()
        .parse()
        .unwrap();
    app.store.set_max_page_count(pages).await.unwrap();
    let big = "x".repeat(200_000);
    let (status, body) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_blur", "metadata": {"note": big}}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_full");
    let (_, list) = app.get("/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (_, h) = app.get("/api/health").await;
    assert_eq!(h["jobs"]["queued"], 1, "counts unchanged: {h}");
    // Space is back: the service recovers by itself.
    app.store.set_max_page_count(1_000_000_000).await.unwrap();
    let (status, _) = app
        .post_json(
            "/api/job",
            &json!({"workflow_id": "image_blur", "metadata": {"note": big}}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(app.job(&id).await["status"], "queued");
}

#[tokio::test]
async fn a_database_locked_by_another_program_answers_503_saying_so_and_health_warns() {
    use sqlx::{Connection, Executor};
    let app = spawn_app().await;
    let id = app.submit_blur(json!({})).await;
    // An operator's sqlite3 shell in the middle of a write of its own.
    let path = app.config.database_path();
    let mut shell = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    shell.execute("BEGIN IMMEDIATE").await.unwrap();
    // The submission waits for the lock (SQLite's busy timeout), then is
    // refused: nothing stored, and the answer says why.
    let (status, body) = app
        .post_json("/api/job", &json!({"workflow_id": "image_blur"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("locked by another program") && message.contains("nothing was stored"),
        "{message}"
    );
    let warnings = app.health_warnings().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("the database is locked by another program")),
        "{warnings:?}"
    );
    // Reads go on meanwhile.
    assert_eq!(job_count(&app).await, 1);
    shell.execute("ROLLBACK").await.unwrap();
    drop(shell);
    let (status, body) = app
        .post_json("/api/job", &json!({"workflow_id": "image_blur"}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(job_count(&app).await, 2);
    assert_eq!(app.job(&id).await["status"], "queued");
}

#[tokio::test]
async fn history_queries_are_served_by_indexes() {
    let app = spawn_app().await;
    use orchestrator::store::JobFilter;
    let cases = [
        (
            JobFilter {
                limit: 50,
                ..Default::default()
            },
            "PRIMARY KEY",
        ),
        (
            JobFilter {
                limit: 50,
                statuses: vec![orchestrator::store::JobStatus::Queued],
                ..Default::default()
            },
            "jobs_by_status",
        ),
        (
            JobFilter {
                limit: 50,
                workflow_id: Some("image_blur".into()),
                ..Default::default()
            },
            "jobs_by_workflow",
        ),
        (
            JobFilter {
                limit: 50,
                backend_id: Some("node1".into()),
                ..Default::default()
            },
            "jobs_by_backend",
        ),
        (
            JobFilter {
                limit: 50,
                metadata: vec![("shot".into(), "x".into())],
                ..Default::default()
            },
            "PRIMARY KEY",
        ),
    ];
    for (filter, index) in cases {
        let plan = app.store.explain_list(&filter).await.unwrap().join(" | ");
        assert!(
            !plan.contains("SCAN j ") && !plan.contains("SCAN jobs") || plan.contains("USING"),
            "{filter:?}: {plan}"
        );
        assert!(
            plan.contains(index),
            "{filter:?} should use {index}: {plan}"
        );
        assert!(
            !plan.contains("TEMP B-TREE"),
            "{filter:?} sorts in memory: {plan}"
        );
    }
}

#[tokio::test]
async fn metadata_of_every_json_type_can_be_filtered_on() {
    let app = spawn_app().await;
    let id = app
        .submit_blur(json!({"metadata": {"shot": "sc01", "take": 3, "ratio": 1.5, "final": true, "none": null, "tags": ["a"]}}))
        .await;
    for q in [
        "shot=sc01",
        "take=3",
        "ratio=1.5",
        "final=true",
        "none=null",
        "tags=%5B%22a%22%5D",
    ] {
        let (_, v) = app.get(&format!("/api/jobs?metadata.{q}")).await;
        assert_eq!(v["jobs"][0]["job_id"], id.as_str(), "metadata.{q}");
    }
    let (_, v) = app.get("/api/jobs?metadata.final=false").await;
    assert_eq!(v["jobs"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_with_one_idempotency_key_make_one_job() {
    let app = spawn_app().await;
    let manifest = json!({"workflow_id": "image_blur", "idempotency_key": "burst-1"});
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (client, url, m) = (app.client.clone(), app.url.clone(), manifest.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{url}/api/job"))
                .json(&m)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == 201 || status == 200, "{status} {body}");
        created += (status == 201) as usize;
        ids.insert(body["job_id"].as_str().unwrap().to_string());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(job_count(&app).await, 1);
    // Different manifests under one key in the same burst: one wins, the others conflict.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (client, url) = (app.client.clone(), app.url.clone());
        tasks.push(tokio::spawn(async move {
            let m = json!({"workflow_id": "image_blur", "idempotency_key": "burst-2", "metadata": {"i": i}});
            client.post(format!("{url}/api/job")).json(&m).send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        9,
        "{statuses:?}"
    );
}

/// What one read of a job's page must never show, whatever the farm is doing
/// at that moment: the page is one snapshot.
fn coherent(job: &Value) -> Result<(), String> {
    let leases = job["leases"].as_array().ok_or("no leases list")?;
    let open: Vec<&Value> = leases.iter().filter(|l| l["outcome"].is_null()).collect();
    let ok = match job["status"].as_str().ok_or("no status")? {
        "queued" => open.is_empty() && job["backend_id"].is_null(),
        "assigned" | "running" => open.len() == 1 && open[0]["backend_id"] == job["backend_id"],
        "completed" => {
            open.is_empty()
                && leases.last().is_some_and(|l| l["outcome"] == "completed")
                && !job["outputs"].as_array().is_some_and(Vec::is_empty)
        }
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(job.to_string())
    }
}

#[tokio::test]
async fn a_jobs_page_is_one_snapshot_while_the_farm_works_on_it() {
    let a = start_sim(0).await;
    let b = start_sim(0).await;
    let app = std::sync::Arc::new(
        spawn_farm_online(vec![
            backend("a", a.port, &[], 2),
            backend("b", b.port, &[], 2),
        ])
        .await,
    );
    // Each job read over and over from its submission to its end, while
    // the others are leased, run and completed around it.
    let mut readers = tokio::task::JoinSet::new();
    for i in 0..24 {
        let id = app.submit_blur(json!({"parameters": {"color": i}})).await;
        let app = app.clone();
        readers.spawn(async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut reads = 0;
            loop {
                let job = app.job(&id).await;
                reads += 1;
                coherent(&job).map_err(|j| format!("read {reads}: {j}"))?;
                if job["status"] == "completed" {
                    return Ok::<usize, String>(reads);
                }
                assert!(std::time::Instant::now() < deadline, "{id} never completed");
            }
        });
    }
    let mut reads = 0;
    while let Some(r) = readers.join_next().await {
        reads += r
            .unwrap()
            .unwrap_or_else(|e| panic!("an incoherent page: {e}"));
    }
    assert!(reads >= 24, "{reads}");
}
