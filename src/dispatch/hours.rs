//! Keeps each backend's `off_hours` true to its hours (`backends[].hours`).
//!
//! Why a task of its own: the rules that ask whether a backend may take
//! jobs are SQL (leasing, a retry's avoidance, a job's page), and cannot
//! read the clock in the orchestrator's local time; so the farm writes, at
//! each edge of a backend's window, whether it is outside it. The start
//! writes it before any worker runs (`server.rs`, through the backends'
//! sync); this task sleeps until the next edge of any window (at most a
//! minute: a clock moved by hand, or by daylight saving, is caught up) and
//! rings a backend's worker when its hours begin. An operator's enable
//! outside them lends the backend to the farm until its next hours end
//! ([`super::Farm::admin_changed`]): the store keeps that side until then.

use std::sync::Arc;
use std::time::Duration;

use chrono::Local;

use super::Shared;

/// The longest this task sleeps without looking at the clock again.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Past an edge by this much before looking: a timer may fire a little
/// early, and the window's `contains` would still say the old side.
const PAST_EDGE: Duration = Duration::from_millis(20);

pub(super) async fn keep(shared: Arc<Shared>) {
    let windows: Vec<(String, crate::config::Hours)> = shared
        .config
        .backends
        .iter()
        .filter_map(|b| b.hours().map(|h| (b.id.clone(), h)))
        .collect();
    if windows.is_empty() {
        return;
    }
    // The side last written for each (`None`: not yet by this task): the
    // clock is read every minute, the database written only at a change.
    let mut written: Vec<Option<bool>> = vec![None; windows.len()];
    loop {
        let now = Local::now().naive_local();
        let mut sleep = MAX_SLEEP;
        for ((id, hours), last) in windows.iter().zip(written.iter_mut()) {
            let edge = hours.until_next_edge(now).to_std().unwrap_or_default();
            sleep = sleep.min(edge + PAST_EDGE);
            let off = !hours.contains(now);
            if *last == Some(off) {
                continue;
            }
            match shared
                .store
                .set_off_hours(id, off, &hours.to_string())
                .await
            {
                // Lent by an operator until a time to come: asked again
                // at the next look (the loan ends at an edge).
                Ok(None) => {}
                Ok(Some(changed)) => {
                    *last = Some(off);
                    if !changed {
                        continue;
                    }
                    tracing::info!(backend_id = %id, %hours, off_hours = off, "backend's hours {}", if off { "ended: it takes no new jobs" } else { "began: it takes jobs" });
                    if !off {
                        shared.idle.bell(id).notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(backend_id = %id, error = %e, "cannot record whether the backend is in its hours; trying again in a moment");
                    sleep = sleep.min(Duration::from_secs(1));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

impl super::Farm {
    /// An operator changed a backend's admin state: an enable outside its
    /// hours lends it to the farm until its next hours end (an artist gone
    /// home early: "render on my box now"); a disable or a drain ends such
    /// a loan. A backend without hours: nothing to do.
    pub async fn admin_changed(
        &self,
        id: &str,
        admin: crate::store::AdminState,
    ) -> Result<(), crate::store::StoreError> {
        let Some(backend) = self.shared.config.backends.iter().find(|b| b.id == id) else {
            return Ok(());
        };
        let Some(hours) = backend.hours() else {
            return Ok(());
        };
        let now = Local::now();
        let off = !hours.contains(now.naive_local());
        let until = (admin == crate::store::AdminState::Enabled && off).then(|| {
            let end = hours.next_end(now.naive_local());
            end.and_local_timezone(Local)
                .earliest()
                .unwrap_or_else(|| now + (end - now.naive_local()))
                .with_timezone(&chrono::Utc)
        });
        if self
            .shared
            .store
            .lend_outside_hours(id, until, off, &hours.to_string())
            .await?
        {
            match until {
                Some(t) => {
                    tracing::info!(backend_id = %id, %hours, until = %t, "backend lent to the farm outside its hours by an operator")
                }
                None => {
                    tracing::info!(backend_id = %id, %hours, off_hours = off, "backend's loan outside its hours ended by an operator")
                }
            }
        }
        Ok(())
    }
}
