//! The CLI's side of the HTTP API (`nexus --api URL`): one request at a time over HTTP/1.1
//! (hyper's client on a current-thread runtime, made per command), TLS by rustls with the
//! system's roots plus, for a self-signed server, the CA in `NEXUS_API_CA`. Answers are
//! read whole, except Server-Sent Events, which are handed over one at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Largest answer read whole (a status of ten thousand workflows is a few MB).
const MAX_ANSWER: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Api {
    tls: bool,
    /// host[:port] as written, for the Host header and the connection.
    authority: String,
    host: String,
    port: u16,
    key: String,
    ca: Option<PathBuf>,
}

pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The API's `{"error": "..."}`, or the body as text.
    pub fn message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// One Server-Sent Event.
pub struct Event<'a> {
    pub event: &'a str,
    pub data: &'a str,
}

impl Api {
    /// `http://HOST:PORT` or `https://HOST:PORT` (a trailing `/` is fine; no path).
    pub fn new(url: &str, key: &str, ca: Option<PathBuf>) -> Result<Api, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "--api {url:?}: give http://HOST:PORT or https://HOST:PORT"
            ));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "--api {url:?}: give only the scheme, host and port (no path, no user)"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("--api {url:?}: `{p}` is not a port"))?,
            ),
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        let key = key.trim();
        if key.is_empty() || key.chars().any(|c| c.is_control() || c == ' ') {
            return Err("the API key is empty or not one line: give --api-key-file FILE, NEXUS_API_KEY, or --api-key KEY".into());
        }
        Ok(Api {
            tls,
            authority: authority.to_string(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            key: key.to_string(),
            ca,
        })
    }

    pub fn get(&self, path: &str) -> Result<Answer, String> {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Result<Answer, String> {
        self.call("POST", path, Some(body.to_string()))
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<Answer, String> {
        runtime()?.block_on(async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status().as_u16();
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
            let body = tokio::time::timeout(ANSWER_TIMEOUT, limited.collect())
                .await
                .map_err(|_| format!("{}: no whole answer within 30 s", self.authority))?
                .map_err(|e| format!("{}: reading the answer: {e}", self.authority))?
                .to_bytes()
                .to_vec();
            Ok(Answer { status, body })
        })
    }

    /// A stream of events; `each` returns false to stop. Ok(status) at the end of the
    /// stream (or the HTTP status and body text if it was not a stream).
    pub fn stream(
        &self,
        path: &str,
        mut each: impl FnMut(Event<'_>) -> bool,
    ) -> Result<Answer, String> {
        runtime()?.block_on(async {
            let resp = self.send("GET", path, None).await?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            if status != 200 {
                let b = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes().to_vec())
                    .unwrap_or_default();
                return Ok(Answer { status, body: b });
            }
            let mut buf: Vec<u8> = Vec::new();
            let (mut event, mut data) = (String::new(), String::new());
            // Bounded by the server: it ends the stream, or the user ends us.
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| format!("{}: the stream broke: {e}", self.authority))?;
                let Ok(chunk) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        if !data.is_empty() || !event.is_empty() {
                            let name = if event.is_empty() { "message" } else { &event };
                            if !each(Event {
                                event: name,
                                data: &data,
                            }) {
                                return Ok(Answer {
                                    status,
                                    body: Vec::new(),
                                });
                            }
                        }
                        event.clear();
                        data.clear();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v);
                    }
                }
                if buf.len() > MAX_ANSWER {
                    return Err(format!(
                        "{}: an event over {MAX_ANSWER} bytes",
                        self.authority
                    ));
                }
            }
            Ok(Answer {
                status,
                body: Vec::new(),
            })
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let at = &self.authority;
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| format!("cannot connect to {at}: no answer within 10 s"))?
        .map_err(|e| format!("cannot connect to {at}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", at)
            .header("authorization", format!("Bearer {}", self.key))
            .header("accept", "application/json, text/event-stream");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("bad request: {e}"))?;
        if self.tls {
            let tls = self.connector()?;
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| format!("{at}: {e}"))?;
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| format!("{at}: the TLS handshake did not finish within 10 s"))?
                .map_err(|e| format!("{at}: TLS: {e}"))?;
            request(TokioIo::new(stream), req, at).await
        } else {
            request(TokioIo::new(tcp), req, at).await
        }
    }

    fn connector(&self) -> Result<tokio_rustls::TlsConnector, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.ca {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("NEXUS_API_CA {}: {e}", ca.display()))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("NEXUS_API_CA {}: {e}", ca.display()))?;
            }
        }
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }
}

async fn request<I>(
    io: I,
    req: Request<Full<Bytes>>,
    at: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("{at}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| format!("{at}: no answer within 30 s"))?
        .map_err(|e| format!("{at}: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_scheme_host_and_port_only() {
        let a = Api::new("http://127.0.0.1:9090/", "nxk_x", None).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("127.0.0.1", 9090, false));
        let a = Api::new("https://[::1]:9443", "nxk_x", None).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("::1", 9443, true));
        let a = Api::new("https://nexus.lan", "nxk_x", None).unwrap();
        assert_eq!(a.port, 443);
        for bad in [
            "127.0.0.1:9090",
            "ftp://x",
            "http://",
            "http://h:9090/api",
            "http://u@h:1",
            "http://h:99999",
        ] {
            assert!(Api::new(bad, "nxk_x", None).is_err(), "{bad}");
        }
        assert!(Api::new("http://h:1", "", None).is_err());
        assert!(Api::new("http://h:1", "a\nb", None).is_err());
    }
}
