//! Collecting a finished prompt's files: downloaded from `/view` into the
//! job's folder, hashed on the way, synced to disk (their bytes, then their
//! names in the folder) before the job is `completed`.
//!
//! Why a `.part` file and a guard: a download cut short (the backend went
//! away, the service stops) must never look like a complete output; the
//! file gets its real name only after its last byte is on disk, and a
//! download that ends early removes its `.part` file, even when its task is
//! dropped mid-way.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::DispatchError;
use crate::comfy::{ComfyClient, OutputFile};
use crate::store::OutputRecord;

/// A file name from a backend made safe: no path, no hidden file, only
/// letters, digits, `.`, `-`, `_`.
pub fn safe_name(untrusted: &str) -> String {
    let base = untrusted.rsplit(['/', '\\']).next().unwrap_or("");
    let mut s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('.') {
        s.remove(0);
    }
    if s.len() > 200 {
        s = s[s.len() - 200..].to_string();
    }
    if s.is_empty() {
        "output".into()
    } else {
        s
    }
}

fn content_type_for(name: &str) -> &'static str {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

/// Removes its file when dropped, unless the download finished.
struct PartFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.keep {
            // Blocking, but one unlink of a file we just wrote; a drop cannot await.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> DispatchError {
    DispatchError::Files(format!("{}: {e}", path.display()))
}

/// A name not yet taken by `records`: `NAME-2.EXT` and so on.
fn unique_name(records: &[OutputRecord], filename: &str) -> String {
    let clean = safe_name(filename);
    let mut name = clean.clone();
    let mut n = 1;
    while records.iter().any(|r| r.name == name) {
        n += 1;
        name = match clean.rsplit_once('.') {
            Some((stem, ext)) => format!("{stem}-{n}.{ext}"),
            None => format!("{clean}-{n}"),
        };
    }
    name
}

/// Downloads every listed file into `dir` and returns their records.
pub(super) async fn collect(
    client: &ComfyClient,
    dir: &Path,
    files: &[OutputFile],
) -> Result<Vec<OutputRecord>, DispatchError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io_error(dir, e))?;
    let mut records: Vec<OutputRecord> = Vec::new();
    for f in files {
        let name = unique_name(&records, &f.filename);
        let mut download = client.view(f).await?;
        let content_type = download
            .content_type
            .take()
            .unwrap_or_else(|| content_type_for(&name).to_string());
        let mut part = PartFile {
            path: dir.join(format!(".{name}.part")),
            keep: false,
        };
        let mut file = tokio::fs::File::create(&part.path)
            .await
            .map_err(|e| io_error(&part.path, e))?;
        let mut hasher = Sha256::new();
        let mut size: i64 = 0;
        while let Some(chunk) = download.chunk().await? {
            hasher.update(&chunk);
            size += chunk.len() as i64;
            file.write_all(&chunk)
                .await
                .map_err(|e| io_error(&part.path, e))?;
        }
        file.sync_all().await.map_err(|e| io_error(&part.path, e))?;
        drop(file);
        let dest = dir.join(&name);
        tokio::fs::rename(&part.path, &dest)
            .await
            .map_err(|e| io_error(&dest, e))?;
        part.keep = true;
        records.push(OutputRecord {
            name,
            kind: f.kind.clone(),
            node_id: f.node_id.clone(),
            filename: f.filename.clone(),
            subfolder: f.subfolder.clone(),
            file_type: f.file_type.clone(),
            size,
            sha256: format!("{:x}", hasher.finalize()),
            content_type,
            pruned_at: None,
        });
    }
    if !records.is_empty() {
        // The renames (and the job's folder, if it is new) reach the disk
        // too before the job says `completed`: after a power cut a completed
        // job's files are where its record says. Both folders in one trip
        // to the blocking pool (each trip wakes a thread); on the 8-backend
        // farm bench the CPU a job stayed within the runs' own spread.
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            [Some(dir.as_path()), dir.parent()]
                .into_iter()
                .flatten()
                .try_for_each(sync_dir)
        })
        .await
        .map_err(|e| DispatchError::Files(format!("syncing the job's folder: {e}")))??;
    }
    Ok(records)
}

/// Syncs a folder's entries (the names in it, not its files' bytes).
fn sync_dir(dir: &Path) -> Result<(), DispatchError> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        // A file system that cannot sync a folder has nothing more to give.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        r => r.map_err(|e| io_error(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_a_backend_cannot_escape_the_job_folder() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_name(".hidden"), "hidden");
        assert_eq!(safe_name("a b$c.png"), "a_b_c.png");
        assert_eq!(safe_name(".."), "output");
        assert_eq!(safe_name("/"), "output");
        assert_eq!(safe_name("orch_00001_.png"), "orch_00001_.png");
    }

    #[test]
    fn a_dropped_part_file_is_removed_and_a_kept_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".a.png.part");
        std::fs::write(&path, b"half").unwrap();
        drop(PartFile {
            path: path.clone(),
            keep: false,
        });
        assert!(!path.exists());
        std::fs::write(&path, b"whole").unwrap();
        drop(PartFile {
            path: path.clone(),
            keep: true,
        });
        assert!(path.exists());
    }
}
