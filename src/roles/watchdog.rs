//! A watchdog: receives heartbeats on `heartbeat_N.sock`, and reports to the master any
//! slot it has not heard from for longer than the timeout — including one it never heard
//! from at all. The master decides; the watchdog only testifies.

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use mio::net::UnixDatagram;
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, UnixAddr, sockopt};

use crate::config::SlotName;
use crate::daemon::{
    DaemonCtx, Heartbeater, MasterProbe, Rejections, Signals, act_on_probe, poll_until,
    send_request,
};
use crate::protocol::{self, Age, Datagram, Request};

const SIGNALS: Token = Token(0);
const SOCKET: Token = Token(1);

/// What this watchdog knows of one slot.
struct Heard {
    slot: SlotName,
    /// Last heartbeat, or our own start while we have heard nothing.
    last: Instant,
    /// The pid of the last heartbeat; 0 if none yet.
    pid: i32,
    heard: bool,
    /// When to report this slot as silent (pushed forward after each report so a
    /// silent slot is reported once per timeout, not on every wake-up).
    due: Instant,
}

impl Heard {
    /// A slot we have not heard from yet: it gets a whole timeout from `now`.
    fn unheard(slot: SlotName, now: Instant, timeout: Duration) -> Heard {
        Heard {
            slot,
            last: now,
            pid: 0,
            heard: false,
            due: now + timeout,
        }
    }
}

struct Watchdog {
    ctx: DaemonCtx,
    sock: UnixDatagram,
    heard: Vec<Heard>,
    rejected: Rejections,
    /// Earliest `due` among all slots: the loop sleeps until then. Heartbeats only move
    /// a slot's `due` later, so this stays a safe lower bound without rescanning per beat.
    next_check: Instant,
    /// Heartbeats accepted, for `nexus metrics`.
    received: u64,
    /// When the loop last ran, to notice that we ourselves were stopped or starved.
    last_wake: Instant,
    uid: u32,
}

pub fn run(ctx: DaemonCtx) -> Result<(), String> {
    let path = ctx.dir.heartbeat_socket(ctx.slot.id);
    // Our id is ours alone (the master spawns one process per slot), so whatever file is
    // there is a dead predecessor's socket.
    let _ = std::fs::remove_file(&path);
    let sock =
        bind_with_credentials(&path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    let bound_inode = socket_inode(&path);

    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut signals = Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut heart =
        Heartbeater::new(&ctx).map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
    let now = Instant::now();
    let timeout = ctx.config.timeout();
    let heard = ctx
        .config
        .slots()
        .into_iter()
        .map(|slot| Heard::unheard(slot, now, timeout))
        .collect();
    let mut dog = Watchdog {
        sock,
        heard,
        rejected: Rejections::new(),
        next_check: now + timeout,
        last_wake: now,
        received: 0,
        uid: nix::unistd::geteuid().as_raw(),
        ctx,
    };
    let reg = poll.registry();
    reg.register(&mut signals.source, SIGNALS, Interest::READABLE)
        .and_then(|_| reg.register(&mut dog.sock, SOCKET, Interest::READABLE))
        .map_err(|e| format!("cannot poll: {e}"))?;
    log::info!("watchdog {} listening on {}", dog.ctx.slot, path.display());

    let mut probe = MasterProbe::new(&dog.ctx);
    let mut pipes = crate::services::keeper::PipeKeeper::new(&dog.ctx.dir);
    let log = dog.ctx.log();
    let mut events = Events::with_capacity(64);
    loop {
        if heart.tick(Instant::now()).is_some() {
            log.maybe_rotate();
            if act_on_probe(&dog.ctx, &mut probe) {
                return Ok(());
            }
            if !dog.ctx.config.services.is_empty() {
                pipes.refresh();
            }
            // Nobody can reach a socket whose file was removed or replaced: exit, and the
            // master respawns us with a fresh one.
            if socket_inode(&path) != bound_inode {
                return Err(format!(
                    "{} was removed or replaced; exiting to be respawned",
                    path.display()
                ));
            }
        }
        let wake = heart.next_due().min(dog.next_check);
        poll_until(&mut poll, &mut events, wake)?;
        for event in events.iter() {
            match event.token() {
                SIGNALS if signals.drain() => {
                    log::info!("terminating on signal");
                    let _ = std::fs::remove_file(&path);
                    return Ok(());
                }
                SIGNALS if signals.take_reload() => match dog.reload() {
                    Ok(true) => {
                        heart = Heartbeater::new(&dog.ctx)
                            .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
                        heart.mark_ready_told();
                        probe = MasterProbe::new(&dog.ctx);
                    }
                    Ok(false) => return Ok(()),
                    Err(e) => log::warn!("cannot reload the config: {e}"),
                },
                SOCKET => dog.receive_all(),
                _ => {}
            }
        }
        dog.notice_own_stall();
        if Instant::now() >= dog.next_check {
            dog.check_silence();
        }
    }
}

/// SO_PASSCRED must be on before the name exists: a heartbeat sent between bind and
/// setsockopt would arrive without credentials and be rejected, while its sender, whose
/// datagram was taken, already counts itself as heard.
fn bind_with_credentials(path: &std::path::Path) -> io::Result<UnixDatagram> {
    let fd = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::Datagram,
        socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::PassCred, &true)?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixDatagram::from_std(
        std::os::unix::net::UnixDatagram::from(fd),
    ))
}

fn socket_inode(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

impl Watchdog {
    fn receive_all(&mut self) {
        // Bounded so a flood cannot starve our own heartbeats and silence checks.
        for _ in 0..1024 {
            match self.receive_one() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::warn!("receive failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads one datagram with the sender's kernel credentials. Ok(false): queue empty.
    fn receive_one(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; protocol::MAX_DATAGRAM + 1];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let (len, truncated, creds, from) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<UnixAddr>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            let creds = msg.cmsgs().ok().and_then(|mut it| {
                it.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(c) => Some((c.pid(), c.uid())),
                    _ => None,
                })
            });
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            (msg.bytes, truncated, creds, msg.address)
        };
        let Some((sender_pid, sender_uid)) = creds else {
            self.rejected
                .reject(format_args!("datagram without sender credentials"));
            return Ok(true);
        };
        if sender_uid != self.uid {
            self.rejected.reject(format_args!(
                "datagram from uid {sender_uid} (pid {sender_pid})"
            ));
            return Ok(true);
        }
        if truncated || len > protocol::MAX_DATAGRAM {
            self.rejected.reject(format_args!(
                "oversized datagram ({len} bytes) from pid {sender_pid}"
            ));
            return Ok(true);
        }
        match protocol::decode::<Datagram>(&buf[..len], protocol::MAX_DATAGRAM) {
            Ok(Datagram::Heartbeat { role, id, pid, .. }) => {
                let slot = SlotName { role, id };
                if pid != sender_pid {
                    self.rejected.reject(format_args!(
                        "heartbeat claiming {slot} pid {pid} sent by pid {sender_pid}"
                    ));
                } else if let Some(i) = self.ctx.config.slot_index(slot) {
                    let now = Instant::now();
                    let h = &mut self.heard[i];
                    if h.pid != pid {
                        log::debug!("first heartbeat from {slot} pid {pid}");
                    }
                    self.received += 1;
                    h.last = now;
                    h.pid = pid;
                    h.heard = true;
                    h.due = now + self.ctx.config.timeout();
                } else {
                    self.rejected
                        .reject(format_args!("heartbeat from unknown slot {slot}"));
                }
            }
            Ok(Datagram::Query {}) => self.answer_query(from),
            Ok(other) => self
                .rejected
                .reject(format_args!("unexpected datagram {other:?}")),
            Err(e) => self
                .rejected
                .reject(format_args!("{e} (from pid {sender_pid})")),
        }
        Ok(true)
    }

    fn answer_query(&mut self, from: Option<UnixAddr>) {
        let Some(path) = from.as_ref().and_then(|a| a.path()) else {
            self.rejected
                .reject(format_args!("query from an unbound socket"));
            return;
        };
        let now = Instant::now();
        let entries = self
            .heard
            .iter()
            .filter(|h| h.slot != self.ctx.slot)
            .map(|h| Age {
                role: h.slot.role,
                id: h.slot.id,
                pid: h.pid,
                age_ms: h
                    .heard
                    .then(|| now.duration_since(h.last).as_millis() as u64),
            })
            .collect();
        let reply = protocol::encode(&Datagram::Ages {
            watchdog: self.ctx.slot.id,
            rejected: self.rejected.count,
            received: self.received,
            entries,
        });
        if let Err(e) = self.sock.send_to(&reply, path) {
            log::debug!("cannot answer query: {e}");
        }
    }

    /// After a stall of our own (SIGSTOP, starvation) everyone looks silent to us; that
    /// says nothing about them, so each slot gets a fresh timeout instead of a report.
    fn notice_own_stall(&mut self) {
        let now = Instant::now();
        let gap = now.duration_since(self.last_wake);
        self.last_wake = now;
        if gap <= self.ctx.config.stall_threshold() {
            return;
        }
        log::warn!(
            "this watchdog was stalled for {} ms: restarting every silence clock",
            gap.as_millis()
        );
        let due = now + self.ctx.config.timeout();
        for h in &mut self.heard {
            h.due = h.due.max(due);
        }
        self.next_check = self.next_check.max(due.min(self.next_check.max(now)));
    }

    /// A new config: keep what we know of the slots that stay, start a fresh timeout for
    /// the new ones.
    fn reload(&mut self) -> Result<bool, String> {
        if !self.ctx.reload_config()? {
            return Ok(false);
        }
        let now = Instant::now();
        let timeout = self.ctx.config.timeout();
        let mut old: std::collections::HashMap<SlotName, Heard> =
            self.heard.drain(..).map(|h| (h.slot, h)).collect();
        self.heard = self
            .ctx
            .config
            .slots()
            .into_iter()
            .map(|slot| {
                old.remove(&slot)
                    .unwrap_or_else(|| Heard::unheard(slot, now, timeout))
            })
            .collect();
        self.next_check = self.next_check.min(now + timeout);
        Ok(true)
    }

    fn check_silence(&mut self) {
        let now = Instant::now();
        let timeout = self.ctx.config.timeout();
        let control = self.ctx.dir.control_socket();
        let mut next = now + timeout;
        for h in &mut self.heard {
            if h.slot == self.ctx.slot {
                continue;
            }
            if now >= h.due {
                let silent_ms = now.duration_since(h.last).as_millis() as u64;
                let report = Request::Silent {
                    reporter: self.ctx.slot.id,
                    role: h.slot.role,
                    id: h.slot.id,
                    pid: h.pid,
                    silent_ms,
                };
                match send_request(&control, &report) {
                    Ok(()) => log::info!(
                        "reported {} (pid {}) silent for {silent_ms} ms",
                        h.slot,
                        h.pid
                    ),
                    Err(e) => log::warn!("cannot report {} silent to the master: {e}", h.slot),
                }
                // Ask again after another timeout if it stays silent; retry sooner if the
                // master could not be told at all.
                h.due = now + timeout;
            }
            next = next.min(h.due);
        }
        self.next_check = next.max(now + Duration::from_millis(1));
    }
}
