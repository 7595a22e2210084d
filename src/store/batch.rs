//! Statements sent to SQLite together, in one round trip.
//!
//! Why: sqlx runs each SQLite connection on a thread of its own, so every
//! statement is a hand-off to that thread and back (two context switches),
//! and while the writer waits for one, every other write of the farm waits
//! for the writer. The end of a job is four to six statements (its outputs,
//! its lease, its row, its event, its webhook); once the fence has read the
//! job, nothing in between needs an answer, so they go as one text. Each
//! statement keeps its own meaning: a batch runs inside the writer's
//! transaction (and the operation's savepoint), so one that fails undoes the
//! rest with it.
//!
//! The values are bound in the order the statements' `?` appear (sqlx binds
//! the anonymous parameters of a text's statements one after another), so a
//! statement written here uses `?` only, never `?NNN`.

use sqlx::{Arguments, Encode, Sqlite, SqliteConnection, Type};

use super::StoreError;

/// Statements and their values, to be run in one round trip.
#[derive(Default)]
pub(super) struct Batch<'a> {
    sql: String,
    args: sqlx::sqlite::SqliteArguments<'a>,
    /// The first value that could not be encoded, reported by [`Batch::run`].
    bad_value: Option<String>,
}

impl<'a> Batch<'a> {
    /// Appends a statement; its values follow with [`Batch::bind`], in the
    /// order of its `?`.
    pub(super) fn push(&mut self, statement: &str) -> &mut Self {
        debug_assert!(
            !statement.contains("?1"),
            "numbered parameters would count from the batch's first value"
        );
        if !self.sql.is_empty() {
            self.sql.push_str(";\n");
        }
        self.sql.push_str(statement);
        self
    }

    /// The next `?`'s value.
    pub(super) fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: Encode<'a, Sqlite> + Type<Sqlite> + Send + 'a,
    {
        if let Err(e) = self.args.add(value) {
            self.bad_value.get_or_insert(e.to_string());
        }
        self
    }

    /// Runs every statement, in order, in one round trip.
    pub(super) async fn run(self, conn: &mut SqliteConnection) -> Result<(), StoreError> {
        if let Some(e) = self.bad_value {
            return Err(sqlx::Error::Encode(e.into()).into());
        }
        if self.sql.is_empty() {
            return Ok(());
        }
        sqlx::query_with(&self.sql, self.args).execute(conn).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[tokio::test]
    async fn every_statement_runs_with_its_own_values_in_order() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let mut b = Batch::default();
        b.push("CREATE TABLE t (k TEXT, v INTEGER)");
        b.push("INSERT INTO t VALUES (?, ?)").bind("a").bind(1_i64);
        b.push("INSERT INTO t VALUES (?, ?), (?, ?)")
            .bind("b")
            .bind(2_i64)
            .bind("c")
            .bind(3_i64);
        b.push("UPDATE t SET v = v * ? WHERE k = ?")
            .bind(10_i64)
            .bind("b");
        b.run(&mut conn).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT k, v FROM t ORDER BY k")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let expected = [("a", 1), ("b", 20), ("c", 3)].map(|(k, v)| (k.to_string(), v));
        assert_eq!(rows, expected);
    }

    #[tokio::test]
    async fn a_failing_statement_is_an_error_and_an_empty_batch_is_nothing() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        Batch::default().run(&mut conn).await.unwrap();
        let mut b = Batch::default();
        b.push("CREATE TABLE t (k TEXT NOT NULL)");
        b.push("INSERT INTO t VALUES (?)").bind(None::<String>);
        assert!(b.run(&mut conn).await.is_err(), "NOT NULL refused");
    }
}
