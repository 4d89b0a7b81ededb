//! Exec'ing the universal binary into a role, pidfds, signals and reaping.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::config::SlotName;
use crate::runtime_dir::RuntimeDir;

/// Set on the first master only, by `nexus start`, so it can tell a fresh start from a
/// takeover; removed from the environment of everything it spawns.
pub const ENV_FRESH_START: &str = "NEXUS_FRESH_START";
/// Set by a daemon that re-execs itself as communicator holding the leader lock: the fd
/// number of that lock, and the slot it was before.
pub const ENV_LEADER_FD: &str = "NEXUS_LEADER_FD";
pub const ENV_TAKEOVER_FROM: &str = "NEXUS_TAKEOVER_FROM";

/// Starts `exe daemon --role R --id N --runtime-dir DIR` with stdin from /dev/null and
/// stdout/stderr appended to the slot's log. Returns the pid and a pidfd for it.
///
/// std's `Command` uses posix_spawn (vfork semantics) when nothing forces a full fork,
/// which is the cheapest way to start a process here; every fd we hold is close-on-exec.
pub fn spawn_daemon(exe: &Path, slot: SlotName, dir: &RuntimeDir) -> io::Result<(i32, OwnedFd)> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.log_file(slot))?;
    // Exec'ing our own image through /proc/self/exe keeps respawns working while the
    // binary is being rebuilt (the path may not exist for a moment) and keeps the whole
    // cluster on one version; argv[0] still names the path, as users' pgrep expects.
    let child = Command::new("/proc/self/exe")
        .arg0(exe)
        .arg("daemon")
        .arg("--role")
        .arg(slot.role.as_str())
        .arg("--id")
        .arg(slot.id.to_string())
        .arg("--runtime-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env_remove(ENV_FRESH_START)
        .env_remove(ENV_LEADER_FD)
        .env_remove(ENV_TAKEOVER_FROM)
        // No current_dir: daemons inherit "/" from the master, and setting it would need
        // posix_spawn_file_actions_addchdir_np, which std cannot find in a static binary,
        // so it would fall back from posix_spawn (vfork) to a full fork on every respawn.
        .spawn()?;
    let pid = child.id() as i32;
    // Our own unreaped child cannot have its pid reused, so this pidfd is for it.
    let fd = pidfd_open(pid)?;
    Ok((pid, fd))
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this fd (close-on-exec by definition).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Signals exactly the process the pidfd refers to: never a recycled pid.
pub fn pidfd_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: null siginfo is allowed; the fd is a valid pidfd we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the pidfd's process has exited (the fd polls readable once it has).
pub fn has_exited(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// Reaps a child of ours without blocking and describes how it ended; `None` for a
/// process we are not the parent of (an adopted daemon, reaped by init).
pub fn reap(pid: i32) -> Option<String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("exit status {code}")),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
        _ => None,
    }
}
