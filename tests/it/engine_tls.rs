//! The engine over TLS, against the private dockerd's `--tlsverify`
//! listener that `scripts/test` starts (certificates made by
//! `stowage_make_certs`): `plan`, `apply` and `pull` with the docker CLI's
//! environment (`DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`) and with its flags;
//! a wrong CA, a missing or untrusted client certificate, plain text to the
//! TLS port and TLS to a plain engine each refused with a clear error.
//!
//! Registry credentials never go in clear text to an engine on another host:
//! a recording forwarder to the engine listens on 10.66.0.1, inside a network
//! namespace the test makes (so "another host" never leaves this machine),
//! and shows that the refused pull sent no request that carries them, and
//! that `--allow-plaintext-credentials` lets them through.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::engine_env::{self, text};
use crate::transfer_real::{Dir, ENGINE_WIDE, has_image, holder, now, publish};
use stowage::engine::Engine;

const DAY: i64 = 86_400;

/// The stowage binary with none of the docker CLI's environment but what
/// `env` sets; `DOCKER_CONFIG` is the test's own folder (no machine
/// credentials, no default certificates unless the test puts them there).
fn stowage(
    dir: &Dir,
    policy: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stowage"));
    prepare(&mut cmd, dir, policy, args, env);
    cmd
}

fn prepare(
    cmd: &mut tokio::process::Command,
    dir: &Dir,
    policy: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
) {
    let config = dir.path().join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    cmd.arg("-p").arg(policy).args(args);
    for var in [
        "DOCKER_HOST",
        "DOCKER_TLS",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "STOWAGE_ALLOW_PLAINTEXT_CREDENTIALS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("DOCKER_CONFIG", &config);
    for (k, v) in env {
        cmd.env(k, v);
    }
}

async fn run(mut cmd: tokio::process::Command) -> Output {
    cmd.output().await.expect("running stowage")
}

/// `--tlsverify` and the three files, as flags.
fn tls_flags(certs: &Path) -> Vec<String> {
    let c = certs.join("client");
    vec![
        "--tlsverify".into(),
        format!("--tlscacert={}", c.join("ca.pem").display()),
        format!("--tlscert={}", c.join("cert.pem").display()),
        format!("--tlskey={}", c.join("key.pem").display()),
    ]
}

/// A `DOCKER_CERT_PATH` folder holding `files` (name, source).
fn cert_dir(dir: &Dir, name: &str, files: &[(&str, PathBuf)]) -> PathBuf {
    let d = dir.path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (to, from) in files {
        std::fs::copy(from, d.join(to)).unwrap();
    }
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_apply_over_tls_with_docker_tls_verify_and_docker_cert_path() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some((tls_addr, certs)) = engine_env::tls_engine() else {
        return;
    };
    let ns = engine_env::unique_ns("tls-apply");
    let app = format!("{ns}/app");
    let images: Vec<_> = (1..=3)
        .map(|i| engine_env::image(&[&format!("{app}:{i}")], now() - (10 - i) * DAY, 1024))
        .collect();
    engine_env::load(&engine, &images).await;
    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "[[retain]]\nname = \"newest\"\nimages = [\"{app}\"]\nkeep_last = 1\n"
    ));
    let host = PathBuf::from(&tls_addr);
    let client = certs.join("client");
    let env = [
        ("DOCKER_HOST", host.as_path()),
        ("DOCKER_TLS_VERIFY", Path::new("1")),
        ("DOCKER_CERT_PATH", client.as_path()),
    ];

    let plan = run(stowage(&dir, &policy, &["plan", "--exit-code"], &env)).await;
    assert_eq!(plan.status.code(), Some(1), "{}", text(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout);
    for old in [1, 2] {
        assert!(shown.contains(&format!("{app}:{old}")), "{shown}");
    }

    let apply = run(stowage(&dir, &policy, &["apply"], &env)).await;
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let left: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .filter(|t| t.starts_with(&app))
        .collect();
    assert_eq!(left, vec![format!("{app}:3")], "{}", text(&apply));
    engine.remove(&format!("{app}:3")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_over_tls_with_the_tls_flags() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some((tls_addr, certs)) = engine_env::tls_engine() else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let reg = engine_env::registry().unwrap();
    let ns = engine_env::unique_ns("tls-pull");
    let reference = format!("{reg}/{ns}/app:1");
    let image = engine_env::image(&[&reference], now() - DAY, 64 * 1024);
    publish(&engine, &image, None).await;
    assert!(!has_image(&engine, &image.id()).await);

    let dir = Dir::new();
    let policy = dir.policy("");
    let mut args = vec!["--engine".to_owned(), tls_addr];
    args.extend(tls_flags(&certs));
    args.extend(["pull".to_owned(), reference.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pulled = run(stowage(&dir, &policy, &args, &[])).await;
    assert_eq!(pulled.status.code(), Some(0), "{}", text(&pulled));
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    engine.remove(&reference).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tls_mistake_is_refused_with_what_to_fix() {
    let Some((tls_addr, certs)) = engine_env::tls_engine() else {
        return;
    };
    let dir = Dir::new();
    let policy = dir.policy("");
    let client = certs.join("client");
    let other = certs.join("other");
    let host = PathBuf::from(&tls_addr);
    // `plan` at DOCKER_HOST with DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH,
    // or in plain text without a certificate folder.
    let plan = |cert_path: Option<&Path>| {
        let mut env = vec![("DOCKER_HOST", host.as_path())];
        if let Some(d) = cert_path {
            env.extend([
                ("DOCKER_TLS_VERIFY", Path::new("1")),
                ("DOCKER_CERT_PATH", d),
            ]);
        }
        run(stowage(&dir, &policy, &["plan"], &env))
    };

    // The engine's certificate against a CA that did not sign it.
    let wrong_ca = cert_dir(
        &dir,
        "wrong-ca",
        &[
            ("ca.pem", other.join("ca.pem")),
            ("cert.pem", client.join("cert.pem")),
            ("key.pem", client.join("key.pem")),
        ],
    );
    let out = plan(Some(&wrong_ca)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "over TLS: the engine's certificate does not verify against {}: it is signed by an unknown CA",
            wrong_ca.join("ca.pem").display()
        )),
        "{}",
        text(&out)
    );

    // No client certificate: the engine wants one.
    let ca_only = cert_dir(&dir, "ca-only", &[("ca.pem", client.join("ca.pem"))]);
    let out = plan(Some(&ca_only)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("the engine requires a client certificate and none was given"),
        "{}",
        text(&out)
    );

    // A client certificate from a CA the engine does not trust.
    let untrusted = cert_dir(
        &dir,
        "untrusted",
        &[
            ("ca.pem", client.join("ca.pem")),
            ("cert.pem", other.join("cert.pem")),
            ("key.pem", other.join("key.pem")),
        ],
    );
    let out = plan(Some(&untrusted)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "the engine refused the client certificate {}",
            untrusted.join("cert.pem").display()
        )),
        "{}",
        text(&out)
    );

    // A certificate file named on the command line that is not there.
    let missing = dir.path().join("nowhere/cert.pem");
    let args = [
        "--tlsverify".to_owned(),
        format!("--tlscacert={}", client.join("ca.pem").display()),
        format!("--tlscert={}", missing.display()),
        format!("--tlskey={}", client.join("key.pem").display()),
        "plan".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(stowage(&dir, &policy, &args, &[("DOCKER_HOST", &host)])).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cannot read the client certificate {}: No such file or directory",
            missing.display()
        )),
        "{}",
        text(&out)
    );

    // Plain text to the TLS port: the engine's answer is understood.
    let out = plan(None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("the engine speaks only TLS here and refused plain HTTP"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_by_default_and_docker_tls_alone_does_not() {
    let Some((tls_addr, certs)) = engine_env::tls_engine() else {
        return;
    };
    let dir = Dir::new();
    let policy = dir.policy("");
    let client = certs.join("client");
    // The right client certificate beside a CA that did not sign the engine's.
    let wrong_ca = cert_dir(
        &dir,
        "wrong-ca",
        &[
            ("ca.pem", certs.join("other/ca.pem")),
            ("cert.pem", client.join("cert.pem")),
            ("key.pem", client.join("key.pem")),
        ],
    );
    let https = tls_addr.replacen("tcp://", "https://", 1);
    let plan = |address: &str, env: &[(&str, &Path)]| {
        run(stowage(&dir, &policy, &["--engine", address, "plan"], env))
    };

    let out = plan(&https, &[("DOCKER_CERT_PATH", &client)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = plan(&https, &[("DOCKER_CERT_PATH", &wrong_ca)]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("does not verify against"),
        "{}",
        text(&out)
    );

    // DOCKER_TLS alone: TLS, the engine's certificate not checked, so the
    // wrong CA does not matter; the client certificate is still sent.
    let tls = [
        ("DOCKER_TLS", Path::new("1")),
        ("DOCKER_CERT_PATH", wrong_ca.as_path()),
    ];
    let out = plan(&tls_addr, &tls).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // ... and DOCKER_TLS_VERIFY on top verifies again.
    let verify = [
        ("DOCKER_TLS", Path::new("1")),
        ("DOCKER_TLS_VERIFY", Path::new("0")),
        ("DOCKER_CERT_PATH", wrong_ca.as_path()),
    ];
    let out = plan(&tls_addr, &verify).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("does not verify against"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_engine_says_it_answers_in_plain_http() {
    let Some((_, certs)) = engine_env::tls_engine() else {
        return;
    };
    let socket = engine_socket();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain = Recorder::start(listener, socket);
    let dir = Dir::new();
    let policy = dir.policy("");
    let mut args = vec!["--engine".to_owned(), format!("tcp://{}", plain.addr)];
    args.extend(tls_flags(&certs));
    args.push("plan".to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(stowage(&dir, &policy, &args, &[])).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("over TLS: the engine answers in plain HTTP, not TLS"),
        "{}",
        text(&out)
    );
    // The same listener in plain text is an engine like any other.
    let engine = format!("tcp://{}", plain.addr);
    let out = run(stowage(&dir, &policy, &["--engine", &engine, "plan"], &[])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_go_in_clear_text_to_another_host_unless_allowed() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(netns) = NetNs::create() else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let reg = engine_env::registry().unwrap();
    let ns = engine_env::unique_ns("tls-plaintext");
    let reference = format!("{reg}/{ns}/app:1");
    let image = engine_env::image(&[&reference], now() - DAY, 4096);
    publish(&engine, &image, None).await;

    let dir = Dir::new();
    let policy = dir.policy("");
    // Credentials for the registry: every pull from it carries them.
    let config = dir.path().join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let secret = format!("s3cret-{}", engine_env::unique_seed());
    let auth = base64_of(&format!("user:{secret}"));
    std::fs::write(
        config.join("config.json"),
        format!(r#"{{"auths":{{"{reg}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();

    let listener = netns.listen("10.66.0.1:0");
    let remote = Recorder::start(listener, engine_socket());
    let address = format!("tcp://{}", remote.addr);
    let in_netns_with = |args: &[&str], env: &[(&str, &Path)]| {
        let mut cmd = netns.command(env!("CARGO_BIN_EXE_stowage"));
        let mut all = vec!["--engine", address.as_str()];
        all.extend_from_slice(args);
        prepare(&mut cmd, &dir, &policy, &all, env);
        cmd
    };
    let in_netns = |args: &[&str]| in_netns_with(args, &[]);

    // No credentials involved: reading the engine goes.
    let plan = run(in_netns(&["plan"])).await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    assert!(
        remote.requests().iter().any(|r| r.contains("/images/json")),
        "{:?}",
        remote.requests()
    );

    // A pull would carry them: refused, and nothing that carries them sent.
    let before = remote.requests().len();
    let refused = run(in_netns(&["pull", &reference])).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let expected = format!(
        "refusing to send the registry credentials for {reg} in clear text to the Docker engine at {address}"
    );
    assert!(text(&refused).contains(&expected), "{}", text(&refused));
    assert!(
        text(&refused).contains("--allow-plaintext-credentials"),
        "{}",
        text(&refused)
    );
    // The variable set to a false value allows nothing.
    let zero = run(in_netns_with(
        &["pull", &reference],
        &[("STOWAGE_ALLOW_PLAINTEXT_CREDENTIALS", Path::new("0"))],
    ))
    .await;
    assert_eq!(zero.status.code(), Some(1), "{}", text(&zero));
    assert!(text(&zero).contains(&expected), "{}", text(&zero));
    let sent = remote.requests();
    assert!(
        sent.len() > before,
        "the pull reached the engine at all: {sent:?}"
    );
    assert!(
        !remote
            .text()
            .to_ascii_lowercase()
            .contains("x-registry-auth"),
        "{sent:?}"
    );
    for r in &sent {
        assert!(
            !r.contains("/images/create") && !r.contains("/distribution/"),
            "{r}"
        );
    }
    assert!(!remote.text().contains(&auth) && !text(&refused).contains(&secret));
    assert!(!has_image(&engine, &image.id()).await);

    // Allowed (the variable the unit would set): the same pull goes, with
    // its credentials.
    let allowed = run(in_netns_with(
        &["pull", &reference],
        &[("STOWAGE_ALLOW_PLAINTEXT_CREDENTIALS", Path::new("1"))],
    ))
    .await;
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed));
    assert!(
        remote
            .text()
            .to_ascii_lowercase()
            .contains("x-registry-auth:"),
        "{:?}",
        remote.requests()
    );
    assert!(
        remote
            .requests()
            .iter()
            .any(|r| r.contains("/images/create")),
        "{:?}",
        remote.requests()
    );
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    // The flag allows it too: the registry look-up carries the credentials,
    // and the image is up to date.
    let again = run(in_netns(&[
        "--allow-plaintext-credentials",
        "pull",
        &reference,
    ]))
    .await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("up to date"),
        "{}",
        text(&again)
    );
    engine.remove(&reference).await.unwrap();
}

/// The private engine's unix socket.
fn engine_socket() -> PathBuf {
    let addr = engine_env::engine_addr().expect("the harness engine");
    PathBuf::from(addr.strip_prefix("unix://").unwrap_or(&addr))
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A plain TCP listener forwarding to the engine's unix socket, keeping
/// every byte a client sent.
struct Recorder {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn start(listener: std::net::TcpListener, socket: PathBuf) -> Recorder {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, socket.clone(), kept.clone()));
            }
        });
        Recorder { addr, seen, task }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// The request lines clients sent.
    fn requests(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| {
                ["GET ", "HEAD ", "POST ", "PUT ", "DELETE "]
                    .iter()
                    .any(|m| l.starts_with(m))
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: tokio::net::TcpStream, socket: PathBuf, seen: Arc<Mutex<Vec<u8>>>) {
    let Ok(upstream) = tokio::net::UnixStream::connect(&socket).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_engine, mut to_engine) = upstream.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_engine.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_engine.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_engine, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}

/// A network namespace of the test's own whose loopback also holds
/// 10.66.0.1: an address that is not loopback, reachable without leaving
/// the machine. Removed on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    /// `None` (after a SKIP line) outside CI when namespaces cannot be made
    /// (not root, no `ip`); in CI that is a failure.
    fn create() -> Option<NetNs> {
        let name = format!(
            "stowage-tls-{}-{:x}",
            std::process::id(),
            engine_env::unique_seed() & 0xff_ffff
        );
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            });
        match made {
            Ok((true, _)) => {}
            other => {
                let why = format!(
                    "cannot make a network namespace with `ip netns add` (needs root and iproute2): {other:?}"
                );
                assert!(!engine_env::in_ci(), "{why}");
                eprintln!("SKIP: {why}");
                return None;
            }
        }
        let netns = NetNs { name };
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.66.0.1/32", "dev", "lo"][..],
        ] {
            let status = Command::new("ip")
                .args(["netns", "exec", &netns.name, "ip"])
                .args(args)
                .status()
                .expect("running ip");
            assert!(status.success(), "ip {args:?} in {}", netns.name);
        }
        Some(netns)
    }

    /// A listener bound inside the namespace: a thread of its own enters it
    /// (`setns` moves only the calling thread), binds, and ends; the socket
    /// stays in the namespace wherever it is used.
    fn listen(&self, addr: &str) -> std::net::TcpListener {
        let path = format!("/run/netns/{}", self.name);
        let addr = addr.to_owned();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("opening the namespace");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("entering the namespace");
            std::net::TcpListener::bind(&addr).expect("binding inside the namespace")
        })
        .join()
        .expect("the namespace thread")
    }

    /// `program` run inside the namespace.
    fn command(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
