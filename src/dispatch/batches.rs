//! A batch broken in itself is paused, not failed job by job all night.
//!
//! Why: a batch with a wrong setting (a node that raises on every shot, a
//! step count that runs past the time limit) fails each of its jobs, every
//! attempt, and in priority-then-age order the batches behind it wait the
//! whole night for it. Once `dispatch.pause_batch_after` of its jobs in a
//! row failed an attempt with the same cause (`store::failure_cause`, the
//! one the morning's count groups by), on more than one backend when the
//! farm has more that take jobs (one sick box is the quarantine's business;
//! but a farm down to one box, its others disabled, off, outside their
//! hours or in quarantine, has nobody to tell the batch from the box, and
//! failing the whole batch on it would be the worse guess), with none of
//! the batch completed between them, its jobs that have not started are
//! paused (and one that was on a backend then, once it fails alike): the
//! rest of the farm's night goes on, and one command resumes the batch
//! once it is mended.
//!
//! A broken batch is also held (`store::HeldBatch`): each job submitted
//! for it after is stored paused, so a tool that feeds its shots one at a
//! time (none queued to pause when the batch breaks) does not run and
//! fail them all night; the hold outlives a restart, `GET /api/health`
//! warns of it, and it ends when the batch's last paused job is resumed
//! or cancelled, or with `Farm::resume_batch`.
//!
//! What counts is kept in memory, per batch: a restart forgets it (it
//! costs at most that many failures more), and a batch with nothing in a
//! row costs a completion nothing (no read). A submission asks the list of
//! held batches kept here (no read unless its batch may be held); the
//! store decides in the insert's transaction.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};

use serde_json::Value;

use crate::store::{HeldBatch, Store, StoreError};

/// Failures in a row of each batch that has some.
pub(super) struct BadBatches {
    /// Jobs in a row that trip it (0: off).
    after: usize,
    /// The metadata field naming a job's batch.
    field: String,
    /// Whether the farm has more than one backend: then the failures must
    /// be on more than one, while another takes jobs.
    many_backends: bool,
    runs: Mutex<HashMap<String, Run>>,
    /// The batches that may be held (the store has the truth: one let go
    /// by its last paused job's resume stays here until the next
    /// [`BadBatches::holds`]). Read by every submission.
    held: RwLock<HashSet<String>>,
    /// Taken while the store's holds and `held` are brought in step.
    holding: tokio::sync::Mutex<()>,
}

/// One batch's failures in a row, all of one cause.
struct Run {
    cause: String,
    jobs: HashSet<String>,
    backends: HashSet<String>,
    last_message: String,
}

/// What a counted failure came to.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Not broken (yet).
    Fine,
    /// Broken.
    Broken(Broken),
    /// Enough jobs in a row, all failed on one backend of a farm that has
    /// more: broken if no other takes jobs now ([`BadBatches::trip`]).
    OnOneBox { batch: String, backend: String },
    /// A job of a batch the farm holds paused failed alike: it was on a
    /// backend when the batch was paused, and goes back paused as the rest
    /// ([`BadBatches::hold`]).
    Held { batch: String, why: String },
}

/// What resuming a batch did (`Farm::resume_batch`).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BatchResumed {
    /// The metadata field naming a batch (`dispatch.batch_field`).
    pub field: String,
    /// The batch.
    pub batch: String,
    /// Whether the farm held it (its new jobs were stored paused); it no
    /// longer does.
    pub released: bool,
    /// The jobs resumed: each runs in its turn.
    pub resumed: Vec<String>,
}

/// A batch found broken.
#[derive(Debug)]
pub(super) struct Broken {
    pub batch: String,
    pub cause: String,
    pub jobs: usize,
    pub backends: Vec<String>,
    pub last_message: String,
}

impl BadBatches {
    pub(super) fn new(after: u32, field: &str, backends: usize) -> Self {
        BadBatches {
            after: after as usize,
            field: field.to_string(),
            many_backends: backends > 1,
            runs: Mutex::new(HashMap::new()),
            held: RwLock::new(HashSet::new()),
            holding: tokio::sync::Mutex::new(()),
        }
    }

    /// The batch of a submission's `metadata` (field, value) if it may be
    /// held: the store then decides as it writes the job.
    pub(super) fn may_hold(
        &self,
        metadata: &serde_json::Map<String, Value>,
    ) -> Option<(String, String)> {
        let held = self.held.read().expect("held batches");
        if held.is_empty() {
            return None;
        }
        let batch = crate::store::metadata_value(metadata, &self.field)?;
        held.contains(&batch).then(|| (self.field.clone(), batch))
    }

    /// The batches held now (the store's, of this farm's batch field),
    /// oldest first; the list kept for submissions brought in step.
    pub(super) async fn holds(&self, store: &Store) -> Result<Vec<HeldBatch>, StoreError> {
        let _step = self.holding.lock().await;
        let holds: Vec<HeldBatch> = store
            .held_batches()
            .await?
            .into_iter()
            .filter(|h| h.field == self.field)
            .collect();
        *self.held.write().expect("held batches") = holds.iter().map(|h| h.batch.clone()).collect();
        Ok(holds)
    }

    /// Lets a batch go: its jobs submitted from now are not held. Whether
    /// it was held.
    pub(super) async fn release(&self, store: &Store, batch: &str) -> Result<bool, StoreError> {
        let _step = self.holding.lock().await;
        let was = store.release_batch(&self.field, batch).await?;
        self.held.write().expect("held batches").remove(batch);
        Ok(was)
    }

    /// The metadata field naming a batch.
    pub(super) fn field(&self) -> &str {
        &self.field
    }

    /// Whether a hold stored before this start is one this config keeps:
    /// batches are held (`dispatch.pause_batch_after` is not 0) and named
    /// by the hold's field (`dispatch.batch_field`).
    pub(super) fn reads(&self, hold: &HeldBatch) -> bool {
        self.after > 0 && hold.field == self.field
    }

    /// Why a hold [`BadBatches::reads`] refuses is not kept, in words.
    pub(super) fn why_not_read(&self) -> String {
        if self.after == 0 {
            "dispatch.pause_batch_after is 0: the farm holds no batch".to_string()
        } else {
            format!(
                "batches are named by `{}` now (dispatch.batch_field)",
                self.field
            )
        }
    }

    /// Whether a failed attempt's `error` is one it counts (it is on, and
    /// the error says something against the job): only those are given to
    /// [`BadBatches::failed`].
    pub(super) fn counts(&self, error: &Value) -> bool {
        self.after > 0 && crate::store::against_the_job(error)
    }

    /// An attempt of `job_id` failed on `backend_id` with `error`, one it
    /// [`BadBatches::counts`]: the batch it broke, if this was the failure
    /// too many.
    pub(super) async fn failed(
        &self,
        store: &Store,
        job_id: &str,
        backend_id: &str,
        error: &Value,
    ) -> Result<Verdict, StoreError> {
        let Some(batch) = store.job_metadata(job_id, &self.field).await? else {
            return Ok(Verdict::Fine);
        };
        let cause = crate::store::failure_cause(error);
        // Held for this cause: it goes back paused. Let go, it counts anew.
        let may = self.held.read().expect("held batches").contains(&batch);
        if may {
            if let Some(hold) = store.held_batch(&self.field, &batch).await? {
                if hold.cause == cause {
                    return Ok(Verdict::Held {
                        batch,
                        why: hold.why,
                    });
                }
            }
        }
        let message = error["message"].as_str().unwrap_or_default().to_string();
        Ok(self.count(batch, cause, job_id, backend_id, message))
    }

    fn count(
        &self,
        batch: String,
        cause: String,
        job_id: &str,
        backend_id: &str,
        message: String,
    ) -> Verdict {
        let mut runs = self.runs.lock().expect("bad batches");
        let run = runs.entry(batch.clone()).or_insert_with(|| Run {
            cause: cause.clone(),
            jobs: HashSet::new(),
            backends: HashSet::new(),
            last_message: String::new(),
        });
        if run.cause != cause {
            // Another cause: a new run, this failure its first.
            run.cause = cause;
            run.jobs.clear();
            run.backends.clear();
        }
        run.jobs.insert(job_id.to_string());
        run.backends.insert(backend_id.to_string());
        run.last_message = message;
        if run.jobs.len() < self.after {
            return Verdict::Fine;
        }
        if self.many_backends && run.backends.len() < 2 {
            return Verdict::OnOneBox {
                batch,
                backend: backend_id.to_string(),
            };
        }
        Self::broken(&mut runs, batch).map_or(Verdict::Fine, Verdict::Broken)
    }

    /// A batch whose failures in a row were all on `backend`, which is now
    /// the only backend taking jobs: broken, unless its run has changed
    /// meanwhile (a completion, another cause, another box).
    pub(super) fn trip(&self, batch: String, backend: &str) -> Option<Broken> {
        let mut runs = self.runs.lock().expect("bad batches");
        let run = runs.get(&batch)?;
        if run.jobs.len() < self.after || run.backends.len() != 1 || !run.backends.contains(backend)
        {
            return None;
        }
        Self::broken(&mut runs, batch)
    }

    fn broken(runs: &mut HashMap<String, Run>, batch: String) -> Option<Broken> {
        let run = runs.remove(&batch)?;
        let mut backends: Vec<String> = run.backends.into_iter().collect();
        backends.sort();
        Some(Broken {
            batch,
            cause: run.cause,
            jobs: run.jobs.len(),
            backends,
            last_message: run.last_message,
        })
    }

    /// A job completed: its batch's run, if it had one, is over.
    pub(super) async fn completed(&self, store: &Store, job_id: &str) -> Result<(), StoreError> {
        if self.runs.lock().expect("bad batches").is_empty() {
            return Ok(());
        }
        if let Some(batch) = store.job_metadata(job_id, &self.field).await? {
            self.runs.lock().expect("bad batches").remove(&batch);
        }
        Ok(())
    }

    /// Holds a broken batch and pauses its jobs that have not started; how
    /// many. With none to pause (a tool that submits its shots one at a
    /// time, each run before the next comes), it says so in the log of
    /// events (`batch_broken`, which the alerts tell): the hold pauses its
    /// next jobs as they come, and nothing else would tell anyone before
    /// the morning.
    pub(super) async fn pause(&self, store: &Store, broken: &Broken) -> Result<usize, StoreError> {
        let (field, batch) = (&self.field, &broken.batch);
        let what = format!(
            "{jobs} of its jobs in a row failed with the same cause, {cause}, on {on} (the last: {last}); \
             resume the batch once it is mended: orchestrator resume --batch {batch}, or \
             orchestrator jobs --ids --paused -m {field}={batch} | orchestrator resume -",
            jobs = broken.jobs,
            cause = broken.cause,
            on = broken.backends.join(", "),
            last = broken.last_message,
        );
        let why = format!("paused with its batch ({field} {batch}): {what}");
        let at = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
        let hold = HeldBatch {
            field: field.clone(),
            batch: batch.clone(),
            cause: broken.cause.clone(),
            why,
            banner: format!(
                "{field} {batch} was paused by the farm at {at}, and its jobs submitted \
                 since are held paused: {what}"
            ),
            held_at: chrono::Utc::now(),
        };
        let n = {
            let _step = self.holding.lock().await;
            let n = store.hold_batch(hold).await?.len();
            self.held
                .write()
                .expect("held batches")
                .insert(batch.clone());
            n
        };
        if n == 0 {
            let message = format!(
                "{field} {batch}: {what}; none of its jobs was queued to pause: each job \
                 submitted for it from now is stored paused until it is resumed"
            );
            let data = serde_json::json!({
                "batch": batch,
                "cause": broken.cause,
                "jobs": broken.jobs,
                "backends": broken.backends,
                "by": "farm",
            });
            if let Err(e) = store.farm_event("batch_broken", message, data).await {
                tracing::warn!(batch = %batch, error = %e, "cannot record that the batch is broken");
            }
        }
        Ok(n)
    }

    /// Pauses what of a held batch went back to the queue since it was
    /// paused (a job that was on a backend then, its retry); how many.
    pub(super) async fn hold(
        &self,
        store: &Store,
        batch: &str,
        why: String,
    ) -> Result<usize, StoreError> {
        Ok(store.pause_batch(&self.field, batch, why).await?.len())
    }

    /// What `GET /api/health` warns of: each batch held (none held costs
    /// no read).
    pub(super) async fn still_held(&self, store: &Store) -> Result<Vec<HeldBatch>, StoreError> {
        if self.held.read().expect("held batches").is_empty() {
            return Ok(Vec::new());
        }
        self.holds(store).await
    }
}

/// What the farm says and does of the batches it holds.
impl super::Farm {
    /// The batches the farm holds for failing job after job alike, oldest
    /// first (`GET /api/health`).
    pub async fn held_batches(
        &self,
    ) -> Result<Vec<crate::store::HeldBatch>, crate::store::StoreError> {
        self.shared.batches.still_held(&self.shared.store).await
    }

    /// The hold on the batch that history filters name (`metadata.KEY=VALUE`
    /// pairs, one of them the batch field), if the farm holds it; no read
    /// when they name none.
    pub async fn held_batch_named(
        &self,
        metadata: &[(String, String)],
    ) -> Result<Option<crate::store::HeldBatch>, StoreError> {
        let field = self.shared.batches.field();
        match metadata.iter().find(|(k, _)| k == field) {
            Some((_, batch)) => self.shared.store.held_batch(field, batch).await,
            None => Ok(None),
        }
    }

    /// The batch of a submission's `metadata` (field, value) if the farm
    /// may hold it: the store then stores the job paused if the hold
    /// still stands as it writes it. No read.
    pub fn held_batch_of(
        &self,
        metadata: &serde_json::Map<String, Value>,
    ) -> Option<(String, String)> {
        self.shared.batches.may_hold(metadata)
    }

    /// Lets a batch go (`POST /api/batch/{batch}/resume`): its hold ends,
    /// if it had one, and each of its paused jobs is resumed, in that
    /// order (a job submitted in between is not held, rather than held
    /// and missed).
    pub async fn resume_batch(&self, batch: &str) -> Result<BatchResumed, StoreError> {
        let store = &self.shared.store;
        let batches = &self.shared.batches;
        let released = batches.release(store, batch).await?;
        let mut resumed = Vec::new();
        for job_id in store.paused_in_batch(batches.field(), batch).await? {
            match self.set_paused(&job_id, false, false).await {
                Ok(change) if change.was_paused => resumed.push(job_id),
                Ok(_) => {}
                // Gone since (retention), or cancelled: nothing to resume.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(%batch, released, resumed = resumed.len(), "batch resumed by a user");
        Ok(BatchResumed {
            field: batches.field().to_string(),
            batch: batch.to_string(),
            released,
            resumed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &BadBatches, batch: &str, cause: &str, job: &str, on: &str) -> Option<Broken> {
        match b.count(batch.into(), cause.into(), job, on, format!("{job} failed")) {
            Verdict::Broken(broken) => Some(broken),
            _ => None,
        }
    }

    #[test]
    fn a_batch_is_broken_by_jobs_in_a_row_failing_alike_on_more_than_one_box() {
        let b = BadBatches::new(3, "batch", 2);
        assert!(fail(&b, "n1", "IndexError in ImageToMask", "j1", "a").is_none());
        // The same job again is not another job.
        assert!(fail(&b, "n1", "IndexError in ImageToMask", "j1", "a").is_none());
        assert!(fail(&b, "n1", "IndexError in ImageToMask", "j2", "a").is_none());
        // Three jobs, but all on one box: the quarantine's business, while
        // another box takes jobs.
        let verdict = b.count(
            "n1".into(),
            "IndexError in ImageToMask".into(),
            "j3",
            "a",
            "".into(),
        );
        assert!(matches!(verdict, Verdict::OnOneBox { .. }), "{verdict:?}");
        let broken = fail(&b, "n1", "IndexError in ImageToMask", "j4", "b").unwrap();
        assert_eq!((broken.jobs, broken.backends.len()), (4, 2), "{broken:?}");
        // Counted afresh after it broke.
        assert!(fail(&b, "n1", "IndexError in ImageToMask", "j5", "b").is_none());
    }

    #[test]
    fn another_cause_or_another_batch_starts_afresh() {
        let b = BadBatches::new(2, "batch", 1);
        assert!(fail(&b, "n1", "x", "j1", "a").is_none());
        assert!(fail(&b, "n2", "x", "k1", "a").is_none());
        assert!(fail(&b, "n1", "y", "j2", "a").is_none());
        // One box on the farm: its failures are enough.
        assert!(fail(&b, "n1", "y", "j3", "a").is_some());
    }

    #[test]
    fn a_batch_failing_on_the_only_box_taking_jobs_trips_once_that_is_known() {
        let b = BadBatches::new(2, "batch", 2);
        assert!(fail(&b, "n1", "x", "j1", "a").is_none());
        assert!(fail(&b, "n1", "x", "j2", "a").is_none());
        // Another box's failure meanwhile: not this verdict's to trip.
        assert!(b.trip("n1".into(), "b").is_none());
        let broken = b.trip("n1".into(), "a").expect("broken on its one box");
        assert_eq!((broken.jobs, broken.backends), (2, vec!["a".to_string()]));
        // Tripped once: the run is over.
        assert!(b.trip("n1".into(), "a").is_none());
    }
}
