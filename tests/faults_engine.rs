//! Engine faults, against the real private engine behind an HTTP-aware proxy
//! on a unix socket (`common::net::UnixHttpProxy`): an event stream that a
//! docker-socket-proxy refuses or closes, and an engine that sends an answer's
//! head and then stalls its body.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::net::{HttpAction, UnixHttpProxy};

/// A short private folder (unix socket paths are limited to 108 bytes).
fn folder() -> tempfile::TempDir {
    let base = common::scratch_dir();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("fe-")
        .tempdir_in(&base)
        .unwrap()
}

/// A policy scoping only `ns`, whose schedule is never due in a test.
fn write_policy(dir: &Path, ns: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"version = 1
[daemon]
schedule = "0 0 0 1 1 * 2099"
state_dir = "{d}/state"
control_socket = "{d}/control.sock"
min_age = "0s"

[[retain]]
name = "keep-1"
images = ["{ns}/app"]
keep_last = 1
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

/// The engine's socket path from `unix:///…`.
fn socket_path(addr: &str) -> PathBuf {
    PathBuf::from(addr.strip_prefix("unix://").unwrap_or(addr))
}

/// `stowage run` with its log in `dir/daemon.log`; killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(engine: &str, policy: &Path, dir: &Path) -> Daemon {
        let log = dir.join("daemon.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = common::stowage_cmd(engine, policy, &["run"])
            .env_remove("NOTIFY_SOCKET")
            .env("STOWAGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("starting stowage run");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Reconciles finished so far, from the log's `reconcile … done in` lines.
    fn reconciles(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("reconcile ") && l.contains(" done in "))
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Regression (issue 12, item 2): a proxy that refuses `/events` (403) or
/// closes it made the daemon reconnect at once, and every connect asked for a
/// reconcile: 1,999 reconciles in 6 s. Over 30 s, only the start reconcile
/// runs, and the stream is retried with backoff, not in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_event_stream_backs_off_and_does_not_reconcile_in_a_loop() {
    let Some(engine) = common::engine_addr() else {
        return;
    };
    let upstream = socket_path(&engine);
    let ns = common::unique_ns("events-refused");
    let mut runs = Vec::new();
    for (name, action) in [("403", HttpAction::Answer(403)), ("closed", HttpAction::Close)] {
        let dir = folder();
        let proxy = UnixHttpProxy::start(&upstream, &dir.path().join("p.sock"), move |_, t| {
            if t.contains("/events") {
                action
            } else {
                HttpAction::Pass
            }
        });
        let policy = write_policy(dir.path(), &ns);
        let daemon = Daemon::start(&proxy.addr(), &policy, dir.path());
        runs.push((name, dir, proxy, daemon));
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    for (name, _dir, proxy, daemon) in &runs {
        let log = daemon.log();
        let reconciles = daemon.reconciles();
        let streams = proxy.requests("/events");
        assert!(
            (1..=3).contains(&reconciles),
            "{name}: {reconciles} reconciles in 30 s (the start one expected)\n{log}"
        );
        // Backoff from 1 s doubling: about 5 attempts in 30 s, not thousands.
        assert!(
            (2..=10).contains(&streams),
            "{name}: {streams} event-stream requests in 30 s\n{log}"
        );
        eprintln!("{name}: {reconciles} reconcile(s), {streams} event-stream request(s) in 30 s");
        let warned = log.matches("engine event stream").count();
        assert!(
            warned >= 1 && !log.contains("engine unreachable"),
            "{name}: the failing stream is reported, the engine is not called unreachable\n{log}"
        );
    }
}
