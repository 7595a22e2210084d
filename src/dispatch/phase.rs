//! Where each prompt a worker follows stands on its backend: the one state
//! machine of dispatch.
//!
//! Why one type with one transition function: a prompt's fate is decided by
//! many inputs arriving in any order (the submit's answer, WebSocket
//! messages, a reconcile's reading of `/queue` and `/history`, a user's
//! cancel, a timer). Each input is a [`Signal`]; [`Phase::on`] is the only
//! place that says what it changes, so no input can be handled differently
//! in two places. The database keeps the job's status; this is the worker's
//! view of the prompt, rebuilt from the backend by a reconcile after a
//! restart.
//!
//! ```text
//!  Submitting ──Accepted──► Queued ──Started──► Running ──Ended──► Finishing ──(done)
//!      │  └────NoAnswer──► InDoubt ─Seen*/Started/Ended─┘            │
//!      │                                              FinishDeferred ─┘ (back to Running)
//!  any of InDoubt, Queued, Running ──CancelRequested──► Cancelling ──(done)
//! ```
//!
//! A submit in flight does not take a cancel: it reads the cancel flag
//! itself when it returns. Finishing and Cancelling end only when their
//! helper reports back.

use std::time::Duration;

use tokio::time::Instant;

/// The worker's view of one followed prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Phase {
    /// `POST /prompt` is in flight.
    Submitting,
    /// The submit's answer never came (since then): only the backend can
    /// say whether it has the prompt.
    InDoubt(Instant),
    /// The backend has it, waiting in its queue.
    Queued,
    /// The backend runs it (since then, as far as this worker knows).
    Running(Instant),
    /// It ended there; its history is read and its outputs collected.
    Finishing,
    /// A cancel is being carried out there.
    Cancelling,
}

/// What a worker learnt about a followed prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Signal {
    /// The submit was answered `200`.
    Accepted,
    /// The submit got no usable answer.
    NoAnswer,
    /// The backend's queue lists it as waiting.
    SeenQueued,
    /// It runs (a WebSocket message, or `/queue` lists it as running).
    Started,
    /// It finished there (`executing` with no node, or `/history` has it).
    Ended,
    /// Its end could not be dealt with now (the backend went away mid-way):
    /// the next reconcile tries again.
    FinishDeferred,
    /// A user asked to cancel it.
    CancelRequested,
}

impl Phase {
    /// Whether the backend may hold the prompt in its queue (running or
    /// waiting) in this phase.
    pub(super) fn may_be_on_backend(self) -> bool {
        !matches!(self, Phase::Finishing)
    }

    /// The phase after `signal`, or `None` when the signal changes nothing
    /// in this phase.
    pub(super) fn on(self, signal: Signal) -> Option<Phase> {
        use Phase::*;
        use Signal::*;
        let now = Instant::now();
        match (self, signal) {
            (Submitting, Accepted) => Some(Queued),
            (Submitting, NoAnswer) => Some(InDoubt(now)),
            (Submitting | InDoubt(_) | Queued, Started) => Some(Running(now)),
            (InDoubt(_), SeenQueued) => Some(Queued),
            (Submitting | InDoubt(_) | Queued | Running(_), Ended) => Some(Finishing),
            (InDoubt(_) | Queued | Running(_), CancelRequested) => Some(Cancelling),
            (Finishing, FinishDeferred) => Some(Running(now)),
            _ => None,
        }
    }

    /// It has run on the backend for `limit` or longer.
    pub(super) fn overdue(self, limit: Duration) -> bool {
        matches!(self, Phase::Running(since) if since.elapsed() >= limit)
    }

    /// A helper task owns the prompt now: reconcile leaves it alone.
    pub(super) fn busy(self) -> bool {
        matches!(
            self,
            Phase::Submitting | Phase::Finishing | Phase::Cancelling
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_goes_from_submit_to_finish() {
        let p = Phase::Submitting.on(Signal::Accepted).unwrap();
        assert_eq!(p, Phase::Queued);
        let p = p.on(Signal::Started).unwrap();
        assert!(matches!(p, Phase::Running(_)));
        assert_eq!(p.on(Signal::Started), None, "running stays running");
        assert_eq!(p.on(Signal::Ended), Some(Phase::Finishing));
    }

    #[test]
    fn a_cancel_waits_for_the_submit_and_is_final_once_begun() {
        assert_eq!(Phase::Submitting.on(Signal::CancelRequested), None);
        let c = Phase::Queued.on(Signal::CancelRequested).unwrap();
        assert_eq!(c, Phase::Cancelling);
        for s in [
            Signal::Ended,
            Signal::Started,
            Signal::Accepted,
            Signal::FinishDeferred,
        ] {
            assert_eq!(c.on(s), None, "{s:?} does not change a cancel");
        }
    }

    #[test]
    fn a_prompt_in_doubt_is_resolved_by_what_the_backend_says() {
        let d = Phase::Submitting.on(Signal::NoAnswer).unwrap();
        assert!(matches!(d, Phase::InDoubt(_)));
        assert_eq!(d.on(Signal::SeenQueued), Some(Phase::Queued));
        assert!(matches!(d.on(Signal::Started), Some(Phase::Running(_))));
        assert_eq!(d.on(Signal::Ended), Some(Phase::Finishing));
        assert_eq!(Phase::Queued.on(Signal::SeenQueued), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_is_overdue_only_past_its_limit_and_only_while_running() {
        let limit = Duration::from_secs(7_200);
        let running = Phase::Queued.on(Signal::Started).unwrap();
        tokio::time::advance(limit - Duration::from_secs(1)).await;
        assert!(!running.overdue(limit));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(running.overdue(limit));
        assert!(
            !Phase::Queued.overdue(Duration::ZERO),
            "waiting is not running"
        );
    }

    #[test]
    fn an_end_that_could_not_be_collected_is_tried_again() {
        assert!(matches!(
            Phase::Finishing.on(Signal::FinishDeferred),
            Some(Phase::Running(_))
        ));
        assert_eq!(
            Phase::Finishing.on(Signal::Ended),
            None,
            "one finish at a time"
        );
    }
}
