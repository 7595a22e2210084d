//! The column lists every query of a record shares, and the helper that
//! binds a list into `IN (...)`.
//!
//! Why one place: each record is read by several queries (a job by id, a
//! page of history); one column list per record keeps them in step with
//! the record's `FromRow`.

use sqlx::{QueryBuilder, Sqlite};

/// Appends ` AND {column} IN (?, ?, ...)` for a non-empty list.
pub(super) fn push_in<'a, T>(q: &mut QueryBuilder<'a, Sqlite>, column: &str, values: &'a [T])
where
    T: sqlx::Encode<'a, Sqlite> + sqlx::Type<Sqlite> + Send + Sync + 'a,
{
    if values.is_empty() {
        return;
    }
    q.push(format!(" AND {column} IN ("));
    let mut sep = q.separated(", ");
    for v in values {
        sep.push_bind(v);
    }
    q.push(")");
}

/// Columns of a [`super::JobRecord`] without its manifest and graph (lists).
pub(super) const JOB_COLUMNS: &[&str] = &[
    "seq",
    "id",
    "workflow_id",
    "status",
    "priority",
    "requires",
    "max_attempts",
    "attempts",
    "idempotency_key",
    "parameters",
    "metadata",
    "backend_id",
    "prompt_id",
    "progress",
    "error",
    "callback_url",
    "timeout_s",
    "submitted_at",
    "updated_at",
    "started_at",
    "finished_at",
    "not_before",
    "parents",
    "paused_at",
];

/// `JOB_COLUMNS` of table alias `alias`, then the manifest and graph, or
/// NULLs in their place for lists.
pub(super) fn job_columns(alias: &str, whole: bool) -> String {
    let mut cols: Vec<String> = JOB_COLUMNS.iter().map(|c| format!("{alias}.{c}")).collect();
    if whole {
        cols.push(format!("{alias}.manifest, {alias}.graph"));
    } else {
        cols.push("NULL AS manifest, NULL AS graph".into());
        // A list shows a picture of each finished job: its first output
        // that has thumbnails.
        let pictures = crate::thumbs::PICTURES
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        cols.push(format!(
            "(SELECT o.name FROM outputs o WHERE o.job_id = {alias}.id AND o.content_type IN ({pictures}) \
             AND o.pruned_at IS NULL ORDER BY o.name LIMIT 1) AS preview"
        ));
    }
    cols.join(", ")
}

/// Columns of a [`super::JobEvent`].
pub(super) const EVENT_COLUMNS: &str =
    "seq, job_id, workflow_id, at, kind, status, backend_id, attempt, message, data";
