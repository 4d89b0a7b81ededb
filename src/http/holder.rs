//! Who holds a TCP port: the listening socket's inode from /proc/net/tcp{,6}, then the
//! process with that socket among its fds. For the one line a user reads when the API's
//! port is busy ("in use by pid 4242 (python3)"), so they know what to stop.

use std::net::{IpAddr, SocketAddr};

/// "pid 4242 (python3)", or a description of why the holder cannot be named.
pub fn describe(addr: SocketAddr) -> String {
    match listening_inodes(addr).as_slice() {
        [] => "by a socket this user cannot see".to_string(),
        inodes => match owner_of(inodes) {
            Some((pid, comm)) => format!("by pid {pid} ({comm})"),
            None => "by a process of another user".to_string(),
        },
    }
}

/// Inodes of sockets listening on addr's port at addr's IP or the unspecified address
/// (both block a bind).
fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        out.extend(text.lines().skip(1).filter_map(|l| listener(l, addr)));
    }
    out
}

/// One row of /proc/net/tcp: `sl local rem st ... uid timeout inode`.
fn listener(line: &str, want: SocketAddr) -> Option<u64> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
    if *state != "0A" {
        return None;
    }
    let (ip_hex, port_hex) = local.split_once(':')?;
    if u16::from_str_radix(port_hex, 16).ok()? != want.port() {
        return None;
    }
    let ip = parse_ip(ip_hex)?;
    let same_family_any = ip.is_unspecified();
    (ip == want.ip() || same_family_any || want.ip().is_unspecified())
        .then(|| inode.parse().ok())
        .flatten()
}

/// The kernel prints addresses as 32-bit words in host byte order.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let words = words?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

fn owner_of(inodes: &[u64]) -> Option<(i32, String)> {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    // Bounded: /proc lists each process once.
    for pid in crate::procscan::pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && wanted.iter().any(|w| target.as_os_str() == w.as_str())
            {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Some((pid, comm));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_process_holding_a_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let said = describe(addr);
        assert_eq!(
            said,
            format!("by pid {} ({})", std::process::id(), {
                std::fs::read_to_string("/proc/self/comm")
                    .unwrap()
                    .trim()
                    .to_string()
            })
        );
    }

    #[test]
    fn kernel_addresses_parse() {
        assert_eq!(
            parse_ip("0100007F"),
            Some(IpAddr::from([127, 0, 0, 1])),
            "little-endian word"
        );
        assert_eq!(
            parse_ip("00000000000000000000000001000000"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(parse_ip("zz"), None);
    }
}
