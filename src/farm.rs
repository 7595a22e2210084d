//! The farm over time: a sample of the queue every minute, for the farm
//! view's queue chart.
//!
//! Why sampled: how many jobs waited at 03:00 cannot be rebuilt cheaply from
//! a million-job history, while one small row a minute costs nothing and
//! survives restarts.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the queue is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Samples the queue now and every [`SAMPLE_EVERY`] until `stop`.
pub async fn sample_queue(store: Store, stop: CancellationToken) {
    use crate::periodic::{every, First};
    every(SAMPLE_EVERY, First::Now, stop, || async {
        if let Err(e) = store.sample_queue(chrono::Utc::now()).await {
            tracing::warn!(error = %e, "cannot record the queue sample");
        }
    })
    .await
}
