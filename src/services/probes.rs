//! Readiness and liveness checks, run from the hosting workflow's own event loop: one
//! check in flight at a time, each a deadline in the loop (no thread, no blocking call),
//! cut at its timeout. `http` and `tcp` are non-blocking sockets in the loop's poll;
//! `exec` is a child in its own process group, killed with it at the timeout; `log` and
//! `notify` are answered by the output pump and the notify socket.
//!
//! The HTTP client is a few lines of HTTP/1.0 on purpose: a probe only needs the status
//! line, and an HTTP stack in every workflow would cost more memory than the daemon itself.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use crate::child::{self, Ended, Program, Stdio};
use crate::services::spec::{Probe, ProbeKind};

/// Probe-duration histogram bounds, seconds.
pub const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Resolves a probe host: an IP address, `localhost`, or a name in /etc/hosts (the static
/// binary does not load glibc's name-service modules).
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if host == "localhost" || host == "localhost.localdomain" {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let ip: IpAddr = f.next()?.parse().ok()?;
            f.any(|n| n == host).then_some(ip)
        })
        .map(|ip| SocketAddr::new(ip, port))
        .ok_or_else(|| {
            format!("cannot resolve {host:?} (not an IP address, localhost, or in /etc/hosts)")
        })
}

/// Counts for `nexus metrics`, kept in the stats file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeStats {
    pub runs: u64,
    pub failures: u64,
    /// Cumulative per bucket of `BUCKETS`.
    pub buckets: Vec<u64>,
    pub sum_s: f64,
}

impl ProbeStats {
    pub fn record(&mut self, ok: bool, took: Duration) {
        self.runs += 1;
        if !ok {
            self.failures += 1;
        }
        let s = took.as_secs_f64();
        self.buckets.resize(BUCKETS.len(), 0);
        for (b, n) in BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if s <= *b {
                *n += 1;
            }
        }
        self.sum_s += s;
    }
}

enum Inflight {
    Http {
        stream: TcpStream,
        sent: usize,
        reply: Vec<u8>,
    },
    Tcp {
        stream: TcpStream,
    },
    Exec {
        pid: i32,
        _pidfd: OwnedFd,
    },
}

/// One probe of one instance.
pub struct Prober {
    pub spec: Probe,
    token: Token,
    next_at: Instant,
    inflight: Option<(Inflight, Instant)>,
    pub last_error: Option<String>,
    /// The HTTP request, made once.
    request: Vec<u8>,
    /// Readiness: retried sooner while the connection is refused.
    eager: bool,
}

/// How soon a refused readiness check is repeated.
const EAGER: Duration = Duration::from_millis(1);

/// One finished check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub error: Option<String>,
    pub took: Duration,
}

impl Prober {
    /// Starts checking after the probe's initial delay.
    pub fn new(spec: Probe, token: Token, now: Instant) -> Prober {
        let first = now + Duration::from_millis(spec.initial_delay_ms);
        Prober {
            spec,
            token,
            next_at: first,
            inflight: None,
            last_error: None,
            request: Vec::new(),
            eager: false,
        }
    }

    /// A readiness probe: retried every few ms while the port is not yet listening.
    pub fn readiness(spec: Probe, token: Token, now: Instant) -> Prober {
        Prober {
            eager: true,
            ..Prober::new(spec, token, now)
        }
    }

    /// Checks the program answers itself (log, notify): nothing to run here.
    pub fn passive(&self) -> bool {
        matches!(self.spec.kind, ProbeKind::Log(_) | ProbeKind::Notify)
    }

    pub fn deadline(&self) -> Option<Instant> {
        if self.passive() {
            return None;
        }
        Some(match &self.inflight {
            Some((_, started)) => *started + Duration::from_millis(self.spec.timeout_ms),
            None => self.next_at,
        })
    }

    /// The exec probe's child, for the host's reaper.
    pub fn child_pid(&self) -> Option<i32> {
        match &self.inflight {
            Some((Inflight::Exec { pid, .. }, _)) => Some(*pid),
            _ => None,
        }
    }

    /// Starts a check when one is due, or cuts one that has run out of time.
    pub fn tick(&mut self, poll: &Poll, now: Instant, env: &[String]) -> Option<Verdict> {
        if self.passive() {
            return None;
        }
        if let Some(started) = self.inflight.as_ref().map(|(_, s)| *s) {
            let limit = Duration::from_millis(self.spec.timeout_ms);
            if now.duration_since(started) >= limit {
                self.cancel();
                let why = format!("timed out after {} ms", self.spec.timeout_ms);
                return Some(self.finish(started, now, false, Some(why)));
            }
            return None;
        }
        if now < self.next_at {
            return None;
        }
        match self.launch(poll, env) {
            Ok(flight) => {
                self.inflight = Some((flight, now));
                None
            }
            Err(e) => {
                self.inflight = None;
                Some(self.finish(now, now, false, Some(e)))
            }
        }
    }

    fn launch(&mut self, poll: &Poll, env: &[String]) -> Result<Inflight, String> {
        match &self.spec.kind {
            ProbeKind::Http { host, port, path } => {
                let addr = resolve(host, *port)?;
                let mut stream =
                    TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                poll.registry()
                    .register(
                        &mut stream,
                        self.token,
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map_err(|e| format!("poll: {e}"))?;
                if self.request.is_empty() {
                    let host_header = if host.contains(':') {
                        format!("[{host}]:{port}")
                    } else {
                        format!("{host}:{port}")
                    };
                    self.request = format!(
                        "GET {path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: nexus-probe\r\nConnection: close\r\n\r\n"
                    )
                    .into_bytes();
                }
                Ok(Inflight::Http {
                    stream,
                    sent: 0,
                    reply: Vec::new(),
                })
            }
            ProbeKind::Tcp { host, port } => {
                let addr = resolve(host, *port)?;
                let mut stream =
                    TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                poll.registry()
                    .register(&mut stream, self.token, Interest::WRITABLE)
                    .map_err(|e| format!("poll: {e}"))?;
                Ok(Inflight::Tcp { stream })
            }
            ProbeKind::Exec(argv) => {
                let null = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| format!("/dev/null: {e}"))?;
                let prog = Program {
                    argv: argv.clone(),
                    env: env.to_vec(),
                    cwd: None,
                    identity: None,
                    rlimits: Vec::new(),
                };
                let fd = null.as_raw_fd();
                let (pid, pidfd) = child::start(
                    &prog,
                    &Stdio {
                        stdin: fd,
                        stdout: fd,
                        stderr: fd,
                    },
                    None,
                )
                .map_err(|e| e.to_string())?;
                Ok(Inflight::Exec { pid, _pidfd: pidfd })
            }
            ProbeKind::Log(_) | ProbeKind::Notify => Err("not an active check".into()),
        }
    }

    /// The probe's socket is ready.
    pub fn on_event(&mut self, now: Instant) -> Option<Verdict> {
        let (flight, _) = self.inflight.as_mut()?;
        let outcome = match flight {
            Inflight::Tcp { stream } => match stream.take_error() {
                Ok(None) if stream.peer_addr().is_ok() => Some((true, None)),
                Ok(None) => None, // not connected yet
                Ok(Some(e)) | Err(e) => Some((false, Some(format!("connect: {e}")))),
            },
            Inflight::Http {
                stream,
                sent,
                reply,
            } => http_progress(stream, &self.request, sent, reply),
            Inflight::Exec { .. } => None,
        };
        let (ok, error) = outcome?;
        let started = self.inflight.as_ref().map_or(now, |(_, s)| *s);
        self.cancel();
        Some(self.finish(started, now, ok, error))
    }

    /// The exec probe's child ended (reaped by the host).
    pub fn on_child_exit(&mut self, ended: Ended, now: Instant) -> Verdict {
        let started = self.inflight.take().map_or(now, |(_, s)| s);
        let ok = ended.clean();
        let error = (!ok).then(|| format!("exec probe: {}", ended.describe()));
        self.finish(started, now, ok, error)
    }

    /// A passive check's result (READY=1, a matching line): timed from the probe's start.
    pub fn passive_pass(&mut self, now: Instant) -> Verdict {
        let started = self.next_at.min(now);
        self.finish(started, now, true, None)
    }

    fn cancel(&mut self) {
        if let Some((flight, _)) = self.inflight.take() {
            match flight {
                // Closing the socket takes it out of the poll: no deregister call.
                Inflight::Http { .. } | Inflight::Tcp { .. } => {}
                Inflight::Exec { pid, .. } => {
                    // Its group: the leader is unreaped, so the pgid cannot be anyone else's.
                    // SAFETY: a signal to our own child's process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    // The host's reaper collects it; its exit no longer matters.
                }
            }
        }
    }

    /// A check that began at `started` ended at `now`.
    fn finish(
        &mut self,
        started: Instant,
        now: Instant,
        ok: bool,
        error: Option<String>,
    ) -> Verdict {
        self.inflight = None;
        let took = now.saturating_duration_since(started);
        // The next check a period after this one was due (never two at once). A readiness
        // check that found nothing listening yet is repeated sooner: a refused connect is
        // cheap, harmless to the program, and the moment it listens is what a dependent
        // waits for.
        let refused = error
            .as_deref()
            .is_some_and(|e| e.contains("Connection refused"));
        let period = Duration::from_millis(self.spec.period_ms);
        self.next_at = if self.eager && refused {
            (started + period.min(EAGER)).max(now)
        } else {
            // On a fixed grid from the first check, not a period after this one began: a
            // check begins on a wake that comes a little after its time, and a schedule
            // that drifted by that much each period would drift out of step with the
            // loop's other timers (see `chore`).
            (self.next_at + period).max(now)
        };
        let error = error.map(|e| format!("{}: {e}", self.spec.describe()));
        self.last_error = error.clone();
        Verdict { ok, error, took }
    }
}

/// Drives an HTTP/1.0 GET: Some((ok, error)) once the status line is in (2xx/3xx pass).
fn http_progress(
    stream: &mut TcpStream,
    request: &[u8],
    sent: &mut usize,
    reply: &mut Vec<u8>,
) -> Option<(bool, Option<String>)> {
    // A failed connect shows as the write's error (ECONNREFUSED): no getsockopt needed.
    while *sent < request.len() {
        match stream.write(&request[*sent..]) {
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
            Err(e) => return Some((false, Some(format!("connect: {e}")))),
        }
    }
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.contains(&b'\n') || reply.len() > 1024 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some((false, Some(format!("receive: {e}")))),
        }
    }
    Some(judge_status_line(reply))
}

/// `HTTP/1.x NNN ...`: 2xx and 3xx pass.
pub fn judge_status_line(reply: &[u8]) -> (bool, Option<String>) {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split_whitespace();
    let code = match (parts.next(), parts.next()) {
        (Some(v), Some(c)) if v.starts_with("HTTP/") => c.parse::<u16>().ok(),
        _ => None,
    };
    match code {
        Some(c) if (200..400).contains(&c) => (true, None),
        Some(c) => (false, Some(format!("HTTP {c}"))),
        None if reply.is_empty() => (false, Some("closed without a reply".into())),
        None => (false, Some(format!("not an HTTP reply: {:?}", text.trim()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(judge_status_line(b"HTTP/1.0 200 OK\r\n"), (true, None));
        assert_eq!(judge_status_line(b"HTTP/1.1 302 Found\r\n"), (true, None));
        assert_eq!(
            judge_status_line(b"HTTP/1.1 503 Busy\r\n").1.unwrap(),
            "HTTP 503"
        );
        assert!(!judge_status_line(b"").0);
        assert!(
            judge_status_line(b"SSH-2.0-OpenSSH\r\n")
                .1
                .unwrap()
                .contains("not an HTTP")
        );
    }

    #[test]
    fn hosts_resolve_without_a_name_service() {
        assert_eq!(
            resolve("127.0.0.1", 80).unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(resolve("::1", 80).unwrap().to_string(), "[::1]:80");
        assert_eq!(resolve("localhost", 9).unwrap().to_string(), "127.0.0.1:9");
        assert!(resolve("no-such-host.invalid", 1).is_err());
    }

    fn run_until(p: &mut Prober, poll: &mut Poll, within: Duration) -> Verdict {
        let deadline = Instant::now() + within;
        let mut events = mio::Events::with_capacity(4);
        while Instant::now() < deadline {
            if let Some(v) = p.tick(poll, Instant::now(), &[]) {
                return v;
            }
            let _ = poll.poll(&mut events, Some(Duration::from_millis(5)));
            if !events.is_empty()
                && let Some(v) = p.on_event(Instant::now())
            {
                return v;
            }
        }
        panic!("no verdict");
    }

    fn probe(kind: ProbeKind, timeout_ms: u64) -> Probe {
        Probe {
            kind,
            period_ms: 100,
            timeout_ms,
            failures: 1,
            initial_delay_ms: 0,
        }
    }

    #[test]
    fn http_and_tcp_against_a_real_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for (i, stream) in listener.incoming().take(3).enumerate() {
                let mut s = stream.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let reply: &[u8] = if i == 0 {
                    b"HTTP/1.0 200 OK\r\n\r\nhi"
                } else {
                    b"HTTP/1.0 500 Oops\r\n\r\n"
                };
                let _ = s.write_all(reply);
            }
        });
        let mut poll = Poll::new().unwrap();
        let http = ProbeKind::Http {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
        };
        let mut p = Prober::new(probe(http.clone(), 1000), Token(1), Instant::now());
        assert!(run_until(&mut p, &mut poll, Duration::from_secs(5)).ok);
        let mut p = Prober::new(probe(http, 1000), Token(1), Instant::now());
        let v = run_until(&mut p, &mut poll, Duration::from_secs(5));
        assert!(!v.ok && v.error.unwrap().contains("HTTP 500"));
        let mut p = Prober::new(
            probe(
                ProbeKind::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                },
                1000,
            ),
            Token(1),
            Instant::now(),
        );
        assert!(run_until(&mut p, &mut poll, Duration::from_secs(5)).ok);
        server.join().unwrap();
    }

    #[test]
    fn a_refused_readiness_check_is_repeated_soon_a_liveness_one_after_its_period() {
        let mut poll = Poll::new().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let spec = Probe {
            period_ms: 1000,
            ..probe(
                ProbeKind::Tcp {
                    host: "127.0.0.1".into(),
                    port: closed,
                },
                1000,
            )
        };
        let mut ready = Prober::readiness(spec.clone(), Token(1), Instant::now());
        assert!(!run_until(&mut ready, &mut poll, Duration::from_secs(5)).ok);
        assert!(ready.deadline().unwrap() <= Instant::now() + EAGER);
        let mut live = Prober::new(spec, Token(1), Instant::now());
        assert!(!run_until(&mut live, &mut poll, Duration::from_secs(5)).ok);
        assert!(live.deadline().unwrap() > Instant::now() + Duration::from_millis(500));
    }

    #[test]
    fn checks_keep_to_a_grid_however_late_each_begins() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let spec = Probe {
            period_ms: 1000,
            ..probe(
                ProbeKind::Tcp {
                    host: "127.0.0.1".into(),
                    port: 9,
                },
                500,
            )
        };
        let mut p = Prober::new(spec, Token(1), t0);
        // Each check begins 3 ms after its time and takes 2 ms: the next is still due on
        // the second.
        for k in 0..5u64 {
            assert_eq!(p.deadline(), Some(ms(1000 * k)));
            p.finish(ms(1000 * k + 3), ms(1000 * k + 5), true, None);
        }
        // A check that overran its period: the next at once, then on the grid again.
        p.finish(ms(5000), ms(6500), false, Some("timed out".into()));
        assert_eq!(p.deadline(), Some(ms(6500)));
        p.finish(ms(6501), ms(6502), true, None);
        assert_eq!(p.deadline(), Some(ms(7500)));
    }

    #[test]
    fn a_closed_port_fails_and_a_silent_server_is_cut_at_the_timeout() {
        let mut poll = Poll::new().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut p = Prober::new(
            probe(
                ProbeKind::Tcp {
                    host: "127.0.0.1".into(),
                    port: closed,
                },
                1000,
            ),
            Token(1),
            Instant::now(),
        );
        assert!(!run_until(&mut p, &mut poll, Duration::from_secs(5)).ok);
        // Accepts, never answers: the probe gives up at its timeout.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut p = Prober::new(
            probe(
                ProbeKind::Http {
                    host: "127.0.0.1".into(),
                    port,
                    path: "/".into(),
                },
                150,
            ),
            Token(1),
            Instant::now(),
        );
        let t0 = Instant::now();
        let v = run_until(&mut p, &mut poll, Duration::from_secs(5));
        assert!(v.error.unwrap().contains("timed out after 150 ms"));
        assert!(
            v.took >= Duration::from_millis(150),
            "timed from its start: {:?}",
            v.took
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        // The next check is a period after this one began, not a period after it failed.
        let next = p.deadline().unwrap();
        assert!(
            next <= Instant::now() + Duration::from_millis(5),
            "due at once: {next:?}"
        );
        drop(silent);
    }
}
