//! `orchestrator jobs --count`: how far a batch got, in a few lines.
//!
//! Why its own file: the morning's question (how many done, when the rest
//! end, why some failed, why the rest wait) reads one answer of the
//! server's and says it for people; the listing beside it reads pages.

use super::{encode, Remote};

/// How many jobs the query matches, by status, in a line; then when the
/// first was submitted and the last finished, when the rest would end at
/// the present pace, and why those that failed failed.
pub(super) async fn print_counts(remote: &Remote, q: Vec<(String, String)>) -> anyhow::Result<()> {
    let c = remote
        .get(&format!("/api/jobs/counts?{}", encode(q)))
        .await?;
    if remote.json {
        println!("{c}");
        return Ok(());
    }
    let total = c["total"].as_i64().unwrap_or(0);
    let mut parts = Vec::new();
    for status in crate::store::JobStatus::ALL {
        let n = c["jobs"][status.as_str()].as_i64().unwrap_or(0);
        if n == 0 {
            continue;
        }
        parts.push(format!("{n} {}", status.as_str()));
    }
    let s = if total == 1 { "" } else { "s" };
    let paused = match c["paused"].as_i64().unwrap_or(0) {
        0 => String::new(),
        n => format!(" ({n} of them paused)"),
    };
    match parts.is_empty() {
        true => println!("{total} job{s}"),
        false => println!("{total} job{s}: {}{paused}", parts.join(", ")),
    }
    let time = |f: &str| {
        let t = c[f].as_str().unwrap_or("");
        t.get(..19).unwrap_or(t).replace('T', " ")
    };
    if total > 0 {
        let last = match c["last_finished_at"].is_string() {
            true => format!(", the last finished at {}", time("last_finished_at")),
            false => String::new(),
        };
        println!(
            "the first submitted at {}{last}",
            time("first_submitted_at")
        );
    }
    if c["estimated_end"].is_string() {
        println!(
            "the rest end about {}, at the pace since {} ({} ended)",
            time("estimated_end"),
            time("pace_since"),
            c["ended_recently"]
        );
    }
    if let Some(held) = c["held"]["message"].as_str() {
        println!("{held}");
    }
    if let Some(why) = c["waiting"]["waiting_for"].as_str() {
        println!(
            "the queued ones wait: {why} (the newest, {})",
            c["waiting"]["job_id"].as_str().unwrap_or("")
        );
    }
    let failures = c["failures"].as_array().cloned().unwrap_or_default();
    if !failures.is_empty() {
        println!("why they failed:");
        for f in failures {
            println!(
                "{:>6}  {}  (e.g. {})",
                f["jobs"].as_i64().unwrap_or(0),
                f["cause"].as_str().unwrap_or(""),
                f["example"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
