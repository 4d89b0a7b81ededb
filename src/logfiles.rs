//! Size-bounded log files: every daemon's `logs/ROLE-ID.log` and the master's ledger are
//! rotated by size, keeping a bounded number of old files, so logs can never fill a disk.
//! Each file has exactly one writer (the slot's one live process, or the master), so the
//! writer rotates it itself: no lock, no helper process.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `app.log` → `app.log.1` → … → `app.log.KEEP` (the oldest is dropped).
pub fn shift(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if keep == 0 {
        return fs::remove_file(path);
    }
    let _ = fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let _ = fs::rename(numbered(n), numbered(n + 1));
    }
    fs::rename(path, numbered(1))
}

/// The rotated files of `path`, newest first, that exist.
pub fn rotated(path: &Path, keep: u32) -> Vec<PathBuf> {
    (1..=keep.max(1))
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .take_while(|p| p.exists())
        .collect()
}

/// A daemon's own log: stdout and stderr point at it (set up by whoever spawned us).
pub struct DaemonLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
}

impl DaemonLog {
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> DaemonLog {
        DaemonLog {
            path,
            max_bytes,
            keep,
        }
    }

    /// One fstat; rotates when the file has grown past the limit.
    pub fn maybe_rotate(&self) {
        let size = fd_size(2);
        if size.is_none_or(|s| s < self.max_bytes) {
            return;
        }
        if let Err(e) = self.rotate() {
            log::warn!("cannot rotate {}: {e}", self.path.display());
        }
    }

    fn rotate(&self) -> io::Result<()> {
        shift(&self.path, self.keep)?;
        let fresh = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        nix::unistd::dup2(fresh.as_raw_fd(), 1)?;
        nix::unistd::dup2(fresh.as_raw_fd(), 2)?;
        log::info!("log rotated (kept {} older files)", self.keep);
        Ok(())
    }
}

fn fd_size(fd: i32) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|st| st.st_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_keeps_a_bounded_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        for i in 0..5 {
            fs::write(&p, format!("{i}")).unwrap();
            shift(&p, 2).unwrap();
        }
        assert!(!p.exists());
        assert_eq!(fs::read_to_string(dir.path().join("x.log.1")).unwrap(), "4");
        assert_eq!(fs::read_to_string(dir.path().join("x.log.2")).unwrap(), "3");
        assert!(!dir.path().join("x.log.3").exists());
        assert_eq!(rotated(&p, 2).len(), 2);
    }
}
