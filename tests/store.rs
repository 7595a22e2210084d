//! The store's lifecycle rules, called directly on a real SQLite file.

mod common;

use chrono::Duration;
use common::*;
use orchestrator::store::{AttemptOutcome, BackendStats, BackendUpsert, StoreError};
use serde_json::json;

async fn online_backend(app: &TestApp, id: &str) {
    app.store
        .sync_backends(vec![BackendUpsert {
            id: id.into(),
            name: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            enabled: true,
            tags: vec![],
            max_inflight: 2,
        }])
        .await
        .unwrap();
    app.store
        .backend_online(id, BackendStats::default())
        .await
        .unwrap();
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
        .confirm_cancel(&id, old.token, "stale".into())
        .await
        .unwrap());
    let job = app.job(&id).await;
    assert_eq!(job["status"], "assigned");
    assert_eq!(job["prompt_id"], new.prompt_id.as_str());

    // The current lease works.
    app.store.mark_running(&id, new.token).await.unwrap();
    app.store.complete(&id, new.token, vec![]).await.unwrap();
    assert_eq!(app.job(&id).await["status"], "completed");
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
