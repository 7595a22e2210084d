//! Live event streams for clients: one reader of the durable event log fans
//! out to every subscriber.
//!
//! Why this shape: the log makes streams exact (a client that reconnects
//! with the last sequence number it saw, `Last-Event-ID` or `?after=`, gets
//! every event it missed and none twice, also across a restart), and one
//! reader makes them cheap: a thousand dashboards cost one query per commit,
//! not a thousand, and the reader hands each subscriber only the events its
//! filter takes, so a subscriber is woken for nothing else. Each subscriber
//! has a bounded buffer; one that falls behind by more than the buffer, or
//! that starts in the past, reads what it missed from the log and then joins
//! the live feed again, so a slow or stuck subscriber never holds back
//! dispatch or the others. Every stream ends when the service stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::wire;
use crate::store::{EventFilter, JobEvent, Store};

/// Events read per query.
const PAGE: i64 = 500;

/// Events a subscriber may fall behind the live feed before it reads from
/// the log instead.
const BUFFER: usize = 1024;

/// One event as subscribers get it: the record (for filters) and its JSON
/// (serialized once for everyone).
#[derive(Debug)]
pub struct Published {
    /// The event.
    pub event: JobEvent,
    /// Its wire JSON (`crate::api::wire::Event`).
    pub json: String,
    /// Its server-sent-events frame (`id`, `event`, `data`), built once for
    /// every subscriber.
    pub sse: bytes::Bytes,
}

impl Published {
    pub(crate) fn new(event: JobEvent) -> Arc<Published> {
        let json = serde_json::to_string(&wire::Event::from(event.clone())).unwrap_or_default();
        // Compact JSON holds no newline, so it is one `data:` line.
        let sse = format!("id: {}\nevent: {}\ndata: {json}\n\n", event.seq, event.kind).into();
        Arc::new(Published { event, json, sse })
    }
}

/// A subscriber on the live feed.
struct Subscriber {
    filter: EventFilter,
    tx: mpsc::Sender<Arc<Published>>,
    /// Set when its buffer overflowed: it must read the log.
    lagged: Arc<AtomicBool>,
}

/// The fan-out of the event log. Cheap to clone.
#[derive(Clone)]
pub struct EventHub {
    store: Store,
    /// The live subscribers; `None` once the reader has stopped (with the
    /// service), so that nobody joins a feed that no longer flows.
    subscribers: Arc<Mutex<Option<Vec<Subscriber>>>>,
    /// The last sequence number the reader has handed out: where a stream
    /// "from now" starts. Kept in memory so that starting one cannot fail
    /// (a failed read of the log's end must not mean "from the beginning").
    head: Arc<AtomicI64>,
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
        let after = store.latest_event_seq().await?;
        let hub = EventHub {
            store,
            subscribers: Arc::new(Mutex::new(Some(Vec::new()))),
            head: Arc::new(AtomicI64::new(after)),
            stop,
        };
        tasks.spawn(hub.clone().read(after));
        Ok(hub)
    }

    /// Reads each commit's new events once and hands each subscriber those
    /// its filter takes.
    async fn read(self, mut last: i64) {
        let mut commits = self.store.subscribe_commits();
        let all = EventFilter::default();
        loop {
            // Mark the commits seen before reading, so none is missed between the two.
            commits.borrow_and_update();
            match self.store.events_after(last, &all, PAGE).await {
                Ok(events) => {
                    let full = events.len() as i64 == PAGE;
                    if let Some(e) = events.last() {
                        last = e.seq;
                    }
                    // Before the hand-out: whoever got these events finds "now" past them.
                    self.head.store(last, Ordering::Release);
                    self.publish(events);
                    if full {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the event hub cannot read the log"),
            }
            tokio::select! {
                changed = commits.changed() => if changed.is_err() { break },
                _ = self.stop.cancelled() => break,
            }
        }
        // Closing every buffer ends every live stream.
        *self.subscribers.lock().expect("subscribers") = None;
    }

    fn publish(&self, events: Vec<JobEvent>) {
        let mut guard = self.subscribers.lock().expect("subscribers");
        let Some(subscribers) = guard.as_mut() else {
            return;
        };
        for ev in events {
            let mut published: Option<Arc<Published>> = None;
            subscribers.retain(|s| {
                if !s.filter.matches(&ev) || s.lagged.load(Ordering::Relaxed) {
                    return !s.tx.is_closed();
                }
                let p = published.get_or_insert_with(|| Published::new(ev.clone()));
                match s.tx.try_send(p.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.lagged.store(true, Ordering::Relaxed);
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
    }

    /// Joins the live feed with `filter`.
    fn join(&self, filter: EventFilter) -> (mpsc::Receiver<Arc<Published>>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        // A feed that no longer flows (the service stops) drops `tx` here,
        // which ends the stream at once.
        if let Some(subscribers) = self.subscribers.lock().expect("subscribers").as_mut() {
            subscribers.push(Subscriber {
                filter,
                tx,
                lagged: lagged.clone(),
            });
        }
        (rx, lagged)
    }

    /// The events after `after` that match `filter`, or without `after`
    /// every event from now on, then every new one; and the sequence number
    /// the stream starts after (what a client passes to resume).
    ///
    /// "Now" is the last event the reader has handed out: events committed
    /// a moment earlier and not yet handed out are included, so nothing
    /// committed after the call is missed.
    pub fn follow_from(
        &self,
        filter: EventFilter,
        after: Option<i64>,
    ) -> (i64, impl Stream<Item = Arc<Published>> + Send + 'static) {
        let after = after.unwrap_or_else(|| self.head.load(Ordering::Acquire));
        (after, self.follow(filter, after))
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
    live: Option<(mpsc::Receiver<Arc<Published>>, Arc<AtomicBool>)>,
    backlog: VecDeque<JobEvent>,
}

impl Follow {
    async fn next(&mut self) -> Option<Arc<Published>> {
        loop {
            // On the live feed the stop closes the buffer; reading the log,
            // the stream asks.
            if self.live.is_none() && self.hub.stop.is_cancelled() {
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
                    let joined = self.hub.join(self.filter.clone());
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
                        self.live = Some(joined);
                    }
                    self.backlog.extend(page);
                }
                Some((rx, lagged)) => {
                    // Fell behind its buffer: read what was missed from the log.
                    if lagged.load(Ordering::Relaxed) && rx.is_empty() {
                        self.live = None;
                        continue;
                    }
                    // No wait on the stop token here: a thousand subscribers
                    // would each register with it, and leave it, per event.
                    // The reader closes every buffer when the service stops.
                    match rx.recv().await {
                        Some(p) if p.event.seq > self.last => {
                            self.last = p.event.seq;
                            return Some(p);
                        }
                        Some(_) => {}
                        None => return None,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_its_buffer_reads_the_rest_from_the_log() {
        let (_dir, store) = Store::temporary().await;
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let hub = EventHub::start(store.clone(), stop.clone(), &tasks)
            .await
            .unwrap();
        let note = |i: usize| store.note_event("j", "note", "b", format!("n{i}"), None);
        let mut stream = Box::pin(hub.follow(EventFilter::default(), 0));
        note(0).await.unwrap();
        let first = stream.next().await.unwrap();
        assert_eq!(first.event.message.as_deref(), Some("n0"));
        // Live now; it reads nothing while more than its buffer arrives.
        let n = BUFFER + 200;
        for i in 1..=n {
            note(i).await.unwrap();
        }
        let mut last = first.event.seq;
        for i in 1..=n {
            let ev = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
                .await
                .expect("an event")
                .expect("the stream is open");
            assert_eq!(
                ev.event.message,
                Some(format!("n{i}")),
                "in order, none missing"
            );
            assert!(ev.event.seq > last);
            last = ev.event.seq;
        }
        stop.cancel();
        assert!(
            stream.next().await.is_none(),
            "the stream ends with the service"
        );
    }

    #[tokio::test]
    async fn a_stream_from_now_gets_every_later_event_and_none_of_the_history() {
        let (_dir, store) = Store::temporary().await;
        let note = |m: &str| store.note_event("j", "note", "b", m.to_string(), None);
        note("before the hub").await.unwrap();
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let hub = EventHub::start(store.clone(), stop.clone(), &tasks)
            .await
            .unwrap();
        let (started, _) = hub.follow_from(EventFilter::default(), None);
        assert_eq!(started, store.latest_event_seq().await.unwrap());
        note("handed out").await.unwrap();
        let handed = store.latest_event_seq().await.unwrap();
        // "Now" moves on once the reader has handed that event out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (after, stream) = loop {
            let (after, stream) = hub.follow_from(EventFilter::default(), None);
            if after >= handed || std::time::Instant::now() > deadline {
                break (after, stream);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        assert_eq!(after, handed, "now is the last event handed out");
        let mut stream = Box::pin(stream);
        note("later").await.unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("an event")
            .expect("the stream is open");
        assert_eq!(
            next.event.message.as_deref(),
            Some("later"),
            "nothing from before the stream started"
        );
        stop.cancel();
    }
}
