//! Users and groups for a service's `user` and `group`, read from /etc/passwd and
//! /etc/group. The binary is static, and glibc's name service cannot load its modules into
//! a static binary reliably, so the files are read directly (a numeric id works too).

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

pub fn lookup_user(name: &str) -> Option<User> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd(&text, name)
}

pub fn lookup_group(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    parse_group(&text, name)
}

/// The supplementary groups `user` is a member of, plus its primary group.
pub fn groups_of(user: &User) -> Vec<u32> {
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let mut out = vec![user.gid];
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4
            && f[3].split(',').any(|m| m == user.name)
            && let Ok(gid) = f[2].parse::<u32>()
            && !out.contains(&gid)
        {
            out.push(gid);
        }
    }
    out
}

fn parse_passwd(text: &str, name: &str) -> Option<User> {
    let by_id: Option<u32> = name.parse().ok();
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let uid: u32 = f[2].parse().ok()?;
        (f[0] == name || by_id == Some(uid)).then(|| User {
            name: f[0].to_string(),
            uid,
            gid: f[3].parse().unwrap_or(uid),
            home: PathBuf::from(f[5]),
        })
    })
}

fn parse_group(text: &str, name: &str) -> Option<u32> {
    let by_id: Option<u32> = name.parse().ok();
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let gid: u32 = f.get(2)?.parse().ok()?;
        (f[0] == name || by_id == Some(gid)).then_some(gid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_by_name_or_id() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nwww:x:33:34:www:/var/www:/usr/sbin/nologin\nbroken\n";
        let u = parse_passwd(passwd, "www").unwrap();
        assert_eq!((u.uid, u.gid, u.home.to_str()), (33, 34, Some("/var/www")));
        assert_eq!(parse_passwd(passwd, "33").unwrap().name, "www");
        assert!(parse_passwd(passwd, "nobody-here").is_none());
        let group = "root:x:0:\nwww-data:x:34:alice,www\n";
        assert_eq!(parse_group(group, "www-data"), Some(34));
        assert_eq!(parse_group(group, "34"), Some(34));
        assert_eq!(parse_group(group, "ghosts"), None);
    }

    #[test]
    fn root_exists_here() {
        assert_eq!(lookup_user("root").map(|u| u.uid), Some(0));
    }
}
