//! Every message on every socket, with its size bound and version.
//!
//! Heartbeat sockets carry `Datagram`s; the control socket carries one `Request` line
//! and answers one `Response` line. Messages are JSON for debuggability (`socat` can
//! speak them); each is wrapped in an envelope with the protocol version so that a
//! daemon from another build is rejected cleanly instead of misread.

use serde::{Deserialize, Serialize};

use crate::config::{Role, SlotName};

pub const VERSION: u32 = 1;

/// Largest datagram a watchdog accepts; anything longer is garbage by definition.
pub const MAX_DATAGRAM: usize = 512;
/// Largest request line the master accepts on the control socket.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Largest reply a client accepts (a status of thousands of daemons).
pub const MAX_REPLY: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Datagram {
    /// "I am alive": sent by every daemon to every watchdog each interval.
    Heartbeat {
        role: Role,
        id: u32,
        pid: i32,
        seq: u64,
    },
    /// Asked by `nexus status` from its own bound socket: the watchdog answers with `Ages`.
    Query {},
    /// A watchdog's view of when it last heard from each slot.
    Ages {
        watchdog: u32,
        rejected: u64,
        /// Heartbeats accepted since this watchdog started.
        #[serde(default)]
        received: u64,
        entries: Vec<Age>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Age {
    pub role: Role,
    pub id: u32,
    /// The pid the last heartbeat came from; 0 if none yet.
    pub pid: i32,
    /// Milliseconds since that heartbeat; `None` if none yet.
    pub age_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    /// Is the master's loop alive? Asked by standbys each interval.
    Ping {},
    /// `stop` begins: respawn nothing from now on, and say who is running.
    Stop {},
    /// A daemon has sent its first heartbeat and is serving.
    Ready {
        role: Role,
        id: u32,
        pid: i32,
    },
    /// Watchdog `reporter` has heard nothing from the slot for `silent_ms`. `pid` is the
    /// last pid it heard from there (0: never), so the master can tell a stale report.
    Silent {
        reporter: u32,
        role: Role,
        id: u32,
        pid: i32,
        silent_ms: u64,
    },
    /// `nexus restart ROLE-ID`: replace one daemon on purpose.
    Restart {
        role: Role,
        id: u32,
    },
    /// `nexus reload` / `nexus scale`: apply this config (JSON) to the running cluster.
    Reload {
        config: String,
    },
    /// `nexus service start|stop|restart NAME[-N]`.
    Service {
        action: ServiceAction,
        target: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceAction {
    Start,
    Stop,
    Restart,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(StatusReport),
    Stopping {
        master_pid: i32,
        members: Vec<Member>,
    },
    Ok {},
    /// What a restart or reload set in motion, one line per change.
    Applied {
        changes: Vec<String>,
    },
    Error {
        /// What kind of refusal, for callers that branch on it.
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
}

/// Why the master refused a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The cluster is being stopped: nothing new is started.
    Stopping,
    /// No such slot (or service) in the running config.
    NoSuchSlot,
    /// The target is in the middle of something (being stopped, being replaced).
    Busy,
    /// About a process that is no longer the slot's current one.
    Stale,
    /// Malformed, forged or impossible: nothing changed.
    #[default]
    Refused,
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Spawned, not yet heartbeating.
    Starting,
    Running,
    /// Waiting out a restart delay.
    Backoff,
    /// Crashed too often; retried at the backoff cap.
    Failed,
    /// No process and no plan (only while stopping).
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub role: Role,
    pub id: u32,
    /// 0 when the slot has no process.
    pub pid: i32,
    pub state: SlotState,
    pub master: bool,
    /// Wall-clock start of the current process, ms since the epoch.
    pub started_ms: u64,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_cause: Option<String>,
}

impl Member {
    pub fn slot(&self) -> SlotName {
        SlotName {
            role: self.role,
            id: self.id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub master_pid: i32,
    pub runtime_dir: String,
    pub members: Vec<Member>,
    /// Requests refused by the master (garbage, wrong uid, stale reports).
    pub rejected: u64,
    #[serde(default)]
    pub counters: crate::counters::Counters,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    msg: T,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge(usize),
    Garbage(String),
    Version(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooLarge(n) => write!(f, "message of {n} bytes is over the limit"),
            DecodeError::Garbage(e) => write!(f, "not a nexus message: {e}"),
            DecodeError::Version(v) => {
                write!(f, "protocol version {v}, this build speaks {VERSION}")
            }
        }
    }
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our message types contain only strings, numbers and enums: serializing cannot fail.
    serde_json::to_vec(&Envelope { v: VERSION, msg }).expect("message serializes")
}

/// Encodes a message as one newline-terminated line, as the control socket speaks.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = encode(msg);
    v.push(b'\n');
    v
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    match serde_json::from_slice::<Envelope<T>>(bytes) {
        Ok(env) if env.v == VERSION => Ok(env.msg),
        Ok(env) => Err(DecodeError::Version(env.v)),
        Err(e) => match serde_json::from_slice::<VersionOnly>(bytes) {
            Ok(VersionOnly { v }) if v != VERSION => Err(DecodeError::Version(v)),
            _ => Err(DecodeError::Garbage(e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let hb = Datagram::Heartbeat {
            role: Role::Workflow,
            id: 3,
            pid: 77,
            seq: 9,
        };
        let bytes = encode(&hb);
        assert!(bytes.len() < 120, "heartbeats stay small: {}", bytes.len());
        assert_eq!(decode::<Datagram>(&bytes, MAX_DATAGRAM).unwrap(), hb);
        let req = Request::Silent {
            reporter: 1,
            role: Role::Watchdog,
            id: 2,
            pid: 5,
            silent_ms: 600,
        };
        assert_eq!(
            decode::<Request>(&encode_line(&req), MAX_REQUEST).unwrap(),
            req
        );
    }

    #[test]
    fn rejects_garbage_oversize_and_other_versions() {
        assert!(matches!(
            decode::<Datagram>(b"\xff\x00junk", MAX_DATAGRAM),
            Err(DecodeError::Garbage(_))
        ));
        assert!(matches!(
            decode::<Datagram>(&[b' '; 600], MAX_DATAGRAM),
            Err(DecodeError::TooLarge(600))
        ));
        let other = br#"{"v":2,"msg":{"type":"query"}}"#;
        assert_eq!(
            decode::<Datagram>(other, MAX_DATAGRAM),
            Err(DecodeError::Version(2))
        );
        let unknown = br#"{"v":1,"msg":{"type":"launch_missiles"}}"#;
        assert!(matches!(
            decode::<Datagram>(unknown, MAX_DATAGRAM),
            Err(DecodeError::Garbage(_))
        ));
        let truncated = &encode(&Datagram::Query {})[..10];
        assert!(decode::<Datagram>(truncated, MAX_DATAGRAM).is_err());
    }
}

/// Fuzzing the decoders: whatever arrives on a socket, decoding returns a value or an
/// error, never panics, and never accepts more than the size bound.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    const CASES: u32 = 20_000;

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Communicator),
            Just(Role::Watchdog),
            Just(Role::Workflow)
        ]
    }

    fn datagram() -> impl Strategy<Value = Datagram> {
        prop_oneof![
            (role(), any::<u32>(), any::<i32>(), any::<u64>())
                .prop_map(|(role, id, pid, seq)| Datagram::Heartbeat { role, id, pid, seq }),
            Just(Datagram::Query {}),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Status {}),
            Just(Request::Ping {}),
            Just(Request::Stop {}),
            (role(), any::<u32>(), any::<i32>()).prop_map(|(role, id, pid)| Request::Ready {
                role,
                id,
                pid
            }),
            (
                any::<u32>(),
                role(),
                any::<u32>(),
                any::<i32>(),
                any::<u64>()
            )
                .prop_map(|(reporter, role, id, pid, silent_ms)| Request::Silent {
                    reporter,
                    role,
                    id,
                    pid,
                    silent_ms
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let d = decode::<Datagram>(&bytes, MAX_DATAGRAM);
            if bytes.len() > MAX_DATAGRAM {
                prop_assert_eq!(d, Err(DecodeError::TooLarge(bytes.len())));
            }
            let _ = decode::<Request>(&bytes, MAX_REQUEST);
            let _ = decode::<Response>(&bytes, MAX_REPLY);
        }

        #[test]
        fn valid_messages_roundtrip(d in datagram(), r in request()) {
            prop_assert_eq!(decode::<Datagram>(&encode(&d), MAX_DATAGRAM).unwrap(), d);
            prop_assert_eq!(decode::<Request>(&encode_line(&r), MAX_REQUEST).unwrap(), r);
        }

        #[test]
        fn mutated_messages_never_panic(
            r in request(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode_line(&r);
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let _ = decode::<Request>(&bytes, MAX_REQUEST);
            let end = cut.index(bytes.len() + 1);
            let _ = decode::<Request>(&bytes[..end], MAX_REQUEST);
            let _ = decode::<Datagram>(&bytes[..end], MAX_DATAGRAM);
        }
    }
}
