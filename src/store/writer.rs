//! The one writer: every write to the database goes through it, on a
//! thread of its own.
//!
//! Why: SQLite allows one writer at a time. Funnelling writes through one
//! connection removes `SQLITE_BUSY` retry loops, and lets many concurrent
//! requests share one transaction and one fsync (group commit): the writer
//! takes what is queued, and what comes while it works, up to a time budget
//! (`BATCH_BUDGET`) or until it holds a submission (a client waits for
//! that commit), runs each operation after the first in its own
//! savepoint (so one failing operation does not undo the others; the first
//! is undone by rolling back a transaction that holds nothing else), commits
//! once, and only then answers each caller. A caller that gets `Ok` knows its
//! write is durable.
//!
//! Over 600 lines only with its unit tests (they read the rules beside
//! their code): the code is under 600, of one concern, the single writer and its batching.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot, watch};

use super::StoreError;

/// The name of the writer's thread.
///
/// Why a thread of its own: every statement of a write is a round trip to
/// the connection's SQLite thread, and on the shared runtime each answer
/// queued behind whatever else was ready (a thousand backends' workers, a
/// burst of requests): a write of five statements took 650 us under load,
/// and every submission and lease of the farm waits for the writer. On its
/// own thread it is scheduled by the operating system as soon as an answer
/// is there.
pub const WRITER_THREAD: &str = "store-writer";

type RunFn = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(), StoreError>> + Send,
>;

/// One queued write: `run` does the work inside the batch's transaction,
/// `finish` answers the caller once the batch's fate is known.
struct Op {
    run: RunFn,
    finish: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
    kind: Kind,
    /// Which write this is (the type name of its function, which names the
    /// store method it comes from): the trace of what holds the writer
    /// (`RUST_LOG=orchestrator::store::writer=trace`) says it with each
    /// operation's time.
    name: &'static str,
}

/// What the writer needs to know of an operation besides its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Any write, in the ordinary lane; undone alone if it fails (by its
    /// savepoint, or by rolling back a batch it is the first of).
    Any,
    /// A submission: one statement (atomic by itself, no savepoint), in
    /// its own lane, taken first.
    Submission,
    /// One statement that appends nothing to the event log (a backend's
    /// `last_seen`): no savepoint, and its commit wakes no log reader.
    Quiet,
    /// One statement (its triggers' writes included) in the ordinary lane,
    /// which may append to the event log: no savepoint.
    Statement,
}

impl Kind {
    fn single(self) -> bool {
        self != Kind::Any
    }
    fn urgent(self) -> bool {
        self == Kind::Submission
    }
}

/// A write: runs on the writer's connection inside the batch's transaction.
pub trait WriteFn<T>:
    for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static
{
}

impl<T, F> WriteFn<T> for F where
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>
        + Send
        + 'static
{
}

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
    /// Submissions: taken before anything else waiting, so a client's
    /// answer does not queue behind a busy farm's dispatch writes.
    urgent: mpsc::Sender<Op>,
    committed: Arc<watch::Sender<u64>>,
    /// When a write last found the database locked by another program
    /// (milliseconds since the epoch; 0: never), for the health check.
    locked_at: Arc<AtomicI64>,
}

impl Writer {
    /// Starts the writer on `conn`, on a thread of its own; it ends when
    /// every handle is dropped. Also returns that thread's runtime, for the
    /// tasks that feed the writer (see [`WRITER_THREAD`]).
    pub fn spawn(
        conn: SqliteConnection,
        max_batch: usize,
    ) -> std::io::Result<(Writer, tokio::runtime::Handle)> {
        let (tx, rx) = mpsc::channel::<Op>(max_batch * 4);
        let (urgent, urgent_rx) = mpsc::channel::<Op>(max_batch * 4);
        let committed = Arc::new(watch::channel(0u64).0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let done = committed.clone();
        let locked_at = Arc::new(AtomicI64::new(0));
        let locked = locked_at.clone();
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || runtime.block_on(run(conn, urgent_rx, rx, max_batch, done, locked)))?;
        Ok((
            Writer {
                tx,
                urgent,
                committed,
                locked_at,
            },
            handle,
        ))
    }

    /// Whether a write found the database locked by another program within
    /// the last `within`.
    pub fn locked_within(&self, within: std::time::Duration) -> bool {
        let at = self.locked_at.load(Ordering::Relaxed);
        at > 0 && chrono::Utc::now().timestamp_millis() - at < within.as_millis() as i64
    }

    /// Changes after every committed batch that may have appended to the
    /// event log: its readers wait on it instead of polling.
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Runs `f` inside the current group transaction and returns its result
    /// once the transaction is committed. If `f` fails, its own changes are
    /// rolled back and the others in the batch still commit.
    pub async fn write<T: Send + 'static>(&self, f: impl WriteFn<T>) -> Result<T, StoreError> {
        self.submit_op(f, Kind::Any).await
    }

    /// Like [`Writer::write`], for an operation that writes with at most one
    /// statement (reads before it are free): a statement is atomic by
    /// itself, so no savepoint is spent on it. The hot path of submissions,
    /// and taken before other waiting writes.
    pub async fn write_single<T: Send + 'static>(
        &self,
        f: impl WriteFn<T>,
    ) -> Result<T, StoreError> {
        self.submit_op(f, Kind::Submission).await
    }

    /// Like [`Writer::write_single`], in the lane of ordinary writes, for a
    /// statement that appends nothing to the event log and that no client
    /// waits for (a backend's `last_seen`): a batch of only these wakes no
    /// reader of the log (a farm of a thousand backends records dozens a
    /// second while idle).
    pub async fn write_one<T: Send + 'static>(&self, f: impl WriteFn<T>) -> Result<T, StoreError> {
        self.submit_op(f, Kind::Quiet).await
    }

    /// Like [`Writer::write`], for an operation that writes with at most
    /// one statement (its triggers included; reads before or after it are
    /// free): a statement is atomic by itself, so no savepoint is spent on
    /// it. A job's start, each step of which is one statement.
    pub async fn write_statement<T: Send + 'static>(
        &self,
        f: impl WriteFn<T>,
    ) -> Result<T, StoreError> {
        self.submit_op(f, Kind::Statement).await
    }

    async fn submit_op<T: Send + 'static>(
        &self,
        f: impl WriteFn<T>,
        kind: Kind,
    ) -> Result<T, StoreError> {
        let name = std::any::type_name_of_val(&f);
        let (done_tx, done_rx) = oneshot::channel::<Result<T, StoreError>>();
        let slot: Arc<Mutex<Option<Result<T, StoreError>>>> = Arc::new(Mutex::new(None));
        let run_slot = slot.clone();
        let run: RunFn = Box::new(move |conn| {
            Box::pin(async move {
                let result = f(conn).await;
                let status = result.as_ref().map(|_| ()).map_err(Clone::clone);
                *run_slot.lock().expect("writer slot") = Some(result);
                status
            })
        });
        let finish = Box::new(move |commit: Result<(), StoreError>| {
            let result = slot.lock().expect("writer slot").take();
            let answer = match (commit, result) {
                (_, Some(Err(e))) => Err(e),
                (Err(e), _) => Err(e),
                (Ok(()), Some(Ok(v))) => Ok(v),
                (Ok(()), None) => Err(StoreError::Closed),
            };
            let _ = done_tx.send(answer);
        });
        let op = Op {
            run,
            finish,
            kind,
            name,
        };
        let lane = if kind.urgent() {
            &self.urgent
        } else {
            &self.tx
        };
        lane.send(op).await.map_err(|_| StoreError::Closed)?;
        done_rx.await.map_err(|_| StoreError::Closed)?
    }
}

async fn exec(conn: &mut SqliteConnection, sql: &str) -> Result<(), StoreError> {
    sqlx::query(sql)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(StoreError::from)
}

/// Longest a batch takes new operations into its transaction.
///
/// Why: a burst (a thousand backends' workers leasing at once) once made
/// batches of 200 operations that held the transaction for 90 ms, and a
/// submission arriving meanwhile waited for all of them and then its own
/// batch. Past this budget the batch commits and the next one starts with
/// what waits, submissions first; a commit costs well under a millisecond
/// on an SSD, so the budget still shares each one among many operations.
const BATCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(5);

async fn run(
    mut conn: SqliteConnection,
    mut urgent: mpsc::Receiver<Op>,
    mut rx: mpsc::Receiver<Op>,
    max_batch: usize,
    committed: Arc<watch::Sender<u64>>,
    locked_at: Arc<AtomicI64>,
) {
    let mut lanes = Lanes {
        urgent: &mut urgent,
        other: &mut rx,
        last_urgent: false,
    };
    loop {
        let Some(first) = lanes.wait().await else {
            break;
        };
        if commit_batch(&mut conn, first, &mut lanes, max_batch, &locked_at).await == Some(true) {
            committed.send_modify(|n| *n += 1);
        }
    }
    tracing::debug!("store writer stopped");
}

/// The two queues of waiting operations.
struct Lanes<'a> {
    urgent: &'a mut mpsc::Receiver<Op>,
    other: &'a mut mpsc::Receiver<Op>,
    /// Whether the last operation taken was urgent: when both lanes wait,
    /// they take turns, so a flood of submissions cannot starve the farm's
    /// writes (nor the farm's writes delay a submission by more than one).
    last_urgent: bool,
}

impl Lanes<'_> {
    /// The next operation, once one comes (in turns when both lanes wait,
    /// else a submission first); `None` when every handle is gone.
    async fn wait(&mut self) -> Option<Op> {
        // Turns hold across batches too: a batch that ended with a
        // submission is followed by a farm write, if one waits.
        if let Some(op) = self.next() {
            return Some(op);
        }
        let op = tokio::select! {
            biased;
            Some(op) = self.urgent.recv() => op,
            Some(op) = self.other.recv() => op,
            else => return None,
        };
        self.last_urgent = op.kind.urgent();
        Some(op)
    }

    /// The next waiting operation, if any.
    fn next(&mut self) -> Option<Op> {
        let op = if self.last_urgent {
            self.other.try_recv().or_else(|_| self.urgent.try_recv())
        } else {
            self.urgent.try_recv().or_else(|_| self.other.try_recv())
        }
        .ok()?;
        self.last_urgent = op.kind.urgent();
        Some(op)
    }
}

/// Runs `first` and what waits after it (taken as the batch goes, until
/// `max_batch` operations or [`BATCH_BUDGET`]) in one transaction, and
/// commits once. `None` if it did not reach the disk, else whether any of
/// its operations may have appended to the event log.
async fn commit_batch(
    conn: &mut SqliteConnection,
    first: Op,
    lanes: &mut Lanes<'_>,
    max_batch: usize,
    locked_at: &AtomicI64,
) -> Option<bool> {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
        if e.locked() {
            locked_at.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        }
        tracing::error!(error = %e, "cannot begin a write transaction");
        (first.finish)(Err(e));
        return None;
    }
    let mut logs = false;
    let started = std::time::Instant::now();
    let mut finishes = Vec::new();
    let mut aborted: Option<StoreError> = None;
    // Whether a savepoint is open: released with the next one's opening,
    // or by the COMMIT (one round trip to SQLite's thread saved a time).
    let mut open_savepoint = false;
    let mut next = Some(first);
    let mut holds_submission = false;
    while let Some(op) = next.take() {
        logs |= op.kind != Kind::Quiet;
        // A client waits for a submission's commit: once one is in, the
        // batch commits without taking more (what comes meanwhile starts
        // the next one).
        holds_submission |= op.kind.urgent();
        let op_started = std::time::Instant::now();
        let result = if op.kind.single() {
            match (op.run)(conn).await {
                // SQLite may have rolled the transaction back: abandon the batch.
                Err(e @ (StoreError::Full | StoreError::Database(_) | StoreError::Closed)) => {
                    Err(e)
                }
                // A refusal before its one write (a conflict): nothing to undo.
                _ => Ok(()),
            }
        } else if finishes.is_empty() {
            // The first operation runs bare: if it fails, rolling the
            // transaction back undoes it alone. Nothing else was taken.
            // Later ones run in a savepoint: the transaction holds earlier
            // operations' work, which a failing one must not undo.
            if (op.run)(conn).await.is_err() {
                let rollback = exec(conn, "ROLLBACK").await;
                // Its caller gets its own error.
                (op.finish)(rollback);
                return None;
            }
            Ok(())
        } else {
            let open = if open_savepoint {
                "RELEASE op; SAVEPOINT op"
            } else {
                "SAVEPOINT op"
            };
            open_savepoint = true;
            run_in_savepoint(conn, open, op.run).await
        };
        tracing::trace!(
            kind = ?op.kind,
            name = op.name,
            us = op_started.elapsed().as_micros() as u64,
            "write ran"
        );
        finishes.push(op.finish);
        if let Err(e) = result {
            // SQLite may have rolled back the whole transaction (disk
            // full, I/O error): nothing of this batch is stored.
            aborted = Some(e);
            break;
        }
        if !holds_submission && finishes.len() < max_batch && started.elapsed() < BATCH_BUDGET {
            next = lanes.next();
        }
    }
    let worked = started.elapsed();
    let commit = match aborted {
        Some(e) => {
            let _ = exec(conn, "ROLLBACK").await;
            Err(e)
        }
        None => match exec(conn, "COMMIT").await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the batch is rolled back");
                let _ = exec(conn, "ROLLBACK").await;
                Err(e)
            }
        },
    };
    let ok = commit.is_ok();
    tracing::trace!(
        ops = finishes.len(),
        submission = holds_submission,
        work_us = worked.as_micros() as u64,
        commit_us = (started.elapsed() - worked).as_micros() as u64,
        ok,
        "batch ended"
    );
    for finish in finishes {
        finish(commit.clone());
    }
    ok.then_some(logs)
}

/// Runs one op in a savepoint, opened by `open`. An op that fails is undone
/// alone (its caller gets its own error) and its savepoint stays open, to
/// be released with the next one; an `Err` here means the transaction
/// itself is lost.
async fn run_in_savepoint(
    conn: &mut SqliteConnection,
    open: &str,
    run: RunFn,
) -> Result<(), StoreError> {
    exec(conn, open).await?;
    if let Err(op_error) = run(conn).await {
        if exec(conn, "ROLLBACK TO op").await.is_err() {
            return Err(op_error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    /// Gives a closure the signature of a write (a closure's own inference
    /// cannot name the lifetime).
    fn typed<F>(f: F) -> F
    where
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(), StoreError>>,
    {
        f
    }

    /// Ops queued in the writer's two lanes.
    fn queued(writer: &Writer) -> (usize, usize) {
        let n = |tx: &mpsc::Sender<Op>| tx.max_capacity() - tx.capacity();
        (n(&writer.urgent), n(&writer.tx))
    }

    /// Waits until the lanes hold `expected` (submissions, others).
    async fn until_queued(writer: &Writer, expected: (usize, usize)) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while queued(writer) != expected {
            assert!(Instant::now() < deadline, "queued: {:?}", queued(writer));
            tokio::task::yield_now().await;
        }
    }

    /// Holds the writer inside a write (which inserts `held`, then answers
    /// `answer`) until the returned sender fires: the lanes fill meanwhile.
    async fn hold_writer(
        writer: &Writer,
        answer: Result<(), StoreError>,
    ) -> (
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (open, gate) = oneshot::channel::<()>();
        let (inside, entered) = oneshot::channel::<()>();
        let w = writer.clone();
        let held = tokio::spawn(async move {
            w.write(typed(|conn| {
                Box::pin(async move {
                    exec(conn, "INSERT INTO t (label) VALUES ('held')").await?;
                    let _ = inside.send(());
                    let _ = gate.await;
                    answer
                })
            }))
            .await
        });
        entered.await.unwrap();
        (open, held)
    }

    /// A writer on a new database with one table, `t (label)`.
    async fn writer_on_new_db(dir: &std::path::Path) -> Writer {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("w.db"))
            .create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        exec(&mut conn, "CREATE TABLE t (label TEXT)")
            .await
            .unwrap();
        Writer::spawn(conn, 512).unwrap().0
    }

    #[tokio::test]
    async fn a_batch_of_quiet_writes_wakes_no_reader_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_on_new_db(dir.path()).await;
        let mut commits = writer.subscribe_commits();
        commits.borrow_and_update();
        let insert = || {
            typed(|conn| {
                Box::pin(async move {
                    exec(conn, "INSERT INTO t (label) VALUES ('x')").await?;
                    Ok(())
                })
            })
        };
        writer.write_one(insert()).await.unwrap();
        // The writer has finished the first batch (and told the readers,
        // had it to) before it takes the second.
        writer.write_one(insert()).await.unwrap();
        assert!(
            !commits.has_changed().unwrap(),
            "a last_seen refresh woke the event readers"
        );
        writer.write(insert()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), commits.changed())
            .await
            .expect("an ordinary write wakes the event readers")
            .unwrap();
    }

    #[tokio::test]
    async fn a_failing_operation_is_undone_alone_wherever_it_falls_in_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_on_new_db(dir.path()).await;
        let insert = |label: &'static str, fail: bool| {
            typed(move |conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO t (label) VALUES (?)")
                        .bind(label)
                        .execute(&mut *conn)
                        .await?;
                    if fail {
                        return Err(StoreError::InvalidState(format!("{label} refused")));
                    }
                    Ok(())
                })
            })
        };
        // A first operation that will fail holds the writer while the
        // others queue, in this order: another failing one, then failures
        // between successes.
        let refused = Err(StoreError::InvalidState("held refused".into()));
        let (open, held) = hold_writer(&writer, refused).await;
        let plan = [
            ("first", true),
            ("a", false),
            ("b", true),
            ("c", false),
            ("d", true),
            ("e", false),
        ];
        let mut tasks = Vec::new();
        for (i, (label, fail)) in plan.into_iter().enumerate() {
            let (w, f) = (writer.clone(), insert(label, fail));
            tasks.push(tokio::spawn(async move { w.write(f).await }));
            until_queued(&writer, (0, i + 1)).await;
        }
        open.send(()).unwrap();
        assert!(
            matches!(held.await.unwrap(), Err(StoreError::InvalidState(m)) if m == "held refused")
        );
        for ((label, fail), task) in plan.into_iter().zip(tasks) {
            let result = task.await.unwrap();
            match result {
                Err(StoreError::InvalidState(m)) if fail => {
                    assert_eq!(m, format!("{label} refused"))
                }
                Ok(()) if !fail => {}
                other => panic!("{label}: {other:?}"),
            }
        }
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("w.db"));
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        let rows: Vec<String> = sqlx::query_scalar("SELECT label FROM t ORDER BY rowid")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(rows, ["a", "c", "e"]);
    }

    #[tokio::test]
    async fn a_submission_waits_behind_one_farm_write_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_on_new_db(dir.path()).await;
        let order = Arc::new(Mutex::new(Vec::<String>::new()));
        // How many batches had committed when each write ran.
        let commits = writer.subscribe_commits();
        let batch_of = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
        let op = |label: String| {
            let (order, commits, batch_of) = (order.clone(), commits.clone(), batch_of.clone());
            typed(move |conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO t (label) VALUES (?)")
                        .bind(&label)
                        .execute(conn)
                        .await?;
                    batch_of
                        .lock()
                        .unwrap()
                        .insert(label.clone(), *commits.borrow());
                    order.lock().unwrap().push(label);
                    Ok(())
                })
            })
        };
        // The writer is held inside a first farm write while the lanes fill.
        let (open, first) = hold_writer(&writer, Ok(())).await;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (w, f) = (writer.clone(), op(format!("farm{i}")));
            tasks.push(tokio::spawn(async move { w.write(f).await }));
        }
        for i in 0..3 {
            let (w, f) = (writer.clone(), op(format!("submit{i}")));
            tasks.push(tokio::spawn(async move { w.write_single(f).await }));
        }
        until_queued(&writer, (3, 100)).await;
        open.send(()).unwrap();
        first.await.unwrap().unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 103);
        // Submissions first, then turns: each waits behind one farm write
        // at most, and the farm's writes are not starved either.
        assert_eq!(
            &order[..6],
            ["submit0", "farm0", "submit1", "farm1", "submit2", "farm2"]
        );
        let farm: Vec<&String> = order.iter().filter(|l| l.starts_with("farm")).collect();
        assert!(farm.windows(2).all(|w| w[0] != w[1]) && farm.len() == 100);
        // A batch that holds a submission commits at once: its client
        // waits for that commit, not for the farm writes queued behind it.
        let batch_of = batch_of.lock().unwrap();
        for pair in order[..6].windows(2).filter(|w| w[0].starts_with("submit")) {
            assert!(
                batch_of[&pair[1]] > batch_of[&pair[0]],
                "{} ran in the batch of {}",
                pair[1],
                pair[0]
            );
        }
    }
}
