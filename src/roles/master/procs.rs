//! The master's processes: pidfds in the poll, spawning, exits and their restarts,
//! adoption of daemons it did not spawn, and resizing to a new config. The hot path of a
//! crash is `on_exit`: spawn the replacement first; reap and record afterwards.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};

use super::slots::{Occupant, Proc, ProcState, Slot, StopReason};
use super::{CONN_BASE, Master, Owner, PIDFD_BASE};
use crate::config::SlotName;
use crate::daemon::DaemonCtx;
use crate::ledger::Event;
use crate::procscan;
use crate::restart_policy::{Backoff, mono_ms};
use crate::spawn;

impl Master {
    /// Registers a daemon's pidfd under a fresh token, so its exit wakes the loop.
    fn watch_pidfd(&mut self, poll: &Poll, fd: &OwnedFd) -> std::io::Result<Token> {
        let token = Token(self.next_token);
        self.next_token = if self.next_token + 1 >= CONN_BASE {
            PIDFD_BASE
        } else {
            self.next_token + 1
        };
        poll.registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(token)
    }

    fn unwatch(&mut self, poll: &Poll, proc: &Proc) {
        let _ = poll
            .registry()
            .deregister(&mut SourceFd(&proc.pidfd.as_raw_fd()));
        self.owners.remove(&proc.token);
    }

    pub(super) fn spawn_slot(&mut self, ctx: &DaemonCtx, poll: &Poll, i: usize) {
        let name = self.slots[i].name;
        self.slots[i].restart_at = None;
        match self.launcher.spawn(name, &ctx.dir.log_file(name)) {
            Ok((pid, fd)) => {
                let token = match self.watch_pidfd(poll, &fd) {
                    Ok(t) => t,
                    Err(e) => {
                        log::error!("cannot watch {name} pid {pid}: {e}; killing it");
                        let _ = spawn::pidfd_signal(&fd, libc::SIGKILL);
                        self.schedule_retry(ctx, i);
                        return;
                    }
                };
                self.owners.insert(token, Owner::Slot(name));
                self.slots[i].occupant = Some(Occupant::Proc(Proc::spawned(pid, fd, token)));
                self.ledger.append(&Event::about("spawned", name, pid));
            }
            Err(e) => {
                log::error!("cannot spawn {name}: {e}");
                self.schedule_retry(ctx, i);
            }
        }
    }

    /// How long slot `i` waits before its next start, per the restart policy.
    fn restart_delay(&mut self, ctx: &DaemonCtx, i: usize, lived: Duration) -> Duration {
        let jitter = self.rng.unit();
        let ms = self.slots[i].policy.next_delay(
            &Backoff::of(&ctx.config),
            mono_ms(),
            lived.as_millis() as u64,
            jitter,
        );
        Duration::from_millis(ms)
    }

    fn schedule_retry(&mut self, ctx: &DaemonCtx, i: usize) {
        let delay = self.restart_delay(ctx, i, Duration::ZERO);
        self.slots[i].restart_at = Some(Instant::now() + delay.max(Duration::from_millis(1)));
    }

    pub(super) fn run_due_restarts(&mut self, ctx: &DaemonCtx, poll: &Poll, now: Instant) {
        if self.stopping {
            return;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].occupant.is_none()
                && self.slots[i].restart_at.is_some_and(|t| t <= now)
            {
                self.spawn_slot(ctx, poll, i);
            }
        }
    }

    /// A daemon exited. The hot path is spawn; reaping and bookkeeping come after.
    pub(super) fn on_exit(&mut self, ctx: &DaemonCtx, poll: &Poll, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        // Spurious readiness is ignored: only a pidfd that has exited ends a process.
        let exited =
            matches!(&slot.occupant, Some(Occupant::Proc(p)) if spawn::has_exited(&p.pidfd));
        if !exited {
            return;
        }
        let Some(Occupant::Proc(proc)) = slot.occupant.take() else {
            return;
        };
        let now = Instant::now();
        let recovery = proc.state.exit_recovery(proc.pid, now);
        let name = slot.name;
        let manual = matches!(
            proc.state,
            ProcState::Stopping {
                reason: StopReason::Restart,
                ..
            }
        );
        if !self.stopping && manual {
            // Asked for: replaced at once, outside the backoff and the failure counts.
            self.slots[i].open_recoveries.push(recovery);
            self.spawn_slot(ctx, poll, i);
        } else if !self.stopping {
            let delay = self.restart_delay(ctx, i, now.duration_since(proc.started));
            let slot = &mut self.slots[i];
            slot.open_recoveries.push(recovery);
            slot.last_cause = Some(recovery.cause);
            slot.restarts += 1;
            if delay.is_zero() {
                self.spawn_slot(ctx, poll, i);
            } else {
                slot.restart_at = Some(now + delay);
                log::warn!("{name} restarts in {} ms (backoff)", delay.as_millis());
            }
        }
        // The replacement's exec is still running when posix_spawn returns (a vfork child
        // releases its parent before it has loaded the image), and the woken parent would
        // preempt it for the bookkeeping below. Let it finish first.
        if self.slots[i].occupant.is_some() {
            std::thread::yield_now();
        }
        // Reaping (the kernel frees the dead task then, tens of µs) and unwatching wait
        // until the replacement is on its way: the zombie keeps its pid from reuse.
        self.unwatch(poll, &proc);
        let how = if proc.ours {
            spawn::reap(proc.pid)
        } else {
            None
        };
        let mut ev = Event::about("exited", name, proc.pid);
        ev.cause = (!self.stopping).then(|| recovery.cause.as_str().to_string());
        ev.detail = how;
        self.ledger.append(&ev);
        log::info!(
            "{name} pid {} exited ({})",
            proc.pid,
            ev.detail.as_deref().unwrap_or("not our child")
        );
        let slot = &self.slots[i];
        if slot.policy.failed() && slot.occupant.is_none() {
            let mut ev = Event::new("failed");
            ev.role = Some(name.role);
            ev.id = Some(name.id);
            ev.detail = Some(format!(
                "more than {} restarts in {} ms; retrying every {} ms",
                ctx.config.restart_intensity,
                ctx.config.restart_period_ms,
                ctx.config.backoff_max_ms
            ));
            self.ledger.append(&ev);
        }
    }

    /// A process of a slot removed by a scale-down has ended.
    pub(super) fn on_retired_exit(&mut self, poll: &Poll, token: Token) {
        let Some(Owner::Retiring(name, proc)) = self.owners.remove(&token) else {
            return;
        };
        self.unwatch(poll, &proc);
        let mut ev = Event::about("retired", name, proc.pid);
        ev.detail = if proc.ours {
            spawn::reap(proc.pid)
        } else {
            None
        };
        self.ledger.append(&ev);
        log::info!("{name} pid {} retired", proc.pid);
    }

    /// Processes stopped on purpose that ignored SIGTERM for the grace period.
    pub(super) fn escalate_kills(&mut self, now: Instant) {
        let procs = self.slots.iter_mut().filter_map(Slot::proc_mut);
        let retiring = self.owners.values_mut().filter_map(|o| match o {
            Owner::Retiring(_, p) => Some(p),
            Owner::Slot(_) => None,
        });
        for p in procs.chain(retiring) {
            if p.state.take_due_kill(now) {
                log::warn!("pid {} ignored SIGTERM: SIGKILL", p.pid);
                let _ = spawn::pidfd_signal(&p.pidfd, libc::SIGKILL);
            }
        }
    }

    /// Takes over every running daemon of the directory: one pidfd each, so their exits
    /// wake us exactly like our own children's. Duplicates and strangers are killed.
    pub(super) fn adopt(&mut self, ctx: &DaemonCtx, poll: &Poll) {
        for found in procscan::daemons_of(ctx.dir.path()) {
            if found.pid == ctx.pid {
                continue;
            }
            let Some(fd) = procscan::open_daemon(found.pid, found.slot, ctx.dir.path()) else {
                continue;
            };
            let Some(i) = ctx.config.slot_index(found.slot) else {
                log::warn!(
                    "killing {} pid {}: not in the config",
                    found.slot,
                    found.pid
                );
                let _ = spawn::pidfd_signal(&fd, libc::SIGKILL);
                continue;
            };
            if let Some(existing) = self.slots[i].pid() {
                // Keep the older: it is the one the rest of the cluster knows.
                if procscan::start_ticks(existing) <= procscan::start_ticks(found.pid) {
                    log::warn!("killing duplicate {} pid {}", found.slot, found.pid);
                    let _ = spawn::pidfd_signal(&fd, libc::SIGKILL);
                    continue;
                }
                if let Some(Occupant::Proc(old)) = self.slots[i].occupant.take() {
                    log::warn!("killing duplicate {} pid {}", found.slot, old.pid);
                    self.unwatch(poll, &old);
                    let _ = spawn::pidfd_signal(&old.pidfd, libc::SIGKILL);
                }
            }
            let Ok(token) = self.watch_pidfd(poll, &fd) else {
                continue;
            };
            self.owners.insert(token, Owner::Slot(found.slot));
            self.slots[i].occupant = Some(Occupant::Proc(Proc::adopted(
                found.pid,
                fd,
                token,
                ctx.config.timeout(),
            )));
            log::info!("adopted {} pid {}", found.slot, found.pid);
        }
    }

    /// Moves to a new config: slots that stay keep their processes, new slots are
    /// spawned, removed ones are stopped (SIGTERM, then SIGKILL after the grace period, to
    /// which a removed workflow gets `service_grace` more: it may be stopping a program).
    pub(super) fn resize(&mut self, ctx: &DaemonCtx, poll: &Poll, service_grace: Duration) {
        let grace = Duration::from_millis(ctx.config.stop_grace_ms);
        let mut old: HashMap<SlotName, Slot> = self.slots.drain(..).map(|s| (s.name, s)).collect();
        self.slots = ctx
            .config
            .slots()
            .into_iter()
            .map(|name| old.remove(&name).unwrap_or_else(|| Slot::new(name)))
            .collect();
        for (name, slot) in old {
            if let Some(Occupant::Proc(mut p)) = slot.occupant {
                let grace = if name.role == crate::config::Role::Workflow {
                    grace + service_grace
                } else {
                    grace
                };
                // A process already being stopped keeps its own deadline.
                if p.state
                    .stop(StopReason::Retire, Instant::now() + grace)
                    .is_ok()
                {
                    let _ = spawn::pidfd_signal(&p.pidfd, libc::SIGTERM);
                }
                self.owners.insert(p.token, Owner::Retiring(name, p));
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].occupant.is_none() && self.slots[i].restart_at.is_none() {
                self.spawn_slot(ctx, poll, i);
            }
        }
        // Everyone re-reads config.json: new watchdog sockets, new timings. Those not yet
        // ready may have read the old file: they are told when they are.
        for p in self.slots.iter_mut().filter_map(Slot::proc_mut) {
            if p.state.on_reload() {
                let _ = spawn::pidfd_signal(&p.pidfd, libc::SIGHUP);
            }
        }
    }
}
