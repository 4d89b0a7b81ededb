//! `nexus chaos`: kill random daemons of a running cluster — every role, the master too —
//! then check from the ledger that every failure was recovered exactly once, that the
//! cluster is whole, and that no process of the directory is orphaned or duplicated.
//!
//! `--services`: the services' programs are victims too, and the verdict adds that every
//! program failure was restarted exactly once, that no program was restarted because a
//! nexus daemon failed, that every service is ready again, and that no line was lost or
//! repeated (for programs that print `PID N` counter lines, as scripts/chaos_test's do).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::Common;
use crate::client;
use crate::config::{Config, Role, SlotName};
use crate::daemon::Rng;
use crate::ledger::{self, Event};
use crate::procscan;
use crate::protocol::{Request, Response, SlotState};
use crate::runtime_dir::RuntimeDir;
use crate::services::spec::InstanceName;
use crate::services::state;
use crate::spawn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalMode {
    Kill,
    Stop,
    Mixed,
}

pub struct Options {
    pub duration: Duration,
    pub interval: Duration,
    pub roles: Vec<Role>,
    pub signal: SignalMode,
    /// The services' programs are victims too.
    pub services: bool,
}

/// Who was hit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Victim {
    Daemon(SlotName),
    Program(InstanceName),
}

impl std::fmt::Display for Victim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Victim::Daemon(s) => write!(f, "{s}"),
            Victim::Program(n) => write!(f, "program {n}"),
        }
    }
}

struct Kill {
    victim: Victim,
    pid: i32,
    stop: bool,
    at_ms: u64,
    offset: Duration,
}

#[inline(never)]
pub fn run(common: &Common, opts: &Options) -> Result<i32, String> {
    let dir = common.runtime_dir()?;
    let cfg = Config::load(&dir.config_file()).map_err(|_| {
        format!(
            "nexus is not running in {} (no config.json there)",
            dir.display()
        )
    })?;
    let settle = Duration::from_millis(cfg.start_timeout_ms);
    if let Err(why) = super::steer::wait_whole(&dir, &cfg, settle) {
        return Err(format!(
            "the cluster in {} is not whole before chaos starts: {why}",
            dir.display()
        ));
    }
    if opts.services && cfg.services.is_empty() {
        return Err(format!(
            "--services: the cluster in {} has no services (scripts/chaos_test --services starts one that has)",
            dir.display()
        ));
    }
    let ledger_start = std::fs::metadata(dir.events())
        .map(|m| m.len())
        .unwrap_or(0);
    let roles: Vec<&str> = opts.roles.iter().map(|r| r.as_str()).collect();
    println!(
        "chaos in {}: {} every {:.1} s for {:.0} s, roles {}",
        dir.display(),
        match opts.signal {
            SignalMode::Kill => "SIGKILL",
            SignalMode::Stop => "SIGSTOP",
            SignalMode::Mixed => "SIGKILL or SIGSTOP",
        },
        opts.interval.as_secs_f64(),
        opts.duration.as_secs_f64(),
        roles.join(",")
    );

    let mut rng = Rng::seeded(u64::from(std::process::id()));
    let mut kills: Vec<Kill> = Vec::new();
    let t0 = Instant::now();
    let rounds = (opts.duration.as_millis() / opts.interval.as_millis().max(1)) as usize + 1;
    for round in 0..rounds {
        let at = t0 + opts.interval * round as u32;
        if at >= t0 + opts.duration {
            break;
        }
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let max_hangs = (cfg.watchdogs as usize).saturating_sub(1).max(1);
        if let Some(k) = strike(&dir, opts, max_hangs, &kills, &mut rng, t0) {
            println!(
                "  +{:6.2}s  {:<7} {} pid {}",
                k.offset.as_secs_f64(),
                if k.stop { "SIGSTOP" } else { "SIGKILL" },
                k.victim,
                k.pid
            );
            kills.push(k);
        }
    }

    // Every stopped daemon needs its timeout (two, for a master whose standby is hung)
    // before it can be replaced; allow that plus the start time.
    let deadline = Instant::now() + 3 * cfg.timeout() + settle;
    let mut verdict = check(&dir, &cfg, &kills, ledger_start);
    for _ in 0..100_000 {
        if verdict.violations.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        verdict = check(&dir, &cfg, &kills, ledger_start);
    }
    report(&kills, &verdict);
    Ok(if verdict.violations.is_empty() { 0 } else { 1 })
}

/// Picks a victim and signals it. Chaos stays inside the fault model the design answers:
/// any number of crashes, but at most `watchdogs - 1` daemon hangs not yet recovered (a
/// further SIGSTOP becomes a SIGKILL), so that some watchdog can always testify. That still
/// allows two hung watchdogs at once, or a hung master with a hung standby. A program's hang
/// is judged by its own workflow, so programs have no such limit. With `--services`, half
/// the victims are programs.
fn strike(
    dir: &RuntimeDir,
    opts: &Options,
    max_hangs: usize,
    kills: &[Kill],
    rng: &mut Rng,
    t0: Instant,
) -> Option<Kill> {
    let stopped: Vec<i32> = kills
        .iter()
        .filter(|k| k.stop && !gone(k.pid))
        .map(|k| k.pid)
        .collect();
    let stopped_daemons = kills
        .iter()
        .filter(|k| k.stop && !gone(k.pid) && matches!(k.victim, Victim::Daemon(_)))
        .count();
    let mut stop = match opts.signal {
        SignalMode::Kill => false,
        SignalMode::Stop => true,
        SignalMode::Mixed => rng.below(2) == 1,
    };
    let programs: Vec<(InstanceName, i32, u64)> = if opts.services {
        state::read_all(dir)
            .into_values()
            .filter(|r| r.machine.phase.running())
            .filter_map(|r| {
                let run = r.run.as_ref()?;
                Some((r.name(), run.pid, run.start_ticks))
            })
            .filter(|(_, pid, _)| !stopped.contains(pid))
            .collect()
    } else {
        Vec::new()
    };
    let at_ms = ledger::unix_ms_now();
    if !programs.is_empty() && rng.below(2) == 1 {
        let (name, pid, ticks) = programs[rng.below(programs.len())].clone();
        let fd = spawn::pidfd_open(pid).ok()?;
        // The pid must still be that program (a replacement may have taken its place).
        if procscan::start_ticks(pid) != Some(ticks) {
            return None;
        }
        spawn::pidfd_signal(&fd, if stop { libc::SIGSTOP } else { libc::SIGKILL }).ok()?;
        return Some(Kill {
            victim: Victim::Program(name),
            pid,
            stop,
            at_ms,
            offset: t0.elapsed(),
        });
    }
    let candidates: Vec<procscan::Found> = procscan::daemons_of(dir.path())
        .into_iter()
        .filter(|f| opts.roles.contains(&f.slot.role) && !stopped.contains(&f.pid))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let victim = candidates[rng.below(candidates.len())];
    if stop && stopped_daemons >= max_hangs {
        stop = false;
    }
    let fd = procscan::open_daemon(victim.pid, victim.slot, dir.path())?;
    spawn::pidfd_signal(&fd, if stop { libc::SIGSTOP } else { libc::SIGKILL }).ok()?;
    Some(Kill {
        victim: Victim::Daemon(victim.slot),
        pid: victim.pid,
        stop,
        at_ms,
        offset: t0.elapsed(),
    })
}

struct Verdict {
    violations: Vec<String>,
    /// Per kill: its replacement's ready event, if any.
    recovered: Vec<Option<Event>>,
    daemons: usize,
    lines: LineCheck,
}

fn check(dir: &RuntimeDir, cfg: &Config, kills: &[Kill], ledger_start: u64) -> Verdict {
    let events = events_since(dir, ledger_start);
    // Keyed by slot and pid: one process can fail in two slots (a daemon that took over
    // as communicator leaves its own slot, then may die as communicator).
    let mut by_old: HashMap<(Victim, i32), Vec<&Event>> = HashMap::new();
    for e in events.iter().filter(|e| e.event == "respawned") {
        let Some(old) = e.old_pid.filter(|&p| p > 0) else {
            continue;
        };
        let victim = match (&e.service, e.instance, e.role, e.id) {
            (Some(service), Some(n), ..) => Victim::Program(InstanceName {
                service: service.clone(),
                n,
            }),
            (None, _, Some(role), Some(id)) => Victim::Daemon(SlotName { role, id }),
            _ => continue,
        };
        by_old.entry((victim, old)).or_default().push(e);
    }
    let mut violations = Vec::new();
    let mut recovered = Vec::new();
    for k in kills {
        let recs = by_old
            .get(&(k.victim.clone(), k.pid))
            .map_or(&[][..], Vec::as_slice);
        match recs.len() {
            0 => violations.push(format!(
                "{} pid {} (+{:.2}s) not recovered",
                k.victim,
                k.pid,
                k.offset.as_secs_f64()
            )),
            1 => {}
            n => violations.push(format!("{} pid {} recovered {n} times", k.victim, k.pid)),
        }
        recovered.push(recs.first().map(|e| (*e).clone()));
        if !gone(k.pid) {
            violations.push(format!(
                "{} pid {} is still running after its replacement",
                k.victim, k.pid
            ));
        }
    }
    for ((victim, old), recs) in &by_old {
        let ours = kills.iter().any(|k| k.pid == *old && k.victim == *victim);
        if recs.len() > 1 && !ours {
            violations.push(format!("{victim} pid {old} recovered {} times", recs.len()));
        }
        if !ours && matches!(victim, Victim::Program(_)) {
            violations.push(format!(
                "{victim} pid {old} was restarted though chaos did not touch it: a nexus failure reached the program"
            ));
        }
    }
    let found = procscan::daemons_of(dir.path());
    let mut per_slot: BTreeMap<SlotName, Vec<i32>> = BTreeMap::new();
    for f in &found {
        per_slot.entry(f.slot).or_default().push(f.pid);
    }
    for (slot, pids) in &per_slot {
        if pids.len() > 1 {
            violations.push(format!("{slot} is duplicated: pids {pids:?}"));
        }
    }
    for slot in cfg.slots() {
        if !per_slot.contains_key(&slot) {
            violations.push(format!("{slot} has no process"));
        }
    }
    match client::request(
        &dir.control_socket(),
        &Request::Status {},
        Duration::from_secs(2),
    ) {
        Ok(Response::Status(r)) => {
            for m in r.members.iter().filter(|m| m.state != SlotState::Running) {
                violations.push(format!("{} is {:?}", m.slot(), m.state));
            }
            let known: Vec<i32> = r.members.iter().map(|m| m.pid).collect();
            for f in found.iter().filter(|f| !known.contains(&f.pid)) {
                violations.push(format!(
                    "{} pid {} runs but the master does not know it (orphan)",
                    f.slot, f.pid
                ));
            }
        }
        Ok(other) => violations.push(format!("unexpected status answer {other:?}")),
        Err(e) => violations.push(format!("no master answers: {e}")),
    }
    let mut lines = LineCheck::default();
    if !cfg.services.is_empty() {
        for row in super::services_view::rows(dir, cfg) {
            let name = format!("{}-{}", row.name, row.instance);
            if !row.fine() && !row.stopped_by_user {
                violations.push(format!("service {name} is {}", row.state));
            }
            lines.check(
                &name,
                &state::log_path(
                    dir,
                    &InstanceName {
                        service: row.name.clone(),
                        n: row.instance,
                    },
                ),
                cfg.log_files,
                &mut violations,
            );
        }
    }
    Verdict {
        violations,
        recovered,
        daemons: found.len(),
        lines,
    }
}

/// Every `PID N` line a program printed must be in its log once, none missing.
#[derive(Default)]
struct LineCheck {
    programs: usize,
    lines: u64,
}

impl LineCheck {
    fn check(
        &mut self,
        name: &str,
        log: &std::path::Path,
        keep: u32,
        violations: &mut Vec<String>,
    ) {
        let mut text = String::new();
        let mut files = crate::logfiles::rotated(log, keep);
        files.reverse();
        files.push(log.to_path_buf());
        for f in files {
            text.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
        }
        // Rotation drops the oldest file: a run is checked from its first line present.
        let mut runs: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() == 5
                && f[2] == "out"
                && let (Ok(pid), Ok(n)) = (f[3].parse::<i32>(), f[4].parse::<u64>())
            {
                runs.entry(pid).or_default().push(n);
            }
        }
        for (pid, seq) in runs {
            self.programs += 1;
            self.lines += seq.len() as u64;
            if let Some(w) = seq.windows(2).find(|w| w[1] != w[0] + 1) {
                violations.push(format!(
                    "{name} pid {pid}: line {} followed by {}: {}",
                    w[0],
                    w[1],
                    if w[1] <= w[0] {
                        "a line repeated"
                    } else {
                        "lines lost"
                    }
                ));
            }
        }
    }
}

fn report(kills: &[Kill], v: &Verdict) {
    let n_kill = kills.iter().filter(|k| !k.stop).count();
    println!(
        "\n{} failures injected ({} SIGKILL, {} SIGSTOP); {} daemons running at the end",
        kills.len(),
        n_kill,
        kills.len() - n_kill,
        v.daemons
    );
    let mut by_role: BTreeMap<String, usize> = BTreeMap::new();
    for k in kills {
        let what = match &k.victim {
            Victim::Daemon(s) => s.role.to_string(),
            Victim::Program(_) => "program".to_string(),
        };
        *by_role.entry(what).or_default() += 1;
    }
    let roles: Vec<String> = by_role.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!("by role: {}", roles.join(", "));
    if v.lines.programs > 0 {
        println!(
            "output: {} lines of {} program runs checked, each once and in order",
            v.lines.lines, v.lines.programs
        );
    }
    for (label, stop, programs) in [
        ("SIGKILL", false, false),
        ("SIGSTOP", true, false),
        ("program SIGKILL", false, true),
        ("program SIGSTOP", true, true),
    ] {
        let mut to_ready: Vec<f64> = Vec::new();
        let mut recover: Vec<f64> = Vec::new();
        for (k, rec) in kills.iter().zip(&v.recovered) {
            let is_program = matches!(k.victim, Victim::Program(_));
            let Some(e) = rec
                .as_ref()
                .filter(|_| k.stop == stop && is_program == programs)
            else {
                continue;
            };
            if let Some(ts) = ledger::parse_rfc3339(&e.ts) {
                to_ready.push(ts.saturating_sub(k.at_ms) as f64);
            }
            if let Some(r) = e.recover_ms {
                recover.push(r);
            }
        }
        if !to_ready.is_empty() {
            let what = if programs { "restarted" } else { "ready" };
            println!(
                "{label}: signal -> replacement {what} (ms): {}",
                summary(&mut to_ready)
            );
            if !recover.is_empty() {
                println!(
                    "{label}: detection -> replacement ready, from the ledger (ms): {}",
                    summary(&mut recover)
                );
            }
        }
    }
    if v.violations.is_empty() {
        let programs = if v.lines.programs > 0
            || kills.iter().any(|k| matches!(k.victim, Victim::Program(_)))
        {
            "; every program failure restarted once, none for a nexus failure, no line lost"
        } else {
            ""
        };
        println!(
            "PASS: every failure recovered exactly once; cluster whole; no orphan, no duplicate{programs}"
        );
    } else {
        println!("FAIL: {} violations", v.violations.len());
        for line in &v.violations {
            println!("  - {line}");
        }
    }
}

/// `n=12 median 2.1 p99 8.0 max 8.0`.
pub fn summary(xs: &mut [f64]) -> String {
    if xs.is_empty() {
        return "n=0".into();
    }
    xs.sort_by(f64::total_cmp);
    let q = |p: f64| xs[((xs.len() as f64 * p).ceil() as usize).clamp(1, xs.len()) - 1];
    format!(
        "n={} median {:.1} p99 {:.1} max {:.1}",
        xs.len(),
        q(0.5),
        q(0.99),
        xs[xs.len() - 1]
    )
}

fn events_since(dir: &RuntimeDir, offset: u64) -> Vec<Event> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(dir.events()) else {
        return Vec::new();
    };
    let mut text = String::new();
    if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn gone(pid: i32) -> bool {
    !matches!(procscan::state(pid), Some(s) if s != 'Z')
}
