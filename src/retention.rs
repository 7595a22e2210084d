//! Retention: a farm's data folder grows every night; this keeps it from
//! filling the disk, by rules an operator sets (`retention` in the config).
//!
//! Why each rule is a number of days, off by default: what may go is a
//! studio's choice, and nothing is deleted unless it was asked for. What
//! each rule deletes, and what it never touches:
//! - `outputs_days`: the collected output files of jobs that ended longer
//!   ago. The job, its history and its output records stay; the records say
//!   when their files were pruned.
//! - `inputs_days`: input files no unfinished job uses and that no
//!   submission named for that long.
//! - `progress_days`: progress events; state changes stay for ever.
//! - `logs_days`: the daily log files in `log_dir`, by the day in their
//!   name (`orchestrator.log.2026-12-07`); no other file there.
//!
//! The sweeper works in small batches (the writer is held for milliseconds
//! at a time), logs and counts what it freed (`/metrics`), and also measures
//! the data folder for `GET /api/health`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::inputs::Inputs;
use crate::store::{Store, StoreError};

/// Rows or files handled per batch.
const BATCH: i64 = 500;

/// What one sweep freed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Swept {
    /// Output files deleted.
    pub output_files: u64,
    /// Their bytes.
    pub output_bytes: u64,
    /// Input files deleted.
    pub input_files: u64,
    /// Their bytes.
    pub input_bytes: u64,
    /// Progress events deleted.
    pub progress_events: u64,
    /// Log files deleted.
    pub log_files: u64,
    /// Their bytes.
    pub log_bytes: u64,
}

/// How much of the disk the data folder takes, and what is left.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct DiskUsage {
    /// The database file, bytes.
    pub database_bytes: i64,
    /// Collected outputs, bytes.
    pub outputs_bytes: u64,
    /// Input files, bytes.
    pub inputs_bytes: u64,
    /// Free space on the data folder's disk, bytes.
    pub free_bytes: Option<u64>,
    /// When the folders were last measured.
    pub measured_at: Option<DateTime<Utc>>,
    /// The network file system the data folder is on (`nfs`, `smb`, …),
    /// absent on a local disk: SQLite's locks and syncs are not to be
    /// trusted there, and `GET /api/health` warns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_file_system: Option<&'static str>,
}

/// The last measurement, shared with the health route.
pub type Usage = Arc<Mutex<DiskUsage>>;

/// The files of an output: the file and any thumbnails made of it.
pub fn output_files(outputs_dir: &Path, job_id: &str, name: &str) -> Vec<PathBuf> {
    let dir = outputs_dir.join(job_id);
    let mut files = vec![dir.join(name)];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let thumb = format!("-{name}");
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".thumb-") && n.ends_with(&thumb))
        }));
    }
    files
}

/// Applies the rules once, as of `now` (tests set the clock; the service
/// passes the current time).
pub async fn sweep_once(
    store: &Store,
    inputs: &Inputs,
    outputs_dir: &Path,
    rules: &RetentionConfig,
    now: DateTime<Utc>,
) -> Result<Swept, StoreError> {
    let mut swept = Swept::default();
    let days = |d: u32| now - chrono::Duration::days(d as i64);
    if let Some(d) = rules.outputs_days {
        loop {
            let stale = store.stale_outputs(days(d), BATCH).await?;
            if stale.is_empty() {
                break;
            }
            let mut done = Vec::new();
            for o in stale {
                let dir = outputs_dir.to_path_buf();
                let (job, name) = (o.job_id.clone(), o.name.clone());
                let files = tokio::task::spawn_blocking(move || output_files(&dir, &job, &name))
                    .await
                    .unwrap_or_default();
                for f in files {
                    if tokio::fs::remove_file(&f).await.is_ok() {
                        swept.output_files += 1;
                    }
                }
                swept.output_bytes += o.size.max(0) as u64;
                done.push((o.job_id, o.name));
            }
            store.outputs_pruned(done).await?;
        }
    }
    if let Some(d) = rules.inputs_days {
        loop {
            let stale = store.stale_inputs(days(d), BATCH).await?;
            if stale.is_empty() {
                break;
            }
            let before = swept.input_files;
            for i in stale {
                if inputs.delete(&i.id).await? == crate::store::InputDeletion::Deleted {
                    swept.input_files += 1;
                    swept.input_bytes += i.size.max(0) as u64;
                }
            }
            // What stays (a submission naming it now) is for the next sweep.
            if swept.input_files == before {
                break;
            }
        }
    }
    if let Some(d) = rules.progress_days {
        loop {
            let n = store.prune_progress(days(d), BATCH).await?;
            swept.progress_events += n;
            if n < BATCH as u64 {
                break;
            }
        }
    }
    Ok(swept)
}

/// Deletes the daily log files in `dir` older than the last `days` days
/// (today's, by `now`, included): the files are named by
/// [`crate::server::LOG_FILE`] and their day, and the day in the name, not
/// the file's times, says how old each is. Nothing else in `dir` is
/// touched. Blocking: call it off the runtime's threads.
pub fn sweep_logs(dir: &Path, days: u32, now: DateTime<Utc>, swept: &mut Swept) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let first_kept = now.date_naive() - chrono::Duration::days(i64::from(days.max(1)) - 1);
    let prefix = format!("{}.", crate::server::LOG_FILE);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(day) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        else {
            continue;
        };
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if day < first_kept && meta.is_file() && std::fs::remove_file(entry.path()).is_ok() {
            swept.log_files += 1;
            swept.log_bytes += meta.len();
        }
    }
}

/// Bytes under a folder (files only, links not followed).
fn folder_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Whether a write failed because the disk is full (or the user's quota
/// spent): a condition that passes once space is freed, not a fault of
/// whoever asked for the write.
pub fn disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// Free bytes on the disk that holds `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `s` a valid statvfs to fill.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// Measures the data folder.
pub async fn measure(
    store: &Store,
    data_dir: &Path,
    outputs_dir: &Path,
    inputs_dir: &Path,
) -> DiskUsage {
    let (data, outputs, inputs) = (
        data_dir.to_path_buf(),
        outputs_dir.to_path_buf(),
        inputs_dir.to_path_buf(),
    );
    let (outputs_bytes, inputs_bytes, free, network) = tokio::task::spawn_blocking(move || {
        (
            folder_bytes(&outputs),
            folder_bytes(&inputs),
            free_bytes(&data),
            network_file_system(&data),
        )
    })
    .await
    .unwrap_or_default();
    DiskUsage {
        database_bytes: store.database_bytes().await.unwrap_or(0),
        outputs_bytes,
        inputs_bytes,
        free_bytes: free,
        measured_at: Some(Utc::now()),
        network_file_system: network,
    }
}

/// The network file system `dir` is on, by the kind the kernel reports
/// (`statfs`); `None` on a local disk, or where it cannot be told.
///
/// Why: a studio keeps everything on its NAS, and a data folder put there
/// holds the database. SQLite's own documentation warns that its locks are
/// broken on many network file systems and that a sync there may not reach
/// the disk: an acknowledged job could be lost or the database damaged. The
/// service still runs (one process on one host is the case that works most
/// often), but says so at start and in `GET /api/health`.
pub fn network_file_system(dir: &Path) -> Option<&'static str> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid C string and `s` a valid statfs to fill.
        if unsafe { libc::statfs(path.as_ptr(), &mut s) } != 0 {
            return None;
        }
        // The kinds are 32-bit magic numbers (linux/magic.h).
        network_kind(s.f_type as u32)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}

/// The network file systems among the kinds `statfs` reports. FUSE is not
/// one of them: it also serves local disks (rootless containers' overlays).
fn network_kind(magic: u32) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "nfs",
        0x517b => "smb",
        0xff53_4d42 => "cifs",
        0xfe53_4d42 => "smb2",
        0x0102_1997 => "9p",
        0x00c3_6400 => "ceph",
        0x5346_414f => "afs",
        0x0bd0_0bd0 => "lustre",
        0x4750_4653 => "gpfs",
        _ => return None,
    })
}

/// The warning for a data folder on network file system `kind`.
pub fn network_warning(kind: &str) -> String {
    format!(
        "the data folder is on a network file system ({kind}): SQLite's locks and syncs \
         are not to be trusted there, so an acknowledged job could be lost or the \
         database damaged; keep data_dir on a local disk (and copy outputs to the share \
         with `orchestrator outputs --to`)"
    )
}

/// How often the free space is read (it changes faster than the folders,
/// and a render of long videos fills a disk in minutes).
const FREE_SPACE_EVERY: Duration = Duration::from_secs(2);

/// The side of `retention.low_space_bytes` the data folder's disk was last
/// said to be on, in the event log: `disk_low` when the free space falls
/// under it, `disk_ok` when it is back a tenth above it (not one event a
/// reading while it hovers at the line). The alerts tell both: a disk that
/// fills at night stops the farm (finished jobs' outputs wait on their
/// boxes, submissions are refused) until someone frees space.
#[derive(Default)]
struct LowSpace {
    /// `None` until a reading was said (or, with space, needed nothing said).
    said: Option<bool>,
}

impl LowSpace {
    async fn note(&mut self, store: &Store, limit: u64, free: Option<u64>) {
        let Some(free) = free else { return };
        crate::metrics::data_disk_free(free);
        let low = match self.said {
            Some(true) => free < limit + limit / 10,
            _ => free < limit,
        };
        if self.said == Some(low) {
            return;
        }
        if self.said.is_none() && !low {
            // A start with space: nothing to say.
            self.said = Some(false);
            return;
        }
        let (kind, message) = if low {
            (
                "disk_low",
                format!(
                    "the data folder's disk has {} free, under retention.low_space_bytes ({}): \
                     once it is full, finished jobs' outputs wait on their backends and \
                     submissions are refused; free space, or set retention rules",
                    size(free),
                    size(limit)
                ),
            )
        } else {
            (
                "disk_ok",
                format!(
                    "the data folder's disk has {} free again (retention.low_space_bytes is {})",
                    size(free),
                    size(limit)
                ),
            )
        };
        tracing::warn!(free_bytes = free, low_space_bytes = limit, "{message}");
        let data = serde_json::json!({"free_bytes": free, "low_space_bytes": limit});
        match store.farm_event(kind, message, data).await {
            Ok(()) => self.said = Some(low),
            // The database may be on the full disk: said at a later reading.
            Err(e) => tracing::warn!(error = %e, "cannot record the data folder's disk space"),
        }
    }
}

/// A size for people: MiB under a GiB, else GiB.
fn size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes < GIB {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    }
}

/// Sweeps and measures every `sweep_interval_s`, and reads the free space
/// every few seconds, until `stop`.
pub async fn run(
    store: Store,
    inputs: Inputs,
    config: Arc<crate::config::Config>,
    usage: Usage,
    stop: CancellationToken,
) {
    let rules = &config.retention;
    let every = Duration::from_secs(rules.sweep_interval_s);
    let mut next_sweep = tokio::time::Instant::now();
    let mut low = LowSpace::default();
    loop {
        if tokio::time::Instant::now() < next_sweep {
            let dir = config.data_dir.clone();
            let free = tokio::task::spawn_blocking(move || free_bytes(&dir))
                .await
                .ok()
                .flatten();
            usage.lock().expect("usage").free_bytes = free;
            low.note(&store, rules.low_space_bytes, free).await;
            tokio::select! {
                _ = tokio::time::sleep(FREE_SPACE_EVERY.min(every)) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        next_sweep = tokio::time::Instant::now() + every;
        let swept = sweep_once(&store, &inputs, &config.outputs_dir(), rules, Utc::now()).await;
        match swept {
            Ok(mut s) => {
                if let (Some(dir), Some(days)) = (config.log_dir.clone(), rules.logs_days) {
                    s = tokio::task::spawn_blocking(move || {
                        sweep_logs(&dir, days, Utc::now(), &mut s);
                        s
                    })
                    .await
                    .unwrap_or_default();
                }
                if s != Swept::default() {
                    tracing::info!(
                        output_files = s.output_files,
                        output_bytes = s.output_bytes,
                        input_files = s.input_files,
                        input_bytes = s.input_bytes,
                        progress_events = s.progress_events,
                        log_files = s.log_files,
                        log_bytes = s.log_bytes,
                        "retention freed space"
                    );
                    crate::metrics::retained(&s);
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; will try again"),
        }
        let measured = measure(
            &store,
            &config.data_dir,
            &config.outputs_dir(),
            &config.inputs_dir(),
        )
        .await;
        low.note(&store, rules.low_space_bytes, measured.free_bytes)
            .await;
        *usage.lock().expect("usage") = measured;
        if stop.is_cancelled() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_file_systems_are_told_from_local_disks() {
        assert_eq!(network_kind(0x6969), Some("nfs"));
        assert_eq!(network_kind(0xff53_4d42), Some("cifs"));
        // ext4, xfs, btrfs, tmpfs, overlayfs, FUSE.
        for local in [
            0xef53,
            0x5846_5342,
            0x9123_683e,
            0x0102_1994,
            0x794c_7630,
            0x6573_5546,
        ] {
            assert_eq!(network_kind(local), None, "{local:#x}");
        }
        let here = tempfile::tempdir().unwrap();
        assert_eq!(
            network_file_system(here.path()),
            None,
            "a test's own folder"
        );
    }

    #[test]
    fn log_files_go_by_the_day_in_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "orchestrator.log.2026-12-05",
            "orchestrator.log.2026-12-04",
            "orchestrator.log.2026-12-03",
            "orchestrator.log.2026-11-30",
            "orchestrator.log.2026-12-05.gz",
            "orchestrator.log",
            "other.log.2026-11-30",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), "12345").unwrap();
        }
        let now = "2026-12-05T23:59:00Z".parse().unwrap();
        let mut swept = Swept::default();
        sweep_logs(dir.path(), 2, now, &mut swept);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "orchestrator.log",
                "orchestrator.log.2026-12-04",
                "orchestrator.log.2026-12-05",
                "orchestrator.log.2026-12-05.gz",
                "other.log.2026-11-30",
            ]
        );
        assert_eq!((swept.log_files, swept.log_bytes), (2, 10));
    }
}
