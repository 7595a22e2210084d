//! The one writer: every write to the database goes through this task.
//!
//! Why: SQLite allows one writer at a time. Funnelling writes through one
//! connection removes `SQLITE_BUSY` retry loops, and lets many concurrent
//! requests share one transaction and one fsync (group commit): the writer
//! takes everything queued while the previous commit was on disk, runs each
//! operation in its own savepoint (so one failing operation does not undo the
//! others), commits once, and only then answers each caller. A caller that
//! gets `Ok` knows its write is durable.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot, watch};

use super::StoreError;

type RunFn = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(), StoreError>> + Send,
>;

/// One queued write: `run` does the work inside the batch's transaction,
/// `finish` answers the caller once the batch's fate is known.
struct Op {
    run: RunFn,
    finish: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
    /// Writes with at most one statement: atomic by itself, no savepoint needed.
    single: bool,
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
}

impl Writer {
    /// Starts the writer task on `conn`; it ends when every handle is dropped.
    pub fn spawn(
        conn: SqliteConnection,
        max_batch: usize,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Op>(max_batch * 4);
        let (urgent, urgent_rx) = mpsc::channel::<Op>(max_batch * 4);
        let committed = Arc::new(watch::channel(0u64).0);
        let handle = tokio::spawn(run(conn, urgent_rx, rx, max_batch, committed.clone()));
        (
            Writer {
                tx,
                urgent,
                committed,
            },
            handle,
        )
    }

    /// Changes after every committed batch: event-log readers wait on it
    /// instead of polling.
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Runs `f` inside the current group transaction and returns its result
    /// once the transaction is committed. If `f` fails, its own changes are
    /// rolled back and the others in the batch still commit.
    pub async fn write<T: Send + 'static>(&self, f: impl WriteFn<T>) -> Result<T, StoreError> {
        self.submit_op(f, false).await
    }

    /// Like [`Writer::write`], for an operation that writes with at most one
    /// statement (reads before it are free): a statement is atomic by
    /// itself, so no savepoint is spent on it. The hot path of submissions,
    /// and taken before other waiting writes.
    pub async fn write_single<T: Send + 'static>(
        &self,
        f: impl WriteFn<T>,
    ) -> Result<T, StoreError> {
        self.submit_op(f, true).await
    }

    async fn submit_op<T: Send + 'static>(
        &self,
        f: impl WriteFn<T>,
        single: bool,
    ) -> Result<T, StoreError> {
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
            single,
        };
        let lane = if single { &self.urgent } else { &self.tx };
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

async fn run(
    mut conn: SqliteConnection,
    mut urgent: mpsc::Receiver<Op>,
    mut rx: mpsc::Receiver<Op>,
    max_batch: usize,
    committed: Arc<watch::Sender<u64>>,
) {
    let mut batch: Vec<Op> = Vec::with_capacity(max_batch);
    loop {
        let first = tokio::select! {
            biased;
            Some(op) = urgent.recv() => op,
            Some(op) = rx.recv() => op,
            else => break,
        };
        batch.push(first);
        for lane in [&mut urgent, &mut rx] {
            while batch.len() < max_batch {
                match lane.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        }
        if commit_batch(&mut conn, &mut batch).await {
            committed.send_modify(|n| *n += 1);
        }
    }
    tracing::debug!("store writer stopped");
}

/// Commits one batch; `true` if it reached the disk.
async fn commit_batch(conn: &mut SqliteConnection, batch: &mut Vec<Op>) -> bool {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE").await {
        tracing::error!(error = %e, "cannot begin a write transaction");
        for op in batch.drain(..) {
            (op.finish)(Err(e.clone()));
        }
        return false;
    }
    let mut finishes = Vec::with_capacity(batch.len());
    let mut aborted: Option<StoreError> = None;
    for op in batch.drain(..) {
        if aborted.is_none() {
            let result = if op.single {
                match (op.run)(conn).await {
                    // SQLite may have rolled the transaction back: abandon the batch.
                    Err(e @ (StoreError::Full | StoreError::Database(_) | StoreError::Closed)) => {
                        Err(e)
                    }
                    // A refusal before its one write (a conflict): nothing to undo.
                    _ => Ok(()),
                }
            } else {
                run_in_savepoint(conn, op.run).await
            };
            if let Err(e) = result {
                // SQLite may have rolled back the whole transaction (disk
                // full, I/O error): nothing of this batch is stored.
                aborted = Some(e);
            }
        }
        finishes.push(op.finish);
    }
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
    for finish in finishes {
        finish(commit.clone());
    }
    ok
}

/// Runs one op in a savepoint. An op that fails is undone alone (its caller
/// gets its own error); an `Err` here means the transaction itself is lost.
async fn run_in_savepoint(conn: &mut SqliteConnection, run: RunFn) -> Result<(), StoreError> {
    exec(conn, "SAVEPOINT op").await?;
    match run(conn).await {
        Ok(()) => exec(conn, "RELEASE op").await,
        Err(op_error) => {
            if exec(conn, "ROLLBACK TO op").await.is_err() {
                return Err(op_error);
            }
            exec(conn, "RELEASE op").await
        }
    }
}
