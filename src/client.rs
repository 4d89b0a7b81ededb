//! The client side of the control socket: one request, one reply, with a deadline.
//! The connect is non-blocking, so a hung master whose backlog is full can never hang
//! a caller (`nexus status`, a standby's health check).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::protocol::{self, Request, Response};

pub fn request(control: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let stream =
        connect(control).map_err(|e| format!("cannot connect to {}: {e}", control.display()))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    (&stream)
        .write_all(&protocol::encode_line(req))
        .map_err(|e| format!("cannot send to the master: {e}"))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(protocol::MAX_REPLY as u64))
        .read_until(b'\n', &mut line)
        .map_err(|e| {
            format!(
                "no answer from the master within {} ms: {e}",
                timeout.as_millis()
            )
        })?;
    if line.is_empty() {
        return Err("the master closed the connection without answering".into());
    }
    protocol::decode::<Response>(&line, protocol::MAX_REPLY)
        .map_err(|e| format!("bad answer from the master: {e}"))
}

fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let stream = connect_nonblocking(path)?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Connects without ever blocking: a Unix stream connect completes at once or fails
/// (EAGAIN when a hung master's backlog is full). The stream stays non-blocking.
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}
