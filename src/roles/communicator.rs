//! A communicator. The one holding `leader.lock` is the master (its slots, exits and
//! requests live in `master/`); the others are standbys: they heartbeat like any daemon
//! while a helper thread waits on the lock, and ping the master's loop to catch a hang.
//! When the kernel hands the lock over (the master died, or was killed for hanging), the
//! standby becomes master, adopting the running daemons from /proc and finishing the
//! failures its predecessor left open (read from the ledger).
//!
//! The loop's events: signals, the lock hand-over, and — as master — the control socket,
//! its connections and one pidfd per daemon; its timeout is the next deadline (heartbeat,
//! master ping, delayed restarts, SIGKILL escalations, systemd watchdog).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Waker};

use super::master::{Master, Next, Origin, Source};
use crate::config::SlotName;
use crate::daemon::{DaemonCtx, Heartbeater, Signals, poll_until};
use crate::roles::master_watch::{KilledMaster, MasterWatch};
use crate::runtime_dir::LeaderLock;
use crate::spawn;

struct Communicator {
    ctx: DaemonCtx,
    poll: Poll,
    heart: Heartbeater,
    master: Option<Master>,
    /// A standby's helper thread blocked on the leader lock.
    lock_waiter: Option<mpsc::Receiver<io::Result<LeaderLock>>>,
    /// A standby's health check of the master.
    master_watch: Option<MasterWatch>,
    killed_master: Option<KilledMaster>,
    log: crate::logfiles::DaemonLog,
    /// Holds the programs' output pipes while their workflows are replaced.
    pipes: crate::services::keeper::PipeKeeper,
}

/// What the loop does after a standby's lock hand-over or a reload.
enum Outcome {
    Continue,
    /// Nothing left to do here: exit 0 (the cluster is being stopped, or our slot is gone).
    Exit,
}

pub fn run(ctx: DaemonCtx) -> Result<(), String> {
    let fresh = std::env::var_os(spawn::ENV_FRESH_START).is_some();
    let inherited: Option<i32> = std::env::var(spawn::ENV_LEADER_FD)
        .ok()
        .and_then(|v| v.parse().ok());
    let reexeced_from = std::env::var(spawn::ENV_TAKEOVER_FROM)
        .ok()
        .as_deref()
        .and_then(SlotName::parse);
    // SAFETY: single-threaded at this point; removing our own marker variables.
    unsafe {
        std::env::remove_var(spawn::ENV_FRESH_START);
        std::env::remove_var(spawn::ENV_LEADER_FD);
        std::env::remove_var(spawn::ENV_TAKEOVER_FROM);
    }
    if inherited.is_some() {
        // We were another daemon a moment ago: log as what we are now.
        redirect_output(&ctx.dir.log_file(ctx.slot));
    }
    raise_fd_limit();

    let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut signals = Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    poll.registry()
        .register(
            &mut signals.source,
            Source::Signals.token(),
            Interest::READABLE,
        )
        .map_err(|e| format!("cannot poll signals: {e}"))?;
    let heart =
        Heartbeater::new(&ctx).map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
    let lock_path = ctx.dir.leader_lock();
    let lock = match inherited {
        Some(fd) => Some(
            LeaderLock::from_inherited(fd).map_err(|e| format!("inherited leader lock: {e}"))?,
        ),
        None => LeaderLock::try_acquire(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?,
    };
    let mut comm = Communicator {
        poll,
        heart,
        master: None,
        lock_waiter: None,
        master_watch: None,
        killed_master: None,
        log: ctx.log(),
        pipes: crate::services::keeper::PipeKeeper::new(&ctx.dir),
        ctx,
    };
    match lock {
        Some(lock) => {
            let origin = Origin {
                fresh,
                reexeced_from,
                killed_master: None,
            };
            if let Outcome::Exit = comm.become_master(lock, origin)? {
                return Ok(());
            }
        }
        None if fresh => {
            let holder = LeaderLock::recorded_pid(&lock_path).unwrap_or(0);
            return Err(format!(
                "another master (pid {holder}) already runs in {}",
                comm.ctx.dir.display()
            ));
        }
        None => comm.wait_for_lock()?,
    }

    let mut events = Events::with_capacity(256);
    loop {
        let now = Instant::now();
        if comm.heart.tick(now).is_some() {
            comm.log.maybe_rotate();
            if let Some(m) = comm.master.as_mut() {
                m.on_heartbeat();
            }
            if !comm.ctx.config.services.is_empty() {
                comm.pipes.refresh();
            }
        }
        let mut wake = comm.heart.next_due();
        if let Some(w) = comm.master_watch.as_mut() {
            if let Some(k) = w.tick(now) {
                comm.killed_master = Some(k);
            }
            wake = wake.min(w.next_due());
        }
        if let Some(m) = comm.master.as_mut()
            && let Some(t) = m.tick(&comm.ctx, &comm.poll, now)
        {
            wake = wake.min(t);
        }
        poll_until(&mut comm.poll, &mut events, wake)?;
        for event in events.iter() {
            match Source::of(event.token()) {
                Some(Source::Signals) => {
                    if signals.drain() {
                        comm.terminate();
                        return Ok(());
                    }
                    if signals.take_reload()
                        && comm.master.is_none()
                        && let Outcome::Exit = comm.reload_as_standby()?
                    {
                        return Ok(());
                    }
                }
                Some(Source::LockHandover) => {
                    if let Outcome::Exit = comm.on_lock_handover()? {
                        return Ok(());
                    }
                }
                Some(source) => {
                    if let Some(m) = comm.master.as_mut() {
                        m.on_event(&comm.ctx, &comm.poll, source);
                    }
                }
                None => {}
            }
        }
        let next = match comm.master.as_mut() {
            Some(m) => m.after_events(&comm.poll),
            None => Next::Continue,
        };
        match next {
            Next::Continue => {}
            Next::Apply(cfg) => comm.apply_config(*cfg)?,
            Next::HandOver => {
                log::info!("restart requested: handing over to a standby");
                comm.terminate();
                return Ok(());
            }
        }
    }
}

fn redirect_output(log: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
    {
        let _ = nix::unistd::dup2(f.as_raw_fd(), 1);
        let _ = nix::unistd::dup2(f.as_raw_fd(), 2);
    }
}

/// A master at scale holds two fds per daemon (pidfd, connection bursts); the default
/// soft limit of 1024 is too low for a thousand workflows.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

impl Communicator {
    /// A standby: a small helper thread blocks on the lock and wakes the loop when the
    /// kernel hands it over, so our heartbeats go on meanwhile.
    fn wait_for_lock(&mut self) -> Result<(), String> {
        let waker = Waker::new(self.poll.registry(), Source::LockHandover.token())
            .map_err(|e| format!("cannot create waker: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let path = self.ctx.dir.leader_lock();
        std::thread::Builder::new()
            .name("leader-lock".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let _ = tx.send(LeaderLock::acquire_blocking(&path));
                let _ = waker.wake();
                // Keep the waker alive until the main loop has read the lock.
                std::thread::sleep(Duration::from_secs(1));
            })
            .map_err(|e| format!("cannot start the lock thread: {e}"))?;
        self.lock_waiter = Some(rx);
        self.master_watch = Some(MasterWatch::new(&self.ctx));
        log::info!("standby: waiting for the leader lock");
        Ok(())
    }

    fn on_lock_handover(&mut self) -> Result<Outcome, String> {
        let Some(rx) = self.lock_waiter.as_ref() else {
            return Ok(Outcome::Continue);
        };
        match rx.try_recv() {
            Ok(Ok(lock)) => {
                self.lock_waiter = None;
                self.master_watch = None;
                let origin = Origin {
                    fresh: false,
                    reexeced_from: None,
                    killed_master: self.killed_master.take(),
                };
                self.become_master(lock, origin)
            }
            Ok(Err(e)) => Err(format!("waiting for the leader lock failed: {e}")),
            Err(_) => Ok(Outcome::Continue),
        }
    }

    fn become_master(&mut self, lock: LeaderLock, origin: Origin) -> Result<Outcome, String> {
        match Master::start(&self.ctx, &self.poll, lock, origin)? {
            Some(m) => {
                self.heart.mark_ready_told();
                self.master = Some(m);
                Ok(Outcome::Continue)
            }
            None => Ok(Outcome::Exit),
        }
    }

    /// The master applies a reload or scale: config.json first (new daemons read it),
    /// then our own view, then the slots; every daemon is told with a SIGHUP.
    fn apply_config(&mut self, cfg: crate::config::Config) -> Result<(), String> {
        self.ctx
            .dir
            .write_config(&cfg)
            .map_err(|e| format!("cannot write config.json: {e}"))?;
        let changes = super::master::config_changes(&self.ctx.config, &cfg);
        let old = std::mem::replace(&mut self.ctx.config, cfg);
        self.rebuild_heart()?;
        if let Some(m) = self.master.as_mut() {
            m.apply_config(&self.ctx, &self.poll, &old, &changes);
        }
        drop(old);
        crate::daemon::trim_heap();
        Ok(())
    }

    /// After a config change: heartbeats to the new set of watchdogs, the new log limits.
    fn rebuild_heart(&mut self) -> Result<(), String> {
        self.heart = Heartbeater::new(&self.ctx)
            .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
        self.heart.mark_ready_told();
        self.log = self.ctx.log();
        Ok(())
    }

    fn reload_as_standby(&mut self) -> Result<Outcome, String> {
        match self.ctx.reload_config() {
            Ok(true) => {
                self.rebuild_heart()?;
                self.master_watch = Some(MasterWatch::new(&self.ctx));
                Ok(Outcome::Continue)
            }
            Ok(false) => {
                log::info!("our slot was scaled away");
                Ok(Outcome::Exit)
            }
            Err(e) => {
                log::warn!("cannot reload the config: {e}");
                Ok(Outcome::Continue)
            }
        }
    }

    fn terminate(&mut self) {
        if let Some(m) = self.master.as_mut() {
            m.terminate(&self.ctx);
        }
        log::info!("terminating on signal");
    }
}
