//! The dashboard's sessions: a browser logs in once with an API key and gets a cookie
//! (HttpOnly, SameSite=Strict) instead of keeping the key in the page. The cookie is
//! signed, not stored: `NAME:CREATED:EXPIRES:NONCE:MAC`, with an HMAC-SHA256 under a
//! secret of the state directory (`http-session.key`, 0600), so it survives the http
//! daemon's respawn, and it names its key, so revoking the key ends every session made
//! with it. Each session has a CSRF token, the HMAC of the cookie under the same secret:
//! a state-changing request made with the cookie must also carry it, which a page of
//! another site cannot read.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ring::hmac;

use super::keys::{KeyEntry, hex};

pub const COOKIE: &str = "nexus_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a login lasts.
pub const LIFETIME_MS: u64 = 12 * 3600 * 1000;
const SECRET_FILE: &str = "http-session.key";
const MAX_COOKIE: usize = 512;

pub struct Sessions {
    key: hmac::Key,
}

/// A session's claims, once its signature and expiry have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub name: String,
    pub created_at_ms: u64,
    pub expires_ms: u64,
}

impl Sessions {
    /// The state directory's secret, made (32 random bytes, 0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Sessions, String> {
        let path = state_dir.join(SECRET_FILE);
        let secret = match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => {
                let mode = std::fs::metadata(&path).map_or(0, |m| m.permissions().mode());
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "{} is readable by others (mode {:o}): remove it (sessions start over)",
                        path.display(),
                        mode & 0o777
                    ));
                }
                b
            }
            Ok(_) => return Err(format!("{} is not a session secret", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(state_dir)
                    .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
                let mut b = vec![0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                    .map_err(|_| "no random bytes from the kernel".to_string())?;
                let tmp = state_dir.join(format!(".{SECRET_FILE}.{}", std::process::id()));
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .and_then(|mut f| f.write_all(&b))
                    .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
                // Two daemons racing: the first rename wins for both, as each re-reads.
                if std::fs::hard_link(&tmp, &path).is_err() && !path.exists() {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(format!("cannot make {}", path.display()));
                }
                let _ = std::fs::remove_file(&tmp);
                std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Sessions {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        })
    }

    #[cfg(test)]
    fn with_secret(secret: &[u8]) -> Sessions {
        Sessions {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    #[cfg(test)]
    pub(super) fn for_tests() -> Sessions {
        Sessions::with_secret(b"a test secret, thirty-two bytes!")
    }

    /// A cookie value for a login with key `e`, and its CSRF token.
    pub fn issue(&self, e: &KeyEntry, now_ms: u64) -> (String, String) {
        let mut nonce = [0u8; 12];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
        let claims = format!(
            "{}:{}:{}:{}",
            e.name,
            e.created_at_ms,
            now_ms + LIFETIME_MS,
            hex(&nonce)
        );
        let mac = hex(hmac::sign(&self.key, claims.as_bytes()).as_ref());
        let cookie = format!("{claims}:{mac}");
        let csrf = self.csrf_for(&cookie);
        (cookie, csrf)
    }

    /// The claims of a genuine, unexpired cookie.
    pub fn verify(&self, cookie: &str, now_ms: u64) -> Option<Claims> {
        if cookie.len() > MAX_COOKIE {
            return None;
        }
        let (claims, mac) = cookie.rsplit_once(':')?;
        let mac = unhex(mac)?;
        hmac::verify(&self.key, claims.as_bytes(), &mac).ok()?;
        let mut f = claims.split(':');
        let (name, created, expires) = (f.next()?, f.next()?, f.next()?);
        let c = Claims {
            name: name.to_string(),
            created_at_ms: created.parse().ok()?,
            expires_ms: expires.parse().ok()?,
        };
        (now_ms < c.expires_ms).then_some(c)
    }

    pub fn csrf_for(&self, cookie: &str) -> String {
        let tag = hmac::sign(&self.key, format!("csrf:{cookie}").as_bytes());
        hex(tag.as_ref())
    }

    /// Constant time: the token says nothing about how close a guess was.
    pub fn csrf_ok(&self, cookie: &str, presented: &str) -> bool {
        let Some(tag) = unhex(presented) else {
            return false;
        };
        hmac::verify(&self.key, format!("csrf:{cookie}").as_bytes(), &tag).is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Our cookie's value from a `Cookie` header.
pub fn from_header(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` for a login (`max_age_s` > 0) or a logout (0).
pub fn set_cookie(value: &str, max_age_s: u64, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::keys::Scope;

    fn entry() -> KeyEntry {
        KeyEntry {
            name: "ops".into(),
            scope: Scope::Control,
            sha256: String::new(),
            created_at_ms: 1000,
        }
    }

    #[test]
    fn cookies_are_signed_expire_and_carry_their_csrf_token() {
        let s = Sessions::with_secret(b"0123456789abcdef0123456789abcdef");
        let (cookie, csrf) = s.issue(&entry(), 5000);
        let c = s.verify(&cookie, 6000).unwrap();
        assert_eq!((c.name.as_str(), c.created_at_ms), ("ops", 1000));
        assert_eq!(s.verify(&cookie, 5000 + LIFETIME_MS), None, "expired");
        assert!(s.csrf_ok(&cookie, &csrf));
        assert!(!s.csrf_ok(&cookie, "00"));
        assert!(!s.csrf_ok(&cookie, ""));
        let (other, other_csrf) = s.issue(&entry(), 5000);
        assert_ne!(other, cookie, "a nonce each");
        assert!(
            !s.csrf_ok(&cookie, &other_csrf),
            "a token is for its own session"
        );
        // Forged: another name, a later expiry, another secret, garbage.
        let forged = cookie.replacen("ops", "adm", 1);
        assert_eq!(s.verify(&forged, 6000), None);
        let parts: Vec<&str> = cookie.split(':').collect();
        let later = format!(
            "{}:{}:{}:{}:{}",
            parts[0],
            parts[1],
            u64::MAX,
            parts[3],
            parts[4]
        );
        assert_eq!(s.verify(&later, 6000), None);
        let stranger = Sessions::with_secret(b"another secret of thirty-two b!!");
        assert_eq!(stranger.verify(&cookie, 6000), None);
        for junk in ["", ":", "a:b:c:d:e", "ops:1:2:3:zz", &"x".repeat(600)] {
            assert_eq!(s.verify(junk, 6000), None, "{junk}");
        }
    }

    #[test]
    fn the_cookie_header_is_parsed_and_set_strictly() {
        assert_eq!(from_header("a=1; nexus_session=xyz; b=2"), Some("xyz"));
        assert_eq!(from_header("nexus_sessionx=1"), None);
        let set = set_cookie("v", 60, true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!set_cookie("v", 0, false).contains("Secure"));
    }

    #[test]
    fn the_secret_is_made_once_and_private() {
        let d = tempfile::tempdir().unwrap();
        let a = Sessions::load_or_create(d.path()).unwrap();
        let (cookie, _) = a.issue(&entry(), 1);
        let b = Sessions::load_or_create(d.path()).unwrap();
        assert!(
            b.verify(&cookie, 2).is_some(),
            "the same secret after a restart"
        );
        let path = d.path().join(SECRET_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Sessions::load_or_create(d.path()).is_err());
    }
}
