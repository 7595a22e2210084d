//! The cleanup list: prompt ids given up on, to be removed from their
//! backend (queue delete, interrupt, history delete) until it confirms.
//!
//! Why durable: a prompt the orchestrator gave up on may still run on a
//! backend that comes back (or that queued a submit after we stopped
//! waiting for its answer). If it did, and nobody removed it, the job would
//! run twice. The list survives restarts, so the removal is never forgotten.

use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::{fmt_time, Store, StoreError};

/// A prompt to remove from a backend.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CleanupEntry {
    /// The prompt id.
    pub prompt_id: String,
    /// Its backend.
    pub backend_id: String,
    /// The job it belonged to.
    pub job_id: Option<String>,
    /// Why it was given up on.
    pub reason: String,
    /// The backend's word that it is gone counts only from this time on.
    pub not_before: DateTime<Utc>,
    /// Removal rounds so far.
    pub tries: i64,
}

impl CleanupEntry {
    /// A prompt to put on the list.
    pub fn new(
        prompt_id: &str,
        backend_id: &str,
        job_id: Option<&str>,
        reason: impl Into<String>,
        not_before: DateTime<Utc>,
    ) -> CleanupEntry {
        CleanupEntry {
            prompt_id: prompt_id.to_string(),
            backend_id: backend_id.to_string(),
            job_id: job_id.map(str::to_string),
            reason: reason.into(),
            not_before,
            tries: 0,
        }
    }
}

/// Puts a prompt on the list, inside the caller's transaction.
pub(super) async fn add_cleanup(
    conn: &mut SqliteConnection,
    e: &CleanupEntry,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO prompt_cleanup (prompt_id, backend_id, job_id, reason, added_at, not_before) \
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(prompt_id) DO UPDATE SET \
         not_before = max(not_before, excluded.not_before)",
    )
    .bind(&e.prompt_id)
    .bind(&e.backend_id)
    .bind(&e.job_id)
    .bind(&e.reason)
    .bind(fmt_time(Utc::now()))
    .bind(fmt_time(e.not_before))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A backend's cleanup list, oldest first.
const CLEANUP_OF_BACKEND: &str = "SELECT prompt_id, backend_id, job_id, reason, not_before, tries \
     FROM prompt_cleanup WHERE backend_id = ? ORDER BY added_at";

impl Store {
    /// Puts a prompt on the cleanup list (one that no lease transition covers).
    pub async fn add_cleanup(&self, entry: CleanupEntry) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| Box::pin(async move { add_cleanup(conn, &entry).await }))
            .await
    }

    /// Prompts to remove from this backend, oldest first.
    pub async fn cleanup_prompts(&self, backend_id: &str) -> Result<Vec<CleanupEntry>, StoreError> {
        self.all_by(CLEANUP_OF_BACKEND, backend_id).await
    }

    /// The backend confirmed these prompts are gone.
    pub async fn cleanup_done(&self, prompt_ids: Vec<String>) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    for p in &prompt_ids {
                        sqlx::query("DELETE FROM prompt_cleanup WHERE prompt_id = ?")
                            .bind(p)
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .await
    }

    /// One more removal round that the backend did not confirm (yet).
    pub async fn cleanup_tried(
        &self,
        prompt_ids: Vec<String>,
        error: String,
    ) -> Result<(), StoreError> {
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    for p in &prompt_ids {
                        sqlx::query(
                            "UPDATE prompt_cleanup SET tries = tries + 1, last_error = ? WHERE prompt_id = ?",
                        )
                        .bind(&error)
                        .bind(p)
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .await
    }
}
