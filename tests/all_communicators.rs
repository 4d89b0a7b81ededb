//! Every communicator dies: a surviving daemon takes the lock, re-execs itself as
//! communicator and restores every slot. If none can, the rest exit: nothing runs
//! unsupervised.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_survivor_takes_over_when_both_communicators_die() {
    let c = Cluster::new(FAST);
    c.start();
    let comms: Vec<i32> = c.pids("communicator");
    assert_eq!(comms.len(), 2);
    // Both at once: frozen first, so the standby cannot take over between the two kills.
    for sig in [libc::SIGSTOP, libc::SIGKILL] {
        for &p in &comms {
            signal(p, sig);
        }
    }
    // Whole again within one timeout (plus a generous margin for a loaded machine).
    c.wait_whole(10, Duration::from_secs(10));
    let master = c.master_pid();
    assert!(!comms.contains(&master));
    let leader: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "leader")
        .collect();
    assert_eq!(leader.len(), 1, "{leader:?}");
    assert!(
        leader[0]["detail"]
            .as_str()
            .unwrap()
            .contains("taken over by"),
        "{leader:?}"
    );
    // The survivor kept its pid: the slot it left was refilled, and it is now a communicator.
    assert!(
        c.daemons()
            .iter()
            .any(|d| d.0 == master && d.1 == "communicator")
    );

    // The new master works like any other.
    let victim = c.pid_of("workflow", 2).unwrap();
    signal(victim, libc::SIGKILL);
    c.wait_replaced("workflow", 2, victim);
    assert!(c.nexus(&["stop"]).status.success());
    assert!(c.daemons().is_empty());
}

#[test]
fn without_a_possible_takeover_the_rest_exit() {
    let c = Cluster::new(FAST);
    c.start_env(&[("NEXUS_FAULT", "no_takeover")]);
    let comms = c.pids("communicator");
    for sig in [libc::SIGSTOP, libc::SIGKILL] {
        for &p in &comms {
            signal(p, sig);
        }
    }
    // Two timeouts (1.2 s) without a master, then every daemon exits by itself.
    wait_until("every daemon gone", Duration::from_secs(10), || {
        c.daemons().is_empty()
    });
}
