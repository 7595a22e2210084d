//! Backend health: polls each backend's `/system_stats` and keeps its state.
//!
//! Why separate from dispatch: health has its own rhythm (a poll every
//! `monitor.poll_interval_ms`) and is what decides whether a backend gets new
//! leases: one that stops answering is `offline`, one too old to be driven
//! safely is `incompatible` (with the reason in `last_error`); dispatch takes
//! a silent backend's jobs back once it has been silent past the grace period.
//!
//! A backend whose dispatch socket is heard (its pings answered) is known to
//! be alive, so it is polled less often (see [`Pulse`]): on a farm of a
//! thousand idle boxes the polls were most of the orchestrator's idle work.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::comfy::{version_problem, ComfyClient, ComfyError};
use crate::inventory::Inventory;
use crate::store::{BackendStats, Store};

/// What the dispatch worker's socket tells the monitor of the same backend.
///
/// Why: a socket whose pings are answered proves the box is up more cheaply
/// than a poll (two HTTP requests). While it is heard the monitor polls at
/// [`QUIET_FACTOR`] times its interval (for VRAM and queue figures, and
/// version changes);
/// when the socket opens or breaks, the monitor polls at once, so a box that
/// goes down is still seen within a ping.
#[derive(Debug, Default)]
pub struct Pulse {
    heard: Mutex<Option<Instant>>,
    changed: Notify,
}

impl Pulse {
    /// The socket answered (a message or a pong).
    pub fn heard(&self) {
        *self.heard.lock().expect("pulse") = Some(Instant::now());
    }

    /// The socket opened or broke: the monitor should look now.
    pub fn socket_changed(&self) {
        *self.heard.lock().expect("pulse") = None;
        self.changed.notify_one();
    }

    /// Whether the socket was heard within `within`.
    fn fresh(&self, within: Duration) -> bool {
        self.heard
            .lock()
            .expect("pulse")
            .is_some_and(|t| t.elapsed() < within)
    }
}

/// What a monitor calls back with.
pub struct Hooks {
    /// The backend became usable, or stopped being so: dispatch reacts at once.
    pub on_change: Box<dyn Fn() + Send>,
    /// A new inventory was read and stored.
    pub on_inventory: Box<dyn Fn(Inventory) + Send>,
    /// The dispatch socket's news of the backend.
    pub pulse: std::sync::Arc<Pulse>,
}

/// Polls one backend until `stop`, and reads its inventory when it first
/// answers, when its version changes, when it comes back, and every
/// `inventory_every`.
///
/// A backend that comes up has its inventory read before it is recorded
/// online, so the first lease it gets is already checked against what it
/// can run (jobs accepted while the whole farm was unknown included).
pub async fn run(
    store: Store,
    backend_id: String,
    client: ComfyClient,
    timing: Timing,
    stop: CancellationToken,
    hooks: Hooks,
) {
    let Timing {
        interval,
        start,
        inventory_every,
        socket_fresh,
    } = timing;
    // Polls of a large farm are spread over the interval, not on one beat,
    // and stay on their grid (start + a whole number of intervals), so the
    // monitors of one slot poll together.
    let mut planned = start;
    tokio::select! {
        _ = tokio::time::sleep_until(planned) => {}
        _ = stop.cancelled() => return,
    }
    let mut was_usable: Option<bool> = None;
    let mut recorded: Option<(Seen, tokio::time::Instant)> = None;
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut unread = 0;
    let mut version: Option<String> = None;
    let mut inventory_at: Option<tokio::time::Instant> = None;
    loop {
        let probed = probe(&client).await;
        let mut wait_and_retry = false;
        let usable = matches!(&probed, Ok(stats) if version_problem(stats.comfyui_version.as_deref()).is_none());
        let now_version = probed.as_ref().ok().and_then(|s| s.comfyui_version.clone());
        if usable && was_usable != Some(true) {
            // Back (or new): what it can run may have changed.
            inventory_at = None;
        }
        if usable
            && (now_version != version
                || inventory_at.is_none_or(|t| t.elapsed() >= inventory_every))
        {
            version = now_version;
            match crate::inventory::refresh(&store, &client, &backend_id, version.clone()).await {
                Ok(inv) => {
                    inventory_at = Some(tokio::time::Instant::now());
                    (hooks.on_inventory)(inv);
                }
                Err(e) => {
                    tracing::warn!(backend_id, error = %e, "cannot read the backend's inventory; will try again");
                    if inventory_at.is_none() && unread < HOLD_FOR_INVENTORY {
                        // Coming up: give the read a few more polls before the
                        // backend takes jobs it was never checked against.
                        unread += 1;
                        wait_and_retry = true;
                    }
                }
            }
        }
        if wait_and_retry {
            planned = next_planned(planned, interval, interval);
            tokio::select! {
                _ = tokio::time::sleep_until(planned) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        if inventory_at.is_some() {
            unread = 0;
        }
        // The database hears of it when something changed, and at least
        // every RECORD_EVERY (for `last_seen`): not on every poll.
        let seen = Seen::of(&probed);
        let (same, fresh) = match &recorded {
            Some((s, at)) if *s == seen => (true, still_fresh(at.elapsed(), interval)),
            _ => (false, false),
        };
        if !fresh {
            record(&store, &backend_id, probed, same).await;
            recorded = Some((seen, tokio::time::Instant::now()));
        }
        if was_usable != Some(usable) {
            (hooks.on_change)();
            was_usable = Some(usable);
        }
        down_since = if usable {
            None
        } else {
            down_since.or_else(|| Some(tokio::time::Instant::now()))
        };
        let heard = usable && hooks.pulse.fresh(socket_fresh);
        let wait = next_poll(interval, down_since.map(|t| t.elapsed()), heard);
        if planned <= Instant::now() {
            // This was the planned poll (not one the socket asked for).
            planned = next_planned(planned, wait, interval);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(planned) => {}
            _ = hooks.pulse.changed.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// When a monitor polls.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Between two polls of a backend that answers.
    pub interval: Duration,
    /// The first poll (this backend's slot in the spread); later ones fall
    /// a whole number of intervals after it.
    pub start: Instant,
    /// Between two reads of its inventory.
    pub inventory_every: Duration,
    /// A socket heard within this long proves the backend up (twice the
    /// dispatch heartbeat: a quiet socket is pinged every heartbeat).
    pub socket_fresh: Duration,
}

/// Polls a coming-up backend is held back while its inventory cannot be
/// read; then it takes jobs unchecked rather than none.
const HOLD_FOR_INVENTORY: u32 = 3;

/// The longest a poll result may go unrecorded when nothing changed.
const RECORD_EVERY: Duration = Duration::from_secs(30);

/// Whether a record `age` old may wait for a later poll. Within a poll
/// interval of [`RECORD_EVERY`] it may not: a heard box is polled every
/// 30 s, and a record a hair younger than that would wait a whole poll more.
fn still_fresh(age: Duration, interval: Duration) -> bool {
    age + interval < RECORD_EVERY
}

/// After this long offline, a backend is polled less often...
const BACK_OFF_AFTER: Duration = Duration::from_secs(60);

/// ...but at least this often (its own worker also keeps trying to connect).
const BACKED_OFF_INTERVAL: Duration = Duration::from_secs(30);

/// The poll after one planned at `planned`: `wait` later, or if that has
/// passed already (a slow poll), the next point of the grid of `interval`.
fn next_planned(planned: Instant, wait: Duration, interval: Duration) -> Instant {
    let next = planned + wait;
    let now = Instant::now();
    if next > now {
        return next;
    }
    let step = interval.as_nanos().max(1);
    let behind = (now - next).as_nanos() / step + 1;
    next + Duration::from_nanos((behind * step).min(u64::MAX as u128) as u64)
}

/// A backend whose socket is heard is polled this many times less often
/// (every 30 s on the default 2 s interval: a heard box's VRAM and queue
/// figures are that old at most; a restart breaks the socket and is polled
/// at once).
pub const QUIET_FACTOR: u32 = 15;

/// The wait before the next poll: the interval; longer for a backend that
/// has been down a while (a box switched off for the night costs little),
/// and for one whose socket is `heard` (it is known to be up).
fn next_poll(interval: Duration, down_for: Option<Duration>, heard: bool) -> Duration {
    match down_for {
        Some(d) if d >= BACK_OFF_AFTER => (interval * 8).min(BACKED_OFF_INTERVAL).max(interval),
        _ if heard => interval * QUIET_FACTOR,
        _ => interval,
    }
}

/// What a poll found, as far as the database cares.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Answered {
        version: Option<String>,
        vram_total: Option<i64>,
        /// In MiB: a few bytes of drift is no change.
        vram_free_mib: Option<i64>,
        queue_remaining: Option<i64>,
    },
    Failed(String),
}

impl Seen {
    fn of(probed: &Result<BackendStats, ComfyError>) -> Seen {
        match probed {
            Ok(s) => Seen::Answered {
                version: s.comfyui_version.clone(),
                vram_total: s.vram_total,
                vram_free_mib: s.vram_free.map(|v| v >> 20),
                queue_remaining: s.queue_remaining,
            },
            Err(e) => Seen::Failed(e.to_string()),
        }
    }
}

/// Asks the backend how it is.
async fn probe(client: &ComfyClient) -> Result<BackendStats, ComfyError> {
    let stats = client.system_stats().await?;
    let queue_remaining = client.queue_remaining().await?;
    Ok(BackendStats {
        comfyui_version: stats.comfyui_version,
        vram_total: stats.vram_total,
        vram_free: stats.vram_free,
        queue_remaining: Some(queue_remaining),
    })
}

/// Records what the backend said: online, incompatible (too old to be
/// driven safely) or offline. `same`: it said what it said at the last
/// record, so an online backend only needs its `last_seen` moved.
async fn record(
    store: &Store,
    backend_id: &str,
    probed: Result<BackendStats, ComfyError>,
    same: bool,
) {
    let recorded = match probed {
        Ok(stats) => match version_problem(stats.comfyui_version.as_deref()) {
            Some(why) => {
                tracing::warn!(backend_id, "backend gets no jobs: {why}");
                crate::metrics::backend(backend_id, false, stats.vram_total, stats.vram_free);
                store.backend_incompatible(backend_id, stats, why).await
            }
            None => {
                crate::metrics::backend(backend_id, true, stats.vram_total, stats.vram_free);
                if same && matches!(store.backend_still_online(backend_id).await, Ok(true)) {
                    Ok(())
                } else {
                    store.backend_online(backend_id, stats).await
                }
            }
        },
        Err(e) => {
            tracing::debug!(backend_id, error = %e, "backend poll failed");
            crate::metrics::backend(backend_id, false, None, None);
            store.backend_offline(backend_id, e.to_string()).await
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(backend_id, error = %e, "cannot record backend state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_down_a_while_is_polled_less_often() {
        let i = Duration::from_secs(2);
        assert_eq!(next_poll(i, None, false), i);
        assert_eq!(next_poll(i, Some(Duration::from_secs(59)), false), i);
        assert_eq!(
            next_poll(i, Some(Duration::from_secs(61)), false),
            Duration::from_secs(16)
        );
        assert_eq!(
            next_poll(
                Duration::from_secs(10),
                Some(Duration::from_secs(600)),
                false
            ),
            Duration::from_secs(30)
        );
        let slow = Duration::from_secs(60);
        assert_eq!(next_poll(slow, Some(Duration::from_secs(600)), false), slow);
    }

    #[test]
    fn a_heard_box_polled_every_30_s_moves_its_last_seen_at_each_poll() {
        let i = Duration::from_secs(2);
        let heard_poll = i * QUIET_FACTOR;
        assert_eq!(heard_poll, RECORD_EVERY);
        // The next poll comes a little less than 30 s after the last record
        // (the record follows the poll's answer): it records.
        assert!(!still_fresh(heard_poll - Duration::from_millis(3), i));
        // A box polled every 2 s records every 30 s, not at each poll.
        assert!(still_fresh(Duration::from_secs(20), i));
        assert!(!still_fresh(Duration::from_secs(28), i));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_whose_socket_is_heard_is_polled_less_often_until_the_socket_breaks() {
        let i = Duration::from_secs(2);
        let fresh = Duration::from_secs(10);
        let pulse = Pulse::default();
        assert!(!pulse.fresh(fresh), "never heard");
        pulse.heard();
        assert!(pulse.fresh(fresh));
        assert_eq!(
            next_poll(i, None, pulse.fresh(fresh)),
            Duration::from_secs(30)
        );
        tokio::time::advance(fresh).await;
        assert!(!pulse.fresh(fresh), "silent for a heartbeat twice over");
        pulse.heard();
        // The socket broke: the monitor is told at once and polls at its pace.
        pulse.socket_changed();
        assert!(!pulse.fresh(fresh));
        tokio::time::timeout(Duration::from_millis(1), pulse.changed.notified())
            .await
            .expect("the monitor is woken");
    }

    #[tokio::test(start_paused = true)]
    async fn polls_stay_on_their_grid_even_after_a_slow_one() {
        let i = Duration::from_secs(2);
        let start = Instant::now();
        assert_eq!(next_planned(start, i, i), start + i);
        assert_eq!(next_planned(start, i * 5, i), start + i * 5);
        // A poll that took 4.5 s: the next one is the next point of the grid.
        tokio::time::advance(Duration::from_millis(4_500)).await;
        assert_eq!(next_planned(start, i, i), start + i * 3);
        // Exactly on a point that has come: the one after it.
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(next_planned(start, i, i), start + i * 4);
    }
}
