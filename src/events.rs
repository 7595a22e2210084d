//! Live event streams for clients: one reader of the durable event log fans
//! out to every subscriber.
//!
//! Why this shape: the log makes streams exact (a client that reconnects
//! with the last sequence number it saw, `Last-Event-ID` or `?after=`, gets
//! every event it missed and none twice, also across a restart), and one
//! reader makes them cheap (a thousand dashboards cost one query per commit,
//! not a thousand). Each subscriber reads from a bounded buffer; one that
//! falls behind by more than the buffer, or that starts in the past, reads
//! what it missed from the log and then joins the live feed again, so a
//! slow or stuck subscriber never holds back dispatch or the others. Every
//! stream ends when the service stops.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::wire;
use crate::store::{EventFilter, JobEvent, Store};

/// Events read per query.
const PAGE: i64 = 500;

/// Events a subscriber may fall behind the live feed before it reads from
/// the log instead.
const BUFFER: usize = 4096;

/// One event as subscribers get it: the record (for filters) and its JSON
/// (serialized once for everyone).
#[derive(Debug)]
pub struct Published {
    /// The event.
    pub event: JobEvent,
    /// Its wire JSON (`crate::api::wire::Event`).
    pub json: String,
}

impl Published {
    fn new(event: JobEvent) -> Arc<Published> {
        let json = serde_json::to_string(&wire::Event::from(event.clone())).unwrap_or_default();
        Arc::new(Published { event, json })
    }
}

/// The fan-out of the event log. Cheap to clone.
#[derive(Clone)]
pub struct EventHub {
    store: Store,
    live: broadcast::Sender<Arc<Published>>,
    stop: CancellationToken,
}

impl EventHub {
    /// Starts the reader on `tasks`; it ends when `stop` is cancelled, and
    /// so does every stream.
    pub async fn start(
        store: Store,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<EventHub, crate::store::StoreError> {
        let (live, _) = broadcast::channel(BUFFER);
        let hub = EventHub { store, live, stop };
        let after = hub.store.latest_event_seq().await?;
        tasks.spawn(hub.clone().read(after));
        Ok(hub)
    }

    /// Reads each commit's new events once and hands them to every subscriber.
    async fn read(self, mut last: i64) {
        let mut commits = self.store.subscribe_commits();
        let all = EventFilter::default();
        loop {
            // Mark the commits seen before reading, so none is missed between the two.
            commits.borrow_and_update();
            match self.store.events_after(last, &all, PAGE).await {
                Ok(events) => {
                    let full = events.len() as i64 == PAGE;
                    for ev in events {
                        last = ev.seq;
                        // No subscriber is fine: late ones read the log.
                        let _ = self.live.send(Published::new(ev));
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the event hub cannot read the log"),
            }
            tokio::select! {
                changed = commits.changed() => if changed.is_err() { return },
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// The events after `after` that match `filter`, then every new one.
    /// Ends when the service stops.
    pub fn follow(
        &self,
        filter: EventFilter,
        after: i64,
    ) -> impl Stream<Item = Arc<Published>> + Send + 'static {
        let state = Follow {
            hub: self.clone(),
            filter,
            last: after,
            live: None,
            backlog: VecDeque::new(),
        };
        futures::stream::unfold(state, |mut s| async move {
            let next = s.next().await?;
            Some((next, s))
        })
    }
}

/// One subscriber's place: reading the log (`live: None`) or the live feed.
struct Follow {
    hub: EventHub,
    filter: EventFilter,
    last: i64,
    live: Option<broadcast::Receiver<Arc<Published>>>,
    backlog: VecDeque<JobEvent>,
}

impl Follow {
    async fn next(&mut self) -> Option<Arc<Published>> {
        loop {
            if self.hub.stop.is_cancelled() {
                return None;
            }
            if let Some(ev) = self.backlog.pop_front() {
                if ev.seq > self.last {
                    self.last = ev.seq;
                    return Some(Published::new(ev));
                }
                continue;
            }
            match self.live.as_mut() {
                None => {
                    // Join the feed first, then read the log: nothing falls between.
                    let rx = self.hub.live.subscribe();
                    let page = match self
                        .hub
                        .store
                        .events_after(self.last, &self.filter, PAGE)
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(error = %e, "event stream cannot read the log");
                            return None;
                        }
                    };
                    if (page.len() as i64) < PAGE {
                        self.live = Some(rx);
                    }
                    self.backlog.extend(page);
                }
                Some(rx) => {
                    let received = tokio::select! {
                        r = rx.recv() => r,
                        _ = self.hub.stop.cancelled() => return None,
                    };
                    match received {
                        Ok(p) => {
                            if p.event.seq > self.last && self.filter.matches(&p.event) {
                                self.last = p.event.seq;
                                return Some(p);
                            }
                        }
                        // Fell behind the buffer: read what was missed from the log.
                        Err(broadcast::error::RecvError::Lagged(_)) => self.live = None,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        }
    }
}
