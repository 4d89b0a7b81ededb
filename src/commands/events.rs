//! `nexus events`: the ledger, as a table or as its JSON lines; `--follow` like tail -f.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use super::Common;
use crate::ledger::Event;

pub struct Options {
    pub last: usize,
    pub json: bool,
    pub follow: bool,
    /// Only events of this type (`task_failed`, `respawned`, …).
    pub event: Option<String>,
}

#[inline(never)]
pub fn run(common: &Common, opts: &Options) -> Result<(), String> {
    let dir = common.runtime_dir()?;
    let path = dir.events();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && opts.follow => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let wanted = |line: &str| {
        opts.event
            .as_deref()
            .is_none_or(|want| serde_json::from_str::<Event>(line).is_ok_and(|e| e.event == want))
    };
    let lines: Vec<&str> = text.lines().filter(|l| wanted(l)).collect();
    for line in &lines[lines.len().saturating_sub(opts.last)..] {
        print_line(line, opts.json);
    }
    if !opts.follow {
        return Ok(());
    }
    let mut offset = text.len() as u64;
    let mut partial = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // the ledger was replaced by a new start
        }
        if len == offset || f.seek(SeekFrom::Start(offset)).is_err() {
            continue;
        }
        let mut chunk = String::new();
        if f.read_to_string(&mut chunk).is_err() {
            continue;
        }
        offset += chunk.len() as u64;
        partial.push_str(&chunk);
        while let Some(nl) = partial.find('\n') {
            let line: String = partial.drain(..=nl).collect();
            if wanted(line.trim_end()) {
                print_line(line.trim_end(), opts.json);
            }
        }
    }
}

pub fn print_line(line: &str, json: bool) {
    if json {
        println!("{line}");
        return;
    }
    let Ok(ev) = serde_json::from_str::<Event>(line) else {
        println!("{line}");
        return;
    };
    let mut out = format!("{}  {:<10}", ev.ts, ev.event);
    if let (Some(role), Some(id)) = (ev.role, ev.id) {
        out.push_str(&format!(" {role}-{id}"));
    }
    match (&ev.service, ev.instance) {
        (Some(s), Some(n)) => out.push_str(&format!(" {s}-{n}")),
        (Some(s), None) => out.push_str(&format!(" {s}")),
        _ => {}
    }
    if let Some(t) = ev.task {
        out.push_str(&format!(" task {t}"));
        if let Some(a) = ev.attempt {
            out.push_str(&format!(" attempt {a}"));
        }
    }
    if let Some(w) = ev.workflow {
        out.push_str(&format!(" (workflow-{w})"));
    }
    if let Some(pid) = ev.pid {
        out.push_str(&format!(" pid={pid}"));
    }
    if let Some(old) = ev.old_pid {
        out.push_str(&format!(" old_pid={old}"));
    }
    if let Some(c) = &ev.cause {
        out.push_str(&format!(" cause={c}"));
    }
    if let Some(c) = ev.code {
        out.push_str(&format!(" code={c}"));
    }
    if let Some(s) = ev.signal {
        out.push_str(&format!(" signal={}", crate::child::signal_name(s)));
    }
    if let Some(d) = ev.detect_ms {
        out.push_str(&format!(" detect={d}ms"));
    }
    if let Some(r) = ev.recover_ms {
        out.push_str(&format!(" recover={r}ms"));
    }
    if let Some(d) = &ev.detail {
        out.push_str(&format!(" ({d})"));
    }
    println!("{out}");
}
