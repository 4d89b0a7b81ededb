//! Who may ask what: the Host and Origin checks (no DNS rebinding, no cross-site
//! requests, hence no CORS at all) and the API key behind each request. Decisions are
//! pure functions of the headers; the key file is re-read only when it changes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::keys::{Denied, KeyEntry, KeyStore, Scope};
use super::settings::HttpSettings;

/// Why a request was turned away before it reached a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the Host header names a server we are not.
    Host,
    /// 403: sent by a page of another origin.
    Origin,
    /// 401.
    Unauthenticated(String),
    /// 403: the key lacks the scope.
    Forbidden(String),
}

/// The Host header values this server answers to.
#[derive(Debug, Clone)]
pub struct Hosts {
    port: u16,
    loopback: bool,
    names: Vec<String>,
    scheme: &'static str,
}

impl Hosts {
    pub fn new(h: &HttpSettings) -> Hosts {
        Hosts {
            port: h.listen.port(),
            loopback: h.listen.ip().is_loopback(),
            names: h.hosts.clone(),
            scheme: h.scheme(),
        }
    }

    /// An IP literal is always fine (a rebinding attack needs a name that resolves to
    /// us); `localhost` on loopback; a name only if listed in `http.hosts`.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let (name, port) = split_port(&host);
        if port.is_some_and(|p| p != self.port) && !self.names.contains(&host) {
            return false;
        }
        if name.parse::<std::net::IpAddr>().is_ok()
            || name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
        {
            return true;
        }
        if self.loopback && name == "localhost" {
            return true;
        }
        self.names.iter().any(|n| *n == host || *n == name)
    }

    /// A browser's Origin must be this server as the page reached it.
    pub fn allows_origin(&self, origin: &str, host: &str) -> bool {
        origin.eq_ignore_ascii_case(&format!("{}://{host}", self.scheme))
    }
}

/// "[::1]:80" → ("[::1]", Some(80)); "example.com" → ("example.com", None).
fn split_port(host: &str) -> (&str, Option<u16>) {
    if let Some(end) = host.rfind(']') {
        return match host[end + 1..].strip_prefix(':') {
            Some(p) => (&host[..=end], p.parse().ok().or(Some(0))),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((n, p)) => (n, p.parse().ok().or(Some(0))),
        None => (host, None),
    }
}

/// Host and Origin together. `origin` is None for non-browser clients (curl, the CLI).
pub fn check_site(hosts: &Hosts, host: Option<&str>, origin: Option<&str>) -> Result<(), Refusal> {
    let Some(host) = host.filter(|h| hosts.allows(h)) else {
        return Err(Refusal::Host);
    };
    match origin {
        Some(o) if !hosts.allows_origin(o, host) => Err(Refusal::Origin),
        _ => Ok(()),
    }
}

/// The API keys of the state directory, re-read when the file changes (an `api-key
/// revoke` takes effect on the next request, without a signal).
pub struct KeyCache {
    state_dir: PathBuf,
    stamp: Option<(u64, i64, i64, u64)>,
    store: Result<KeyStore, String>,
}

impl KeyCache {
    pub fn new(state_dir: PathBuf) -> KeyCache {
        let store = KeyStore::load(&state_dir);
        KeyCache {
            stamp: stamp(&state_dir),
            state_dir,
            store,
        }
    }

    fn refresh(&mut self) {
        let now = stamp(&self.state_dir);
        if now != self.stamp {
            self.stamp = now;
            self.store = KeyStore::load(&self.state_dir);
            if let Err(e) = &self.store {
                log::warn!("API keys unusable, every request is refused: {e}");
            }
        }
    }

    /// The key behind an `Authorization` header, if it has the scope.
    pub fn authorize(&mut self, header: Option<&[u8]>, needed: Scope) -> Result<KeyEntry, Refusal> {
        self.refresh();
        let store = match &self.store {
            Ok(s) => s,
            Err(_) => {
                return Err(Refusal::Unauthenticated(
                    "the server's key file is unusable (see its log)".into(),
                ));
            }
        };
        if store.entries().is_empty() {
            return Err(Refusal::Unauthenticated(
                "no API keys exist yet: make one with `nexus api-key create --name NAME --scope read|control`".into(),
            ));
        }
        match store.authorize(header, needed) {
            Ok(e) => Ok(e.clone()),
            Err(Denied::Unauthenticated(why)) => Err(Refusal::Unauthenticated(why.to_string())),
            Err(Denied::Forbidden { name, scope }) => Err(Refusal::Forbidden(format!(
                "key `{name}` has scope {}; this needs {}",
                scope.as_str(),
                needed.as_str()
            ))),
        }
    }
}

impl KeyCache {
    /// The entry of a key presented alone (the login form); None: no such key.
    pub fn identify(&mut self, key: &[u8]) -> Option<KeyEntry> {
        self.refresh();
        self.store.as_ref().ok()?.identify(key).cloned()
    }

    /// The key a session was made with, if it still exists (not revoked, not re-made).
    pub fn session_key(&mut self, name: &str, created_at_ms: u64) -> Option<KeyEntry> {
        self.refresh();
        self.store
            .as_ref()
            .ok()?
            .entries()
            .iter()
            .find(|e| e.name == name && e.created_at_ms == created_at_ms)
            .cloned()
    }
}

fn stamp(state_dir: &std::path::Path) -> Option<(u64, i64, i64, u64)> {
    let m = std::fs::metadata(KeyStore::path_in(state_dir)).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, names: &[&str]) -> Hosts {
        Hosts::new(&HttpSettings {
            listen: listen.parse().unwrap(),
            tls_cert: None,
            tls_key: None,
            hosts: names.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn host_header_must_name_this_server() {
        let h = hosts("127.0.0.1:9090", &["nexus.lan"]);
        for ok in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST:9090",
            "[::1]:9090",
            "nexus.lan",
            "nexus.lan:9090",
            "10.0.0.5:9090",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "localhost:9091",
            "127.0.0.1:80",
            "localhost.evil:9090",
            "",
            "nexus.lan:1",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
        let public = hosts("0.0.0.0:9443", &[]);
        assert!(
            !public.allows("localhost:9443"),
            "localhost only on loopback"
        );
    }

    #[test]
    fn origin_must_be_this_server() {
        let h = hosts("127.0.0.1:9090", &[]);
        assert!(check_site(&h, Some("127.0.0.1:9090"), None).is_ok());
        assert!(check_site(&h, Some("127.0.0.1:9090"), Some("http://127.0.0.1:9090")).is_ok());
        assert_eq!(
            check_site(&h, Some("127.0.0.1:9090"), Some("http://evil.example")),
            Err(Refusal::Origin)
        );
        assert_eq!(
            check_site(&h, Some("127.0.0.1:9090"), Some("https://127.0.0.1:9090")),
            Err(Refusal::Origin)
        );
        assert_eq!(
            check_site(&h, Some("127.0.0.1:9090"), Some("null")),
            Err(Refusal::Origin)
        );
        assert_eq!(check_site(&h, None, None), Err(Refusal::Host));
        assert_eq!(
            check_site(&h, Some("rebound.example:9090"), None),
            Err(Refusal::Host)
        );
    }
}
