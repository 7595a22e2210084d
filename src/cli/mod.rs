//! The command-line client: talks to a running orchestrator over HTTP.
//!
//! Why in the same binary: a farm operator has one thing to install. Every
//! command prints something a person can read (tables, progress bars, the
//! server's error sentence) and, with `--json`, what a script can parse.
//! A server error exits non-zero. `watch`, the one command that follows
//! the live events, is in `watch.rs`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

mod actions;
mod counts;
mod outputs;
mod watch;

pub use actions::{job_action, job_ids, resume_batch, schedule, set_paused, set_priority};

pub use outputs::{outputs, OutputsArgs};
pub use watch::watch;

/// How to reach the orchestrator.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Base URL, like `http://127.0.0.1:9800`.
    pub url: String,
    /// Bearer token, when the server wants one.
    pub token: Option<String>,
    /// Print raw JSON instead of tables.
    pub json: bool,
}

impl Remote {
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("http client")
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .client()
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Sends a request; a `2xx` answer as it came (a file is streamed from
    /// it), any other as the error of the server's sentence.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let r = req
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the orchestrator at {}: {e}", self.url))?;
        let status = r.status();
        if status.is_success() {
            return Ok(r);
        }
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        bail!("{message}");
    }

    /// Sends a request and reads its JSON answer; a non-2xx answer becomes
    /// the server's sentence.
    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.send(req).await?.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.request(reqwest::Method::GET, path)).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(self.request(reqwest::Method::POST, path).json(&body))
            .await
    }

    /// Stores a file as an input (`POST /api/inputs`); its input id.
    async fn upload(&self, path: &std::path::Path) -> anyhow::Result<String> {
        let bytes = tokio::fs::read(path).await?;
        let content_type = crate::inputs::sniff(&bytes).unwrap_or("application/octet-stream");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let answer = self
            .call(
                self.request(reqwest::Method::POST, "/api/inputs")
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .header("x-filename", name)
                    .body(bytes),
            )
            .await?;
        answer["input_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("the orchestrator answered no input_id: {answer}"))
    }
}

/// Lets a client command whose output is piped into `head` end quietly
/// when the reader goes, as other tools do, rather than panic on a closed
/// pipe (Rust ignores SIGPIPE). Not for the servers: to them a peer that
/// went is an error of that connection only. Call before any thread starts.
pub fn end_quietly_when_the_reader_goes() {
    // SAFETY: sets one signal's disposition to its default, before the
    // runtime's threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `--param name=value`: the value as JSON when it parses (numbers, booleans), else text.
pub fn parse_pair(pair: &str) -> anyhow::Result<(String, Value)> {
    let (k, v) = pair
        .split_once('=')
        .ok_or_else(|| anyhow!("`{pair}` is not name=value"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

/// What `submit` was given.
pub struct SubmitArgs {
    /// A manifest file (JSON).
    pub file: Option<PathBuf>,
    /// A workflow id instead of a file.
    pub workflow: Option<String>,
    /// `name=value` parameters.
    pub params: Vec<String>,
    /// `key=value` metadata.
    pub meta: Vec<String>,
    /// Priority.
    pub priority: Option<i64>,
    /// Store it paused.
    pub paused: bool,
    /// No backend takes it before this time (RFC 3339).
    pub start_after: Option<String>,
}

/// Submits a manifest; prints the job id (or the answer as JSON).
pub async fn submit(remote: &Remote, args: SubmitArgs) -> anyhow::Result<()> {
    let mut manifest = match &args.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?
        }
        None => json!({}),
    };
    if args.workflow.is_none() && as_graph(&manifest) {
        // A graph saved from ComfyUI (\"Save (API)\", or its UI format,
        // which the server names as such): the job runs it as it is.
        manifest = json!({ "workflow": manifest });
    }
    let m = manifest
        .as_object_mut()
        .ok_or_else(|| anyhow!("the manifest must be a JSON object"))?;
    if let Some(w) = args.workflow {
        m.insert("workflow_id".into(), json!(w));
    }
    if !m.contains_key("workflow_id") && !m.contains_key("workflow") && !m.contains_key("prompt") {
        match &args.file {
            Some(path) => bail!(
                "{} is neither a manifest (it has no `workflow_id` or `workflow`) nor a graph saved from ComfyUI with \"Save (API)\"; or give --workflow ID",
                path.display()
            ),
            None => bail!("give a manifest file or --workflow ID"),
        }
    }
    for (field, pairs) in [("parameters", &args.params), ("metadata", &args.meta)] {
        if pairs.is_empty() {
            continue;
        }
        let entry = m.entry(field).or_insert_with(|| json!({}));
        let obj = entry
            .as_object_mut()
            .ok_or_else(|| anyhow!("{field} must be an object"))?;
        for p in pairs {
            let (k, v) = parse_pair(p)?;
            obj.insert(k, v);
        }
    }
    if let Some(p) = args.priority {
        m.insert("priority".into(), json!(p));
    }
    if args.paused {
        m.insert("paused".into(), json!(true));
    }
    if let Some(t) = args.start_after {
        m.insert("start_after".into(), json!(t));
    }
    // `-p image=@frame.png`: the file is uploaded first, and its input id used.
    let base = args
        .file
        .as_ref()
        .and_then(|f| f.parent())
        .map(PathBuf::from);
    let mut uploaded = std::collections::HashMap::new();
    for (field, name) in crate::inputs::file_refs(&manifest) {
        let path = match &base {
            Some(dir) if !std::path::Path::new(&name).is_absolute() => dir.join(&name),
            _ => PathBuf::from(&name),
        };
        if !path.is_file() {
            continue;
        }
        let id = remote
            .upload(&path)
            .await
            .with_context(|| format!("{field}: cannot upload {}", path.display()))?;
        uploaded.insert(name, id);
    }
    crate::inputs::replace_file_refs(&mut manifest, |name| uploaded.get(name).cloned());
    let answer = remote.post("/api/job", manifest).await?;
    if remote.json {
        println!("{answer}");
    } else {
        println!("{}", answer["job_id"].as_str().unwrap_or(""));
        for w in answer["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", w.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// Whether a file given to `submit` is a ComfyUI graph rather than a
/// manifest: an API-format graph (each node an object with `class_type`),
/// or the UI's format (`nodes` and `links`). A manifest has neither.
fn as_graph(file: &Value) -> bool {
    let Some(m) = file.as_object() else {
        return false;
    };
    let api = !m.is_empty()
        && m.values()
            .all(|node| node.get("class_type").is_some_and(Value::is_string));
    api || (m.contains_key("nodes") && m.contains_key("links"))
}

fn progress_text(job: &Value) -> String {
    let p = &job["progress"];
    match (p["value"].as_f64(), p["max"].as_f64()) {
        (Some(v), Some(m)) if p["node"].is_string() => format!("{} {v}/{m}", node_text(p)),
        _ if p["node"].is_string() => node_text(p),
        _ => String::new(),
    }
}

/// The node a progress value is at: its type and id (`KSampler (node 3)`),
/// or its id alone when the type is not known.
fn node_text(p: &Value) -> String {
    let node = p["node"].as_str().unwrap_or("?");
    match p["node_type"].as_str() {
        Some(t) => format!("{t} (node {node})"),
        None => format!("node {node}"),
    }
}

/// Prints one job.
pub async fn status(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let job = remote.get(&format!("/api/job/{id}")).await?;
    if remote.json {
        println!("{job}");
        return Ok(());
    }
    let field = |k: &str| job[k].as_str().unwrap_or("-").to_string();
    println!("job        {}", field("job_id"));
    println!("status     {}", field("status"));
    println!(
        "workflow   {}",
        job["workflow_id"].as_str().unwrap_or("(inline)")
    );
    println!("backend    {}", field("backend_id"));
    println!("attempts   {} of {}", job["attempts"], job["max_attempts"]);
    println!("submitted  {}", field("submitted_at"));
    if let Some(why) = job["waiting_for"].as_str() {
        println!("waiting    {why}");
    }
    let held = matches!(job["status"].as_str(), Some("assigned" | "running"));
    if job["paused_at"].is_string() && held {
        println!(
            "paused     {} (backend {} is being asked to stop it; it then waits in the queue until `orchestrator resume {id}`)",
            field("paused_at"),
            field("backend_id")
        );
    } else if job["paused_at"].is_string() {
        println!(
            "paused     {} (`orchestrator resume {id}` lets it run)",
            field("paused_at")
        );
    }
    if job["finished_at"].is_string() {
        println!("finished   {}", field("finished_at"));
    }
    let progress = progress_text(&job);
    if !progress.is_empty() {
        println!("progress   {progress}");
    }
    if let Some(e) = job["error"]["message"].as_str() {
        println!("error      {e}");
    }
    for o in job["outputs"].as_array().into_iter().flatten() {
        println!(
            "output     {} ({} bytes) {}/api/job/{id}/outputs/{}",
            o["name"].as_str().unwrap_or(""),
            o["size"],
            remote.url.trim_end_matches('/'),
            o["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Filters of `jobs`.
pub struct JobsArgs {
    /// Statuses.
    pub status: Vec<String>,
    /// Workflow id.
    pub workflow: Option<String>,
    /// Backend id.
    pub backend: Option<String>,
    /// `key=value` metadata filters.
    pub meta: Vec<String>,
    /// Only paused jobs.
    pub paused: bool,
    /// Page size.
    pub limit: u32,
    /// Print only the ids of every matching job (all pages), one a line,
    /// for `cancel`, `retry`, `priority`, `pause` and `resume` to act on a
    /// batch.
    pub ids_only: bool,
    /// Print how many jobs match, by status (every one, not a page).
    pub count: bool,
}

/// Prints the history as a table.
pub async fn jobs(remote: &Remote, args: JobsArgs) -> anyhow::Result<()> {
    let mut q: Vec<(String, String)> = Vec::new();
    if !args.count {
        q.push(("limit".into(), args.limit.to_string()));
    }
    for s in args.status {
        q.push(("status".into(), s));
    }
    if let Some(w) = args.workflow {
        q.push(("workflow_id".into(), w));
    }
    if let Some(b) = args.backend {
        q.push(("backend".into(), b));
    }
    if args.paused {
        q.push(("paused".into(), "true".into()));
    }
    for m in args.meta {
        let (k, v) = m
            .split_once('=')
            .ok_or_else(|| anyhow!("`{m}` is not key=value"))?;
        q.push((format!("metadata.{k}"), v.to_string()));
    }
    if args.ids_only {
        return print_ids(remote, q).await;
    }
    if args.count {
        return counts::print_counts(remote, q).await;
    }
    let page = remote.get(&format!("/api/jobs?{}", encode(q))).await?;
    if remote.json {
        println!("{page}");
        return Ok(());
    }
    println!(
        "{:<36}  {:<10}  {:<16}  {:<10}  {:<20}  PROGRESS / ERROR",
        "JOB", "STATUS", "WORKFLOW", "BACKEND", "SUBMITTED"
    );
    for j in page["jobs"].as_array().into_iter().flatten() {
        let detail = match (j["error"]["message"].as_str(), j["paused_at"].as_str()) {
            // Paused after a failed attempt (a batch paused for failing):
            // the pause first, the attempt's error after it.
            (Some(e), Some(at)) => format!("paused since {}; {e}", at.get(..19).unwrap_or(at)),
            (Some(e), None) => e.to_string(),
            (None, Some(at)) => format!("paused since {}", at.get(..19).unwrap_or(at)),
            (None, None) => match starts_at(j) {
                Some(t) => format!("starts {}", t.get(..19).unwrap_or(t)),
                None => progress_text(j),
            },
        };
        println!(
            "{:<36}  {:<10}  {:<16}  {:<10}  {:<20}  {}",
            j["job_id"].as_str().unwrap_or(""),
            j["status"].as_str().unwrap_or(""),
            j["workflow_id"].as_str().unwrap_or("(inline)"),
            j["backend_id"].as_str().unwrap_or("-"),
            j["submitted_at"]
                .as_str()
                .unwrap_or("")
                .get(..19)
                .unwrap_or(""),
            detail
        );
    }
    if page["next_cursor"].is_string() {
        eprintln!("(more: raise --limit or filter)");
    }
    Ok(())
}

/// The history's filters as a query string.
fn encode(pairs: Vec<(String, String)>) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A name as one path segment of a URL (an output's file name, a batch).
fn encode_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// When a job submitted to start later starts, while that is to come (it
/// has run no attempt: a later `not_before` is a retry's back-off).
fn starts_at(job: &Value) -> Option<&str> {
    let at = job["not_before"].as_str()?;
    let later = crate::store::parse_time(at).is_some_and(|t| t > chrono::Utc::now());
    let untried = job["attempts"].as_i64() == Some(0);
    let waits = matches!(job["status"].as_str(), Some("queued" | "waiting"));
    (later && untried && waits).then_some(at)
}

/// The ids of every job the query matches, newest first, one a line:
/// a page of `limit` at a time, each cursor followed to the end.
async fn print_ids(remote: &Remote, q: Vec<(String, String)>) -> anyhow::Result<()> {
    let mut cursor: Option<String> = None;
    loop {
        let mut pairs = q.clone();
        if let Some(c) = cursor.take() {
            pairs.push(("cursor".into(), c));
        }
        let page = remote.get(&format!("/api/jobs?{}", encode(pairs))).await?;
        for j in page["jobs"].as_array().into_iter().flatten() {
            println!("{}", j["job_id"].as_str().unwrap_or(""));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(()),
        }
    }
}

/// Prints the farm.
pub async fn backends(remote: &Remote) -> anyhow::Result<()> {
    let list = remote.get("/api/backends").await?;
    if remote.json {
        println!("{list}");
        return Ok(());
    }
    println!(
        "{:<12}  {:<8}  {:<9}  {:<8}  {:>6}  {:>12}  LAST ERROR",
        "BACKEND", "STATE", "ADMIN", "VERSION", "JOBS", "VRAM FREE"
    );
    for b in list["backends"].as_array().into_iter().flatten() {
        let vram = b["vram_free"]
            .as_i64()
            .map(|v| format!("{:.1} GiB", v as f64 / 1073741824.0))
            .unwrap_or("-".into());
        println!(
            "{:<12}  {:<8}  {:<9}  {:<8}  {:>6}  {:>12}  {}",
            b["id"].as_str().unwrap_or(""),
            b["state"].as_str().unwrap_or(""),
            b["admin_state"]
                .as_str()
                .unwrap_or(if b["config_enabled"] == true {
                    "enabled"
                } else {
                    "disabled"
                }),
            b["comfyui_version"].as_str().unwrap_or("-"),
            b["active_jobs"],
            vram,
            match (
                b["quarantined_until"].as_str(),
                b["quarantine_reason"].as_str(),
                b["hours"].as_str().filter(|_| b["off_hours"] == true),
            ) {
                (Some(until), Some(why), _) => format!(
                    "in quarantine until {} (enable ends it): {why}",
                    until.get(..19).unwrap_or(until)
                ),
                (_, _, Some(hours)) => format!("outside its hours ({hours}): no new jobs"),
                _ => match b["hours_override_until"].as_str() {
                    Some(until) => format!(
                        "lent outside its hours ({}) until {} UTC",
                        b["hours"].as_str().unwrap_or(""),
                        until.get(..19).unwrap_or(until).replace('T', " ")
                    ),
                    None => b["last_error"].as_str().unwrap_or("").to_string(),
                },
            }
        );
    }
    if let Some(m) = list["message"].as_str() {
        println!("{m}");
    }
    if let Some(by) = list["sharing"]["by"].as_str() {
        let groups: Vec<String> = list["sharing"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                let name = match g["group"].as_str().filter(|n| !n.is_empty()) {
                    Some(n) => n.to_string(),
                    None => format!("without {by}"),
                };
                format!(
                    "{name} {} on the farm, {} queued",
                    g["on_farm"], g["queued"]
                )
            })
            .collect();
        let groups = if groups.is_empty() {
            "no group has work".to_string()
        } else {
            groups.join(" · ")
        };
        println!("shared by {by}, the group with the fewest on the farm next: {groups}");
    }
    Ok(())
}

/// Reads a backend's inventory again and prints what it can run: the
/// answer an operator waits for after copying a model to a box.
pub async fn refresh_backend(remote: &Remote, id: &str) -> anyhow::Result<()> {
    let b = remote
        .post(
            &format!("/api/backends/{id}/refresh"),
            serde_json::json!({}),
        )
        .await?;
    if remote.json {
        println!("{b}");
        return Ok(());
    }
    let inv = &b["inventory"];
    println!(
        "{id}: {} node classes, read {}",
        inv["node_count"],
        inv["read_at"].as_str().unwrap_or("-")
    );
    for (folder, files) in inv["models"].as_object().into_iter().flatten() {
        let files: Vec<&str> = files
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .collect();
        if !files.is_empty() {
            println!("  {folder}: {}", files.join(", "));
        }
    }
    Ok(())
}
