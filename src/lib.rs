//! orchestrator: a durable job queue and render-farm manager in front of a
//! farm of ComfyUI servers.
//!
//! Artists' tools submit workflow manifests over HTTP; each accepted job is
//! written to SQLite before the answer, so a `2xx` means the job survives a
//! crash. `docs/architecture.md` draws the whole picture (the parts and what
//! each may touch, a job's path, its states, the dispatch protocol, where to
//! add a feature); this page says where things live.
//!
//! - [`config`]: typed settings, validated at start-up.
//! - [`store`]: every SQL query; one writer task with group commit, a read pool.
//! - [`workflows`]: templates (ComfyUI "Save (API)" graphs plus a parameter
//!   declaration) and parameter binding at submit time.
//! - [`manifest`]: the submitted manifest, checked field by field.
//! - [`submit`]: check, bind and store a manifest: the one path of every
//!   front door (HTTP, inbox).
//! - [`api`]: axum routes, the error shape, the OpenAPI document.
//! - [`comfy`]: the ComfyUI protocol (HTTP, WebSocket, what answers mean), no database.
//! - [`simulator`]: a simulated ComfyUI for tests, benchmarks and the demo.
//! - [`inbox`]: submit by dropping manifest files into a folder.
//! - [`inputs`]: the pictures jobs start from, stored once by their SHA-256.
//! - [`inventory`]: what each backend can run (node classes, model files),
//!   for checks at submit, routing, and keeping models loaded.
//! - [`dispatch`]: one worker per backend: lease, submit, follow, collect, reconcile.
//! - [`monitor`]: backend health polling.
//! - [`webhooks`]: callbacks when jobs end, from a durable outbox.
//! - [`retention`]: what the data folder keeps, and its measurement.
//! - [`events`]: live streams (SSE, WebSocket): one reader of the durable
//!   event log fans out to every subscriber.
//! - [`metrics`]: Prometheus metrics.
//! - [`open_files`]: the open-file limit raised at start, and watched.
//! - [`farm`]: the queue sampled each minute, for the farm view.
//! - [`thumbs`]: thumbnails of image outputs, made once and kept beside them.
//! - [`cli`]: the command-line client of a running orchestrator.
//! - [`server`]: start-up (lock file, database, backends), serving, shutdown.
//!
//! The server is a library function, [`server::run`], that takes a bound
//! listener and a shutdown future: `main` parses arguments and calls it, and
//! the tests call the same function on `127.0.0.1:0`.

#![warn(missing_docs)]

pub mod alerts;
pub mod api;
pub mod cli;
pub mod comfy;
pub mod config;
pub mod dispatch;
pub mod events;
pub mod farm;
pub mod inbox;
pub mod inputs;
pub mod inventory;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod open_files;
pub mod periodic;
pub mod retention;
pub mod server;
pub mod simulator;
pub mod store;
pub mod submit;
pub mod thumbs;
pub mod webhooks;
pub mod workflows;

/// An error with its causes, `outer: cause: root cause`: what an operator
/// needs in a stored message. An HTTP client's error alone says "error
/// sending request for url (…)"; why (refused, a certificate no one
/// vouches for, a reset) is in its sources.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}
