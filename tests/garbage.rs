//! Garbage on the sockets is counted and logged, never fatal, and loses no daemon.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use common::*;

#[test]
fn garbage_datagrams_are_counted_not_fatal() {
    let c = Cluster::new(FAST);
    c.start();
    let before = c.daemons();
    let sock = UnixDatagram::unbound().unwrap();
    let target = c.path().join("heartbeat_1.sock");
    let junk: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\xff\xfe\x00garbage".to_vec(),
        vec![b'x'; 60_000],
        br#"{"v":1,"msg":{"type":"heartbeat","role":"workflow","id":1,"pid":1,"seq":1}}"#.to_vec(),
        br#"{"v":9,"msg":{"type":"query"}}"#.to_vec(),
        br#"{"v":1,"msg":{"type":"heartbeat","role":"workflow","id":99,"pid":0,"seq":1}}"#.to_vec(),
        br#"{"v":1,"msg":{"type":"heartbeat","role":"workflow","id":1"#.to_vec(),
    ];
    for j in &junk {
        sock.send_to(j, &target).unwrap();
    }
    // A forged heartbeat for a workflow (pid 1 is not us) must not keep it alive:
    // the rejection count says the watchdog saw and dropped them.
    wait_until("rejections counted", Duration::from_secs(5), || {
        c.status_json()["rejected_by_watchdogs"]
            .as_u64()
            .unwrap_or(0)
            >= 6
    });
    assert_eq!(c.daemons(), before, "no daemon lost or replaced");
    let log = std::fs::read_to_string(c.path().join("logs/watchdog-1.log")).unwrap();
    assert!(log.contains("rejected"), "logged: {log}");
}

#[test]
fn garbage_on_the_control_socket_gets_an_error_not_a_crash() {
    let c = Cluster::new(FAST);
    c.start();
    let before = c.daemons();
    let ctl = c.path().join("control.sock");
    for junk in [
        &b"hello\n"[..],
        b"{\"v\":1,\"msg\":{\"type\":\"nuke\"}}\n",
        &[0u8; 20_000][..],
        // No newline and no end: answered with an error when the connection times out.
        &[b'{'; 100][..],
    ] {
        let mut s = UnixStream::connect(&ctl).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(junk);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.contains("error"), "reply to garbage: {reply:?}");
    }
    // A connection that sends nothing is dropped after a while, not kept forever.
    let idle = UnixStream::connect(&ctl).unwrap();
    // Forged reports: a ready or silence report not from the process it claims.
    let victim = c.pid_of("workflow", 1).unwrap();
    for forged in [
        format!(r#"{{"v":1,"msg":{{"type":"ready","role":"workflow","id":1,"pid":{victim}}}}}"#),
        format!(
            r#"{{"v":1,"msg":{{"type":"silent","reporter":1,"role":"workflow","id":1,"pid":{victim},"silent_ms":99999}}}}"#
        ),
    ] {
        let mut s = UnixStream::connect(&ctl).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(format!("{forged}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.contains("error"), "forged {forged}: {reply}");
    }
    drop(idle);
    assert_eq!(c.daemons(), before, "nothing killed or lost");
    assert!(c.status_json()["rejected_by_master"].as_u64().unwrap() >= 4);
}
