//! A daemon exits or is killed: the master sees it at once and replaces it, once.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn killed_workflow_is_replaced_with_same_role_and_id() {
    let c = Cluster::new(FAST);
    c.start();
    let victim = c.pid_of("workflow", 3).unwrap();
    signal(victim, libc::SIGKILL);
    c.wait_replaced("workflow", 3, victim);
    c.wait_whole(10, Duration::from_secs(10));
    wait_until("respawned event", Duration::from_secs(5), || {
        !c.recoveries_of(victim).is_empty()
    });
    let rec = c.recoveries_of(victim);
    assert_eq!(rec.len(), 1, "exactly one replacement: {rec:?}");
    assert_eq!(rec[0]["cause"], "crash");
    assert!(rec[0]["recover_ms"].as_f64().unwrap() < 5_000.0);
}

#[test]
fn killed_watchdog_comes_back_with_its_socket() {
    let c = Cluster::new(FAST);
    c.start();
    let sock = c.path().join("heartbeat_2.sock");
    let victim = c.pid_of("watchdog", 2).unwrap();
    signal(victim, libc::SIGKILL);
    c.wait_replaced("watchdog", 2, victim);
    wait_until("heartbeat_2.sock back", Duration::from_secs(5), || {
        sock.exists()
    });
    c.wait_whole(10, Duration::from_secs(10));
    // The new watchdog hears heartbeats on the new socket.
    wait_until("watchdog-2 hears workflows", Duration::from_secs(5), || {
        let s = c.status_json();
        s["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["master"] == true || d["heartbeat_age_ms"].is_u64())
    });
}

#[test]
fn killed_standby_communicator_is_replaced() {
    let c = Cluster::new(FAST);
    c.start();
    let master = c.master_pid();
    let standby = c.standby();
    signal(standby.0, libc::SIGKILL);
    c.wait_replaced("communicator", standby.1, standby.0);
    assert_eq!(c.master_pid(), master, "the master did not change");
}

#[test]
fn many_kills_give_one_replacement_each() {
    let c = Cluster::new(FAST);
    c.start();
    let mut victims = Vec::new();
    for round in 0..5u32 {
        let id = round % 5 + 1;
        let victim = c.pid_of("workflow", id).unwrap();
        signal(victim, libc::SIGKILL);
        victims.push(victim);
        c.wait_replaced("workflow", id, victim);
    }
    c.wait_whole(10, Duration::from_secs(10));
    for v in victims {
        wait_until("recovery recorded", Duration::from_secs(5), || {
            !c.recoveries_of(v).is_empty()
        });
        assert_eq!(c.recoveries_of(v).len(), 1, "one recovery for {v}");
    }
}
