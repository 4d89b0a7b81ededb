//! Finding a runtime directory's daemons from /proc by their command line — how a new
//! master adopts a cluster it did not spawn, and how `stop` works without the master.
//!
//! A daemon is recognised by the shape of its arguments after argv[0], not by the binary's
//! name: a user may copy or link the binary under another name, and a daemon must still be
//! found by `stop` and adopted by a new master. Only our own uid's processes are looked at,
//! and the runtime directory must match exactly.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::config::{Role, SlotName};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    pub slot: SlotName,
}

/// Parses `<binary> daemon --role R --id N --runtime-dir DIR`, the one shape every
/// daemon's command line has, whatever the binary is called. Returns the slot and the
/// directory.
pub fn parse_daemon_cmdline(args: &[&str]) -> Option<(SlotName, String)> {
    let [
        exe,
        "daemon",
        "--role",
        role,
        "--id",
        id,
        "--runtime-dir",
        dir,
    ] = args
    else {
        return None;
    };
    if exe.is_empty() {
        return None;
    }
    let slot = SlotName {
        role: Role::parse(role)?,
        id: id.parse().ok().filter(|&n| n >= 1)?,
    };
    Some((slot, (*dir).to_string()))
}

/// The slot a live process serves in `dir`, if it is one of that directory's daemons
/// owned by us. Zombies have an empty command line and so never match.
pub fn daemon_slot(pid: i32, dir: &Path) -> Option<SlotName> {
    let proc_dir = format!("/proc/{pid}");
    let uid = nix::unistd::geteuid().as_raw();
    if fs::metadata(&proc_dir).ok()?.uid() != uid {
        return None;
    }
    let raw = fs::read(format!("{proc_dir}/cmdline")).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let args: Vec<&str> = text.trim_end_matches('\0').split('\0').collect();
    let (slot, d) = parse_daemon_cmdline(&args)?;
    (Path::new(&d) == dir).then_some(slot)
}

/// A pidfd for daemon `slot` of `dir` running as `pid`, checked after the open: the pidfd
/// pins the process, so a pid recycled between a scan and the open is never signalled.
pub fn open_daemon(pid: i32, slot: SlotName, dir: &Path) -> Option<std::os::fd::OwnedFd> {
    let fd = crate::spawn::pidfd_open(pid).ok()?;
    (daemon_slot(pid, dir) == Some(slot)).then_some(fd)
}

/// Every process's pid, as /proc lists them (none if /proc cannot be read).
pub fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
}

/// Every daemon of `dir`, in pid order.
pub fn daemons_of(dir: &Path) -> Vec<Found> {
    let mut found: Vec<Found> = pids()
        .filter_map(|pid| {
            Some(Found {
                pid,
                slot: daemon_slot(pid, dir)?,
            })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
}

/// Process start time in clock ticks since boot (field 22 of /proc/PID/stat), used to
/// tell the older of two processes claiming one slot.
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat_fields(pid).and_then(|f| f.get(19).and_then(|s| s.parse().ok()))
}

/// CPU time (user + system) in clock ticks, for `status`.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time of a process and of its children it reaped (utime, stime, cutime, cstime), in
/// clock ticks: a task's program and what its shell ran and waited for.
pub fn tree_cpu_ticks(pid: i32) -> Option<u64> {
    let f = stat_fields(pid)?;
    (11..=14).try_fold(0u64, |sum, i| Some(sum + f.get(i)?.parse::<u64>().ok()?))
}

/// The fields after the `(comm)` of /proc/PID/stat: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = read_small(&format!("/proc/{pid}/stat"))?;
    let after = s.get(s.rfind(')')? + 2..)?;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// A /proc file of a few hundred bytes in one read: `read_to_string` sees a size of 0 and
/// reads it in growing pieces, six system calls where one does. The workflows and the
/// communicators read /proc/PID/stat every few seconds for each program.
fn read_small(path: &str) -> Option<String> {
    use std::io::Read;
    let mut f = fs::File::open(path).ok()?;
    let mut buf = [0u8; 1024];
    let n = f.read(&mut buf).ok()?;
    if n < buf.len() {
        return String::from_utf8(buf[..n].to_vec()).ok();
    }
    let mut s = String::from_utf8(buf.to_vec()).ok()?;
    f.read_to_string(&mut s).ok()?;
    Some(s)
}

/// The process group (field 5 of /proc/PID/stat).
pub fn pgrp(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Single-letter process state (R, S, T for stopped, Z for zombie); None if gone.
pub fn state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Resident set size in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Seconds since boot, for process uptimes.
pub fn uptime_secs() -> Option<f64> {
    fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_exact_shape() {
        let ok = [
            "/x/nexus",
            "daemon",
            "--role",
            "watchdog",
            "--id",
            "2",
            "--runtime-dir",
            "/tmp/n",
        ];
        let (slot, dir) = parse_daemon_cmdline(&ok).unwrap();
        assert_eq!(
            slot,
            SlotName {
                role: Role::Watchdog,
                id: 2
            }
        );
        assert_eq!(dir, "/tmp/n");
        let bad_role = [
            "/x/nexus",
            "daemon",
            "--role",
            "boss",
            "--id",
            "2",
            "--runtime-dir",
            "/t",
        ];
        assert!(parse_daemon_cmdline(&bad_role).is_none());
        let renamed = [
            "/opt/bin/supervisor",
            "daemon",
            "--role",
            "watchdog",
            "--id",
            "2",
            "--runtime-dir",
            "/t",
        ];
        assert!(
            parse_daemon_cmdline(&renamed).is_some(),
            "a copy under another name is still a daemon"
        );
        let extra = [
            "/x/nexus",
            "daemon",
            "--role",
            "watchdog",
            "--id",
            "2",
            "--runtime-dir",
            "/t",
            "--verbose",
        ];
        assert!(parse_daemon_cmdline(&extra).is_none());
        let zero = [
            "/x/nexus",
            "daemon",
            "--role",
            "watchdog",
            "--id",
            "0",
            "--runtime-dir",
            "/t",
        ];
        assert!(parse_daemon_cmdline(&zero).is_none());
        assert!(parse_daemon_cmdline(&["/x/nexus", "status"]).is_none());
    }

    #[test]
    fn reads_own_stat() {
        let me = std::process::id() as i32;
        assert!(start_ticks(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert_eq!(daemon_slot(me, Path::new("/tmp/nexus")), None);
    }
}
