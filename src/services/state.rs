//! What outlives a workflow: each instance's record (`services/state/NAME-N.json`, written
//! by its host on every change of state, atomically), the users' wishes
//! (`services/state/desired.json`, written by the master: stopped, start and restart
//! requests), and probe statistics (`services/stats/NAME-N.json`). A workflow's successor
//! adopts the running program from the record; `status` reads the records; dependents
//! watch the directory (inotify) to learn when their dependencies are ready.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime_dir::RuntimeDir;
use crate::services::machine::Machine;
use crate::services::probes::ProbeStats;
use crate::services::spec::InstanceName;

/// The workflow hosting an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub workflow: u32,
    pub pid: i32,
}

/// One run of the program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: with the pid, the process's identity.
    pub start_ticks: u64,
    /// Wall clock, ms since the epoch.
    pub started_ms: u64,
    /// Monotonic ms (shared by the machine's processes), for the restart policy.
    pub started_mono_ms: u64,
    pub pgid: i32,
    /// `NEXUS_TREE` of its processes.
    pub token: String,
    pub cgroup: Option<PathBuf>,
    /// Inodes of the stdout and stderr pipes, for a successor to open them again.
    pub pipes: [u64; 2],
    /// The run was adopted from a predecessor: not our child, its exit status unknown.
    #[serde(default)]
    pub adopted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub service: String,
    pub instance: u32,
    pub host: Option<Host>,
    /// The definition the current program runs (hex of `definition_hash`).
    pub spec_hash: String,
    pub machine: Machine,
    pub run: Option<RunRecord>,
    /// The program's last `STATUS=` (sd_notify).
    #[serde(default)]
    pub status_text: Option<String>,
    /// How each configured limit applies here.
    #[serde(default)]
    pub limits: Vec<String>,
    /// The instance's cgroup, kept across its runs (removed when it is stopped for good).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The start and restart requests already acted on (see `Want`).
    #[serde(default)]
    pub start_gen: u64,
    #[serde(default)]
    pub restart_gen: u64,
    pub updated_ms: u64,
}

impl Record {
    pub fn new(name: &InstanceName, spec_hash: u64) -> Record {
        Record {
            service: name.service.clone(),
            instance: name.n,
            host: None,
            spec_hash: format!("{spec_hash:016x}"),
            machine: Machine::new(),
            run: None,
            status_text: None,
            limits: Vec::new(),
            cgroup: None,
            start_gen: 0,
            restart_gen: 0,
            updated_ms: 0,
        }
    }

    pub fn name(&self) -> InstanceName {
        InstanceName {
            service: self.service.clone(),
            n: self.instance,
        }
    }
}

/// A user's wish for one instance. Generations count requests, so a request is acted on
/// once, also by a successor of the workflow that saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub stopped: bool,
    pub start_gen: u64,
    pub restart_gen: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub instances: BTreeMap<String, Want>,
}

impl Desired {
    pub fn read(dir: &RuntimeDir) -> Desired {
        std::fs::read(desired_file(dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn write(&self, dir: &RuntimeDir) -> std::io::Result<()> {
        write_atomic(
            &desired_file(dir),
            &serde_json::to_vec_pretty(self).unwrap_or_default(),
        )
    }

    pub fn of(&self, name: &InstanceName) -> Want {
        self.instances
            .get(&name.to_string())
            .copied()
            .unwrap_or_default()
    }
}

/// Probe counts and such: written at most once an interval, in a directory nobody
/// watches (so a probe every second does not wake every dependent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub ready: ProbeStats,
    pub liveness: ProbeStats,
    pub notify_rejected: u64,
    pub log_lines: u64,
}

pub fn state_dir(dir: &RuntimeDir) -> PathBuf {
    dir.path().join("services").join("state")
}

pub fn stats_dir(dir: &RuntimeDir) -> PathBuf {
    dir.path().join("services").join("stats")
}

pub fn cursor_dir(dir: &RuntimeDir) -> PathBuf {
    dir.path().join("services").join("cursor")
}

pub fn notify_path(dir: &RuntimeDir, name: &InstanceName) -> PathBuf {
    dir.path().join("notify").join(format!("{name}.sock"))
}

pub fn log_path(dir: &RuntimeDir, name: &InstanceName) -> PathBuf {
    dir.logs_dir().join(format!("{name}.log"))
}

fn desired_file(dir: &RuntimeDir) -> PathBuf {
    state_dir(dir).join("desired.json")
}

pub fn record_path(dir: &RuntimeDir, name: &InstanceName) -> PathBuf {
    state_dir(dir).join(format!("{name}.json"))
}

/// A short tag of the runtime directory, for names shared machine-wide (cgroups,
/// abstract sockets) that must not collide between clusters.
pub fn dir_tag(dir: &RuntimeDir) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.path().as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

pub fn read_record(dir: &RuntimeDir, name: &InstanceName) -> Option<Record> {
    let bytes = std::fs::read(record_path(dir, name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_record(dir: &RuntimeDir, rec: &Record) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).unwrap_or_default();
    write_atomic(&record_path(dir, &rec.name()), &bytes)
}

/// Every instance record of the directory, by name.
pub fn read_all(dir: &RuntimeDir) -> BTreeMap<String, Record> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(state_dir(dir)) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        if stem == "desired" || stem.starts_with('.') {
            continue;
        }
        if let Some(rec) = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        {
            out.insert(stem.to_string(), rec);
        }
    }
    out
}

pub fn read_stats(dir: &RuntimeDir, name: &InstanceName) -> Stats {
    std::fs::read(stats_dir(dir).join(format!("{name}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn write_stats(dir: &RuntimeDir, name: &InstanceName, stats: &Stats) -> std::io::Result<()> {
    let path = stats_dir(dir).join(format!("{name}.json"));
    write_atomic(&path, &serde_json::to_vec(stats).unwrap_or_default())
}

/// Write to a hidden temporary, then rename: readers see the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
    };
    // The directory is made when missing, not checked on every write.
    let mut f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            open()?
        }
        r => r?,
    };
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Programs a previous run of the cluster left running (every daemon died without
/// stopping them): `start` refuses while there are any; `stop` ends them.
pub fn leftover_programs(dir: &RuntimeDir) -> Vec<(String, i32)> {
    read_all(dir)
        .into_iter()
        .filter_map(|(name, r)| {
            let run = r.run?;
            let alive = crate::procscan::start_ticks(run.pid) == Some(run.start_ticks)
                && crate::procscan::state(run.pid).is_some_and(|s| s != 'Z');
            alive.then_some((name, run.pid))
        })
        .collect()
}

/// Removes what a fresh `start` must not inherit: old records, wishes, cursors, stats.
pub fn reset(dir: &RuntimeDir) {
    let _ = std::fs::remove_dir_all(dir.path().join("services"));
    let _ = std::fs::remove_dir_all(dir.path().join("notify"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_wishes_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::at(tmp.path());
        let name = InstanceName {
            service: "web".into(),
            n: 2,
        };
        let mut rec = Record::new(&name, 0xabc);
        rec.host = Some(Host {
            workflow: 2,
            pid: 99,
        });
        write_record(&dir, &rec).unwrap();
        assert_eq!(read_record(&dir, &name), Some(rec.clone()));
        let all = read_all(&dir);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["web-2"]);
        let mut d = Desired::default();
        d.instances.insert(
            "web-2".into(),
            Want {
                stopped: true,
                ..Want::default()
            },
        );
        d.write(&dir).unwrap();
        assert!(Desired::read(&dir).of(&name).stopped);
        assert_eq!(read_all(&dir).len(), 1, "desired.json is not a record");
        assert_ne!(
            dir_tag(&dir),
            dir_tag(&RuntimeDir::at(Path::new("/tmp/other")))
        );
    }
}
