//! A minimal HTTP/1.1 client over a std TcpStream, for tests that must also send what no
//! well-behaved client would (garbage, huge heads, held connections), and a reader of
//! Server-Sent Events with a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Api {
    pub addr: SocketAddr,
    pub key: Option<String>,
}

impl Api {
    pub fn new(port: u16, key: Option<&str>) -> Api {
        Api {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            key: key.map(str::to_string),
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.send("GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        self.send(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// One request on a fresh connection (Connection: close), with the key if any.
    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        if let Some(k) = &self.key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        parse(&raw(self.addr, &bytes)).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

/// Sends bytes and reads until the server closes (or 10 s pass).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

pub fn parse(bytes: &[u8]) -> Result<Resp, String> {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {:?}", String::from_utf8_lossy(bytes)))?;
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = bytes[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
    out
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// An open event stream.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
}

impl SseStream {
    pub fn open(api: &Api, path: &str, headers: &[(&str, &str)]) -> SseStream {
        let mut s = TcpStream::connect_timeout(&api.addr, Duration::from_secs(5)).expect("connect");
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", api.addr);
        if let Some(k) = &api.key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reader = BufReader::new(s);
        let mut status = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        // The head, line by line.
        while Instant::now() < deadline {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) if line == "\r\n" => break,
                Ok(_) if status == 0 => {
                    status = line
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                }
                _ => {}
            }
        }
        SseStream { reader, status }
    }

    /// The next event within `within`; None at the end of the stream or the deadline.
    /// Chunk-size lines of the chunked encoding are skipped (they never look like a field).
    pub fn next(&mut self, within: Duration) -> Option<Sse> {
        let deadline = Instant::now() + within;
        let mut ev = Sse {
            id: None,
            event: "message".into(),
            data: String::new(),
        };
        let mut any = false;
        while Instant::now() < deadline {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) => continue,
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if any {
                    return Some(ev);
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("id: ") {
                ev.id = Some(v.to_string());
                any = true;
            } else if let Some(v) = line.strip_prefix("event: ") {
                ev.event = v.to_string();
                any = true;
            } else if let Some(v) = line.strip_prefix("data: ") {
                ev.data.push_str(v);
                any = true;
            }
        }
        None
    }

    /// Events until one matches, within `within`.
    pub fn until(&mut self, within: Duration, mut f: impl FnMut(&Sse) -> bool) -> Option<Sse> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(e) if f(&e) => return Some(e),
                Some(_) => {}
                None => return None,
            }
        }
        None
    }
}
