//! The master's side of a communicator: one slot per daemon of the config, a pidfd for
//! each process, the control socket's requests, and every respawn, restart, resize and
//! recovery record. The communicator's loop sees only this face: `start`, `tick` (the
//! timers; returns the next deadline), `on_event`, `after_events` and `apply_config`.
//!
//! - `slots`: a slot, its process's state machine, and the pure decisions over slots;
//! - `procs`: pidfds, spawning, exits, adoption, resizing (the hot path is `on_exit`:
//!   spawn first, then reap, then the ledger);
//! - `control`: the control socket's transport, bytes to requests and back;
//! - `requests`: one handler per request;
//! - `takeover`: what a new master inherits from its predecessor.

mod control;
mod procs;
mod requests;
mod slots;
mod takeover;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mio::{Poll, Token};

use crate::config::{Config, Role, SlotName};
use crate::counters::Counters;
use crate::daemon::{DaemonCtx, Rejections};
use crate::ledger::{Cause, Event, History, Ledger};
use crate::roles::master_watch::KilledMaster;
use crate::runtime_dir::LeaderLock;
use crate::spawn;

use control::ControlServer;
use slots::{Occupant, Proc, Slot};
use takeover::Takeover;

/// Every event source of a communicator's poll, by token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Signals,
    Control,
    LockHandover,
    /// A daemon's pidfd (tokens wrap around within their range; a token is forgotten
    /// when its process is, so a resize cannot misroute an exit).
    Pidfd(Token),
    /// A control connection.
    Conn(usize),
}

const PIDFD_BASE: usize = 1 << 20;
const CONN_BASE: usize = 1 << 30;

impl Source {
    pub fn token(self) -> Token {
        match self {
            Source::Signals => Token(0),
            Source::Control => Token(1),
            Source::LockHandover => Token(2),
            Source::Pidfd(t) => t,
            Source::Conn(id) => Token(CONN_BASE + id),
        }
    }

    pub fn of(token: Token) -> Option<Source> {
        Some(match token.0 {
            0 => Source::Signals,
            1 => Source::Control,
            2 => Source::LockHandover,
            t if (PIDFD_BASE..CONN_BASE).contains(&t) => Source::Pidfd(token),
            t if t >= CONN_BASE => Source::Conn(t - CONN_BASE),
            _ => return None,
        })
    }
}

/// How a communicator came to be master.
pub struct Origin {
    /// The first master of a `nexus start`.
    pub fresh: bool,
    /// A daemon that re-exec'd itself as communicator (every communicator was gone): the
    /// slot it served before.
    pub reexeced_from: Option<SlotName>,
    /// The master this standby killed for not answering, if that is why the lock came free.
    pub killed_master: Option<KilledMaster>,
}

/// What the communicator's loop does after a round of events.
pub enum Next {
    Continue,
    /// A validated config from `reload` or `scale`: write it, adopt it, then `apply_config`.
    Apply(Box<Config>),
    /// `nexus restart` of the master itself: exit, a standby takes over.
    HandOver,
}

/// Whose exit a pidfd token announces.
enum Owner {
    Slot(SlotName),
    /// A process of a slot removed by a scale-down, being stopped.
    Retiring(SlotName, Proc),
}

pub struct Master {
    lock: LeaderLock,
    control: ControlServer,
    slots: Vec<Slot>,
    owners: HashMap<Token, Owner>,
    next_token: usize,
    ledger: Ledger,
    stopping: bool,
    rejected: Rejections,
    whole_logged: bool,
    counters: Counters,
    pending_config: Option<Config>,
    exit_for_handover: bool,
    /// systemd's notify socket, when run under a Type=notify unit.
    notifier: Option<crate::notify::Notifier>,
    launcher: spawn::Launcher,
    rng: crate::daemon::Rng,
}

impl Master {
    /// Becomes the master of `ctx.dir`: binds the control socket first (it is what
    /// clients wait for), adopts every running daemon, finishes the failures the previous
    /// master left open, and spawns what is missing. `None` when the cluster is being
    /// stopped: then nobody must resurrect it, and the caller exits.
    pub fn start(
        ctx: &DaemonCtx,
        poll: &Poll,
        mut lock: LeaderLock,
        origin: Origin,
    ) -> Result<Option<Master>, String> {
        let dir = &ctx.dir;
        if !origin.fresh && dir.stopping_marker().exists() {
            log::info!("the cluster is being stopped: not taking over");
            return Ok(None);
        }
        let previous = LeaderLock::recorded_pid(&dir.leader_lock()).filter(|&p| p != ctx.pid);
        let previous_slot = crate::ledger::last_master(&dir.events())
            .filter(|&(pid, _)| Some(pid) == previous)
            .map(|(_, slot)| slot);
        lock.write_pid(ctx.pid as u32)
            .map_err(|e| format!("cannot write leader.lock: {e}"))?;
        // Read before we write anything to it ourselves.
        let history = History::read(&dir.events());
        // Did we kill the old master for not answering? Then its recovery is a hang's.
        let hung = origin.killed_master.filter(|k| Some(k.pid) == previous);

        let control = ControlServer::bind(&dir.control_socket(), poll)?;
        // The task queue has a thread of its own: no database write delays a respawn.
        let cfg = &ctx.config;
        let queue = crate::tasks::queue::spawn(crate::tasks::queue::Options {
            dir: dir.clone(),
            state_dir: cfg
                .state_dir
                .clone()
                .unwrap_or_else(|| crate::tasks::settings::default_state_dir(dir.path())),
            fresh: origin.fresh,
            ack_timeout: cfg.timeout().max(Duration::from_secs(2)),
            retention_count: cfg.task_retention_count,
            retention_ms: cfg.task_retention_ms,
            backoff: crate::tasks::lifecycle::RetryBackoff {
                initial_ms: 1000,
                max_ms: 60_000,
            },
            shared: cfg
                .queue_url
                .clone()
                .map(|url| crate::tasks::queue::Shared {
                    url,
                    host: cfg
                        .queue_host
                        .clone()
                        .unwrap_or_else(|| crate::tasks::settings::default_queue_host(dir.path())),
                    lease: Duration::from_millis(cfg.queue_lease_ms),
                }),
        });
        if let Err(e) = queue {
            log::warn!("no task queue: {e}");
        }
        let ledger = Ledger::open(
            &dir.events(),
            ctx.config.log_max_bytes,
            ctx.config.log_files,
        )
        .map_err(|e| format!("cannot open the ledger: {e}"))?;
        let mut m = Master {
            lock,
            control,
            slots: ctx.config.slots().into_iter().map(Slot::new).collect(),
            owners: HashMap::new(),
            next_token: PIDFD_BASE,
            ledger,
            stopping: false,
            rejected: Rejections::new(),
            whole_logged: false,
            // A successor carries the counts on from the ledger; this takeover is one more.
            counters: if origin.fresh {
                Counters::default()
            } else {
                let mut c = history.counters.clone();
                c.leader_changes += 1;
                c
            },
            pending_config: None,
            exit_for_handover: false,
            notifier: crate::notify::Notifier::from_env(),
            launcher: spawn::Launcher::new(&ctx.exe, dir)
                .map_err(|e| format!("cannot prepare spawning: {e}"))?,
            rng: crate::daemon::Rng::seeded(ctx.pid as u64),
        };
        let me = ctx
            .config
            .slot_index(ctx.slot)
            .ok_or("our own slot is not in the config")?;
        m.slots[me].occupant = Some(Occupant::Me {
            pid: ctx.pid,
            started_ms: crate::ledger::unix_ms_now(),
        });
        m.adopt(ctx, poll);

        let mut ev = Event::about(
            if origin.fresh { "started" } else { "leader" },
            ctx.slot,
            ctx.pid,
        );
        if !origin.fresh {
            ev.old_pid = previous;
            ev.cause = Some(Cause::Failover.as_str().into());
            ev.detail = origin
                .reexeced_from
                .map(|from| format!("every communicator was gone; taken over by {from}"));
        }
        if let (Some(k), Some(slot)) = (hung, previous_slot) {
            let mut killed = Event::about("killed", slot, k.pid);
            killed.cause = Some(Cause::Hang.as_str().into());
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

        if !origin.fresh {
            let takeover = Takeover {
                previous,
                previous_slot,
                previous_cause: if hung.is_some() {
                    Cause::Hang
                } else {
                    Cause::Failover
                },
                hung_ms: hung.map_or(0, |k| k.silent_ms),
                reexeced_from: origin.reexeced_from,
                me: ctx.slot,
                my_pid: ctx.pid,
            };
            m.reconcile(ctx, &takeover, &history);
        }
        // Watchdogs first, so the others find their sockets when they first beat.
        for role in [
            Role::Watchdog,
            Role::Communicator,
            Role::Workflow,
            Role::Http,
        ] {
            for i in 0..m.slots.len() {
                if m.slots[i].name.role == role && m.slots[i].occupant.is_none() {
                    m.spawn_slot(ctx, poll, i);
                }
            }
        }
        Ok(Some(m))
    }

    /// Each heartbeat: the lock's mtime is the master's proof of life; the ledger, which
    /// the hosting workflows append to as well, is rotated when full.
    pub fn on_heartbeat(&mut self) {
        self.lock.touch();
        self.ledger.rotate_if_full();
    }

    /// The timers: due restarts, SIGKILL escalations, systemd. Returns the next deadline.
    pub fn tick(&mut self, ctx: &DaemonCtx, poll: &Poll, now: Instant) -> Option<Instant> {
        self.run_due_restarts(ctx, poll, now);
        self.escalate_kills(now);
        self.notify_status();
        if let Some(n) = self.notifier.as_mut() {
            n.tick(now);
        }
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let kills = self.slots.iter().filter_map(|s| s.proc()?.state.kill_at());
        let retiring = self.owners.values().filter_map(|o| match o {
            Owner::Retiring(_, p) => p.state.kill_at(),
            Owner::Slot(_) => None,
        });
        let notifier = self.notifier.as_ref().and_then(|n| n.next_due());
        restarts
            .chain(kills)
            .chain(retiring)
            .chain(self.control.next_deadline())
            .chain(notifier)
            .min()
    }

    pub fn on_event(&mut self, ctx: &DaemonCtx, poll: &Poll, source: Source) {
        match source {
            Source::Control => self.control.accept_all(poll, &mut self.rejected),
            Source::Pidfd(token) => match self.owners.get(&token) {
                Some(Owner::Slot(name)) => {
                    if let Some(i) = ctx.config.slot_index(*name) {
                        self.on_exit(ctx, poll, i);
                    }
                }
                Some(Owner::Retiring(..)) => self.on_retired_exit(poll, token),
                None => {}
            },
            Source::Conn(id) => self.on_conn(ctx, poll, id),
            Source::Signals | Source::LockHandover => {}
        }
    }

    /// After a round of events: drop connections that took too long, and say what the
    /// loop must do next.
    pub fn after_events(&mut self, poll: &Poll) -> Next {
        self.control.expire(poll, &mut self.rejected);
        if let Some(cfg) = self.pending_config.take() {
            return Next::Apply(Box::new(cfg));
        }
        if self.exit_for_handover {
            return Next::HandOver;
        }
        Next::Continue
    }

    /// The communicator has written and adopted a new config (`ctx.config`; `old` is the
    /// one before): move the slots to it; every daemon is told with a SIGHUP.
    pub fn apply_config(&mut self, ctx: &DaemonCtx, poll: &Poll, old: &Config, changes: &[String]) {
        let mut ev = Event::new("reloaded");
        ev.detail = Some(changes.join("; "));
        self.ledger.append(&ev);
        self.whole_logged = false;
        // A retired workflow may first have to stop a removed service's program.
        let service_grace = old
            .services
            .iter()
            .map(|s| s.stop_grace_ms)
            .max()
            .unwrap_or(0);
        self.resize(ctx, poll, std::time::Duration::from_millis(service_grace));
    }

    /// The master is exiting (a signal, or a hand-over).
    pub fn terminate(&mut self, ctx: &DaemonCtx) {
        // Unlink before the lock is released at exit: a standby binds only after it holds
        // the lock, so we can never remove its socket.
        self.control.unlink();
        let event = if self.stopping {
            "stopped"
        } else {
            "leader_exit"
        };
        self.ledger.append(&Event::about(event, ctx.slot, ctx.pid));
    }

    /// `STATUS=` for systemd: how many slots run, and who is master.
    fn status_line(&self) -> String {
        let running = self.slots.iter().filter(|s| s.is_ready()).count();
        let count = |r: Role| self.slots.iter().filter(|s| s.name.role == r).count();
        format!(
            "{running}/{} daemons running ({} communicators, {} watchdogs, {} workflows); master pid {}",
            self.slots.len(),
            count(Role::Communicator),
            count(Role::Watchdog),
            count(Role::Workflow),
            std::process::id()
        )
    }

    fn notify_status(&mut self) {
        if self.notifier.is_some() {
            let line = self.status_line();
            if let Some(n) = self.notifier.as_mut() {
                n.status(&line);
            }
        }
    }
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One line per key that differs, for the reload's answer and the ledger.
pub fn config_changes(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut out: Vec<String> = b
        .iter()
        .filter(|(k, v)| *k != "services" && a.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k}: {} -> {v}",
                a.get(k).map_or("unset".to_string(), |x| x.to_string())
            )
        })
        .collect();
    out.extend(service_changes(old, new));
    if out.is_empty() {
        out.push("nothing changed".into());
    }
    out
}

/// One line per service added, removed, rescaled or redefined. Never a value: a
/// definition may hold secrets in its `env`.
fn service_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for s in &new.services {
        match old.service(&s.name) {
            None => out.push(format!(
                "service {}: added ({} instances)",
                s.name, s.instances
            )),
            Some(o) => {
                if o.definition_hash() != s.definition_hash() {
                    out.push(format!(
                        "service {}: definition changed (restarted)",
                        s.name
                    ));
                }
                if o.instances != s.instances {
                    out.push(format!(
                        "service {}: instances {} -> {}",
                        s.name, o.instances, s.instances
                    ));
                }
            }
        }
    }
    for o in &old.services {
        if new.service(&o.name).is_none() {
            out.push(format!("service {}: removed (stopped)", o.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_route_back_to_their_source() {
        for s in [
            Source::Signals,
            Source::Control,
            Source::LockHandover,
            Source::Pidfd(Token(PIDFD_BASE + 5)),
            Source::Conn(0),
            Source::Conn(77),
        ] {
            assert_eq!(Source::of(s.token()), Some(s));
        }
        assert_eq!(Source::of(Token(3)), None);
    }

    #[test]
    fn config_changes_name_each_key() {
        let old = Config::default();
        let new = Config {
            workflows: 6,
            ..Config::default()
        };
        assert_eq!(config_changes(&old, &new), vec!["workflows: 5 -> 6"]);
        assert_eq!(config_changes(&old, &old), vec!["nothing changed"]);
    }
}
