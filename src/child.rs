//! Starting any program: an argv, an environment, a working directory, an identity,
//! rlimits, its own process group, a cgroup to join, and the three standard streams.
//! The daemons' own respawn uses `spawn::Launcher` (posix_spawn, prepared once); a user's
//! program needs what posix_spawn cannot do (rlimits, setuid, joining a cgroup before the
//! first instruction), so it is fork + exec from a single-threaded workflow, which is also
//! what the bare C respawner the benchmarks compare against does.
//!
//! Everything the child needs is prepared before the fork; between fork and exec the child
//! makes raw system calls only (async-signal-safe). An exec that fails is reported through
//! a close-on-exec pipe, so the caller learns ENOENT or EACCES at once, with the errno.
//!
//! The child shares our memory until its exec (CLONE_VM | CLONE_VFORK, see `fork_into`),
//! so it touches nothing of ours but its arguments and errno.
//!
//! With a cgroup, the child is created inside it (clone3 with CLONE_INTO_CGROUP, and its
//! pidfd with CLONE_PIDFD) rather than moved there by a write to `cgroup.procs`: a move
//! takes the cgroup hierarchy's write lock and waits for an RCU grace period, 0.7 ms on an
//! idle machine here and 10-15 ms on a busy one, on the restart's hot path. Kernels before
//! 5.7 lack the flag; there the child moves itself as before.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A program, prepared to be started (possibly many times).
#[derive(Debug, Clone)]
pub struct Program {
    /// argv[0] as given; resolved through PATH at each start.
    pub argv: Vec<String>,
    /// The complete environment (`KEY=VALUE`).
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// uid, gid and supplementary groups to switch to (nexus running as root only).
    pub identity: Option<(u32, u32, Vec<u32>)>,
    /// (resource, value) for setrlimit, soft and hard.
    pub rlimits: Vec<(i32, u64)>,
}

/// Where the child's standard streams go.
pub struct Stdio {
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
}

/// Why a program could not be started.
#[derive(Debug)]
pub struct StartError {
    pub errno: i32,
    pub what: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.what,
            io::Error::from_raw_os_error(self.errno),
            errno_name(self.errno)
        )
    }
}

/// ENOENT, EACCES…: what users search for.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::ENOEXEC => "ENOEXEC",
        libc::EPERM => "EPERM",
        libc::ENOTDIR => "ENOTDIR",
        libc::E2BIG => "E2BIG",
        libc::ENOMEM => "ENOMEM",
        libc::ETXTBSY => "ETXTBSY",
        libc::ELOOP => "ELOOP",
        libc::EISDIR => "EISDIR",
        libc::EAGAIN => "EAGAIN",
        libc::EINVAL => "EINVAL",
        _ => "errno",
    }
}

/// The stage of the child that failed, reported with the errno.
const STAGE_EXEC: u8 = 0;
const STAGE_CHDIR: u8 = 1;
const STAGE_IDENTITY: u8 = 2;
const STAGE_RLIMIT: u8 = 3;
const STAGE_CGROUP: u8 = 4;
const STAGE_STDIO: u8 = 5;

fn c(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

/// `argv0` through `PATH` (of the program's own environment), as execvp would.
pub fn resolve(argv0: &str, env: &[String], cwd: Option<&Path>) -> Option<PathBuf> {
    if argv0.contains('/') {
        let p = Path::new(argv0);
        return Some(match (p.is_relative(), cwd) {
            (true, Some(dir)) => dir.join(p),
            _ => p.to_path_buf(),
        });
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(argv0))
        .find(|p| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).is_ok_and(|cp| {
                // SAFETY: a valid C string; access has no other preconditions.
                unsafe { libc::access(cp.as_ptr(), libc::X_OK) == 0 }
            }) && !p.is_dir()
        })
}

/// A cgroup to start the child in: its directory (for clone3) and its `cgroup.procs`
/// (for the child to move itself where clone3 cannot).
#[derive(Debug, Clone, Copy)]
pub struct CgroupFds {
    /// None where the child must not be created in it (see `tree::Cgroup::clean`).
    pub dir: Option<RawFd>,
    pub procs: RawFd,
}

/// `struct clone_args` of clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;

/// The child's stack in the shared-memory start: it makes a few system calls only.
const CHILD_STACK: usize = 64 * 1024;

/// Creates the child, in `cgroup` at once when the kernel can (see the module doc), and
/// returns its pid and pidfd if the kernel gave one, and whether it is already in its
/// cgroup. `quiet`: no SIGCHLD when it ends (its pidfd says so; a signal handler would run
/// first on the restart's hot path) — reap it with `__WALL`.
///
/// Where clone3 works the child shares our memory and we sleep until it has exec'd
/// (CLONE_VM | CLONE_VFORK, as posix_spawn does): a fork would first copy our page tables
/// and the exec would then throw the copy away, a tenth of a millisecond of a restart's
/// hot path here. That child runs `child(args)` on a stack of its own and never returns
/// here; elsewhere (a fork, an older kernel) the child gets 0 and the caller runs it.
fn fork_into(
    cgroup: Option<CgroupFds>,
    quiet: bool,
    args: &ChildArgs<'_>,
) -> (i32, Option<OwnedFd>, bool) {
    let into = cgroup.and_then(|c| c.dir);
    if into.is_some() || quiet {
        let mut pidfd: i32 = -1;
        let plain = CloneArgs {
            flags: CLONE_PIDFD | into.map_or(0, |_| CLONE_INTO_CGROUP),
            pidfd: &mut pidfd as *mut i32 as u64,
            exit_signal: if quiet { 0 } else { libc::SIGCHLD as u64 },
            cgroup: into.map_or(0, |fd| fd as u64),
            ..CloneArgs::default()
        };
        #[cfg(target_arch = "x86_64")]
        {
            let in_args = ChildArgs {
                cgroup_procs: if into.is_some() {
                    None
                } else {
                    args.cgroup_procs
                },
                ..*args
            };
            // u128: 16-byte aligned whatever the allocator, as the ABI wants the stack.
            let mut stack: Vec<u128> = Vec::with_capacity(CHILD_STACK / 16);
            let clone_args = CloneArgs {
                flags: plain.flags | CLONE_VM | CLONE_VFORK,
                stack: stack.as_mut_ptr() as u64,
                stack_size: CHILD_STACK as u64,
                ..plain
            };
            // SAFETY: every signal blocked while the child runs in our memory (it resets
            // the dispositions before it unblocks them), restored once it has exec'd. The
            // child runs `child` on its own stack with arguments that live in this frame,
            // which stays put while we sleep in the clone.
            let pid = unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                let mut old: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
                let pid = clone3_vfork(
                    &clone_args,
                    child_entry,
                    &in_args as *const ChildArgs<'_> as *const libc::c_void,
                );
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                pid
            };
            drop(stack);
            if pid > 0 {
                // SAFETY: the kernel stored a new fd for the child.
                let fd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
                return (pid as i32, fd, into.is_some());
            }
            if !older_kernel(-pid as i32) {
                // A real failure (EAGAIN at pids.max, ENOMEM): no retry another way, which
                // could start the program outside its cgroup's limits.
                set_errno(-pid as i32);
                return (-1, None, false);
            }
            // An older kernel: try a plain clone3, then fork.
        }
        // SAFETY: clone3 without CLONE_VM is fork with more arguments: the child gets a
        // copy of our (single-threaded) address space and runs only raw system calls.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &plain as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        } as i32;
        if pid >= 0 {
            // SAFETY: the kernel stored a new fd for the child (not in the child itself).
            let fd = (pid > 0 && pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
            return (pid, fd, into.is_some());
        }
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if !older_kernel(e) {
            return (-1, None, false);
        }
    }
    // SAFETY: as above; the child runs only raw system calls.
    (unsafe { libc::fork() }, None, false)
}

/// clone3's answers on a kernel that lacks it or one of our flags.
fn older_kernel(errno: i32) -> bool {
    matches!(errno, libc::ENOSYS | libc::EINVAL | libc::E2BIG)
}

fn set_errno(e: i32) {
    // SAFETY: our thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// clone3 whose child calls `entry(arg)` on the stack given in `args` and never returns.
/// Returns the child's pid, or -errno (it does not set errno).
///
/// # Safety
/// `args` must ask for a stack; `entry` must not return; with CLONE_VM it must only make
/// raw system calls.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vfork(
    args: &CloneArgs,
    entry: unsafe extern "C" fn(*const libc::c_void) -> !,
    arg: *const libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: the caller's contract. The parent gets rax = pid or -errno and jumps over
    // the child's part; the child (rax = 0, rsp = the top of its stack) calls `entry`,
    // which ends in exec or _exit. r12 and r13 survive the syscall in both.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// The shared-memory child's first function.
#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn child_entry(arg: *const libc::c_void) -> ! {
    // SAFETY: `arg` is the ChildArgs in the frame of `fork_into`, which waits for us.
    unsafe { child(*(arg as *const ChildArgs<'_>)) }
}

/// A program ready to be forked: its path resolved, every string converted, the signals
/// to reset found. Made once per definition, so a restart's hot path does no allocation
/// for them (only the per-run environment variable is added).
#[derive(Debug)]
pub struct Prepared {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    cwd: Option<CString>,
    cwd_display: Option<PathBuf>,
    identity: Option<(u32, u32)>,
    groups: Vec<libc::gid_t>,
    rlimits: Vec<(i32, u64)>,
    /// Signals not at their default: ignored ones (SIGPIPE, by Rust's runtime) would
    /// survive the exec, and a handled one must not run in a child that shares our
    /// memory (see `fork_into`), so the child resets them all. Read when the program is
    /// prepared: every daemon installs its handlers at its start, before any program is.
    not_default: Vec<i32>,
}

impl Prepared {
    pub fn new(prog: &Program) -> Result<Prepared, StartError> {
        let fail = |errno: i32, what: String| StartError { errno, what };
        let argv0 = prog
            .argv
            .first()
            .ok_or_else(|| fail(libc::EINVAL, "empty argv".into()))?;
        let path = resolve(argv0, &prog.env, prog.cwd.as_deref())
            .ok_or_else(|| fail(libc::ENOENT, format!("cannot find {argv0:?} in PATH")))?;
        let to_c = |s: &str| c(s).map_err(|_| fail(libc::EINVAL, format!("NUL byte in {s:?}")));
        let cwd = match &prog.cwd {
            Some(d) => Some(
                CString::new(d.as_os_str().as_bytes())
                    .map_err(|_| fail(libc::EINVAL, "NUL byte in cwd".into()))?,
            ),
            None => None,
        };
        let not_default = (1..=libc::SIGRTMAX())
            .filter(|&sig| {
                // SAFETY: querying a disposition into a zeroed sigaction we own.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                        && old.sa_sigaction != libc::SIG_DFL
                }
            })
            .collect();
        Ok(Prepared {
            path: CString::new(path.as_os_str().as_bytes())
                .map_err(|_| fail(libc::EINVAL, "NUL byte in the path".into()))?,
            argv: prog
                .argv
                .iter()
                .map(|a| to_c(a))
                .collect::<Result<_, _>>()?,
            env: prog.env.iter().map(|a| to_c(a)).collect::<Result<_, _>>()?,
            cwd,
            cwd_display: prog.cwd.clone(),
            identity: prog.identity.as_ref().map(|(u, g, _)| (*u, *g)),
            groups: prog
                .identity
                .as_ref()
                .map(|(_, _, g)| g.clone())
                .unwrap_or_default(),
            rlimits: prog.rlimits.clone(),
            not_default,
        })
    }

    fn path(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(self.path.as_bytes()))
    }
}

/// Starts `prog` in a new process group (pgid = its pid), optionally in a cgroup.
/// Returns its pid and a pidfd.
pub fn start(
    prog: &Program,
    stdio: &Stdio,
    cgroup: Option<CgroupFds>,
) -> Result<(i32, OwnedFd), StartError> {
    start_prepared(&Prepared::new(prog)?, None, stdio, cgroup, false)
}

/// Starts a prepared program, with one more environment variable if given. `quiet`: it
/// ends without a SIGCHLD (a service's program: its pidfd says when; reap with __WALL).
pub fn start_prepared(
    prep: &Prepared,
    extra_env: Option<&CString>,
    stdio: &Stdio,
    cgroup: Option<CgroupFds>,
    quiet: bool,
) -> Result<(i32, OwnedFd), StartError> {
    let fail = |errno: i32, what: String| StartError { errno, what };
    let mut argv_p: Vec<*const libc::c_char> = prep.argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = prep
        .env
        .iter()
        .chain(extra_env)
        .map(|a| a.as_ptr())
        .collect();
    env_p.push(std::ptr::null());

    let mut report = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(fail(e, "cannot create a pipe".into()));
    }
    // SAFETY: the fds were just created and are ours.
    let (report_r, report_w) = unsafe {
        (
            OwnedFd::from_raw_fd(report[0]),
            OwnedFd::from_raw_fd(report[1]),
        )
    };

    let args = ChildArgs {
        path: prep.path.as_ptr(),
        argv: argv_p.as_ptr(),
        env: env_p.as_ptr(),
        cwd: prep.cwd.as_ref().map(|c| c.as_ptr()),
        identity: prep.identity,
        groups: &prep.groups,
        rlimits: &prep.rlimits,
        not_default: &prep.not_default,
        cgroup_procs: cgroup.map(|c| c.procs),
        stdio: [stdio.stdin, stdio.stdout, stdio.stderr],
        report: report_w.as_raw_fd(),
    };
    // The workflow is single-threaded, and the child makes only raw, async-signal-safe
    // system calls on memory prepared before the fork.
    let (pid, clone_pidfd, in_cgroup) = fork_into(cgroup, quiet, &args);
    if pid < 0 {
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EAGAIN);
        return Err(fail(e, "fork failed".into()));
    }
    if pid == 0 {
        // SAFETY: in a forked child, see above.
        unsafe {
            child(ChildArgs {
                cgroup_procs: args.cgroup_procs.filter(|_| !in_cgroup),
                ..args
            })
        }
    }
    drop(report_w);
    // The child's pid cannot be reused before we reap it, so this pidfd is for it.
    let pidfd = match clone_pidfd {
        Some(fd) => Ok(fd),
        None => crate::spawn::pidfd_open(pid),
    };
    let mut msg = [0u8; 5];
    let n = read_full(report_r.as_raw_fd(), &mut msg);
    if n == 5 {
        let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        // The child has _exit'ed: reap it now.
        // SAFETY: waiting for our own child (__WALL: also one without an exit signal).
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL) };
        let what = match msg[0] {
            STAGE_CHDIR => format!("cannot enter the working directory {:?}", prep.cwd_display),
            STAGE_IDENTITY => "cannot switch to the configured user".into(),
            STAGE_RLIMIT => "cannot set a limit".into(),
            STAGE_CGROUP => "cannot join the service's cgroup".into(),
            STAGE_STDIO => "cannot set up the standard streams".into(),
            _ => exec_failure(prep.path(), errno),
        };
        return Err(fail(errno, what));
    }
    match pidfd {
        Ok(fd) => Ok((pid, fd)),
        Err(e) => {
            // SAFETY: killing and reaping our own child that we cannot watch.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
            }
            Err(fail(
                e.raw_os_error().unwrap_or(libc::EIO),
                "cannot open a pidfd".into(),
            ))
        }
    }
}

/// What went wrong with an exec, in words: an ENOENT for an existing file is its `#!`.
fn exec_failure(path: &Path, errno: i32) -> String {
    if errno == libc::ENOENT && path.exists() {
        format!(
            "cannot execute {}: its interpreter (the #! line) does not exist",
            path.display()
        )
    } else {
        format!("cannot execute {}", path.display())
    }
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    got
}

#[derive(Clone, Copy)]
struct ChildArgs<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    env: *const *const libc::c_char,
    cwd: Option<*const libc::c_char>,
    identity: Option<(u32, u32)>,
    groups: &'a [libc::gid_t],
    rlimits: &'a [(i32, u64)],
    not_default: &'a [i32],
    cgroup_procs: Option<RawFd>,
    stdio: [RawFd; 3],
    report: RawFd,
}

/// The child between fork and exec: raw system calls only.
unsafe fn child(a: ChildArgs<'_>) -> ! {
    unsafe fn die(report: RawFd, stage: u8) -> ! {
        // SAFETY: reading errno and writing five bytes to our pipe, then leaving.
        unsafe {
            let e = *libc::__errno_location();
            let b = e.to_ne_bytes();
            let msg = [stage, b[0], b[1], b[2], b[3]];
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    // SAFETY: every call below is async-signal-safe and uses memory prepared before fork.
    unsafe {
        // Signals: every disposition back to its default while all are still blocked
        // (the parent blocked them: a handler of ours must not run here), then nothing
        // blocked.
        for &sig in a.not_default {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::setpgid(0, 0);
        if let Some(fd) = a.cgroup_procs
            && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
        {
            die(a.report, STAGE_CGROUP);
        }
        for (target, &src) in a.stdio.iter().enumerate() {
            if src != target as RawFd && libc::dup2(src, target as RawFd) < 0 {
                die(a.report, STAGE_STDIO);
            }
            // dup2 onto itself keeps close-on-exec: clear it.
            let flags = libc::fcntl(target as RawFd, libc::F_GETFD);
            libc::fcntl(target as RawFd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        }
        for &(res, val) in a.rlimits {
            let lim = libc::rlimit {
                rlim_cur: val,
                rlim_max: val,
            };
            if libc::setrlimit(res as _, &lim) != 0 {
                die(a.report, STAGE_RLIMIT);
            }
        }
        if let Some(dir) = a.cwd
            && libc::chdir(dir) != 0
        {
            die(a.report, STAGE_CHDIR);
        }
        if let Some((uid, gid)) = a.identity
            // The system calls themselves, not libc's wrappers: those would ask every
            // thread of the process to switch too, and this child shares our memory.
            && (libc::syscall(libc::SYS_setgroups, a.groups.len(), a.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0)
        {
            die(a.report, STAGE_IDENTITY);
        }
        libc::execve(a.path, a.argv, a.env);
        die(a.report, STAGE_EXEC);
    }
}

/// How a process ended, as waitpid reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

impl Ended {
    pub fn from_status(status: i32) -> Ended {
        if libc::WIFSIGNALED(status) {
            Ended::Signal(libc::WTERMSIG(status))
        } else {
            Ended::Code(libc::WEXITSTATUS(status))
        }
    }

    pub fn clean(self) -> bool {
        self == Ended::Code(0)
    }

    pub fn describe(self) -> String {
        match self {
            Ended::Code(c) => format!("exit status {c}"),
            Ended::Signal(s) => format!("killed by {}", signal_name(s)),
        }
    }
}

pub fn signal_name(s: i32) -> String {
    nix::sys::signal::Signal::try_from(s).map_or(format!("signal {s}"), |sig| sig.to_string())
}

/// Reaps one child without blocking: `pid` exactly, or any (`-1`). Returns the pid and
/// how it ended; None if nothing (more) has ended.
pub fn reap(pid: i32) -> Option<(i32, Ended)> {
    let mut status = 0;
    // SAFETY: waitpid writes the status we own. __WALL: a service's program has no exit
    // signal (see `start_prepared`).
    let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
    (got > 0).then(|| (got, Ended::from_status(status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
            .into()
    }

    fn prog(argv: &[&str]) -> Program {
        Program {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: None,
            identity: None,
            rlimits: Vec::new(),
        }
    }

    fn wait(pid: i32) -> Ended {
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        Ended::from_status(status)
    }

    #[test]
    fn starts_in_its_own_group_with_the_given_env_cwd_and_limits() {
        // Forked (with an exit signal) and in shared memory (quiet: clone3 with CLONE_VM).
        for quiet in [false, true] {
            own_group_env_cwd_and_limits(quiet);
        }
    }

    /// `start`, with or without an exit signal.
    fn start_as(p: &Program, stdio: &Stdio, quiet: bool) -> Result<(i32, OwnedFd), StartError> {
        start_prepared(&Prepared::new(p)?, None, stdio, None, quiet)
    }

    fn own_group_env_cwd_and_limits(quiet: bool) {
        let out = tempfile::NamedTempFile::new().unwrap();
        let null = devnull();
        let stdio = Stdio {
            stdin: null.as_raw_fd(),
            stdout: out.as_file().as_raw_fd(),
            stderr: null.as_raw_fd(),
        };
        let mut p = prog(&[
            "sh",
            "-c",
            "echo $GREETING; pwd; ulimit -n; [ $(ps -o pgid= $$) -eq $$ ] && echo own-group",
        ]);
        p.env.push("GREETING=hello".into());
        p.cwd = Some(PathBuf::from("/tmp"));
        p.rlimits.push((libc::RLIMIT_NOFILE as i32, 77));
        let (pid, _fd) = start_as(&p, &stdio, quiet).unwrap();
        assert_eq!(wait(pid), Ended::Code(0));
        let said = std::fs::read_to_string(out.path()).unwrap();
        assert_eq!(said, "hello\n/tmp\n77\nown-group\n", "{said}");
    }

    #[test]
    fn exec_failures_come_back_with_the_errno() {
        for quiet in [false, true] {
            exec_failures(quiet);
        }
    }

    fn exec_failures(quiet: bool) {
        let start = |p: &Program, stdio: &Stdio, _: Option<CgroupFds>| start_as(p, stdio, quiet);
        let null = devnull();
        let stdio = Stdio {
            stdin: null.as_raw_fd(),
            stdout: null.as_raw_fd(),
            stderr: null.as_raw_fd(),
        };
        let e = start(&prog(&["/nonexistent/program"]), &stdio, None).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        let e = start(&prog(&["no-such-program-anywhere"]), &stdio, None).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        assert!(e.to_string().contains("ENOENT"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&script).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // Another test's fork may still hold the script's write fd for a moment (until
        // that child's exec closes it): ETXTBSY then, which says nothing of us. Retried.
        let mut e = start(&prog(&[script.to_str().unwrap()]), &stdio, None).unwrap_err();
        for _ in 0..100 {
            if e.errno != libc::ETXTBSY {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            e = start(&prog(&[script.to_str().unwrap()]), &stdio, None).unwrap_err();
        }
        assert_eq!(e.errno, libc::ENOENT, "{e}");
        assert!(e.to_string().contains("interpreter"), "{e}");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "data").unwrap();
        let e = start(&prog(&[plain.to_str().unwrap()]), &stdio, None).unwrap_err();
        assert_eq!(e.errno, libc::EACCES, "{e}");
        let mut p = prog(&["true"]);
        p.cwd = Some(PathBuf::from("/nonexistent-dir"));
        let e = start(&p, &stdio, None).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        assert!(e.to_string().contains("working directory"), "{e}");
    }

    #[test]
    fn a_child_is_started_inside_its_cgroup_where_one_is_writable() {
        let Some(cg) =
            crate::services::tree::Cgroup::open(&format!("nexus-unit-test-{}", std::process::id()))
        else {
            eprintln!("no writable cgroup v2 here: nothing to check");
            return;
        };
        let null = devnull();
        let stdio = Stdio {
            stdin: null.as_raw_fd(),
            stdout: null.as_raw_fd(),
            stderr: null.as_raw_fd(),
        };
        let prep = Prepared::new(&prog(&["sleep", "5"])).unwrap();
        let (pid, _fd) = start_prepared(&prep, None, &stdio, Some(cg.fds()), true).unwrap();
        assert!(cg.pids().contains(&pid), "{pid} in {:?}", cg.pids());
        assert!(cg.clean());
        assert!(cg.kill());
        assert!(!cg.clean(), "a killed cgroup is not created into again");
        assert_eq!(wait(pid), Ended::Signal(libc::SIGKILL));
        // The kernel would SIGKILL a child created in it now: it moves itself in instead.
        let short = Prepared::new(&prog(&["sh", "-c", "exit 7"])).unwrap();
        let (pid, _fd) = start_prepared(&short, None, &stdio, Some(cg.fds()), true).unwrap();
        assert_eq!(wait(pid), Ended::Code(7), "a start after a kill lives");
        assert!(cg.remove());
    }

    #[test]
    fn endings_are_described() {
        assert_eq!(Ended::Code(3).describe(), "exit status 3");
        assert_eq!(Ended::Signal(9).describe(), "killed by SIGKILL");
        assert!(Ended::Code(0).clean() && !Ended::Signal(15).clean());
    }
}
