//! The sd_notify protocol, served to a program: a datagram socket per instance whose path
//! the program gets as `NOTIFY_SOCKET`, so a program written for systemd works unmodified.
//! READY=1, WATCHDOG=1, STATUS=, STOPPING=1 (and the rest is accepted and ignored, as
//! systemd does). The sender's credentials come with each datagram (SO_PASSCRED): only the
//! instance's own process tree may speak for it; anything else, and garbage, is counted
//! and dropped.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use mio::net::UnixDatagram;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, UnixAddr, sockopt};

/// Largest notify message accepted (systemd's own limit is larger; ours is plenty).
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Watchdog,
    Stopping,
    Status(String),
}

pub struct NotifySocket {
    pub sock: UnixDatagram,
    path: Option<PathBuf>,
    /// What the program's `NOTIFY_SOCKET` says.
    pub address: String,
    pub rejected: u64,
}

impl NotifySocket {
    /// Binds `path` (replacing a predecessor's socket file); where the path is too long
    /// for a socket, a name in the abstract namespace (`@…`) instead, still checked by
    /// credentials.
    pub fn bind(path: &Path, abstract_name: &str) -> std::io::Result<NotifySocket> {
        let fd = socket::socket(
            socket::AddressFamily::Unix,
            socket::SockType::Datagram,
            socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        // Credentials on before the name exists: no datagram may arrive without them.
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        let (addr, address, kept) = if path.as_os_str().len() <= 107 {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let _ = std::fs::remove_file(path);
            (
                UnixAddr::new(path)?,
                path.display().to_string(),
                Some(path.to_path_buf()),
            )
        } else {
            (
                UnixAddr::new_abstract(abstract_name.as_bytes())?,
                format!("@{abstract_name}"),
                None,
            )
        };
        socket::bind(fd.as_raw_fd(), &addr)?;
        if let Some(p) = &kept {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(NotifySocket {
            sock: UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd)),
            path: kept,
            address,
            rejected: 0,
        })
    }

    /// Reads every queued datagram (bounded); returns the notices of senders that
    /// `is_ours` accepts.
    pub fn receive(&mut self, is_ours: &mut dyn FnMut(i32) -> bool) -> Vec<Notice> {
        let mut out = Vec::new();
        for _ in 0..256 {
            let mut buf = [0u8; MAX_MESSAGE + 1];
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let (len, truncated, sender) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = match socket::recvmsg::<UnixAddr>(
                    self.sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
                ) {
                    Ok(m) => m,
                    Err(_) => break,
                };
                let sender = msg.cmsgs().ok().and_then(|mut it| {
                    it.find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(c) => Some(c.pid()),
                        _ => None,
                    })
                });
                (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), sender)
            };
            let Some(pid) = sender else {
                self.rejected += 1;
                continue;
            };
            if truncated || len > MAX_MESSAGE || !is_ours(pid) {
                self.rejected += 1;
                continue;
            }
            match parse(&buf[..len]) {
                Some(mut notices) => out.append(&mut notices),
                None => self.rejected += 1,
            }
        }
        out
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `KEY=VALUE` lines; None for garbage (not UTF-8, or a line without `=`).
pub fn parse(bytes: &[u8]) -> Option<Vec<Notice>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once('=')?;
        match (k, v) {
            ("READY", "1") => out.push(Notice::Ready),
            ("WATCHDOG", "1") => out.push(Notice::Watchdog),
            ("STOPPING", "1") => out.push(Notice::Stopping),
            ("STATUS", s) => out.push(Notice::Status(s.chars().take(200).collect())),
            _ => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_garbage_does_not() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=listening on 8080\nMAINPID=5\n"),
            Some(vec![
                Notice::Ready,
                Notice::Status("listening on 8080".into())
            ])
        );
        assert_eq!(parse(b"WATCHDOG=1"), Some(vec![Notice::Watchdog]));
        assert_eq!(parse(b"\xff\xfe"), None);
        assert_eq!(parse(b"nonsense"), None);
    }

    #[test]
    fn only_the_tree_may_speak() {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            NotifySocket::bind(&dir.path().join("n/web-1.sock"), "nexus-test-web-1").unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &s.address).unwrap();
        client.send_to(b"\xffgarbage", &s.address).unwrap();
        let me = std::process::id() as i32;
        let got = s.receive(&mut |pid| pid == me);
        assert_eq!(got, vec![Notice::Ready]);
        assert_eq!(s.rejected, 1);
        client.send_to(b"READY=1", &s.address).unwrap();
        assert!(
            s.receive(&mut |_| false).is_empty(),
            "a stranger is refused"
        );
        assert_eq!(s.rejected, 2);
    }
}
