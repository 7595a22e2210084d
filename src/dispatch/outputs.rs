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
    let said = format!("{}: {e}", path.display());
    if crate::retention::disk_full(&e) {
        DispatchError::DiskFull(said)
    } else {
        DispatchError::Files(said)
    }
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

/// How much of a download is held before it is written.
///
/// Why: each write through `tokio::fs` is a trip to the blocking pool (a
/// thread woken, the task woken again), and a download arrives in network
/// reads of a few to some tens of kilobytes: a 1.5 MB image was a hundred
/// trips. Held in pieces of this size, a file that fits (previews, small
/// renders) is written, synced and named in one trip, and a larger one
/// costs one trip a piece; memory stays bounded by one piece a download.
const PIECE: usize = 256 * 1024;

/// Runs file work on the blocking pool: the async runtime does no file I/O.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DispatchError> + Send + 'static,
) -> Result<T, DispatchError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DispatchError::Files(format!("a file task ended early: {e}")))?
}

/// Appends `bytes` to the `.part` file, creating it (and the job's
/// folder) on the first piece. Blocking.
fn write_piece(
    file: Option<std::fs::File>,
    path: &Path,
    bytes: &[u8],
) -> Result<std::fs::File, DispatchError> {
    use std::io::Write;
    let mut file = match file {
        Some(f) => f,
        None => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
            }
            std::fs::File::create(path).map_err(|e| io_error(path, e))?
        }
    };
    file.write_all(bytes).map_err(|e| io_error(path, e))?;
    Ok(file)
}

/// Downloads every listed file into `dir` and returns their records.
pub(super) async fn collect(
    client: &ComfyClient,
    dir: &Path,
    files: &[OutputFile],
) -> Result<Vec<OutputRecord>, DispatchError> {
    let mut records: Vec<OutputRecord> = Vec::new();
    for (i, f) in files.iter().enumerate() {
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
        let mut hasher = Sha256::new();
        let mut size: i64 = 0;
        let mut held: Vec<u8> = Vec::new();
        let mut file: Option<std::fs::File> = None;
        while let Some(chunk) = download.chunk().await? {
            hasher.update(&chunk);
            size += chunk.len() as i64;
            held.extend_from_slice(&chunk);
            if held.len() >= PIECE {
                let piece = std::mem::replace(&mut held, Vec::with_capacity(PIECE));
                let path = part.path.clone();
                file = Some(blocking(move || write_piece(file, &path, &piece)).await?);
            }
        }
        // The rest, the file's bytes on disk, then its real name; after the
        // last file, the names in the job's folder (and the folder's own, if
        // it is new) reach the disk too before the job says `completed`:
        // after a power cut a completed job's files are where its record
        // says.
        let folder = (i + 1 == files.len()).then(|| dir.to_path_buf());
        let (path, dest) = (part.path.clone(), dir.join(&name));
        blocking(move || {
            let file = write_piece(file, &path, &held)?;
            file.sync_all().map_err(|e| io_error(&path, e))?;
            drop(file);
            std::fs::rename(&path, &dest).map_err(|e| io_error(&dest, e))?;
            if let Some(folder) = &folder {
                [Some(folder.as_path()), folder.parent()]
                    .into_iter()
                    .flatten()
                    .try_for_each(sync_dir)?;
            }
            Ok(())
        })
        .await?;
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

    /// Files a backend would serve from `/view`, by name.
    async fn serve_view(files: Vec<(&'static str, Vec<u8>)>) -> ComfyClient {
        use axum::extract::Query;
        use std::collections::HashMap;
        let files: HashMap<&'static str, Vec<u8>> = files.into_iter().collect();
        let view = move |Query(q): Query<HashMap<String, String>>| {
            let body = files
                .get(q["filename"].as_str())
                .cloned()
                .unwrap_or_default();
            async move { body }
        };
        let app = axum::Router::new().route("/view", axum::routing::get(view));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        ComfyClient::new("127.0.0.1", port, "b1", std::time::Duration::from_secs(10))
    }

    fn listed(filename: &str) -> OutputFile {
        OutputFile {
            node_id: "9".into(),
            kind: "images".into(),
            filename: filename.into(),
            subfolder: String::new(),
            file_type: "output".into(),
        }
    }

    #[tokio::test]
    async fn files_larger_and_smaller_than_a_piece_arrive_whole_under_their_names() {
        // Several pieces and a rest, then a file that fits in one piece.
        let big: Vec<u8> = (0..PIECE * 2 + 12_345).map(|i| (i % 251) as u8).collect();
        let small = b"a small preview".to_vec();
        let client = serve_view(vec![("big.png", big.clone()), ("small.png", small.clone())]).await;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("job-1");
        let records = collect(&client, &dir, &[listed("big.png"), listed("small.png")])
            .await
            .unwrap();
        for (record, bytes) in records.iter().zip([&big, &small]) {
            let on_disk = std::fs::read(dir.join(&record.name)).unwrap();
            assert!(&on_disk == bytes, "{} differs", record.name);
            assert_eq!(record.size, bytes.len() as i64);
            assert_eq!(record.sha256, format!("{:x}", Sha256::digest(bytes)));
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["big.png", "small.png"], "no .part file is left");
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
