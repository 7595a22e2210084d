//! A sick box: one whose jobs fail while the same jobs complete elsewhere.
//!
//! Why: a GPU box whose driver broke, whose disk filled or whose custom
//! nodes fail everything answers like a healthy one and fails each job in
//! a second. Left alone it takes the next queued job as soon as it has
//! failed the last, and passes the night's queue through itself, an
//! attempt of every job at a time (and a job allowed one attempt fails
//! there outright). Retries avoid it per job; nothing avoided it as a box.
//!
//! The evidence is a failure *proven* to be the box's: a job it failed, or
//! lost mid-run (its ComfyUI died under it: a GPU that faults takes the
//! server down with each job), that another backend then completed. A job that fails everywhere (a bad batch,
//! a bad parameter) proves nothing against any box. A backend with
//! `dispatch.quarantine_after` proven failures in a row (no job completed
//! there in between) is left out for `dispatch.quarantine_s`; an operator's
//! enable ends that sooner. The proof arrives when the failed job completes
//! elsewhere, so a sick box is found after a few jobs, not at its first.
//!
//! Not every failure blames the box: running out of GPU memory says the
//! job needs a bigger one (a farm whose boxes differ), and an interrupt
//! that was not ours says someone at the box stopped it. Neither counts.
//! One failure needs no proof: a node that could not write for want of
//! space on the box's disk (`store::box_disk_full`) says every next job
//! there will fail alike, so that box is left out at its first
//! ([`Health::quarantine_now`]), and the jobs wait for another box, or for
//! the space, rather than each spend an attempt there.
//!
//! Kept in memory; a quarantine's record is its events: a restart of the
//! orchestrator restores one still in force from them (a sick box would
//! otherwise take the night's queue again until found out once more),
//! while the failures counting towards the next start afresh.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// A backend left out of leasing for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantine {
    /// When it takes jobs again.
    pub until: DateTime<Utc>,
    /// Why, in a sentence.
    pub reason: String,
}

/// One backend's record since its last completed job.
#[derive(Debug, Default)]
struct Record {
    /// Failures before this do not count: it completed a job then, or a
    /// quarantine ended then.
    since: Option<DateTime<Utc>>,
    /// Jobs it failed since then that another backend completed.
    proven: BTreeSet<String>,
    quarantine: Option<Quarantine>,
}

/// The backends' records.
#[derive(Debug)]
pub(super) struct Health {
    after: usize,
    span: Duration,
    records: Mutex<HashMap<String, Record>>,
}

/// A failed attempt of a job that has now completed on another backend.
#[derive(Debug, Clone)]
pub(super) struct FailedThere {
    /// Where it failed.
    pub backend_id: String,
    /// When that attempt ended.
    pub at: DateTime<Utc>,
    /// Its error's sentence.
    pub message: String,
}

impl Health {
    /// `after` proven failures in a row leave a backend out for `span`
    /// (`after` 0: never).
    pub(super) fn new(after: u32, span: Duration) -> Health {
        Health {
            after: after as usize,
            span,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// A job completed on `backend_id`: its run of failures ends.
    pub(super) fn completed(&self, backend_id: &str) {
        let mut records = self.records.lock().expect("health");
        // Every completion comes here: no allocation once the box has a record.
        match records.get_mut(backend_id) {
            Some(r) => {
                r.since = Some(Utc::now());
                r.proven.clear();
            }
            None => {
                let r = Record {
                    since: Some(Utc::now()),
                    ..Record::default()
                };
                records.insert(backend_id.to_string(), r);
            }
        }
    }

    /// Job `job_id` completed on `completed_on` after failing on the
    /// backends in `failed`: each failure after that backend's last
    /// completion counts against it. Returns the backends this puts in
    /// quarantine, with theirs.
    pub(super) fn proven(
        &self,
        job_id: &str,
        completed_on: &str,
        failed: &[FailedThere],
    ) -> Vec<(String, Quarantine)> {
        if self.after == 0 {
            return Vec::new();
        }
        let now = Utc::now();
        let mut records = self.records.lock().expect("health");
        let mut put = Vec::new();
        for f in failed.iter().filter(|f| f.backend_id != completed_on) {
            let r = records.entry(f.backend_id.clone()).or_default();
            if r.since.is_some_and(|since| f.at < since) || active(r, now).is_some() {
                continue;
            }
            r.proven.insert(job_id.to_string());
            if r.proven.len() < self.after {
                continue;
            }
            let reason = format!(
                "{} jobs in a row failed there that other backends then completed (the last on {completed_on}: {})",
                r.proven.len(),
                f.message
            );
            put.push((
                f.backend_id.clone(),
                r.put_in_quarantine(now + self.span, reason),
            ));
        }
        put
    }

    /// Leaves `backend_id` out for the quarantine's span now, for
    /// `reason`, without waiting for proof; `None` if quarantines are off
    /// or it is in one already.
    pub(super) fn quarantine_now(&self, backend_id: &str, reason: String) -> Option<Quarantine> {
        if self.after == 0 {
            return None;
        }
        let now = Utc::now();
        let mut records = self.records.lock().expect("health");
        let r = records.entry(backend_id.to_string()).or_default();
        if active(r, now).is_some() {
            return None;
        }
        Some(r.put_in_quarantine(now + self.span, reason))
    }

    /// The backend's quarantine, while it lasts.
    pub(super) fn quarantined(&self, backend_id: &str) -> Option<Quarantine> {
        let records = self.records.lock().expect("health");
        records.get(backend_id).and_then(|r| active(r, Utc::now()))
    }

    /// The backend's quarantine if it has just ended, once: its end is
    /// then said (an event), as its start was.
    pub(super) fn ended(&self, backend_id: &str) -> Option<Quarantine> {
        let mut records = self.records.lock().expect("health");
        let r = records.get_mut(backend_id)?;
        if r.quarantine.as_ref()?.until > Utc::now() {
            return None;
        }
        r.quarantine.take()
    }

    /// Every backend in quarantine now.
    pub(super) fn all(&self) -> HashMap<String, Quarantine> {
        let now = Utc::now();
        let records = self.records.lock().expect("health");
        records
            .iter()
            .filter_map(|(id, r)| active(r, now).map(|q| (id.clone(), q)))
            .collect()
    }

    /// A quarantine in force when the service last stopped (read back
    /// from its event): it goes on to its end, so a restart of the
    /// orchestrator does not hand a sick box the night's queue again.
    pub(super) fn restore(&self, backend_id: &str, q: Quarantine) {
        let mut records = self.records.lock().expect("health");
        let r = records.entry(backend_id.to_string()).or_default();
        r.since = Some(q.until);
        r.quarantine = Some(q);
    }

    /// An operator vouches for the backend: its quarantine ends now, and
    /// what it failed before counts no more. Whether it was in one.
    pub(super) fn lift(&self, backend_id: &str) -> bool {
        let now = Utc::now();
        let mut records = self.records.lock().expect("health");
        let Some(r) = records.get_mut(backend_id) else {
            return false;
        };
        let was = active(r, now).is_some();
        r.quarantine = None;
        r.since = Some(now);
        r.proven.clear();
        was
    }
}

/// Whether a failed attempt's error may be the box's fault: not an
/// out-of-memory error (the job needs a bigger box), not an interrupt
/// from someone at the box.
pub(super) fn blames_the_box(error: &serde_json::Value) -> bool {
    error["interrupted"] != true && !crate::store::out_of_memory(error)
}

impl Record {
    /// Leaves the backend out until `until`; what it failed before then
    /// was judged already, and counts no more.
    fn put_in_quarantine(&mut self, until: DateTime<Utc>, reason: String) -> Quarantine {
        let q = Quarantine { until, reason };
        self.proven.clear();
        self.since = Some(until);
        self.quarantine = Some(q.clone());
        q
    }
}

fn active(r: &Record, now: DateTime<Utc>) -> Option<Quarantine> {
    r.quarantine.clone().filter(|q| q.until > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(backend: &str, ago_s: i64) -> FailedThere {
        FailedThere {
            backend_id: backend.into(),
            at: Utc::now() - Duration::seconds(ago_s),
            message: "CUDA error: an illegal memory access was encountered".into(),
        }
    }

    #[test]
    fn three_jobs_failed_here_and_completed_elsewhere_put_a_box_in_quarantine() {
        let h = Health::new(3, Duration::minutes(15));
        assert!(h.proven("j1", "good", &[failed("sick", 5)]).is_empty());
        // The same job proven twice counts once.
        assert!(h.proven("j1", "good", &[failed("sick", 4)]).is_empty());
        assert!(h.proven("j2", "good", &[failed("sick", 3)]).is_empty());
        let put = h.proven("j3", "good", &[failed("sick", 2), failed("good", 1)]);
        assert_eq!(put.len(), 1, "{put:?}");
        let (id, q) = &put[0];
        assert_eq!(id, "sick");
        assert!(
            q.reason.starts_with("3 jobs in a row failed there"),
            "{q:?}"
        );
        assert!(q.reason.contains("CUDA error"), "{q:?}");
        assert_eq!(h.quarantined("sick"), Some(q.clone()));
        assert_eq!(h.quarantined("good"), None, "where the job completed");
        assert_eq!(h.all().len(), 1);
        assert!(h.lift("sick"));
        assert_eq!(h.quarantined("sick"), None);
        assert!(!h.lift("sick"));
    }

    #[test]
    fn a_completion_on_the_box_ends_its_run_of_failures() {
        let h = Health::new(3, Duration::minutes(15));
        h.proven("j1", "good", &[failed("flaky", 60)]);
        h.proven("j2", "good", &[failed("flaky", 50)]);
        h.completed("flaky");
        // Failed before that completion: proves nothing now.
        assert!(h.proven("j3", "good", &[failed("flaky", 40)]).is_empty());
        h.proven("j4", "good", &[failed("flaky", 0)]);
        assert!(h.quarantined("flaky").is_none(), "two since its completion");
    }

    #[test]
    fn running_out_of_memory_or_being_interrupted_does_not_blame_the_box() {
        use serde_json::json;
        // As ComfyUI 0.3.64 reports them (torch 2.x names the type
        // torch.OutOfMemoryError; older ones torch.cuda.OutOfMemoryError).
        let oom = json!({"exception_type": "torch.OutOfMemoryError",
            "exception_message": "Allocation on device \nThis error means you ran out of memory on your GPU."});
        assert!(!blames_the_box(&oom));
        let old_oom = json!({"exception_type": "torch.cuda.OutOfMemoryError", "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"});
        assert!(!blames_the_box(&old_oom));
        assert!(!blames_the_box(
            &json!({"message": "interrupted at node 3", "interrupted": true})
        ));
        let driver = json!({"exception_type": "RuntimeError", "exception_message": "CUDA error: an illegal memory access was encountered"});
        assert!(blames_the_box(&driver));
        assert!(blames_the_box(
            &json!({"message": "the prompt finished but its outputs could not be collected"})
        ));
    }

    #[test]
    fn off_at_zero_and_over_when_its_time_is_up() {
        let off = Health::new(0, Duration::minutes(15));
        for j in ["a", "b", "c", "d"] {
            assert!(off.proven(j, "good", &[failed("sick", 1)]).is_empty());
        }
        let h = Health::new(1, Duration::milliseconds(-1));
        assert_eq!(h.proven("a", "good", &[failed("sick", 1)]).len(), 1);
        assert_eq!(h.quarantined("sick"), None, "its span is over");
        assert!(h.ended("sick").is_some(), "said once");
        assert!(h.ended("sick").is_none());
        let lasting = Health::new(1, Duration::minutes(15));
        lasting.proven("a", "good", &[failed("sick", 1)]);
        assert!(lasting.ended("sick").is_none(), "not over yet");
    }
}
