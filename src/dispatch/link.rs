//! A worker's WebSocket to its backend, and what the worker knows of its
//! health: when it was last heard, whether a ping is out, whether ComfyUI
//! has confirmed the socket is the registered one, whether a message is
//! owed after a submit, and since when the backend has been silent.
//!
//! Why its decisions are plain functions of the time: they are the rules
//! that take a hung backend's jobs away and reconnect a deaf socket, so they
//! are tested on tokio's paused clock, to the millisecond, without waiting.

use std::time::Duration;

use tokio::time::Instant;

use crate::comfy::EventStream;

/// The socket and its health.
pub(super) struct Link {
    pub(super) stream: Option<EventStream>,
    /// Since when the backend has not answered (the grace period runs from here).
    pub(super) down_since: Option<Instant>,
    /// Wait before the next connect attempt (doubling, capped).
    pub(super) retry_delay: Duration,
    /// Last frame of any kind.
    pub(super) last_heard: Instant,
    /// A ping is out since then.
    ping_sent: Option<Instant>,
    last_ping: Instant,
    /// The new socket must prove it is the registered one by then.
    confirm_by: Option<Instant>,
    /// A submit was accepted: a message must arrive by then.
    expect_by: Option<Instant>,
}

/// What the link's health asks of the worker now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Check {
    /// Nothing to do.
    Fine,
    /// Time for a ping.
    Ping,
    /// A ping went unanswered: the connection is dead, and the backend has
    /// been silent since the ping.
    Dead(Instant),
    /// A new socket was not confirmed as the registered one.
    Unconfirmed,
    /// No message followed an accepted submit.
    Unheard,
}

impl Link {
    pub(super) fn new() -> Link {
        let now = Instant::now();
        Link {
            stream: None,
            down_since: None,
            retry_delay: Duration::from_millis(100),
            last_heard: now,
            ping_sent: None,
            last_ping: now,
            confirm_by: None,
            expect_by: None,
        }
    }

    /// A new socket is up: it must be confirmed within `deaf_after`.
    pub(super) fn connected(&mut self, stream: EventStream, deaf_after: Duration) {
        let now = Instant::now();
        *self = Link {
            stream: Some(stream),
            confirm_by: Some(now + deaf_after),
            ..Link::new()
        };
    }

    /// A connect failed: the backend is down, since the first failure.
    /// Returns since when, and the wait before the next try.
    pub(super) fn connect_failed(&mut self) -> (Instant, Duration) {
        let since = *self.down_since.get_or_insert_with(Instant::now);
        let delay = self.retry_delay;
        self.retry_delay = (delay * 2).min(Duration::from_secs(2));
        (since, delay)
    }

    /// Whether the backend has been down for `grace` or longer.
    pub(super) fn past_grace(&self, grace: Duration) -> bool {
        self.down_since.is_some_and(|s| s.elapsed() >= grace)
    }

    /// Any frame arrived: the socket is heard.
    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.expect_by = None;
    }

    /// The ping was answered.
    pub(super) fn pong(&mut self) {
        self.ping_sent = None;
    }

    /// ComfyUI answered the probe through its table: the socket is the registered one.
    pub(super) fn confirmed(&mut self) {
        self.confirm_by = None;
    }

    /// A submit sent at `sent` was accepted: unless a frame came after it
    /// already, one must arrive within `deaf_after`.
    pub(super) fn expect_after(&mut self, sent: Instant, deaf_after: Duration) {
        if self.last_heard < sent && self.expect_by.is_none() {
            self.expect_by = Some(Instant::now() + deaf_after);
        }
    }

    /// A ping is sent now.
    pub(super) fn pinged(&mut self) {
        let now = Instant::now();
        self.last_ping = now;
        self.ping_sent = Some(now);
    }

    /// What the worker should do about the socket now.
    pub(super) fn check(&self, heartbeat: Duration) -> Check {
        let now = Instant::now();
        if let Some(sent) = self.ping_sent {
            if now.duration_since(sent) >= heartbeat * 2 {
                return Check::Dead(sent);
            }
        } else if now.duration_since(self.last_ping) >= heartbeat {
            return Check::Ping;
        }
        if self.confirm_by.is_some_and(|t| now >= t) {
            Check::Unconfirmed
        } else if self.expect_by.is_some_and(|t| now >= t) {
            Check::Unheard
        } else {
            Check::Fine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const BEAT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_ping_marks_the_backend_down_from_the_ping() {
        let link = &mut Link::new();
        assert_eq!(link.check(BEAT), Check::Fine);
        advance(BEAT).await;
        assert_eq!(link.check(BEAT), Check::Ping);
        link.pinged();
        let sent = Instant::now();
        advance(BEAT * 2 - Duration::from_millis(1)).await;
        assert_eq!(link.check(BEAT), Check::Fine, "not yet");
        advance(Duration::from_millis(1)).await;
        assert_eq!(link.check(BEAT), Check::Dead(sent));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_ping_keeps_the_link_and_the_next_one_follows() {
        let link = &mut Link::new();
        advance(BEAT).await;
        link.pinged();
        advance(Duration::from_millis(20)).await;
        link.pong();
        advance(BEAT * 3).await;
        assert_eq!(link.check(BEAT), Check::Ping, "a new ping, not a death");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_socket_must_be_confirmed_and_a_submit_heard_in_time() {
        let deaf = Duration::from_secs(3);
        let mut link = Link::new();
        link.confirm_by = Some(Instant::now() + deaf);
        advance(deaf).await;
        assert_eq!(link.check(BEAT), Check::Unconfirmed);
        link.confirmed();
        assert_eq!(link.check(BEAT), Check::Fine);
        // A status broadcast that came before the submit's answer counts.
        let sent = Instant::now();
        link.heard();
        link.expect_after(sent, deaf);
        assert_eq!(link.expect_by, None);
        // One that never comes does not.
        advance(Duration::from_millis(10)).await;
        let sent = Instant::now();
        link.expect_after(sent, deaf);
        advance(deaf).await;
        assert_eq!(link.check(BEAT * 100), Check::Unheard);
        link.heard();
        assert_eq!(link.check(BEAT * 100), Check::Fine);
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_period_runs_from_the_first_failure() {
        let grace = Duration::from_secs(60);
        let mut link = Link::new();
        assert!(!link.past_grace(grace), "never down");
        let (since, first) = link.connect_failed();
        advance(Duration::from_secs(30)).await;
        let (again, second) = link.connect_failed();
        assert_eq!(since, again, "later failures do not restart it");
        assert!(second > first, "connect retries back off");
        assert!(!link.past_grace(grace));
        advance(Duration::from_secs(30)).await;
        assert!(link.past_grace(grace));
        for _ in 0..10 {
            link.connect_failed();
        }
        assert_eq!(link.retry_delay, Duration::from_secs(2), "capped");
    }
}
