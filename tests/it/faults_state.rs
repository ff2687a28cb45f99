//! Faults around the state file, against the real private engine that
//! `scripts/test` starts: two writers (`stowage apply` beside the daemon),
//! a lost or corrupt state (images must not lose their `min_age`
//! protection), and `status` on a corrupt state.
//!
//! Every policy scopes only its own repository namespace, so tests sharing
//! the engine never touch each other's images.

use crate::engine_env;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;
use stowage::state::State;

const DAY: i64 = 86_400;

/// One `stowage run` child on `dir/policy.toml`, logging to `dir/daemon.log`.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, engine: &str) -> Daemon {
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["run", "--engine", engine, "-p"])
            .arg(dir.join("policy.toml"))
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .env("STOWAGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting stowage run");
        Daemon {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The daemon's `status` view, by hand on the control socket.
    fn status(&self) -> Option<Value> {
        let mut s = UnixStream::connect(self.dir.join("control.sock")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"{\"request\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        let v: Value = serde_json::from_str(&line).ok()?;
        Some(v["daemon"].clone()).filter(|d| !d.is_null())
    }

    fn wait_reconciles(&self, at_least: u64) {
        engine_env::wait(
            30,
            &format!("{at_least} reconcile(s)\n{}", self.log()),
            || {
                self.status()
                    .and_then(|d| d["reconciles"].as_u64())
                    .is_some_and(|n| n >= at_least)
            },
        );
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        kill_process(pid, sig).unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A policy on `dir` (state, control socket) with `body` after `[daemon]`;
/// the schedule is never due in a test.
fn write_policy(dir: &Path, daemon_extra: &str, body: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            "version = 1\n[daemon]\nschedule = \"0 0 0 1 1 * 2099\"\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{d}/control.sock\"\n{daemon_extra}\n{body}",
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

fn read_state(dir: &Path) -> State {
    let bytes = std::fs::read(dir.join("state/state.json")).expect("reading the state");
    serde_json::from_slice(&bytes).expect("the state parses")
}

fn corrupt_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("state"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".corrupt-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Issue 12 item 5: ten `stowage apply` beside a running daemon while
/// containers are created (activity marks the daemon writes). One owner of
/// the state: the state always parses, no `last_used` is lost, nothing is
/// moved aside as corrupt, every apply succeeds.
#[tokio::test]
async fn apply_beside_the_daemon_loses_nothing() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("two-writers");
    let now = chrono::Utc::now().timestamp();
    const ROUNDS: usize = 3;
    let images: Vec<_> = (0..ROUNDS + 3)
        .map(|i| engine_env::image(&[&format!("{ns}/app:v{i}")], now - 30 * DAY, 4096))
        .collect();
    engine_env::load(&engine, &images).await;
    let dir = engine_env::short_folder("st-");
    let d = dir.path();
    let policy = write_policy(
        d,
        "min_age = \"0s\"",
        &format!("[[retain]]\nname = \"all\"\nimages = [\"{ns}/app\"]\nkeep_last = 100\n"),
    );
    let daemon = Daemon::start(d, &addr);
    daemon.wait_reconciles(1);

    // A reader that never may see half a state.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let path = d.join("state/state.json");
        std::thread::spawn(move || {
            let (mut reads, mut torn) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let Ok(bytes) = std::fs::read(&path) {
                    reads += 1;
                    if let Err(e) = serde_json::from_slice::<State>(&bytes) {
                        torn.push(format!("{e} ({} bytes)", bytes.len()));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (reads, torn)
        })
    };

    let mut containers = Vec::new();
    for round in 0..ROUNDS {
        let applies: Vec<Child> = (0..10)
            .map(|_| {
                engine_env::stowage_cmd(&addr, &policy, &["apply"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Activity while they run: the daemon marks the image used and
        // writes the mark when SIGUSR1 asks it to reconcile.
        containers.push(engine_env::create_container(
            &addr,
            &format!("{ns}/app:v{round}"),
        ));
        std::thread::sleep(Duration::from_millis(300));
        daemon.signal(Signal::USR1);
        for child in applies {
            let out: Output = child.wait_with_output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "round {round}: {}\ndaemon log:\n{}",
                engine_env::text(&out),
                daemon.log()
            );
        }
    }
    // One more reconcile by the daemon: it writes the marks it still holds.
    let out = engine_env::stowage(&addr, &policy, &["reconcile"]);
    assert_eq!(out.status.code(), Some(0), "{}", engine_env::text(&out));
    stop.store(true, Ordering::Relaxed);
    let (reads, torn) = reader.join().unwrap();

    assert!(reads > 0, "the reader never saw the state");
    assert!(
        torn.is_empty(),
        "torn state seen {} time(s): {torn:?}",
        torn.len()
    );
    assert_eq!(corrupt_files(d), Vec::<String>::new(), "{}", daemon.log());
    let state = read_state(d);
    for (round, image) in images.iter().take(ROUNDS).enumerate() {
        let seen = state.images.get(&image.id());
        assert!(
            seen.is_some_and(|s| s.last_used.is_some()),
            "round {round}: the last_used mark of {} was lost: {seen:?}\ndaemon log:\n{}",
            image.id(),
            daemon.log()
        );
    }
    for c in containers {
        engine_env::remove_container(&addr, &c);
    }
}

/// Issue 12 item 5, without a daemon: an `apply` that finds the state owned
/// by another process (no daemon answers) waits for it, says for whom, and
/// runs once the owner is gone.
#[tokio::test]
async fn apply_waits_for_the_owner_of_the_state() {
    let Some(_engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("lock-wait");
    let dir = engine_env::short_folder("st-");
    let d = dir.path();
    let policy = write_policy(
        d,
        "",
        &format!("[[retain]]\nname = \"all\"\nimages = [\"{ns}/app\"]\nkeep_last = 1\n"),
    );
    std::fs::create_dir_all(d.join("state")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(d.join("state/lock"))
        .unwrap();
    lock.try_lock().unwrap();
    std::fs::write(d.join("state/lock"), "a test holder (pid 1)\n").unwrap();
    let mut apply = engine_env::stowage_cmd(&addr, &policy, &["apply"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        apply.try_wait().unwrap().is_none(),
        "apply ran while another process owned the state"
    );
    assert!(!d.join("state/state.json").exists());
    drop(lock);
    let out = apply.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", engine_env::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by a test holder (pid 1)"),
        "{}",
        engine_env::text(&out)
    );
    read_state(d);
}

/// How the state is gone when the images arrive.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// No earlier run on this `state_dir` at all: the host's first run.
    FirstRun,
    /// An earlier run, then `state.json` deleted.
    Deleted,
    /// An earlier run, then `state.json` corrupt.
    Corrupt,
}

/// Issue 12 item 6: images built months ago but pulled just now, after the
/// state was lost (deleted or corrupt), keep their `min_age` protection: an
/// apply whose retention would remove one removes nothing. On the host's
/// first run (the spec), creation time still stands in for "first seen".
#[tokio::test]
async fn a_lost_state_keeps_min_age_protection() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    for loss in [Loss::Deleted, Loss::Corrupt, Loss::FirstRun] {
        let ns = engine_env::unique_ns("lost-state");
        let dir = engine_env::short_folder("st-");
        let d = dir.path();
        let policy = write_policy(
            d,
            "min_age = \"1h\"",
            &format!("[[retain]]\nname = \"newest\"\nimages = [\"{ns}/app\"]\nkeep_last = 1\n"),
        );
        if !matches!(loss, Loss::FirstRun) {
            // An earlier run, before the images came.
            let out = engine_env::stowage(&addr, &policy, &["apply"]);
            assert_eq!(out.status.code(), Some(0), "{}", engine_env::text(&out));
            match loss {
                Loss::Deleted => std::fs::remove_file(d.join("state/state.json")).unwrap(),
                Loss::Corrupt => {
                    std::fs::write(d.join("state/state.json"), "{\"images\": {").unwrap()
                }
                Loss::FirstRun => unreachable!(),
            }
        }
        let now = chrono::Utc::now().timestamp();
        let old = engine_env::image(&[&format!("{ns}/app:v1")], now - 200 * DAY, 2048);
        let newer = engine_env::image(&[&format!("{ns}/app:v2")], now - 100 * DAY, 2048);
        engine_env::load(&engine, &[old.clone(), newer.clone()]).await;

        let out = engine_env::stowage(&addr, &policy, &["apply"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{loss:?}: {}",
            engine_env::text(&out)
        );
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        let state = read_state(d);
        let first_seen = state.images.get(&old.id()).map(|s| s.first_seen);
        match loss {
            Loss::FirstRun => {
                assert!(summary.contains("removed 1,"), "{loss:?}: {summary}");
                assert_eq!(first_seen, None, "{loss:?}: v1 was not removed");
            }
            Loss::Deleted | Loss::Corrupt => {
                assert!(summary.contains("removed 0,"), "{loss:?}: {summary}");
                assert!(
                    first_seen >= Some(now),
                    "{loss:?}: first_seen {first_seen:?} is not now ({now})"
                );
                engine_env::docker(&addr, &["rmi", &format!("{ns}/app:v1")]);
            }
        }
        engine_env::docker(&addr, &["rmi", &format!("{ns}/app:v2")]);
    }
}

/// Issue 12 item 15 (`status` part): with the daemon running and the state
/// file corrupt, `stowage status` warns as `plan` and `apply` do, and the
/// JSON view carries the warning.
#[tokio::test]
async fn status_warns_about_a_corrupt_state() {
    let Some(_engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("corrupt-status");
    let dir = engine_env::short_folder("st-");
    let d = dir.path();
    let policy = write_policy(
        d,
        "",
        &format!("[[retain]]\nname = \"all\"\nimages = [\"{ns}/app\"]\nkeep_last = 1\n"),
    );
    let daemon = Daemon::start(d, &addr);
    daemon.wait_reconciles(1);
    std::fs::write(d.join("state/state.json"), "{\"images\": {").unwrap();

    let out = engine_env::stowage(&addr, &policy, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", engine_env::text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("daemon: pid"), "{}", engine_env::text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state.json is corrupt"),
        "{}",
        engine_env::text(&out)
    );
    let out = engine_env::stowage(&addr, &policy, &["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["daemon"]["state_warning"]
            .as_str()
            .is_some_and(|w| w.contains("corrupt")),
        "{v}"
    );
    // Without a daemon, too.
    drop(daemon);
    let out = engine_env::stowage(&addr, &policy, &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state.json is corrupt"),
        "{}",
        engine_env::text(&out)
    );
}

fn open_lock(dir: &Path) -> std::fs::File {
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("state/lock"))
        .unwrap()
}

/// Issue 12 item 5: the daemon owns the state for its lifetime; at start it
/// waits for an owner that is still there (an `apply`), then takes over.
#[tokio::test]
async fn the_daemon_owns_the_state_for_its_lifetime() {
    let Some(_engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("daemon-owner");
    let dir = engine_env::short_folder("st-");
    let d = dir.path();
    write_policy(
        d,
        "",
        &format!("[[retain]]\nname = \"all\"\nimages = [\"{ns}/app\"]\nkeep_last = 1\n"),
    );
    let held = open_lock(d);
    held.try_lock().unwrap();
    std::fs::write(d.join("state/lock"), "stowage apply (pid 1)\n").unwrap();
    let daemon = Daemon::start(d, &addr);
    engine_env::wait(10, "the daemon to say it waits", || {
        daemon.log().contains("in use by stowage apply (pid 1)")
    });
    assert!(!d.join("state/state.json").exists(), "{}", daemon.log());
    drop(held);
    daemon.wait_reconciles(1);
    let other = open_lock(d);
    assert!(
        matches!(other.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        "the running daemon does not hold the state lock"
    );
    let holder = std::fs::read_to_string(d.join("state/lock")).unwrap();
    assert!(holder.starts_with("the stowage daemon (pid"), "{holder}");
}
