//! Engine faults, against the real private engine behind an HTTP-aware proxy
//! on a unix socket (`net::UnixHttpProxy`): an event stream that a
//! docker-socket-proxy refuses or closes, and an engine that sends an answer's
//! head and then stalls its body.

use crate::engine_env;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::net::{HttpAction, UnixHttpProxy};

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
        let child = engine_env::stowage_cmd(engine, policy, &["run"])
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
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let upstream = socket_path(&engine);
    let ns = engine_env::unique_ns("events-refused");
    let mut runs = Vec::new();
    for (name, action) in [
        ("403", HttpAction::Answer(403)),
        ("closed", HttpAction::Close),
    ] {
        let dir = engine_env::short_folder("fe-");
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

/// Runs `cmd` for at most `limit`; `None` (after killing it) when it is still
/// running then. Output goes through files in `dir`: a pipe nobody reads
/// would block a child that writes much.
async fn run_within(
    mut cmd: std::process::Command,
    limit: Duration,
    dir: &Path,
) -> Option<std::process::Output> {
    let (out, err) = (dir.join("cmd.stdout"), dir.join("cmd.stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("starting stowage");
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(std::process::Output {
                status,
                stdout: std::fs::read(&out).unwrap(),
                stderr: std::fs::read(&err).unwrap(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Regression (issue 12, item 9): an engine that sends an answer's head and
/// then stalls its body left `plan` hanging (720 s measured): bollard bounds
/// only the wait for headers. Every engine call now has a deadline that covers
/// the body, and its error names the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_against_an_engine_that_stalls_a_body_ends_with_a_timeout_naming_the_call() {
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let dir = engine_env::short_folder("fe-");
    let proxy = UnixHttpProxy::start(&socket_path(&engine), &dir.path().join("p.sock"), |m, t| {
        if m == "GET" && t.contains("/images/json") {
            HttpAction::StallBody
        } else {
            HttpAction::Pass
        }
    });
    let policy = write_policy(dir.path(), &engine_env::unique_ns("stalled-body"));
    let mut cmd = engine_env::stowage_cmd(&proxy.addr(), &policy, &["plan"]);
    cmd.env("STOWAGE_ENGINE_TIMEOUT", "3s");
    let started = std::time::Instant::now();
    let out = run_within(cmd, Duration::from_secs(30), dir.path())
        .await
        .expect("`stowage plan` still hanging after 30 s on a stalled answer body");
    let text = engine_env::text(&out);
    assert!(proxy.requests("/images/json") >= 1, "{text}");
    assert_eq!(out.status.code(), Some(2), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("list images") && stderr.contains("within 3s"),
        "the error names the call and its deadline: {text}"
    );
    eprintln!("after {:?}: {text}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20), "{text}");
}

/// `WATCHDOG=1` datagrams that arrived on `socket` since the last call, and
/// whether any other message said `needle`.
fn drain(socket: &std::os::unix::net::UnixDatagram, needle: &str) -> (usize, bool) {
    let mut buf = [0u8; 1024];
    let (mut fed, mut said) = (0, false);
    while let Ok(n) = socket.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        if text == "WATCHDOG=1" {
            fed += 1;
        } else if text.contains(needle) {
            said = true;
        }
    }
    (fed, said)
}

/// Issue 12, item 9: the watchdog reflects real progress. While an engine
/// call is in flight past its deadline (the deadline did not fire, so a
/// reconcile waiting on it is stuck), `WATCHDOG=1` stops and `STATUS=` says
/// why; it resumes once no call is overdue. The fake engine stands in for the
/// stuck call: a real one cannot outlive its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_is_withheld_while_an_engine_call_is_past_its_deadline() {
    use std::sync::{Arc, Mutex};
    use stowage::daemon::{self, Config, metrics::Metrics, notify::Notifier};
    use stowage::engine::{EngineError, StuckCall, fake::FakeEngine};

    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "app");
    let policy = stowage::policy::load(&policy).unwrap();
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_nonblocking(true).unwrap();
    // Heartbeat every 500 ms (half the watchdog).
    let notifier =
        Notifier::to_socket(socket_path.to_str().unwrap(), Some(Duration::from_secs(1))).unwrap();
    let stuck: Arc<Mutex<Option<StuckCall>>> = Arc::default();
    let handle = stuck.clone();
    let connect = move || {
        let engine = FakeEngine::new(vec![], vec![]).with_stuck_calls(handle.clone());
        async move { Ok::<_, EngineError>(engine) }
    };
    let (_triggers, rx) = tokio::sync::mpsc::channel(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        policy,
        engine_address: "fake".into(),
        clock: Arc::new(stowage::reconcile::SystemClock),
        notifier,
        metrics: Arc::new(Metrics::default()),
        remote: None,
    };
    let task = tokio::spawn(daemon::run(config, connect, rx, async {
        let _ = stopped.await;
    }));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fed, _) = drain(&socket, "");
    assert!(fed >= 2, "fed {fed} times in 2 s while healthy");

    *stuck.lock().unwrap() = Some(StuckCall {
        call: "list images".into(),
        overdue: Duration::from_secs(30),
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, said) = drain(&socket, "`list images` is 30s past its deadline");
    assert!(said, "STATUS= names the stuck call");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fed, _) = drain(&socket, "");
    assert_eq!(fed, 0, "no WATCHDOG=1 while a call is past its deadline");

    *stuck.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fed, _) = drain(&socket, "");
    assert!(fed >= 2, "fed {fed} times in 2 s after the call ended");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// A fake registry on 127.0.0.1 that answers `/v2/` and every other request
/// with an error whose body is `body_len` bytes of HTML. Returns its address.
async fn huge_error_registry(body_len: usize) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let body: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        format!("<html>{}</html>", "proxy error page ".repeat(body_len / 17)).into_bytes(),
    );
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\
                     Docker-Distribution-API-Version: registry/2.0\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                if !head.starts_with("HEAD") {
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Regression (issue 12, item 15): a registry that answers an error with a
/// huge body (a proxy's error page, here 4 MB) had it copied whole into the
/// error text: into the log, the audit record and the state's backoff entry,
/// at every attempt. Error texts from the engine and registry are capped, with
/// a marker saying how much was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_error_with_a_huge_body_is_cut_in_log_audit_and_state() {
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let (registry, _task) = huge_error_registry(4 << 20).await;
    let dir = engine_env::short_folder("fe-");
    let policy = write_policy(dir.path(), &engine_env::unique_ns("huge-error"));
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "\n[[prepull]]\nimage = \"{registry}/team/app:1\"\n"
    ));
    std::fs::write(&policy, text).unwrap();
    let cmd = engine_env::stowage_cmd(&engine, &policy, &["apply"]);
    let out = run_within(cmd, Duration::from_secs(50), dir.path())
        .await
        .expect("`stowage apply` finished");
    let audit = std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap_or_default();
    let state = std::fs::read_to_string(dir.path().join("state/state.json")).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Copies of the page's phrase: the page holds 246,000; a capped text
    // a hundred or so.
    let copies = |t: &str| t.matches("proxy error page").count();
    let summary = format!(
        "exit {:?}, page copies: stderr {}, audit {}, state {}\nstderr starts: {}",
        out.status.code(),
        copies(&stderr),
        copies(&audit),
        copies(&state),
        String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(600)])
    );
    assert_eq!(out.status.code(), Some(1), "the pull failed: {summary}");
    assert!(audit.contains("\"failed\""), "{summary}");
    assert!(audit.contains("proxy error page"), "{summary}");
    assert!(audit.contains("bytes cut]"), "the cut is marked: {summary}");
    for (what, text) in [("stderr", &*stderr), ("audit", &*audit), ("state", &*state)] {
        assert!(copies(text) < 1000, "{what}: {summary}");
    }
}
