//! The control socket's transport: accepts connections from our own uid only, turns one
//! newline-terminated line into a request and sends one response line back. It knows
//! nothing of slots; `requests.rs` answers.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Poll};
use nix::sys::socket::{self, sockopt};

use super::Source;
use crate::daemon::Rejections;
use crate::protocol::{self, DecodeError, Request, Response};

/// A control connection that has not finished its request by then is dropped.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);

struct Conn {
    stream: UnixStream,
    peer_pid: i32,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    written: usize,
    opened: Instant,
}

pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<usize, Conn>,
    next_conn: usize,
    uid: u32,
}

/// A whole request read from a connection, for the handlers.
pub struct Incoming {
    pub peer_pid: i32,
    pub request: Result<Request, DecodeError>,
    /// Nothing was sent at all (a probe of the socket): not worth counting as garbage.
    pub empty: bool,
}

impl ControlServer {
    pub fn bind(path: &Path, poll: &Poll) -> Result<ControlServer, String> {
        let _ = std::fs::remove_file(path);
        let mut listener =
            UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
        poll.registry()
            .register(&mut listener, Source::Control.token(), Interest::READABLE)
            .map_err(|e| format!("cannot poll the control socket: {e}"))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            next_conn: 0,
            uid: nix::unistd::geteuid().as_raw(),
        })
    }

    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.opened + CONN_TIMEOUT).min()
    }

    pub fn accept_all(&mut self, poll: &Poll, rejected: &mut Rejections) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            let Ok(creds) = socket::getsockopt(&stream, sockopt::PeerCredentials) else {
                continue;
            };
            if creds.uid() != self.uid {
                rejected.reject(format_args!("control connection from uid {}", creds.uid()));
                continue;
            }
            let id = self.next_conn;
            self.next_conn = (self.next_conn + 1) % (1 << 20);
            if poll
                .registry()
                .register(&mut stream, Source::Conn(id).token(), Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    peer_pid: creds.pid(),
                    inbuf: Vec::new(),
                    outbuf: Vec::new(),
                    written: 0,
                    opened: Instant::now(),
                },
            );
        }
    }

    /// A connection is readable (or writable, while a reply is pending). Returns the
    /// request once a whole line is there, the peer has closed, or the line is too long.
    pub fn on_ready(&mut self, poll: &Poll, id: usize) -> Option<Incoming> {
        let conn = self.conns.get_mut(&id)?;
        if !conn.outbuf.is_empty() {
            if flush(conn) {
                self.close(poll, id);
            }
            return None;
        }
        let mut eof = false;
        let mut buf = [0u8; 4096];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if conn.inbuf.len() > protocol::MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let line_end = conn.inbuf.iter().position(|&b| b == b'\n');
        if line_end.is_none() && !eof && conn.inbuf.len() <= protocol::MAX_REQUEST {
            return None; // wait for the rest of the line
        }
        let line = &conn.inbuf[..line_end.unwrap_or(conn.inbuf.len())];
        Some(Incoming {
            peer_pid: conn.peer_pid,
            request: protocol::decode::<Request>(line, protocol::MAX_REQUEST),
            empty: line.is_empty(),
        })
    }

    /// Sends the answer to connection `id` (and closes it once written).
    pub fn reply(&mut self, poll: &Poll, id: usize, response: &Response) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.outbuf = protocol::encode_line(response);
        if flush(conn) {
            self.close(poll, id);
        } else {
            let _ = poll.registry().reregister(
                &mut conn.stream,
                Source::Conn(id).token(),
                Interest::WRITABLE,
            );
        }
    }

    fn close(&mut self, poll: &Poll, id: usize) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = poll.registry().deregister(&mut c.stream);
        }
    }

    pub fn expire(&mut self, poll: &Poll, rejected: &mut Rejections) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.opened + CONN_TIMEOUT)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            rejected.reject(format_args!("control connection timed out"));
            // Say why before hanging up (best effort: the socket is non-blocking and the
            // answer small); a client left waiting learns more than from a bare close.
            if let Some(conn) = self.conns.get_mut(&id)
                && conn.outbuf.is_empty()
            {
                let why = Response::error(
                    crate::protocol::ErrorKind::Refused,
                    format!(
                        "incomplete request: no newline within {} ms",
                        CONN_TIMEOUT.as_millis()
                    ),
                );
                let _ = conn.stream.write(&protocol::encode_line(&why));
            }
            self.close(poll, id);
        }
    }
}

/// Writes what is left of the reply; true when done (or the peer is gone).
fn flush(conn: &mut Conn) -> bool {
    while conn.written < conn.outbuf.len() {
        match conn.stream.write(&conn.outbuf[conn.written..]) {
            Ok(0) => return true,
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    true
}
