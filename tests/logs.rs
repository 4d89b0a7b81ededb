//! Logs: each daemon's in `logs/ROLE-ID.log`, rotated by size with a bounded number of
//! files; `nexus logs` shows one or all, `-f` follows.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

#[test]
fn logs_rotate_and_stay_bounded() {
    let c = Cluster::new(
        r#"{"interval_ms": 10, "timeout_ms": 1000, "log_max_bytes": 10000, "log_files": 2}"#,
    );
    c.start_env(&[("RUST_LOG", "trace")]);
    let logs = c.path().join("logs");
    wait_until(
        "workflow-1.log rotated twice",
        Duration::from_secs(20),
        || logs.join("workflow-1.log.2").exists(),
    );
    // Keep going a little: the oldest files must be dropped, not accumulate.
    let first = std::fs::read_to_string(logs.join("workflow-1.log.2")).unwrap();
    wait_until("the oldest file replaced", Duration::from_secs(20), || {
        std::fs::read_to_string(logs.join("workflow-1.log.2")).is_ok_and(|t| t != first)
    });
    assert!(
        !logs.join("workflow-1.log.3").exists(),
        "only log_files old files are kept"
    );
    for n in ["workflow-1.log", "workflow-1.log.1", "workflow-1.log.2"] {
        let size = std::fs::metadata(logs.join(n))
            .map(|m| m.len())
            .unwrap_or(0);
        // The limit plus what one interval can write before the next check.
        assert!(size < 20_000, "{n} is {size} bytes");
    }
    let out = c.nexus(&["logs", "workflow-1", "-n", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().count(), 5, "{said}");
    assert!(said.lines().all(|l| l.contains("workflow-1")), "{said}");
}

#[test]
fn logs_of_all_daemons_merge_and_follow() {
    let c = Cluster::new(FAST);
    c.start();
    let out = c.nexus(&["logs", "-n", "200"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    for who in ["communicator-1", "watchdog-3", "workflow-5"] {
        assert!(said.contains(who), "{who} in\n{said}");
    }
    let stamps: Vec<&str> = said.lines().map(|l| &l[..24.min(l.len())]).collect();
    let mut sorted = stamps.clone();
    sorted.sort();
    assert_eq!(stamps, sorted, "merged by time");

    let bad = c.nexus(&["logs", "chef-1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a daemon name"),
        "{}",
        text(&bad)
    );

    // -f shows what happens next: a killed workflow's replacement logs its start. The
    // follower prints the last line first: once that has arrived it is following.
    let mut follower = std::process::Command::new(NEXUS)
        .args(["logs", "workflow-2", "-f", "-n", "1", "--runtime-dir"])
        .arg(c.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains('\n') && std::time::Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&chunk);
        }
    }
    assert!(seen.contains("workflow-2"), "the last line first: {seen:?}");
    let victim = c.pid_of("workflow", 2).unwrap();
    signal(victim, libc::SIGKILL);
    let new = c.wait_replaced("workflow", 2, victim);
    while !seen.contains(&format!("[{new}]")) && std::time::Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&chunk);
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        seen.contains(&format!("[{new}]")),
        "followed the new pid's lines: {seen:?}"
    );
}
