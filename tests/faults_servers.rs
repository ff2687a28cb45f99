//! Faults of the daemon's servers (issue 12): the control socket path, the
//! metrics endpoint and the control socket under hostile clients, a loop
//! blocked by CPU or file work, a `stowage reconcile` whose daemon never
//! answers. The real binary, against the private engine `scripts/test` starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A short private folder (unix socket paths are limited to 108 bytes).
fn folder() -> tempfile::TempDir {
    let base = common::scratch_dir();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("fs-")
        .tempdir_in(&base)
        .unwrap()
}

/// A policy that scopes a repository nobody uses (nothing to do) and never
/// fires on schedule; `extra_daemon` goes into `[daemon]`.
fn policy(dir: &Path, extra_daemon: &str) -> String {
    format!(
        r#"version = 1
[daemon]
schedule = "0 0 0 1 1 * 2099"
state_dir = "{d}/state"
min_age = "0s"
{extra_daemon}

[[retain]]
name = "nothing"
images = ["stowage-test/faults-servers-none"]
keep_last = 1
"#,
        d = dir.display()
    )
}

/// `stowage run` on `dir/policy.toml`, its log in `dir/daemon.log`.
fn start_daemon(dir: &Path, engine: &str) -> Child {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["run", "--engine", engine, "-p"])
        .arg(dir.join("policy.toml"))
        .env_remove("DOCKER_HOST")
        .env_remove("NOTIFY_SOCKET")
        .env("STOWAGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting stowage run")
}

fn wait_exit(child: &mut Child, secs: u64) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Kills a daemon still running when a test fails.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

// Issue 12, item 8: `control_socket = "policy.toml"` deleted the policy.
#[test]
fn control_socket_on_a_regular_file_is_an_error_and_the_file_survives() {
    let Some(engine) = common::engine_addr() else {
        return;
    };
    let dir = folder();
    // Relative to the policy's folder: the policy file itself.
    let text = policy(dir.path(), "control_socket = \"policy.toml\"");
    let policy_path: PathBuf = dir.path().join("policy.toml");
    std::fs::write(&policy_path, &text).unwrap();
    let mut child = Reap(start_daemon(dir.path(), &engine));
    let status = wait_exit(&mut child.0, 30).expect("the daemon must refuse to start");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("is a regular file, not a socket"),
        "a clear error: {log}"
    );
    assert_eq!(
        std::fs::read_to_string(&policy_path).expect("the policy must survive"),
        text
    );

    // A stale socket (nobody listens) is still replaced.
    let sock = dir.path().join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    std::fs::write(
        &policy_path,
        policy(dir.path(), "control_socket = \"control.sock\""),
    )
    .unwrap();
    let mut child = Reap(start_daemon(dir.path(), &engine));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline && matches!(child.0.try_wait(), Ok(None)),
            "the daemon did not replace the stale socket: {}",
            std::fs::read_to_string(dir.path().join("daemon.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// Issue 12, item 15: `stowage reconcile` against a daemon that accepts the
// connection but never answers waited forever.
#[test]
fn reconcile_against_a_daemon_that_never_answers_times_out_clearly() {
    let dir = folder();
    let sock = dir.path().join("hung.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Accepts and reads, never answers; the connections stay open.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let mut child = Reap(
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("-p")
            .arg(dir.path().join("policy.toml"))
            .args(["reconcile", "--timeout", "2s", "--control-socket"])
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = wait_exit(&mut child.0, 30).expect("`stowage reconcile` must give up");
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("did not answer the reconcile request within 2s"),
        "{stderr}"
    );
    assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
}
