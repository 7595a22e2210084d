//! Input files: the pictures (and videos, sounds) a workflow starts from,
//! stored once under the data folder and named by their SHA-256.
//!
//! Why content-addressed: a storyboard tool uploads the same frame for many
//! shots, and each backend needs each file once; the id (`sha256:<hex>`) is
//! the same wherever the bytes come from, so storing twice is harmless and
//! a job names exactly the bytes it was checked with. A file is written to
//! a temporary name, synced, and renamed: a crash leaves no half file under
//! a real name. Its type is read from its bytes, never taken on trust.
//!
//! Over 600 lines only with its unit tests (they read the rules beside
//! their code): the code is under 600, of one concern, the stored input files.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::Utc;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::store::{InputDeletion, InputRecord, OutputRecord, Store, StoreError};

/// The prefix of an input id.
pub const ID_PREFIX: &str = "sha256:";

/// The hex digest of a well-formed input id.
pub fn hex_of(id: &str) -> Option<&str> {
    let hex = id.strip_prefix(ID_PREFIX)?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// Whether a value is meant as an input id (well-formed or not).
pub fn looks_like_id(value: &str) -> bool {
    value.starts_with(ID_PREFIX)
}

/// The prefix of a reference to another job's output (`job:<id>` for its
/// first picture, `job:<id>/<output name>` for one by name): a second pass
/// of a shot (an upscale, an img2img) submitted with its first.
pub const JOB_PREFIX: &str = "job:";

/// The prefix of a reference to another job's output by the job's
/// idempotency key (`job:key:<key>`, `job:key:<key>/<output name>`): a
/// client that names its jobs (the inbox, a script that resubmits) chains
/// them before it knows their ids.
pub const JOB_KEY_PREFIX: &str = "job:key:";

/// The text after `job:key:` of a reference by key, if it is one. Which
/// part is the key is known only once looked up: a key may hold a `/`
/// (see [`key_readings`]).
pub fn job_key_ref(value: &str) -> Option<&str> {
    let rest = value.strip_prefix(JOB_KEY_PREFIX)?;
    (!rest.is_empty() && rest.len() <= 1024 && !rest.chars().any(char::is_control)).then_some(rest)
}

/// The ways the text of a reference by key reads, in the order they are
/// tried: all of it the key (the job's first picture); or the key, then
/// after its last `/` an output's name.
pub fn key_readings(rest: &str) -> Vec<(String, Option<String>)> {
    let mut readings = vec![(rest.to_string(), None)];
    if let Some((key, name)) = rest.rsplit_once('/') {
        if !key.is_empty() && plain_file_name(name) {
            readings.push((key.to_string(), Some(name.to_string())));
        }
    }
    readings
}

/// Whether a value is meant as a reference to another job's output.
pub fn looks_like_job_ref(value: &str) -> bool {
    value.starts_with(JOB_PREFIX)
}

/// A well-formed reference to another job's output: the job's id and the
/// output's name, if one is given. The id is a UUID and the name a plain
/// file name, so neither can point anywhere but at a stored output.
pub fn job_ref(value: &str) -> Option<(String, Option<String>)> {
    let rest = value.strip_prefix(JOB_PREFIX)?;
    let (id, name) = match rest.split_once('/') {
        Some((id, name)) => (id, Some(name)),
        None => (rest, None),
    };
    let id = uuid::Uuid::parse_str(id).ok()?.hyphenated().to_string();
    match name {
        None => Some((id, None)),
        Some(n) if plain_file_name(n) => Some((id, Some(n.to_string()))),
        Some(_) => None,
    }
}

/// Which of a parent job's outputs a `job:` reference means: the one it
/// names, or else its first picture (a saved one before a preview, by
/// name), or else its only output (a video for a `LoadVideo`); the error
/// says why none can be, listing the job's outputs. Submission and dispatch
/// both ask, so a reference means the same file at either.
pub fn output_of_job<'a>(
    job: &str,
    name: Option<&str>,
    outputs: &'a [OutputRecord],
) -> Result<&'a OutputRecord, String> {
    let names = || {
        let all: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        if all.is_empty() {
            "it has none".to_string()
        } else {
            format!("its outputs: {}", all.join(", "))
        }
    };
    let found = match name {
        Some(n) => outputs
            .iter()
            .find(|o| o.name == n)
            .ok_or_else(|| format!("job {job} has no output named `{n}` ({})", names()))?,
        None => outputs
            .iter()
            .filter(|o| crate::thumbs::of_a_picture(&o.content_type))
            .min_by_key(|o| (o.file_type != "output", o.name.as_str()))
            .or(match outputs {
                [only] => Some(only),
                _ => None,
            })
            .ok_or_else(|| {
                format!(
                    "job {job} has no picture among its outputs to start from ({}); name one as job:{job}/<name>",
                    names()
                )
            })?,
    };
    match found.pruned_at {
        Some(at) => Err(format!(
            "the output {} of job {job} was deleted by retention at {at}",
            found.name
        )),
        None => Ok(found),
    }
}

/// A name with no folder in it and nothing a path could be tricked with.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// A size for people, in MB (MiB, as ComfyUI's `--max-upload-size`
/// counts them), one decimal: `2.9 MB`.
pub fn megabytes(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

/// The types ComfyUI's loaders take, by their first bytes: the MIME type.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    let at = |i: usize, m: &[u8]| head.get(i..i + m.len()) == Some(m);
    Some(if at(0, b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if at(0, b"\xff\xd8\xff") {
        "image/jpeg"
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        "image/webp"
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        "image/gif"
    } else if at(0, b"II*\0") || at(0, b"MM\0*") {
        "image/tiff"
    } else if at(4, b"ftypqt") {
        "video/quicktime"
    } else if at(4, b"ftyp") {
        "video/mp4"
    } else if at(0, b"\x1a\x45\xdf\xa3") {
        "video/webm"
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        "audio/wav"
    } else if at(0, b"ID3") || (head.len() > 1 && head[0] == 0xff && head[1] & 0xe0 == 0xe0) {
        "audio/mpeg"
    } else if at(0, b"fLaC") {
        "audio/flac"
    } else if at(0, b"OggS") {
        "audio/ogg"
    } else {
        return None;
    })
}

/// A claimed type in the spelling `sniff` uses (`image/jpg` → `image/jpeg`).
fn canonical(claimed: &str) -> String {
    let t = claimed
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match t.as_str() {
        "image/jpg" | "image/pjpeg" => "image/jpeg".into(),
        "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => "audio/wav".into(),
        "audio/x-flac" => "audio/flac".into(),
        "audio/mp3" => "audio/mpeg".into(),
        "video/x-matroska" => "video/webm".into(),
        "audio/mp4" | "video/x-m4v" => "video/mp4".into(),
        _ => t,
    }
}

/// The file extension ComfyUI's loaders expect for a type.
pub fn extension(content_type: &str) -> &'static str {
    match content_type {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        "image/tiff" => "tiff",
        "video/quicktime" => "mov",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "audio/wav" => "wav",
        "audio/mpeg" => "mp3",
        "audio/flac" => "flac",
        "audio/ogg" => "ogg",
        _ => "bin",
    }
}

/// Why a file was not stored.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Over `limits.max_input_bytes`.
    #[error("the file is larger than limits.max_input_bytes ({0} bytes)")]
    TooLarge(u64),
    /// No bytes.
    #[error("the file is empty")]
    Empty,
    /// Not a type ComfyUI loads.
    #[error("the file is not a picture, video or sound ComfyUI loads (PNG, JPEG, WebP, GIF, TIFF, MP4, MOV, WebM, WAV, MP3, FLAC, OGG)")]
    Unsupported,
    /// The bytes are of another type than claimed.
    #[error("the file's bytes are {found}, not {claimed} as its Content-Type says")]
    Mismatch {
        /// What the client said.
        claimed: String,
        /// What the bytes are.
        found: String,
    },
    /// Reading the upload failed (it broke off), or reading a dropped file.
    #[error("{0}")]
    Io(String),
    /// Writing the file here failed: this machine's fault, not the
    /// client's. `full`: its disk is full (or the quota spent), to be
    /// retried once space is freed.
    #[error("{message}")]
    Disk {
        /// What failed, and why.
        message: String,
        /// The disk is full.
        full: bool,
    },
    /// The database refused the record.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl InputError {
    /// A write of the file that failed with `e`.
    fn disk(what: &str, e: std::io::Error) -> InputError {
        let full = crate::retention::disk_full(&e);
        let message = if full {
            format!("{what}: the data folder's disk is full ({e}); nothing was stored. Free space and retry")
        } else {
            format!("{what}: {e}")
        };
        InputError::Disk { message, full }
    }

    /// The HTTP status a front door answers with.
    pub fn status(&self) -> u16 {
        match self {
            InputError::TooLarge(_) => 413,
            InputError::Unsupported => 415,
            InputError::Empty | InputError::Mismatch { .. } => 422,
            InputError::Io(_) => 400,
            InputError::Disk { full: true, .. } => 503,
            InputError::Disk { full: false, .. } => 500,
            InputError::Store(StoreError::Full | StoreError::Closed) => 503,
            InputError::Store(_) => 503,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            InputError::TooLarge(_) => "payload_too_large",
            InputError::Unsupported => "unsupported_media_type",
            InputError::Empty | InputError::Mismatch { .. } => "validation_failed",
            InputError::Io(_) => "bad_request",
            InputError::Disk { full: true, .. } => "storage_full",
            InputError::Disk { full: false, .. } => "internal_error",
            InputError::Store(StoreError::Full) => "storage_full",
            InputError::Store(_) => "database_unavailable",
        }
    }
}

/// A file written to a temporary name, hashed and typed: not an input yet.
#[derive(Debug)]
pub struct Staged {
    /// Its SHA-256, hex.
    pub hex: String,
    /// Bytes.
    pub size: u64,
    /// Its type, read from its bytes.
    pub content_type: String,
    /// The name it came with.
    pub filename: Option<String>,
    tmp: PathBuf,
}

impl Staged {
    /// Its id, once stored.
    pub fn id(&self) -> String {
        format!("{ID_PREFIX}{}", self.hex)
    }
}

/// The input folder and its records. Cheap to clone.
#[derive(Clone)]
pub struct Inputs {
    dir: PathBuf,
    store: Store,
    max_bytes: u64,
}

/// A file name from a client made harmless: its last component, at most
/// 200 characters, or nothing.
fn clean_name(name: Option<String>) -> Option<String> {
    let name = name?;
    let base = name.rsplit(['/', '\\']).next().unwrap_or("").trim();
    let base: String = base.chars().filter(|c| !c.is_control()).take(200).collect();
    (!base.is_empty() && base != "." && base != "..").then_some(base)
}

impl Inputs {
    /// The input folder under the data folder.
    pub fn new(dir: PathBuf, store: Store, max_bytes: u64) -> Inputs {
        Inputs {
            dir,
            store,
            max_bytes,
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a stored input's bytes are (`None` for a malformed id).
    pub fn path_of(&self, id: &str) -> Option<PathBuf> {
        hex_of(id).map(|hex| self.dir.join(hex))
    }

    /// Writes a stream to a temporary file, hashing and typing it on the
    /// way; refuses it when it is too large, empty, not a type ComfyUI
    /// loads, or not the type `claimed`.
    pub async fn stage<E: std::fmt::Display>(
        &self,
        mut body: impl Stream<Item = Result<Bytes, E>> + Unpin,
        claimed: Option<&str>,
        filename: Option<String>,
    ) -> Result<Staged, InputError> {
        let io = |e: std::io::Error| InputError::disk("cannot write the file", e);
        tokio::fs::create_dir_all(&self.dir).await.map_err(io)?;
        let tmp = self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let staged = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            let mut head: Vec<u8> = Vec::with_capacity(16);
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| InputError::Io(format!("the upload broke off: {e}")))?;
                size += chunk.len() as u64;
                if size > self.max_bytes {
                    return Err(InputError::TooLarge(self.max_bytes));
                }
                if head.len() < 16 {
                    head.extend(chunk.iter().take(16 - head.len()));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(io)?;
            }
            if size == 0 {
                return Err(InputError::Empty);
            }
            let found = sniff(&head).ok_or(InputError::Unsupported)?;
            if let Some(claimed) = claimed.map(canonical) {
                let generic = claimed.is_empty() || claimed == "application/octet-stream";
                if !generic && claimed != found {
                    return Err(InputError::Mismatch {
                        claimed,
                        found: found.to_string(),
                    });
                }
            }
            // A tokio file writes in the background: a write that failed
            // (the disk full) is told by `flush`, and only by it;
            // `sync_all` alone would sync what was written and say nothing.
            file.flush().await.map_err(io)?;
            file.sync_all().await.map_err(io)?;
            Ok(Staged {
                hex: format!("{:x}", hasher.finalize()),
                size,
                content_type: found.to_string(),
                filename: clean_name(filename),
                tmp: tmp.clone(),
            })
        }
        .await;
        if staged.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        staged
    }

    /// Gives a staged file its real name and records it; `true` when it
    /// was not stored before.
    pub async fn commit(&self, staged: Staged) -> Result<(InputRecord, bool), InputError> {
        let io = |e: std::io::Error| InputError::disk("cannot store the file", e);
        // A deletion of the same bytes under way ends first: its file
        // removal cannot follow this rename.
        let _named = self.store.name_inputs(&[staged.id()]).await;
        let path = self.dir.join(&staged.hex);
        tokio::fs::rename(&staged.tmp, &path).await.map_err(io)?;
        // The rename itself reaches the disk too.
        if let Ok(dir) = tokio::fs::File::open(&self.dir).await {
            let _ = dir.sync_all().await;
        }
        let now = Utc::now();
        let record = InputRecord {
            id: staged.id(),
            size: staged.size as i64,
            content_type: staged.content_type,
            filename: staged.filename,
            created_at: now,
            last_used_at: now,
        };
        let created = self.store.add_input(record.clone()).await?;
        let stored = self
            .store
            .input(&record.id)
            .await?
            .ok_or_else(|| InputError::Io("the input's record vanished".into()))?;
        Ok((stored, created))
    }

    /// Drops a staged file that is not wanted after all.
    pub async fn discard(&self, staged: Staged) {
        let _ = tokio::fs::remove_file(&staged.tmp).await;
    }

    /// Deletes an input (record and file) unless an unfinished job needs it,
    /// or a submission naming it (or an upload of it) is being stored now.
    pub async fn delete(&self, id: &str) -> Result<InputDeletion, StoreError> {
        // Held until the file is gone: a submission naming it meanwhile
        // waits, then finds it missing.
        let Some(_deleting) = self.store.start_deleting_input(id) else {
            return Ok(InputDeletion::Named);
        };
        let outcome = self.store.delete_input(id).await?;
        if outcome == InputDeletion::Deleted {
            if let Some(path) = self.path_of(id) {
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    tracing::warn!(input_id = id, error = %e, "input record deleted, its file could not be");
                }
            }
        }
        Ok(outcome)
    }

    /// Undoes the storing of inputs that a refused submission brought (only
    /// those it created, and only if nothing else uses them).
    pub async fn forget_new(&self, ids: &[String]) {
        for id in ids {
            if let Err(e) = self.delete(id).await {
                tracing::warn!(input_id = %id, error = %e, "cannot undo a new input");
            }
        }
    }
}

/// The `@NAME` references of a manifest: parameter values (and inline
/// graph input values) that name a file sent beside it, with their fields.
pub fn file_refs(manifest: &serde_json::Value) -> Vec<(String, String)> {
    let mut refs = Vec::new();
    let mut take = |field: String, v: &serde_json::Value| {
        if let Some(name) = v.as_str().and_then(|s| s.strip_prefix('@')) {
            if !name.is_empty() {
                refs.push((field, name.to_string()));
            }
        }
    };
    for (k, v) in manifest["parameters"].as_object().into_iter().flatten() {
        take(format!("parameters.{k}"), v);
    }
    for (node, body) in manifest["workflow"].as_object().into_iter().flatten() {
        for (input, v) in body["inputs"].as_object().into_iter().flatten() {
            take(format!("workflow.{node}.inputs.{input}"), v);
        }
    }
    refs
}

/// Puts input ids in place of `@NAME` references, as `id_of` names them;
/// a reference to no file stays as it is (a prompt may start with `@`).
pub fn replace_file_refs(manifest: &mut serde_json::Value, id_of: impl Fn(&str) -> Option<String>) {
    let mut swap = |v: &mut serde_json::Value| {
        let id = v
            .as_str()
            .and_then(|s| s.strip_prefix('@'))
            .and_then(&id_of);
        if let Some(id) = id {
            *v = serde_json::Value::String(id);
        }
    };
    // `get_mut`, never indexing: a manifest may be any JSON at all.
    if let Some(params) = manifest
        .get_mut("parameters")
        .and_then(|p| p.as_object_mut())
    {
        params.values_mut().for_each(&mut swap);
    }
    if let Some(graph) = manifest.get_mut("workflow").and_then(|w| w.as_object_mut()) {
        for body in graph.values_mut() {
            if let Some(inputs) = body.get_mut("inputs").and_then(|i| i.as_object_mut()) {
                inputs.values_mut().for_each(&mut swap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_read_from_the_bytes() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff(b"\xff\xd8\xff\xe0"), Some("image/jpeg"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Some("audio/wav"));
        assert_eq!(sniff(b"\0\0\0\x20ftypisom"), Some("video/mp4"));
        assert_eq!(sniff(b"\0\0\0\x14ftypqt  "), Some("video/quicktime"));
        assert_eq!(sniff(b"GIF89a"), Some("image/gif"));
        assert_eq!(sniff(b"hello world"), None);
        assert_eq!(canonical("image/JPG; charset=x"), "image/jpeg");
        assert_eq!(extension("image/jpeg"), "jpg");
    }

    #[test]
    fn ids_are_sha256_hex_only() {
        let hex = "a".repeat(64);
        assert_eq!(hex_of(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(hex_of("sha256:../../etc/passwd"), None);
        assert_eq!(hex_of(&format!("sha256:{}", "A".repeat(64))), None);
        assert_eq!(hex_of(&hex), None);
        assert!(looks_like_id("sha256:xyz"));
    }

    #[test]
    fn file_references_are_found_and_replaced_in_parameters_and_graphs() {
        let mut m = serde_json::json!({
            "parameters": {"image": "@frame.png", "prompt": "@artist style", "n": 3},
            "workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "@mask.png"}}}
        });
        let refs = file_refs(&m);
        assert!(refs.contains(&("parameters.image".into(), "frame.png".into())));
        assert!(refs.contains(&("workflow.1.inputs.image".into(), "mask.png".into())));
        replace_file_refs(&mut m, |name| {
            (name == "frame.png").then(|| "sha256:f".into())
        });
        assert_eq!(m["parameters"]["image"], "sha256:f");
        assert_eq!(
            m["workflow"]["1"]["inputs"]["image"], "@mask.png",
            "unknown names stay"
        );
        assert_eq!(
            m["parameters"]["prompt"], "@artist style",
            "text that is no file stays"
        );
    }

    #[test]
    fn any_json_at_all_is_searched_without_a_panic() {
        for mut odd in [
            serde_json::json!([]),
            serde_json::json!(3),
            serde_json::json!({"workflow": [1], "parameters": "x"}),
        ] {
            assert!(file_refs(&odd).is_empty());
            replace_file_refs(&mut odd, |_| Some("id".into()));
        }
    }

    #[test]
    fn client_file_names_keep_their_last_component_only() {
        assert_eq!(
            clean_name(Some("../../x/frame.png".into())),
            Some("frame.png".into())
        );
        assert_eq!(clean_name(Some("..".into())), None);
        assert_eq!(
            clean_name(Some("a\u{7}b.png".into())),
            Some("ab.png".into())
        );
        assert_eq!(clean_name(None), None);
    }

    fn output(name: &str, content_type: &str, file_type: &str) -> OutputRecord {
        OutputRecord {
            name: name.into(),
            kind: "images".into(),
            node_id: "9".into(),
            filename: name.into(),
            subfolder: String::new(),
            file_type: file_type.into(),
            size: 1,
            sha256: "0".repeat(64),
            content_type: content_type.into(),
            pruned_at: None,
        }
    }

    #[test]
    fn a_job_reference_means_the_named_output_or_the_first_saved_picture_or_the_only_one() {
        let outputs = [
            output("b_00001_.png", "image/png", "output"),
            output("a_preview_.png", "image/png", "temp"),
            output("clip_00001_.mp4", "video/mp4", "output"),
            output("a_00001_.png", "image/png", "output"),
        ];
        let pick = |name, outputs: &[OutputRecord]| {
            output_of_job("j", name, outputs).map(|o| o.name.clone())
        };
        assert_eq!(pick(None, &outputs).unwrap(), "a_00001_.png");
        assert_eq!(
            pick(Some("clip_00001_.mp4"), &outputs).unwrap(),
            "clip_00001_.mp4"
        );
        let missing = pick(Some("nope.png"), &outputs).unwrap_err();
        assert!(missing.contains("no output named `nope.png`") && missing.contains("a_00001_.png"));
        // A video job's one output; two videos are for the reference to choose.
        let video = [output("clip_00001_.mp4", "video/mp4", "output")];
        assert_eq!(pick(None, &video).unwrap(), "clip_00001_.mp4");
        let two = [
            video[0].clone(),
            output("clip_00002_.mp4", "video/mp4", "output"),
        ];
        assert!(pick(None, &two)
            .unwrap_err()
            .contains("name one as job:j/<name>"));
        assert!(pick(None, &[]).unwrap_err().contains("it has none"));
        let mut pruned = video.clone();
        pruned[0].pruned_at = Some(chrono::Utc::now());
        assert!(pick(None, &pruned)
            .unwrap_err()
            .contains("deleted by retention"));
    }
}
