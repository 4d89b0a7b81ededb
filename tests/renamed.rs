//! The binary copied or linked under another name: its daemons are still found by
//! `stop` and adopted by a new master (they are recognised by their arguments, not by the
//! binary's file name).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn run(bin: &Path, c: &Cluster, args: &[&str]) -> std::process::Output {
    // A fresh copy can be "text file busy" for a moment: the other test's thread may fork
    // while the copy's write descriptor is open, and its child holds it until its exec.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(bin)
            .args(args)
            .arg("--runtime-dir")
            .arg(c.path())
            .env("NEXUS_CONFIG", &c.config)
            .env_remove("NEXUS_RUNTIME_DIR")
            .env_remove("NEXUS_FAULT")
            .output();
        match out {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.expect("run the binary"),
        }
    }
}

fn stop_finds_everything_and_failover_adopts(bin: &Path) {
    let c = Cluster::new(FAST);
    let out = run(bin, &c, &["start"]);
    assert!(out.status.success(), "start: {}", text(&out));
    assert_eq!(c.daemons().len(), 10);

    // A new master adopts the running daemons instead of starting a second set.
    let master = c.master_pid();
    signal(master, libc::SIGKILL);
    wait_until("a new master", Duration::from_secs(10), || {
        std::fs::read_to_string(c.path().join("leader.lock"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|p| p != master && !gone(p))
    });
    c.wait_whole(10, Duration::from_secs(10));
    let status = run(bin, &c, &["status", "--json"]);
    let snap: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(snap["whole"], true, "{}", text(&status));

    let out = run(bin, &c, &["stop"]);
    assert!(out.status.success(), "stop: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stopped"),
        "{}",
        text(&out)
    );
    assert!(c.daemons().is_empty(), "stop left {:?}", c.daemons());
}

#[test]
fn a_renamed_copy_of_the_binary_works() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("my-supervisor");
    std::fs::copy(NEXUS, &copy).unwrap();
    stop_finds_everything_and_failover_adopts(&copy);
}

#[test]
fn a_symlink_to_the_binary_works() {
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("sup");
    std::os::unix::fs::symlink(NEXUS, &link).unwrap();
    stop_finds_everything_and_failover_adopts(&link);
}
