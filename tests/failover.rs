//! The master dies: the standby takes the lock, binds the control socket, adopts the
//! running daemons and respawns the missing communicator. Never two masters.

mod common;

use std::time::Duration;

use common::*;

fn masters(c: &Cluster) -> usize {
    // Exactly one process may hold the control socket's listener: ask the kernel via the
    // lock, and check that the recorded holder is a live communicator.
    let m = c.master_pid();
    usize::from(
        c.daemons()
            .iter()
            .any(|d| d.0 == m && d.1 == "communicator"),
    )
}

#[test]
fn killed_master_is_replaced_by_the_standby() {
    let c = Cluster::new(FAST);
    c.start();
    let old = c.master_pid();
    let workflows: Vec<i32> = c.pids("workflow");
    signal(old, libc::SIGKILL);
    wait_until("a new master", Duration::from_secs(10), || {
        c.master_pid() != old && masters(&c) == 1
    });
    c.wait_whole(10, Duration::from_secs(10));
    let now: Vec<i32> = c.pids("workflow");
    assert_eq!(workflows, now, "the workflows were adopted, not restarted");
    let leader: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "leader")
        .collect();
    assert_eq!(leader.len(), 1);
    assert_eq!(leader[0]["old_pid"], old);
    wait_until("failover recovery recorded", Duration::from_secs(5), || {
        !c.recoveries_of(old).is_empty()
    });
    assert_eq!(c.recoveries_of(old)[0]["cause"], "failover");

    // The new master respawns like the old one did.
    let victim = c.pid_of("workflow", 5).unwrap();
    signal(victim, libc::SIGKILL);
    wait_until(
        "workflow-5 replaced by the new master",
        Duration::from_secs(10),
        || c.pid_of("workflow", 5).is_some_and(|p| p != victim),
    );
    assert!(c.nexus(&["stop"]).status.success());
    assert!(c.daemons().is_empty());
}

#[test]
fn repeated_master_kills() {
    let c = Cluster::new(FAST);
    c.start();
    for _ in 0..4 {
        let old = c.master_pid();
        signal(old, libc::SIGKILL);
        wait_until("a new master", Duration::from_secs(10), || {
            c.master_pid() != old && masters(&c) == 1
        });
        c.wait_whole(10, Duration::from_secs(10));
    }
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(c.daemons().is_empty());
}

#[test]
fn hung_daemon_is_still_replaced_after_failover() {
    let c = Cluster::new(FAST);
    c.start();
    let old = c.master_pid();
    signal(old, libc::SIGKILL);
    wait_until("a new master", Duration::from_secs(10), || {
        c.master_pid() != old && masters(&c) == 1
    });
    c.wait_whole(10, Duration::from_secs(10));
    let victim = c.pid_of("workflow", 1).unwrap();
    signal(victim, libc::SIGSTOP);
    c.wait_replaced("workflow", 1, victim);
    wait_until("old pid gone", Duration::from_secs(5), || gone(victim));
}

#[test]
fn hung_master_is_killed_by_the_standby_and_replaced() {
    let c = Cluster::new(FAST);
    c.start();
    let old = c.master_pid();
    signal(old, libc::SIGSTOP);
    wait_until(
        "a new master after the hung one",
        Duration::from_secs(15),
        || c.master_pid() != old && masters(&c) == 1,
    );
    wait_until("old master gone", Duration::from_secs(5), || gone(old));
    c.wait_whole(10, Duration::from_secs(10));
    let killed_of = || -> Vec<_> {
        c.events()
            .into_iter()
            .filter(|e| e["event"] == "killed" && e["pid"] == old)
            .collect()
    };
    // The new master writes the ledger after it has taken over and refilled the slots.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while killed_of().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the kill of {old} was not recorded; the ledger: {:?}; logs: {}",
            c.events(),
            std::fs::read_dir(c.path().join("logs"))
                .map(|d| d
                    .flatten()
                    .map(|e| format!(
                        "\n== {}\n{}",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    ))
                    .collect::<String>())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = killed_of();
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert_eq!(killed[0]["cause"], "hang");
    wait_until("recovery recorded", Duration::from_secs(5), || {
        !c.recoveries_of(old).is_empty()
    });
    let rec = c.recoveries_of(old);
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0]["cause"], "hang");
}

#[test]
fn hung_master_and_hung_standby_are_both_replaced() {
    let c = Cluster::new(FAST);
    c.start();
    let comms: Vec<i32> = c.pids("communicator");
    for &p in &comms {
        signal(p, libc::SIGSTOP);
    }
    // The watchdogs kill the master after two timeouts; a probing daemon takes over and
    // has the hung standby killed like any hung daemon.
    wait_until(
        "both hung communicators replaced",
        Duration::from_secs(20),
        || comms.iter().all(|&p| gone(p)) && c.count("communicator") == 2,
    );
    c.wait_whole(10, Duration::from_secs(10));
}
