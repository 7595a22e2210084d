//! How many files (sockets included) the service may hold open, and how
//! many it does.
//!
//! Why: every backend holds a WebSocket and a few HTTP connections, every
//! live dashboard a stream, SQLite a few files per connection. A farm of a
//! few hundred boxes, or a few hundred dashboards, passes 1,024 open files,
//! the soft limit a systemd service or a login shell gets by default, while
//! the hard limit above it is usually far higher (524,288 under systemd).
//! At the soft limit every new connection fails (`EMFILE`): the API stops
//! accepting, backends look unreachable and their jobs are requeued, with
//! nothing in the service's own words to say why. So the service raises its
//! soft limit to the hard one at start (as Go's runtime does for every
//! program), logs what it got, shows both counts in `/metrics`
//! (`process_open_fds`, `process_max_fds`, the names Prometheus's own
//! process collectors use), and warns in `/api/health` before the limit is
//! reached.

/// Share of the limit in use at which `/api/health` warns: early enough to
/// raise the limit before connections fail, late enough that a farm using
/// a good part of its allowance on purpose is not told of it all day.
const WARN_AT: f64 = 0.8;

/// Open files the process needs beyond its backends: the database's files,
/// the runtime's own, the API's clients and dashboards on a quiet farm.
const BASE_NEED: u64 = 256;

/// Open files one backend may hold: its WebSocket, HTTP connections for
/// its polls, submissions and downloads, and an output file being written.
const PER_BACKEND: u64 = 6;

/// What [`raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now (the hard limit, or `before` if it could not be raised).
    pub now: u64,
}

/// Raises the soft limit on open files to the hard limit; `None` where the
/// system has no such limit or does not say it.
pub fn raise() -> Option<Raised> {
    #[cfg(unix)]
    {
        let lim = current()?;
        let before = lim.rlim_cur;
        // No limit at all is not asked for: the kernel refuses more than
        // its own maximum (`fs.nr_open`, 1,048,576 by default).
        let want = if lim.rlim_max == libc::RLIM_INFINITY {
            1 << 20
        } else {
            lim.rlim_max
        };
        if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: setrlimit reads the struct it is given.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                return Some(Raised { before, now: want });
            }
        }
        Some(Raised {
            before,
            now: before,
        })
    }
    #[cfg(not(unix))]
    None
}

/// [`raise`]s the limit for a farm of `backends` and says what it got in
/// the log: a warning when even the hard limit is under what such a farm
/// may [`need`].
pub fn raise_for(backends: usize) {
    let Some(raised) = raise() else {
        return;
    };
    if raised.now > raised.before {
        tracing::info!(
            from = raised.before,
            to = raised.now,
            "open-file limit raised to the hard limit"
        );
    }
    let need = need(backends);
    if raised.now < need {
        tracing::warn!(
            limit = raised.now,
            need,
            backends,
            "this process may open only {} files (connections count), about {need} needed for {backends} backends and their dashboards: raise the hard limit (`LimitNOFILE=` in its systemd unit, `ulimit -Hn` as root)",
            raised.now
        );
    }
}

/// The soft limit on open files now; `None` where it is not known.
pub fn limit() -> Option<u64> {
    #[cfg(unix)]
    {
        current()
            .map(|lim| lim.rlim_cur)
            .filter(|&n| n != libc::RLIM_INFINITY)
    }
    #[cfg(not(unix))]
    None
}

/// The process's limits on open files (soft and hard).
#[cfg(unix)]
fn current() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// Files the process holds open now (Linux: the entries of
/// `/proc/self/fd`); `None` elsewhere. A directory read: call it off the
/// async runtime's threads ([`in_use_now`]).
pub fn in_use() -> Option<u64> {
    // The read itself holds one more for its duration.
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// [`in_use`] as read on a blocking thread at most a second ago. Why not
/// read each time: `GET /api/health` is what load balancers and the submit
/// benchmark call thousands of times a second, and a folder read on a
/// blocking thread per call would be most of its cost; the count moves
/// slowly next to the limit it is held against.
pub async fn in_use_now() -> Option<u64> {
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<(Instant, Option<u64>)>> = Mutex::new(None);
    if let Some((at, n)) = *LAST.lock().expect("open files") {
        if at.elapsed() < FRESH {
            return n;
        }
    }
    let n = tokio::task::spawn_blocking(in_use).await.ok().flatten();
    *LAST.lock().expect("open files") = Some((Instant::now(), n));
    n
}

/// How old a count [`in_use_now`] gives may be.
const FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// What the process may need for a farm of `backends`, roughly: a limit
/// under it is worth a word at start.
pub fn need(backends: usize) -> u64 {
    BASE_NEED + PER_BACKEND * backends as u64
}

/// The health warning when `open` of `limit` files are open, if that is
/// near the limit.
pub fn warning(open: u64, limit: u64) -> Option<String> {
    (limit > 0 && open as f64 >= WARN_AT * limit as f64).then(|| {
        format!(
            "{open} of the {limit} files this process may open are open (each connection counts): \
             raise its limit (`LimitNOFILE=` in its systemd unit, `ulimit -n` in its shell) \
             before new connections fail"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_comes_at_four_fifths_of_the_limit() {
        assert_eq!(warning(79, 100), None);
        let w = warning(80, 100).unwrap();
        assert!(w.starts_with("80 of the 100 files"), "{w}");
        assert_eq!(warning(5, 0), None);
    }
}
