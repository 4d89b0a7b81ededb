//! A service instance's process tree, and how nothing of it survives a stop or restart.
//!
//! Three nets, because a program can slip through any one of them:
//! - its own process group (pgid = the main pid), which a shell's children share;
//! - a cgroup v2 of its own where one is writable (`cgroup.kill` ends everything in it,
//!   forks in flight included; `memory.max`, `pids.max` where those controllers are
//!   enabled);
//! - a token in its environment, `NEXUS_TREE=…`, inherited by every descendant, which
//!   finds a double-forked child that called setsid() on a machine without a cgroup.
//!
//! The hosting workflow is also a child subreaper, so orphans come back to it.
//!
//! A member is always signalled through a pidfd opened before its membership is checked
//! again, so a recycled pid is never hit.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::services::spec::Limits;
use crate::spawn;

/// The environment variable every process of an instance inherits.
pub const TREE_VAR: &str = "NEXUS_TREE";

#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// The directory, for a child to be created in (clone3's CLONE_INTO_CGROUP)...
    dir: fs::File,
    /// ...or `cgroup.procs`, for a child to write "0" into before its exec (older kernels,
    /// and a cgroup that may have been killed).
    procs: fs::File,
    /// Made by this process, so never killed before it was opened.
    made_here: bool,
}

thread_local! {
    /// Cgroups this process wrote `cgroup.kill` into. Once a cgroup has been killed, the
    /// kernel (6.18 here) SIGKILLs every child later created in it with CLONE_INTO_CGROUP,
    /// forever: fork's kill check compares the cgroup's kill count with the parent's.
    /// Such a cgroup is made again once empty, or entered by a write to `cgroup.procs`.
    static KILLED: std::cell::RefCell<BTreeSet<PathBuf>> = const {
        std::cell::RefCell::new(BTreeSet::new())
    };
}

impl Cgroup {
    /// The instance's cgroup below our own, created if missing; None where no cgroup v2
    /// hierarchy is writable (no delegation, cgroup v1 only, a container without it).
    pub fn open(name: &str) -> Option<Cgroup> {
        let base = own_cgroup_dir()?;
        let path = base.join(name);
        let made_here = match fs::create_dir(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(_) => return None,
        };
        if made_here {
            KILLED.with(|k| k.borrow_mut().remove(&path));
        }
        let mut cg = Cgroup::existing(&path)?;
        cg.made_here = made_here;
        Some(cg)
    }

    /// An existing cgroup (a predecessor's, being adopted).
    pub fn existing(path: &Path) -> Option<Cgroup> {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .ok()?;
        let dir = fs::File::open(path).ok()?;
        Some(Cgroup {
            path: path.to_path_buf(),
            dir,
            procs,
            made_here: false,
        })
    }

    /// Whether a child may be created in it directly: not if it was (or, being someone
    /// else's, may have been) killed.
    pub fn clean(&self) -> bool {
        self.made_here && !KILLED.with(|k| k.borrow().contains(&self.path))
    }

    pub fn fds(&self) -> crate::child::CgroupFds {
        crate::child::CgroupFds {
            dir: self.clean().then(|| self.dir.as_raw_fd()),
            procs: self.procs.as_raw_fd(),
        }
    }

    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILL to everything in it, in one write (kernel 5.14+); false where unsupported.
    pub fn kill(&self) -> bool {
        KILLED.with(|k| k.borrow_mut().insert(self.path.clone()));
        fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"))
            .is_ok()
    }

    /// Best effort once empty; a populated cgroup stays (adoption needs it).
    pub fn remove(&self) -> bool {
        fs::remove_dir(&self.path).is_ok()
    }

    /// Applies the limits its controllers allow; returns what was applied how, for status.
    fn apply(&self, limits: &Limits) -> Vec<String> {
        let mut out = Vec::new();
        let parent = self.path.parent().map(Path::to_path_buf);
        for (value, controller, file, key) in [
            (limits.memory_max, "memory", "memory.max", "memory_max"),
            (limits.pids_max, "pids", "pids.max", "pids_max"),
        ] {
            let Some(v) = value else { continue };
            if let Some(p) = &parent {
                enable_controller(p, controller);
            }
            if fs::write(self.path.join(file), v.to_string()).is_ok() {
                out.push(format!("{key}={v} (cgroup {file})"));
            }
        }
        out
    }
}

fn enable_controller(dir: &Path, controller: &str) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    if available.split_whitespace().any(|c| c == controller) {
        let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
    }
}

/// Our own cgroup's directory in the cgroup v2 hierarchy, if it is writable.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint options ... - fstype source superopts
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4))?
    })?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new(mount).join(rel.trim_start_matches('/'));
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a valid C string; access has no other preconditions.
    (unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0).then_some(dir)
}

/// Limits without a cgroup controller: rlimits for the child (resource, value) and what
/// they mean, for status.
pub fn rlimits_for(
    limits: &Limits,
    applied_by_cgroup: &[String],
    dedicated_user: bool,
) -> (Vec<(i32, u64)>, Vec<String>) {
    let by_cgroup = |key: &str| applied_by_cgroup.iter().any(|a| a.starts_with(key));
    let mut set = Vec::new();
    let mut said = Vec::new();
    if let Some(n) = limits.nofile {
        set.push((libc::RLIMIT_NOFILE as i32, n));
        said.push(format!("nofile={n} (rlimit NOFILE)"));
    }
    if let Some(m) = limits.memory_max
        && !by_cgroup("memory_max")
    {
        set.push((libc::RLIMIT_DATA as i32, m));
        said.push(format!(
            "memory_max={m} (rlimit DATA per process: no memory controller)"
        ));
    }
    if let Some(p) = limits.pids_max
        && !by_cgroup("pids_max")
    {
        if dedicated_user {
            set.push((libc::RLIMIT_NPROC as i32, p));
            said.push(format!(
                "pids_max={p} (rlimit NPROC of the service's user: no pids controller)"
            ));
        } else {
            said.push(format!(
                "pids_max={p} not enforced: no pids controller, and the service shares nexus's user"
            ));
        }
    }
    (set, said)
}

/// How an instance's processes are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub pgid: i32,
    pub token: String,
    pub cgroup: Option<PathBuf>,
}

/// The tree of one instance.
#[derive(Debug)]
pub struct Tree {
    pub id: Identity,
    pub cgroup: Option<Cgroup>,
}

impl Tree {
    pub fn new(id: Identity) -> Tree {
        let cgroup = id.cgroup.as_deref().and_then(Cgroup::existing);
        Tree { id, cgroup }
    }

    /// Every live process of the tree (zombies excluded).
    pub fn members(&self) -> Vec<i32> {
        let mut set: BTreeSet<i32> = BTreeSet::new();
        if let Some(cg) = &self.cgroup {
            set.extend(cg.pids());
        }
        for p in scan(&[&self.id]).into_iter().map(|(pid, _)| pid) {
            set.insert(p);
        }
        set.retain(|&p| crate::procscan::state(p).is_some_and(|s| s != 'Z'));
        set.into_iter().collect()
    }

    /// Sends `sig` to every member (after re-checking each through its pidfd). Returns how
    /// many were signalled.
    pub fn signal_all(&self, sig: i32) -> usize {
        if sig == libc::SIGKILL
            && let Some(cg) = &self.cgroup
        {
            cg.kill();
        }
        let mut n = 0;
        for pid in self.members() {
            let Ok(fd) = spawn::pidfd_open(pid) else {
                continue;
            };
            if self.is_member(pid) && spawn::pidfd_signal(&fd, sig).is_ok() {
                n += 1;
            }
        }
        n
    }

    fn is_member(&self, pid: i32) -> bool {
        if self
            .cgroup
            .as_ref()
            .is_some_and(|cg| cg.pids().contains(&pid))
        {
            return true;
        }
        membership(pid, &[&self.id]).is_some()
    }
}

/// Which of `ids` a process belongs to (by process group, then by its environment token).
fn membership(pid: i32, ids: &[&Identity]) -> Option<usize> {
    let pgrp = crate::procscan::pgrp(pid);
    if let Some(i) = ids
        .iter()
        .position(|id| Some(id.pgid) == pgrp && id.pgid > 0)
    {
        return Some(i);
    }
    let env = read_environ(pid)?;
    ids.iter().position(|id| {
        let needle = format!("{TREE_VAR}={}", id.token);
        env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes())
    })
}

fn read_environ(pid: i32) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = fs::File::open(format!("/proc/{pid}/environ")).ok()?;
    let mut buf = Vec::new();
    Read::by_ref(&mut f)
        .take(256 * 1024)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// One pass over /proc: every process of ours that belongs to one of `ids`, with the
/// index of its identity.
pub fn scan(ids: &[&Identity]) -> Vec<(i32, usize)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let uid = nix::unistd::geteuid().as_raw();
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            use std::os::unix::fs::MetadataExt;
            // Root's services may run as other users: root looks at everyone.
            uid == 0 || fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid)
        })
        .filter_map(|pid| Some((pid, membership(pid, ids)?)))
        .collect()
}

/// A fresh token for a new instance run: unique enough that no other process carries it.
pub fn new_token(rng: &mut crate::daemon::Rng) -> String {
    let a = (rng.unit() * u32::MAX as f64) as u64;
    let b = (rng.unit() * u32::MAX as f64) as u64;
    format!("{:016x}", (a << 32) | b)
}

/// Creates (or reopens) the instance's cgroup and applies the limits; what applies how.
pub fn prepare_cgroup(
    dir_tag: &str,
    instance: &str,
    limits: &Limits,
) -> (Option<Cgroup>, Vec<String>) {
    match Cgroup::open(&format!("nexus-{dir_tag}-{instance}")) {
        Some(cg) => {
            let applied = cg.apply(limits);
            (Some(cg), applied)
        }
        None => (None, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimits_stand_in_where_no_controller_does() {
        let limits = Limits {
            memory_max: Some(1 << 30),
            pids_max: Some(64),
            nofile: Some(1024),
        };
        let (set, said) = rlimits_for(&limits, &[], false);
        assert_eq!(set.len(), 2, "nofile and memory as rlimits: {said:?}");
        assert!(said.iter().any(|s| s.contains("not enforced")), "{said:?}");
        let (set, _) = rlimits_for(&limits, &["memory_max=1 (cgroup memory.max)".into()], true);
        assert_eq!(
            set.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            vec![libc::RLIMIT_NOFILE as i32, libc::RLIMIT_NPROC as i32]
        );
    }

    #[test]
    fn a_process_is_found_by_its_group_or_its_token() {
        let token = "feedfacecafe0001".to_string();
        // Owns the sleeper so that a failed assertion still kills and reaps it.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Reaped(
            std::process::Command::new("sleep")
                .arg("30")
                .env(TREE_VAR, &token)
                .spawn()
                .unwrap(),
        );
        let child = &mut child.0;
        let pid = child.id() as i32;
        let by_token = Identity {
            pgid: 0,
            token: token.clone(),
            cgroup: None,
        };
        let other = Identity {
            pgid: 0,
            token: "0000000000000000".into(),
            cgroup: None,
        };
        // The parent is released during exec, before the kernel has laid out the new
        // environment: until then /proc/pid/environ reads empty, so poll for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = scan(&[&other, &by_token]);
        while !found.contains(&(pid, 1)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            found = scan(&[&other, &by_token]);
        }
        assert!(found.contains(&(pid, 1)), "{found:?}");
        let tree = Tree::new(by_token);
        assert_eq!(tree.members(), vec![pid]);
        assert_eq!(tree.signal_all(libc::SIGKILL), 1);
        child.wait().unwrap();
        assert!(tree.members().is_empty());
    }
}
