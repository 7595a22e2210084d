//! The inbox folder: manifests dropped as files become jobs exactly once.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn spawn_inbox_app() -> (TestApp, PathBuf) {
    spawn_inbox_app_with(|_| {}).await
}

async fn spawn_inbox_app_with(
    change: impl FnOnce(&mut orchestrator::config::Config),
) -> (TestApp, PathBuf) {
    let (mut config, dir) = test_config();
    change(&mut config);
    config.inbox.settle_ms = 200;
    config.inbox.rescan_interval_ms = 200;
    config.limits.max_body_bytes = 4096;
    let inbox = config.data_dir.join("inbox");
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    poll("the inbox folders", || async {
        inbox.join("accepted").is_dir().then_some(())
    })
    .await;
    (app, inbox)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn manifest(batch: &str, n: usize) -> String {
    json!({"workflow_id": "image_blur", "parameters": {"width": 16 + n % 100}, "metadata": {"batch": batch, "n": n}}).to_string()
}

async fn jobs_of_batch(base: &str, batch: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/jobs?limit=1000&metadata.batch={batch}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        all.extend(page["jobs"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return all,
        }
    }
}

/// Every file of the batch was accepted once: one job per `n`, one accepted file per job.
fn assert_exactly_once(jobs: &[Value], accepted: &[String], count: usize) {
    let ns: HashSet<u64> = jobs
        .iter()
        .map(|j| j["metadata"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(jobs.len(), count, "one job per file");
    assert_eq!(ns.len(), count, "no file submitted twice");
    let ids: HashSet<&str> = jobs.iter().map(|j| j["job_id"].as_str().unwrap()).collect();
    assert_eq!(accepted.len(), count);
    for name in accepted {
        let id = name.rsplit('.').nth(1).unwrap();
        assert!(ids.contains(id), "{name} names a job of the batch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_manifests_dropped_at_once_become_jobs_exactly_once() {
    let (app, inbox) = spawn_inbox_app().await;
    for n in 0..500 {
        std::fs::write(inbox.join(format!("shot_{n:03}.json")), manifest("b500", n)).unwrap();
    }
    let accepted = poll("500 accepted files", || async {
        let a = names(&inbox.join("accepted"));
        (a.len() == 500).then_some(a)
    })
    .await;
    assert!(
        names(&inbox).iter().all(|n| !n.ends_with(".json")),
        "{:?}",
        names(&inbox)
    );
    assert!(accepted[0].starts_with("shot_000."), "{}", accepted[0]);
    let jobs = jobs_of_batch(&app.url, "b500").await;
    assert_exactly_once(&jobs, &accepted, 500);
    assert!(names(&inbox.join("rejected")).is_empty());
}

#[tokio::test]
async fn a_file_being_written_is_not_taken_until_it_is_complete() {
    let (app, inbox) = spawn_inbox_app().await;
    // A writer that does not use the tmp-then-rename convention, and pauses mid-file.
    let text = manifest("slow", 1);
    let (first, rest) = text.split_at(text.len() / 2);
    let path = inbox.join("slow.json");
    std::fs::write(&path, first).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await; // the writer is slow; not synchronisation
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(rest.as_bytes()).unwrap();
    }
    // The convention: a dotfile (or NAME.json.tmp) is never read, then renamed.
    let hidden = inbox.join(".renamed.json");
    std::fs::write(&hidden, manifest("slow", 2)).unwrap();
    let tmp = inbox.join("other.json.tmp");
    std::fs::write(&tmp, manifest("slow", 3)).unwrap();
    std::fs::rename(&hidden, inbox.join("renamed.json")).unwrap();
    std::fs::rename(&tmp, inbox.join("other.json")).unwrap();
    let accepted = poll("three accepted files", || async {
        let a = names(&inbox.join("accepted"));
        (a.len() == 3).then_some(a)
    })
    .await;
    assert!(
        names(&inbox.join("rejected")).is_empty(),
        "the half-written file was never read half"
    );
    let jobs = jobs_of_batch(&app.url, "slow").await;
    assert_exactly_once(&jobs, &accepted, 3);
}

#[tokio::test]
async fn invalid_manifests_land_in_rejected_with_the_api_error_beside_them() {
    let (app, inbox) = spawn_inbox_app().await;
    std::fs::write(inbox.join("broken.json"), "{\"workflow_id\": ").unwrap();
    std::fs::write(
        inbox.join("wrong.json"),
        json!({"workflow_id": "image_blur", "parameters": {"width": 99999}}).to_string(),
    )
    .unwrap();
    std::fs::write(
        inbox.join("huge.json"),
        format!(
            "{{\"workflow_id\": \"image_blur\", \"metadata\": {{\"x\": \"{}\"}}}}",
            "a".repeat(5000)
        ),
    )
    .unwrap();
    // An error file is written aside (a hidden `.part`) and renamed: once
    // all six are there and nothing is half-written, each reads whole.
    let rejected = poll("three rejected files and their errors", || async {
        let r = names(&inbox.join("rejected"));
        (r.len() >= 6 && !r.iter().any(|n| n.starts_with('.'))).then_some(r)
    })
    .await;
    assert_eq!(
        rejected,
        [
            "broken.json",
            "broken.json.error.json",
            "huge.json",
            "huge.json.error.json",
            "wrong.json",
            "wrong.json.error.json"
        ]
    );
    let read = |n: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(inbox.join("rejected").join(n)).unwrap())
            .unwrap()
    };
    assert_eq!(
        read("broken.json.error.json")["error"]["code"],
        "malformed_json"
    );
    let wrong = read("wrong.json.error.json");
    assert_eq!(wrong["error"]["code"], "validation_failed");
    assert_eq!(wrong["error"]["field"], "parameters.width");
    assert_eq!(
        read("huge.json.error.json")["error"]["code"],
        "payload_too_large"
    );
    let (_, list) = app.get("/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "nothing stored");
    // The same name rejected again does not overwrite the first.
    std::fs::write(inbox.join("wrong.json"), "[]").unwrap();
    poll("a second rejected copy", || async {
        inbox.join("rejected/wrong-2.json").exists().then_some(())
    })
    .await;
}

#[tokio::test]
async fn hidden_files_other_extensions_subfolders_and_links_are_left_alone() {
    let (app, inbox) = spawn_inbox_app().await;
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("secret.json");
    std::fs::write(&target, manifest("alone", 1)).unwrap();
    std::os::unix::fs::symlink(&target, inbox.join("link.json")).unwrap();
    std::fs::write(inbox.join(".hidden.json"), manifest("alone", 2)).unwrap();
    std::fs::write(inbox.join("notes.txt"), "hello").unwrap();
    std::fs::create_dir_all(inbox.join("sub")).unwrap();
    std::fs::write(inbox.join("sub/nested.json"), manifest("alone", 3)).unwrap();
    // A regular file dropped after them is taken: the scans ran over the others.
    std::fs::write(inbox.join("real.json"), manifest("alone", 4)).unwrap();
    poll("the regular file", || async {
        (names(&inbox.join("accepted")).len() == 1).then_some(())
    })
    .await;
    let jobs = jobs_of_batch(&app.url, "alone").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["metadata"]["n"], 4);
    for kept in ["link.json", ".hidden.json", "notes.txt", "sub"] {
        assert!(
            inbox.join(kept).symlink_metadata().is_ok(),
            "{kept} was touched"
        );
    }
    assert!(
        target.exists(),
        "a link target outside the inbox is never moved"
    );
    assert!(inbox.join("sub/nested.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_the_middle_of_a_batch_accepts_every_file_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "inbox: {settle_ms: 100, rescan_interval_ms: 100}\n",
    );
    let inbox = dir.path().join("data/inbox");
    let bin = spawn_binary(&config).await;
    poll("the inbox folders", || async {
        inbox.join("accepted").is_dir().then_some(())
    })
    .await;
    for n in 0..300 {
        std::fs::write(inbox.join(format!("k{n:03}.json")), manifest("kill", n)).unwrap();
    }
    poll("some files accepted", || async {
        (names(&inbox.join("accepted")).len() >= 30).then_some(())
    })
    .await;
    bin.kill9().await;
    let before = names(&inbox.join("accepted")).len();
    let bin = spawn_binary(&config).await;
    let accepted = poll("every file accepted", || async {
        let a = names(&inbox.join("accepted"));
        (a.len() == 300).then_some(a)
    })
    .await;
    assert!(
        before < 300,
        "the kill came in the middle of the batch ({before} accepted)"
    );
    let jobs = jobs_of_batch(&bin.url, "kill").await;
    assert_exactly_once(&jobs, &accepted, 300);
    bin.kill9().await;
}

#[tokio::test]
async fn a_file_seen_again_after_a_crash_before_its_move_is_not_submitted_twice() {
    let (app, inbox) = spawn_inbox_app().await;
    std::fs::write(inbox.join("once.json"), manifest("again", 1)).unwrap();
    let accepted = poll("accepted", || async {
        names(&inbox.join("accepted")).pop()
    })
    .await;
    // As if the service died after storing the job but before moving the
    // file: the same file (same name, time, size, content) is back in place.
    std::fs::rename(
        inbox.join("accepted").join(&accepted),
        inbox.join("once.json"),
    )
    .unwrap();
    poll("accepted again", || async {
        (!inbox.join("once.json").exists()).then_some(())
    })
    .await;
    assert_eq!(
        names(&inbox.join("accepted")),
        vec![accepted.clone()],
        "moved under the same job id"
    );
    let jobs = jobs_of_batch(&app.url, "again").await;
    assert_eq!(jobs.len(), 1);
    // The same content dropped anew later is a new job.
    tokio::time::sleep(Duration::from_millis(20)).await; // a later write gets a later modification time
    std::fs::write(inbox.join("once.json"), manifest("again", 1)).unwrap();
    poll("a second job", || async {
        (names(&inbox.join("accepted")).len() == 2).then_some(())
    })
    .await;
    assert_eq!(jobs_of_batch(&app.url, "again").await.len(), 2);
}

#[tokio::test]
async fn a_second_pass_dropped_before_its_first_waits_for_it_and_chains_by_key() {
    let (app, inbox) = spawn_inbox_app().await;
    // The second pass names the first by the key the tool gave it, and
    // arrives first (a drop's files come in any order).
    let second = json!({"workflow_id": "image_invert",
        "parameters": {"image": "job:key:sc01/sh010/pass1"}, "metadata": {"pass": 2}});
    std::fs::write(inbox.join("sh010_pass2.json"), second.to_string()).unwrap();
    // Two files dropped after it, one after the other, are taken; the
    // second pass stays (not rejected).
    for stem in ["other", "other2"] {
        std::fs::write(inbox.join(format!("{stem}.json")), manifest(stem, 1)).unwrap();
        poll(&format!("{stem}.json accepted"), || async {
            names(&inbox.join("accepted"))
                .iter()
                .any(|n| n.starts_with(&format!("{stem}.")))
                .then_some(())
        })
        .await;
    }
    assert!(inbox.join("sh010_pass2.json").exists());
    assert!(names(&inbox.join("rejected")).is_empty());
    // The service says why it is still there, and until when.
    let health = app.get("/api/health").await.1;
    let waiting = &health["inbox_waiting"];
    assert_eq!(waiting.as_array().map(Vec::len), Some(1), "{health}");
    assert_eq!(waiting[0]["file"], "sh010_pass2.json", "{health}");
    assert!(
        waiting[0]["message"]
            .as_str()
            .unwrap()
            .contains("no job here has the idempotency key `sc01/sh010/pass1`"),
        "{health}"
    );
    let since =
        chrono::DateTime::parse_from_rfc3339(waiting[0]["since"].as_str().unwrap()).unwrap();
    let until =
        chrono::DateTime::parse_from_rfc3339(waiting[0]["rejected_after"].as_str().unwrap())
            .unwrap();
    assert_eq!(until - since, chrono::Duration::seconds(600), "{health}");
    // The first pass comes: both are taken, the second starting from it.
    let first = json!({"workflow_id": "image_blur", "idempotency_key": "sc01/sh010/pass1",
        "metadata": {"pass": 1}});
    std::fs::write(inbox.join("sh010_pass1.json"), first.to_string()).unwrap();
    let accepted = poll("both passes accepted", || async {
        let a = names(&inbox.join("accepted"));
        (a.iter().filter(|n| n.starts_with("sh010_")).count() == 2).then_some(a)
    })
    .await;
    let id_of = |stem: &str| {
        let name = accepted.iter().find(|n| n.starts_with(stem)).unwrap();
        name.rsplit('.').nth(1).unwrap().to_string()
    };
    let (first_id, second_id) = (id_of("sh010_pass1."), id_of("sh010_pass2."));
    let job = app.job(&second_id).await;
    assert_eq!(job["status"], "waiting", "{job}");
    assert_eq!(job["starts_from"], json!([first_id]));
    assert_eq!(
        job["graph"]["1"]["inputs"]["image"],
        format!("job:{first_id}")
    );
    let health = app.get("/api/health").await.1;
    assert!(health.get("inbox_waiting").is_none(), "{health}");
}

#[tokio::test]
async fn a_pass_whose_first_never_comes_is_rejected_once_it_waited_long_enough() {
    let (app, inbox) = spawn_inbox_app_with(|c| c.inbox.key_wait_s = 30).await;
    let orphan =
        json!({"workflow_id": "image_invert", "parameters": {"image": "job:key:never-submitted"}})
            .to_string();
    // Dropped a minute ago: it has waited the 30 s it may.
    let path = inbox.join("orphan.json");
    std::fs::write(&path, &orphan).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // Dropped now: it waits, and is listed while it does.
    std::fs::write(inbox.join("fresh.json"), &orphan).unwrap();
    poll("the fresh one listed as waiting", || async {
        let health = app.get("/api/health").await.1;
        (health["inbox_waiting"][0]["file"] == "fresh.json").then_some(())
    })
    .await;
    assert!(inbox.join("fresh.json").exists());
    // Taken away by hand, it is no longer listed.
    std::fs::remove_file(inbox.join("fresh.json")).unwrap();
    poll("the fresh one no longer listed", || async {
        let health = app.get("/api/health").await.1;
        health.get("inbox_waiting").is_none().then_some(())
    })
    .await;
    poll("the orphan rejected", || async {
        inbox
            .join("rejected/orphan.json.error.json")
            .exists()
            .then_some(())
    })
    .await;
    let error: Value = serde_json::from_str(
        &std::fs::read_to_string(inbox.join("rejected/orphan.json.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(error["error"]["field"], "parameters.image", "{error}");
    let msg = error["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no job here has the idempotency key `never-submitted`"),
        "{msg}"
    );
    let (_, list) = app.get("/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
}

/// A batch dropped by day for the night: a file may say `paused` or
/// `start_after`, as a manifest sent over HTTP does; a wrong one is
/// rejected with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_may_hold_its_job_back_paused_or_until_a_time() {
    let (app, inbox) = spawn_inbox_app().await;
    let held = |extra: Value, n: usize| {
        let mut m: Value = serde_json::from_str(&manifest("night", n)).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        m.to_string()
    };
    std::fs::write(inbox.join("a.json"), held(json!({"paused": true}), 1)).unwrap();
    std::fs::write(
        inbox.join("b.json"),
        held(json!({"start_after": "2099-01-01T20:00:00Z"}), 2),
    )
    .unwrap();
    std::fs::write(
        inbox.join("c.json"),
        held(json!({"start_after": "tonight"}), 3),
    )
    .unwrap();
    poll("two accepted, one rejected", || async {
        (names(&inbox.join("accepted")).len() == 2 && names(&inbox.join("rejected")).len() == 2)
            .then_some(())
    })
    .await;
    let jobs = jobs_of_batch(&app.url, "night").await;
    assert_eq!(jobs.len(), 2);
    for j in &jobs {
        let detail = app.job(j["job_id"].as_str().unwrap()).await;
        match j["metadata"]["n"].as_u64() {
            Some(1) => assert!(detail["paused_at"].is_string(), "{detail}"),
            Some(2) => assert!(
                detail["not_before"]
                    .as_str()
                    .unwrap()
                    .starts_with("2099-01-01T20:00:00"),
                "{detail}"
            ),
            _ => panic!("{j}"),
        }
    }
    let why = std::fs::read_to_string(inbox.join("rejected").join("c.json.error.json")).unwrap();
    assert!(why.contains("start_after"), "{why}");
}
