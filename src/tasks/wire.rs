//! The messages on `tasks.sock`, the queue's socket in the runtime directory: JSON lines,
//! each at most `MAX_LINE` bytes. Workers (free workflows) keep one connection open; the
//! CLI opens one per command.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest line either side accepts: a result is at most `RESULT_MAX` bytes, and JSON's
/// escapes can make it up to six times longer.
pub const MAX_LINE: usize = 1 << 20;
/// A task's stdout beyond this is not part of its result (it still reaches the log).
pub const RESULT_MAX: usize = 64 * 1024;
/// A task's log is cut at this size (a line says so).
pub const LOG_MAX: u64 = 4 << 20;
/// The task's JSON, which reaches its stdin: it fits a pipe's buffer, so the worker
/// writes it before the program starts and never waits on it.
pub const SPEC_MAX: usize = 60 * 1024;

/// A running attempt, as its worker knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub id: i64,
    pub attempt: u32,
    /// 0 until the program has started.
    pub pid: i32,
}

/// How an attempt ended, as its worker saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: i64,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToQueue {
    /// A worker introduces itself (again, after a failover): what it runs, and what ended
    /// while it had no queue to tell.
    Hello {
        worker: u32,
        pid: i32,
        capabilities: Vec<String>,
        concurrency: u32,
        running: Vec<Held>,
        ended: Vec<Outcome>,
    },
    /// The program of an attempt has started (the acknowledgement).
    Started {
        id: i64,
        attempt: u32,
        pid: i32,
    },
    Ended(Outcome),
    /// The worker takes no more tasks (it is about to host a service, or to exit).
    Draining {},
    Submit(crate::tasks::store::NewTask),
    Status {
        id: i64,
    },
    List {
        state: Option<String>,
        after: i64,
        limit: u32,
    },
    Cancel {
        id: i64,
    },
    Retry {
        id: i64,
    },
    /// Answered once every one of them is finished.
    Wait {
        ids: Vec<i64>,
    },
    /// The counts and the workers; with `durations`, the wait and run histograms too.
    Overview {
        #[serde(default)]
        durations: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromQueue {
    Run {
        id: i64,
        attempt: u32,
        argv: Vec<String>,
        spec: String,
        cwd: Option<String>,
        timeout_ms: Option<u64>,
        log: PathBuf,
    },
    Kill {
        id: i64,
        attempt: u32,
        why: String,
    },
    Submitted {
        id: i64,
    },
    Task {
        task: serde_json::Value,
    },
    Tasks {
        tasks: Vec<serde_json::Value>,
        next: Option<i64>,
    },
    Done {
        message: String,
    },
    Finished {
        tasks: Vec<serde_json::Value>,
    },
    Overview {
        overview: serde_json::Value,
    },
    Error {
        message: String,
    },
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).expect("message serializes");
    v.push(b'\n');
    v
}

/// Reads what a nonblocking `stream` has now (at most `max_reads` reads, so one busy
/// peer cannot hold a loop) onto `inbuf`. True: the peer is gone (end of file, an error).
pub fn read_available(
    stream: &mut impl std::io::Read,
    inbuf: &mut Vec<u8>,
    max_reads: usize,
) -> bool {
    let mut buf = [0u8; 16384];
    for _ in 0..max_reads {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => inbuf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    false
}

/// Writes what a nonblocking `stream` takes of `out`, keeping the rest. True: the peer
/// is gone.
pub fn write_pending(stream: &mut impl std::io::Write, out: &mut Vec<u8>) -> bool {
    while !out.is_empty() {
        match stream.write(out) {
            Ok(0) => return true,
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    false
}

/// Splits complete lines off the front of `buf`; a line longer than `MAX_LINE` is an
/// error (the peer is broken or hostile).
pub fn take_lines(buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut start = 0;
    while let Some(n) = buf[start..].iter().position(|&b| b == b'\n') {
        out.push(buf[start..start + n].to_vec());
        start += n + 1;
    }
    buf.drain(..start);
    if buf.len() > MAX_LINE {
        return Err(format!("a line longer than {MAX_LINE} bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_and_garbage_is_refused() {
        let mut b = b"{\"type\":\"overview\"}\n{\"type\":\"sta".to_vec();
        let lines = take_lines(&mut b).unwrap();
        assert_eq!(lines.len(), 1);
        let m: ToQueue = serde_json::from_slice(&lines[0]).unwrap();
        assert_eq!(m, ToQueue::Overview { durations: false });
        assert_eq!(b, b"{\"type\":\"sta");
        assert!(serde_json::from_slice::<ToQueue>(b"{\"type\":\"nope\"}").is_err());
        let mut huge = vec![b'x'; MAX_LINE + 1];
        assert!(take_lines(&mut huge).is_err());
    }
}
