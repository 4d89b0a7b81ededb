//! Exec'ing the universal binary into a role, pidfds, signals and reaping.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::config::SlotName;
use crate::runtime_dir::RuntimeDir;

/// Set on the first master only, by `nexus start`, so it can tell a fresh start from a
/// takeover; removed from the environment of everything it spawns.
pub const ENV_FRESH_START: &str = "NEXUS_FRESH_START";
/// Set by a daemon that re-execs itself as communicator holding the leader lock: the fd
/// number of that lock, and the slot it was before.
pub const ENV_LEADER_FD: &str = "NEXUS_LEADER_FD";
pub const ENV_TAKEOVER_FROM: &str = "NEXUS_TAKEOVER_FROM";

/// Starts daemons: `exe daemon --role R --id N --runtime-dir DIR`, stdin from /dev/null,
/// stdout and stderr appended to the slot's log; returns the pid and a pidfd for it.
///
/// A respawn is on the hot path from a death to its replacement, so everything that does
/// not change between respawns (the environment, the paths, the fixed arguments) is
/// prepared once, and a spawn is one posix_spawn (vfork semantics: no copy of our page
/// tables) with the opens done in the child. std's `Command` rebuilt the environment,
/// opened and duplicated the files in the parent and queried rlimits on every call.
pub struct Launcher {
    /// Exec'ing our own image through /proc/self/exe keeps respawns working while the
    /// binary is being rebuilt (the path may not exist for a moment) and keeps the whole
    /// cluster on one version; argv[0] still names the path, as users' pgrep expects.
    image: CString,
    arg0: CString,
    runtime_dir: CString,
    /// Our environment as the master holds it: communicator::run has already taken out
    /// the marker variables that belonged to its own start.
    env: Vec<CString>,
    devnull: CString,
    attrs: SpawnAttrs,
}

impl Launcher {
    pub fn new(exe: &Path, dir: &RuntimeDir) -> io::Result<Launcher> {
        let env = std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                c_string(kv)
            })
            .collect::<io::Result<_>>()?;
        Ok(Launcher {
            image: c_string("/proc/self/exe")?,
            arg0: c_string(exe.as_os_str().as_bytes())?,
            runtime_dir: c_string(dir.path().as_os_str().as_bytes())?,
            env,
            devnull: c_string("/dev/null")?,
            attrs: SpawnAttrs::new()?,
        })
    }

    pub fn spawn(&self, slot: SlotName, log: &Path) -> io::Result<(i32, OwnedFd)> {
        let role = c_string(slot.role.as_str())?;
        let id = c_string(slot.id.to_string())?;
        let log = c_string(log.as_os_str().as_bytes())?;
        let fixed = [c"daemon", c"--role", c"--id", c"--runtime-dir"];
        let argv = [
            self.arg0.as_ptr(),
            fixed[0].as_ptr(),
            fixed[1].as_ptr(),
            role.as_ptr(),
            fixed[2].as_ptr(),
            id.as_ptr(),
            fixed[3].as_ptr(),
            self.runtime_dir.as_ptr(),
            std::ptr::null(),
        ];
        let envp: Vec<*const libc::c_char> = self
            .env
            .iter()
            .map(|v| v.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut actions = FileActions::new()?;
        actions.open(0, &self.devnull, libc::O_RDONLY, 0)?;
        actions.open(
            1,
            &log,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
            0o600,
        )?;
        actions.dup2(1, 2)?;
        let mut pid: libc::pid_t = 0;
        // SAFETY: every pointer is valid for the call: NUL-terminated strings owned by
        // `self` or this frame, NULL-terminated arrays, initialised actions and attrs.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                self.image.as_ptr(),
                &actions.0,
                &self.attrs.0,
                argv.as_ptr() as *const *mut libc::c_char,
                envp.as_ptr() as *const *mut libc::c_char,
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // Our own unreaped child cannot have its pid reused, so this pidfd is for it.
        let fd = pidfd_open(pid)?;
        Ok((pid, fd))
    }
}

fn c_string(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

/// posix_spawn_file_actions_t, destroyed on drop.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: zeroed storage is what posix_spawn_file_actions_init expects to fill.
        let mut a = FileActions(unsafe { std::mem::zeroed() });
        // SAFETY: `a.0` is valid storage.
        spawn_result(unsafe { libc::posix_spawn_file_actions_init(&mut a.0) })?;
        Ok(a)
    }

    fn open(&mut self, fd: i32, path: &CStr, flags: i32, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: initialised actions; glibc copies the path.
        spawn_result(unsafe {
            libc::posix_spawn_file_actions_addopen(&mut self.0, fd, path.as_ptr(), flags, mode)
        })
    }

    fn dup2(&mut self, from: i32, to: i32) -> io::Result<()> {
        // SAFETY: initialised actions.
        spawn_result(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, from, to) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// posix_spawnattr_t: the child starts with no signal blocked and SIGPIPE at its default
/// (Rust ignores SIGPIPE in every process it starts, and an ignored signal survives exec).
struct SpawnAttrs(libc::posix_spawnattr_t);

impl SpawnAttrs {
    fn new() -> io::Result<SpawnAttrs> {
        // SAFETY: zeroed storage is what posix_spawnattr_init expects to fill; the sigsets
        // are initialised by sigemptyset before use.
        unsafe {
            let mut a = SpawnAttrs(std::mem::zeroed());
            spawn_result(libc::posix_spawnattr_init(&mut a.0))?;
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            spawn_result(libc::posix_spawnattr_setsigmask(&mut a.0, &none))?;
            let mut pipe = none;
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            spawn_result(libc::posix_spawnattr_setsigdefault(&mut a.0, &pipe))?;
            let flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
            spawn_result(libc::posix_spawnattr_setflags(
                &mut a.0,
                flags as libc::c_short,
            ))?;
            Ok(a)
        }
    }
}

impl Drop for SpawnAttrs {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// posix_spawn's functions return the error number instead of setting errno.
fn spawn_result(rc: i32) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
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
