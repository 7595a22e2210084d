//! Bulk fills for the benchmarks (the `bench-support` feature): histories of
//! a million jobs in seconds, which the submit path would take minutes for.
//!
//! Why behind a feature: these write rows no service path would (jobs with
//! made-up leases), so they are not part of the store's API.

use serde_json::Value;

use super::{fmt_time, parse_time, Store, StoreError};

impl Store {
    /// Fills the database with `n` generated jobs in one statement per table,
    /// for benchmarks of large histories (never used by the service). Jobs
    /// rotate over `statuses` and `workflows`; each has metadata `shot` =
    /// `sh{i % 1000}`. Jobs in `assigned` or `running` are leased to
    /// `backends` in turn, each with a lease row.
    #[doc(hidden)]
    pub async fn bench_fill(
        &self,
        n: i64,
        statuses: Vec<String>,
        workflows: Vec<String>,
        backends: Vec<String>,
        graph: Value,
    ) -> Result<(), StoreError> {
        let clock = self.clock.clone();
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    let start: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM jobs")
                        .fetch_one(&mut *conn)
                        .await?;
                    let t0 = clock.next();
                    let statuses = serde_json::to_string(&statuses)?;
                    let workflows = serde_json::to_string(&workflows)?;
                    let backends = serde_json::to_string(&backends)?;
                    sqlx::query(
                        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) \
                         INSERT INTO jobs (seq, id, workflow_id, status, priority, requires, max_attempts, attempts, \
                           manifest_hash, manifest, parameters, metadata, graph, backend_id, prompt_id, lease_token, \
                           submitted_at, updated_at) \
                         SELECT ?2 + x, 'bench-' || (?2 + x), \
                           json_extract(?4, '$[' || (x % json_array_length(?4)) || ']'), \
                           json_extract(?3, '$[' || (x % json_array_length(?3)) || ']'), \
                           0, '[]', 3, 0, 'h', '{}', '{}', json_object('shot', 'sh' || (x % 1000)), ?6, \
                           NULL, NULL, NULL, \
                           strftime('%Y-%m-%dT%H:%M:%f', ?7, '+' || (x / 1000.0) || ' seconds') || 'Z', ?7 \
                         FROM c",
                    )
                    .bind(n)
                    .bind(start)
                    .bind(&statuses)
                    .bind(&workflows)
                    .bind(&backends)
                    .bind(graph.to_string())
                    .bind(fmt_time(t0))
                    .execute(&mut *conn)
                    .await?;
                    // The jobs_submitted trigger wrote their metadata rows and first events.
                    // Held jobs: a backend, a prompt id, a fencing token and a lease each.
                    sqlx::query(
                        "UPDATE jobs SET backend_id = json_extract(?1, '$[' || (seq % json_array_length(?1)) || ']'), \
                         prompt_id = 'bench-prompt-' || seq, lease_token = seq, attempts = 1 \
                         WHERE seq > ?2 AND status IN ('assigned', 'running')",
                    )
                    .bind(&backends)
                    .bind(start)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query(
                        "INSERT INTO leases (prompt_id, job_id, attempt, backend_id, lease_token, leased_at, submitted_at) \
                         SELECT prompt_id, id, 1, backend_id, lease_token, submitted_at, submitted_at FROM jobs \
                         WHERE seq > ? AND status IN ('assigned', 'running')",
                    )
                    .bind(start)
                    .execute(&mut *conn)
                    .await?;
                    sqlx::query("UPDATE counters SET value = (SELECT max(seq) FROM jobs) WHERE name = 'lease_token'")
                        .execute(&mut *conn)
                        .await?;
                    // Triggers kept job_counts; the clock moves past the generated times.
                    let last: String = sqlx::query_scalar("SELECT max(submitted_at) FROM jobs")
                        .fetch_one(&mut *conn)
                        .await?;
                    if let Some(t) = parse_time(&last) {
                        clock.advance_to(t);
                    }
                    Ok(())
                })
            })
            .await
    }

    /// Leases made by `bench_fill` still open (benchmarks: reconciliation).
    #[doc(hidden)]
    pub async fn open_bench_leases(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM leases WHERE outcome IS NULL AND prompt_id LIKE 'bench-prompt-%'",
        )
        .fetch_one(self.reader())
        .await?)
    }
}
