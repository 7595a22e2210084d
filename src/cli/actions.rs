//! What a user does to jobs from the command line: cancel, retry, a new
//! priority or start time, pause and resume, each for one job or a whole
//! batch (several ids, or `-` to read them from `jobs --ids`).
//!
//! Why apart from the rest of the client: these share one way of acting on
//! many jobs (each job on its own, a line each, the failures counted at the
//! end), which the queries beside them do not need.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::Remote;

/// The job ids a command was given; a lone `-` reads them from standard
/// input (whitespace-separated, none at all is fine), so `orchestrator jobs
/// --ids --status failed | orchestrator retry -` retries a whole batch.
pub fn job_ids(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    if args.len() == 1 && args[0] == "-" {
        let text = std::io::read_to_string(std::io::stdin()).context("reading job ids")?;
        return Ok(text.split_whitespace().map(str::to_string).collect());
    }
    Ok(args)
}

/// Does `one` for each job, which returns the line to print. With one job,
/// its line or its error. With several, each line begins with its job's
/// id (not with `--json`: each line is then a JSON object of its own, for
/// a script to read line by line), a job that fails does not stop the
/// rest, and the command fails at the end naming how many did.
pub(super) async fn each_job<F, Fut>(
    remote: &Remote,
    ids: &[String],
    mut one: F,
) -> anyhow::Result<()>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    if let [id] = ids {
        println!("{}", one(id.clone()).await?);
        return Ok(());
    }
    let mut failed = 0;
    for id in ids {
        match one(id.clone()).await {
            Ok(line) if remote.json => println!("{line}"),
            Ok(line) => println!("{id}  {line}"),
            Err(e) => {
                failed += 1;
                eprintln!("{id}  error: {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} jobs failed", ids.len());
    }
    Ok(())
}

/// Cancels jobs (`action` "cancel") or queues them again ("retry").
pub async fn job_action(remote: &Remote, ids: &[String], action: &str) -> anyhow::Result<()> {
    each_job(remote, ids, |id| async move {
        let answer = remote
            .post(&format!("/api/job/{id}/{action}"), json!({}))
            .await?;
        Ok(if remote.json {
            answer.to_string()
        } else {
            format!(
                "{}: {}",
                answer["status"].as_str().unwrap_or(""),
                answer["message"].as_str().unwrap_or("")
            )
        })
    })
    .await
}

/// Gives jobs a new priority and says where that leaves each.
pub async fn set_priority(remote: &Remote, ids: &[String], priority: i64) -> anyhow::Result<()> {
    each_job(remote, ids, |id| async move {
        let job = remote
            .post(
                &format!("/api/job/{id}/priority"),
                json!({ "priority": priority }),
            )
            .await?;
        Ok(where_it_stands(
            remote,
            &job,
            &format!(", priority {priority}"),
        ))
    })
    .await
}

/// Pauses jobs (`action` "pause"; with `interrupt`, those a backend runs
/// too, stopped there) or resumes them ("resume") and says where that
/// leaves each.
pub async fn set_paused(
    remote: &Remote,
    ids: &[String],
    action: &str,
    interrupt: bool,
) -> anyhow::Result<()> {
    let body = if interrupt {
        json!({ "interrupt": true })
    } else {
        json!({})
    };
    each_job(remote, ids, |id| {
        let body = body.clone();
        async move {
            let job = remote
                .post(&format!("/api/job/{id}/{action}"), body)
                .await?;
            let paused = match (job["paused_at"].is_string(), job["backend_id"].as_str()) {
                (true, Some(b))
                    if matches!(job["status"].as_str(), Some("assigned" | "running")) =>
                {
                    format!(", paused: backend {b} is being asked to stop it")
                }
                (true, _) => ", paused".to_string(),
                (false, _) => String::new(),
            };
            Ok(where_it_stands(remote, &job, &paused))
        }
    })
    .await
}

/// Lets a batch go (`resume --batch`): the farm no longer holds it, and
/// its paused jobs are resumed; says which.
pub async fn resume_batch(remote: &Remote, batch: &str) -> anyhow::Result<()> {
    let answer = remote
        .post(
            &format!("/api/batch/{}/resume", super::encode_segment(batch)),
            json!({}),
        )
        .await?;
    if remote.json {
        println!("{answer}");
        return Ok(());
    }
    let field = answer["field"].as_str().unwrap_or("batch");
    let resumed: Vec<&str> = answer["resumed"]
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let held = if answer["released"] == true {
        "the farm no longer holds it: its new jobs run"
    } else {
        "the farm did not hold it"
    };
    match resumed.as_slice() {
        [] => println!("{field} {batch}: {held}; no job of it was paused"),
        ids => {
            println!("{field} {batch}: {held}; {} resumed:", ids.len());
            for id in ids {
                println!("{id}");
            }
        }
    }
    Ok(())
}

/// Gives each job a new start time (`now`: none).
pub async fn schedule(remote: &Remote, ids: &[String], start_after: &str) -> anyhow::Result<()> {
    let at = match start_after {
        "now" => Value::Null,
        t => json!(t),
    };
    each_job(remote, ids, |id| {
        let at = at.clone();
        async move {
            let job = remote
                .post(
                    &format!("/api/job/{id}/schedule"),
                    json!({ "start_after": at }),
                )
                .await?;
            Ok(where_it_stands(remote, &job, ""))
        }
    })
    .await
}

/// A job's line after a change: its status, `detail`, and why it waits.
fn where_it_stands(remote: &Remote, job: &Value, detail: &str) -> String {
    if remote.json {
        return job.to_string();
    }
    let status = job["status"].as_str().unwrap_or("");
    match job["waiting_for"].as_str() {
        Some(why) => format!("{status}{detail}: {why}"),
        None => format!("{status}{detail}"),
    }
}
