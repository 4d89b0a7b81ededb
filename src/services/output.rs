//! A program's stdout and stderr, into `logs/NAME-N.log`: one line each, stamped with the
//! time and the stream, rotated by size, long lines split, invalid UTF-8 escaped — and no
//! line lost or written twice when the workflow doing it is killed.
//!
//! Exactly once, across a SIGKILL of the workflow at any instruction:
//! - bytes are *peeked* from the program's pipe (`tee` into a private scratch pipe), not
//!   taken: until written they stay in the program's pipe, where a successor finds them;
//! - before the log write, a cursor file records what is about to be consumed and the
//!   log's size; the bytes are consumed only after the write; then the cursor is cleared.
//!   A successor that finds the cursor pending knows from the log's size whether the write
//!   happened, and consumes the bytes or not accordingly.
//! - a partial line stays in the pipe until its newline arrives (or the stream ends, or it
//!   has waited a second, or it reaches the 16 kB line limit).
//!
//! Back-pressure, not loss: a program that writes faster than the log is written blocks in
//! its write once its pipe (1 MB where the kernel allows) is full; nexus's memory stays the
//! fixed buffers below. A full disk is the exception: lines that cannot be written are
//! consumed and counted, and the count is written to the log once writing works again, so
//! a full disk never stops the program.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Lines longer than this are split.
pub const MAX_LINE: usize = 16 * 1024;
/// Peeked at a time (at least one whole line of MAX_LINE).
const CHUNK: usize = 32 * 1024;
/// Formatted lines written at a time. With the chunk, what bounds nexus's memory however
/// the program writes: a flood of one-byte lines is formatted (and consumed) in pieces.
const OUT_LIMIT: usize = 64 * 1024;
/// A partial line is written after waiting this long for its newline.
pub const PARTIAL_WAIT: Duration = Duration::from_secs(1);
/// The pipe size asked for (the kernel caps it at /proc/sys/fs/pipe-max-size).
const PIPE_SIZE: i32 = 1 << 20;
/// Bytes one stream may write per wake-up, so a flood cannot starve the loop.
const BUDGET: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Out,
    Err,
}

impl Which {
    pub fn as_str(self) -> &'static str {
        match self {
            Which::Out => "out",
            Which::Err => "err",
        }
    }
}

/// The instance's log file, shared by its streams.
pub struct LogFile {
    path: PathBuf,
    file: File,
    max_bytes: u64,
    keep: u32,
    /// Lines that could not be written (disk full), not yet reported in the log.
    dropped: u64,
    pub lines: u64,
}

impl LogFile {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Self::open_file(path)?,
            max_bytes,
            keep,
            dropped: 0,
            lines: 0,
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    fn ino_size(&self) -> (u64, u64) {
        self.file.metadata().map_or((0, 0), |m| (m.ino(), m.size()))
    }

    fn rotate_if_full(&mut self) {
        if self.ino_size().1 < self.max_bytes {
            return;
        }
        let rotated = crate::logfiles::shift(&self.path, self.keep)
            .and_then(|()| Self::open_file(&self.path));
        match rotated {
            Ok(f) => self.file = f,
            Err(e) => log::warn!("cannot rotate {}: {e}", self.path.display()),
        }
    }

    /// Writes formatted lines; on failure (a full disk) counts them as dropped.
    fn append(&mut self, text: &[u8], lines: u64, name: &str) {
        if self.dropped > 0 {
            let note = format!(
                "{} {name} err [nexus] {} lines dropped: the log could not be written (disk full?)\n",
                crate::ledger::rfc3339_now(),
                self.dropped
            );
            if self.file.write_all(note.as_bytes()).is_ok() {
                self.dropped = 0;
            }
        }
        match self.file.write_all(text) {
            Ok(()) => self.lines += lines,
            Err(e) => {
                if self.dropped == 0 {
                    log::warn!(
                        "cannot write {}: {e}; counting dropped lines",
                        self.path.display()
                    );
                }
                self.dropped += lines;
            }
        }
    }
}

/// What is about to be consumed from one pipe, kept in `DIR/services/cursor/INO`.
struct Cursor {
    file: File,
    path: PathBuf,
}

/// pending (0/1), bytes to consume, log inode, log size before the write.
const CURSOR_LEN: usize = 32;

impl Cursor {
    fn open(dir: &Path, pipe_ino: u64) -> io::Result<Cursor> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(pipe_ino.to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        Ok(Cursor { file, path })
    }

    fn read(&self) -> Option<[u64; 4]> {
        let mut b = [0u8; CURSOR_LEN];
        self.file.read_exact_at(&mut b, 0).ok()?;
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        Some([w(0), w(1), w(2), w(3)])
    }

    fn write(&self, v: [u64; 4]) {
        let mut b = [0u8; CURSOR_LEN];
        for (i, x) in v.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&x.to_ne_bytes());
        }
        let _ = self.file.write_all_at(&b, 0);
    }
}

/// One stream of one run of the program.
pub struct Stream {
    pub which: Which,
    src: OwnedFd,
    scratch_r: OwnedFd,
    scratch_w: OwnedFd,
    cursor: Cursor,
    partial_since: Option<Instant>,
    /// Every writer has closed it (the pipe reported hang-up).
    pub closed: bool,
    /// A budget ran out with data left: pump again without waiting for an event.
    pub more: bool,
}

/// Read end (ours, non-blocking) and write end (the program's stdout or stderr). Two
/// system calls: this is on a restart's hot path (see `enlarge`).
pub fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on an fd we own; a fresh pipe's read end has no other status flag.
    unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    Ok((r, w))
}

/// A bigger pipe rides out a stopped workflow longer (done after the program has started:
/// the pipe is the same one).
pub fn enlarge(fd: &OwnedFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
}

pub fn inode(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).map_or(0, |s| s.st_ino)
}

/// A read end of pipe `ino`, opened again from a process that holds it (`/proc/PID/fd`
/// works for pipes): how a workflow's successor, or a keeper, gets a program's output pipe
/// back. The new descriptor is our own, non-blocking.
pub fn reopen_pipe(holders: &[i32], ino: u64) -> Option<OwnedFd> {
    let want = format!("pipe:[{ino}]");
    for &pid in holders {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str())
                && let Ok(f) = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(e.path())
            {
                let fd: OwnedFd = f.into();
                if inode(&fd) == ino {
                    return Some(fd);
                }
            }
        }
    }
    None
}

impl Stream {
    /// A stream over `src`, a read end of the program's pipe. `cursor_dir` holds the
    /// exactly-once cursors; a pending one left by a killed predecessor is settled here.
    pub fn new(which: Which, src: OwnedFd, cursor_dir: &Path, log: &LogFile) -> io::Result<Stream> {
        let ino = inode(&src);
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, ours.
        let (scratch_r, scratch_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let cursor = Cursor::open(cursor_dir, ino)?;
        let s = Stream {
            which,
            src,
            scratch_r,
            scratch_w,
            cursor,
            partial_since: None,
            closed: false,
            more: false,
        };
        s.settle(log);
        Ok(s)
    }

    /// A predecessor was killed between "about to consume" and "consumed": if its log
    /// write landed (the log grew), the bytes are consumed now; else they are still to be
    /// written, and stay.
    fn settle(&self, log: &LogFile) {
        let Some([pending, len, log_ino, size_before]) = self.cursor.read() else {
            return;
        };
        if pending != 1 {
            return;
        }
        let (ino, size) = log.ino_size();
        if ino == log_ino && size > size_before {
            consume(self.src.as_raw_fd(), len as usize);
            log::info!(
                "{} stream: {len} bytes were written to the log by the previous workflow; consumed",
                self.which.as_str()
            );
        }
        self.cursor.write([0, 0, 0, 0]);
    }

    pub fn raw_fd(&self) -> RawFd {
        self.src.as_raw_fd()
    }

    /// When a waiting partial line is due to be written anyway.
    pub fn partial_due(&self) -> Option<Instant> {
        self.partial_since.map(|t| t + PARTIAL_WAIT)
    }

    /// Moves whole lines from the pipe to the log, up to a budget. `flush` writes a
    /// trailing partial line too (the stream ended, or the line waited too long). Each
    /// line is offered to `on_line` (the log probe). `buf` and `out` are scratch space.
    pub fn pump(
        &mut self,
        log: &mut LogFile,
        name: &str,
        flush: bool,
        scratch: &mut Scratch,
        on_line: &mut dyn FnMut(&str),
    ) {
        let flush = flush || self.partial_due().is_some_and(|t| Instant::now() >= t);
        let mut budget = BUDGET;
        self.more = false;
        loop {
            if budget == 0 {
                self.more = true;
                return;
            }
            // SAFETY: tee between two pipes we hold; nothing is consumed from `src`.
            let n = unsafe {
                libc::tee(
                    self.src.as_raw_fd(),
                    self.scratch_w.as_raw_fd(),
                    CHUNK,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("reading the program's {}: {e}", self.which.as_str());
                }
                return;
            }
            if n == 0 {
                self.closed = true;
                self.partial_since = None;
                return;
            }
            let n = n as usize;
            let data = &mut scratch.buf[..n];
            if read_exact(self.scratch_r.as_raw_fd(), data).is_err() {
                return;
            }
            let ts = crate::ledger::rfc3339_now();
            scratch.out.clear();
            let (consumed, lines) = format_lines(
                data,
                flush,
                &ts,
                name,
                self.which.as_str(),
                OUT_LIMIT,
                &mut scratch.out,
                on_line,
            );
            if consumed == 0 {
                self.partial_since.get_or_insert_with(Instant::now);
                return;
            }
            let (log_ino, size) = log.ino_size();
            self.cursor.write([1, consumed as u64, log_ino, size]);
            log.append(&scratch.out, lines, name);
            consume(self.src.as_raw_fd(), consumed);
            self.cursor.write([0, 0, 0, 0]);
            log.rotate_if_full();
            self.partial_since = None;
            budget = budget.saturating_sub(consumed);
        }
    }

    /// The stream is done: its cursor file goes.
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.cursor.path);
    }
}

/// Fixed buffers a host's streams share: what keeps memory flat however fast a program
/// writes.
pub struct Scratch {
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            buf: vec![0; CHUNK],
            out: Vec::with_capacity(OUT_LIMIT + MAX_LINE + 256),
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

fn read_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        } else {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Takes `n` bytes out of a pipe that holds at least that many.
fn consume(fd: RawFd, mut n: usize) {
    let mut sink = [0u8; 8192];
    // Bounded: each round takes at least one byte or stops.
    while n > 0 {
        let want = n.min(sink.len());
        // SAFETY: reading into our buffer.
        let got = unsafe { libc::read(fd, sink.as_mut_ptr().cast(), want) };
        if got <= 0 {
            let e = io::Error::last_os_error();
            if got < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        n -= got as usize;
    }
}

/// Formats the whole lines of `data` (and a trailing partial one if `flush`) into `out`:
/// `TS NAME STREAM TEXT`, stopping once `out` holds `limit` bytes (the rest is taken
/// next time). Returns the bytes of `data` consumed and the lines written.
#[allow(clippy::too_many_arguments)]
pub fn format_lines(
    data: &[u8],
    flush: bool,
    ts: &str,
    name: &str,
    stream: &str,
    limit: usize,
    out: &mut Vec<u8>,
    on_line: &mut dyn FnMut(&str),
) -> (usize, u64) {
    let mut pos = 0;
    let mut lines = 0;
    while pos < data.len() && out.len() < limit {
        let rest = &data[pos..];
        let window = &rest[..rest.len().min(MAX_LINE)];
        let (line, advance) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], i + 1),
            None if rest.len() >= MAX_LINE => {
                let cut = utf8_boundary(rest, MAX_LINE);
                (&rest[..cut], cut)
            }
            None if flush => (rest, rest.len()),
            None => break,
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let start = out.len();
        out.extend_from_slice(ts.as_bytes());
        out.push(b' ');
        out.extend_from_slice(name.as_bytes());
        out.push(b' ');
        out.extend_from_slice(stream.as_bytes());
        out.push(b' ');
        let text_start = out.len();
        escape_into(line, out);
        if let Ok(text) = std::str::from_utf8(&out[text_start..]) {
            on_line(text);
        }
        out.push(b'\n');
        debug_assert!(out.len() > start);
        pos += advance;
        lines += 1;
    }
    (pos, lines)
}

/// The largest cut at or below `at` that does not split a UTF-8 sequence (if the bytes
/// there are UTF-8 at all).
fn utf8_boundary(b: &[u8], at: usize) -> usize {
    let mut cut = at;
    for _ in 0..3 {
        if cut == 0 || b.get(cut).is_none_or(|&x| x & 0xC0 != 0x80) {
            break;
        }
        cut -= 1;
    }
    if cut == 0 { at } else { cut }
}

/// Valid UTF-8 as is; every invalid byte as `\xNN`.
pub fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        out.extend_from_slice(chunk.valid().as_bytes());
        for b in chunk.invalid() {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(data: &[u8], flush: bool) -> (usize, String) {
        let mut out = Vec::new();
        let (n, _) = format_lines(
            data,
            flush,
            "T",
            "web-1",
            "out",
            1 << 20,
            &mut out,
            &mut |_| {},
        );
        (n, String::from_utf8(out).unwrap())
    }

    #[test]
    fn whole_lines_are_stamped_and_a_partial_one_waits() {
        assert_eq!(
            fmt(b"one\ntwo\r\nthr", false),
            (9, "T web-1 out one\nT web-1 out two\n".into())
        );
        assert_eq!(fmt(b"thr", true), (3, "T web-1 out thr\n".into()));
        assert_eq!(fmt(b"\n", false), (1, "T web-1 out \n".into()));
    }

    #[test]
    fn long_lines_are_split_and_invalid_utf8_escaped() {
        let long = vec![b'a'; MAX_LINE + 10];
        let (n, text) = fmt(&long, false);
        assert_eq!(n, MAX_LINE, "the first 16 kB is a line; the rest waits");
        assert_eq!(text.len(), "T web-1 out ".len() + MAX_LINE + 1);
        let mut cut = vec![b'a'; MAX_LINE - 1];
        cut.extend_from_slice("é".as_bytes());
        cut.push(b'\n');
        let (n, text) = fmt(&cut, false);
        assert_eq!(n, cut.len());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].len(),
            "T web-1 out ".len() + MAX_LINE - 1,
            "cut before the character"
        );
        assert_eq!(
            lines[1], "T web-1 out é",
            "which starts the next line whole"
        );
        assert_eq!(
            fmt(b"ok \xff\xfe!\n", false).1,
            "T web-1 out ok \\xff\\xfe!\n"
        );
    }

    #[test]
    fn a_flood_of_tiny_lines_is_formatted_in_bounded_pieces() {
        let data = b"x\n".repeat(10_000);
        let mut out = Vec::new();
        let (n, lines) = format_lines(&data, false, "T", "w-1", "out", 4096, &mut out, &mut |_| {});
        assert!(out.len() < 4096 + 64, "bounded: {}", out.len());
        assert_eq!(n as u64, lines * 2, "only what was formatted is consumed");
        assert!(n < data.len());
    }

    #[test]
    fn lines_are_offered_to_the_log_probe() {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        format_lines(
            b"a\nb\n",
            false,
            "T",
            "x-1",
            "err",
            1 << 20,
            &mut out,
            &mut |l| seen.push(l.to_string()),
        );
        assert_eq!(seen, ["a", "b"]);
    }

    fn write_all(fd: &OwnedFd, b: &[u8]) {
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        assert_eq!(n as usize, b.len());
    }

    #[test]
    fn a_stream_moves_lines_once_and_leaves_partials_in_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogFile::open(&dir.path().join("w.log"), 1 << 20, 2).unwrap();
        let (r, w) = new_pipe().unwrap();
        let ino = inode(&r);
        let mut s = Stream::new(Which::Out, r, &dir.path().join("cur"), &log).unwrap();
        let mut scratch = Scratch::new();
        write_all(&w, b"first\nsecond\npart");
        s.pump(&mut log, "w-1", false, &mut scratch, &mut |_| {});
        let text = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
        assert!(text.ends_with(" w-1 out second\n"), "{text}");
        assert_eq!(text.lines().count(), 2);
        // The partial line is still in the pipe: a successor would find it there.
        let again = reopen_pipe(&[std::process::id() as i32], ino).unwrap();
        drop(s);
        let mut s = Stream::new(Which::Out, again, &dir.path().join("cur"), &log).unwrap();
        write_all(&w, b"ial\n");
        s.pump(&mut log, "w-1", false, &mut scratch, &mut |_| {});
        drop(w);
        s.pump(&mut log, "w-1", false, &mut scratch, &mut |_| {});
        assert!(s.closed, "end of stream seen");
        let text = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap())
            .collect();
        assert_eq!(lines, ["first", "second", "partial"]);
    }

    #[test]
    fn a_pending_cursor_is_settled_by_the_successor() {
        let dir = tempfile::tempdir().unwrap();
        let cur = dir.path().join("cur");
        let log = LogFile::open(&dir.path().join("w.log"), 1 << 20, 2).unwrap();
        let (r, w) = new_pipe().unwrap();
        write_all(&w, b"written\nnot yet\n");
        let ino = inode(&r);
        // A predecessor recorded "about to consume 8 bytes", wrote them, and died.
        let c = Cursor::open(&cur, ino).unwrap();
        let (log_ino, size) = log.ino_size();
        c.write([1, 8, log_ino, size]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("w.log"))
            .unwrap()
            .write_all(b"T w-1 out written\n")
            .unwrap();
        let mut log = LogFile::open(&dir.path().join("w.log"), 1 << 20, 2).unwrap();
        let mut s = Stream::new(Which::Out, r, &cur, &log).unwrap();
        s.pump(&mut log, "w-1", false, &mut Scratch::new(), &mut |_| {});
        let text = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
        assert_eq!(text.matches("written").count(), 1, "not twice: {text}");
        assert!(text.contains("not yet"), "and nothing lost: {text}");

        // Died before its write: the bytes are still to be written.
        let (r, w) = new_pipe().unwrap();
        write_all(&w, b"again\n");
        let c = Cursor::open(&cur, inode(&r)).unwrap();
        let (log_ino, size) = log.ino_size();
        c.write([1, 6, log_ino, size]);
        let mut s = Stream::new(Which::Out, r, &cur, &log).unwrap();
        s.pump(&mut log, "w-1", false, &mut Scratch::new(), &mut |_| {});
        let text = std::fs::read_to_string(dir.path().join("w.log")).unwrap();
        assert!(text.contains("out again"), "{text}");
    }
}
