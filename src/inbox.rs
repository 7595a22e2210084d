//! The inbox folder: submit a job by dropping a manifest file.
//!
//! Why: some tools (and people) cannot speak HTTP but can write a file into a
//! shared folder. A `*.json` written to the inbox is submitted exactly as
//! `POST /api/job` would, then moved to `accepted/` with the job id in its
//! name, or to `rejected/` beside a `NAME.error.json` holding the error body
//! the API would have answered.
//!
//! Rules that keep it safe:
//! - A file is read only once its size and modification time have not
//!   changed for `inbox.settle_ms`, so a writer that does not use the usual
//!   convention (write `NAME.json.tmp` or `.NAME.json`, then rename) is not
//!   read half-written. Dotfiles, other extensions, sub-folders and links
//!   are never touched.
//! - A crash between storing a job and moving its file cannot submit it
//!   twice: each file's idempotency key is derived from its name, size,
//!   modification time and content, so the next scan finds the stored job.
//!   A file that changed between settling and being read is left to settle
//!   again, so its key and its bytes are always of the same state.
//! - Names come from one directory listing and stay single path components:
//!   nothing can be moved outside the inbox.
//! - File events (the `notify` crate) start a scan at once; a periodic
//!   rescan is the safety net for shares that send no events; a scan at
//!   start-up takes what arrived while the service was down.
//! - A file that starts from a job named by key (`job:key:`) no job has yet
//!   stays, tried again at each scan, for `inbox.key_wait_s`; meanwhile
//!   `GET /api/health` lists it (`inbox_waiting`), so a tool or a person
//!   sees why it is still there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::ErrorBody;
use crate::inputs::{InputError, Inputs};
use crate::submit::{SubmitError, Submitted, Submitter};

/// Sub-folder for submitted files.
pub const ACCEPTED: &str = "accepted";
/// Sub-folder for refused files and their `.error.json`.
pub const REJECTED: &str = "rejected";

/// Most files submitted at once.
const CONCURRENCY: usize = 32;

/// A file left in the inbox until the job it starts from is submitted.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct WaitingFile {
    /// Its name in the inbox.
    pub file: String,
    /// Why it waits: the error it is rejected with if the job never comes.
    pub message: String,
    /// Its modification time, which the wait counts from.
    pub since: chrono::DateTime<chrono::Utc>,
    /// When it is rejected if no job has the key by then
    /// (`inbox.key_wait_s` after `since`); `null` for a file held only
    /// until the service can store it (the data folder's disk full): it
    /// is never rejected for that.
    pub rejected_after: Option<chrono::DateTime<chrono::Utc>>,
}

/// The files waiting now, by name: written by the inbox, read by the
/// health route.
#[derive(Clone, Default)]
pub struct Waiting(Arc<Mutex<BTreeMap<String, WaitingFile>>>);

impl Waiting {
    /// The files waiting now, by name.
    pub fn list(&self) -> Vec<WaitingFile> {
        self.0
            .lock()
            .expect("inbox waiting")
            .values()
            .cloned()
            .collect()
    }

    /// Records a waiting file; whether it was not waiting before.
    fn set(&self, file: WaitingFile) -> bool {
        self.0
            .lock()
            .expect("inbox waiting")
            .insert(file.file.clone(), file)
            .is_none()
    }

    fn clear(&self, name: &str) {
        self.0.lock().expect("inbox waiting").remove(name);
    }

    /// Forgets the files no longer in the folder (taken away by hand).
    fn keep_only(&self, present: &HashSet<String>) {
        self.0
            .lock()
            .expect("inbox waiting")
            .retain(|name, _| present.contains(name));
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
struct Seen {
    size: u64,
    modified: SystemTime,
}

impl Seen {
    fn of(meta: &std::fs::Metadata) -> Seen {
        Seen {
            size: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }
}

/// What the inbox needs: the submit path and the input files.
#[derive(Clone)]
pub struct Inbox {
    /// Submits the manifests.
    pub submitter: Submitter,
    /// Stores the files a manifest names beside it.
    pub inputs: Inputs,
    /// The files waiting for the job they start from.
    pub waiting: Waiting,
}

/// Watches and drains the inbox until `stop`.
pub async fn run(inbox: Inbox, dir: PathBuf, stop: CancellationToken) {
    let submitter = &inbox.submitter;
    let settle = Duration::from_millis(submitter.config.inbox.settle_ms);
    let rescan = Duration::from_millis(submitter.config.inbox.rescan_interval_ms);
    for sub in [ACCEPTED, REJECTED] {
        if let Err(e) = tokio::fs::create_dir_all(dir.join(sub)).await {
            tracing::error!(dir = %dir.display(), error = %e, "cannot create the inbox folders; inbox off");
            return;
        }
    }
    let kick = Arc::new(Notify::new());
    let watcher_kick = kick.clone();
    // Kept alive for the loop's lifetime; without events, the rescan still works.
    let _watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own scans open the folder: access events must not start another scan.
        if let Ok(e) = &event {
            if matches!(e.kind, notify::EventKind::Access(_)) {
                return;
            }
        }
        watcher_kick.notify_one();
    }) {
        Ok(mut w) => {
            use notify::Watcher;
            if let Err(e) = w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "no file events for the inbox; rescanning only");
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher; the inbox is rescanned periodically");
            None
        }
    };
    tracing::info!(dir = %dir.display(), "watching the inbox folder");
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let waiting = scan(&inbox, &dir, settle, &mut seen, &busy, &mut tasks).await;
        // Files still settling are looked at again soon; otherwise wait for an event.
        let wait = if waiting {
            settle.min(rescan) / 2
        } else {
            rescan
        };
        tokio::select! {
            _ = kick.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = stop.cancelled() => break,
        }
    }
    // Files being submitted finish (each is one short write); the rest wait for the next start.
    while tasks.join_next().await.is_some() {}
}

/// The manifest files in the folder now, with their size and time. Runs
/// on a blocking thread: directory reads must not stall the runtime (a
/// network share can take seconds).
fn list(dir: &Path) -> std::io::Result<Vec<(String, Seen)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".json") || name.ends_with(".error.json") {
            continue;
        }
        // symlink_metadata: a link is never followed out of the inbox.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        found.push((name, Seen::of(&meta)));
    }
    Ok(found)
}

/// One pass over the folder. Returns whether some file is still settling.
async fn scan(
    inbox: &Inbox,
    dir: &Path,
    settle: Duration,
    seen: &mut HashMap<String, Seen>,
    busy: &Arc<Mutex<HashSet<String>>>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> bool {
    let listed = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || list(&dir)).await
    };
    let entries = match listed {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the inbox");
            return false;
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "listing the inbox failed");
            return false;
        }
    };
    let mut present = HashSet::new();
    let mut settling = false;
    for (name, now) in entries {
        present.insert(name.clone());
        let stable = seen.get(&name) == Some(&now)
            && now
                .modified
                .elapsed()
                .map(|age| age >= settle)
                .unwrap_or(true);
        seen.insert(name.clone(), now);
        if !stable {
            settling = true;
            continue;
        }
        if !busy.lock().expect("inbox").insert(name.clone()) {
            continue;
        }
        while tasks.len() >= CONCURRENCY {
            tasks.join_next().await;
        }
        let (inbox, dir, busy) = (inbox.clone(), dir.to_path_buf(), busy.clone());
        tasks.spawn(async move {
            take(&inbox, &dir, &name, now).await;
            busy.lock().expect("inbox").remove(&name);
        });
    }
    seen.retain(|name, _| present.contains(name));
    inbox.waiting.keep_only(&present);
    settling
}

/// Why a file was refused: as the API would answer it.
struct Refusal {
    status: u16,
    body: ErrorBody,
}

impl From<SubmitError> for Refusal {
    fn from(e: SubmitError) -> Refusal {
        Refusal {
            status: e.status(),
            body: ErrorBody::of_submit(&e),
        }
    }
}

fn refusal(status: u16, code: &str, message: String) -> Refusal {
    Refusal {
        status,
        body: ErrorBody {
            error: crate::api::ErrorDetail {
                code: code.into(),
                message,
                field: None,
            },
        },
    }
}

/// The files beside a manifest that it names (`"image": "@frame.png"`),
/// stored as inputs and put in place of their names. Returns the files
/// taken, and the inputs this created (undone if the job is refused).
async fn attach(
    inputs: &Inputs,
    dir: &Path,
    manifest: &mut Value,
) -> Result<(Vec<String>, Vec<String>), Refusal> {
    let mut taken = Vec::new();
    let mut ids = std::collections::HashMap::new();
    let mut created = Vec::new();
    for (field, name) in crate::inputs::file_refs(manifest) {
        // Only a plain file right beside the manifest: never a path out of the inbox.
        let plain = !name.contains(['/', '\\']) && !name.starts_with('.') && name != "..";
        let path = dir.join(&name);
        let is_file = plain
            && tokio::fs::symlink_metadata(&path)
                .await
                .is_ok_and(|m| m.file_type().is_file());
        if !is_file || ids.contains_key(&name) {
            continue;
        }
        let stored = async {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| InputError::Io(e.to_string()))?;
            let stream = tokio_util::io::ReaderStream::new(file);
            let staged = inputs.stage(stream, None, Some(name.clone())).await?;
            inputs.commit(staged).await
        }
        .await;
        match stored {
            Ok((record, new)) => {
                if new {
                    created.push(record.id.clone());
                }
                ids.insert(name.clone(), record.id);
                taken.push(name);
            }
            Err(e) => {
                inputs.forget_new(&created).await;
                let mut r = refusal(e.status(), e.code(), format!("{field}: {name}: {e}"));
                r.body.error.field = Some(field);
                return Err(r);
            }
        }
    }
    crate::inputs::replace_file_refs(manifest, |name| ids.get(name).cloned());
    Ok((taken, created))
}

/// Moves the files a manifest took along with it (into `accepted/` or `rejected/`).
async fn move_files(dir: &Path, sub: &str, prefix: &str, files: &[String]) {
    for f in files {
        let dest = free_name(&dir.join(sub), &format!("{prefix}{f}")).await;
        if let Err(e) = tokio::fs::rename(dir.join(f), &dest).await {
            tracing::error!(file = %f, error = %e, "cannot move a file a manifest named");
        }
    }
}

/// Submits one settled file and moves it.
async fn take(inbox: &Inbox, dir: &Path, name: &str, seen: Seen) {
    let submitter = &inbox.submitter;
    let mut taken: Vec<String> = Vec::new();
    let path = dir.join(name);
    let limit = submitter.config.limits.max_body_bytes as u64;
    let outcome: Result<Submitted, Refusal> = if seen.size > limit {
        Err(refusal(
            413,
            "payload_too_large",
            format!(
                "the file is {} bytes, more than limits.max_body_bytes ({limit})",
                seen.size
            ),
        ))
    } else {
        match tokio::fs::read(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read an inbox file; it stays there");
                return;
            }
            // What was read must be the file that settled: a writer that
            // paused longer than `settle_ms` right after creating the file
            // can have written it since. Its key would then be made of one
            // state and its bytes of another, and after a crash before the
            // move the next start would key it anew and submit it twice.
            // Left for the next scan, which sees it change and settle again.
            Ok(bytes) if !still(&path, seen, bytes.len()).await => {
                tracing::debug!(file = %path.display(), "inbox file changed while read; it settles again");
                return;
            }
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Err(e) => Err(refusal(
                    400,
                    "malformed_json",
                    format!("the file is not valid JSON: {e}"),
                )),
                Ok(mut manifest) => {
                    if let Some(m) = manifest.as_object_mut() {
                        if !m.contains_key("idempotency_key") {
                            m.insert(
                                "idempotency_key".into(),
                                json!(file_key(name, seen, &bytes)),
                            );
                        }
                    }
                    match attach(&inbox.inputs, dir, &mut manifest).await {
                        Err(r) => Err(r),
                        Ok((files, created)) => {
                            taken = files;
                            let submitted = submitter.submit(manifest).await;
                            if submitted.is_err() {
                                inbox.inputs.forget_new(&created).await;
                            }
                            let key_wait = Duration::from_secs(submitter.config.inbox.key_wait_s);
                            match submitted {
                                Err(e @ SubmitError::UnknownKey { .. })
                                    if seen.modified.elapsed().is_ok_and(|age| age < key_wait) =>
                                {
                                    // The job it names may be in this very drop: a later scan
                                    // (the next file moved, or the periodic one) tries again.
                                    wait_for_key(&inbox.waiting, name, seen, key_wait, &e);
                                    return;
                                }
                                other => other.map_err(Refusal::from),
                            }
                        }
                    }
                }
            },
        }
    };
    let held = matches!(&outcome, Err(e) if e.status == 503);
    if !held {
        inbox.waiting.clear(name);
    }
    match outcome {
        Ok(response) => {
            let stem = name.trim_end_matches(".json");
            let dest = dir
                .join(ACCEPTED)
                .join(format!("{stem}.{}.json", response.job_id));
            move_files(
                dir,
                ACCEPTED,
                &format!("{stem}.{}.", response.job_id),
                &taken,
            )
            .await;
            match tokio::fs::rename(&path, &dest).await {
                Ok(()) => {
                    tracing::info!(job_id = %response.job_id, file = %name, "inbox file submitted")
                }
                Err(e) => {
                    tracing::error!(job_id = %response.job_id, file = %name, error = %e, "submitted, but the file could not be moved")
                }
            }
        }
        Err(e) if e.status == 503 => {
            // The disk full, the database closing: the file (and the
            // pictures beside it) stay for a later scan; listed meanwhile.
            let first = inbox.waiting.set(WaitingFile {
                file: name.to_string(),
                message: e.body.error.message.clone(),
                since: chrono::DateTime::<chrono::Utc>::from(seen.modified),
                rejected_after: None,
            });
            if first {
                tracing::warn!(file = %name, error = %e.body.error.message, "inbox file not submitted now; will try again");
            } else {
                tracing::debug!(file = %name, error = %e.body.error.message, "inbox file still not submitted; will try again");
            }
        }
        Err(e) => {
            let dest = free_name(&dir.join(REJECTED), name).await;
            // The manifest moves first: a file another pass already took
            // (its listing was older than the move) leaves nothing behind.
            match tokio::fs::rename(&path, &dest).await {
                Ok(()) => {
                    tracing::warn!(file = %name, error = %e.body.error.message, "inbox file rejected")
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
                Err(err) => {
                    tracing::error!(file = %name, error = %err, "cannot move a rejected inbox file");
                    return;
                }
            }
            let error_file = dest.with_file_name(format!(
                "{}.error.json",
                dest.file_name().and_then(|n| n.to_str()).unwrap_or(name)
            ));
            let stem = name.trim_end_matches(".json");
            move_files(dir, REJECTED, &format!("{stem}."), &taken).await;
            let body = serde_json::to_vec_pretty(&e.body).unwrap_or_default();
            // Written aside, then renamed: a tool watching `rejected/` never
            // reads a half-written error (a test once read it empty).
            let part = error_file.with_file_name(format!(
                ".{}.part",
                error_file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(name)
            ));
            let written = match tokio::fs::write(&part, body).await {
                Ok(()) => tokio::fs::rename(&part, &error_file).await,
                Err(err) => Err(err),
            };
            if let Err(err) = written {
                tracing::error!(file = %name, error = %err, "cannot write the error file");
                let _ = tokio::fs::remove_file(&part).await;
            }
        }
    }
}

/// Records that `name` waits for the job its manifest names by key: said
/// once in the log, and listed by `GET /api/health` until it goes.
fn wait_for_key(waiting: &Waiting, name: &str, seen: Seen, wait: Duration, error: &SubmitError) {
    let since = chrono::DateTime::<chrono::Utc>::from(seen.modified);
    let rejected_after = chrono::Duration::from_std(wait)
        .ok()
        .and_then(|w| since.checked_add_signed(w))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
    let first = waiting.set(WaitingFile {
        file: name.to_string(),
        message: error.to_string(),
        since,
        rejected_after: Some(rejected_after),
    });
    if first {
        tracing::info!(file = %name, error = %error, %rejected_after, "inbox file waits for the job it starts from");
    } else {
        tracing::debug!(file = %name, error = %error, "inbox file still waits for the job it starts from");
    }
}

/// Whether the file is still as it was when it settled, `read` bytes long.
async fn still(path: &Path, seen: Seen, read: usize) -> bool {
    tokio::fs::symlink_metadata(path)
        .await
        .is_ok_and(|meta| Seen::of(&meta) == seen && read as u64 == seen.size)
}

/// The idempotency key of one dropped file: the same file seen again after a
/// crash gets the same key; the same content dropped again later does not.
fn file_key(name: &str, seen: Seen, bytes: &[u8]) -> String {
    let mtime = seen
        .modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(mtime.to_le_bytes());
    h.update(seen.size.to_le_bytes());
    h.update(bytes);
    format!("inbox-{:x}", h.finalize())
}

/// `dir/name`, or `dir/name-N` when taken, so nothing rejected is overwritten.
async fn free_name(dir: &Path, name: &str) -> PathBuf {
    let taken = |p: PathBuf| async move { tokio::fs::try_exists(&p).await.unwrap_or(true) };
    let candidate = dir.join(name);
    if !taken(candidate.clone()).await {
        return candidate;
    }
    let stem = name.trim_end_matches(".json");
    let mut n = 2;
    loop {
        let p = dir.join(format!("{stem}-{n}.json"));
        if !taken(p.clone()).await {
            return p;
        }
        n += 1;
    }
}
