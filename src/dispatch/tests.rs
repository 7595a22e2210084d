//! The farm's own rules: wake times, the back-off, and what a worker's
//! task costs while it waits.

use super::*;

#[tokio::test(start_paused = true)]
async fn workers_are_woken_when_a_retry_falls_due_not_before() {
    let due = Arc::new(DueTimes::default());
    let start = Instant::now();
    due.add(start + Duration::from_secs(5), Some("b".into()));
    due.add(start + Duration::from_secs(2), None);
    due.add(start + Duration::from_secs(5), Some("c".into()));
    let waiter = {
        let due = due.clone();
        tokio::spawn(async move {
            let mut woken = Vec::new();
            while woken.len() < 2 {
                let whom = due.next().await;
                if !whom.is_empty() {
                    woken.push((Instant::now() - start, whom));
                }
            }
            woken
        })
    };
    let woken = waiter.await.unwrap();
    let (two, five) = (Duration::from_secs(2), Duration::from_secs(5));
    assert_eq!(
        woken,
        [
            (two, vec![None]),
            (five, vec![Some("b".to_string()), Some("c".to_string())])
        ],
        "every worker at the back-off's end, the avoided backends' at the avoidance's"
    );
    assert!(due.times.lock().unwrap().is_empty(), "each woken once");
}

/// A worker's task lives as long as the service, one a backend, and
/// a future is as large as its largest await: a TLS handshake's state
/// (about 10 KB, compiled in whatever a backend's scheme) or a
/// reconcile's, inline, made every worker 18 KB (13 MB more on a farm
/// of 1,000 boxes, past the memory goal). The rare and large steps are
/// boxed: they take memory only while they run.
#[tokio::test]
async fn a_workers_task_stays_small_while_it_waits() {
    let (dir, store) = Store::temporary().await;
    let config = Config::from_yaml(&format!(
        "data_dir: {}\nbackends:\n  - id: b\n    host: 127.0.0.1\n    port: 9\n",
        dir.path().display()
    ))
    .unwrap();
    let b = config.backends[0].clone();
    store
        .sync_backends(vec![crate::store::BackendUpsert {
            id: b.id.clone(),
            name: b.id.clone(),
            host: b.host_port().0,
            port: b.host_port().1,
            url: b.base_url(),
            enabled: true,
            tags: vec![],
            max_inflight: 1,
            hours: None,
            off_hours: false,
        }])
        .await
        .unwrap();
    let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
    let farm = Farm::start(store, Arc::new(config), stop.clone(), &tasks)
        .await
        .unwrap();
    let shared = farm.shared.clone();
    let client = shared.clients["b"].clone();
    let worker = worker::Worker::new(shared, b.id.clone(), client, &b, Arc::default(), 0);
    let (_tx, rx) = mpsc::channel(1);
    let task = worker.run(rx);
    let size = std::mem::size_of_val(&task);
    assert!(
        size < 8 * 1024,
        "a worker's future is {size} bytes, kept for the service's life on each backend"
    );
    drop(task);
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}

#[test]
fn backoff_doubles_and_is_capped() {
    let mut c = Config::default();
    c.dispatch.retry_backoff_ms = 1000;
    c.dispatch.retry_backoff_max_ms = 5000;
    assert_eq!(backoff(&c, 1).num_milliseconds(), 1000);
    assert_eq!(backoff(&c, 2).num_milliseconds(), 2000);
    assert_eq!(backoff(&c, 5).num_milliseconds(), 5000);
}
