//! The runtime directory and the sockets refuse what is not ours: unsafe directories,
//! peers of another uid on the control socket, datagrams from another uid.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn foreign_or_symlinked_or_open_directories_are_refused() {
    let c = Cluster::new(FAST);
    let link = c.path().with_extension("link");
    std::os::unix::fs::symlink(c.path(), &link).unwrap();
    let out = Command::new(NEXUS)
        .args(["start", "--runtime-dir"])
        .arg(&link)
        .env("NEXUS_CONFIG", &c.config)
        .output()
        .unwrap();
    std::fs::remove_file(&link).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symlink"),
        "{}",
        text(&out)
    );

    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
    let out = c.nexus(&["start"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 700"),
        "{}",
        text(&out)
    );
    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

    if is_root() {
        std::os::unix::fs::chown(c.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let out = c.nexus(&["start"]);
        std::os::unix::fs::chown(c.path(), Some(0), Some(0)).unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("belongs to uid 65534"),
            "{}",
            text(&out)
        );
    }
    assert!(c.daemons().is_empty());
}

/// Even if someone opens the directory and sockets up, another uid is turned away by
/// the kernel-checked credentials (SO_PEERCRED, SO_PASSCRED).
#[test]
fn another_uid_is_rejected_on_both_sockets() {
    if !is_root() {
        eprintln!("skipped: needs root to act as another uid");
        return;
    }
    let c = Cluster::new(FAST);
    c.start();
    let before = c.daemons();
    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    for s in ["control.sock", "heartbeat_1.sock"] {
        std::fs::set_permissions(c.path().join(s), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let victim = c.pid_of("workflow", 1).unwrap();
    let script = format!(
        r#"
import os, socket
d = {dir:?}
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
hb = '{{"v":1,"msg":{{"type":"heartbeat","role":"workflow","id":1,"pid":%d,"seq":1}}}}' % os.getpid()
s.sendto(hb.encode(), d + "/heartbeat_1.sock")
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.settimeout(3)
c.connect(d + "/control.sock")
try:
    c.sendall(b'{{"v":1,"msg":{{"type":"stop"}}}}\n')
    print("reply:", c.recv(4096))
except (BrokenPipeError, ConnectionResetError):
    print("reply: b''")
"#,
        dir = c.path().display().to_string()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("reply: b''"),
        "the master must hang up on another uid: {}",
        text(&out)
    );
    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    wait_until("both rejections counted", Duration::from_secs(5), || {
        let s = c.status_json();
        s["rejected_by_master"].as_u64() >= Some(1)
            && s["rejected_by_watchdogs"].as_u64() >= Some(1)
    });
    assert_eq!(c.daemons(), before, "nothing stopped, killed or replaced");
    assert_eq!(c.pid_of("workflow", 1), Some(victim));
}
