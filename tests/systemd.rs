//! systemd's notify protocol, with this test playing systemd: a datagram socket as
//! NOTIFY_SOCKET, WATCHDOG_USEC set, and the messages checked.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

fn collect(
    sock: &UnixDatagram,
    until: impl Fn(&[String]) -> bool,
    within: Duration,
) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while !until(&got) && Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn the_master_speaks_sd_notify() {
    let c = Cluster::new(FAST);
    // Outside the runtime directory: start cleans stale sockets there.
    let systemd = tempfile::tempdir().unwrap();
    let path = systemd.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let notify = path.to_str().unwrap();
    // 400 ms watchdog: a ping every 200 ms.
    c.start_env(&[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "400000")]);
    let got = collect(
        &sock,
        |m| {
            m.iter().any(|x| x.contains("READY=1"))
                && m.iter().filter(|x| x.as_str() == "WATCHDOG=1").count() >= 3
        },
        Duration::from_secs(10),
    );
    let ready = got
        .iter()
        .find(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("READY=1 in {got:?}"));
    assert!(
        ready.contains("STATUS=10/10 daemons running (2 communicators, 3 watchdogs, 5 workflows)"),
        "{ready}"
    );
    assert!(
        got.iter().filter(|m| m.as_str() == "WATCHDOG=1").count() >= 3,
        "{got:?}"
    );

    // A failure shows in STATUS=; the new master after a failover keeps pinging.
    let victim = c.pid_of("workflow", 1).unwrap();
    signal(victim, libc::SIGKILL);
    c.wait_replaced("workflow", 1, victim);
    let old = c.master_pid();
    signal(old, libc::SIGKILL);
    wait_until("a new master", Duration::from_secs(10), || {
        c.master_pid() != old
    });
    let new = c.master_pid();
    let after = collect(
        &sock,
        |m| m.iter().any(|x| x.contains(&format!("master pid {new}"))),
        Duration::from_secs(10),
    );
    assert!(
        after
            .iter()
            .any(|m| m.contains(&format!("master pid {new}"))),
        "{after:?}"
    );

    assert!(c.nexus(&["stop"]).status.success());
    let end = collect(
        &sock,
        |m| m.iter().any(|x| x.contains("STOPPING=1")),
        Duration::from_secs(5),
    );
    assert!(end.iter().any(|m| m.contains("STOPPING=1")), "{end:?}");
}

#[test]
fn start_foreground_stays_and_stops_the_cluster_on_sigterm() {
    let c = Cluster::new(FAST);
    let mut child = std::process::Command::new(NEXUS)
        .args(["start", "--foreground", "--runtime-dir"])
        .arg(c.path())
        .env("NEXUS_CONFIG", &c.config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("cluster whole", Duration::from_secs(10), || {
        c.nexus(&["status"]).status.success()
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "stays in the foreground"
    );
    signal(child.id() as i32, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "foreground start did not end on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(c.daemons().is_empty(), "SIGTERM stopped the whole cluster");
}
