//! `stowage run` as systemd runs it: the real binary against the private
//! engine and registry that `scripts/test` starts. Policy edits, SIGHUP with
//! a broken policy, SIGUSR1, the engine stopped and started under the daemon
//! (its own dockerd, so other tests are not disturbed), `kill -9` mid-apply,
//! SIGTERM, the metrics endpoint and the control socket.
//!
//! Every daemon scopes only its own repository namespace, so tests sharing
//! the engine never touch each other's images.

use crate::engine_env;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;
use stowage::engine::{DockerEngine, Engine};

const DAY: i64 = 86_400;

/// One `stowage run` child with its own folder, policy and control socket.
struct Daemon {
    child: Child,
    dir: PathBuf,
    engine: String,
}

impl Daemon {
    /// Starts `stowage run` on `policy` (already written into `dir`).
    fn start(dir: &Path, engine: &str, env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
        cmd.args(["run", "--engine", engine, "-p"])
            .arg(dir.join("policy.toml"))
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .env("STOWAGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("starting stowage run"),
            dir: dir.to_path_buf(),
            engine: engine.to_owned(),
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: Signal) {
        send(self.pid(), sig);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// One control-socket request, by hand (the wire protocol itself).
    fn ask(&self, request: &str) -> Option<Value> {
        let mut s = UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(format!("{request}\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    fn status(&self) -> Option<Value> {
        self.ask(r#"{"request":"status"}"#)
            .map(|v| v["daemon"].clone())
            .filter(|d| !d.is_null())
    }

    fn reconciles(&self) -> u64 {
        self.status()
            .and_then(|d| d["reconciles"].as_u64())
            .unwrap_or(0)
    }

    fn wait_reconciles(&self, at_least: u64, secs: u64) {
        engine_env::wait(
            secs,
            &format!("{at_least} reconcile(s)\n{}", self.log()),
            || self.reconciles() >= at_least,
        );
    }

    /// Waits for the exit; `None` when it is still running after `secs`.
    fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["--engine", &self.engine, "-p"])
            .arg(self.dir.join("policy.toml"))
            .args(args)
            .env_remove("DOCKER_HOST")
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to `pid` (no dependency on a `kill` binary).
fn send(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    kill_process(pid, sig).unwrap_or_else(|e| panic!("kill {pid:?}: {e}"));
}

/// The policy text: `keep_last` newest tags of `{ns}/app` stay; nothing is
/// too young (`min_age = "0s"`); the schedule is never due in a test.
fn policy(dir: &Path, ns: &str, keep_last: usize, extra_daemon: &str) -> String {
    format!(
        r#"version = 1
[daemon]
schedule = "0 0 0 1 1 * 2099"
state_dir = "{d}/state"
control_socket = "{d}/control.sock"
min_age = "0s"
max_removals = 1000
{extra_daemon}

[[retain]]
name = "keep-{keep_last}"
images = ["{ns}/app"]
keep_last = {keep_last}
"#,
        d = dir.display()
    )
}

/// Writes the policy as editors do: a new file renamed over the old one.
fn write_policy(dir: &Path, text: &str) {
    let tmp = dir.join(".policy.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("policy.toml")).unwrap();
}

/// Loads `n` old images `{ns}/app:0..n` (oldest first).
async fn load_app(engine: &DockerEngine, ns: &str, n: usize) {
    let now = chrono::Utc::now().timestamp();
    let images: Vec<_> = (0..n)
        .map(|i| {
            engine_env::image(
                &[&format!("{ns}/app:{i}")],
                now - (1000 - i as i64) * DAY,
                256,
            )
        })
        .collect();
    engine_env::load(engine, &images).await;
}

async fn refs(engine: &impl Engine, ns: &str) -> Vec<String> {
    let mut v: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .filter(|t| t.starts_with(ns))
        .collect();
    v.sort();
    v
}

fn audit_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("state/audit.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn policy_edit_is_acted_on_within_two_seconds() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("edit");
    load_app(&engine, &ns, 3).await;
    let dir = engine_env::short_folder("d-");
    // At first the policy scopes another repository: nothing to do.
    write_policy(dir.path(), &policy(dir.path(), &format!("{ns}/x"), 1, ""));
    let d = Daemon::start(dir.path(), &addr, &[]);
    d.wait_reconciles(1, 30);
    assert_eq!(audit_lines(dir.path()), 0);

    write_policy(dir.path(), &policy(dir.path(), &ns, 1, ""));
    let edited = chrono::Utc::now();
    engine_env::wait(10, "the first audit record after the edit", || {
        audit_lines(dir.path()) > 0
    });
    // The record's `ts` is when the action started: the time to act, not
    // how long the engine then took to remove (which depends on its load).
    let text = std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let acted: chrono::DateTime<chrono::Utc> = first["ts"].as_str().unwrap().parse().unwrap();
    let latency = (acted - edited).to_std().unwrap_or_default();
    assert!(
        latency < Duration::from_secs(2),
        "edit -> first action took {latency:?}\n{}",
        d.log()
    );
    d.wait_reconciles(2, 10);
    assert_eq!(refs(&engine, &ns).await, vec![format!("{ns}/app:2")]);
    assert!(d.log().contains("policy reloaded (policy file changed)"));
}

#[tokio::test]
async fn sighup_with_a_broken_policy_keeps_the_old_one_and_status_says_why() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("sighup");
    let dir = engine_env::short_folder("d-");
    // systemd's side of sd_notify: a datagram socket named by NOTIFY_SOCKET.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next_message = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("an sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // No file watching: only SIGHUP reloads here.
    write_policy(dir.path(), &policy(dir.path(), &ns, 1, "watch = false"));
    let mut d = Daemon::start(
        dir.path(),
        &addr,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let ready = next_message();
    assert!(ready.starts_with("READY=1\nSTATUS="), "{ready}");
    d.wait_reconciles(1, 30);

    // A broken edit: an invalid regex in the retain rule.
    let broken = policy(dir.path(), &ns, 1, "watch = false")
        .replace("keep_last = 1", "keep_last = 1\ntags = ['(unclosed']");
    write_policy(dir.path(), &broken);
    let line = broken.lines().position(|l| l.starts_with("tags")).unwrap() + 1;
    let at = format!("policy.toml:{line}:");
    d.signal(Signal::HUP);
    // STATUS= messages of the start come first.
    let mut reloading = next_message();
    while !reloading.starts_with("RELOADING=1") {
        reloading = next_message();
    }
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    let after = next_message();
    assert!(
        after.starts_with("READY=1\nSTATUS=policy reload FAILED"),
        "{after}"
    );

    // Alive, and status (CLI and raw socket) tells why.
    assert!(d.alive());
    let status = d.status().expect("status over the control socket");
    let err = status["reload_error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.contains(&at), "{err}");
    let out = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("reload FAILED"), "{text}");
    assert!(text.contains(&at), "{text}");
    assert!(d.log().contains("rejected; the policy loaded at"));

    // The old policy is still in force: it acts on new images.
    load_app(&engine, &ns, 3).await;
    let before = d.reconciles();
    d.signal(Signal::USR1);
    d.wait_reconciles(before + 1, 30);
    assert_eq!(refs(&engine, &ns).await, vec![format!("{ns}/app:2")]);
}

#[tokio::test]
async fn sigusr1_reconciles_and_engine_events_mark_images_used() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("usr1");
    let dir = engine_env::short_folder("d-");
    write_policy(dir.path(), &policy(dir.path(), &ns, 1, "watch = false"));
    let d = Daemon::start(dir.path(), &addr, &[]);
    d.wait_reconciles(1, 30);

    load_app(&engine, &ns, 3).await;
    // A container created from the newest image: the event marks it used.
    let cid = engine_env::create_container(&addr, &format!("{ns}/app:2"));
    let image_id = engine_env::docker(
        &addr,
        &["image", "inspect", "-f", "{{.Id}}", &format!("{ns}/app:2")],
    );
    // Give the event watcher its batching window (100 ms) and its listing.
    std::thread::sleep(Duration::from_millis(1500));
    d.signal(Signal::USR1);
    d.wait_reconciles(2, 30);
    assert_eq!(refs(&engine, &ns).await, vec![format!("{ns}/app:2")]);
    assert!(d.log().contains("reconcile requested (SIGUSR1)"));
    // Marks are written before the reconcile reads the state.
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/state.json")).unwrap())
            .unwrap();
    assert!(
        state["images"][&image_id]["last_used"].as_i64().is_some(),
        "last_used of {image_id} in {state:#}"
    );
    engine_env::remove_container(&addr, &cid);
}

#[tokio::test]
async fn control_socket_reconcile_round_trip() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("ctl");
    let dir = engine_env::short_folder("d-");
    write_policy(dir.path(), &policy(dir.path(), &ns, 2, ""));
    let mut d = Daemon::start(dir.path(), &addr, &[]);
    d.wait_reconciles(1, 30);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.socket()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    load_app(&engine, &ns, 4).await;
    let out = d.cli(&["reconcile"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", d.log());
    assert!(stdout.contains("removed 2"), "{stdout}");
    assert_eq!(refs(&engine, &ns).await.len(), 2);

    // The raw protocol: a bad line gets an error answer.
    let bad = d.ask("not json").unwrap();
    assert_eq!(bad["response"], "error");

    d.signal(Signal::TERM);
    assert_eq!(d.wait_exit(10).map(|s| s.code()), Some(Some(0)));
    assert!(!d.socket().exists(), "socket removed at exit");
    let out = d.cli(&["reconcile"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no stowage daemon answers"), "{stderr}");
}

#[tokio::test]
async fn metrics_endpoint_is_scraped_and_parsed() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("metrics");
    load_app(&engine, &ns, 3).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = engine_env::short_folder("d-");
    write_policy(
        dir.path(),
        &policy(
            dir.path(),
            &ns,
            1,
            &format!("metrics = \"127.0.0.1:{port}\""),
        ),
    );
    let d = Daemon::start(dir.path(), &addr, &[]);
    d.wait_reconciles(1, 30);

    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut samples = std::collections::HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.insert(name.to_owned(), value);
    }
    for family in [
        "stowage_reconciles_total",
        "stowage_reconcile_failures_total",
        "stowage_bytes_freed_total",
        "stowage_last_reconcile_timestamp_seconds",
        "stowage_last_reconcile_duration_seconds",
        "stowage_images",
        "stowage_image_bytes",
        "stowage_policy_reload_errors_total",
        "stowage_engine_reachable",
    ] {
        assert!(samples.contains_key(family), "{family} missing in\n{body}");
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "{family} TYPE missing"
        );
    }
    assert_eq!(samples["stowage_reconciles_total"], 1.0);
    assert_eq!(samples["stowage_engine_reachable"], 1.0);
    assert_eq!(
        samples["stowage_actions_total{kind=\"remove\",outcome=\"ok\"}"], 2.0,
        "{body}"
    );
    assert!(samples["stowage_bytes_freed_total"] > 0.0);
    assert!(samples["stowage_images"] >= 1.0);
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - samples["stowage_last_reconcile_timestamp_seconds"]).abs() < 120.0);
}

#[tokio::test]
async fn kill_9_mid_apply_then_restart_converges() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("kill9");
    const N: usize = 150;
    load_app(&engine, &ns, N).await;
    let dir = engine_env::short_folder("d-");
    write_policy(dir.path(), &policy(dir.path(), &ns, 1, ""));
    let mut d = Daemon::start(dir.path(), &addr, &[]);
    engine_env::wait(60, "the audit log to grow", || {
        audit_lines(dir.path()) >= 10
    });
    d.signal(Signal::KILL);
    d.wait_exit(10).expect("killed");
    let done = audit_lines(dir.path());
    assert!(
        done < N - 1,
        "killed mid-apply (after {done} of {} removals)",
        N - 1
    );
    assert!(refs(&engine, &ns).await.len() > 1);

    // The next start loads the state and converges.
    let d = Daemon::start(dir.path(), &addr, &[]);
    d.wait_reconciles(1, 120);
    assert_eq!(
        refs(&engine, &ns).await,
        vec![format!("{ns}/app:{}", N - 1)]
    );
    let state = std::fs::read(dir.path().join("state/state.json")).unwrap();
    serde_json::from_slice::<Value>(&state).expect("state.json is whole");
    // Every removal is in the audit log exactly once, those the kill caught
    // in flight included (journaled, recorded by the next start); a torn
    // line (if the kill hit a write) is tolerated by the reader.
    let out = d.cli(&["history", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let mut removed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["action"] == "remove" && r["outcome"] == "ok")
        .map(|r| r["ref"].as_str().unwrap().to_owned())
        .collect();
    removed.sort();
    let once: std::collections::BTreeSet<&String> = removed.iter().collect();
    assert_eq!(once.len(), removed.len(), "a removal recorded twice");
    assert_eq!(removed.len(), N - 1, "every removal recorded");
    let journals: Vec<_> = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".removing."))
        .collect();
    assert!(journals.is_empty(), "{journals:?} left");
    let plan = d.cli(&["plan", "--exit-code"]);
    assert_eq!(
        plan.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&plan.stdout)
    );
}

#[tokio::test]
async fn sigterm_mid_apply_exits_zero_within_ten_seconds() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("term");
    const N: usize = 80;
    load_app(&engine, &ns, N).await;
    let dir = engine_env::short_folder("d-");
    write_policy(dir.path(), &policy(dir.path(), &ns, 1, ""));
    let mut d = Daemon::start(dir.path(), &addr, &[]);
    engine_env::wait(60, "the audit log to grow", || audit_lines(dir.path()) >= 3);
    let sent = Instant::now();
    d.signal(Signal::TERM);
    let status = d.wait_exit(10).expect("exited within 10 s");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(sent.elapsed() < Duration::from_secs(10));
    let log = d.log();
    assert!(log.contains("SIGTERM"), "{log}");
    if audit_lines(dir.path()) < N - 1 {
        assert!(log.contains("interrupted by shutdown"), "{log}");
    }
    // The state was written on the way out.
    let state = std::fs::read(dir.path().join("state/state.json")).unwrap();
    serde_json::from_slice::<Value>(&state).expect("state.json is whole");
}

/// A second, private dockerd for the one test that stops and starts it.
struct OwnEngine {
    dir: tempfile::TempDir,
    pid: Option<u32>,
}

impl OwnEngine {
    fn new() -> OwnEngine {
        // Short path: the engine's sockets must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("s-")
            .tempdir_in("/tmp")
            .unwrap();
        OwnEngine { dir, pid: None }
    }

    fn address(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.path().display())
    }

    fn start(&mut self) {
        let d = self.dir.path();
        let ns = format!(
            "stowage-{}",
            d.file_name().unwrap().to_string_lossy().replace('.', "")
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(self.address())
            .args(["--bridge=none", "--iptables=false"])
            .args(["--containerd-namespace", &ns])
            .args(["--containerd-plugins-namespace", &format!("{ns}-plugins")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        self.pid = Some(child.id());
        let addr = self.address();
        engine_env::wait(60, "the own dockerd to answer", || {
            Command::new("docker")
                .arg("version")
                .env("DOCKER_HOST", &addr)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        // Reaped by the OS when the test process ends; stop() waits on /proc.
        std::mem::forget(child);
    }

    fn stop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        send(pid, Signal::TERM);
        engine_env::wait(60, "the own dockerd to exit", || {
            // A zombie child still has /proc/PID; its state is Z.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        });
    }
}

impl Drop for OwnEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn engine_stopped_and_started_under_the_daemon() {
    // Runs its own dockerd; the shared harness engine only tells whether
    // real-engine tests are on.
    if engine_env::engine_addr().is_none() {
        return;
    }
    let mut own = OwnEngine::new();
    let addr = own.address();
    let ns = engine_env::unique_ns("restart");
    let dir = engine_env::short_folder("d-");
    write_policy(dir.path(), &policy(dir.path(), &ns, 1, ""));

    // Down at start: the daemon stays up and says so.
    let mut d = Daemon::start(dir.path(), &addr, &[]);
    engine_env::wait(20, "status while the engine is down", || {
        d.status()
            .is_some_and(|s| s["engine_reachable"] == false && s["reconcile_pending"] == true)
    });

    own.start();
    d.wait_reconciles(1, 30);

    own.stop();
    engine_env::wait(30, "the daemon to notice", || {
        d.status().is_some_and(|s| s["engine_reachable"] == false)
    });
    // Several retries happen meanwhile; the change is logged once.
    std::thread::sleep(Duration::from_secs(4));
    assert!(d.alive(), "daemon alive");

    own.start();
    d.wait_reconciles(2, 40);
    // It works after the restart: new images are acted on.
    let engine = DockerEngine::connect(Some(&addr)).await.unwrap();
    load_app(&engine, &ns, 3).await;
    let out = d.cli(&["reconcile"]);
    assert_eq!(out.status.code(), Some(0), "{}", d.log());
    assert_eq!(refs(&engine, &ns).await, vec![format!("{ns}/app:2")]);

    let log = d.log();
    let unreachable = log.matches("engine unreachable").count();
    // Once at start (down), once when it went away.
    assert_eq!(unreachable, 2, "{log}");
    assert_eq!(log.matches("reachable\n").count(), 2, "{log}");
}
