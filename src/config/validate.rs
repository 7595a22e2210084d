//! Checking a config: the values its types alone cannot rule out, each
//! refusal naming its key (`backends[1].id`, `dispatch.share_by`).
//!
//! Why apart from `mod.rs`: the checks grow with every key, while the
//! settings and their defaults are what a reader of `mod.rs` looks for.

use std::collections::HashSet;

use super::{Config, ConfigError, Hours};

impl Config {
    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        if self.host.trim().is_empty() {
            return invalid("host", "must not be empty");
        }
        if self.limits.max_body_bytes < 1024 {
            return invalid("limits.max_body_bytes", "must be at least 1024");
        }
        if self.database.read_connections == 0 {
            return invalid("database.read_connections", "must be at least 1");
        }
        if self.retention.logs_days == Some(0) {
            return invalid(
                "retention.logs_days",
                "must be at least 1 (null keeps every day's file)",
            );
        }
        if self.database.max_batch == 0 {
            return invalid("database.max_batch", "must be at least 1");
        }
        if !(1..=100).contains(&self.dispatch.default_max_attempts) {
            return invalid("dispatch.default_max_attempts", "must be between 1 and 100");
        }
        if self.dispatch.poll_interval_ms == 0 || self.monitor.poll_interval_ms == 0 {
            return invalid("monitor.poll_interval_ms", "intervals must be above 0");
        }
        if self
            .auth
            .token
            .as_deref()
            .is_some_and(|t| t.trim().len() < 8)
        {
            return invalid("auth.token", "must be at least 8 characters");
        }
        for (i, o) in self.cors.origins.iter().enumerate() {
            if !(o.starts_with("http://") || o.starts_with("https://"))
                || o.parse::<axum::http::HeaderValue>().is_err()
            {
                return invalid(
                    &format!("cors.origins[{i}]"),
                    "must be an origin like http://host:port",
                );
            }
        }
        if let Some(url) = &self.alerts.url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
                Ok(_) => return invalid("alerts.url", "must be an http:// or https:// URL"),
                Err(e) => return invalid("alerts.url", &format!("`{url}` is not a URL: {e}")),
            }
        }
        if self.webhooks.max_attempts == 0 || self.webhooks.timeout_ms == 0 {
            return invalid(
                "webhooks.max_attempts",
                "max_attempts and timeout_ms must be above 0",
            );
        }
        if self.inbox.rescan_interval_ms == 0 {
            return invalid("inbox.rescan_interval_ms", "must be above 0");
        }
        if self.dispatch.request_timeout_ms == 0 {
            return invalid("dispatch.request_timeout_ms", "must be above 0");
        }
        if self.dispatch.quarantine_after > 0 && self.dispatch.quarantine_s == 0 {
            return invalid(
                "dispatch.quarantine_s",
                "must be at least 1 (set dispatch.quarantine_after to 0 to turn quarantine off)",
            );
        }
        if self.dispatch.max_lost_runs == 0 {
            return invalid("dispatch.max_lost_runs", "must be at least 1");
        }
        if !(1..=604_800).contains(&self.dispatch.job_timeout_s) {
            return invalid(
                "dispatch.job_timeout_s",
                "must be between 1 and 604800 (a week)",
            );
        }
        if self.dispatch.heartbeat_ms < 10 || self.dispatch.deaf_after_ms < 10 {
            return invalid(
                "dispatch.heartbeat_ms",
                "heartbeat_ms and deaf_after_ms must be at least 10",
            );
        }
        // Metadata fields that group jobs: a farm's share, a batch.
        let named = [
            ("dispatch.share_by", self.dispatch.share_by.as_deref()),
            (
                "dispatch.batch_field",
                Some(self.dispatch.batch_field.as_str()),
            ),
        ];
        for (key, field) in named {
            if field.is_some_and(|f| f.trim().is_empty() || f.len() > 100) {
                return invalid(
                    key,
                    "must be a metadata field's name (1 to 100 characters), like batch",
                );
            }
        }
        if self.inventory.refresh_interval_s == 0 {
            return invalid("inventory.refresh_interval_s", "must be above 0");
        }
        if self.retention.sweep_interval_s == 0 {
            return invalid("retention.sweep_interval_s", "must be above 0");
        }
        if self.limits.max_input_bytes < 1024 {
            return invalid("limits.max_input_bytes", "must be at least 1024");
        }
        if self.limits.max_backend_reply_bytes < 1024 || self.limits.max_output_bytes < 1024 {
            return invalid(
                "limits.max_backend_reply_bytes",
                "max_backend_reply_bytes and max_output_bytes must be at least 1024",
            );
        }
        let mut seen = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            if b.id.is_empty()
                || !b
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return invalid(
                    &key("id"),
                    "must be non-empty letters, digits, '-', '_' or '.'",
                );
            }
            if !seen.insert(b.id.clone()) {
                return invalid(&key("id"), &format!("duplicate backend id `{}`", b.id));
            }
            if let Some(url) = &b.url {
                if let Some(problem) = url_problem(url) {
                    return invalid(&key("url"), &problem);
                }
            } else if b.host.trim().is_empty() {
                return invalid(&key("host"), "is required (or give the server's `url`)");
            }
            if let Err((field, problem)) = b.header_map() {
                return invalid(&key(&field), &problem);
            }
            if b.port == 0 {
                return invalid(&key("port"), "must be between 1 and 65535");
            }
            if let Some(Err(e)) = b.hours.as_deref().map(str::parse::<Hours>) {
                return invalid(&key("hours"), &e);
            }
            if !(1..=64).contains(&b.max_inflight) {
                return invalid(&key("max_inflight"), "must be between 1 and 64");
            }
        }
        Ok(())
    }
}

/// Why a backend's `url` cannot be used, if it cannot.
fn url_problem(url: &str) -> Option<String> {
    let u = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Some(format!("`{url}` is not a URL: {e}")),
    };
    if !matches!(u.scheme(), "http" | "https") {
        Some("must be an http:// or https:// URL".into())
    } else if u.host_str().is_none_or(str::is_empty) {
        Some("must name a host".into())
    } else if !u.username().is_empty() || u.password().is_some() {
        Some("must not carry credentials: put them in `headers` (an Authorization header)".into())
    } else if u.query().is_some() || u.fragment().is_some() {
        Some("must not have a query or a fragment".into())
    } else {
        None
    }
}
