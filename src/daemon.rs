//! What every role shares: its context, logging, signals as an event source, the
//! heartbeat sender, and one-way reports to the master.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::UnixStream as MioStream;

use crate::config::{Config, Role, SlotName};
use crate::protocol::{self, Datagram, Request};
use crate::runtime_dir::{LeaderLock, RuntimeDir};

/// Who this daemon is and the cluster it belongs to.
pub struct DaemonCtx {
    pub slot: SlotName,
    pub dir: RuntimeDir,
    pub config: Config,
    /// The binary to exec for every daemon we spawn: resolved once at start, so that a
    /// rebuild under our feet does not leave us pointing at a deleted file.
    pub exe: PathBuf,
    pub pid: i32,
}

impl DaemonCtx {
    /// Re-reads config.json after a SIGHUP. Ok(false): our slot is gone (scaled away;
    /// the master also SIGTERMs us), so the caller should exit.
    pub fn reload_config(&mut self) -> Result<bool, String> {
        let cfg = Config::load(&self.dir.config_file()).map_err(|e| e.to_string())?;
        trim_heap();
        if cfg.slot_index(self.slot).is_none() {
            return Ok(false);
        }
        log::info!("config reloaded");
        self.config = cfg;
        Ok(true)
    }

    /// This daemon's own log, rotated by size from its loop.
    pub fn log(&self) -> crate::logfiles::DaemonLog {
        let (max, keep) = (self.config.log_max_bytes, self.config.log_files);
        crate::logfiles::DaemonLog::new(self.dir.log_file(self.slot), max, keep)
    }
}

/// Gives the heap's free pages back to the kernel. Parsing a config with a hundred
/// services builds a JSON tree of a few hundred kB that is freed at once; without this its
/// pages stay in every daemon's resident set for good.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases memory that is free.
    unsafe { libc::malloc_trim(0) };
}

pub fn init_logging(tag: &str) {
    let tag = tag.to_string();
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Info);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {:<5} {} [{}] {}",
                crate::ledger::rfc3339_now(),
                record.level(),
                tag,
                std::process::id(),
                record.args()
            )
        })
        .init();
}

/// SIGTERM, SIGINT and SIGHUP delivered as readable bytes on a socket the event loop
/// polls, so a role handles a signal like any other event, outside signal context.
pub struct Signals {
    pub source: MioStream,
    terminate: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reload: std::sync::Arc<std::sync::atomic::AtomicBool>,
    child: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The write end the handlers wake us through (kept to register more signals).
    writer: std::os::unix::net::UnixStream,
}

impl Signals {
    /// Also SIGCHLD, for a workflow that hosts a program: its children and, as a child
    /// subreaper, the orphans of the program's tree.
    pub fn with_children() -> io::Result<Signals> {
        let mut s = Signals::new()?;
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGCHLD, flag.clone())?;
        signal_hook::low_level::pipe::register(
            signal_hook::consts::SIGCHLD,
            s.writer.try_clone()?,
        )?;
        s.child = Some(flag);
        Ok(s)
    }

    /// Whether a SIGCHLD arrived since the last call.
    pub fn take_child(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|f| f.swap(false, std::sync::atomic::Ordering::SeqCst))
    }

    pub fn new() -> io::Result<Signals> {
        let (read, write) = std::os::unix::net::UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let terminate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, terminate.clone())?;
            signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
        }
        // SIGHUP: the master changed config.json (reload, scale); re-read it.
        let reload = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, write.try_clone()?)?;
        Ok(Signals {
            source: MioStream::from_std(read),
            terminate,
            reload,
            child: None,
            writer: write,
        })
    }

    /// Drains the wake-up bytes; true if a termination signal has arrived.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 64];
        while matches!(self.source.read(&mut buf), Ok(n) if n > 0) {}
        self.terminate.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a SIGHUP arrived since the last call.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Sends this daemon's heartbeat to every watchdog but itself, each interval.
pub struct Heartbeater {
    sock: UnixDatagram,
    targets: Vec<PathBuf>,
    control: PathBuf,
    slot: SlotName,
    pid: i32,
    seq: u64,
    interval: Duration,
    next: Instant,
    /// When the last round went out.
    last: Option<Instant>,
    /// Until the master has our ready message we keep offering it with each beat.
    ready_told: bool,
    started: Instant,
    /// This round's datagram, and the targets whose queue was full when it was sent.
    msg: Vec<u8>,
    busy: Vec<usize>,
    retry_at: Option<Instant>,
    retries_left: u32,
    rng: Rng,
}

impl Heartbeater {
    pub fn new(ctx: &DaemonCtx) -> io::Result<Heartbeater> {
        let sock = UnixDatagram::unbound()?;
        // A hung watchdog's full queue must never block us.
        sock.set_nonblocking(true)?;
        let targets = (1..=ctx.config.watchdogs)
            .filter(|&n| !(ctx.slot.role == Role::Watchdog && ctx.slot.id == n))
            .map(|n| ctx.dir.heartbeat_socket(n))
            .collect();
        Ok(Heartbeater {
            sock,
            targets,
            control: ctx.dir.control_socket(),
            slot: ctx.slot,
            pid: ctx.pid,
            seq: 0,
            interval: ctx.config.interval(),
            next: Instant::now(),
            last: None,
            ready_told: false,
            started: Instant::now(),
            msg: Vec::new(),
            busy: Vec::new(),
            retry_at: None,
            retries_left: 0,
            rng: Rng::seeded(ctx.pid as u64),
        })
    }

    /// The master itself is ready by definition and sends no ready message.
    pub fn mark_ready_told(&mut self) {
        self.ready_told = true;
    }

    pub fn next_due(&self) -> Instant {
        self.retry_at.map_or(self.next, |r| r.min(self.next))
    }

    /// Beats if due; returns how many watchdogs took a full round's beat (None when no
    /// round was due; retries of a round return None too).
    pub fn tick(&mut self, now: Instant) -> Option<usize> {
        self.tick_shared(now, false)
    }

    /// `tick`, on a wake that also serves another timer of the loop (a hosting workflow's
    /// probe): a beat nearly due goes out now rather than waking the daemon again for it,
    /// since a wake costs more CPU than the beat (see `chore`); then without jitter, so
    /// the next beat falls on that timer's wake again.
    pub fn tick_shared(&mut self, now: Instant, shared: bool) -> Option<usize> {
        let due = beat_due(now, self.next, self.last, self.interval, shared);
        if self.retry_at.is_some_and(|t| now >= t) && !due {
            self.retry(now);
            return None;
        }
        if !due {
            return None;
        }
        self.seq += 1;
        self.last = Some(now);
        self.msg = protocol::encode(&Datagram::Heartbeat {
            role: self.slot.role,
            id: self.slot.id,
            pid: self.pid,
            seq: self.seq,
        });
        let mut delivered = 0;
        self.busy.clear();
        for (i, t) in self.targets.iter().enumerate() {
            match self.sock.send_to(&self.msg, t) {
                Ok(_) => delivered += 1,
                // A full queue: that watchdog is bound but did not drain it in time
                // (starved, or hung). Retried shortly, see `retry`.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.busy.push(i),
                Err(_) => {}
            }
        }
        let heard = delivered + self.busy.len() > 0 || self.targets.is_empty();
        log::trace!(
            "heartbeat {} taken by {delivered} watchdogs ({} busy)",
            self.seq,
            self.busy.len()
        );
        if heard && !self.ready_told {
            self.ready_told = send_request(
                &self.control,
                &Request::Ready {
                    role: self.slot.role,
                    id: self.slot.id,
                    pid: self.pid,
                },
            )
            .is_ok();
        }
        self.retries_left = MAX_RETRIES;
        self.retry_at = (!self.busy.is_empty()).then(|| now + self.retry_delay());
        // While starting up, the watchdogs' sockets or the master's may not exist yet:
        // retry soon rather than a whole interval later, for a couple of seconds.
        let early = self.started.elapsed() < Duration::from_secs(2);
        let soon = early && (!heard || !self.ready_told);
        self.next = if soon {
            now + self.interval.min(Duration::from_millis(5))
        } else {
            next_beat(now, self.interval, shared, self.rng.unit())
        };
        Some(delivered)
    }

    /// Resends this round's beat to the watchdogs whose queue was full.
    fn retry(&mut self, now: Instant) {
        let busy = std::mem::take(&mut self.busy);
        for i in busy {
            if let Err(e) = self.sock.send_to(&self.msg, &self.targets[i])
                && e.kind() == io::ErrorKind::WouldBlock
            {
                self.busy.push(i);
            }
        }
        self.retries_left = self.retries_left.saturating_sub(1);
        self.retry_at =
            (!self.busy.is_empty() && self.retries_left > 0).then(|| now + self.retry_delay());
    }

    /// 5 to 50 ms, at random, so the retries of many daemons do not collide again.
    fn retry_delay(&mut self) -> Duration {
        Duration::from_micros(5_000 + (self.rng.unit() * 45_000.0) as u64)
    }
}

/// Whether a beat due at `next` goes out at `now`: on its own deadline, or on a wake
/// shared with another timer once 0.9 of an interval has passed since the last beat —
/// as near as the jitter brings two beats anyway, so sharing never sends more of them
/// (whatever the other timer's rate, and while starting up, when `next` is only 5 ms
/// ahead). Pure.
fn beat_due(
    now: Instant,
    next: Instant,
    last: Option<Instant>,
    interval: Duration,
    shared: bool,
) -> bool {
    now >= next || (shared && last.is_some_and(|l| now >= l + interval.mul_f64(0.9)))
}

/// When the beat after one sent at `now` is due; `unit` is a random number in [0, 1).
/// Up to a tenth early, at random: a thousand daemons started in one burst drift apart
/// instead of flooding the watchdogs' queues (10 datagrams by default) in the same few
/// milliseconds of every interval. A beat on a shared wake is not jittered, so it keeps
/// that wake's phase; one that needed a wake of its own is, which also moves it within a
/// few beats to where the next one can share. Pure.
fn next_beat(now: Instant, interval: Duration, shared: bool, unit: f64) -> Instant {
    let jitter = if shared {
        Duration::ZERO
    } else {
        interval.mul_f64(unit * 0.1)
    };
    now + interval - jitter
}

/// Retries of one round's beat to a watchdog whose queue was full.
const MAX_RETRIES: u32 = 5;

/// xorshift64*: jitter needs spread, not cryptography.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng((t ^ seed.rotate_left(32)) | 1)
    }

    /// A number in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// A number in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Fire-and-forget delivery of one request line to the master: a non-blocking connect
/// and one small write, so a hung master can never stall the sender.
pub fn send_request(control: &Path, req: &Request) -> io::Result<()> {
    let mut stream = crate::client::connect_nonblocking(control)?;
    let line = protocol::encode_line(req);
    let n = stream.write(&line)?;
    if n != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to control socket",
        ));
    }
    Ok(())
}

/// Counts rejected input and logs it at most once a second, so garbage can neither
/// crash a daemon nor flood its log.
pub struct Rejections {
    pub count: u64,
    last_log: Option<Instant>,
}

impl Rejections {
    pub fn new() -> Rejections {
        Rejections {
            count: 0,
            last_log: None,
        }
    }

    pub fn reject(&mut self, what: std::fmt::Arguments<'_>) {
        self.count += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_log = Some(now);
            log::warn!("rejected ({} so far): {what}", self.count);
        }
    }
}

impl Default for Rejections {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits for events until `deadline` (rounded up, so we never spin); an interrupted
/// wait is just an early wake-up.
pub fn poll_until(
    poll: &mut mio::Poll,
    events: &mut mio::Events,
    deadline: Instant,
) -> Result<(), String> {
    let timeout = deadline.saturating_duration_since(Instant::now()) + Duration::from_micros(100);
    match poll.poll(events, Some(timeout)) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(format!("poll failed: {e}")),
        _ => Ok(()),
    }
}

/// What a non-communicator daemon learns from probing the leader lock.
pub enum Probe {
    /// Somebody is master.
    Fine,
    /// Nobody is: we hold the lock now and should become the master.
    TakeOver(LeaderLock),
    /// Nobody has been master for two timeouts and we cannot take over: exit, so that
    /// nothing runs unsupervised.
    GiveUp,
}

/// Watches for the loss of every communicator. One non-blocking flock per heartbeat:
/// it costs the master nothing, and fails (EWOULDBLOCK) as long as a master lives.
pub struct MasterProbe {
    lock: PathBuf,
    stopping: PathBuf,
    give_up_after: Duration,
    /// How long a live standby is left to take a free lock before anyone else does.
    standby_grace: Duration,
    masterless_since: Option<Instant>,
    /// Test-only (NEXUS_FAULT=no_takeover): probe but never take over.
    never_take_over: bool,
    /// leader.lock, kept open: the steady-state probe is one flock and one fstat.
    file: Option<std::fs::File>,
}

impl MasterProbe {
    pub fn new(ctx: &DaemonCtx) -> MasterProbe {
        MasterProbe {
            lock: ctx.dir.leader_lock(),
            stopping: ctx.dir.stopping_marker(),
            give_up_after: 2 * ctx.config.timeout(),
            standby_grace: ctx.config.interval(),
            masterless_since: None,
            never_take_over: std::env::var("NEXUS_FAULT")
                .is_ok_and(|f| f.split(',').any(|x| x == "no_takeover")),
            file: None,
        }
    }

    /// Whether someone holds the lock, with the file's age (its mtime is the master's
    /// proof of life). A free lock we grab here is released at once: taking over goes
    /// through `LeaderLock::try_acquire`, which owns its own descriptor.
    fn quick_probe(&mut self) -> Option<(bool, Option<Duration>)> {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.lock).ok();
        }
        let fd = self.file.as_ref()?.as_raw_fd();
        // SAFETY: flock on an fd we own.
        let held = if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(fd, libc::LOCK_UN) };
            false
        } else {
            io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
        };
        let age = nix::sys::stat::fstat(fd).ok().and_then(|st| {
            let mtime = std::time::UNIX_EPOCH
                + Duration::new(
                    st.st_mtime.max(0) as u64,
                    st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
                );
            std::time::SystemTime::now().duration_since(mtime).ok()
        });
        Some((held, age))
    }

    pub fn check(&mut self) -> Probe {
        if let Some((true, age)) = self.quick_probe()
            && self.masterless_since.is_none()
        {
            // The common case, a live master: nothing else to read.
            if age.is_some_and(|a| a >= self.give_up_after) {
                self.kill_master_if_hung();
            }
            return Probe::Fine;
        }
        let lock = match LeaderLock::try_acquire(&self.lock) {
            Ok(Some(lock)) => lock,
            Ok(None) if self.masterless_since.is_some() && !self.holder_is_master() => {
                // Held only for a moment by another daemon's probe: still no master.
                return self.give_up_if_overdue();
            }
            Ok(None) => {
                self.masterless_since = None;
                self.kill_master_if_hung();
                return Probe::Fine;
            }
            Err(_) => return Probe::Fine,
        };
        let since = *self.masterless_since.get_or_insert_with(Instant::now);
        // A standby blocked on the lock gets it a moment after the master dies; a probe
        // that happens to look in that moment must not race it. Only a standby that has
        // not taken the lock within an interval is taken as hung or gone.
        if since.elapsed() < self.standby_grace && self.standby_alive() {
            drop(lock);
            return Probe::Fine;
        }
        if !self.never_take_over && !self.stopping.exists() {
            return Probe::TakeOver(lock);
        }
        drop(lock);
        self.give_up_if_overdue()
    }

    /// The last line of defence for a hung master: its standby should kill it after one
    /// timeout; if the lock's mtime is still stale after two, the standby is hung or gone
    /// too, so any daemon does it. The lock then frees and a probing daemon takes over.
    /// Only through a pidfd, and only a communicator of this directory.
    fn kill_master_if_hung(&self) {
        if LeaderLock::age(&self.lock).is_none_or(|age| age < self.give_up_after) {
            return;
        }
        let Some(pid) = LeaderLock::recorded_pid(&self.lock) else {
            return;
        };
        let Ok(fd) = crate::spawn::pidfd_open(pid) else {
            return;
        };
        if !self.holder_is_master() {
            return;
        }
        log::warn!(
            "master pid {pid} has not shown life for two timeouts and no standby acted: killing it"
        );
        let _ = crate::spawn::pidfd_signal(&fd, libc::SIGKILL);
    }

    fn give_up_if_overdue(&self) -> Probe {
        match self.masterless_since {
            Some(t) if t.elapsed() >= self.give_up_after => Probe::GiveUp,
            _ => Probe::Fine,
        }
    }

    /// Whether a communicator of our directory other than us is alive (a standby).
    fn standby_alive(&self) -> bool {
        let Some(dir) = self.lock.parent() else {
            return false;
        };
        let me = std::process::id() as i32;
        crate::procscan::daemons_of(dir)
            .iter()
            .any(|f| f.slot.role == Role::Communicator && f.pid != me)
    }

    /// Whether the lock's recorded holder is a live communicator of our directory.
    fn holder_is_master(&self) -> bool {
        let Some(dir) = self.lock.parent() else {
            return false;
        };
        LeaderLock::recorded_pid(&self.lock)
            .and_then(|pid| crate::procscan::daemon_slot(pid, dir))
            .is_some_and(|slot| slot.role == Role::Communicator)
    }

    /// A takeover failed: count the time towards giving up.
    pub fn failed_takeover(&mut self) {
        self.masterless_since.get_or_insert_with(Instant::now);
        if self
            .masterless_since
            .is_some_and(|t| t.elapsed() >= self.give_up_after)
        {
            self.never_take_over = true;
        }
    }
}

/// Re-execs this process as the master: same pid, the lock kept across exec, the
/// command line of a free communicator slot. Returns only on failure (lock released).
pub fn take_over(ctx: &DaemonCtx, lock: LeaderLock) -> String {
    use std::os::unix::process::CommandExt;
    let taken: Vec<u32> = crate::procscan::daemons_of(ctx.dir.path())
        .iter()
        .filter(|f| f.slot.role == Role::Communicator)
        .map(|f| f.slot.id)
        .collect();
    let Some(id) = (1..=ctx.config.communicators).find(|id| !taken.contains(id)) else {
        return "every communicator slot is taken: leaving the lock to them".into();
    };
    let fd = match lock.keep_across_exec() {
        Ok(fd) => fd,
        Err(e) => return format!("cannot keep the lock across exec: {e}"),
    };
    log::warn!("no master and no communicator left: taking over as communicator-{id}");
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(&ctx.exe)
        .args([
            "daemon",
            "--role",
            "communicator",
            "--id",
            &id.to_string(),
            "--runtime-dir",
        ])
        .arg(ctx.dir.path())
        .env(crate::spawn::ENV_LEADER_FD, fd.to_string())
        .env(crate::spawn::ENV_TAKEOVER_FROM, ctx.slot.to_string())
        .exec();
    // SAFETY: exec failed, so the fd is still ours; closing it releases the lock.
    unsafe { libc::close(fd) };
    format!("cannot exec {}: {err}", ctx.exe.display())
}

/// The probe's verdict acted on, for the roles' loops: Ok(true) means exit now.
pub fn act_on_probe(ctx: &DaemonCtx, probe: &mut MasterProbe) -> bool {
    match probe.check() {
        Probe::Fine => false,
        Probe::TakeOver(lock) => {
            let why = take_over(ctx, lock);
            log::error!("takeover failed: {why}");
            probe.failed_takeover();
            false
        }
        Probe::GiveUp => {
            log::error!(
                "no master for two timeouts and none can be made: exiting so nothing runs unsupervised"
            );
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hosting workflow's loop: a probe each second on a grid, a beat each 2 s, each
    /// wake a little late. Returns the instants of the beats and how many wakes were the
    /// beat's alone.
    fn simulate(phase_ms: u64, seed: u64) -> (Vec<Instant>, usize) {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let late = Duration::from_micros(700);
        let mut rng = Rng(seed | 1);
        let mut next_probe = t0 + Duration::from_millis(phase_ms);
        let mut next = t0;
        let (mut beats, mut alone) = (Vec::new(), 0);
        for _ in 0..400 {
            let wake = next_probe.min(next) + late;
            let shared = next_probe <= wake + Duration::from_millis(1);
            if beat_due(wake, next, beats.last().copied(), interval, shared) {
                alone += usize::from(!shared);
                beats.push(wake);
                next = next_beat(wake, interval, shared, rng.unit());
            }
            if shared {
                next_probe += Duration::from_secs(1);
            }
        }
        (beats, alone)
    }

    #[test]
    fn beats_fall_into_step_with_a_probe_and_stay_an_interval_apart() {
        for (phase, seed) in (0..2000).step_by(37).zip(1..) {
            let (beats, alone) = simulate(phase, seed);
            let gaps: Vec<Duration> = beats.windows(2).map(|w| w[1] - w[0]).collect();
            // Never further apart than the interval (plus a wake's lateness) ...
            assert!(
                gaps.iter().all(|g| *g <= Duration::from_millis(2002)),
                "phase {phase}: {gaps:?}"
            );
            // ... nor nearer than the jitter brings them: the watchdogs get no more beats.
            assert!(
                gaps.iter().all(|g| *g >= Duration::from_millis(1800)),
                "phase {phase}: {gaps:?}"
            );
            // Within some beats every beat rides on a probe's wake.
            assert!(alone <= 40, "phase {phase}: {alone} wakes for a beat alone");
            assert!(beats.len() > 150, "{}", beats.len());
        }
    }

    #[test]
    fn alone_a_beat_is_due_on_its_deadline_and_jittered_by_a_tenth_at_most() {
        let t0 = Instant::now();
        let i = Duration::from_secs(2);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let last = Some(ms(0));
        assert!(!beat_due(ms(1999), ms(2000), last, i, false));
        assert!(beat_due(ms(2000), ms(2000), last, i, false));
        assert!(beat_due(ms(1800), ms(2000), last, i, true));
        assert!(!beat_due(ms(1799), ms(2000), last, i, true));
        // Starting up (the next beat 5 ms away): a fast timer's wakes add no beats.
        assert!(!beat_due(ms(3), ms(5), last, i, true));
        assert!(!beat_due(ms(3), ms(5), None, i, true));
        assert_eq!(next_beat(ms(0), i, true, 0.99), ms(2000));
        assert_eq!(next_beat(ms(0), i, false, 0.0), ms(2000));
        assert_eq!(next_beat(ms(0), i, false, 0.5), ms(1900));
    }
}
