//! A communicator. The one holding `leader.lock` is the master (its slots, exits and
//! requests live in `master.rs`); the others are standbys: they heartbeat like any daemon
//! while a helper thread waits on the lock, and ping the master's loop to catch a hang.
//! When the kernel hands the lock over (the master died, or was killed for hanging), the
//! standby becomes master, adopting the running daemons from /proc and finishing the
//! failures its predecessor left open (read from the ledger).
//!
//! The loop's events: signals, the lock hand-over, and — as master — the control socket,
//! its connections and one pidfd per daemon; its timeout is the next deadline (heartbeat,
//! master ping, delayed restarts, SIGKILL escalations, systemd watchdog).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::net::UnixListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::{Role, SlotName};
use crate::daemon::{DaemonCtx, Heartbeater, Rejections, Signals, poll_until};
use crate::ledger::{Event, Ledger, unix_ms_now};
use crate::roles::master_watch::{KilledMaster, MasterWatch};
use crate::runtime_dir::LeaderLock;
use crate::spawn;

const SIGNALS: Token = Token(0);
const LOCK_HANDOVER: Token = Token(2);
use super::master::*;

struct Communicator {
    ctx: DaemonCtx,
    poll: Poll,
    heart: Heartbeater,
    master: Option<Master>,
    handover: Option<mpsc::Receiver<io::Result<LeaderLock>>>,
    /// A standby's health check of the master.
    watch: Option<MasterWatch>,
    killed_master: Option<KilledMaster>,
    log: crate::logfiles::DaemonLog,
    uid: u32,
}

pub fn run(ctx: DaemonCtx) -> Result<(), String> {
    let fresh = std::env::var_os(spawn::ENV_FRESH_START).is_some();
    let inherited: Option<i32> = std::env::var(spawn::ENV_LEADER_FD)
        .ok()
        .and_then(|v| v.parse().ok());
    let took_over_from = std::env::var(spawn::ENV_TAKEOVER_FROM).ok();
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
        .register(&mut signals.source, SIGNALS, Interest::READABLE)
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
        handover: None,
        watch: None,
        killed_master: None,
        log: ctx.log(),
        uid: nix::unistd::geteuid().as_raw(),
        ctx,
    };
    match lock {
        Some(lock) => comm.become_master(lock, fresh, took_over_from)?,
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
            if let Some(m) = comm.master.as_ref() {
                m.lock.touch();
            }
        }
        let mut wake = comm.heart.next_due();
        if let Some(w) = comm.watch.as_mut() {
            if let Some(k) = w.tick(now) {
                comm.killed_master = Some(k);
            }
            wake = wake.min(w.next_due());
        }
        if let Some(m) = comm.master.as_mut() {
            m.run_due_restarts(&comm.ctx, &comm.poll, now);
            m.escalate_kills(now);
            m.notify_status();
            if let Some(n) = m.notifier.as_mut() {
                n.tick(now);
                if let Some(t) = n.next_due() {
                    wake = wake.min(t);
                }
            }
            if let Some(t) = m.next_deadline() {
                wake = wake.min(t);
            }
        }
        poll_until(&mut comm.poll, &mut events, wake)?;
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if signals.drain() {
                        comm.terminate();
                        return Ok(());
                    }
                    if signals.take_reload() && comm.master.is_none() {
                        comm.reload_as_standby()?;
                    }
                }
                LOCK_HANDOVER => comm.on_handover()?,
                t => {
                    if let Some(m) = comm.master.as_mut() {
                        m.on_event(&comm.ctx, &comm.poll, t, comm.uid);
                    }
                }
            }
        }
        if let Some(m) = comm.master.as_mut() {
            m.expire_conns(&comm.poll);
        }
        if let Some(cfg) = comm.master.as_mut().and_then(|m| m.pending_config.take()) {
            comm.apply_config(cfg)?;
        }
        if comm.master.as_ref().is_some_and(|m| m.hand_over) {
            log::info!("restart requested: handing over to a standby");
            comm.terminate();
            return Ok(());
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
        let waker = Waker::new(self.poll.registry(), LOCK_HANDOVER)
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
        self.handover = Some(rx);
        self.watch = Some(MasterWatch::new(&self.ctx));
        log::info!("standby: waiting for the leader lock");
        Ok(())
    }

    fn on_handover(&mut self) -> Result<(), String> {
        let Some(rx) = self.handover.as_ref() else {
            return Ok(());
        };
        match rx.try_recv() {
            Ok(Ok(lock)) => {
                self.handover = None;
                self.watch = None;
                self.become_master(lock, false, None)
            }
            Ok(Err(e)) => Err(format!("waiting for the leader lock failed: {e}")),
            Err(_) => Ok(()),
        }
    }

    fn become_master(
        &mut self,
        mut lock: LeaderLock,
        fresh: bool,
        took_over_from: Option<String>,
    ) -> Result<(), String> {
        let dir = &self.ctx.dir;
        if !fresh && dir.stopping_marker().exists() {
            log::info!("the cluster is being stopped: not taking over");
            std::process::exit(0);
        }
        let previous = LeaderLock::recorded_pid(&dir.leader_lock()).filter(|&p| p != self.ctx.pid);
        let previous_slot = crate::ledger::last_master(&dir.events())
            .filter(|&(pid, _)| Some(pid) == previous)
            .map(|(_, slot)| slot);
        lock.write_pid(self.ctx.pid as u32)
            .map_err(|e| format!("cannot write leader.lock: {e}"))?;
        let left_slot = took_over_from.as_deref().and_then(SlotName::parse);
        // Read before we write anything to it ourselves.
        let history = crate::ledger::History::read(&dir.events());
        // Did we kill the old master for not answering? Then its recovery is a hang's.
        let hung = self
            .killed_master
            .take()
            .filter(|k| Some(k.pid) == previous);
        let previous_cause = if hung.is_some() {
            Cause::Hang
        } else {
            Cause::Failover
        };
        let hung_ms = hung.map_or(0, |k| k.silent_ms);

        // The control socket first: it is what clients are waiting for.
        let path = dir.control_socket();
        let _ = std::fs::remove_file(&path);
        let mut listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
        self.poll
            .registry()
            .register(&mut listener, CONTROL, Interest::READABLE)
            .map_err(|e| format!("cannot poll the control socket: {e}"))?;
        let ledger = Ledger::open(
            &dir.events(),
            self.ctx.config.log_max_bytes,
            self.ctx.config.log_files,
        )
        .map_err(|e| format!("cannot open the ledger: {e}"))?;

        let slots = self.ctx.config.slots().into_iter().map(Slot::new).collect();
        let mut m = Master {
            lock,
            listener,
            conns: HashMap::new(),
            next_conn: 0,
            slots,
            ledger,
            stopping: false,
            rejected: Rejections::new(),
            whole_logged: false,
            tokens: HashMap::new(),
            next_token: PIDFD_BASE,
            retiring: HashMap::new(),
            pending_config: None,
            hand_over: false,
            notifier: crate::notify::Notifier::from_env(),
            launcher: spawn::Launcher::new(&self.ctx.exe, dir)
                .map_err(|e| format!("cannot prepare spawning: {e}"))?,
            // A successor carries the counts on from the ledger; this takeover is one more.
            counters: if fresh {
                crate::counters::Counters::default()
            } else {
                let mut c = history.counters.clone();
                c.leader_changes += 1;
                c
            },
        };
        let me = self
            .ctx
            .config
            .slot_index(self.ctx.slot)
            .ok_or("our own slot is not in the config")?;
        m.slots[me].proc = Some(Proc {
            pid: self.ctx.pid,
            pidfd: None,
            child: false,
            started: Instant::now(),
            started_ms: unix_ms_now(),
            ready: true,
            votes: Vec::new(),
            killing: None,
            token: Token(0),
            manual: false,
            kill_at: None,
            reload_when_ready: false,
        });
        self.heart.mark_ready_told();
        m.adopt(&self.ctx, &self.poll);

        let mut ev = Event::new(if fresh { "started" } else { "leader" });
        ev.role = Some(Role::Communicator);
        ev.id = Some(self.ctx.slot.id);
        ev.pid = Some(self.ctx.pid);
        if !fresh {
            ev.old_pid = previous;
            ev.cause = Some("failover".into());
            ev.detail =
                left_slot.map(|from| format!("every communicator was gone; taken over by {from}"));
        }
        if let (Some(k), Some(slot)) = (hung, previous_slot) {
            let mut killed = Event::new("killed");
            killed.role = Some(slot.role);
            killed.id = Some(slot.id);
            killed.pid = Some(k.pid);
            killed.cause = Some("hang".into());
            killed.detect_ms = Some(k.silent_ms as f64);
            killed.detail = Some(format!(
                "the master did not answer for {} ms; killed by a standby",
                k.silent_ms
            ));
            m.ledger.append(&killed);
        }
        m.ledger.append(&ev);
        log::info!(
            "master of {} (previous master: {previous:?})",
            dir.display()
        );

        if !fresh {
            let takeover = Takeover {
                previous,
                previous_slot,
                previous_cause,
                hung_ms,
                left_slot,
                me: self.ctx.slot,
                my_pid: self.ctx.pid,
            };
            m.reconcile(&self.ctx, &takeover, &history);
        }
        // Watchdogs first, so the others find their sockets when they first beat.
        for role in [Role::Watchdog, Role::Communicator, Role::Workflow] {
            for i in 0..m.slots.len() {
                if m.slots[i].name.role == role && m.slots[i].proc.is_none() {
                    m.spawn_slot(&self.ctx, &self.poll, i);
                }
            }
        }
        self.master = Some(m);
        Ok(())
    }

    /// The master applies a reload or scale: config.json first (new daemons read it),
    /// then our own view, then the slots; every daemon is told with a SIGHUP.
    fn apply_config(&mut self, cfg: crate::config::Config) -> Result<(), String> {
        self.ctx
            .dir
            .write_config(&cfg)
            .map_err(|e| format!("cannot write config.json: {e}"))?;
        let changes = config_changes(&self.ctx.config, &cfg);
        self.ctx.config = cfg;
        self.heart = Heartbeater::new(&self.ctx)
            .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
        self.heart.mark_ready_told();
        self.log = self.ctx.log();
        if let Some(m) = self.master.as_mut() {
            let mut ev = Event::new("reloaded");
            ev.detail = Some(changes.join("; "));
            m.ledger.append(&ev);
            m.whole_logged = false;
            m.resize(&self.ctx, &self.poll);
        }
        Ok(())
    }

    fn reload_as_standby(&mut self) -> Result<(), String> {
        match self.ctx.reload_config() {
            Ok(true) => {
                self.heart = Heartbeater::new(&self.ctx)
                    .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
                self.heart.mark_ready_told();
                self.watch = Some(MasterWatch::new(&self.ctx));
                self.log = self.ctx.log();
                Ok(())
            }
            Ok(false) => {
                log::info!("our slot was scaled away");
                std::process::exit(0);
            }
            Err(e) => {
                log::warn!("cannot reload the config: {e}");
                Ok(())
            }
        }
    }

    fn terminate(&mut self) {
        if let Some(m) = self.master.as_mut() {
            // Unlink before the lock is released at exit: a standby binds only after it
            // holds the lock, so we can never remove its socket.
            let _ = std::fs::remove_file(self.ctx.dir.control_socket());
            let mut ev = Event::new(if m.stopping { "stopped" } else { "leader_exit" });
            ev.role = Some(Role::Communicator);
            ev.id = Some(self.ctx.slot.id);
            ev.pid = Some(self.ctx.pid);
            m.ledger.append(&ev);
        }
        log::info!("terminating on signal");
    }
}
