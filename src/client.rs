//! The CLI's side of the control socket: one request, one reply, with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{self, Request, Response};

pub fn request(control: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let mut stream = UnixStream::connect(control)
        .map_err(|e| format!("cannot connect to {}: {e}", control.display()))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    stream
        .write_all(&protocol::encode_line(req))
        .map_err(|e| format!("cannot send to the master: {e}"))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(protocol::MAX_REPLY as u64))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("no answer from the master: {e}"))?;
    if line.is_empty() {
        return Err("the master closed the connection without answering".into());
    }
    protocol::decode::<Response>(&line, protocol::MAX_REPLY)
        .map_err(|e| format!("bad answer from the master: {e}"))
}
