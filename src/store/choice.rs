//! Choosing among the queued jobs a backend may run: priority, then age,
//! then the model it has loaded, and on a shared farm the group whose turn
//! it is.
//!
//! Why apart from `lease.rs`: that is the lease's transaction and the rules
//! that bar a job from a backend; this is the preference among the jobs
//! left, which grows with each way of weighing them (the model's switch,
//! the farm's sharing) while the lease itself does not change.

use chrono::Utc;
use sqlx::{Row, SqliteConnection};

use super::lease::eligible;
use super::StoreError;

/// How a free backend chooses among jobs of the same priority.
#[derive(Debug, Clone, Copy)]
pub struct Preference {
    /// Prefer a job that needs what the backend ran last (its checkpoint).
    pub affinity: bool,
    /// But never hold back the best job longer than this since it was submitted.
    pub max_wait: chrono::Duration,
    /// The farm is shared between groups of jobs (`dispatch.share_by`):
    /// the group with the fewest jobs on the farm goes first.
    pub share: bool,
}

impl Default for Preference {
    fn default() -> Self {
        Preference {
            affinity: true,
            max_wait: chrono::Duration::minutes(5),
            share: false,
        }
    }
}

/// How far down the queue a backend that must switch models looks to weigh
/// the waiting work per model (bounds the scan on a deep queue).
const SWITCH_WINDOW: i64 = 256;

/// Keeps the model's weighing in the chosen job's group on a shared farm
/// (`?5` its group; null: not shared, no limit).
const IN_SHARE: &str = " AND (?5 IS NULL OR j.share = ?5)";

/// What [`choose`] picked: the queued job's `seq`, and its id and graph
/// when it was asked for them and had them at hand.
pub(super) struct Choice {
    pub(super) seq: i64,
    pub(super) job: Option<(String, String)>,
}

/// The job a backend should take now: the best eligible one, unless one of
/// the same priority keeps its model loaded (the one it ran last). Failing
/// that, the backend switches to the model with the most waiting work per
/// online backend already holding it (so each model settles on as few GPUs
/// as its backlog needs, instead of every GPU switching between all of
/// them). Never when the best has waited longer than the preference allows.
/// A best job that loads no model (no affinity) needs no weighing: it
/// switches nothing, so it is taken unless the loaded model's work is there.
///
/// With `with_graph`, the choice carries the job's id and graph when it is
/// the best one (a lease checks it against the backend's inventory: one
/// read less).
///
/// On a farm shared between groups (`prefer.share`), the best job is the
/// first of the group whose turn it is (`shares::group_first`), and the
/// model's weighing stays in that group.
///
/// A `busy` backend (one with a prompt in flight) fills its next slot only
/// with work for the model it has loaded, or work that loads no model:
/// taking another model early would commit it to a switch that an idle
/// backend, or the next submission, may make unnecessary. It chooses again
/// when its slot frees.
pub(super) async fn choose(
    conn: &mut SqliteConnection,
    backend_id: &str,
    last_affinity: Option<&str>,
    busy: bool,
    prefer: Preference,
    now: &str,
    with_graph: bool,
) -> Result<Option<Choice>, StoreError> {
    let graph = if with_graph { "j.graph" } else { "NULL" };
    let best = sqlx::query(&format!(
        "SELECT j.seq, j.affinity, j.priority, j.submitted_at, j.id, {graph} AS graph, j.share \
         FROM jobs j INDEXED BY jobs_queue, backends b \
         WHERE b.id = ?2 AND {} ORDER BY j.priority DESC, j.seq LIMIT 1",
        eligible()
    ))
    .bind(now)
    .bind(backend_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(mut best) = best else {
        return Ok(None);
    };
    // A shared farm: the best job of the group with the fewest jobs on it,
    // at the same priority. Below, the model's weighing stays in its group.
    let mut share = None;
    if prefer.share {
        let priority: i64 = best.try_get("priority")?;
        if let Some(first) = sqlx::query(&super::shares::group_first(graph, &eligible()))
            .bind(now)
            .bind(backend_id)
            .bind(priority)
            .fetch_optional(&mut *conn)
            .await?
        {
            share = first.try_get::<Option<String>, _>("share")?;
            best = first;
        }
    }
    let seq: i64 = best.try_get("seq")?;
    let the_best = Choice {
        seq,
        job: best
            .try_get::<Option<String>, _>("graph")?
            .map(|graph| best.try_get("id").map(|id| (id, graph)))
            .transpose()?,
    };
    let affinity: Option<String> = best.try_get("affinity")?;
    let priority: i64 = best.try_get("priority")?;
    let waited_long = best
        .try_get::<String, _>("submitted_at")
        .ok()
        .as_deref()
        .and_then(super::parse_time)
        .is_some_and(|t| Utc::now() - t > prefer.max_wait);
    if !prefer.affinity
        || waited_long
        || (last_affinity.is_some() && affinity.as_deref() == last_affinity)
    {
        return Ok(Some(the_best));
    }
    if let Some(last) = last_affinity {
        let same: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT j.seq FROM jobs j INDEXED BY jobs_queue_affinity, backends b \
             WHERE b.id = ?2 AND j.affinity = ?3 AND j.priority = ?4 AND {}{IN_SHARE} \
             ORDER BY j.priority DESC, j.seq LIMIT 1",
            eligible()
        ))
        .bind(now)
        .bind(backend_id)
        .bind(last)
        .bind(priority)
        .bind(&share)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(seq) = same {
            return Ok(Some(Choice { seq, job: None }));
        }
    }
    let Some(affinity) = affinity else {
        // A job that loads no model commits the backend to no switch: it
        // takes the slot, a busy backend's too (which would otherwise keep
        // its second slot empty while such work waits).
        return Ok(Some(the_best));
    };
    if busy && last_affinity.is_some() {
        return Ok(None);
    }
    // With no job of another model queued there is nothing to weigh: the
    // switch below would pick this very job. One to three index seeks,
    // where the weighing reads up to SWITCH_WINDOW jobs with their bars
    // (0.28 ms in the writer for every backend's first job on a large farm).
    let other: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_queue_affinity \
             WHERE status = 'queued' AND affinity < ?1) \
         OR EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_queue_affinity \
             WHERE status = 'queued' AND affinity > ?1) \
         OR EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_queue_affinity \
             WHERE status = 'queued' AND affinity IS NULL)",
    )
    .bind(&affinity)
    .fetch_one(&mut *conn)
    .await?;
    if !other {
        return Ok(Some(the_best));
    }
    // Switching: to the model with the most waiting work per backend that
    // holds it (a model no other backend holds first), oldest job first.
    let switch_to: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT min(c.seq) FROM (SELECT j.seq, j.affinity FROM jobs j INDEXED BY jobs_queue, backends b \
             WHERE b.id = ?2 AND j.priority = ?3 AND {}{IN_SHARE} ORDER BY j.priority DESC, j.seq LIMIT ?4) c \
         GROUP BY c.affinity \
         ORDER BY count(*) * 1.0 / (1 + (SELECT count(*) FROM backends o WHERE o.id != ?2 \
             AND o.configured = 1 AND o.state = 'online' AND o.last_affinity = c.affinity)) DESC, \
             min(c.seq) \
         LIMIT 1",
        eligible()
    ))
    .bind(now)
    .bind(backend_id)
    .bind(priority)
    .bind(SWITCH_WINDOW)
    .bind(&share)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(Some(match switch_to {
        Some(other) if other != seq => Choice {
            seq: other,
            job: None,
        },
        _ => the_best,
    }))
}
