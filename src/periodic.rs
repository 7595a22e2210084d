//! The service's periodic chores (sampling the queue, folding metrics,
//! handing free memory back) share one loop.
//!
//! Why one helper: each chore was its own "every period until the stop"
//! loop, written three times with small differences (whether the first run
//! is at once, `interval` or `sleep`); one place decides how a late tick is
//! handled (delayed, never bunched up) and that a stop ends the wait but
//! never a chore half done.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Whether a chore also runs at once, or first after one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// Run at once, then every period.
    Now,
    /// Run first after one period.
    AfterPeriod,
}

/// Runs `chore` every `period` until `stop`.
pub async fn every<F, Fut>(period: Duration, first: First, stop: CancellationToken, mut chore: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if first == First::AfterPeriod {
        // An interval's first tick is at once.
        ticks.tick().await;
    }
    loop {
        tokio::select! {
            _ = ticks.tick() => chore().await,
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test(start_paused = true)]
    async fn a_chore_runs_on_its_beat_and_the_stop_ends_the_wait() {
        let start = tokio::time::Instant::now();
        let runs = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let loops = [First::Now, First::AfterPeriod].map(|first| {
            let (runs, stop) = (runs.clone(), stop.clone());
            tokio::spawn(every(Duration::from_secs(10), first, stop, move || {
                let runs = runs.clone();
                async move {
                    runs.lock()
                        .unwrap()
                        .push((first, (tokio::time::Instant::now() - start).as_secs()))
                }
            }))
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        stop.cancel();
        for l in loops {
            l.await.unwrap();
        }
        let mut runs = runs.lock().unwrap().clone();
        runs.sort_by_key(|(first, at)| (*first == First::AfterPeriod, *at));
        assert_eq!(
            runs,
            [
                (First::Now, 0),
                (First::Now, 10),
                (First::Now, 20),
                (First::AfterPeriod, 10),
                (First::AfterPeriod, 20)
            ]
        );
    }
}
