//! All SQL lives here: schema, migrations, and every query the service makes.
//!
//! Why one module: the rest of the service speaks of jobs, leases and
//! backends, never of tables, so the storage can change (a PostgreSQL store
//! for several orchestrators, say) without touching the API or dispatch.
//!
//! Layout:
//! - [`model`]: the records callers hand in and get back, and the state enums.
//! - `submit`: storing new jobs, many per statement (group commit).
//! - `history`: reading jobs, their leases, outputs and events.
//! - `lease`: leasing the next job to a backend, the rules that bar a job
//!   from one, and what a backend holds.
//! - `choice`: the preference among the jobs a backend may run.
//! - `transitions`: every change of a leased job, each fenced by its lease
//!   token and logged as an event, through one helper.
//! - `shares`: the farm shared between groups of jobs (`dispatch.share_by`).
//! - `backends`, `events`, `webhooks`, `cleanup`: the farm's rows, the event
//!   log, the webhook outbox, the list of prompts to remove from backends.
//! - [`writer`]: the single writer task; reads go through a pool.
//!
//! Connection settings (WAL, `synchronous`, `foreign_keys`, `busy_timeout`)
//! are set on the connect options so that every connection gets them.

mod backend_records;
mod backends;
mod batch;
#[cfg(feature = "bench-support")]
mod bench;
mod causes;
mod choice;
mod cleanup;
mod events;
mod farm;
mod history;
mod holds;
mod inputs;
mod inventory;
mod lease;
mod migrate;
pub mod model;
mod outcomes;
mod requests;
mod retention;
mod rows;
mod shares;
mod submit;
mod takers;
mod transitions;
mod waiting;
mod webhooks;
pub mod writer;
mod writes;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, SqlitePool};

pub use causes::{against_the_job, failure_cause, metadata_value};
pub use choice::Preference;
pub use cleanup::CleanupEntry;
pub use farm::{Attempt, QueueSample};
pub use holds::HeldBatch;
pub use inputs::{InputDeleting, InputDeletion, InputRecord, InputUse, InputsNamed};
pub use inventory::InventorySummary;
pub use lease::{FarmGlance, Fit, LeaseTry};
pub use lease::{MAX_FAILURES_PER_BACKEND, UPLOAD_MARGIN_BYTES, UPLOAD_TOO_LARGE};
pub use model::*;
pub use outcomes::avoid_span;
pub use requests::{PauseChange, PriorityChange, ScheduleChange};
pub use retention::StaleOutput;
pub use shares::{share_of, FarmShares, ShareGroup};
pub use transitions::{LostOutcome, LostRun};
pub use waiting::LiveBackends;

use crate::config::{DatabaseConfig, Synchronous};

/// What can go wrong in storage, as the API needs to tell it apart.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The disk (or `max_page_count`) is full: nothing was written.
    #[error("the database disk is full; nothing was stored")]
    Full,
    /// The writer task has stopped (shutting down).
    #[error("the database is closed")]
    Closed,
    /// A caller-level conflict detected inside a write (idempotency key reuse).
    #[error("{0}")]
    Conflict(String),
    /// A row the operation needs does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The job is not in a state that allows the operation.
    #[error("{0}")]
    InvalidState(String),
    /// A lease was taken back: the caller's fencing token is stale.
    #[error("lease lost: the job was leased again")]
    LeaseLost,
    /// Any other database error.
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            // SQLITE_FULL.
            if primary_code(db.as_ref()) == Some(13)
                || db.message().contains("database or disk is full")
            {
                return StoreError::Full;
            }
        }
        if let sqlx::Error::PoolClosed = e {
            return StoreError::Closed;
        }
        StoreError::Database(Arc::new(e))
    }
}

/// SQLite's primary result code of a database error: extended codes keep
/// it in their low byte.
fn primary_code(db: &dyn sqlx::error::DatabaseError) -> Option<i64> {
    db.code()?.parse::<i64>().ok().map(|c| c & 0xff)
}

impl StoreError {
    /// Whether the database was locked by another connection (`SQLITE_BUSY`
    /// or `SQLITE_LOCKED` past the busy timeout): another program holds a
    /// write transaction on the file (a `sqlite3` shell, a database
    /// browser), since this service writes through one connection only.
    pub fn locked(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        let sqlx::Error::Database(db) = e.as_ref() else {
            return false;
        };
        matches!(primary_code(db.as_ref()), Some(5 | 6))
    }

    /// The sentence for a client whose write did not happen because the
    /// database is [`locked`](Self::locked).
    pub const LOCKED: &'static str = "the database is locked by another program holding a \
        write transaction on it (a sqlite3 shell, a database browser): nothing was stored; \
        retry once it lets go";
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Database(Arc::new(sqlx::Error::Decode(Box::new(e))))
    }
}

/// The database: a read pool and the writer. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    read: SqlitePool,
    writer: writer::Writer,
    clock: submit::SubmitClock,
    /// Submissions wait here to be stored many at a time (one INSERT each batch).
    submissions: tokio::sync::mpsc::Sender<submit::PendingSubmission>,
    /// Which backends take jobs of a tag set (asked by every submission).
    takers: Arc<takers::Takers>,
    /// Inputs on their way into a job, and inputs being deleted.
    input_claims: Arc<inputs::InputClaims>,
}

/// Formats a time the way it is stored: RFC 3339 UTC with microseconds, so
/// that text order is time order.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a stored time.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn connect_options(path: &Path, db: &DatabaseConfig) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match db.synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        })
        .foreign_keys(true)
        // A failed job fails the jobs waiting on it, and theirs (V11).
        .pragma("recursive_triggers", "ON")
        .busy_timeout(Duration::from_secs(5))
        .log_statements(tracing::log::LevelFilter::Trace)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, checks it, applies
    /// migrations, and starts the writer.
    pub async fn open(path: &Path, db: &DatabaseConfig) -> anyhow::Result<Store> {
        let options = connect_options(path, db);
        let mut conn = options
            .clone()
            .create_if_missing(true)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
        let check: String = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&mut conn)
            .await?;
        if check != "ok" {
            anyhow::bail!(
                "database {} failed its integrity check: {check}; restore a backup",
                path.display()
            );
        }
        migrate::run(&mut conn).await?;
        // In WAL mode a read transaction that finds the database changed
        // since its connection's last one starts from an empty page cache:
        // on a farm that writes all the time a reader's cache serves one
        // query, so it needs little room (256 KiB, not SQLite's 2 MB); what
        // a large read pulls in is not kept four times over.
        //
        // No ping before each read (sqlx's default, made for connections
        // over a network): a file's connection cannot have hung up, a broken
        // one fails its query just the same, and the ping was one more round
        // trip to the connection's thread before every read. (The pool still
        // pings a connection as it comes back, which settles a read dropped
        // half-way.)
        let read = SqlitePoolOptions::new()
            .max_connections(db.read_connections)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(options.read_only(true).pragma("cache_size", "-256"))
            .await?;
        let (writer, writer_runtime) = writer::Writer::spawn(conn, db.max_batch)?;
        let (submissions, submissions_rx) = tokio::sync::mpsc::channel(db.max_batch * 4);
        let mut store = Store {
            read,
            writer,
            clock: submit::SubmitClock::default(),
            submissions,
            takers: Arc::default(),
            input_claims: Arc::default(),
        };
        store.clock = store.load_submit_clock().await?;
        // At most as many rows as SQLite takes bound values in one statement.
        let batch = db.max_batch.min(2_000);
        // Gathering submissions into one statement is the writer's own work:
        // on its thread, it does not queue behind the farm either.
        writer_runtime.spawn(submit::batch_submissions(
            store.writer.clone(),
            store.clock.clone(),
            submissions_rx,
            batch,
        ));
        Ok(store)
    }

    /// A store in a temporary folder of its own, for unit tests (the
    /// folder goes when the returned guard is dropped).
    #[cfg(test)]
    pub(crate) async fn temporary() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite"), &Default::default())
            .await
            .unwrap();
        (dir, store)
    }

    /// The read pool, for queries.
    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.read
    }

    /// The writer, for changes.
    pub(crate) fn writer(&self) -> &writer::Writer {
        &self.writer
    }

    /// Whether a write found the database locked by another program within
    /// the last half minute: the health check warns, since every write
    /// (submissions, the farm's) waits and fails while it lasts.
    pub fn locked_by_another(&self) -> bool {
        self.writer
            .locked_within(std::time::Duration::from_secs(30))
    }

    /// The records `sql` selects for one key (its one `?`).
    async fn all_by<T>(&self, sql: &str, key: &str) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        Ok(sqlx::query_as(sql).bind(key).fetch_all(&self.read).await?)
    }

    /// The record `sql` selects for one key (its one `?`), if any.
    async fn one_by<T>(&self, sql: &str, key: &str) -> Result<Option<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        Ok(sqlx::query_as(sql)
            .bind(key)
            .fetch_optional(&self.read)
            .await?)
    }

    /// Answers whether the database can be read.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    /// Writes a consistent copy of the database to `dest` while it is in use.
    pub async fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        let dest = dest.to_string_lossy().to_string();
        sqlx::query("VACUUM INTO ?")
            .bind(dest)
            .execute(&self.read)
            .await?;
        Ok(())
    }

    /// Closes the read pool; the writer ends when its last handle is dropped.
    pub async fn close(&self) {
        self.read.close().await;
    }

    /// Reads a pragma's value on a read connection (for tests and health).
    pub async fn pragma(&self, name: &str) -> Result<String, StoreError> {
        let mut conn = self.read.acquire().await?;
        let row: (String,) =
            sqlx::query_as(&format!("SELECT CAST(({}) AS TEXT)", pragma_select(name)))
                .fetch_one(&mut *conn)
                .await?;
        Ok(row.0)
    }

    /// Reads a pragma's value on the writer connection.
    pub async fn writer_pragma(&self, name: &str) -> Result<String, StoreError> {
        let sql = format!("SELECT CAST(({}) AS TEXT)", pragma_select(name));
        self.writer
            .write(move |conn| {
                Box::pin(async move {
                    let row: (String,) = sqlx::query_as(&sql).fetch_one(&mut *conn).await?;
                    Ok(row.0)
                })
            })
            .await
    }

    /// Sets SQLite's page cap on the writer: lets tests fill the "disk".
    pub async fn set_max_page_count(&self, pages: i64) -> Result<(), StoreError> {
        self.writer
            .write(move |conn| {
                Box::pin(async move {
                    sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }
}

fn pragma_select(name: &str) -> String {
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    format!("SELECT * FROM pragma_{name}")
}

/// Writes a consistent copy of the database file at `src` to `dest`
/// (the `backup` command, which runs beside a live service).
pub async fn backup_file(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let options =
        SqliteConnectOptions::from_str(&format!("sqlite://{}", src.display()))?.read_only(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let mut conn = pool.acquire().await?;
    sqlx::query("VACUUM INTO ?")
        .bind(dest.to_string_lossy().to_string())
        .execute(&mut *conn)
        .await?;
    drop(conn);
    pool.close().await;
    Ok(())
}
