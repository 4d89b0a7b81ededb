//! `DIR/http.json`: what the HTTP daemon is doing — serving at its URL, or why not (the
//! port is busy, naming the holder; the TLS files are bad). Written by the daemon before
//! its first heartbeat, so `nexus start` can print it; read by `status` and `health`.

use serde::{Deserialize, Serialize};

use crate::runtime_dir::RuntimeDir;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub pid: i32,
    pub listen: String,
    pub url: String,
    pub serving: bool,
    /// Why it is not serving (None while it is).
    #[serde(default)]
    pub error: Option<String>,
}

const FILE: &str = "http.json";

pub fn write(dir: &RuntimeDir, s: &Serving) {
    let path = dir.path().join(FILE);
    let tmp = dir.path().join(".http.json.tmp");
    let text = serde_json::to_vec(s).expect("serving state serializes");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        log::warn!("cannot write {}: {e}", path.display());
    }
}

pub fn read(dir: &RuntimeDir) -> Option<Serving> {
    let bytes = std::fs::read(dir.path().join(FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn remove(dir: &RuntimeDir) {
    let _ = std::fs::remove_file(dir.path().join(FILE));
}
