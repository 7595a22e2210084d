//! Alerts: a POST to whoever looks after the farm when the night needs
//! someone, rather than a surprise in the morning.
//!
//! Why from the event log: each thing worth an alert is already an event,
//! written in the transaction that made it so (a batch the farm paused, a
//! box put in quarantine, a box too old to drive, a box gone offline and
//! back, a batch broken with nothing to pause, the data folder's disk
//! running low and space back). This task follows the log from a cursor
//! kept in the database (`settings`), and moves the cursor past an event
//! only once its alert was delivered or given up: a restart reads again
//! what it had not told, and never skips one (it may tell one twice). A
//! box offline is told only once it has stayed down
//! `alerts.offline_after_s`: a ComfyUI restart is not worth waking anyone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::EventHub;
use crate::store::{EventFilter, JobEvent, Store};

/// One alert.
#[derive(Debug, Clone, PartialEq)]
struct Alert {
    /// `batch_paused`, `batch_broken`, `backend_quarantined`,
    /// `backend_incompatible`, `backend_offline`, `backend_back`,
    /// `disk_low`, `disk_ok`.
    kind: &'static str,
    /// A sentence for people, shown as it is by a chat's incoming webhook.
    text: String,
    backend_id: Option<String>,
    batch: Option<String>,
    /// When it happened.
    at: DateTime<Utc>,
    /// The event that told it.
    seq: i64,
}

/// What the alerts have seen: boxes offline not told yet, boxes told
/// offline, batch pauses told.
struct Watch {
    offline_after: chrono::Duration,
    /// The metadata field naming a batch (`dispatch.batch_field`).
    batch_field: String,
    /// Offline, not told yet: the event that said so.
    pending: HashMap<String, JobEvent>,
    /// Told offline: since when.
    down: HashMap<String, DateTime<Utc>>,
    /// Batch pauses told (a pause writes one event per job, all alike).
    told: HashSet<(String, String)>,
}

impl Watch {
    fn new(config: &Config) -> Watch {
        Watch {
            offline_after: chrono::Duration::seconds(config.alerts.offline_after_s as i64),
            batch_field: config.dispatch.batch_field.clone(),
            pending: HashMap::new(),
            down: HashMap::new(),
            told: HashSet::new(),
        }
    }

    /// Whether `key` (a batch, and what is said of it) is told for the
    /// first time; the memory of those told stays bounded.
    fn first_time(&mut self, key: (String, String)) -> bool {
        if self.told.len() > 10_000 {
            self.told.clear();
        }
        self.told.insert(key)
    }

    /// The alert `ev` makes now, if any.
    fn consider(&mut self, ev: &JobEvent) -> Option<Alert> {
        let message = ev.message.clone().unwrap_or_default();
        let backend = ev.backend_id.clone();
        let alert = |kind, text: String| Alert {
            kind,
            text,
            backend_id: backend.clone(),
            batch: None,
            at: ev.at,
            seq: ev.seq,
        };
        match ev.kind.as_str() {
            "backend_offline" => {
                let b = backend.clone()?;
                if !self.down.contains_key(&b) {
                    self.pending.entry(b).or_insert_with(|| ev.clone());
                }
                None
            }
            "backend_online" => {
                let b = backend.clone()?;
                self.pending.remove(&b);
                let since = self.down.remove(&b)?;
                Some(alert(
                    "backend_back",
                    format!(
                        "backend {b} is back online (offline since {})",
                        local(since)
                    ),
                ))
            }
            // "backend B takes no jobs until T: why".
            "backend_quarantined" => Some(alert("backend_quarantined", message)),
            // A batch broken with nothing queued to pause (its next jobs
            // are held as they come): each is told, as the hold keeps the
            // farm from tripping on it again until it is let go.
            "batch_broken" => {
                let batch = ev.data.as_ref()?["batch"].as_str()?.to_string();
                Some(Alert {
                    batch: Some(batch),
                    backend_id: None,
                    ..alert("batch_broken", message)
                })
            }
            // The data folder's disk, under `retention.low_space_bytes` and back.
            "disk_low" => Some(alert("disk_low", message)),
            "disk_ok" => Some(alert("disk_ok", message)),
            // It answers, but cannot be driven: not offline.
            "backend_incompatible" => {
                let b = backend.clone()?;
                self.pending.remove(&b);
                self.down.remove(&b);
                Some(alert(
                    "backend_incompatible",
                    format!("{message}; it gets no jobs"),
                ))
            }
            "paused" => {
                let data = ev.data.as_ref()?;
                // A job stored paused for a held batch: its pause was told.
                if data["by"] != "farm" || data["held"] == true {
                    return None;
                }
                let batch = data["batch"].as_str()?.to_string();
                if !self.first_time((batch.clone(), message.clone())) {
                    return None;
                }
                // "paused with its batch (batch b): WHY" says WHY.
                let why = message
                    .split_once("): ")
                    .map_or(message.as_str(), |(_, w)| w);
                Some(Alert {
                    batch: Some(batch.clone()),
                    backend_id: None,
                    ..alert(
                        "batch_paused",
                        format!("{} {batch} was paused by the farm: {why}", self.batch_field),
                    )
                })
            }
            _ => None,
        }
    }

    /// Boxes offline long enough by `now`: told now.
    fn due(&mut self, now: DateTime<Utc>) -> Vec<Alert> {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, ev)| ev.at + self.offline_after <= now)
            .map(|(b, _)| b.clone())
            .collect();
        let mut alerts = Vec::new();
        for b in due {
            let Some(ev) = self.pending.remove(&b) else {
                continue;
            };
            self.down.insert(b.clone(), ev.at);
            // Its event says "backend B is offline: ERROR".
            let error = ev
                .data
                .as_ref()
                .and_then(|d| d["error"].as_str().map(String::from));
            alerts.push(Alert {
                kind: "backend_offline",
                text: format!(
                    "backend {b} has been offline since {}: {}",
                    local(ev.at),
                    error.or(ev.message).unwrap_or_default()
                ),
                backend_id: Some(b),
                batch: None,
                at: ev.at,
                seq: ev.seq,
            });
        }
        alerts.sort_by_key(|a| a.seq);
        alerts
    }

    /// When the next box offline falls due.
    fn next_due(&self) -> Option<DateTime<Utc>> {
        self.pending
            .values()
            .map(|ev| ev.at + self.offline_after)
            .min()
    }

    /// Where a restart must read again from, having dealt with every event
    /// up to `seen`: before the first box offline not told yet.
    fn cursor(&self, seen: i64) -> i64 {
        self.pending
            .values()
            .map(|ev| ev.seq - 1)
            .min()
            .map_or(seen, |p| p.min(seen))
    }
}

fn local(t: DateTime<Utc>) -> String {
    t.with_timezone(&chrono::Local)
        .format("%Y-%m-%d %H:%M")
        .to_string()
}

/// Tells the alerts until `stop`; returns at once when `alerts.url` is not
/// set.
pub async fn run(store: Store, events: EventHub, config: Arc<Config>, stop: CancellationToken) {
    let Some(url) = config.alerts.url.clone() else {
        // Off: where they stopped is forgotten, so alerts turned on again
        // months later tell what happens from then, not the months between.
        if let Err(e) = store.set_alerts_cursor(None).await {
            tracing::warn!(error = %e, "cannot forget where the alerts stopped");
        }
        return;
    };
    let Some(http) = crate::webhooks::client(&config, "alerts") else {
        return;
    };
    let cursor = match store.alerts_cursor().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "alerts off: cannot read where they stopped");
            return;
        }
    };
    // The first run here tells what happens from now, not the history.
    let (mut seen, stream) = events.follow_from(EventFilter::default(), cursor);
    let mut stream = std::pin::pin!(stream);
    let mut watch = Watch::new(&config);
    let mut saved = cursor;
    save(&store, seen, &mut saved).await;
    let mut saved_at = tokio::time::Instant::now();
    let teller = Teller {
        http,
        url,
        config: config.clone(),
    };
    loop {
        let wait = watch
            .next_due()
            .map_or(Duration::from_secs(60), |t| {
                (t - Utc::now()).to_std().unwrap_or(Duration::ZERO)
            })
            .min(Duration::from_secs(60));
        let mut alerts = Vec::new();
        tokio::select! {
            next = stream.next() => {
                let Some(published) = next else { break };
                alerts.extend(watch.consider(&published.event));
                seen = published.event.seq;
            }
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
        alerts.extend(watch.due(Utc::now()));
        for alert in &alerts {
            if !teller.tell(alert, &stop).await {
                // Stopped before it was told: read again after a restart.
                return;
            }
        }
        let cursor = watch.cursor(seen);
        let stale = saved_at.elapsed() >= Duration::from_secs(60);
        if Some(cursor) != saved && (!alerts.is_empty() || stale) {
            save(&store, cursor, &mut saved).await;
            saved_at = tokio::time::Instant::now();
        }
    }
    save(&store, watch.cursor(seen), &mut saved).await;
}

async fn save(store: &Store, cursor: i64, saved: &mut Option<i64>) {
    if Some(cursor) == *saved {
        return;
    }
    match store.set_alerts_cursor(Some(cursor)).await {
        Ok(()) => *saved = Some(cursor),
        Err(e) => tracing::warn!(error = %e, "cannot record how far the alerts went"),
    }
}

/// How long a stop lets an alert's POST in flight finish (the whole stop
/// is bounded by `shutdown_timeout_s` in any case).
const IN_FLIGHT_AT_STOP: Duration = Duration::from_secs(2);

/// Delivers alerts.
struct Teller {
    http: reqwest::Client,
    url: String,
    config: Arc<Config>,
}

impl Teller {
    /// Delivers `alert`, retrying as `webhooks` says; `false` if `stop`
    /// came first.
    async fn tell(&self, alert: &Alert, stop: &CancellationToken) -> bool {
        let body = json!({
            "text": format!("orchestrator: {}", alert.text),
            "kind": alert.kind,
            "backend_id": alert.backend_id,
            "batch": alert.batch,
            "at": alert.at,
            "event_seq": alert.seq,
            "url": format!("{}/", self.config.base_url()),
        });
        let max = self.config.webhooks.max_attempts.max(1);
        for tries in 1..=max {
            let req = self.http.post(&self.url);
            let sent = crate::webhooks::post(&self.config, req, &body);
            let mut sent = std::pin::pin!(sent);
            let error = tokio::select! {
                sent = &mut sent => sent.err(),
                _ = stop.cancelled() => {
                    // A POST in flight when the service stops is let finish
                    // a moment: its receiver may have it already, and an
                    // alert given up here is told again after the restart.
                    match tokio::time::timeout(IN_FLIGHT_AT_STOP, &mut sent).await {
                        Ok(sent) => sent.err(),
                        Err(_) => return false,
                    }
                }
            };
            let Some(error) = error else {
                tracing::info!(kind = alert.kind, backend_id = ?alert.backend_id, "alert told: {}", alert.text);
                return true;
            };
            if tries == max {
                tracing::warn!(kind = alert.kind, tries, %error, "alert given up: {}", alert.text);
                return true;
            }
            let delay = crate::webhooks::retry_delay(&self.config, tries as i64);
            tracing::info!(kind = alert.kind, tries, %error, "alert will be retried");
            tokio::select! {
                _ = tokio::time::sleep(delay.to_std().unwrap_or_default()) => {}
                _ = stop.cancelled() => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn event(
        seq: i64,
        kind: &str,
        backend: Option<&str>,
        at_s: i64,
        data: Option<Value>,
    ) -> JobEvent {
        JobEvent {
            seq,
            job_id: None,
            workflow_id: None,
            at: DateTime::from_timestamp(1_800_000_000 + at_s, 0).unwrap(),
            kind: kind.into(),
            status: None,
            backend_id: backend.map(Into::into),
            attempt: None,
            message: Some(format!("{kind} said")),
            data,
        }
    }

    #[test]
    fn a_box_is_told_offline_only_once_down_long_enough_and_then_back() {
        let mut config = Config::default();
        config.alerts.offline_after_s = 300;
        let mut w = Watch::new(&config);
        // Down two minutes (a ComfyUI restart): nothing told.
        assert_eq!(
            w.consider(&event(10, "backend_offline", Some("a"), 0, None)),
            None
        );
        assert_eq!(w.cursor(12), 9, "read again from before it");
        assert!(w.due(event(0, "", None, 120, None).at).is_empty());
        assert_eq!(
            w.consider(&event(13, "backend_online", Some("a"), 120, None)),
            None
        );
        assert_eq!(w.cursor(13), 13);
        // Down for good: told at five minutes, and when back.
        w.consider(&event(20, "backend_offline", Some("a"), 1000, None));
        // A second failed poll's event is not a new outage.
        w.consider(&event(21, "backend_offline", Some("a"), 1010, None));
        assert_eq!(w.next_due(), Some(event(0, "", None, 1300, None).at));
        let told = w.due(event(0, "", None, 1300, None).at);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!((told[0].kind, told[0].seq), ("backend_offline", 20));
        assert!(
            told[0]
                .text
                .starts_with("backend a has been offline since "),
            "{}",
            told[0].text
        );
        assert_eq!(
            w.consider(&event(22, "backend_offline", Some("a"), 1400, None)),
            None
        );
        assert!(
            w.due(event(0, "", None, 9000, None).at).is_empty(),
            "told once"
        );
        let back = w
            .consider(&event(30, "backend_online", Some("a"), 2000, None))
            .unwrap();
        assert_eq!(back.kind, "backend_back");
    }

    #[test]
    fn a_batch_paused_by_the_farm_is_told_once_not_once_a_job() {
        let mut w = Watch::new(&Config::default());
        let paused = |seq, by: &str| {
            let mut e = event(
                seq,
                "paused",
                None,
                0,
                Some(json!({"batch": "night1", "by": by})),
            );
            e.message =
                Some("paused with its batch (batch night1): 5 of its jobs in a row failed".into());
            e
        };
        let told = w.consider(&paused(1, "farm")).unwrap();
        assert_eq!(
            told.text,
            "batch night1 was paused by the farm: 5 of its jobs in a row failed"
        );
        assert_eq!(told.batch.as_deref(), Some("night1"));
        assert_eq!(w.consider(&paused(2, "farm")), None);
        // A user's pause is the user's business.
        let mut w = Watch::new(&Config::default());
        assert_eq!(w.consider(&paused(3, "user")), None);
    }
}
