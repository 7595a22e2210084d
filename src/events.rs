//! Live event streams for clients, read from the durable event log.
//!
//! Why from the log: a client that reconnects with the last sequence number
//! it saw (`Last-Event-ID`, `?after=`) gets every event it missed and none
//! twice, also across an orchestrator restart; and each subscriber reads at
//! its own pace, so a slow or stuck one never slows dispatch or the others
//! (it only falls behind in its own reads, and catches up from the log).

use std::collections::VecDeque;

use futures::Stream;

use crate::store::{EventFilter, JobEvent, Store};

/// Events read per query.
const PAGE: i64 = 500;

/// The events after `after` that match `filter`, then every new one as it
/// is committed. Ends only when the store closes.
pub fn follow(
    store: Store,
    filter: EventFilter,
    after: i64,
) -> impl Stream<Item = JobEvent> + Send {
    let commits = store.subscribe_commits();
    let state = (store, filter, after, commits, VecDeque::<JobEvent>::new());
    futures::stream::unfold(
        state,
        |(store, filter, mut last, mut commits, mut buffer)| async move {
            loop {
                if let Some(ev) = buffer.pop_front() {
                    last = ev.seq;
                    return Some((ev, (store, filter, last, commits, buffer)));
                }
                // Mark the commits seen before reading, so none is missed between the two.
                commits.borrow_and_update();
                match store.events_after(last, &filter, PAGE).await {
                    Ok(events) if !events.is_empty() => buffer.extend(events),
                    Ok(_) => {
                        if commits.changed().await.is_err() {
                            return None;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream cannot read the log");
                        return None;
                    }
                }
            }
        },
    )
}
