//! Sharing the farm between groups of jobs (`dispatch.share_by`).
//!
//! Why: leasing goes by priority, then age, so a second artist's batch of
//! the same priority waits behind the whole of the first one: a night of
//! 300 shots submitted at six keeps the 40 submitted at seven off the farm
//! until morning. Render farms call the answer a balanced order: among the
//! jobs of the highest priority, a free box takes the next job of the group
//! with the fewest jobs on the farm (ties to the group served longest ago,
//! then to the oldest job), so two batches each get half the boxes, a third
//! arriving takes its third at the next free slots, a group alone takes
//! all of them, and a farm of one box alternates between them. Priority
//! still comes first; within a group, age and the model's weighing as
//! before.
//!
//! A job's group is a column (`share`, V15), written at submission from
//! its metadata and indexed among queued jobs, so a lease finds the groups
//! with queued work by index seeks (one per group, of which a farm has a
//! handful), never by reading the queue. The field is the config's: when it
//! changes, the groups are written again at start.

use serde_json::{Map, Value};
use sqlx::Row;

use super::{Store, StoreError};

/// A job's group under `field`: the field's value as its metadata row
/// holds it (text as it is, anything else as JSON), `""` for a job without
/// the field; `None` when the farm is not shared.
pub fn share_of(metadata: &Map<String, Value>, field: Option<&str>) -> Option<String> {
    let field = field?;
    Some(match metadata.get(field) {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    })
}

/// The same in SQL for a stored job (`?1` the field), as the metadata
/// trigger writes a value: what [`share_of`] gave it at submission.
const SHARE_IN_SQL: &str = "coalesce((SELECT CASE type WHEN 'text' THEN value \
     WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' WHEN 'null' THEN 'null' \
     ELSE json_quote(value) END FROM json_each(jobs.metadata) WHERE key = ?1), '')";

/// The first job a backend should take on a shared farm (`?1` now, `?2`
/// the backend, `?3` the highest priority it may take): each group with
/// queued jobs (found by skipping through the index from one to the next)
/// offers its best job at that priority that `eligible` lets the backend
/// take; the group with the fewest jobs assigned or running wins, then the
/// one served longest ago (`share_turns`), then the oldest job. Its
/// columns are those of the plain choice, and `share`.
pub(super) fn group_first(graph: &str, eligible: &str) -> String {
    format!(
        "WITH RECURSIVE g(s) AS ( \
           SELECT (SELECT min(share) FROM jobs INDEXED BY jobs_queue_share \
                   WHERE status = 'queued' AND share IS NOT NULL) \
           UNION ALL \
           SELECT (SELECT min(share) FROM jobs INDEXED BY jobs_queue_share \
                   WHERE status = 'queued' AND share IS NOT NULL AND share > g.s) \
           FROM g WHERE g.s IS NOT NULL), \
         c(s, seq) AS MATERIALIZED ( \
           SELECT g.s, (SELECT j.seq FROM jobs j INDEXED BY jobs_queue_share, backends b \
                        WHERE b.id = ?2 AND j.share = g.s AND j.priority = ?3 AND {eligible} \
                        ORDER BY j.seq LIMIT 1) \
           FROM g WHERE g.s IS NOT NULL) \
         SELECT j.seq, j.affinity, j.priority, j.submitted_at, j.id, {graph} AS graph, j.share \
         FROM c JOIN jobs j ON j.seq = c.seq \
         ORDER BY (SELECT count(*) FROM jobs a \
                   WHERE a.status IN ('assigned', 'running') AND a.share = c.s), \
                  coalesce((SELECT t.last_token FROM share_turns t WHERE t.share = c.s), 0), \
                  c.seq \
         LIMIT 1"
    )
}

/// The field the farm was last shared by (`settings`), if it was.
async fn shared_by(conn: &mut sqlx::SqliteConnection) -> Result<Option<String>, StoreError> {
    let field: Option<Option<String>> =
        sqlx::query_scalar("SELECT value FROM settings WHERE name = 'share_by'")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(field.flatten())
}

/// How a shared farm stands for one job's group, for the sentence that
/// says why the job waits.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct GroupStanding {
    /// The metadata field the farm is shared by.
    pub field: String,
    /// The job's group (`""`: jobs without the field).
    pub group: String,
    /// Its jobs assigned or running.
    pub on_farm: i64,
    /// Other groups with jobs on the farm or queued (not paused: a paused
    /// batch takes no turn).
    pub others: i64,
}

impl std::fmt::Display for GroupStanding {
    /// The clause a queued job's `waiting_for` ends with.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the farm is shared by `{}`: its group ", self.field)?;
        if self.group.is_empty() {
            write!(f, "(jobs without `{}`)", self.field)?;
        } else {
            write!(f, "`{}`", self.group)?;
        }
        write!(
            f,
            " has {} job{} on the farm",
            self.on_farm,
            if self.on_farm == 1 { "" } else { "s" }
        )?;
        match self.others {
            0 => write!(f, " and no other group has work"),
            1 => write!(f, ", beside 1 other group"),
            n => write!(f, ", beside {n} other groups"),
        }
    }
}

/// Where a queued job's group stands, on a shared farm.
pub(super) async fn standing(
    conn: &mut sqlx::SqliteConnection,
    job_id: &str,
) -> Result<Option<GroupStanding>, StoreError> {
    let row = sqlx::query(
        "SELECT s.value AS field, j.share AS grp, \
         (SELECT count(*) FROM jobs a WHERE a.status IN ('assigned', 'running') \
          AND a.share = j.share) AS on_farm, \
         (SELECT count(DISTINCT o.share) FROM jobs o \
          WHERE (o.status IN ('assigned', 'running') OR (o.status = 'queued' AND o.paused_at IS NULL)) \
          AND o.share IS NOT NULL AND o.share <> j.share) AS others \
         FROM jobs j, settings s WHERE j.id = ? AND s.name = 'share_by' AND j.share IS NOT NULL",
    )
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        Ok(GroupStanding {
            field: r.try_get("field")?,
            group: r.try_get("grp")?,
            on_farm: r.try_get("on_farm")?,
            others: r.try_get("others")?,
        })
    })
    .transpose()
}

/// One group of a shared farm, as it stands now.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareGroup {
    /// The field's value (`""`: the jobs without the field).
    pub group: String,
    /// Its jobs assigned or running.
    pub on_farm: i64,
    /// Its jobs queued (paused ones included).
    pub queued: i64,
}

/// How a shared farm stands: the field, and each group with work.
#[derive(Debug, Clone, PartialEq)]
pub struct FarmShares {
    /// The metadata field the farm is shared by.
    pub field: String,
    /// The groups with jobs queued or on the farm, by name (at most
    /// 100).
    pub groups: Vec<ShareGroup>,
}

/// The most groups [`Store::farm_shares`] lists: a farm shared by a field
/// that names every shot would otherwise list the whole queue.
const MAX_GROUPS_SHOWN: i64 = 100;

impl Store {
    /// How the farm is shared now, or `None` when it is not: each group's
    /// jobs on the farm and queued, counted through the two indexes of
    /// shared jobs (the queue's entries are read, not its rows).
    pub async fn farm_shares(&self) -> Result<Option<FarmShares>, StoreError> {
        let mut tx = self.reader().begin().await?;
        let Some(field) = shared_by(&mut tx).await? else {
            return Ok(None);
        };
        let groups = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT share, sum(held), sum(queued) FROM ( \
               SELECT share, 0 AS held, count(*) AS queued FROM jobs INDEXED BY jobs_queue_share \
               WHERE status = 'queued' AND share IS NOT NULL GROUP BY share \
               UNION ALL \
               SELECT share, count(*), 0 FROM jobs INDEXED BY jobs_active_share \
               WHERE status IN ('assigned', 'running') AND share IS NOT NULL GROUP BY share) \
             GROUP BY share ORDER BY share LIMIT ?",
        )
        .bind(MAX_GROUPS_SHOWN)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(group, on_farm, queued)| ShareGroup {
            group,
            on_farm,
            queued,
        })
        .collect();
        Ok(Some(FarmShares { field, groups }))
    }

    /// Shares the farm by the metadata field `field` from now on (`None`:
    /// not shared), as the config says at start. When the field differs
    /// from the last start's, every job that may still run (any not
    /// completed: a failed or cancelled one may be retried) is put in its
    /// group again; returns how many were. A start like the last writes
    /// nothing.
    pub async fn share_farm_by(&self, field: Option<&str>) -> Result<u64, StoreError> {
        let field = field.map(str::to_string);
        self.writer()
            .write(move |conn| {
                Box::pin(async move {
                    if shared_by(conn).await? == field {
                        return Ok(0);
                    }
                    let regrouped = sqlx::query(&format!(
                        "UPDATE jobs SET share = CASE WHEN ?1 IS NULL THEN NULL ELSE {SHARE_IN_SQL} END \
                         WHERE status <> 'completed'"
                    ))
                    .bind(&field)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    sqlx::query(
                        "INSERT INTO settings (name, value) VALUES ('share_by', ?1) \
                         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    )
                    .bind(&field)
                    .execute(&mut *conn)
                    .await?;
                    Ok(regrouped)
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_jobs_group_is_its_fields_value_as_its_metadata_row_holds_it() {
        let meta = |v: Value| v.as_object().unwrap().clone();
        let m = meta(json!({"batch": "night1", "take": 3, "hero": true, "none": null}));
        assert_eq!(share_of(&m, None), None);
        assert_eq!(share_of(&m, Some("batch")).as_deref(), Some("night1"));
        assert_eq!(share_of(&m, Some("take")).as_deref(), Some("3"));
        assert_eq!(share_of(&m, Some("hero")).as_deref(), Some("true"));
        assert_eq!(share_of(&m, Some("none")).as_deref(), Some("null"));
        assert_eq!(share_of(&m, Some("artist")).as_deref(), Some(""));
    }
}
