//! The runtime directory: where it is, that it is safe, the paths inside it, and the
//! leader lock that decides which communicator is the master.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::config::SlotName;

pub const DEFAULT_DIR: &str = "/tmp/nexus";

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The runtime directory's paths. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Picks the directory: `--runtime-dir`, then `NEXUS_RUNTIME_DIR`, then the config's
    /// `runtime_dir`, then `/tmp/nexus`; made absolute so that every daemon's command line
    /// names the same directory whatever its working directory.
    pub fn resolve(flag: Option<&Path>, from_config: Option<&Path>) -> RuntimeDir {
        let env = std::env::var_os("NEXUS_RUNTIME_DIR").filter(|v| !v.is_empty());
        let chosen = flag
            .map(Path::to_path_buf)
            .or(env.map(PathBuf::from))
            .or(from_config.map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        RuntimeDir {
            path: absolute(&chosen),
        }
    }

    /// A directory named exactly (used by daemons, whose command line carries it).
    pub fn at(path: &Path) -> RuntimeDir {
        RuntimeDir {
            path: absolute(path),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn exists(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok()
    }

    /// Creates the directory (0700) if missing, then checks it like `check`.
    pub fn prepare(&self) -> Result<(), String> {
        if !self.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.path)
                .map_err(|e| format!("cannot create runtime directory {}: {e}", self.display()))?;
        }
        self.check()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.logs_dir())
            .map_err(|e| format!("cannot create {}: {e}", self.logs_dir().display()))?;
        Ok(())
    }

    /// Refuses a directory another user could tamper with: a symlink, someone else's, or
    /// open to group or others. Every socket and the lock live here, so this is the whole
    /// of the cluster's access control beyond the per-socket credential checks.
    pub fn check(&self) -> Result<(), String> {
        let d = self.display();
        let meta = fs::symlink_metadata(&self.path)
            .map_err(|e| format!("cannot inspect runtime directory {d}: {e}"))?;
        if meta.file_type().is_symlink() {
            return Err(format!(
                "runtime directory {d} is a symlink; refusing it (remove it or choose another with --runtime-dir)"
            ));
        }
        if !meta.is_dir() {
            return Err(format!(
                "runtime directory {d} exists but is not a directory"
            ));
        }
        let uid = nix::unistd::geteuid().as_raw();
        if meta.uid() != uid {
            return Err(format!(
                "runtime directory {d} belongs to uid {}, not to you (uid {uid}); choose another with --runtime-dir",
                meta.uid()
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "runtime directory {d} has mode {mode:03o}, open to group or others; fix it with: chmod 700 {d}"
            ));
        }
        let longest = self.heartbeat_socket(999);
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "runtime directory {d} is too long a path for Unix sockets (keep it under {} characters)",
                MAX_SOCKET_PATH - "/heartbeat_999.sock".len()
            ));
        }
        Ok(())
    }

    pub fn display(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    /// The task queue's socket, served by the master's queue thread.
    pub fn tasks_socket(&self) -> PathBuf {
        self.path.join("tasks.sock")
    }

    pub fn heartbeat_socket(&self, watchdog_id: u32) -> PathBuf {
        self.path.join(format!("heartbeat_{watchdog_id}.sock"))
    }

    pub fn leader_lock(&self) -> PathBuf {
        self.path.join("leader.lock")
    }

    pub fn events(&self) -> PathBuf {
        self.path.join("events.jsonl")
    }

    /// The config the cluster runs with, copied here by `start` so that every daemon,
    /// and every future master, reads the same one.
    pub fn config_file(&self) -> PathBuf {
        self.path.join("config.json")
    }

    /// Replaces config.json atomically (write, then rename): a daemon starting meanwhile
    /// reads the old config or the new one, never half of one.
    pub fn write_config(&self, cfg: &crate::config::Config) -> io::Result<()> {
        use std::io::Write;
        let path = self.config_file();
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(cfg.to_json().as_bytes())?;
        fs::rename(tmp, path)
    }

    /// Present while `stop` runs: a communicator that wins the lock then must not
    /// resurrect the cluster being stopped.
    pub fn stopping_marker(&self) -> PathBuf {
        self.path.join("stopping")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.path.join("logs")
    }

    pub fn log_file(&self, slot: SlotName) -> PathBuf {
        self.logs_dir().join(format!("{slot}.log"))
    }

    /// A private reply address for one CLI process (status queries to watchdogs).
    pub fn client_socket(&self) -> PathBuf {
        self.path
            .join(format!(".client_{}.sock", std::process::id()))
    }

    /// Every socket file in the directory: control, heartbeats, stale client sockets.
    pub fn socket_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect()
    }

    pub fn remove_sockets(&self) {
        for p in self.socket_files() {
            let _ = fs::remove_file(p);
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(p)
    };
    // Normalise `.` and `..` lexically; symlinks are deliberately not resolved, since the
    // safety check refuses a symlinked directory instead.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The exclusive flock on `leader.lock`. Whoever holds it is the master; the kernel
/// releases it when the holder dies, which is what wakes a standby. The file is opened
/// close-on-exec so no daemon the master spawns inherits the lock.
pub struct LeaderLock {
    file: File,
}

impl LeaderLock {
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
    }

    /// Takes the lock if free; `Ok(None)` if another process holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<LeaderLock>> {
        let file = Self::open(path)?;
        // SAFETY: flock on an fd we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(LeaderLock { file }));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(err)
        }
    }

    /// Blocks until the lock is ours (run on a helper thread by a standby).
    pub fn acquire_blocking(path: &Path) -> io::Result<LeaderLock> {
        let file = Self::open(path)?;
        loop {
            // SAFETY: as above.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(LeaderLock { file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Makes the lock survive our exec into a communicator (a daemon taking over when
    /// every communicator is gone) and returns the fd number to hand over.
    pub fn keep_across_exec(self) -> io::Result<i32> {
        use std::os::fd::IntoRawFd;
        let fd = self.file.into_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on an fd we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Takes back a lock handed over across exec by `keep_across_exec`.
    pub fn from_inherited(fd: i32) -> io::Result<LeaderLock> {
        use std::os::fd::FromRawFd;
        // SAFETY: re-arming close-on-exec; then checking we really hold the lock (flock
        // on the same open file description we hold succeeds at once).
        unsafe {
            if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(LeaderLock {
                file: File::from_raw_fd(fd),
            })
        }
    }

    /// Records the holder's pid: the whole content is `PID\n`, so `kill "$(cat
    /// leader.lock)"` works. Written in one pwrite at offset 0 (padded with spaces over a
    /// longer predecessor, then truncated), so a reader never finds the file empty or
    /// holding a mix of two pids, as it could between a truncate and a write.
    pub fn write_pid(&mut self, pid: u32) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let text = format!("{pid}\n");
        let old = self.file.metadata()?.len() as usize;
        let padded = format!("{text}{}", " ".repeat(old.saturating_sub(text.len())));
        self.file.write_all_at(padded.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)
    }

    /// The master's proof of life: its loop sets the file's mtime every interval, so any
    /// daemon can see a hung master with one stat and no load on the master.
    pub fn touch(&self) {
        // SAFETY: a null `times` means "now" for both timestamps.
        unsafe { libc::futimens(self.file.as_raw_fd(), std::ptr::null()) };
    }

    /// How long ago the holder last touched the file (wall clock: a large forward step
    /// of the clock can make a healthy master look late, which costs one failover).
    pub fn age(path: &Path) -> Option<std::time::Duration> {
        let modified = fs::metadata(path).ok()?.modified().ok()?;
        std::time::SystemTime::now().duration_since(modified).ok()
    }

    /// The pid written by the last holder (who may be dead: check before trusting it).
    pub fn recorded_pid(path: &Path) -> Option<i32> {
        let mut s = String::new();
        File::open(path).ok()?.read_to_string(&mut s).ok()?;
        s.trim().parse().ok()
    }

    /// Whether some process holds the lock right now (probes by trying to take it).
    pub fn is_held(path: &Path) -> bool {
        if !path.exists() {
            return false;
        }
        matches!(Self::try_acquire(path), Ok(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_prefers_flag_then_env_then_config() {
        let d = RuntimeDir::resolve(Some(Path::new("/a/b/../c")), Some(Path::new("/x")));
        assert_eq!(d.path(), Path::new("/a/c"));
        let d = RuntimeDir::resolve(None, Some(Path::new("/x")));
        if std::env::var_os("NEXUS_RUNTIME_DIR").is_none() {
            assert_eq!(d.path(), Path::new("/x"));
        }
    }

    #[test]
    fn unsafe_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        let err = RuntimeDir::at(&open).prepare().unwrap_err();
        assert!(err.contains("chmod 700"), "{err}");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(
            RuntimeDir::at(&link)
                .prepare()
                .unwrap_err()
                .contains("symlink")
        );

        let fresh = tmp.path().join("fresh/nested");
        RuntimeDir::at(&fresh).prepare().unwrap();
        let mode = fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn lock_is_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("leader.lock");
        let mut held = LeaderLock::try_acquire(&p).unwrap().unwrap();
        held.write_pid(42).unwrap();
        assert!(LeaderLock::try_acquire(&p).unwrap().is_none());
        assert_eq!(LeaderLock::recorded_pid(&p), Some(42));
        drop(held);
        assert!(LeaderLock::try_acquire(&p).unwrap().is_some());
    }
}
