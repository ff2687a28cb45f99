//! Faults of the daemon's servers (issue 12): the control socket path, the
//! metrics endpoint and the control socket under hostile clients, a loop
//! blocked by CPU or file work, a `stowage reconcile` whose daemon never
//! answers. The real binary, against the private engine `scripts/test` starts.

use crate::engine_env;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        .env("STOWAGE_LOG", "info,stowage=debug")
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
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let dir = engine_env::short_folder("fs-");
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
    let dir = engine_env::short_folder("fs-");
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

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits until the daemon answers on its control socket.
fn wait_socket(sock: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline && matches!(child.try_wait(), Ok(None)),
            "the daemon did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `count` slowloris clients on `addr` until `stop`: each sends a request
/// head one byte every 300 ms and never finishes it; a client the server
/// drops reconnects at once. Returns how many connections the server cut off.
fn slowloris(
    addr: std::net::SocketAddr,
    count: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dropped = std::sync::Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            // Bounded: the test stops it, and it gives up by itself after 60 s.
            let end = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut clients = tokio::task::JoinSet::new();
            for _ in 0..count {
                let (stop, dropped) = (stop.clone(), dropped.clone());
                clients.spawn(async move {
                    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < end {
                        let connect = tokio::net::TcpStream::connect(addr);
                        // Past the listen queue, a connect hangs in SYN retries.
                        let Ok(Ok(mut s)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        else {
                            continue;
                        };
                        for byte in head.iter().cycle() {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            if s.write_all(&[*byte]).await.is_err() {
                                dropped.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                });
            }
            while clients.join_next().await.is_some() {}
        });
        dropped.load(Ordering::Relaxed)
    })
}

/// `stowage status --json` through the control socket; the daemon's view.
fn status(dir: &Path, sock: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("-p")
        .arg(dir.join("policy.toml"))
        .args(["status", "--json", "--control-socket"])
        .arg(sock)
        .env_remove("DOCKER_HOST")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", engine_env::text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["daemon"].is_object(),
        "the daemon must answer: {}",
        engine_env::text(&out)
    );
    v["daemon"].clone()
}

// Issue 12, item 7: 300 slow clients on the metrics port took every
// descriptor of the daemon; a reload then failed with "Too many open files".
#[test]
fn slowloris_on_metrics_leaves_status_reload_and_descriptors_alone() {
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let dir = engine_env::short_folder("fs-");
    let port = free_port();
    let sock = dir.path().join("control.sock");
    let extra = format!(
        "control_socket = \"{}\"\nmetrics = \"127.0.0.1:{port}\"",
        sock.display()
    );
    std::fs::write(dir.path().join("policy.toml"), policy(dir.path(), &extra)).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = Reap(start_daemon(dir.path(), &engine));
    let pid = child.0.id();
    // A limit below the attack's size, as a unit with LimitNOFILE would have:
    // unbounded servers run out, bounded ones never come near it.
    let limit = rustix::process::Rlimit {
        current: Some(256),
        maximum: Some(256),
    };
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()),
        rustix::process::Resource::Nofile,
        limit,
    )
    .unwrap();
    wait_socket(&sock, &mut child.0, &log);
    let baseline = fds(pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = slowloris(([127, 0, 0, 1], port).into(), 300, stop.clone());
    let mut most = 0;
    let mut sample = || most = most.max(fds(pid));
    // Let the attack settle: every client connected and trickling.
    for _ in 0..20 {
        sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = status(dir.path(), &sock);
    sample();
    // A reload while they hang: the policy is edited, then SIGHUP.
    std::fs::write(
        dir.path().join("policy.toml"),
        policy(dir.path(), &format!("{extra}\nmax_removals = 7")),
    )
    .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        sample();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("policy reloaded (SIGHUP)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload under the attack:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = status(dir.path(), &sock);
    assert!(after["reload_error"].is_null(), "{after}");
    assert_ne!(before["policy_loaded"], after["policy_loaded"], "{after}");
    // Past the header timeout (5 s) and the connection deadline (10 s): the
    // cap and deadlines hold, and new slow clients take the freed slots.
    for _ in 0..100 {
        sample();
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let dropped = attack.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("Too many open files"),
        "descriptors ran out:\n{text}"
    );
    // Baseline plus the metrics cap (16) and a few in passing.
    assert!(
        most <= baseline + 16 + 8,
        "descriptors grew from {baseline} to {most} under the attack"
    );
    // Slow clients were cut off (the deadlines), at least the first 16.
    assert!(
        dropped >= 16,
        "slow clients were not cut off ({dropped} dropped):\n{text}"
    );

    // The attack over, a scrape is answered again.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("stowage_reconciles_total"), "{answer}");

    // Shutdown drains and exits promptly.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = wait_exit(&mut child.0, 15).expect("the daemon must stop");
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

// Issue 12, item 7: an over-long control line was cut, and its rest parsed
// as a request of its own.
#[test]
fn an_over_long_control_line_is_refused_and_the_connection_closed() {
    use std::io::{BufRead, Write};
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let dir = engine_env::short_folder("fs-");
    let sock = dir.path().join("control.sock");
    let extra = format!("control_socket = \"{}\"", sock.display());
    std::fs::write(dir.path().join("policy.toml"), policy(dir.path(), &extra)).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = Reap(start_daemon(dir.path(), &engine));
    wait_socket(&sock, &mut child.0, &log);

    let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // 100 KiB of one line whose tail is itself a valid request, then one
    // more request: neither may be answered.
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut payload = vec![b' '; 100 * 1024];
        payload.extend_from_slice(b"{\"request\":\"status\"}\n{\"request\":\"status\"}\n");
        // The daemon closes mid-way: a broken pipe here is the point.
        let _ = writer.write_all(&payload);
    });
    let mut answers = Vec::new();
    for line in std::io::BufReader::new(&stream).lines() {
        answers.push(line.expect("the daemon closes, it does not hang"));
    }
    sender.join().unwrap();
    assert_eq!(answers.len(), 1, "one answer, then closed: {answers:?}");
    let answer: serde_json::Value = serde_json::from_str(&answers[0]).unwrap();
    assert_eq!(answer["response"], "error", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    // The daemon is fine and answers the next client.
    let ok = status(dir.path(), &sock);
    assert!(ok["pid"].is_number(), "{ok}");
}

/// Scrapes `port` every 50 ms (once it listens) until `stop`; the slowest
/// answer. Its own thread, so a blocked daemon loop cannot delay the probe.
fn probe_metrics(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Duration, usize)> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let (mut slowest, mut scrapes) = (Duration::ZERO, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t0 = Instant::now();
            // Not listening yet: the daemon is starting.
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            slowest = slowest.max(t0.elapsed());
            scrapes += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        (slowest, scrapes)
    })
}

// Issue 12, item 14: the daemon runs on one thread; the planner on a large
// store, the status handler's full verdict plan and every fsync ran on it,
// so metrics and the control socket stopped answering meanwhile.
#[tokio::test]
async fn a_large_plan_does_not_block_metrics_or_the_control_socket() {
    use std::sync::Arc;
    use stowage::daemon::control::{Request, Response};
    use stowage::daemon::{self, Config};
    use stowage::engine::Image;
    use stowage::engine::fake::FakeEngine;
    // In-memory: no engine holds 100,000 images in a test's time, and the
    // point is the daemon's own work, not the engine's.
    const IMAGES: usize = 100_000;
    let now = chrono::Utc::now().timestamp();
    let images: Vec<Image> = (0..IMAGES)
        .map(|i| Image {
            id: format!("sha256:{i:064x}"),
            repo_tags: vec![format!("app/r{}:{i}", i % 500)],
            repo_digests: vec![],
            created: now - 86_400 - i as i64,
            size: 1_000_000,
        })
        .collect();
    let dir = engine_env::short_folder("fs-");
    let port = free_port();
    let sock = dir.path().join("control.sock");
    let text = format!(
        r#"version = 1
[daemon]
schedule = "0 0 0 1 1 * 2099"
watch = false
state_dir = "{d}/state"
control_socket = "{s}"
metrics = "127.0.0.1:{port}"

[[retain]]
name = "all"
images = ["app/**"]
keep_last = 1000000
"#,
        d = dir.path().display(),
        s = sock.display()
    );
    std::fs::write(dir.path().join("policy.toml"), text).unwrap();
    let policy = stowage::policy::load(&dir.path().join("policy.toml")).unwrap();
    let metrics = Arc::new(stowage::daemon::metrics::Metrics::default());
    let (_triggers, rx) = tokio::sync::mpsc::channel(8);
    let (stop_daemon, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        policy,
        engine_address: "fake".into(),
        clock: Arc::new(stowage::reconcile::SystemClock),
        notifier: stowage::daemon::notify::Notifier::disabled(),
        metrics: metrics.clone(),
        remote: None,
    };
    let engine = Arc::new(images);
    let connect = move || {
        let images = engine.clone();
        async move { Ok(FakeEngine::new((*images).clone(), vec![])) }
    };
    // Probing from before the start: the first reconcile runs at once.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = probe_metrics(port, stop.clone());
    let t0 = Instant::now();
    // On this test's runtime: one thread, as `stowage run` has.
    let daemon = tokio::spawn(daemon::run(config, connect, rx, async {
        let _ = stopped.await;
    }));
    while metrics.reconciles() < 1 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no reconcile");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reconcile = t0.elapsed();
    // Then a status, whose verdict plan covers the whole store. The client
    // on its own thread: parsing the answer is not the daemon's work.
    let t1 = Instant::now();
    let answer = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(stowage::daemon::control::request(&sock, &Request::Status))
    });
    let answer = tokio::task::spawn_blocking(move || answer.join().unwrap())
        .await
        .unwrap();
    match answer.unwrap() {
        Response::Status { images, .. } => assert_eq!(images, Some(IMAGES)),
        other => panic!("unexpected {other:?}"),
    }
    let status = t1.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (slowest, scrapes) = tokio::task::spawn_blocking(move || probe.join().unwrap())
        .await
        .unwrap();
    eprintln!(
        "reconcile {reconcile:?}, status {status:?}; slowest of {scrapes} scrapes {slowest:?}"
    );
    // The daemon must have had something heavy to do, or this proves nothing.
    let heavy = reconcile.max(status);
    assert!(
        heavy > Duration::from_millis(300),
        "the store is too small to block the loop measurably: {reconcile:?}, {status:?}"
    );
    // Blocked, a scrape waits about as long as the heavy work (measured:
    // 2.4 s of a 3.4 s status); off the loop, a small part of it. Relative,
    // so a faster or a busier machine scales both sides.
    assert!(
        slowest * 3 < heavy,
        "a scrape waited {slowest:?} while the daemon planned (reconcile {reconcile:?}, status {status:?})"
    );
    stop_daemon.send(()).unwrap();
    daemon.await.unwrap().unwrap();
}

// Issue 12, item 7: drain on shutdown. The metrics server stops accepting
// but waits for the scrape in flight (up to 2 s) before it returns.
#[tokio::test]
async fn metrics_shutdown_lets_a_scrape_in_flight_finish() {
    use std::sync::Arc;
    use stowage::daemon::metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = metrics::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(metrics::serve(listener, Arc::default(), stop.clone()));
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Let the server read the first half before it is told to stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !server.is_finished(),
        "serve waits for the scrape in flight"
    );
    client.write_all(b"\r\n").await.unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("stowage_reconciles_total 0"), "{answer}");
    server.await.unwrap();
    // The listener is closed: no new scrapes after shutdown.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// Issue 12, item 7: the control socket caps its clients. Eight idle ones
// hold every slot: a ninth is not served (nor given a descriptor) until one
// of them leaves.
#[tokio::test]
async fn control_clients_beyond_the_cap_wait_for_a_slot() {
    use std::sync::Arc;
    use stowage::daemon::control::{self, ClientError, Handler, Request, Response};
    struct Answer;
    impl Handler for Answer {
        async fn status(&self) -> Response {
            Response::Error {
                message: "status".into(),
            }
        }
        async fn reconcile(&self) -> Response {
            Response::Error {
                message: "reconcile".into(),
            }
        }
    }
    let dir = engine_env::short_folder("fs-");
    let path = dir.path().join("control.sock");
    let listener = control::bind(&path).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(control::serve(
        listener,
        path.clone(),
        Arc::new(Answer),
        stop.clone(),
    ));
    let mut idle = Vec::new();
    for _ in 0..control::MAX_CLIENTS {
        idle.push(tokio::net::UnixStream::connect(&path).await.unwrap());
    }
    let short = Duration::from_millis(500);
    assert!(
        matches!(
            control::request_within(&path, &Request::Status, short).await,
            Err(ClientError::TimedOut { .. })
        ),
        "served beyond the cap"
    );
    drop(idle.pop());
    let answer = control::request_within(&path, &Request::Status, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        answer,
        Response::Error {
            message: "status".into()
        }
    );
    // Idle clients do not hold up shutdown.
    stop.cancel();
    server.await.unwrap();
    assert!(!path.exists());
}
