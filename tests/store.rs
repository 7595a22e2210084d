//! The store's lifecycle rules, called directly on a real SQLite file.

mod common;

use chrono::Duration;
use common::*;
use orchestrator::store::{
    AdminState, AttemptOutcome, BackendStats, BackendUpsert, CancelOutcome, CleanupEntry,
    HeldBatch, JobStatus, LeaseTry, LostOutcome, LostRun, OutputRecord, PauseChange, Preference,
    PriorityChange, StoreError,
};
use serde_json::json;

async fn online_backend(app: &TestApp, id: &str) {
    app.store
        .sync_backends(vec![BackendUpsert {
            id: id.into(),
            name: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            url: "http://127.0.0.1:1".into(),
            enabled: true,
            tags: vec![],
            max_inflight: 2,
            hours: None,
            off_hours: false,
        }])
        .await
        .unwrap();
    app.store
        .backend_online(id, BackendStats::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_backend_that_takes_no_jobs_is_told_apart_from_one_that_found_none() {
    // A closed backend's worker stops waiting for rings: on a farm of many
    // disabled boxes, every submission used to ring through all of them.
    let app = spawn_app().await;
    online_backend(&app, "n1").await;
    let try_lease = || app.store.lease_for("n1", None, Preference::default());
    assert!(matches!(try_lease().await.unwrap(), LeaseTry::Nothing));
    let id = app.submit_blur(json!({})).await;
    for admin in [AdminState::Disabled, AdminState::Draining] {
        app.store
            .set_backend_admin_state("n1", admin)
            .await
            .unwrap();
        assert!(
            matches!(try_lease().await.unwrap(), LeaseTry::Closed),
            "{admin:?}"
        );
    }
    app.store
        .set_backend_admin_state("n1", AdminState::Enabled)
        .await
        .unwrap();
    app.store
        .backend_offline("n1", "connection refused".into())
        .await
        .unwrap();
    assert!(
        matches!(try_lease().await.unwrap(), LeaseTry::Closed),
        "offline"
    );
    assert_eq!(app.job(&id).await["status"], "queued", "nothing was leased");
    app.store
        .backend_online("n1", BackendStats::default())
        .await
        .unwrap();
    match try_lease().await.unwrap() {
        LeaseTry::Leased(lease) => assert_eq!(lease.job_id, id),
        other => panic!("expected a lease, got {other:?}"),
    }
    assert!(matches!(try_lease().await.unwrap(), LeaseTry::Nothing));
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_overwrite_the_new_one() {
    // The service runs no worker for this backend: the test plays the dispatcher.
    let app = spawn_app().await;
    online_backend(&app, "n1").await;
    let id = app.submit_blur(json!({})).await;
    let old = app.store.lease_next("n1").await.unwrap().expect("leased");
    assert_eq!(old.job_id, id);
    assert!(app
        .store
        .requeue_lost(&id, old.token, "backend lost it".into(), false)
        .await
        .unwrap());
    let new = app
        .store
        .lease_next("n1")
        .await
        .unwrap()
        .expect("leased again");
    assert_ne!(
        new.prompt_id, old.prompt_id,
        "a new lease gets a new prompt id"
    );
    assert!(new.token > old.token);
    assert_eq!(new.attempt, 1, "a lost lease does not burn an attempt");

    // The stale worker tries every transition: each is refused, nothing changes.
    let events_before = app.events(&id).await.len();
    assert!(matches!(
        app.store.mark_running(&id, old.token).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        app.store.mark_submitted(&id, old.token).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        app.store.complete(&id, old.token, vec![]).await,
        Err(StoreError::LeaseLost)
    ));
    assert_eq!(
        app.store
            .fail_attempt(
                &id,
                old.token,
                false,
                json!({"message": "x"}),
                Duration::zero()
            )
            .await
            .unwrap(),
        AttemptOutcome::LeaseLost
    );
    assert!(!app
        .store
        .requeue_lost(&id, old.token, "stale".into(), false)
        .await
        .unwrap());
    assert!(!app
        .store
        .confirm_stop(&id, old.token, "stale".into())
        .await
        .unwrap());
    let job = app.job(&id).await;
    assert_eq!(job["status"], "assigned");
    assert_eq!(job["prompt_id"], new.prompt_id.as_str());
    assert_eq!(
        app.events(&id).await.len(),
        events_before,
        "no event appended"
    );
    let current = &job["leases"][1];
    assert_eq!(current["prompt_id"], new.prompt_id.as_str());
    assert!(
        current["submitted_at"].is_null()
            && current["started_at"].is_null()
            && current["finished_at"].is_null(),
        "the new lease is untouched: {current}"
    );

    // The current lease works, and answers with what the metrics need
    // (the job's workflow, its submission and start), once.
    let times = app.store.mark_running(&id, new.token).await.unwrap();
    let times = times.expect("it starts running now");
    assert_eq!(times.workflow_id.as_deref(), Some("image_blur"));
    let started = times.started_at.expect("started");
    assert!(times.submitted_at <= started);
    assert!(
        app.store
            .mark_running(&id, new.token)
            .await
            .unwrap()
            .is_none(),
        "running already"
    );
    let done = app.store.complete(&id, new.token, vec![]).await.unwrap();
    assert_eq!(done.times.workflow_id.as_deref(), Some("image_blur"));
    let job = app.job(&id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(
        done.times
            .started_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        job["started_at"].as_str().map(str::to_string),
        "the stored start"
    );
}

#[tokio::test]
async fn a_backend_holds_no_more_than_max_inflight_jobs() {
    let app = spawn_app().await;
    online_backend(&app, "n1").await;
    for _ in 0..3 {
        app.submit_blur(json!({})).await;
    }
    assert!(app.store.lease_next("n1").await.unwrap().is_some());
    assert!(app.store.lease_next("n1").await.unwrap().is_some());
    assert!(
        app.store.lease_next("n1").await.unwrap().is_none(),
        "max_inflight 2"
    );
    app.store
        .backend_offline("n1", "gone".into())
        .await
        .unwrap();
    let (_, h) = app.get("/api/health").await;
    assert_eq!(h["jobs"]["assigned"], 2);
    assert_eq!(h["jobs"]["queued"], 1);
}

#[tokio::test]
async fn workers_racing_for_fewer_jobs_lease_each_once_and_the_rest_learn_none_is_left() {
    // On a large farm a rung worker and a worker whose job just ended both
    // find the same job and go to the writer for it: one leases it; the
    // other must neither take it too nor be told that due jobs wait
    // elsewhere (it would pass its ring on through the idle farm).
    let app = spawn_app().await;
    let ids = ["r1", "r2", "r3", "r4", "r5", "r6"];
    farm(&app, &ids.map(|id| (id, &[][..]))).await;
    let mut jobs = Vec::new();
    for _ in 0..2 {
        jobs.push(app.submit_blur(json!({})).await);
    }
    for round in 0..3 {
        let tries = futures::future::join_all(
            ids.iter()
                .map(|id| app.store.lease_for(id, None, Preference::default())),
        );
        let tries = tokio::time::timeout(std::time::Duration::from_secs(20), tries)
            .await
            .expect("every lease turn ends");
        let mut leased: Vec<String> = Vec::new();
        for t in tries {
            match t.unwrap() {
                LeaseTry::Leased(lease) => leased.push(lease.job_id),
                LeaseTry::Nothing => {}
                other => panic!("round {round}: nothing else is queued, got {other:?}"),
            }
        }
        leased.sort();
        let mut want = jobs.clone();
        want.sort();
        assert_eq!(leased, want, "round {round}: each job leased once");
        for id in &jobs {
            let job = app.job(id).await;
            assert_eq!(job["status"], "assigned", "round {round}");
            assert_eq!(job["attempts"], 1, "round {round}: one lease each");
        }
        // The next round races for two new jobs (every backend has slots
        // left: six jobs in all).
        jobs.clear();
        for _ in 0..2 {
            jobs.push(app.submit_blur(json!({})).await);
        }
    }
}

/// Configures (only) these backends, all online, with these tags.
async fn farm(app: &TestApp, backends: &[(&str, &[&str])]) {
    app.store
        .sync_backends(
            backends
                .iter()
                .map(|(id, tags)| BackendUpsert {
                    id: id.to_string(),
                    name: id.to_string(),
                    host: "127.0.0.1".into(),
                    port: 1,
                    url: "http://127.0.0.1:1".into(),
                    enabled: true,
                    tags: tags.iter().map(|t| t.to_string()).collect(),
                    max_inflight: 8,
                    hours: None,
                    off_hours: false,
                })
                .collect(),
        )
        .await
        .unwrap();
    for (id, _) in backends {
        app.store
            .backend_online(id, BackendStats::default())
            .await
            .unwrap();
    }
}

fn failure() -> serde_json::Value {
    json!({"message": "node 2 raised"})
}

#[tokio::test]
async fn leases_go_by_priority_then_age() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let low_old = app.submit_blur(json!({"priority": -5})).await;
    let mid_old = app.submit_blur(json!({})).await;
    let high = app.submit_blur(json!({"priority": 10})).await;
    let mid_new = app.submit_blur(json!({})).await;
    let mut order = Vec::new();
    while let Some(l) = app.store.lease_next("n1").await.unwrap() {
        order.push(l.job_id);
    }
    assert_eq!(order, [high, mid_old, mid_new, low_old]);
}

/// A config whose farm is shared by each job's `batch`.
fn shared_by_batch() -> (orchestrator::config::Config, tempfile::TempDir) {
    let (mut config, dir) = test_config();
    config.dispatch.share_by = Some("batch".into());
    config.dispatch.model_affinity = false;
    (config, dir)
}

/// Leases until none is left, `share` as the farm's config says.
async fn lease_all(app: &TestApp, backend: &str, share: bool) -> Vec<String> {
    let prefer = Preference {
        share,
        ..Preference::default()
    };
    let mut order = Vec::new();
    while let LeaseTry::Leased(l) = app.store.lease_for(backend, None, prefer).await.unwrap() {
        order.push(l.job_id);
    }
    order
}

#[tokio::test]
async fn a_shared_farm_gives_each_batch_its_turn_and_priority_still_comes_first() {
    let (config, dir) = shared_by_batch();
    let mut app = spawn_with(config).await;
    app.set_dir(dir);
    farm(&app, &[("n1", &[])]).await;
    let batch = |b: &str| json!({"metadata": {"batch": b}});
    let mut a = Vec::new();
    for _ in 0..4 {
        a.push(app.submit_blur(batch("a")).await);
    }
    let b1 = app.submit_blur(batch("b")).await;
    let b2 = app.submit_blur(batch("b")).await;
    let loose = app.submit_blur(json!({})).await;
    let b_high = app
        .submit_blur(json!({"metadata": {"batch": "b"}, "priority": 5}))
        .await;
    // A paused batch takes no turn, and is no group waiting for one.
    app.submit_blur(json!({"metadata": {"batch": "c"}, "paused": true}))
        .await;
    // Leases held (none ends): each group's count on the farm grows.
    let prefer = Preference {
        share: true,
        ..Preference::default()
    };
    let mut order = Vec::new();
    for _ in 0..7 {
        match app.store.lease_for("n1", None, prefer).await.unwrap() {
            LeaseTry::Leased(l) => order.push(l.job_id),
            other => panic!("{other:?}"),
        }
    }
    // The last of batch a waits: its page says the farm is shared and how
    // its group stands (a has 3 on the farm; b and the jobs without a batch
    // have theirs; c is paused).
    let why = app.job(&a[3]).await["waiting_for"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("the farm is shared by `batch`: its group `a` has 3 jobs on the farm, beside 2 other groups"),
        "{why}"
    );
    order.extend(lease_all(&app, "n1", true).await);
    // Priority first (b's urgent one); then the group with the fewest on
    // the farm, ties to the one served longest ago, then the oldest job:
    // a, then the jobs without a batch (a group of their own), b, a, b, and
    // the rest of a, alone.
    assert_eq!(
        order,
        [&b_high, &a[0], &loose, &b1, &a[1], &b2, &a[2], &a[3]].map(String::as_str),
        "a: {a:?}, b: {b1} {b2}, loose: {loose}, urgent: {b_high}"
    );
}

#[tokio::test]
async fn sharing_turned_on_at_a_restart_puts_the_queued_jobs_in_their_groups() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let batch = |b: &str| json!({"metadata": {"batch": b}});
    let a1 = app.submit_blur(batch("a")).await;
    let a2 = app.submit_blur(batch("a")).await;
    let a3 = app.submit_blur(batch("a")).await;
    let b1 = app.submit_blur(batch("b")).await;
    let (mut config, dir) = app.stop().await;
    config.dispatch.share_by = Some("batch".into());
    let mut app = spawn_with(config).await;
    app.set_dir(dir.unwrap());
    farm(&app, &[("n1", &[])]).await;
    assert_eq!(lease_all(&app, "n1", true).await, [a1, b1, a2, a3]);
}

#[tokio::test]
async fn a_farm_not_shared_leases_batches_in_order_of_age() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let batch = |b: &str| json!({"metadata": {"batch": b}});
    let a1 = app.submit_blur(batch("a")).await;
    let a2 = app.submit_blur(batch("a")).await;
    let b1 = app.submit_blur(batch("b")).await;
    // Even when asked to share: the jobs have no group.
    assert_eq!(lease_all(&app, "n1", true).await, [a1, a2, b1]);
}

#[tokio::test]
async fn a_new_priority_reorders_the_queue_and_a_held_job_keeps_it_for_later() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let first = app.submit_blur(json!({})).await;
    let second = app.submit_blur(json!({})).await;
    let urgent = app.submit_blur(json!({})).await;
    let change = app.store.set_priority(&urgent, 10).await.unwrap();
    assert_eq!(
        change,
        PriorityChange {
            from: 0,
            status: JobStatus::Queued
        }
    );
    app.store.set_priority(&first, -1).await.unwrap();
    let lease = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(lease.job_id, urgent, "the job moved up runs first");

    // A held job takes a new priority for when it is queued again, and its
    // history says so.
    let change = app.store.set_priority(&urgent, 20).await.unwrap();
    assert_eq!(change.status, JobStatus::Assigned);
    assert_eq!(app.job(&urgent).await["priority"], 20);
    let events = app.store.job_events(&urgent).await.unwrap();
    let moved: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "priority_changed")
        .collect();
    assert_eq!(moved.len(), 2, "{events:#?}");
    assert_eq!(
        moved[0].message.as_deref(),
        Some("priority changed from 0 to 10 by a user")
    );
    assert_eq!(moved[0].data, Some(json!({"from": 0, "to": 10})));
    assert_eq!(moved[1].status, Some(JobStatus::Assigned));
    assert_eq!(moved[1].backend_id.as_deref(), Some("n1"));
    assert!(
        moved[1]
            .message
            .as_deref()
            .unwrap()
            .contains("backend n1 runs it already"),
        "{:?}",
        moved[1].message
    );

    // The same priority again changes nothing and writes nothing.
    let before = app.store.job_events(&second).await.unwrap().len();
    let change = app.store.set_priority(&second, 0).await.unwrap();
    assert_eq!(change.from, 0);
    assert_eq!(app.store.job_events(&second).await.unwrap().len(), before);

    let next = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(next.job_id, second, "the job moved down waits behind");

    // A job that ended takes none; an unknown one is not found.
    app.store.request_cancel(&first).await.unwrap();
    assert!(matches!(
        app.store.set_priority(&first, 5).await,
        Err(StoreError::InvalidState(m)) if m.contains("already cancelled")
    ));
    assert_eq!(app.job(&first).await["priority"], -1);
    assert!(matches!(
        app.store.set_priority("no-such-job", 5).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_job_goes_only_to_backends_with_its_tags() {
    let app = spawn_app().await;
    farm(&app, &[("plain", &[]), ("fluxbox", &["flux", "sdxl"])]).await;
    let id = app.submit_blur(json!({"requires": ["flux"]})).await;
    assert!(app.store.lease_next("plain").await.unwrap().is_none());
    let lease = app.store.lease_next("fluxbox").await.unwrap().unwrap();
    assert_eq!(lease.job_id, id);
    assert_eq!(
        app.store
            .backends_with_tags(&["flux".into()])
            .await
            .unwrap(),
        ["fluxbox"]
    );
    assert!(app
        .store
        .backends_with_tags(&["flux".into(), "video".into()])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn the_backends_a_submission_is_checked_against_follow_admin_and_tag_changes() {
    // Kept between submissions (a read of the whole farm each time was a
    // core's worth at 1,000 backends): every change must still show at once.
    let app = spawn_app().await;
    farm(&app, &[("a", &[]), ("b", &["flux"])]).await;
    let takers = |tags: &'static [&'static str]| {
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        let store = app.store.clone();
        async move {
            store
                .enabled_backends_with_tags(&tags)
                .await
                .unwrap()
                .to_vec()
        }
    };
    assert_eq!(takers(&[]).await, ["a", "b"]);
    assert_eq!(takers(&["flux"]).await, ["b"]);
    for admin in [AdminState::Disabled, AdminState::Draining] {
        app.store.set_backend_admin_state("b", admin).await.unwrap();
        assert_eq!(takers(&["flux"]).await, Vec::<String>::new(), "{admin:?}");
        assert_eq!(takers(&[]).await, ["a"], "{admin:?}");
        // From the same kept read: configured with the tags, enabled or not
        // (a job needing them may wait for b).
        let flux = ["flux".to_string()];
        assert_eq!(app.store.backends_with_tags(&flux).await.unwrap(), ["b"]);
    }
    app.store
        .set_backend_admin_state("b", AdminState::Enabled)
        .await
        .unwrap();
    assert_eq!(takers(&["flux"]).await, ["b"]);
    // A new config: a gets the tag, b leaves the farm.
    farm(&app, &[("a", &["flux"])]).await;
    assert_eq!(takers(&["flux"]).await, ["a"]);
    assert_eq!(takers(&[]).await, ["a"]);
    let flux = ["flux".to_string()];
    assert_eq!(app.store.backends_with_tags(&flux).await.unwrap(), ["a"]);
}

#[tokio::test]
async fn a_backend_that_failed_a_job_twice_is_not_offered_it_again() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[]), ("n2", &[])]).await;
    let id = app.submit_blur(json!({"max_attempts": 5})).await;
    for round in 1..=2 {
        let l = app
            .store
            .lease_next("n1")
            .await
            .unwrap()
            .expect("leased to n1");
        let outcome = app
            .store
            .fail_attempt(&id, l.token, false, failure(), Duration::zero())
            .await
            .unwrap();
        assert!(
            matches!(outcome, AttemptOutcome::Retry(_)),
            "round {round}: {outcome:?}"
        );
    }
    assert!(
        app.store.lease_next("n1").await.unwrap().is_none(),
        "n1 failed it twice"
    );
    let l = app.store.lease_next("n2").await.unwrap().expect("n2 may");
    // n2 fails it twice too: no backend is left, and the job says why.
    app.store
        .fail_attempt(&id, l.token, false, failure(), Duration::zero())
        .await
        .unwrap();
    let l = app.store.lease_next("n2").await.unwrap().unwrap();
    let outcome = app
        .store
        .fail_attempt(&id, l.token, false, failure(), Duration::zero())
        .await
        .unwrap();
    let AttemptOutcome::Failed(why) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(why.contains("n1 failed it 2 times"), "{why}");
    assert!(why.contains("n2 failed it 2 times"), "{why}");
    assert_eq!(app.job(&id).await["status"], "failed");
}

#[tokio::test]
async fn a_refusal_bars_that_backend_at_once_and_fails_the_job_when_none_is_left() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[]), ("n2", &[])]).await;
    let id = app.submit_blur(json!({})).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    let outcome = app
        .store
        .fail_attempt(&id, l.token, true, failure(), Duration::seconds(60))
        .await
        .unwrap();
    let AttemptOutcome::Retry(at) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        at <= chrono::Utc::now(),
        "a refusal is retried elsewhere at once"
    );
    assert!(app.store.lease_next("n1").await.unwrap().is_none());
    let l = app.store.lease_next("n2").await.unwrap().unwrap();
    let outcome = app
        .store
        .fail_attempt(&id, l.token, true, failure(), Duration::zero())
        .await
        .unwrap();
    let AttemptOutcome::Failed(why) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        why.contains("n1 rejected the workflow; n2 rejected the workflow"),
        "{why}"
    );
}

#[tokio::test]
async fn a_users_retry_starts_the_job_afresh_on_every_backend() {
    // Every box refused the shot (a model missing), failed it twice, or
    // died under it; the artist mends the boxes and retries. What the
    // earlier attempts decided must not keep it waiting for ever.
    let app = spawn_app().await;
    farm(&app, &[("n1", &[]), ("n2", &[])]).await;
    let refused = app.submit_blur(json!({"max_attempts": 5})).await;
    for b in ["n1", "n2"] {
        let l = app.store.lease_next(b).await.unwrap().unwrap();
        app.store
            .fail_attempt(&refused, l.token, true, failure(), Duration::zero())
            .await
            .unwrap();
    }
    assert_eq!(app.job(&refused).await["status"], "failed");
    app.store.retry(&refused).await.unwrap();
    let l = app
        .store
        .lease_next("n1")
        .await
        .unwrap()
        .expect("n1 may take it again once it is retried");
    assert_eq!(l.job_id, refused);
    // Refused again by n1 alone: that bar counts anew, and n2 may still.
    app.store
        .fail_attempt(&refused, l.token, true, failure(), Duration::zero())
        .await
        .unwrap();
    assert!(app.store.lease_next("n1").await.unwrap().is_none());
    let job = app.job(&refused).await;
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(
        job["leases"].as_array().unwrap().len(),
        3,
        "every lease kept"
    );
    assert_eq!(
        app.store.lease_next("n2").await.unwrap().unwrap().job_id,
        refused
    );

    // Failed twice on each box.
    let failing = app.submit_blur(json!({"max_attempts": 9})).await;
    for b in ["n1", "n1", "n2", "n2"] {
        let l = app.store.lease_next(b).await.unwrap().unwrap();
        assert_eq!(l.job_id, failing);
        app.store
            .fail_attempt(&failing, l.token, false, failure(), Duration::zero())
            .await
            .unwrap();
    }
    assert_eq!(app.job(&failing).await["status"], "failed");
    app.store.retry(&failing).await.unwrap();
    assert_eq!(
        app.store.lease_next("n1").await.unwrap().unwrap().job_id,
        failing
    );

    // Died under twice on n1 (n1 barred, the job waits for n2), cancelled
    // while it waited, retried: n1 may take it, and a loss there is the
    // first of a new count.
    let lost = app.submit_blur(json!({})).await;
    assert_eq!(lose_running(&app, "n1", &lost).await, LostOutcome::Requeued);
    assert_eq!(lose_running(&app, "n1", &lost).await, LostOutcome::Requeued);
    assert!(app.store.lease_next("n1").await.unwrap().is_none());
    app.store.request_cancel(&lost).await.unwrap();
    app.store.retry(&lost).await.unwrap();
    assert_eq!(lose_running(&app, "n1", &lost).await, LostOutcome::Requeued);
    let said = app.events(&lost).await.last().unwrap()["message"].clone();
    assert!(
        said.as_str()
            .unwrap()
            .contains("(lost while running: 1 of 2)"),
        "{said}"
    );
}

#[tokio::test]
async fn cancel_and_retry_answer_for_each_state() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    // Queued: cancelled at once; then retried.
    let queued = app.submit_blur(json!({})).await;
    assert_eq!(
        app.store.request_cancel(&queued).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert!(matches!(
        app.store.request_cancel(&queued).await,
        Err(StoreError::InvalidState(_))
    ));
    app.store.retry(&queued).await.unwrap();
    assert_eq!(app.job(&queued).await["status"], "queued");
    assert!(matches!(
        app.store.retry(&queued).await,
        Err(StoreError::InvalidState(_))
    ));
    // Assigned and running: the backend is asked; the lease confirms it.
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    assert!(matches!(
        app.store.retry(&l.job_id).await,
        Err(StoreError::InvalidState(_))
    ));
    assert_eq!(
        app.store.request_cancel(&l.job_id).await.unwrap(),
        CancelOutcome::Requested {
            backend_id: "n1".into()
        }
    );
    assert!(
        app.store.mark_submitted(&l.job_id, l.token).await.unwrap(),
        "the cancel is pending"
    );
    app.store.mark_running(&l.job_id, l.token).await.unwrap();
    assert!(app
        .store
        .confirm_stop(&l.job_id, l.token, "interrupted".into())
        .await
        .unwrap());
    assert_eq!(app.job(&l.job_id).await["status"], "cancelled");
    // Completed: neither cancelled nor retried.
    let done = app.submit_blur(json!({})).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(l.job_id, done);
    app.store.complete(&done, l.token, vec![]).await.unwrap();
    assert!(matches!(
        app.store.request_cancel(&done).await,
        Err(StoreError::InvalidState(_))
    ));
    assert!(matches!(
        app.store.retry(&done).await,
        Err(StoreError::InvalidState(_))
    ));
    // Failed: retried as a new attempt, even past max_attempts.
    let failed = app.submit_blur(json!({"max_attempts": 1})).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store
        .fail_attempt(&failed, l.token, false, failure(), Duration::zero())
        .await
        .unwrap();
    assert_eq!(app.job(&failed).await["status"], "failed");
    app.store.retry(&failed).await.unwrap();
    let job = app.job(&failed).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["max_attempts"], 2);
    assert!(matches!(
        app.store.request_cancel("no-such-job").await,
        Err(StoreError::NotFound(_))
    ));
}

/// Leases the next job on `backend` and pauses it there with `interrupt`:
/// its worker is to stop it.
async fn lease_and_pause(app: &TestApp, backend: &str, id: &str) -> i64 {
    let l = app.store.lease_next(backend).await.unwrap().unwrap();
    assert_eq!(l.job_id, id);
    let change = app.store.set_paused(id, true, true).await.unwrap();
    assert_eq!(change.stopping.as_deref(), Some(backend));
    l.token
}

#[tokio::test]
async fn a_batchs_pace_counts_the_jobs_that_ended_after_they_ran() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let batch = json!({"metadata": {"batch": "b"}});
    let ran = app.submit_blur(batch.clone()).await;
    let failed = app
        .submit_blur(json!({"metadata": {"batch": "b"}, "max_attempts": 1}))
        .await;
    let never_ran = app.submit_blur(batch.clone()).await;
    let left = app.submit_blur(batch).await;
    let other = app.submit_blur(json!({})).await;
    for id in [&ran, &failed] {
        let l = app.store.lease_next("n1").await.unwrap().unwrap();
        assert_eq!(&l.job_id, id);
        app.store.mark_running(id, l.token).await.unwrap();
        if id == &ran {
            app.store.complete(id, l.token, vec![]).await.unwrap();
        } else {
            app.store
                .fail_attempt(id, l.token, false, failure(), Duration::zero())
                .await
                .unwrap();
        }
    }
    // Cancelled while queued: ended, but took no farm time.
    app.store.request_cancel(&never_ran).await.unwrap();
    app.store.request_cancel(&other).await.unwrap();
    let filter = orchestrator::store::JobFilter {
        metadata: vec![("batch".into(), "b".into())],
        ..Default::default()
    };
    let counts = app.store.count_jobs(&filter).await.unwrap();
    let ended: i64 = counts
        .by_status
        .iter()
        .filter(|(s, _)| s.is_terminal())
        .map(|(_, n)| n)
        .sum();
    assert_eq!((ended, counts.ended_recently), (3, 2), "{counts:?}");
    let all = app.store.count_jobs(&Default::default()).await.unwrap();
    assert_eq!(all.ended_recently, 2, "{all:?}");
    assert_eq!(app.job(&left).await["status"], "queued");
}

/// A batch the farm holds: its jobs not started are paused, and so is each
/// job submitted for it after, through a restart, its `paused` event saying
/// why; another batch is not. The hold ends when the batch's last paused job
/// is let go (resumed, or cancelled), not while one of them stays paused.
#[tokio::test]
async fn a_held_batch_pauses_what_comes_until_its_last_paused_job_is_let_go() {
    let app = spawn_app().await;
    let queued = app.submit_blur(json!({"metadata": {"batch": "b1"}})).await;
    let hold = HeldBatch {
        field: "batch".into(),
        batch: "b1".into(),
        cause: "IndexError in ImageToMask".into(),
        why: "paused with its batch (batch b1): it broke".into(),
        banner: "batch b1 is held".into(),
        held_at: chrono::Utc::now(),
    };
    let paused = app.store.hold_batch(hold.clone()).await.unwrap();
    assert_eq!(paused, std::slice::from_ref(&queued));
    // The farm reads the holds as it starts.
    let app = app.restart().await;
    let submit = |batch: &'static str| {
        let app = &app;
        async move {
            let (status, body) = app
                .post_json(
                    "/api/job",
                    &json!({"workflow_id": "image_blur", "parameters": {"width": 64, "height": 64}, "metadata": {"batch": batch}}),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            (
                body["job_id"].as_str().unwrap().to_string(),
                body["paused"] == true,
            )
        }
    };
    let (held, paused) = submit("b1").await;
    assert!(paused, "held");
    let said = app.events(&held).await;
    let last = said.last().unwrap();
    assert_eq!(last["kind"], "paused", "{said:?}");
    assert_eq!(last["message"], hold.why.as_str(), "{said:?}");
    assert_eq!(
        last["data"],
        json!({"batch": "b1", "by": "farm", "held": true})
    );
    assert_eq!(app.job(&held).await["waiting_for"], hold.why.as_str());
    assert!(!submit("b2").await.1, "another batch is not held");
    let warned = || async {
        app.health_warnings()
            .await
            .iter()
            .any(|w| w == "batch b1 is held")
    };
    assert!(warned().await);
    let still_held = || app.store.held_batch("batch", "b1");
    // One resumed (a shot let go to check the mend): the hold stands.
    let (status, body) = app
        .post_json(&format!("/api/job/{queued}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let kept = still_held().await.unwrap().expect("still held");
    assert_eq!((kept.cause, kept.why), (hold.cause, hold.why.clone()));
    let (later, paused) = submit("b1").await;
    assert!(paused, "held while some of it stays paused");
    // The last two let go, one cancelled and one resumed: the hold ends.
    app.store.request_cancel(&later).await.unwrap();
    assert!(still_held().await.unwrap().is_some());
    let (status, body) = app
        .post_json(&format!("/api/job/{held}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(still_held().await.unwrap(), None);
    assert!(!warned().await);
    assert!(!submit("b1").await.1, "let go");
}

#[tokio::test]
async fn an_ended_job_is_not_paused_however_it_ended() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    // Paused, then cancelled.
    let cancelled = app.submit_blur(json!({"paused": true})).await;
    app.store.request_cancel(&cancelled).await.unwrap();
    // Paused, then failed with the job it starts from (SQLite's triggers).
    let parent = app.submit_blur(json!({"max_attempts": 1})).await;
    let child = app
        .submit_blur(json!({"paused": true, "parameters": {"image": format!("job:{parent}")}, "workflow_id": "image_invert"}))
        .await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(l.job_id, parent);
    app.store
        .fail_attempt(&parent, l.token, false, failure(), Duration::zero())
        .await
        .unwrap();
    let still = app.submit_blur(json!({"paused": true})).await;
    for (id, status) in [(&cancelled, "cancelled"), (&child, "failed")] {
        let job = app.job(id).await;
        assert_eq!(job["status"], status, "{job}");
        assert_eq!(job["paused_at"], serde_json::Value::Null, "{job}");
    }
    assert!(app.job(&still).await["paused_at"].is_string());
    let counts = app.store.count_jobs(&Default::default()).await.unwrap();
    assert_eq!(
        counts.paused, 1,
        "only the one that may still run: {counts:?}"
    );
}

#[tokio::test]
async fn a_held_job_paused_with_interrupt_is_stopped_and_queued_again_paused_in_its_place() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let id = app.submit_blur(json!({})).await;
    let later = app.submit_blur(json!({})).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(l.job_id, id);
    // Without `interrupt`: refused, and the refusal says how.
    match app.store.set_paused(&id, true, false).await {
        Err(StoreError::InvalidState(m)) => assert!(
            m.contains("assigned on backend n1") && m.contains("\"interrupt\": true"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(app.job(&id).await["paused_at"], serde_json::Value::Null);
    // With it: flagged for the worker, which the submit's answer tells.
    let change = app.store.set_paused(&id, true, true).await.unwrap();
    assert_eq!(change.stopping.as_deref(), Some("n1"));
    assert_eq!(change.status, JobStatus::Assigned);
    assert!(
        app.store.mark_submitted(&id, l.token).await.unwrap(),
        "the stop is pending"
    );
    let again = app.store.set_paused(&id, true, true).await.unwrap();
    assert!(again.was_paused && again.stopping.as_deref() == Some("n1"));
    app.store.mark_running(&id, l.token).await.unwrap();
    // Stopped: back in the queue, paused, the attempt not counted.
    assert!(app
        .store
        .confirm_stop(&id, l.token, "interrupted on backend n1".into())
        .await
        .unwrap());
    let job = app.job(&id).await;
    assert_eq!(job["status"], "queued");
    assert!(job["paused_at"].is_string(), "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    assert_eq!(job["leases"][0]["outcome"], "paused", "{job}");
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds[2..],
        [
            "pause_requested",
            "submitted_to_backend",
            "running",
            "paused"
        ],
        "{kinds:?}"
    );
    // The box takes the next job, not the paused one; resumed, it comes
    // before the job submitted after it.
    let next = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(next.job_id, later);
    app.store
        .complete(&later, next.token, vec![])
        .await
        .unwrap();
    app.store.set_paused(&id, false, false).await.unwrap();
    let token = lease_and_pause(&app, "n1", &id).await;
    assert_eq!(app.job(&id).await["attempts"], 1);

    // A cancel as well: the cancel wins.
    app.store.request_cancel(&id).await.unwrap();
    assert!(matches!(
        app.store.set_paused(&id, true, true).await,
        Ok(PauseChange {
            was_paused: true,
            ..
        })
    ));
    app.store
        .confirm_stop(&id, token, "interrupted".into())
        .await
        .unwrap();
    assert_eq!(app.job(&id).await["status"], "cancelled");

    // Resumed before the worker stopped it: the flag is gone (a worker
    // that had begun stops it, and it is queued again, not paused).
    let resumed = app.submit_blur(json!({})).await;
    let token = lease_and_pause(&app, "n1", &resumed).await;
    let change = app.store.set_paused(&resumed, false, false).await.unwrap();
    assert!(change.was_paused && change.stopping.is_none());
    assert!(!app.store.mark_submitted(&resumed, token).await.unwrap());
    app.store
        .confirm_stop(&resumed, token, "interrupted".into())
        .await
        .unwrap();
    let job = app.job(&resumed).await;
    assert_eq!(
        (job["status"].as_str(), job["paused_at"].as_str()),
        (Some("queued"), None)
    );
    assert_eq!(app.event_kinds(&resumed).await.last().unwrap(), "requeued");

    // Finished before the stop: completed, and not paused any more.
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store.complete(&resumed, l.token, vec![]).await.unwrap();
    let done = app.submit_blur(json!({})).await;
    let token = lease_and_pause(&app, "n1", &done).await;
    app.store.complete(&done, token, vec![]).await.unwrap();
    let job = app.job(&done).await;
    assert_eq!(
        (job["status"].as_str(), job["paused_at"].as_str()),
        (Some("completed"), None)
    );
    assert_eq!(
        app.event_kinds(&done).await.last().unwrap(),
        "pause_too_late"
    );

    // Lost while being stopped (the box died): paused, not a lost run.
    let lost = app.submit_blur(json!({})).await;
    let token = lease_and_pause(&app, "n1", &lost).await;
    app.store.mark_running(&lost, token).await.unwrap();
    give_back_lost(&app, &lost, token).await;
    let job = app.job(&lost).await;
    assert_eq!(job["status"], "queued");
    assert!(job["paused_at"].is_string(), "{job}");
    assert_eq!(job["leases"][0]["outcome"], "paused", "{job}");
    assert!(app.store.lease_next("n1").await.unwrap().is_none());
}

#[tokio::test]
async fn runs_lost_after_they_started_count_and_fail_the_job_at_the_limit() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let id = app.submit_blur(json!({})).await;
    let lost = |reason: &str, cleanup: bool| LostRun {
        reason: reason.into(),
        cleanup: cleanup.then(chrono::Utc::now),
        max_lost_runs: Some(2),
        avoid: None,
    };
    // Lost while waiting in the backend's queue: costs nothing.
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store.mark_submitted(&id, l.token).await.unwrap();
    let o = app
        .store
        .give_back(&id, l.token, lost("restarted", false))
        .await
        .unwrap();
    assert_eq!(o, LostOutcome::Requeued);
    // Lost while running: counts, once.
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store.mark_running(&id, l.token).await.unwrap();
    let o = app
        .store
        .give_back(&id, l.token, lost("restarted", true))
        .await
        .unwrap();
    assert_eq!(o, LostOutcome::Requeued);
    assert_eq!(
        app.job(&id).await["attempts"],
        0,
        "lost runs do not burn attempts"
    );
    let cleanup = app.store.cleanup_prompts("n1").await.unwrap();
    assert_eq!(cleanup.len(), 1);
    assert_eq!(cleanup[0].prompt_id, l.prompt_id);
    // The second lost run reaches the limit: the job fails and says why.
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store.mark_running(&id, l.token).await.unwrap();
    let o = app
        .store
        .give_back(&id, l.token, lost("restarted", false))
        .await
        .unwrap();
    let LostOutcome::Failed(why) = o else {
        panic!("{o:?}")
    };
    assert!(why.contains("died under it 2 times"), "{why}");
    let job = app.job(&id).await;
    assert_eq!(job["status"], "failed");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("may be what crashes them"));
    // A stale worker's give-back is refused.
    let o = app
        .store
        .give_back(&id, l.token, lost("late", false))
        .await
        .unwrap();
    assert_eq!(o, LostOutcome::LeaseLost);
    app.store
        .cleanup_done(vec![cleanup[0].prompt_id.clone()])
        .await
        .unwrap();
    assert!(app.store.cleanup_prompts("n1").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_run_lost_after_it_started_keeps_away_from_its_backend_for_a_while() {
    let app = spawn_app().await;
    farm(&app, &[("n1", &[]), ("n2", &[])]).await;
    let id = app.submit_blur(json!({})).await;
    let lost = |avoid_s: i64| LostRun {
        reason: "its backend no longer has it".into(),
        cleanup: None,
        max_lost_runs: Some(3),
        avoid: Some(chrono::Duration::seconds(avoid_s)),
    };
    // Lost while it waited in the queue there: no evidence, no avoiding.
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store.give_back(&id, l.token, lost(60)).await.unwrap();
    let l = app
        .store
        .lease_next("n1")
        .await
        .unwrap()
        .expect("n1 may take it again");
    // Lost while running: the box died under it; another gets it first.
    app.store.mark_running(&id, l.token).await.unwrap();
    let o = app.store.give_back(&id, l.token, lost(60)).await.unwrap();
    assert_eq!(o, LostOutcome::Requeued);
    assert!(
        app.store.lease_next("n1").await.unwrap().is_none(),
        "n1 keeps off the job it lost mid-run"
    );
    let events = app.events(&id).await;
    let said = events.last().unwrap()["message"].as_str().unwrap();
    assert!(
        said.contains("another backend gets it first, n1 from"),
        "{said}"
    );
    let requeued: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "requeued")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(requeued.len(), 2);
    assert!(!requeued[0].contains("another backend"), "{requeued:?}");
    let l = app
        .store
        .lease_next("n2")
        .await
        .unwrap()
        .expect("n2 takes it");
    assert_eq!(l.job_id, id);
    // Once the span is over, the backend that lost it may take it again.
    app.store.mark_running(&id, l.token).await.unwrap();
    app.store.give_back(&id, l.token, lost(0)).await.unwrap();
    let l = app.store.lease_next("n2").await.unwrap();
    assert_eq!(l.map(|l| l.job_id), Some(id));
}

#[tokio::test]
async fn a_box_that_died_under_a_job_at_every_run_leaves_it_to_another_rather_than_fail_it() {
    // A job two runs of which died with the same box may be sound and the
    // box sick: it goes to another box; it fails once another dies too.
    let app = spawn_app().await;
    farm(&app, &[("n1", &[]), ("n2", &[])]).await;
    let id = app.submit_blur(json!({})).await;
    assert_eq!(lose_running(&app, "n1", &id).await, LostOutcome::Requeued);
    assert_eq!(lose_running(&app, "n1", &id).await, LostOutcome::Requeued);
    let job = app.job(&id).await;
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(job["leases"][1]["error"]["died_here"], 2, "{job}");
    let said = app.events(&id).await.last().unwrap()["message"].clone();
    assert!(
        said.as_str().unwrap().contains("n1 takes it no more"),
        "{said}"
    );
    assert!(
        app.store.lease_next("n1").await.unwrap().is_none(),
        "n1 keeps off it for good"
    );
    // n2 dies under it too: now the job is what crashes boxes.
    let LostOutcome::Failed(why) = lose_running(&app, "n2", &id).await else {
        panic!("the job should fail once a second box died under it")
    };
    assert!(why.contains("died under it 3 times"), "{why}");
}

/// Leases job `id` to `backend`, starts it, and loses it there mid-run,
/// with `dispatch.max_lost_runs` 2.
async fn lose_running(app: &TestApp, backend: &str, id: &str) -> LostOutcome {
    let l = app.store.lease_next(backend).await.unwrap().unwrap();
    assert_eq!(l.job_id, id);
    app.store.mark_running(id, l.token).await.unwrap();
    let run = LostRun {
        reason: "its backend no longer has it".into(),
        cleanup: None,
        max_lost_runs: Some(2),
        avoid: None,
    };
    app.store.give_back(id, l.token, run).await.unwrap()
}

/// Leases job `id` to `backend`, starts it, and loses it there mid-run.
async fn lose_mid_run(app: &TestApp, backend: &str, id: &str) {
    let l = app.store.lease_next(backend).await.unwrap().unwrap();
    assert_eq!(l.job_id, id);
    app.store.mark_running(id, l.token).await.unwrap();
    give_back_lost(app, id, l.token).await;
}

/// Gives a started job back as lost, avoiding its backend for a minute.
async fn give_back_lost(app: &TestApp, id: &str, token: i64) {
    let lost = LostRun {
        reason: "its backend no longer has it".into(),
        cleanup: None,
        max_lost_runs: Some(9),
        avoid: Some(chrono::Duration::seconds(60)),
    };
    let o = app.store.give_back(id, token, lost).await.unwrap();
    assert_eq!(o, LostOutcome::Requeued);
}

#[tokio::test]
async fn a_lost_run_goes_back_at_once_to_its_backend_when_no_other_may_run_it() {
    // The avoidance gives another backend the first chance; where there is
    // none (a farm of one box, the others off or lacking the job's tags),
    // waiting it out would only hold the job back.
    let app = spawn_app().await;
    farm(&app, &[("n1", &["sdxl"]), ("n2", &[])]).await;
    // Only n1 has the tag it needs: n1 takes it back at once.
    let tagged = app.submit_blur(json!({"requires": ["sdxl"]})).await;
    lose_mid_run(&app, "n1", &tagged).await;
    let l = app.store.lease_next("n1").await.unwrap();
    assert_eq!(l.map(|l| l.job_id), Some(tagged.clone()));
    // n2 may run this one: n1 keeps off it while n2 is there to take it.
    let plain = app.submit_blur(json!({})).await;
    lose_mid_run(&app, "n1", &plain).await;
    assert!(app.store.lease_next("n1").await.unwrap().is_none());
    for gone in [true, false] {
        if gone {
            app.store
                .set_backend_admin_state("n2", AdminState::Disabled)
                .await
                .unwrap();
        } else {
            app.store
                .set_backend_admin_state("n2", AdminState::Enabled)
                .await
                .unwrap();
            app.store
                .backend_offline("n2", "connection refused".into())
                .await
                .unwrap();
        }
        // n2 disabled, then offline: n1 takes it back at once.
        let l = app.store.lease_next("n1").await.unwrap().unwrap();
        assert_eq!(l.job_id, plain, "n2 disabled: {gone}");
        if gone {
            app.store.mark_running(&plain, l.token).await.unwrap();
            give_back_lost(&app, &plain, l.token).await;
        }
    }
}

#[tokio::test]
async fn a_backend_that_may_not_run_the_queued_jobs_learns_that_another_may() {
    // A worker rung for a job passes the ring on only while a due job
    // waits that another backend may run; once the queue holds nothing due
    // (another worker took the job), the ring ends instead of waking the
    // farm's idle workers one after the other for nothing.
    let app = spawn_app().await;
    farm(&app, &[("plain", &[]), ("big", &["big"])]).await;
    let try_lease = |id: &'static str| app.store.lease_for(id, None, Preference::default());
    assert!(matches!(
        try_lease("plain").await.unwrap(),
        LeaseTry::Nothing
    ));
    let id = app.submit_blur(json!({"requires": ["big"]})).await;
    assert!(
        matches!(try_lease("plain").await.unwrap(), LeaseTry::Elsewhere),
        "a job waits that only `big` may run"
    );
    let LeaseTry::Leased(lease) = try_lease("big").await.unwrap() else {
        panic!("`big` runs it")
    };
    assert_eq!(lease.job_id, id);
    assert!(
        matches!(try_lease("plain").await.unwrap(), LeaseTry::Nothing),
        "nothing is left for anyone"
    );
    // A job waiting out a retry's back-off is not due yet: nobody is rung.
    let outcome = app
        .store
        .fail_attempt(&id, lease.token, false, failure(), Duration::minutes(5))
        .await
        .unwrap();
    assert!(matches!(outcome, AttemptOutcome::Retry(_)), "{outcome:?}");
    assert_eq!(app.job(&id).await["status"], "queued");
    assert!(matches!(
        try_lease("plain").await.unwrap(),
        LeaseTry::Nothing
    ));
    assert!(matches!(try_lease("big").await.unwrap(), LeaseTry::Nothing));
}

#[tokio::test]
async fn a_backend_that_still_answers_the_same_only_moves_its_last_seen() {
    // The monitor's record of a backend that said nothing new, every 30 s
    // per backend, is one statement; it never brings a backend back.
    let app = spawn_app().await;
    farm(&app, &[("n1", &[])]).await;
    let record = || async {
        app.store
            .backends()
            .await
            .unwrap()
            .into_iter()
            .find(|b| b.id == "n1")
            .unwrap()
    };
    let before = record().await;
    assert_eq!(before.state, orchestrator::store::BackendState::Online);
    assert!(app.store.backend_still_online("n1").await.unwrap());
    let after = record().await;
    assert_eq!(after.state, orchestrator::store::BackendState::Online);
    assert!(after.last_seen >= before.last_seen && after.last_seen.is_some());
    app.store
        .backend_offline("n1", "connection refused".into())
        .await
        .unwrap();
    let offline = record().await;
    assert!(
        !app.store.backend_still_online("n1").await.unwrap(),
        "an offline backend is recorded in full, not refreshed"
    );
    let still = record().await;
    assert_eq!(still.state, orchestrator::store::BackendState::Offline);
    assert_eq!(still.last_seen, offline.last_seen);
    assert!(!app.store.backend_still_online("nobody").await.unwrap());
}

#[tokio::test]
async fn a_lease_is_recorded_with_its_event_and_a_token_that_only_rises() {
    // One statement leases, and one each records the prompt's acceptance
    // and its start (triggers write the lease's rows, the events and the
    // token counter): what clients and the fencing see must not change.
    let app = spawn_app().await;
    online_backend(&app, "n1").await;
    let id = app.submit_blur(json!({"max_attempts": 3})).await;
    let first = app.store.lease_next("n1").await.unwrap().expect("leased");
    assert_eq!((first.job_id.as_str(), first.attempt), (id.as_str(), 1));
    let outcome = app
        .store
        .fail_attempt(
            &id,
            first.token,
            false,
            json!({"message": "out of memory"}),
            Duration::zero(),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, AttemptOutcome::Retry(_)), "{outcome:?}");
    let app = app.restart().await;
    online_backend(&app, "n1").await;
    let second = app.store.lease_next("n1").await.unwrap().expect("leased");
    assert_eq!(second.attempt, 2);
    assert!(
        second.token > first.token,
        "fencing tokens rise across a restart: {} then {}",
        first.token,
        second.token
    );
    let other = app.submit_blur(json!({})).await;
    let third = app.store.lease_next("n1").await.unwrap().expect("leased");
    assert_eq!(third.job_id, other);
    assert!(third.token > second.token);

    let job = app.job(&id).await;
    assert_eq!(job["status"], "assigned");
    assert_eq!(job["prompt_id"], second.prompt_id.as_str());
    let leases = job["leases"].as_array().unwrap();
    let seen: Vec<_> = leases
        .iter()
        .map(|l| {
            (
                l["prompt_id"].as_str().unwrap(),
                l["attempt"].as_i64().unwrap(),
                l["backend_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (first.prompt_id.as_str(), 1, "n1"),
            (second.prompt_id.as_str(), 2, "n1")
        ]
    );
    assert_eq!(leases[0]["outcome"], "failed");
    assert!(leases[1]["outcome"].is_null() && leases[1]["leased_at"].is_string());
    let assigned: Vec<_> = app
        .events(&id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "assigned")
        .collect();
    assert_eq!(assigned.len(), 2, "{assigned:?}");
    for (event, lease) in assigned.iter().zip([&first, &second]) {
        assert_eq!(event["status"], "assigned");
        assert_eq!(event["backend_id"], "n1");
        assert_eq!(event["attempt"], lease.attempt);
        assert_eq!(
            event["message"],
            format!("leased to backend n1 (attempt {})", lease.attempt)
        );
        assert_eq!(event["data"], json!({"prompt_id": lease.prompt_id}));
    }

    // Completed after a failed attempt: the earlier error does not stay.
    assert!(app.job(&id).await["error"].is_object());
    app.store.mark_submitted(&id, second.token).await.unwrap();
    app.store.mark_running(&id, second.token).await.unwrap();
    app.store.complete(&id, second.token, vec![]).await.unwrap();
    let job = app.job(&id).await;
    assert_eq!(job["status"], "completed");
    assert!(job["error"].is_null(), "{}", job["error"]);
    let kinds = app.event_kinds(&id).await;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "submitted_to_backend")
            .count(),
        1,
        "accepted once on the second lease: {kinds:?}"
    );

    // Running before the submit's answer came (ComfyUI's socket can be
    // faster than its HTTP answer): accepted, then running, once each.
    assert!(app
        .store
        .mark_running(&other, third.token)
        .await
        .unwrap()
        .is_some());
    app.store.mark_submitted(&other, third.token).await.unwrap();
    let events: Vec<_> = app
        .events(&other)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "submitted_to_backend" || e["kind"] == "running")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["status"].clone(),
                e["backend_id"].clone(),
                e["attempt"].clone(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            (
                "submitted_to_backend".to_string(),
                serde_json::Value::Null,
                json!("n1"),
                json!(1),
                "backend n1 accepted the prompt".to_string()
            ),
            (
                "running".to_string(),
                json!("running"),
                json!("n1"),
                json!(1),
                "running on backend n1".to_string()
            ),
        ]
    );
    let job = app.job(&other).await;
    assert_eq!(job["status"], "running");
    let lease = &job["leases"][0];
    assert!(
        lease["submitted_at"].is_string() && lease["started_at"].is_string(),
        "{lease}"
    );
}

#[tokio::test]
async fn the_farm_at_a_glance_names_due_work_and_the_backends_that_hold_something() {
    // What the idle workers' safety nets read once for all of them: with
    // nothing due and nothing held, they skip their own reads.
    let app = spawn_app().await;
    farm(&app, &[("n1", &[]), ("n2", &[])]).await;
    let glance = app.store.farm_glance().await.unwrap();
    assert!(!glance.due && glance.holders.is_empty(), "{glance:?}");

    let id = app.submit_blur(json!({})).await;
    let glance = app.store.farm_glance().await.unwrap();
    assert!(glance.due, "a queued job is due");
    assert!(glance.holders.is_empty(), "{glance:?}");

    let lease = app.store.lease_next("n1").await.unwrap().expect("leased");
    assert_eq!(lease.job_id, id);
    let glance = app.store.farm_glance().await.unwrap();
    assert!(!glance.due, "the only job is leased");
    assert_eq!(glance.holders, ["n1".to_string()].into());

    // A prompt given up on (its job queued again) still has to be removed
    // from its backend: that backend holds something too.
    assert!(app
        .store
        .requeue_lost(&id, lease.token, "backend lost it".into(), false)
        .await
        .unwrap());
    app.store
        .add_cleanup(CleanupEntry::new(
            &lease.prompt_id,
            "n2",
            Some(&id),
            "given up on",
            chrono::Utc::now(),
        ))
        .await
        .unwrap();
    let glance = app.store.farm_glance().await.unwrap();
    assert!(glance.due, "queued again");
    assert_eq!(glance.holders, ["n2".to_string()].into());
    app.store
        .cleanup_done(vec![lease.prompt_id.clone()])
        .await
        .unwrap();
    let glance = app.store.farm_glance().await.unwrap();
    assert!(glance.holders.is_empty(), "{glance:?}");
}

fn output(name: &str, size: i64) -> OutputRecord {
    OutputRecord {
        name: name.into(),
        kind: "images".into(),
        node_id: "9".into(),
        filename: format!("{name}.png"),
        subfolder: "shots/é 1".into(),
        file_type: "output".into(),
        size,
        sha256: format!("{size:064x}"),
        content_type: "image/png".into(),
        pruned_at: None,
    }
}

#[tokio::test]
async fn a_lists_preview_is_an_output_with_thumbnails_an_animation_too() {
    let app = spawn_app().await;
    online_backend(&app, "n1").await;
    let id = app.submit_blur(json!({})).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store.mark_running(&id, l.token).await.unwrap();
    // A video node's file and a TIFF sort first; the animated WebP is the
    // first output a thumbnail can be made of.
    let with = |name: &str, content_type: &str| OutputRecord {
        content_type: content_type.into(),
        ..output(name, 10)
    };
    let outputs = vec![
        with("a_00001_.mp4", "video/mp4"),
        with("b_00001_.tiff", "image/tiff"),
        with("c_00001_.webp", "image/webp"),
    ];
    app.store.complete(&id, l.token, outputs).await.unwrap();
    let (_, list) = app.get("/api/jobs").await;
    assert_eq!(list["jobs"][0]["preview"], "c_00001_.webp", "{list}");
    let job = app.job(&id).await;
    let thumbs: Vec<_> = job["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap(),
                o["thumbnail"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        thumbs,
        [
            ("a_00001_.mp4", false),
            ("b_00001_.tiff", false),
            ("c_00001_.webp", true)
        ]
    );
}

#[tokio::test]
async fn every_end_of_a_job_is_stored_whole_with_its_outputs_event_and_webhook() {
    // A job's end goes to SQLite as one text of several statements: each
    // of them must land, with its own values, and a stale lease none.
    let app = spawn_app().await;
    online_backend(&app, "n1").await;
    let hook = "http://127.0.0.1:9/hook";

    // Completed with two outputs, a callback and a cancel that came too late.
    let done = app.submit_blur(json!({ "callback_url": hook })).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    assert_eq!(l.job_id, done);
    app.store.request_cancel(&done).await.unwrap();
    assert!(app.store.mark_submitted(&done, l.token).await.unwrap());
    app.store.mark_running(&done, l.token).await.unwrap();
    let outputs = vec![output("b_00001", 1_500_000), output("a_00002", 7)];
    app.store.complete(&done, l.token, outputs).await.unwrap();
    let job = app.job(&done).await;
    assert_eq!(job["status"], "completed");
    let mut stored = job["outputs"].as_array().unwrap().clone();
    stored.sort_by_key(|o| o["name"].as_str().unwrap().to_string());
    let expected: Vec<_> = [("a_00002", 7), ("b_00001", 1_500_000)]
        .map(|(name, size)| {
            json!({
                "name": name, "kind": "images", "node_id": "9", "filename": format!("{name}.png"),
                "subfolder": "shots/é 1", "type": "output", "size": size,
                "sha256": format!("{size:064x}"), "content_type": "image/png", "thumbnail": true,
            })
        })
        .into();
    assert_eq!(stored, expected, "every field of every output");
    assert_eq!(job["leases"][0]["outcome"], "completed");
    assert!(job["leases"][0]["finished_at"].is_string());
    assert_eq!(job["webhooks"].as_array().unwrap().len(), 1, "{job}");
    assert_eq!(job["webhooks"][0]["url"], hook);
    assert_eq!(job["webhooks"][0]["status"], "completed");
    let events = app.events(&done).await;
    let tail: Vec<_> = events[events.len() - 2..]
        .iter()
        .map(|e| (e["kind"].clone(), e["status"].clone(), e["attempt"].clone()))
        .collect();
    assert_eq!(
        tail,
        [
            (json!("completed"), json!("completed"), json!(1)),
            (json!("cancel_too_late"), json!("completed"), json!(1)),
        ]
    );
    let completed = &events[events.len() - 2];
    assert_eq!(
        completed["message"],
        "completed on backend n1 with 2 output(s)"
    );
    assert_eq!(
        completed["data"],
        json!({ "outputs": ["b_00001", "a_00002"] })
    );
    assert_eq!(completed["workflow_id"], "image_blur");

    // Failed for good, without a callback: no webhook.
    let failed = app.submit_blur(json!({ "max_attempts": 1 })).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store
        .fail_attempt(&failed, l.token, false, failure(), Duration::zero())
        .await
        .unwrap();
    let job = app.job(&failed).await;
    assert_eq!(job["status"], "failed");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no attempts left"));
    assert_eq!(job["webhooks"], json!([]));
    assert_eq!(job["leases"][0]["outcome"], "failed");

    // Failed with a callback: its webhook says so.
    let hooked = app
        .submit_blur(json!({ "max_attempts": 1, "callback_url": hook }))
        .await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    app.store
        .fail_attempt(&hooked, l.token, false, failure(), Duration::zero())
        .await
        .unwrap();
    let job = app.job(&hooked).await;
    assert_eq!(job["webhooks"][0]["status"], "failed", "{job}");

    // Taken back: queued, the attempt given back, the lease lost.
    let lost = app.submit_blur(json!({ "callback_url": hook })).await;
    let l = app.store.lease_next("n1").await.unwrap().unwrap();
    assert!(app
        .store
        .requeue_lost(&lost, l.token, "the backend restarted".into(), false)
        .await
        .unwrap());
    let job = app.job(&lost).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["leases"][0]["outcome"], "lost");
    assert_eq!(job["webhooks"], json!([]), "not an end");
    assert_eq!(app.event_kinds(&lost).await.last().unwrap(), "requeued");

    // Cancelled while queued, with a callback: ended, webhook queued.
    assert_eq!(
        app.store.request_cancel(&lost).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let job = app.job(&lost).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["webhooks"][0]["status"], "cancelled");
}
