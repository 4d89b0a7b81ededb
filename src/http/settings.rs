//! The `http` config key: where the API listens, its TLS files, the host names it
//! answers to. Parsed by hand like the rest of the config, so every mistake names its key.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::services::spec::{Problems, describe};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpSettings {
    /// IP:port. Loopback may be plain HTTP; anything else needs the TLS pair.
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Host names (with or without :port) the server answers to besides its own address
    /// and, on loopback, `localhost`: any other Host header is refused (DNS rebinding).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl HttpSettings {
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls() { "https" } else { "http" }
    }

    /// The address a browser or `--api` on this machine uses: an unspecified bind address
    /// (0.0.0.0, ::) is reached through loopback.
    pub fn url(&self) -> String {
        let ip = self.listen.ip();
        let host = if ip.is_unspecified() {
            if ip.is_ipv4() {
                "127.0.0.1".to_string()
            } else {
                "[::1]".to_string()
            }
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        format!("{}://{host}:{}", self.scheme(), self.listen.port())
    }
}

pub const KEYS: &[&str] = &["listen", "tls_cert", "tls_key", "hosts"];

/// `"http": {"listen": "127.0.0.1:9090"}`; null or absent: no HTTP API.
pub fn parse(value: &Value, problems: &mut Problems) -> Option<HttpSettings> {
    let map = match value {
        Value::Null => return None,
        Value::Object(m) => m,
        other => {
            problems.push(format!(
                "`http` must be an object like {{\"listen\": \"127.0.0.1:9090\"}}, got {}",
                describe(other)
            ));
            return None;
        }
    };
    let before = problems.0.len();
    for k in map.keys() {
        if !KEYS.contains(&k.as_str()) {
            problems.push(format!(
                "`http.{k}`: unknown key (known: {})",
                KEYS.join(", ")
            ));
        }
    }
    let listen = match map.get("listen") {
        Some(Value::String(s)) => match s.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Some(a),
            Ok(_) => {
                problems.push(format!("`http.listen` {s:?}: the port must not be 0"));
                None
            }
            Err(_) => {
                problems.push(format!(
                    "`http.listen` {s:?} is not an IP:port (like 127.0.0.1:9090 or [::1]:9090)"
                ));
                None
            }
        },
        Some(other) => {
            problems.push(format!(
                "`http.listen` must be an IP:port string, got {}",
                describe(other)
            ));
            None
        }
        None => {
            problems.push("`http` needs `listen`, like \"127.0.0.1:9090\"");
            None
        }
    };
    let path = |key: &str, problems: &mut Problems| match map.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.starts_with('/') => Some(PathBuf::from(s)),
        Some(other) => {
            problems.push(format!(
                "`http.{key}` must be an absolute path, got {}",
                describe(other)
            ));
            None
        }
    };
    let tls_cert = path("tls_cert", problems);
    let tls_key = path("tls_key", problems);
    let hosts = match map.get("hosts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|h| match h {
                Value::String(s) if valid_host(s) => Some(s.to_ascii_lowercase()),
                other => {
                    problems.push(format!(
                        "`http.hosts`: {} is not a host name (letters, digits, '.', '-', optional :port)",
                        describe(other)
                    ));
                    None
                }
            })
            .collect(),
        Some(other) => {
            problems.push(format!(
                "`http.hosts` must be a list of host names, got {}",
                describe(other)
            ));
            Vec::new()
        }
    };
    if tls_cert.is_some() != tls_key.is_some() {
        problems.push("`http.tls_cert` and `http.tls_key` go together: give both or neither");
    }
    let listen = listen?;
    if problems.0.len() > before {
        return None;
    }
    if !listen.ip().is_loopback() && tls_cert.is_none() {
        problems.push(format!(
            "`http.listen` {listen} is reachable from other machines: it needs `http.tls_cert` and `http.tls_key` (API keys must not cross a network in clear text); listen on 127.0.0.1 for plain HTTP"
        ));
        return None;
    }
    Some(HttpSettings {
        listen,
        tls_cert,
        tls_key,
        hosts,
    })
}

fn valid_host(s: &str) -> bool {
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (s, None),
    };
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
}

/// The checks against this machine: the TLS files exist and the key is private.
pub fn check_environment(h: &HttpSettings, problems: &mut Problems) {
    use std::os::unix::fs::MetadataExt;
    for (key, path) in [("tls_cert", &h.tls_cert), ("tls_key", &h.tls_key)] {
        let Some(p) = path else { continue };
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => {
                if key == "tls_key" && m.mode() & 0o077 != 0 {
                    problems.push(format!(
                        "`http.tls_key` {} is readable by group or others (mode {:o}): chmod 600 it",
                        p.display(),
                        m.mode() & 0o777
                    ));
                }
            }
            Ok(_) => problems.push(format!("`http.{key}` {} is not a file", p.display())),
            Err(e) => problems.push(format!("`http.{key}` {}: {e}", p.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Option<HttpSettings>, String> {
        let v: Value = serde_json::from_str(text).unwrap();
        let mut p = Problems::default();
        let h = parse(&v, &mut p);
        if p.0.is_empty() {
            Ok(h)
        } else {
            Err(p.0.join("\n"))
        }
    }

    #[test]
    fn loopback_is_plain_http_and_anything_else_needs_tls() {
        let h = parse_str(r#"{"listen": "127.0.0.1:9090"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(h.url(), "http://127.0.0.1:9090");
        let h = parse_str(r#"{"listen": "[::1]:9090"}"#).unwrap().unwrap();
        assert_eq!(h.url(), "http://[::1]:9090");
        let e = parse_str(r#"{"listen": "0.0.0.0:9090"}"#).unwrap_err();
        assert!(e.contains("tls_cert") && e.contains("0.0.0.0:9090"), "{e}");
        let h =
            parse_str(r#"{"listen": "0.0.0.0:9443", "tls_cert": "/c.pem", "tls_key": "/k.pem"}"#)
                .unwrap()
                .unwrap();
        assert_eq!(h.url(), "https://127.0.0.1:9443");
        assert_eq!(parse_str("null").unwrap(), None);
    }

    #[test]
    fn mistakes_name_their_key() {
        let cases = [
            (r#"{"listen": "localhost:9090"}"#, "`http.listen`"),
            (r#"{"listen": "127.0.0.1:0"}"#, "`http.listen`"),
            (r#"{"listen": 9090}"#, "`http.listen`"),
            (r#"{}"#, "needs `listen`"),
            (r#"{"listen": "127.0.0.1:1", "bogus": 1}"#, "`http.bogus`"),
            (
                r#"{"listen": "127.0.0.1:1", "tls_cert": "/c"}"#,
                "go together",
            ),
            (
                r#"{"listen": "127.0.0.1:1", "tls_key": "k.pem"}"#,
                "`http.tls_key`",
            ),
            (
                r#"{"listen": "127.0.0.1:1", "hosts": ["a b"]}"#,
                "`http.hosts`",
            ),
            (r#"{"listen": "127.0.0.1:1", "hosts": "x"}"#, "`http.hosts`"),
            (r#""127.0.0.1:9090""#, "`http` must be an object"),
        ];
        for (text, want) in cases {
            let e = parse_str(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let h = parse_str(r#"{"listen": "127.0.0.1:1", "hosts": ["Nexus.example.com:443"]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(h.hosts, ["nexus.example.com:443"]);
    }
}
