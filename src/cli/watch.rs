//! `orchestrator watch`: the jobs' changes as they happen, until each has
//! ended, and an exit status that says whether they all completed.
//!
//! Why a room of its own: it is the one command that follows a stream
//! (the server's live events) rather than asking once, and the one that
//! draws for a terminal (progress bars) or for a log (a line per change).

use std::collections::HashMap;

use anyhow::{anyhow, bail};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

use super::{node_text, Remote};

/// Live progress bars until every watched job has ended. With no ids,
/// watches the jobs queued or running now.
pub async fn watch(remote: &Remote, ids: Vec<String>) -> anyhow::Result<()> {
    let ids = if ids.is_empty() {
        let page = remote
            .get("/api/jobs?status=queued,assigned,running&limit=1000")
            .await?;
        page["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|j| j["job_id"].as_str().map(str::to_string))
            .collect()
    } else {
        ids
    };
    if ids.is_empty() {
        println!("nothing queued or running");
        return Ok(());
    }
    // Subscribe first, then read the current state: nothing falls in between.
    let mut query = form_urlencoded::Serializer::new(String::new());
    for id in &ids {
        query.append_pair("job_id", id);
    }
    let stream = remote
        .request(
            reqwest::Method::GET,
            &format!("/api/events?{}", query.finish()),
        )
        .send()
        .await
        .map_err(|e| anyhow!("cannot reach the orchestrator at {}: {e}", remote.url))?;
    if !stream.status().is_success() {
        let body: Value = stream.json().await.unwrap_or(Value::Null);
        bail!(
            "{}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("cannot follow events")
        );
    }
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:.bold} {bar:30} {pos:>3}/{len:3} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    // Bars are drawn on a terminal only: in a log, a pipe or a script,
    // each job's changes are lines instead (progress left out).
    let lines = !remote.json && multi.is_hidden();
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut open: Vec<String> = Vec::new();
    let mut finals: Map<String, Value> = Map::new();
    let mut unfinished: Vec<String> = Vec::new();
    let mut end = |id: &str, bar: &ProgressBar, job: &Value| {
        let msg = finish_bar(bar, job);
        if lines {
            println!("{}  {msg}", short(id));
        }
        let status = job["status"].as_str().unwrap_or("").to_string();
        if status != "completed" {
            unfinished.push(format!("{} {status}", short(id)));
        }
        finals.insert(id.to_string(), json!(status));
    };
    for id in &ids {
        let job = remote.get(&format!("/api/job/{id}")).await?;
        let bar = multi.add(ProgressBar::new(1));
        bar.set_style(style.clone());
        bar.set_prefix(short(id));
        let status = job["status"].as_str().unwrap_or("").to_string();
        bar.set_message(status.clone());
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            end(id, &bar, &job);
        } else {
            if lines {
                println!("{}  {}", short(id), where_it_is(&job));
            }
            open.push(id.clone());
        }
        bars.insert(id.clone(), bar);
    }
    let mut body = stream.bytes_stream();
    let mut buf = String::new();
    while !open.is_empty() {
        let Some(chunk) = body.next().await else {
            break;
        };
        let chunk = chunk.map_err(|e| anyhow!("the event stream broke: {e}"))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(cut) = buf.find("\n\n") {
            let block: String = buf.drain(..cut + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let Ok(ev) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            let Some(id) = ev["job_id"].as_str() else {
                continue;
            };
            let Some(bar) = bars.get(id) else { continue };
            let kind = ev["kind"].as_str().unwrap_or("");
            if kind == "progress" {
                let (v, m) = (ev["data"]["value"].as_f64(), ev["data"]["max"].as_f64());
                if let (Some(v), Some(m)) = (v, m) {
                    bar.set_length(m as u64);
                    bar.set_position(v as u64);
                }
                bar.set_message(format!("running, {}", node_text(&ev["data"])));
            } else if matches!(kind, "completed" | "failed" | "cancelled") {
                let job = remote.get(&format!("/api/job/{id}")).await?;
                end(id, bar, &job);
                open.retain(|o| o != id);
            } else if let Some(s) = ev["status"].as_str() {
                // A pause leaves the status as it was: the bar says it.
                bar.set_message(match kind {
                    "paused" => format!("{s}, paused"),
                    "pause_requested" => format!("{s}, pausing"),
                    _ => s.to_string(),
                });
                if lines {
                    let what = ev["message"].as_str().unwrap_or(s);
                    println!("{}  {s}: {what}", short(id));
                }
            }
        }
    }
    if remote.json {
        println!("{}", Value::Object(finals));
    }
    if !open.is_empty() {
        bail!("the event stream ended before {} job(s) did", open.len());
    }
    // A script's `watch ID && next-step` must not go on after a failure.
    if !unfinished.is_empty() {
        bail!(
            "{} of {} job(s) did not complete: {}",
            unfinished.len(),
            ids.len(),
            unfinished.join(", ")
        );
    }
    Ok(())
}

/// A job id as the bars and lines show it: its last 8 characters. A job
/// id is a UUIDv7, whose first characters are its submission time (one for
/// a whole batch submitted within a minute) and whose last ones are random.
fn short(id: &str) -> String {
    let skip = id.chars().count().saturating_sub(8);
    id.chars().skip(skip).collect()
}

/// Where a job stands, in a line: its status, and its backend if it has one.
fn where_it_is(job: &Value) -> String {
    let status = job["status"].as_str().unwrap_or("?");
    match job["backend_id"].as_str() {
        Some(b) if status != "queued" => format!("{status} on {b}"),
        _ => status.to_string(),
    }
}

/// Ends a job's bar with its outcome, and returns that outcome's words.
fn finish_bar(bar: &ProgressBar, job: &Value) -> String {
    let status = job["status"].as_str().unwrap_or("");
    let msg = match job["error"]["message"].as_str() {
        Some(e) if status != "completed" => format!("{status}: {e}"),
        _ => format!(
            "{status} ({} outputs)",
            job["outputs"].as_array().map(|o| o.len()).unwrap_or(0)
        ),
    };
    bar.set_length(1);
    bar.set_position(1);
    bar.finish_with_message(msg.clone());
    msg
}
