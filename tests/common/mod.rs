//! A real cluster in its own temporary runtime directory, and a guard that kills every
//! daemon of that directory by pid when the test ends, passed or failed.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod http;
pub mod pg;

pub const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

/// In the environment of everything a test cluster starts: its runtime directory.
pub const MARKER: &str = "NEXUS_TEST_CLUSTER";

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
        std::fs::write(&config, with_state_dir(config_json, dir.path())).expect("write config");
        Cluster { dir, config }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the config file (for a reload), the state directory kept in the cluster's.
    pub fn set_config(&self, config_json: &str) {
        std::fs::write(&self.config, with_state_dir(config_json, self.path()))
            .expect("write config");
    }

    /// Runs `nexus ARGS --runtime-dir DIR` with a clean environment.
    pub fn nexus(&self, args: &[&str]) -> Output {
        self.nexus_env(args, &[])
    }

    pub fn nexus_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run nexus")
    }

    /// `nexus ARGS --runtime-dir DIR`, not yet run: a clean environment, plus the marker
    /// every process of this cluster inherits (daemons and the services' programs), by
    /// which the guard finds them all.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(NEXUS);
        cmd.args(args).arg("--runtime-dir").arg(self.path());
        cmd.env_remove("NEXUS_RUNTIME_DIR")
            .env_remove("NEXUS_CONFIG")
            .env_remove("NEXUS_FAULT");
        cmd.env("NEXUS_CONFIG", &self.config);
        cmd.env(MARKER, self.path());
        cmd
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

/// The queue of each test cluster lives in its own directory, gone with it.
fn with_state_dir(config_json: &str, dir: &Path) -> String {
    match serde_json::from_str::<Value>(config_json) {
        Ok(Value::Object(mut m)) if !m.contains_key("state_dir") => {
            m.insert(
                "state_dir".into(),
                Value::String(dir.join("state").display().to_string()),
            );
            Value::Object(m).to_string()
        }
        _ => config_json.to_string(),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_all(self.path());
    }
}

/// Freezes every daemon of the directory first (so nobody respawns anybody), then kills
/// them, by pid; repeated until none is left (bounded). Then every other process that
/// carries the cluster's marker: the services' programs and their children.
pub fn kill_all(dir: &Path) {
    kill_daemons(dir);
    for _ in 0..50 {
        let pids = marked(dir);
        if pids.is_empty() {
            break;
        }
        for &p in &pids {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_cgroups(dir);
}

/// The services' cgroups named in the directory's records (machine-wide state, so a
/// test must not leave them behind).
fn remove_cgroups(dir: &Path) {
    let entries = std::fs::read_dir(dir.join("services/state"));
    for e in entries.into_iter().flatten().flatten() {
        let Some(rec) = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            continue;
        };
        if let Some(cg) = rec["cgroup"].as_str() {
            remove_cgroup(Path::new(cg));
        }
    }
    for cg in task_cgroups(dir) {
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        remove_cgroup(&cg);
    }
}

fn remove_cgroup(cg: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The cgroups the workers of the cluster in `dir` made for their tasks, which sit
/// below this process's own (the daemons' is the same): `nexus-TAG-task.…`, TAG the
/// FNV-1a hash of the directory's path, as the daemons name them.
pub fn task_cgroups(dir: &Path) -> Vec<PathBuf> {
    let Some(base) = own_cgroup_dir() else {
        return Vec::new();
    };
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let prefix = format!("nexus-{h:08x}-task.");
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

/// This process's cgroup in the cgroup v2 hierarchy, if it has one.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4))?
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new(mount).join(rel.trim_start_matches('/')))
}

/// Live processes (not zombies) whose environment carries `MARKER=dir`.
pub fn marked(dir: &Path) -> Vec<i32> {
    let needle = format!("{MARKER}={}", dir.display());
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 || gone(pid) {
            continue;
        }
        if std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
        {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every daemon of the cluster in `dir` at once (each stopped first, so none sees
/// another die), and nothing they run.
pub fn kill_daemons(dir: &Path) {
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

/// A process's state letter from /proc (R, S, T stopped, Z zombie, ...); None if it has none.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

/// A pid is gone when it has no process or only a zombie is left of it.
pub fn gone(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

// --- services -----------------------------------------------------------------------------

/// A TCP port nobody listens on right now (for a test's HTTP server).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A one-line python HTTP server on `port` (the stack users run in the examples).
pub fn http_server(port: u16) -> String {
    format!(r#"["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]"#)
}

impl Cluster {
    /// The record of service instance `inst` (`web-1`), if one has been written.
    pub fn record(&self, inst: &str) -> Option<Value> {
        let p = self.path().join(format!("services/state/{inst}.json"));
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    pub fn state_of(&self, inst: &str) -> String {
        self.record(inst)
            .and_then(|r| r["machine"]["phase"]["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn program_pid(&self, inst: &str) -> Option<i32> {
        self.record(inst)?["run"]["pid"].as_i64().map(|p| p as i32)
    }

    pub fn wait_state(&self, inst: &str, state: &str, within: Duration) {
        wait_until(&format!("{inst} {state}"), within, || {
            self.state_of(inst) == state
        });
    }

    /// Waits until `inst` runs a program other than `old` and is ready; returns its pid.
    pub fn wait_program_replaced(&self, inst: &str, old: i32, within: Duration) -> i32 {
        wait_until(&format!("{inst} (pid {old}) replaced"), within, || {
            self.program_pid(inst).is_some_and(|p| p != old) && self.state_of(inst) == "ready"
        });
        self.program_pid(inst).unwrap_or(0)
    }

    /// The instance's log, rotated files first: its lines in order.
    pub fn log_text(&self, inst: &str) -> String {
        let logs = self.path().join("logs");
        let mut text = String::new();
        for n in (1..=10).rev() {
            if let Ok(t) = std::fs::read_to_string(logs.join(format!("{inst}.log.{n}"))) {
                text.push_str(&t);
            }
        }
        text.push_str(
            &std::fs::read_to_string(logs.join(format!("{inst}.log"))).unwrap_or_default(),
        );
        text
    }

    /// Ledger events of one service instance.
    pub fn service_events(&self, service: &str, instance: u32) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["service"] == service && e["instance"] == instance)
            .collect()
    }

    /// `nexus start` in the background (it waits for the services): killed on drop.
    pub fn start_background(&self, env: &[(&str, &str)]) -> Background {
        let mut cmd = self.command(&["start"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nexus start");
        Background(Some(child))
    }
}

/// A child the test started in the background, killed by pid when dropped.
pub struct Background(pub Option<std::process::Child>);

impl Background {
    /// Waits for it to end (bounded); its output.
    pub fn finish(mut self, within: Duration) -> Output {
        let mut child = self.0.take().expect("running");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().expect("output");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!("did not finish within {within:?}: {}", text(&out));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Processes of this machine whose command line contains `needle` (for a test's own
/// programs, by a marker argument unique to the test).
pub fn pids_with_arg(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if gone(pid) {
            continue;
        }
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&raw)
                .split('\0')
                .any(|a| a.contains(needle))
        {
            out.push(pid);
        }
    }
    out
}
