//! The durable event log: every state change of a job, its progress at a
//! bounded rate, and backend state changes, in one order.
//!
//! Why one log for everything: a subscriber that reconnects with the last
//! sequence number it saw gets exactly what it missed (no gap, no
//! duplicate), also across restarts; the live fan-out (`crate::events`)
//! reads it once for all subscribers.

use chrono::Utc;
use serde_json::Value;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::watch;

use super::batch::Batch;
use super::model::*;
use super::rows::{push_in, EVENT_COLUMNS};
use super::{fmt_time, Store, StoreError};

/// Fields of one event to append.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventInput<'a> {
    /// Kind of event.
    pub kind: &'a str,
    /// Status after it.
    pub status: Option<JobStatus>,
    /// Backend involved.
    pub backend_id: Option<&'a str>,
    /// Attempt number.
    pub attempt: Option<i64>,
    /// Sentence for people.
    pub message: Option<String>,
    /// Details.
    pub data: Option<Value>,
}

/// Appends one event to a job's log, inside the caller's transaction.
pub(crate) async fn append_event(
    conn: &mut SqliteConnection,
    job_id: &str,
    ev: EventInput<'_>,
) -> Result<(), StoreError> {
    let mut b = Batch::default();
    push_event(&mut b, job_id, ev, &fmt_time(Utc::now()));
    b.run(conn).await
}

/// Adds one event of a job's to a batch of statements.
pub(super) fn push_event(b: &mut Batch<'_>, job_id: &str, ev: EventInput<'_>, now: &str) {
    b.push(
        "INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, attempt, message, data) \
         VALUES (?, (SELECT workflow_id FROM jobs WHERE id = ?), ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(job_id.to_string())
    .bind(job_id.to_string())
    .bind(now.to_string())
    .bind(ev.kind.to_string())
    .bind(ev.status)
    .bind(ev.backend_id.map(str::to_string))
    .bind(ev.attempt)
    .bind(ev.message)
    .bind(ev.data.map(|d| d.to_string()));
}

/// Appends a backend event (no job), inside the caller's transaction; with
/// no backend, an event of the farm's (its data folder's disk).
pub(super) async fn backend_event(
    conn: &mut SqliteConnection,
    backend_id: Option<&str>,
    kind: &str,
    message: String,
    data: Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO job_events (job_id, workflow_id, at, kind, status, backend_id, message, data) \
         VALUES (NULL, NULL, ?, ?, NULL, ?, ?, ?)",
    )
    .bind(fmt_time(Utc::now()))
    .bind(kind)
    .bind(backend_id)
    .bind(message)
    .bind(data.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// Appends an event about a backend that no state change carries (its
    /// quarantine): on its own, in the log every subscriber reads.
    pub async fn backend_event(
        &self,
        backend_id: &str,
        kind: &str,
        message: &str,
        data: Value,
    ) -> Result<(), StoreError> {
        let (id, kind, message) = (
            backend_id.to_string(),
            kind.to_string(),
            message.to_string(),
        );
        self.writer()
            .write(move |conn| {
                Box::pin(async move { backend_event(conn, Some(&id), &kind, message, data).await })
            })
            .await
    }

    /// Appends an event of the farm's own, of no job nor backend (the data
    /// folder's disk running low, and space back).
    pub async fn farm_event(
        &self,
        kind: &'static str,
        message: String,
        data: Value,
    ) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move { backend_event(conn, None, kind, message, data).await })
            })
            .await
    }

    /// Changes after every commit: wait on it for new events.
    pub fn subscribe_commits(&self) -> watch::Receiver<u64> {
        self.writer().subscribe_commits()
    }

    /// The newest event's sequence number (0 when there is none).
    pub async fn latest_event_seq(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM job_events")
                .fetch_one(self.reader())
                .await?,
        )
    }

    /// Events after `after`, oldest first, at most `limit`.
    pub async fn events_after(
        &self,
        after: i64,
        filter: &EventFilter,
        limit: i64,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE seq > "
        ));
        q.push_bind(after);
        push_in(&mut q, "job_id", &filter.job_ids);
        push_in(&mut q, "status", &filter.statuses);
        if let Some(w) = &filter.workflow_id {
            q.push(" AND workflow_id = ").push_bind(w);
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(limit);
        Ok(q.build_query_as().fetch_all(self.reader()).await?)
    }

    /// Stores a running job's progress (the caller bounds the rate) as the
    /// job's `progress` and as a `progress` event. Fenced: a stale lease
    /// writes nothing.
    pub async fn record_progress(
        &self,
        job_id: &str,
        token: i64,
        progress: Value,
    ) -> Result<(), StoreError> {
        let job_id = job_id.to_string();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let row = sqlx::query(
                        "UPDATE jobs SET progress = ? WHERE id = ? AND lease_token = ? AND status = 'running' \
                         RETURNING backend_id, attempts",
                    )
                    .bind(progress.to_string())
                    .bind(&job_id)
                    .bind(token)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some(row) = row else { return Ok(()) };
                    let backend: Option<String> = row.try_get("backend_id")?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind: "progress",
                            status: Some(JobStatus::Running),
                            backend_id: backend.as_deref(),
                            attempt: Some(row.try_get("attempts")?),
                            message: None,
                            data: Some(progress),
                        },
                    )
                    .await
                })
            })
            .await
    }

    /// Appends a note to a job's log that changes nothing else (a cancel
    /// that came too late, a socket that was found deaf).
    pub async fn note_event(
        &self,
        job_id: &str,
        kind: &'static str,
        backend_id: &str,
        message: String,
        data: Option<Value>,
    ) -> Result<(), StoreError> {
        let (job_id, backend_id) = (job_id.to_string(), backend_id.to_string());
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let status: Option<JobStatus> =
                        sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
                            .bind(&job_id)
                            .fetch_optional(&mut *conn)
                            .await?;
                    append_event(
                        conn,
                        &job_id,
                        EventInput {
                            kind,
                            status,
                            backend_id: Some(&backend_id),
                            attempt: None,
                            message: Some(message),
                            data,
                        },
                    )
                    .await
                })
            })
            .await
    }
}

impl Store {
    /// Each backend whose last quarantine event put it in quarantine until
    /// a time still to come, with that time and why: what a restarted
    /// service restores (a quarantine is kept in memory, and its events
    /// are its record).
    pub async fn quarantines_in_force(
        &self,
    ) -> Result<Vec<(String, chrono::DateTime<Utc>, String)>, StoreError> {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT backend_id, kind, data FROM job_events WHERE seq IN \
             (SELECT max(seq) FROM job_events WHERE job_id IS NULL AND kind IN \
              ('backend_quarantined', 'backend_quarantine_over', 'backend_quarantine_lifted') \
              GROUP BY backend_id)",
        )
        .fetch_all(self.reader())
        .await?;
        let now = Utc::now();
        Ok(rows
            .into_iter()
            .filter(|(_, kind, _)| kind == "backend_quarantined")
            .filter_map(|(id, _, data)| {
                let data: Value = serde_json::from_str(data.as_deref()?).ok()?;
                let until = data["until"].as_str()?.parse().ok()?;
                let reason = data["reason"].as_str().unwrap_or_default().to_string();
                (until > now).then_some((id, until, reason))
            })
            .collect())
    }
}
