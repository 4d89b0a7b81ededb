//! `nexus logs [NAME] [-n N] [-f]`: one daemon's log (`workflow-3`), a service's (`web`:
//! its instances merged) or one instance's (`web-2`), or everything merged by time; `-f`
//! follows across rotations.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Common;
use crate::config::{Config, SlotName};
use crate::logfiles;
use crate::runtime_dir::RuntimeDir;

#[inline(never)]
pub fn run(common: &Common, which: Option<&str>, last: usize, follow: bool) -> Result<(), String> {
    let dir = common.runtime_dir()?;
    let files = resolve(&dir, which)?;
    let (lines, mut pos) = tail(&dir, &files, last);
    for l in &lines {
        println!("{l}");
    }
    if follow {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // Polls every 200 ms; ends with Ctrl-C. Bounded: a week of polls.
        for _ in 0..3_024_000 {
            std::thread::sleep(Duration::from_millis(200));
            let new = poll(&files, &mut pos);
            if !new.is_empty() {
                print!("{new}");
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(())
}

/// The log files a name stands for: a daemon's (`workflow-3`), a service's instances
/// (`web`), one instance's (`web-2`), or with no name every log. Only names of the
/// running config resolve, so a request can never name a path of its own.
pub fn resolve(dir: &RuntimeDir, which: Option<&str>) -> Result<Vec<PathBuf>, String> {
    let logs = dir.logs_dir();
    match which {
        Some(name) => {
            let paths = match SlotName::parse(name) {
                Some(slot) => vec![dir.log_file(slot)],
                None => {
                    // A service's instances, merged; or one instance.
                    let cfg = Config::load(&dir.config_file()).unwrap_or_default();
                    let names = crate::services::spec::targets(&cfg.services, name).map_err(|e| {
                        format!("`{name}` is not a daemon name (like workflow-3 or watchdog-1), and {e}")
                    })?;
                    names
                        .iter()
                        .map(|n| crate::services::state::log_path(dir, n))
                        .collect()
                }
            };
            let paths: Vec<PathBuf> = paths.into_iter().filter(|p| p.exists()).collect();
            if paths.is_empty() {
                return Err(format!(
                    "no log for {name} in {} (known: {})",
                    logs.display(),
                    known(&logs).join(", ")
                ));
            }
            Ok(paths)
        }
        None => {
            let mut all: Vec<PathBuf> = known(&logs)
                .iter()
                .map(|n| logs.join(format!("{n}.log")))
                .collect();
            all.sort();
            if all.is_empty() {
                return Err(format!("no logs in {}", logs.display()));
            }
            Ok(all)
        }
    }
}

/// Where each followed file is: its inode and the offset after its last whole line.
pub type Positions = BTreeMap<PathBuf, (u64, u64)>;

/// The last `last` lines of the files merged by time, and where following goes on.
pub fn tail(dir: &RuntimeDir, files: &[PathBuf], last: usize) -> (Vec<String>, Positions) {
    let keep =
        Config::load(&dir.config_file()).map_or(Config::default().log_files, |c| c.log_files);
    // Where each file ends now: the tail is read up to there and following starts there,
    // so a line written meanwhile is shown exactly once, not lost between the two.
    let ends: Positions = files
        .iter()
        .filter_map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (f.clone(), (m.ino(), m.len())))
        })
        .collect();
    // Lines start with an RFC 3339 timestamp, so sorting merges the files by time.
    let mut lines: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let end = ends.get(f).map_or(0, |&(_, len)| len);
            tail_lines(f, end, keep, last)
        })
        .collect();
    lines.sort();
    let lines = lines.split_off(lines.len().saturating_sub(last));
    (lines, ends)
}

fn known(logs: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".log")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// The last `n` lines of a log (up to byte `end` of the current file), reaching into its
/// rotated predecessors when short.
fn tail_lines(path: &Path, end: u64, keep: u32, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut sources = vec![(path.to_path_buf(), end)];
    sources.extend(
        logfiles::rotated(path, keep)
            .into_iter()
            .map(|p| (p, u64::MAX)),
    );
    for (src, end) in sources {
        if out.len() >= n {
            break;
        }
        let text = read_tail(&src, end, 256 * 1024);
        let mut older: Vec<String> = text.lines().map(str::to_string).collect();
        older.append(&mut out);
        out = older;
    }
    let skip = out.len().saturating_sub(n);
    out.split_off(skip)
}

/// At most `max` bytes before byte `end` of a file, from the start of a line.
fn read_tail(path: &Path, end: u64, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0).min(end);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.take(len - start).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    // A cut first line is dropped rather than shown half.
    if start > 0 {
        text.split_once('\n')
            .map_or(String::new(), |(_, rest)| rest.to_string())
    } else {
        text
    }
}

/// The whole lines written to the files since `pos` (a changed inode means the log was
/// rotated: the new file is read from its start); a partial last line waits.
pub fn poll(files: &[PathBuf], pos: &mut Positions) -> String {
    let mut out = String::new();
    for f in files {
        let Ok(meta) = std::fs::metadata(f) else {
            continue;
        };
        let (ino, offset) = pos.get(f).copied().unwrap_or((meta.ino(), 0));
        let offset = if ino != meta.ino() || meta.len() < offset {
            0
        } else {
            offset
        };
        if meta.len() == offset {
            pos.insert(f.clone(), (meta.ino(), offset));
            continue;
        }
        let Ok(mut file) = File::open(f) else {
            continue;
        };
        if file.seek(SeekFrom::Start(offset)).is_err() {
            continue;
        }
        let mut chunk = Vec::new();
        // At most 4 MB a poll: a burst is read over several.
        let _ = (&mut file).take(4 << 20).read_to_end(&mut chunk);
        let upto = chunk.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        out.push_str(&String::from_utf8_lossy(&chunk[..upto]));
        pos.insert(f.clone(), (meta.ino(), offset + upto as u64));
    }
    out
}
