//! What the service tells receivers outside it: a job's end to its
//! `callback_url` (webhooks), the night's troubles to whoever looks after
//! the farm (alerts). Why apart: both are delivered alike (signed, timed
//! out, retried by `webhooks.*`), and the config's main file is the
//! farm's.

use serde::{Deserialize, Serialize};

/// Webhook delivery (`callback_url` in a manifest).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// When set, each POST carries `X-Orchestrator-Signature: sha256=HEX`,
    /// the HMAC-SHA256 of the body with this secret.
    pub secret: Option<String>,
    /// Tries before giving up on a receiver.
    pub max_attempts: u32,
    /// First retry delay; doubles per try, capped at 5 minutes.
    pub retry_backoff_ms: u64,
    /// Timeout of one delivery.
    pub timeout_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret: None,
            max_attempts: 10,
            retry_backoff_ms: 1_000,
            timeout_ms: 10_000,
        }
    }
}

/// Alerts: a POST to whoever looks after the farm when the night needs
/// someone (a batch the farm paused, a box in quarantine, a box down a
/// while), rather than a surprise in the morning.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where each alert is POSTed (a JSON body whose `text` a Slack or
    /// Mattermost incoming webhook shows as it is); `None`: no alerts.
    /// Signed, retried and timed out as `webhooks` says.
    pub url: Option<String>,
    /// A backend offline this long is alerted (and again when it is back);
    /// one back sooner (a ComfyUI restart) is not.
    pub offline_after_s: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            url: None,
            offline_after_s: 300,
        }
    }
}
