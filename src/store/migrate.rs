//! Schema migrations with refinery, run over the writer's sqlx connection.
//!
//! Why an adapter: refinery has no sqlx driver, and a second SQLite library
//! (rusqlite) cannot be linked beside sqlx's. Its async traits need only
//! "execute these statements in a transaction" and "read applied migrations".

use async_trait::async_trait;
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use refinery_core::Migration;
use sqlx::{Connection, Row, SqliteConnection};

refinery::embed_migrations!("migrations");

struct SqlxMigrator<'a>(&'a mut SqliteConnection);

#[async_trait]
impl AsyncTransaction for SqlxMigrator<'_> {
    type Error = sqlx::Error;

    async fn execute(&mut self, queries: &[&str]) -> Result<usize, Self::Error> {
        let queries: Vec<String> = queries.iter().map(|q| q.to_string()).collect();
        execute_all(self.0, queries).await
    }
}

#[async_trait]
impl AsyncQuery<Vec<Migration>> for SqlxMigrator<'_> {
    async fn query(&mut self, query: &str) -> Result<Vec<Migration>, Self::Error> {
        let rows = sqlx::query(query).fetch_all(&mut *self.0).await?;
        rows.iter()
            .map(|row| {
                let version: i64 = row.try_get(0)?;
                let name: String = row.try_get(1)?;
                let applied_on: String = row.try_get(2)?;
                let checksum: String = row.try_get(3)?;
                let applied_on = time::OffsetDateTime::parse(
                    &applied_on,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                let checksum = checksum
                    .parse::<u64>()
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok(Migration::applied(
                    version as i32,
                    name,
                    applied_on,
                    checksum,
                ))
            })
            .collect()
    }
}

impl AsyncMigrate for SqlxMigrator<'_> {}

/// Runs statements in one transaction (outside the trait so the future's
/// lifetimes are plain).
fn execute_all(
    conn: &mut SqliteConnection,
    queries: Vec<String>,
) -> futures::future::BoxFuture<'_, Result<usize, sqlx::Error>> {
    Box::pin(async move {
        let mut tx = conn.begin().await?;
        for query in &queries {
            sqlx::query(query.as_str()).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(queries.len())
    })
}

/// Applies every migration under `migrations/` not yet applied.
pub async fn run(conn: &mut SqliteConnection) -> anyhow::Result<()> {
    let report = migrations::runner()
        .run_async(&mut SqlxMigrator(conn))
        .await
        .map_err(|e| anyhow::anyhow!("database migration failed: {e}"))?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied database migration");
    }
    Ok(())
}
