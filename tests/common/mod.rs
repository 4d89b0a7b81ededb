//! A real cluster in its own temporary runtime directory, and a guard that kills every
//! daemon of that directory by pid when the test ends, passed or failed.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

/// Short timings so hang tests take about a second, not six.
pub const FAST: &str = r#"{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000}"#;

pub struct Cluster {
    dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Cluster {
    /// A runtime directory with `config_json` as its config; nothing started yet.
    pub fn new(config_json: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("nx")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let config = dir.path().join("test_config.json");
        std::fs::write(&config, config_json).expect("write config");
        Cluster { dir, config }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `nexus ARGS --runtime-dir DIR` with a clean environment.
    pub fn nexus(&self, args: &[&str]) -> Output {
        self.nexus_env(args, &[])
    }

    pub fn nexus_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(NEXUS);
        cmd.args(args).arg("--runtime-dir").arg(self.path());
        cmd.env_remove("NEXUS_RUNTIME_DIR")
            .env_remove("NEXUS_CONFIG")
            .env_remove("NEXUS_FAULT");
        cmd.env("NEXUS_CONFIG", &self.config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run nexus")
    }

    /// Starts the cluster and insists that it says so.
    pub fn start(&self) -> Output {
        self.start_env(&[])
    }

    pub fn start_env(&self, env: &[(&str, &str)]) -> Output {
        let out = self.nexus_env(&["start"], env);
        assert!(out.status.success(), "start failed: {}", text(&out));
        out
    }

    /// Every daemon of this directory: (pid, role, id), from /proc.
    pub fn daemons(&self) -> Vec<(i32, String, u32)> {
        daemons_of(self.path())
    }

    /// The pids of one role, in pid order.
    pub fn pids(&self, role: &str) -> Vec<i32> {
        self.daemons()
            .into_iter()
            .filter(|d| d.1 == role)
            .map(|d| d.0)
            .collect()
    }

    /// The standby communicator: (pid, id).
    pub fn standby(&self) -> (i32, u32) {
        let master = self.master_pid();
        let d = self
            .daemons()
            .into_iter()
            .find(|d| d.1 == "communicator" && d.0 != master);
        let d = d.expect("a standby communicator");
        (d.0, d.2)
    }

    /// Waits until slot `role`-`id` runs a process other than `old`; returns its pid.
    pub fn wait_replaced(&self, role: &str, id: u32, old: i32) -> i32 {
        let what = format!("{role}-{id} (pid {old}) replaced");
        wait_until(&what, Duration::from_secs(10), || {
            self.pid_of(role, id).is_some_and(|p| p != old)
        });
        self.pid_of(role, id).unwrap_or(0)
    }

    pub fn count(&self, role: &str) -> usize {
        self.daemons().iter().filter(|d| d.1 == role).count()
    }

    pub fn pid_of(&self, role: &str, id: u32) -> Option<i32> {
        let all: Vec<i32> = self
            .daemons()
            .iter()
            .filter(|d| d.1 == role && d.2 == id)
            .map(|d| d.0)
            .collect();
        (all.len() == 1).then(|| all[0])
    }

    pub fn master_pid(&self) -> i32 {
        std::fs::read_to_string(self.path().join("leader.lock"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path().join("events.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("ledger lines are JSON"))
            .collect()
    }

    /// Ledger events of one kind whose `old_pid` is `old`.
    pub fn recoveries_of(&self, old: i32) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == "respawned" && e["old_pid"] == old)
            .collect()
    }

    pub fn status_json(&self) -> Value {
        let out = self.nexus(&["status", "--json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}", text(&out)))
    }

    /// Whole: every slot running per the master, and exactly `total` daemons in /proc.
    pub fn wait_whole(&self, total: usize, within: Duration) {
        wait_until(
            &format!("cluster whole with {total} daemons"),
            within,
            || {
                let out = self.nexus(&["status"]);
                out.status.success() && self.daemons().len() == total
            },
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_all(self.path());
    }
}

/// Freezes every daemon of the directory first (so nobody respawns anybody), then kills
/// them, by pid; repeated until none is left (bounded).
pub fn kill_all(dir: &Path) {
    for _ in 0..50 {
        let pids: Vec<i32> = daemons_of(dir).into_iter().map(|d| d.0).collect();
        if pids.is_empty() {
            return;
        }
        for &p in &pids {
            unsafe { libc::kill(p, libc::SIGSTOP) };
        }
        for &p in &pids {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn daemons_of(dir: &Path) -> Vec<(i32, String, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let s = String::from_utf8_lossy(&raw);
        let a: Vec<&str> = s.trim_end_matches('\0').split('\0').collect();
        if a.len() == 8
            && a[1] == "daemon"
            && a[2] == "--role"
            && a[6] == "--runtime-dir"
            && Path::new(a[7]) == dir
            && let Ok(id) = a[5].parse()
        {
            out.push((pid, a[3].to_string(), id));
        }
    }
    out.sort();
    out
}

/// Polls `f` every 10 ms until it holds; panics naming `what` after `within`.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    for _ in 0..100_000 {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("gave up polling for: {what}");
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn signal(pid: i32, sig: i32) {
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// A pid is gone when it has no process or only a zombie is left of it.
pub fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}
