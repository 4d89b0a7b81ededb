//! The ledger as a feed: each complete line of `events.jsonl` with an id that says where
//! it ends (`INODE-OFFSET`), so a client that reconnects with `Last-Event-ID` gets exactly
//! what it missed, across a rotation too (the id's inode is then found in
//! `events.jsonl.1`). One follower per daemon watches the file with inotify and
//! broadcasts new lines to every subscriber; a subscriber that falls behind catches up
//! from the file, so a slow client costs memory for nothing and loses nothing.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a reader of the ledger is: the file (by inode) and the offset after the last
/// line it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub ino: u64,
    pub offset: u64,
}

impl Cursor {
    pub fn id(self) -> String {
        format!("{}-{}", self.ino, self.offset)
    }

    /// Parses a `Last-Event-ID`; anything else (garbage, a forged huge id) is None.
    pub fn parse(id: &str) -> Option<Cursor> {
        let (ino, offset) = id.trim().split_once('-')?;
        Some(Cursor {
            ino: ino.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub at: Cursor,
    pub line: Arc<str>,
}

/// Most bytes read from the ledger for one answer (a client resuming from long ago gets
/// the newest part, not an unbounded burst).
const MAX_READ: u64 = 4 << 20;

/// Every line after `from` (None: from the current file's start), and where that leaves
/// the reader. A cursor in the rotated file continues there and then in the current one;
/// a cursor into a file that is gone starts over at the current file.
pub fn read_since(path: &Path, from: Option<Cursor>) -> (Vec<Item>, Cursor) {
    let rotated = PathBuf::from(format!("{}.1", path.display()));
    let current_ino = ino_of(path);
    let mut items = Vec::new();
    let start = match from {
        Some(c) if Some(c.ino) == current_ino => c.offset,
        Some(c) if ino_of(&rotated) == Some(c.ino) => {
            read_lines(&rotated, c.ino, c.offset, &mut items);
            0
        }
        _ => 0,
    };
    let Some(ino) = current_ino else {
        return (items, from.unwrap_or_default());
    };
    let end = read_lines(path, ino, start, &mut items);
    (items, Cursor { ino, offset: end })
}

/// The last `n` lines of the current file, and the cursor at its end.
pub fn tail(path: &Path, n: usize) -> (Vec<Item>, Cursor) {
    let (mut items, cur) = read_since(path, None);
    let drop = items.len().saturating_sub(n);
    items.drain(..drop);
    (items, cur)
}

fn ino_of(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Appends the complete lines of `path` from `offset` to `out`; returns the offset after
/// the last complete line (a line still being written is left for next time).
fn read_lines(path: &Path, ino: u64, offset: u64, out: &mut Vec<Item>) -> u64 {
    let Ok(mut f) = File::open(path) else {
        return offset;
    };
    let len = f.metadata().map_or(0, |m| m.len());
    if len < offset {
        // Truncated under us: the id is meaningless now, start over.
        return read_lines(path, ino, 0, out);
    }
    let start = offset.max(len.saturating_sub(MAX_READ));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(len - start).read_to_end(&mut buf).is_err()
    {
        return offset;
    }
    let mut pos = 0;
    // A cut into the middle of a line (MAX_READ) skips to the next line.
    if start > offset
        && let Some(nl) = buf.iter().position(|&b| b == b'\n')
    {
        pos = nl + 1;
    }
    while let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') {
        let line = &buf[pos..pos + nl];
        pos += nl + 1;
        if line.is_empty() {
            continue;
        }
        out.push(Item {
            at: Cursor {
                ino,
                offset: start + pos as u64,
            },
            line: String::from_utf8_lossy(line).into(),
        });
    }
    start + pos as u64
}

/// Whether a live item is one the subscriber already has from its backlog read.
pub fn already_seen(item: &Item, cursor: Cursor) -> bool {
    item.at.ino == cursor.ino && item.at.offset <= cursor.offset
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn resumes_after_the_last_id_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":3}").unwrap();
        let (items, cur) = read_since(&path, None);
        assert_eq!(items.len(), 2, "the unfinished third line waits");
        assert_eq!(&*items[1].line, "{\"a\":2}");
        assert_eq!(Cursor::parse(&items[0].at.id()), Some(items[0].at));
        let (again, _) = read_since(&path, Some(items[0].at));
        assert_eq!(
            again.iter().map(|i| &*i.line).collect::<Vec<_>>(),
            ["{\"a\":2}"]
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"\n").unwrap();
        // Rotated: the old file becomes .1, a new one starts.
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        std::fs::write(&path, "{\"b\":1}\n").unwrap();
        let (rest, end) = read_since(&path, Some(cur));
        assert_eq!(
            rest.iter().map(|i| &*i.line).collect::<Vec<_>>(),
            ["{\"a\":3}", "{\"b\":1}"]
        );
        assert!(already_seen(&rest[1], end));
        let (none, _) = read_since(&path, Some(end));
        assert!(none.is_empty());
        // An id from a file that is gone: everything there is now.
        let (all, _) = read_since(&path, Cursor::parse("1-5"));
        assert_eq!(all.len(), 1);
        assert_eq!(tail(&path, 0).0.len(), 0);
        for bad in ["", "x-1", "1-", "-1", "99999999999999999999999-1"] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }
}
