//! nexus's own failures never touch the user's program: SIGKILL or SIGSTOP of its
//! workflow, of the master, of both communicators — the program keeps its pid, is not
//! restarted, and every line it writes reaches its log exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// Prints `PID N` with N counting up, a line every millisecond or so.
const COUNTER: &str = r#"["python3", "-u", "-c", "import os,sys,time\npid=os.getpid()\ni=0\nwhile True:\n  sys.stdout.write(f'{pid} {i}\\n'); i+=1\n  if i % 50 == 0: time.sleep(0.05)"]"#;

fn cluster(extra: &str) -> Cluster {
    Cluster::new(&format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000, "workflows": 3
             {extra}, "services": [{{"name": "counter", "command": {COUNTER}}},
                                   {{"name": "other", "command": ["sleep", "1000"]}}]}}"#
    ))
}

/// For each pid that wrote to the log: (first, last, lines). Panics on a gap or a
/// repeated line: every line must arrive exactly once.
fn check_lines(c: &Cluster, inst: &str) -> BTreeMap<i32, (u64, u64, u64)> {
    let mut seen: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    for line in c.log_text(inst).lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() == 5
            && f[2] == "out"
            && let (Ok(pid), Ok(n)) = (f[3].parse(), f[4].parse())
        {
            seen.entry(pid).or_default().push(n);
        }
    }
    seen.into_iter()
        .map(|(pid, v)| {
            for w in v.windows(2) {
                assert_eq!(
                    w[1],
                    w[0] + 1,
                    "pid {pid}: line {} then {}: lost or repeated",
                    w[0],
                    w[1]
                );
            }
            (pid, (v[0], v[v.len() - 1], v.len() as u64))
        })
        .collect()
}

/// Waits until the counter has written lines past `n` (its output still flows).
fn wait_flowing(c: &Cluster, pid: i32, n: u64) -> u64 {
    let mut last = 0;
    wait_until("the program's lines keep coming", T, || {
        last = check_lines(c, "counter-1").get(&pid).map_or(0, |x| x.1);
        last > n
    });
    last
}

fn no_service_restarts(c: &Cluster) {
    let restarts: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["service"].is_string() && e["event"] == "respawned")
        .collect();
    assert!(restarts.is_empty(), "a program was restarted: {restarts:?}");
}

#[test]
fn sigkill_and_sigstop_of_the_hosting_workflow_never_touch_the_program() {
    let c = cluster("");
    c.start();
    let pid = c.program_pid("counter-1").unwrap();
    let mut n = wait_flowing(&c, pid, 100);
    for _ in 0..3 {
        let wf = c.pid_of("workflow", 1).unwrap();
        signal(wf, libc::SIGKILL);
        c.wait_replaced("workflow", 1, wf);
        wait_until("adopted", T, || {
            c.record("counter-1")
                .is_some_and(|r| r["host"]["pid"] != wf && r["host"]["pid"].is_number())
        });
        assert_eq!(c.program_pid("counter-1"), Some(pid), "same program");
        n = wait_flowing(&c, pid, n + 100);
        // A stable run between kills, so the workflow's own restarts are not backed off.
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Stopped: the watchdogs replace the workflow after the timeout; the program is
    // untouched meanwhile (its pipe holds what it writes) and adopted after.
    let wf = c.pid_of("workflow", 1).unwrap();
    signal(wf, libc::SIGSTOP);
    // Counted from the last line the stopped workflow wrote: the lines past it are the
    // successor's, after its adoption (the earlier `n` is a second of lines old).
    wait_until("the workflow stopped", T, || proc_state(wf) == Some('T'));
    let n = check_lines(&c, "counter-1").get(&pid).map_or(n, |x| x.1);
    c.wait_replaced("workflow", 1, wf);
    assert_eq!(c.program_pid("counter-1"), Some(pid));
    wait_flowing(&c, pid, n + 100);
    no_service_restarts(&c);
    // Polled with a deadline rather than read once, so a slow machine reports which
    // adoption is missing instead of a count taken too early.
    let adopted = || {
        c.service_events("counter", 1)
            .iter()
            .filter(|e| e["event"] == "adopted" && e["pid"] == pid)
            .count()
    };
    wait_until("the fourth adoption in the ledger", T, || adopted() >= 4);
    assert_eq!(adopted(), 4, "adopted once per workflow replaced");
    let lines = check_lines(&c, "counter-1");
    assert_eq!(
        lines.keys().copied().collect::<Vec<_>>(),
        vec![pid],
        "one program only"
    );
    assert_eq!(lines[&pid].0, 0, "from its first line");
}

#[test]
fn the_master_and_both_communicators_dying_never_touch_the_program() {
    let c = cluster("");
    c.start();
    let pid = c.program_pid("counter-1").unwrap();
    let other = c.program_pid("other-1").unwrap();
    let mut n = wait_flowing(&c, pid, 100);
    let master = c.master_pid();
    signal(master, libc::SIGKILL);
    wait_until("a new master", T, || {
        std::fs::read_to_string(c.path().join("leader.lock"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|p| p != master && !gone(p))
    });
    c.wait_whole(8, T);
    n = wait_flowing(&c, pid, n + 100);
    // Both communicators at once (stopped first, so neither sees the other die).
    let comms = c.pids("communicator");
    for &p in &comms {
        signal(p, libc::SIGSTOP);
    }
    for &p in &comms {
        signal(p, libc::SIGKILL);
    }
    wait_until("a survivor takes over", T, || {
        c.pids("communicator").iter().all(|p| !comms.contains(p)) && c.count("communicator") == 2
    });
    c.wait_whole(8, T);
    wait_flowing(&c, pid, n + 100);
    assert_eq!(c.program_pid("counter-1"), Some(pid));
    assert_eq!(c.program_pid("other-1"), Some(other));
    no_service_restarts(&c);
    check_lines(&c, "counter-1");
}

#[test]
fn a_program_that_died_while_unsupervised_is_restarted_with_its_status_unknown() {
    let c = cluster("");
    c.start();
    let wf = c.pid_of("workflow", 2).unwrap();
    let victim = c.program_pid("other-1").unwrap();
    // Its workflow cannot see it die: it is stopped, and then replaced.
    signal(wf, libc::SIGSTOP);
    signal(victim, libc::SIGKILL);
    c.wait_replaced("workflow", 2, wf);
    let new = c.wait_program_replaced("other-1", victim, T);
    let ev = c.service_events("other", 1);
    assert!(
        ev.iter().any(|e| e["event"] == "exited"
            && e["pid"] == victim
            && e["detail"].as_str().is_some_and(|d| d.contains("unknown"))),
        "{ev:?}"
    );
    let respawned: Vec<_> = ev
        .iter()
        .filter(|e| e["event"] == "respawned" && e["old_pid"] == victim)
        .collect();
    assert_eq!(respawned.len(), 1, "{ev:?}");
    assert_eq!(respawned[0]["pid"], new);
    let rec = c.record("other-1").unwrap();
    assert_eq!(rec["machine"]["last_exit"]["unknown"], true, "{rec}");
}

#[test]
fn restarting_or_rescaling_workflows_hands_programs_over_without_a_restart() {
    let c = cluster("");
    c.start();
    let pid = c.program_pid("counter-1").unwrap();
    let n = wait_flowing(&c, pid, 100);
    let out = c.nexus(&["restart", "workflow-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(c.program_pid("counter-1"), Some(pid));
    let n = wait_flowing(&c, pid, n + 100);
    // Two instances of the counter: `other` moves from workflow-2 to workflow-3, running.
    let other = c.program_pid("other-1").unwrap();
    let out = c.nexus(&["scale", "counter=2"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("other moved", T, || {
        c.record("other-1")
            .is_some_and(|r| r["host"]["workflow"] == 3)
    });
    assert_eq!(
        c.program_pid("other-1"),
        Some(other),
        "moved, not restarted"
    );
    assert_eq!(c.program_pid("counter-1"), Some(pid));
    wait_flowing(&c, pid, n + 100);
    no_service_restarts(&c);
    // Logs of a service merge its instances.
    wait_until("counter-2 writes", T, || {
        c.log_text("counter-2").lines().count() > 10
    });
    let out = c.nexus(&["logs", "counter", "-n", "400"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(" counter-1 out ") && said.contains(" counter-2 out "),
        "{said}"
    );
    // Back down: counter-2 is stopped, other moves back, still the same program.
    let second = c.program_pid("counter-2").unwrap();
    let out = c.nexus(&["scale", "counter=1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("counter-2 gone", T, || gone(second));
    wait_until("other moved back", T, || {
        c.record("other-1")
            .is_some_and(|r| r["host"]["workflow"] == 2)
    });
    assert_eq!(c.program_pid("other-1"), Some(other));
    check_lines(&c, "counter-1");
}
