//! Keeping the service's resident memory close to what it really holds.
//!
//! Why: a farm of a thousand backends coming up at once reads a thousand
//! inventories and opens thousands of connections in its first minute: the
//! heap peaks near 100 MB while what stays is under half of that (measured
//! with heaptrack, `docs/PERFORMANCE.md`). glibc's allocator keeps freed
//! memory mapped, spread over one arena per thread that ever allocated, so
//! the process stayed at the peak for good. Two arenas instead of one per
//! thread, and handing free pages back, let resident memory follow what is
//! held: at once when a burst (a hundred thousand submissions, a farm coming
//! up) has just freed a lot, and every ten seconds in any case. Elsewhere
//! than glibc these do nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often free memory is handed back to the system in any case.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// How often the heap's free memory may be looked at (a walk of the
/// allocator's free lists, no system call).
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The CPU the process must have used since the last look for the heap to
/// be looked at again. Why: a look walks every free block under the
/// allocator's lock, a few milliseconds on a fragmented heap; once a second
/// it was 7% of an idle farm of a thousand backends. A burst that frees
/// megabytes takes far more CPU than this, and a process that used less
/// cannot have freed much; the trim every [`TRIM_EVERY`] comes anyway.
const BUSY: Duration = Duration::from_millis(100);

/// Free memory the heap may gain over its lowest point since the last trim
/// before it is handed back without waiting for [`TRIM_EVERY`].
const SLACK: usize = 8 << 20;

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

/// Bytes the heap holds free (handed back to the system or not).
fn free_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo only reads the allocator's statistics under its
    // locks. Not mallinfo2 (full-width fields): that one needs glibc 2.33,
    // and the 32-bit count is plenty for a heap of this service's size.
    unsafe {
        libc::mallinfo().fordblks as u32 as usize
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// The process's resident memory in bytes (Linux: `/proc/self/statm`),
/// what the memory goals are measured by and what `/metrics` shows as
/// `process_resident_memory_bytes`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The CPU time the process has used, where it can be read.
fn cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given, nothing else.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
    }
    None
}

/// Whether the process used [`BUSY`] CPU between two readings; when the
/// clock cannot be read, it counts as busy (the heap is looked at each time).
fn busy_between(then: Option<Duration>, now: Option<Duration>) -> bool {
    match (then, now) {
        (Some(then), Some(now)) => now.saturating_sub(then) >= BUSY,
        _ => true,
    }
}

/// When to trim, from what the heap held free at each look.
#[derive(Debug)]
struct Trimmer {
    /// The least free memory seen since the last trim: what was freed after
    /// it is the rise above it (the free lists also keep memory already
    /// handed back, so the level alone says nothing).
    low: usize,
    /// Looks since the last trim.
    looks: u32,
}

impl Trimmer {
    /// `free`: the heap's free bytes now, when known (else the next look
    /// sets the low).
    fn new(free: Option<usize>) -> Trimmer {
        Trimmer {
            low: free.unwrap_or(usize::MAX),
            looks: 0,
        }
    }

    /// Whether to trim now, given the heap's free bytes (`None`: a quiet
    /// second, the heap was not looked at).
    fn look(&mut self, free: Option<usize>) -> bool {
        self.looks += 1;
        let freed = free.is_some_and(|free| {
            self.low = self.low.min(free);
            free > self.low.saturating_add(SLACK)
        });
        let due = freed || self.looks >= (TRIM_EVERY.as_secs() / LOOK_EVERY.as_secs()) as u32;
        if due {
            *self = Trimmer::new(free);
        }
        due
    }
}

/// Trims when much was freed since the last trim, and every `TRIM_EVERY`
/// anyway, until the service stops.
pub async fn trim_now_and_then(stop: CancellationToken) {
    use crate::periodic::{every, First};
    let mut trimmer = Trimmer::new(Some(free_bytes()));
    let mut cpu_then = cpu_time();
    every(LOOK_EVERY, First::AfterPeriod, stop, move || {
        let cpu = cpu_time();
        let busy = busy_between(cpu_then, cpu);
        cpu_then = cpu;
        let due = trimmer.look(busy.then(free_bytes));
        async move {
            // A few milliseconds walking the heap: off the runtime's threads.
            if due {
                if let Err(e) = tokio::task::spawn_blocking(trim).await {
                    tracing::debug!(error = %e, "cannot trim the heap");
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_a_large_free_at_once_and_comes_every_ten_looks_anyway() {
        const MB: usize = 1 << 20;
        let mut t = Trimmer::new(Some(40 * MB));
        // Reused and freed again: what counts is the rise over the low.
        assert!(!t.look(Some(20 * MB)));
        assert!(!t.look(Some(27 * MB)), "7 MB freed: within the slack");
        assert!(t.look(Some(29 * MB)), "9 MB freed since the low: at once");
        // Nothing freed: only the tenth look trims.
        let quiet: Vec<bool> = (0..10).map(|_| t.look(Some(29 * MB))).collect();
        assert_eq!(quiet.iter().filter(|d| **d).count(), 1);
        assert!(quiet[9]);
    }

    #[test]
    fn quiet_seconds_skip_the_look_but_not_the_trim_every_ten_seconds() {
        const MB: usize = 1 << 20;
        let mut t = Trimmer::new(Some(40 * MB));
        let quiet: Vec<bool> = (0..10).map(|_| t.look(None)).collect();
        assert_eq!(
            quiet,
            [false, false, false, false, false, false, false, false, false, true]
        );
        // After a trim without a look, the next look sets the low: a burst
        // is measured from there.
        assert!(!t.look(Some(30 * MB)));
        assert!(!t.look(None));
        assert!(t.look(Some(39 * MB)), "9 MB freed since the low");
    }

    #[test]
    fn a_second_counts_as_busy_after_100_ms_of_cpu_or_when_the_clock_is_unknown() {
        let at = |ms| Some(Duration::from_millis(ms));
        assert!(!busy_between(at(1_000), at(1_099)));
        assert!(busy_between(at(1_000), at(1_100)));
        assert!(busy_between(None, at(1_000)));
        assert!(busy_between(at(1_000), None));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_cpu_clock_moves_with_work() {
        let before = cpu_time().expect("the process CPU clock");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time().expect("the process CPU clock") > before);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn what_a_burst_frees_shows_in_the_free_bytes_looked_at() {
        // Holes between blocks still in use, as a burst leaves them (freed
        // memory at the top of the heap goes back to the system by itself).
        let (mut freed, mut kept) = (Vec::new(), Vec::new());
        for _ in 0..8_192 {
            freed.push(vec![1u8; 4_096]);
            kept.push(vec![1u8; 64]);
        }
        let before = free_bytes();
        drop(freed);
        let after = free_bytes();
        assert!(
            after >= before + SLACK,
            "32 MB freed, the free bytes went from {before} to {after}"
        );
        drop(kept);
    }
}
