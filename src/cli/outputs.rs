//! `orchestrator outputs`: a batch's pictures onto the artist's disk.
//!
//! Why a command: after a night's batch the renders are on the
//! orchestrator's machine, named by ComfyUI's counter
//! (`orchestrator_00353_.png`); an artist wants them in a folder of their
//! own, each job's in a folder named by its shot, and wants to run the
//! command again after a dropped connection without fetching what already
//! came. So each file is written beside its place (`.part`), checked
//! against the SHA-256 the orchestrator recorded, and renamed only then; a
//! file already there with that checksum is not fetched again.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{encode_segment, Remote};

/// Where and how a batch's outputs are written.
#[derive(Debug, Clone)]
pub struct OutputsArgs {
    /// The folder that gets one folder a job.
    pub to: PathBuf,
    /// A metadata field whose value names each job's folder (`shot`), in
    /// place of its id.
    pub by: Option<String>,
}

/// Fetches every output of each completed job into `args.to`, a line a job.
/// A job that has not completed, or whose files cannot be had, is an error
/// for that job (the others go on; the command fails at the end).
pub async fn outputs(remote: &Remote, ids: &[String], args: &OutputsArgs) -> anyhow::Result<()> {
    super::actions::each_job(remote, ids, |id| async move {
        let job = remote.get(&format!("/api/job/{id}")).await?;
        let status = job["status"].as_str().unwrap_or("");
        if status != "completed" {
            let why = job["error"]["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            bail!("it is {status}, not completed: no outputs{why}");
        }
        let folder = args.to.join(folder_name(&job, &id, args.by.as_deref())?);
        tokio::fs::create_dir_all(&folder)
            .await
            .with_context(|| format!("creating {}", folder.display()))?;
        let files = job["outputs"].as_array().cloned().unwrap_or_default();
        let (mut fetched, mut kept) = (0, 0);
        for output in &files {
            if fetch_one(remote, &id, output, &folder).await? {
                fetched += 1;
            } else {
                kept += 1;
            }
        }
        Ok(if remote.json {
            serde_json::json!({
                "job_id": id, "folder": folder, "outputs": files.len(),
                "fetched": fetched, "already_there": kept,
            })
            .to_string()
        } else {
            format!(
                "{} output(s) in {} ({fetched} fetched, {kept} already there)",
                files.len(),
                folder.display()
            )
        })
    })
    .await
}

/// The job's folder: its `by` field when it has one (`sq010/sh020` is a
/// folder in a folder; nothing climbs out of `--to`), else its id.
fn folder_name(job: &Value, id: &str, by: Option<&str>) -> anyhow::Result<PathBuf> {
    let Some(field) = by else {
        return plain(id)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("`{id}` is not a job id"));
    };
    match &job["metadata"][field] {
        Value::Null => Ok(PathBuf::from(id)),
        v => {
            let text = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            text.split('/')
                .map(plain)
                .collect::<Option<PathBuf>>()
                .ok_or_else(|| {
                    anyhow!("its metadata `{field}` is `{text}`, which cannot name a folder inside the one given (an empty part, a part of only dots, or a `\\`)")
                })
        }
    }
}

/// `name` when it can be one file's or folder's name and nothing more.
fn plain(name: &str) -> Option<String> {
    let bad = name.is_empty() || name.chars().all(|c| c == '.') || name.contains(['/', '\\', '\0']);
    (!bad).then(|| name.to_string())
}

/// Fetches one output into `folder` unless it is there with its checksum;
/// whether it fetched it.
async fn fetch_one(
    remote: &Remote,
    id: &str,
    output: &Value,
    folder: &Path,
) -> anyhow::Result<bool> {
    let name = output["name"].as_str().unwrap_or("");
    let served = name;
    let name = plain(name).ok_or_else(|| anyhow!("the orchestrator named an output `{name}`"))?;
    let want = output["sha256"].as_str().unwrap_or("").to_string();
    if let Some(at) = output["pruned_at"].as_str() {
        bail!("output `{name}` was deleted by retention on {at}");
    }
    // Two jobs of one shot may have outputs of one name (two boxes' counters):
    // the second is written under its job's id, never over the first.
    let tail = &id[id.len().saturating_sub(12)..];
    let mut path = None;
    for candidate in [name.clone(), format!("{tail}_{name}")] {
        let at = folder.join(&candidate);
        match checksum_of(&at).await? {
            None => {
                path = Some(at);
                break;
            }
            Some(got) if got == want => return Ok(false),
            Some(_) => {}
        }
    }
    let path = path.ok_or_else(|| {
        anyhow!(
            "output `{name}`: {} holds another file of that name",
            folder.display()
        )
    })?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(&name)
        .to_string();
    let part = folder.join(format!("{name}.part"));
    let url = format!("/api/job/{id}/outputs/{}", encode_segment(served));
    let response = remote
        .send(remote.request(reqwest::Method::GET, &url))
        .await
        .map_err(|e| anyhow!("output `{name}`: {e}"))?;
    let mut file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut hasher = Sha256::new();
    let mut body = response.bytes_stream();
    let written: anyhow::Result<()> = async {
        while let Some(piece) = body.next().await {
            let piece = piece.with_context(|| format!("fetching output `{name}`"))?;
            hasher.update(&piece);
            file.write_all(&piece).await?;
        }
        // A failed background write (the disk full) is told by `flush` alone.
        file.flush().await?;
        file.sync_all().await?;
        let got = format!("{:x}", hasher.finalize());
        if !want.is_empty() && got != want {
            bail!("output `{name}` came with SHA-256 {got}, not the recorded {want}");
        }
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e.context(format!("writing {}", path.display())));
    }
    tokio::fs::rename(&part, &path)
        .await
        .with_context(|| format!("moving {} into place", part.display()))?;
    Ok(true)
}

/// The SHA-256 of a file already there, `None` when there is none.
async fn checksum_of(path: &Path) -> anyhow::Result<Option<String>> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(Some(format!("{:x}", hasher.finalize())));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_a_plain_name_or_refused() {
        let job = serde_json::json!({"metadata": {
            "shot": "sc01_sh010", "n": 7, "nested": "sq010/sh020",
            "bad": "../x", "abs": "/etc", "dots": "a/./b", "win": "a\\b"
        }});
        let id = "01a25007-60dc-7088-8000-067b635e12de";
        let path = |p: &str| PathBuf::from(p);
        assert_eq!(folder_name(&job, id, None).unwrap(), path(id));
        assert_eq!(
            folder_name(&job, id, Some("shot")).unwrap(),
            path("sc01_sh010")
        );
        assert_eq!(folder_name(&job, id, Some("n")).unwrap(), path("7"));
        assert_eq!(folder_name(&job, id, Some("missing")).unwrap(), path(id));
        assert_eq!(
            folder_name(&job, id, Some("nested")).unwrap(),
            path("sq010/sh020")
        );
        for bad in ["bad", "abs", "dots", "win"] {
            let e = folder_name(&job, id, Some(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("metadata `{bad}`")), "{e}");
        }
        assert!(folder_name(&job, "..", None).is_err());
        assert_eq!(encode_segment("a b/%.png"), "a%20b%2F%25.png");
    }
}
