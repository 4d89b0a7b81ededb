//! PostgreSQL for the queue tests: a database of its own per test on the server that
//! NEXUS_TEST_PG_URL names (`.ci/run` starts one on loopback), dropped when the test ends;
//! and a TCP relay to it that a test can hold back, to play a server that is unreachable
//! and then comes back. (The store's unit tests include this file too.)

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

pub struct TempDb {
    pub url: String,
    base: String,
    name: String,
}

fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("NEXUS_TEST_PG_URL: cannot connect: {e}"))
}

impl TempDb {
    /// None when no server is named; in CI one always is (the queue tests run on both
    /// backends there), so there its absence fails the test.
    pub fn create() -> Option<TempDb> {
        static N: AtomicU32 = AtomicU32::new(0);
        let Ok(base) = std::env::var("NEXUS_TEST_PG_URL") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs the queue tests against PostgreSQL too: set NEXUS_TEST_PG_URL"
            );
            eprintln!("NEXUS_TEST_PG_URL is not set: the PostgreSQL half of this test is skipped");
            return None;
        };
        let name = format!(
            "nexus_it_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        connect(&base)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("cannot create a test database");
        let (head, _) = base.rsplit_once('/').expect("a URL with a database");
        Some(TempDb {
            url: format!("{head}/{name}"),
            base,
            name,
        })
    }

    /// The same database, reached through `port` (a relay's).
    pub fn url_via(&self, port: u16) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let (cred, hostpart) = rest.rsplit_once('@').expect("user@host in the URL");
        let (_, path) = hostpart.split_once('/').expect("a database in the URL");
        format!("{scheme}://{cred}@127.0.0.1:{port}/{path}")
    }

    /// The server's address, for a relay to it.
    pub fn server(&self) -> String {
        let rest = self.url.split_once("://").expect("a URL").1;
        let hostpart = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let host = hostpart.split('/').next().unwrap_or("127.0.0.1");
        if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:5432")
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.base, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// Relays 127.0.0.1:`port` to the server once `open` is called; until then, and after
/// it is dropped, nothing listens there.
pub struct Relay {
    pub port: u16,
    to: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn new(to: String) -> Relay {
        Relay {
            port: TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port(),
            to,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        }
    }

    pub fn open(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let (to, stop) = (self.to.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(&to) {
                            pipe(client, server, stop.clone());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }
}

/// Copies both ways until either side ends or the relay stops.
fn pipe(a: TcpStream, b: TcpStream, stop: Arc<AtomicBool>) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 16384];
            while !stop.load(Ordering::Relaxed) {
                match std::io::Read::read(&mut from, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
