//! `nexus health`: HEALTHY 0, DEGRADED 1, CRITICAL 2, not running 3, with reasons.

mod common;

use std::time::Duration;

use common::*;

fn health(c: &Cluster) -> (Option<i32>, String) {
    let out = c.nexus(&["health"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn healthy_then_not_running() {
    let c = Cluster::new(FAST);
    assert_eq!(health(&c).0, Some(3));
    c.start();
    let (code, said) = health(&c);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.starts_with("HEALTHY"), "{said}");
    let json: serde_json::Value =
        serde_json::from_slice(&c.nexus(&["health", "--json"]).stdout).unwrap();
    assert_eq!(json["health"], "HEALTHY");
    assert!(c.nexus(&["stop"]).status.success());
    assert_eq!(health(&c).0, Some(3));
}

#[test]
fn a_failed_slot_is_degraded() {
    let c = Cluster::new(
        r#"{"interval_ms": 100, "timeout_ms": 1000, "restart_intensity": 2, "backoff_max_ms": 60000, "start_timeout_ms": 100000}"#,
    );
    let mut starter = std::process::Command::new(NEXUS)
        .args(["start", "--runtime-dir"])
        .arg(c.path())
        .env("NEXUS_CONFIG", &c.config)
        .env("NEXUS_FAULT", "crash:workflow-3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "degraded with workflow-3 failed",
        Duration::from_secs(15),
        || {
            let (code, said) = health(&c);
            code == Some(1) && said.contains("workflow-3 is failed")
        },
    );
    let _ = starter.kill();
    let _ = starter.wait();
}

#[test]
fn a_hung_master_is_critical() {
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 8000}"#);
    c.start();
    let master = c.master_pid();
    signal(master, libc::SIGSTOP);
    let (code, said) = health(&c);
    signal(master, libc::SIGCONT);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("no master answers"), "{said}");
    wait_until("healthy again", Duration::from_secs(10), || {
        health(&c).0 == Some(0)
    });
}

#[test]
fn status_watch_redraws_in_place() {
    use std::io::Read;
    let c = Cluster::new(FAST);
    c.start();
    let mut child = std::process::Command::new(NEXUS)
        .args(["status", "--watch", "--runtime-dir"])
        .arg(c.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while text.matches("\x1b[H\x1b[2J").count() < 2 && std::time::Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.matches("\x1b[H\x1b[2J").count() >= 2,
        "redrawn at least twice: {text:?}"
    );
    assert!(text.contains("workflow"), "{text:?}");
    // Not a terminal: no colour codes besides the redraw itself.
    assert!(!text.contains("\x1b[32m"), "{text:?}");
}
