//! API keys: `STATE_DIR/api-keys.json`, mode 0600, holding for each key its name, scope and
//! the SHA-256 of the key, never the key itself.
//!
//! A key is 32 random bytes from the kernel, written `nxk_` and 64 hex digits, printed once
//! when made. With that much entropy a single fast hash is enough (a slow password hash
//! protects guessable secrets; these are not): a stolen file gives no key back, and a
//! check costs microseconds. A presented key is hashed and compared with every stored hash
//! in constant time, all of them whichever matches, so neither the time nor the order says
//! how close a guess was or which key it hit.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub const FILE_NAME: &str = "api-keys.json";
const PREFIX: &str = "nxk_";
const MAX_NAME: usize = 64;
const MAX_KEYS: usize = 1000;
/// A header longer than this is refused before anything is hashed.
const MAX_PRESENTED: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything that only reads: status, health, events, logs, metrics, task status.
    Read,
    /// Read, and what changes the cluster: start, stop, restart, scale, reload, submit, cancel.
    Control,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "control" => Some(Scope::Control),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Control => "control",
        }
    }

    /// Whether a key of this scope may do what needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub name: String,
    pub scope: Scope,
    /// Hex SHA-256 of the whole key, `nxk_` included.
    pub sha256: String,
    /// Milliseconds since the epoch.
    pub created_at_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

/// Why a request is refused: no valid key (HTTP 401), or a key without the scope (403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Unauthenticated(&'static str),
    Forbidden { name: String, scope: Scope },
}

/// The keys of one state directory.
pub struct KeyStore {
    path: PathBuf,
    entries: Vec<KeyEntry>,
}

impl KeyStore {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Reads the file; a missing one is an empty store. A file that others can read, or
    /// that does not parse, is an error naming it: keys are never half-trusted.
    pub fn load(state_dir: &Path) -> Result<KeyStore, String> {
        let path = Self::path_in(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(KeyStore {
                    path,
                    entries: Vec::new(),
                });
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by others (mode {mode:o}): `chmod 600` it, or revoke every key in it",
                path.display()
            ));
        }
        let file: KeyFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a key file: {e}", path.display()))?;
        Ok(KeyStore {
            path,
            entries: file.keys,
        })
    }

    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// Makes a key, stores its hash, and returns the key: the only time it exists in full.
    pub fn create(&mut self, name: &str, scope: Scope, now_ms: u64) -> Result<String, String> {
        check_name(name)?;
        if self.entries.iter().any(|e| e.name == name) {
            return Err(format!(
                "a key named `{name}` exists already: revoke it first, or choose another name"
            ));
        }
        if self.entries.len() >= MAX_KEYS {
            return Err(format!("{MAX_KEYS} keys exist already: revoke some first"));
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| "the kernel gave no random bytes for the key".to_string())?;
        let key = format!("{PREFIX}{}", hex(&secret));
        self.entries.push(KeyEntry {
            name: name.to_string(),
            scope,
            sha256: hex(&sha256(key.as_bytes())),
            created_at_ms: now_ms,
        });
        self.save()?;
        Ok(key)
    }

    pub fn revoke(&mut self, name: &str) -> Result<KeyEntry, String> {
        let Some(i) = self.entries.iter().position(|e| e.name == name) else {
            return Err(format!(
                "no key named `{name}` (`nexus api-key list` shows them)"
            ));
        };
        let gone = self.entries.remove(i);
        self.save()?;
        Ok(gone)
    }

    /// The key named by an `Authorization` header's value, if it is one of ours and its
    /// scope allows `needed`.
    pub fn authorize(&self, header: Option<&[u8]>, needed: Scope) -> Result<&KeyEntry, Denied> {
        let header = header.ok_or(Denied::Unauthenticated("no Authorization header"))?;
        if header.len() > MAX_PRESENTED {
            return Err(Denied::Unauthenticated(
                "the Authorization header is too long",
            ));
        }
        let presented = header
            .strip_prefix(b"Bearer ")
            .ok_or(Denied::Unauthenticated("Authorization is not `Bearer KEY`"))?;
        let entry = self
            .find(presented)
            .ok_or(Denied::Unauthenticated("unknown or revoked key"))?;
        if entry.scope.allows(needed) {
            Ok(entry)
        } else {
            Err(Denied::Forbidden {
                name: entry.name.clone(),
                scope: entry.scope,
            })
        }
    }

    /// The entry of a key presented alone (the dashboard's login form).
    pub fn identify(&self, presented: &[u8]) -> Option<&KeyEntry> {
        if presented.len() > MAX_PRESENTED {
            return None;
        }
        self.find(presented)
    }

    /// The entry whose hash is the presented key's: every entry compared, in constant time.
    fn find(&self, presented: &[u8]) -> Option<&KeyEntry> {
        let digest = hex(&sha256(presented));
        let mut found = None;
        for e in &self.entries {
            let same: bool = e.sha256.as_bytes().ct_eq(digest.as_bytes()).into();
            if same && found.is_none() {
                found = Some(e);
            }
        }
        found
    }

    /// Written whole to a new file (0600 from its creation) and renamed over the old, so a
    /// crash leaves either the old keys or the new, never half of a file.
    fn save(&self) -> Result<(), String> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
        let body = serde_json::to_vec_pretty(&KeyFile {
            keys: self.entries.clone(),
        })
        .map_err(|e| e.to_string())?;
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", self.path.display())
        })
    }
}

/// Names are what `list` shows and `revoke` takes: short, and safe in a shell and a log.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a key name: 1 to {MAX_NAME} of letters, digits, `-`, `_` and `.`"
        ))
    }
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = KeyStore::load(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn a_key_is_stored_only_as_its_hash_and_checked_with_its_scope() {
        let (dir, mut s) = store();
        let ops = s.create("ops", Scope::Control, 1).unwrap();
        let ci = s.create("ci", Scope::Read, 2).unwrap();
        assert!(ops.starts_with("nxk_") && ops.len() == 4 + 64, "{ops}");
        assert_ne!(ops, ci);
        let text = std::fs::read_to_string(KeyStore::path_in(dir.path())).unwrap();
        assert!(
            !text.contains(&ops[4..]) && !text.contains(&ci[4..]),
            "{text}"
        );
        let mode = std::fs::metadata(KeyStore::path_in(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let s = KeyStore::load(dir.path()).unwrap();
        let bearer = |k: &str| format!("Bearer {k}").into_bytes();
        assert_eq!(
            s.authorize(Some(&bearer(&ops)), Scope::Control)
                .unwrap()
                .name,
            "ops"
        );
        assert_eq!(
            s.authorize(Some(&bearer(&ci)), Scope::Read).unwrap().name,
            "ci"
        );
        assert_eq!(
            s.authorize(Some(&bearer(&ci)), Scope::Control),
            Err(Denied::Forbidden {
                name: "ci".into(),
                scope: Scope::Read
            })
        );
        for bad in [
            None,
            Some(b"Bearer nxk_0000".to_vec()),
            Some(ops.clone().into_bytes()),
            Some(format!("Basic {ops}").into_bytes()),
            Some(format!("Bearer {ops}x").into_bytes()),
            Some(vec![b'x'; 10_000]),
        ] {
            assert!(
                matches!(
                    s.authorize(bad.as_deref(), Scope::Read),
                    Err(Denied::Unauthenticated(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_revoked_key_is_refused_and_names_are_checked() {
        let (dir, mut s) = store();
        let k = s.create("old", Scope::Control, 1).unwrap();
        assert!(
            s.create("old", Scope::Read, 2)
                .unwrap_err()
                .contains("exists")
        );
        for bad in ["", "a b", "x/../y", "ü", &"n".repeat(65)] {
            assert!(s.create(bad, Scope::Read, 3).is_err(), "{bad:?}");
        }
        assert_eq!(s.revoke("old").unwrap().name, "old");
        assert!(s.revoke("old").unwrap_err().contains("no key named"));
        let s = KeyStore::load(dir.path()).unwrap();
        assert!(s.entries().is_empty());
        assert!(matches!(
            s.authorize(Some(format!("Bearer {k}").as_bytes()), Scope::Read),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_key_file_others_can_read_or_that_is_garbage_is_refused_by_name() {
        let (dir, mut s) = store();
        s.create("k", Scope::Read, 1).unwrap();
        let path = KeyStore::path_in(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyStore::load(dir.path()).err().unwrap();
        assert!(
            e.contains("readable by others") && e.contains(FILE_NAME),
            "{e}"
        );
        std::fs::write(&path, b"{not json").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = KeyStore::load(dir.path()).err().unwrap();
        assert!(e.contains("not a key file"), "{e}");
    }
}
