//! Keeping the service's resident memory close to what it really holds.
//!
//! Why: a farm of a thousand backends coming up at once reads a thousand
//! inventories and opens thousands of connections in its first minute: the
//! heap peaks near 100 MB while what stays is under half of that (measured
//! with heaptrack, `docs/PERFORMANCE.md`). glibc's allocator keeps freed
//! memory mapped, spread over one arena per thread that ever allocated, so
//! the process stayed at the peak for good. Two arenas instead of one per
//! thread, and handing free pages back every ten seconds, let resident
//! memory follow what is held. Elsewhere than glibc these do nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often free memory is handed back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Sets the allocator up; call first thing, before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; called before
    // other threads exist, as glibc asks.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands free heap pages back to the system now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; it only releases
    // pages no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_EVERY`] until the service stops.
pub async fn trim_now_and_then(stop: CancellationToken) {
    use crate::periodic::{every, First};
    every(TRIM_EVERY, First::AfterPeriod, stop, || async {
        // A few milliseconds walking the heap: off the runtime's threads.
        if let Err(e) = tokio::task::spawn_blocking(trim).await {
            tracing::debug!(error = %e, "cannot trim the heap");
        }
    })
    .await
}
