//! The event ledger `events.jsonl`: one JSON object per line, appended by the master.
//! Chaos tests and benchmarks read their figures from it, so every recovery carries its
//! cause and timings.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use std::collections::{HashMap, HashSet};

use crate::config::{Role, SlotName};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub old_pid: Option<i32>,
    /// `crash`, `hang` or `failover`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cause: Option<String>,
    /// Failure to its detection.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detect_ms: Option<f64>,
    /// Detection to the replacement's ready message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recover_ms: Option<f64>,
    /// Free text: an exit status, a reason.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// A service instance's event: its service, its instance number, and the workflow
    /// hosting it (`pid` and `old_pid` are then the program's).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub instance: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workflow: Option<u32>,
    /// How a program exited: its exit code, or the signal that killed it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signal: Option<i32>,
    /// A task's event: its id and attempt (`workflow` is then its worker, `code` its exit).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub task: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attempt: Option<u32>,
}

impl Event {
    pub fn new(event: &str) -> Event {
        Event {
            ts: rfc3339_now(),
            event: event.to_string(),
            ..Event::default()
        }
    }

    /// An event about one slot's process.
    pub fn about(event: &str, slot: SlotName, pid: i32) -> Event {
        Event {
            role: Some(slot.role),
            id: Some(slot.id),
            pid: Some(pid),
            ..Event::new(event)
        }
    }

    pub fn slot(&self) -> Option<SlotName> {
        Some(SlotName {
            role: self.role?,
            id: self.id?,
        })
    }
}

/// Why a process was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    Crash,
    Hang,
    Failover,
    /// Asked for (`nexus restart`): a replacement on purpose, not a failure.
    Manual,
}

impl Cause {
    pub const ALL: [Cause; 4] = [Cause::Crash, Cause::Hang, Cause::Failover, Cause::Manual];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Hang => "hang",
            Cause::Failover => "failover",
            Cause::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends to the ledger from a process that does not rotate it (a workflow recording
/// its service's events): each line one write, and the file reopened when the master has
/// rotated it, so no line lands in an old file unnoticed for long.
pub struct Appender {
    path: std::path::PathBuf,
    file: Option<File>,
}

impl Appender {
    pub fn new(path: &Path) -> Appender {
        Appender {
            path: path.to_path_buf(),
            file: None,
        }
    }

    pub fn append(&mut self, event: &Event) {
        use std::os::unix::fs::MetadataExt;
        let current = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        let ours = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino());
        if current.is_none() || current != ours {
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .ok();
        }
        let mut line = serde_json::to_vec(event).expect("event serializes");
        line.push(b'\n');
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.write_all(&line)
        {
            log::warn!("cannot append to the event ledger: {e}");
        }
    }
}

pub struct Ledger {
    file: File,
    path: std::path::PathBuf,
    max_bytes: u64,
    keep: u32,
}

impl Ledger {
    /// Opens for appending; rotated past `max_bytes`, keeping `keep` older files.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Ledger> {
        let file = Self::open_file(path)?;
        Ok(Ledger {
            file,
            path: path.to_path_buf(),
            max_bytes,
            keep,
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    pub fn rotate_if_full(&mut self) {
        if self.file.metadata().is_ok_and(|m| m.len() < self.max_bytes) {
            return;
        }
        let rotated = crate::logfiles::shift(&self.path, self.keep)
            .and_then(|()| Self::open_file(&self.path));
        match rotated {
            Ok(f) => self.file = f,
            Err(e) => log::warn!("cannot rotate the ledger: {e}"),
        }
    }

    /// Appends one line with a single write, so concurrent readers never see half a line.
    pub fn append(&mut self, event: &Event) {
        let mut line = serde_json::to_vec(event).expect("event serializes");
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            log::warn!("cannot append to the event ledger: {e}");
        }
        self.rotate_if_full();
    }
}

/// The pid and slot of the last master the ledger names (its `started` or `leader`
/// event), read from the ledger's tail: how a successor learns which slot it inherits.
pub fn last_master(path: &Path) -> Option<(i32, SlotName)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)))
        .ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find_map(|line| {
            let ev: Event = serde_json::from_str(line).ok()?;
            if ev.event != "started" && ev.event != "leader" {
                return None;
            }
            Some((
                ev.pid?,
                SlotName {
                    role: ev.role?,
                    id: ev.id?,
                },
            ))
        })
}

/// A failure the ledger records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub slot: SlotName,
    pub pid: i32,
    pub cause: Cause,
}

/// What a new master needs from its predecessors' ledger: the last pid each slot had,
/// and the failures nobody recorded a recovery for (the old master died first).
#[derive(Debug, Default)]
pub struct History {
    pub last_pid: HashMap<SlotName, i32>,
    /// Failures without a recorded recovery, oldest first.
    pub unclosed: Vec<Failure>,
    /// What `nexus metrics` counts, since the cluster started.
    pub counters: crate::counters::Counters,
}

impl History {
    /// Reads the ledger's tail since the last cluster start.
    pub fn read(path: &Path) -> History {
        let mut h = History::default();
        // The newest rotated file first, so a rotation just before a takeover loses nothing.
        let older = tail(Path::new(&format!("{}.1", path.display())), 1 << 20).unwrap_or_default();
        let Some(current) = tail(path, 1 << 20) else {
            return h;
        };
        let text = older + "\n" + &current;
        let mut failures: Vec<Failure> = Vec::new();
        let mut closed: HashSet<i32> = HashSet::new();
        for ev in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Event>(l).ok())
        {
            let slot = ev.slot();
            match (ev.event.as_str(), slot, ev.pid) {
                // The cluster's start (a master's line), not a service instance's `started`:
                // that one must not wipe the daemons' history before a takeover reads it.
                ("started", Some(_), _) => {
                    h = History::default();
                    failures.clear();
                    closed.clear();
                    if let (Some(s), Some(p)) = (slot, ev.pid) {
                        h.last_pid.insert(s, p);
                    }
                }
                ("spawned", Some(s), Some(p)) => {
                    h.last_pid.insert(s, p);
                }
                ("respawned", Some(s), Some(p)) => {
                    h.last_pid.insert(s, p);
                    closed.extend(ev.old_pid);
                    let cause = ev.cause.as_deref().unwrap_or("crash");
                    h.counters.record_recovery(s.role, cause, ev.recover_ms);
                }
                ("leader", ..) => {
                    h.counters.leader_changes += 1;
                    if let (Some(s), Some(p)) = (slot, ev.pid) {
                        h.last_pid.insert(s, p);
                    }
                }
                ("exited", Some(slot), Some(pid)) if ev.cause.is_some() => {
                    let cause = ev.cause.as_deref().and_then(Cause::parse);
                    failures.push(Failure {
                        slot,
                        pid,
                        cause: cause.unwrap_or(Cause::Crash),
                    });
                }
                ("killed", Some(slot), Some(pid)) => failures.push(Failure {
                    slot,
                    pid,
                    cause: Cause::Hang,
                }),
                _ => {}
            }
        }
        let mut seen = HashSet::new();
        h.unclosed = failures
            .into_iter()
            .filter(|f| !closed.contains(&f.pid) && seen.insert(f.pid))
            .collect();
        h
    }
}

fn tail(path: &Path, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    // A cut first line is not JSON and is skipped by the callers' parsers.
    Some(text)
}

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn rfc3339_now() -> String {
    rfc3339(unix_ms_now())
}

/// `2026-11-22T09:02:20.123Z` for a count of ms since the epoch (UTC, no leap seconds).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// The inverse of `rfc3339` (only the `...Z` form we write).
pub fn parse_rfc3339(ts: &str) -> Option<u64> {
    let b = ts.as_bytes();
    if b.len() != 24 || b[10] != b'T' || b[23] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    let secs = days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?;
    u64::try_from(secs * 1000 + n(20..23)?).ok()
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_master() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut l = Ledger::open(&p, 1 << 20, 3).unwrap();
        for (event, pid, id) in [
            ("started", 10, 1),
            ("spawned", 11, 2),
            ("leader", 11, 2),
            ("exited", 12, 1),
        ] {
            let mut e = Event::new(event);
            e.pid = Some(pid);
            e.role = Some(Role::Communicator);
            e.id = Some(id);
            l.append(&e);
        }
        assert_eq!(
            last_master(&p),
            Some((
                11,
                SlotName {
                    role: Role::Communicator,
                    id: 2
                }
            ))
        );
    }

    #[test]
    fn history_finds_unclosed_failures() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut l = Ledger::open(&p, 1 << 20, 3).unwrap();
        let w = |id| (Some(Role::Workflow), Some(id));
        let mut put = |event: &str,
                       (role, id): (Option<Role>, Option<u32>),
                       pid: i32,
                       old: Option<i32>,
                       cause: Option<&str>| {
            let mut e = Event::new(event);
            (e.role, e.id, e.pid, e.old_pid, e.cause) =
                (role, id, Some(pid), old, cause.map(str::to_string));
            l.append(&e);
        };
        put(
            "started",
            (Some(Role::Communicator), Some(1)),
            1,
            None,
            None,
        );
        put("spawned", w(1), 10, None, None);
        put("spawned", w(2), 20, None, None);
        put("exited", w(1), 10, None, Some("crash"));
        put("spawned", w(1), 11, None, None);
        put("respawned", w(1), 11, Some(10), Some("crash"));
        put("killed", w(2), 20, None, Some("hang"));
        put("exited", w(2), 20, None, Some("hang"));
        put("spawned", w(2), 21, None, None);
        let mut started = Event::new("started");
        (
            started.pid,
            started.service,
            started.instance,
            started.workflow,
        ) = (Some(30), Some("web".into()), Some(1), Some(1));
        l.append(&started);
        let h = History::read(&p);
        assert_eq!(
            h.last_pid[&SlotName {
                role: Role::Workflow,
                id: 2
            }],
            21
        );
        assert_eq!(
            h.unclosed,
            vec![Failure {
                slot: SlotName {
                    role: Role::Workflow,
                    id: 2
                },
                pid: 20,
                cause: Cause::Hang
            }]
        );
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_338_140_123), "2026-11-22T09:02:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [0, 951_782_400_000, 1_795_338_140_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
