//! Network pieces for transfer tests: private registries the test starts and
//! stops itself; a fault-injecting TCP proxy to put between a client and a
//! registry (refuse, stall, cut after N bytes, throttle), switchable while
//! transfers run; an HTTP-aware one deciding per request (answer a status,
//! redirect, drop `Range`, flip a byte, cut or stall mid-body, an endless
//! manifest); both count the bytes they send back. And an HTTP proxy on a
//! unix socket in front of an engine. Everything listens on 127.0.0.1 only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

mod http;
pub use http::{Fault, HttpProxy, Seen};

/// A free port on 127.0.0.1 (bound and released; a tiny race, fine for tests).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local addr").port()
}

/// The status line's code of `GET http://addr/path`, or `None` when nothing answers.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A `docker-registry` (CNCF distribution) on 127.0.0.1, started by the test.
pub struct TestRegistry {
    pub addr: String,
    config: PathBuf,
    child: Option<Child>,
}

impl TestRegistry {
    /// Starts a registry storing under `dir`; with `htpasswd`, every request
    /// needs basic auth from that file.
    pub fn start(dir: &Path, htpasswd: Option<&Path>) -> TestRegistry {
        std::fs::create_dir_all(dir.join("data")).expect("registry dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let auth = htpasswd.map_or(String::new(), |p| {
            format!(
                "auth: {{ htpasswd: {{ realm: stowage-test, path: {} }} }}\n",
                p.display()
            )
        });
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{ level: warn }}\n\
                 storage: {{ filesystem: {{ rootdirectory: {} }}, delete: {{ enabled: true }} }}\n\
                 http: {{ addr: {addr} }}\n{auth}",
                dir.join("data").display()
            ),
        )
        .expect("registry config");
        let mut r = TestRegistry {
            addr,
            config,
            child: None,
        };
        r.restart();
        r
    }

    /// Starts the registry again after [`stop`](Self::stop), same port and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let log = std::fs::File::create(self.config.with_extension("log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry (apt-get install docker-registry)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // 401 is an answer too: a registry with auth.
        while !matches!(http_status(&self.addr, "/v2/"), Some(200 | 401)) {
            assert!(
                Instant::now() < deadline,
                "registry at {} did not answer within 30 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the registry process (the registry is "down").
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Reset new connections at once (the uplink is down).
    Refuse,
    /// Accept, then send nothing back; open connections stop forwarding too.
    Stall,
    /// Forward at most this many bytes back per connection, then close it.
    CutAfter(u64),
    /// Forward back at most this many bytes per second per connection.
    Throttle(u64),
    /// Forward both ways, but flip (xor 0xff) every Nth byte sent back on
    /// each connection: a body longer than N arrives wrong, whatever the
    /// connection reuse.
    FlipEvery(u64),
}

struct Shared {
    mode: Mutex<Mode>,
    upstream: Mutex<String>,
    connections: AtomicU64,
    /// Bytes sent back to clients: what crossed the "link".
    sent: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`.
pub struct Proxy {
    pub addr: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr: SocketAddr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            upstream: Mutex::new(upstream.to_owned()),
            connections: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handle(client, s.clone()));
            }
        });
        Proxy {
            addr: addr.to_string(),
            shared,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Bytes sent back to clients so far (the wire bytes of a pull).
    pub fn bytes(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(client: TcpStream, shared: Arc<Shared>) {
    match shared.mode() {
        Mode::Refuse => {
            reset(&client);
            return;
        }
        Mode::Stall => {
            hold(client).await;
            return;
        }
        _ => {}
    }
    let upstream_addr = shared
        .upstream
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Ok(upstream) = TcpStream::connect(&upstream_addr).await else {
        reset(&client);
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let forward = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let back = async {
        let mut sent: u64 = 0;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                match shared.mode() {
                    Mode::Pass | Mode::Refuse => {
                        if cw.write_all(chunk).await.is_err() {
                            return;
                        }
                        sent += chunk.len() as u64;
                        shared.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                        chunk = &[];
                    }
                    Mode::Stall => tokio::time::sleep(Duration::from_millis(100)).await,
                    Mode::FlipEvery(n) => {
                        let mut out = chunk.to_vec();
                        for (i, b) in out.iter_mut().enumerate() {
                            if (sent + i as u64 + 1).is_multiple_of(n.max(1)) {
                                *b ^= 0xff;
                            }
                        }
                        if cw.write_all(&out).await.is_err() {
                            return;
                        }
                        sent += out.len() as u64;
                        shared.sent.fetch_add(out.len() as u64, Ordering::SeqCst);
                        chunk = &[];
                    }
                    Mode::CutAfter(limit) => {
                        let room =
                            usize::try_from(limit.saturating_sub(sent)).unwrap_or(usize::MAX);
                        let take = room.min(chunk.len());
                        if take > 0 && cw.write_all(&chunk[..take]).await.is_err() {
                            return;
                        }
                        sent += take as u64;
                        shared.sent.fetch_add(take as u64, Ordering::SeqCst);
                        if take < chunk.len() {
                            // Cut: close mid-answer.
                            return;
                        }
                        chunk = &[];
                    }
                    Mode::Throttle(per_sec) => {
                        let slice = usize::try_from((per_sec / 10).max(1))
                            .unwrap_or(usize::MAX)
                            .min(chunk.len());
                        if cw.write_all(&chunk[..slice]).await.is_err() {
                            return;
                        }
                        sent += slice as u64;
                        shared.sent.fetch_add(slice as u64, Ordering::SeqCst);
                        chunk = &chunk[slice..];
                        // The time this slice takes at `per_sec` (100 ms
                        // for a full tenth of a second's worth).
                        let secs = slice as f64 / per_sec.max(1) as f64;
                        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    }
                }
            }
        }
        let _ = cw.shutdown().await;
    };
    // The answer side ends the connection: a client that half-closes after
    // its request still gets the answer.
    let forward = async {
        forward.await;
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = forward => {}
        () = back => {}
    }
}

/// Make the coming close a reset, as from a port with nothing listening.
// Deprecated because a non-zero linger blocks on drop; zero never blocks.
#[allow(deprecated)]
fn reset(client: &TcpStream) {
    let _ = client.set_linger(Some(Duration::ZERO));
}

/// Keep a connection open, reading and dropping what the client sends,
/// answering nothing, until the client gives up.
async fn hold(mut client: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What [`UnixHttpProxy`] does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAction {
    /// Forward it and its answer.
    Pass,
    /// Answer this status with a small JSON error, as docker-socket-proxy
    /// does for an endpoint it does not allow; upstream never sees it.
    Answer(u16),
    /// Close the connection without an answer.
    Close,
    /// Forward it, pass the answer's head, then send nothing more (a hung
    /// engine whose body never comes).
    StallBody,
}

/// Decides per request, from the method and the request target
/// (`/v1.41/events?...`).
pub type HttpRule = dyn Fn(&str, &str) -> HttpAction + Send + Sync;

/// An HTTP-aware proxy on a unix socket in front of an engine's socket, e.g.
/// a docker-socket-proxy that refuses `/events`. Each request gets its own
/// upstream connection and is forwarded with `Connection: close`, so the
/// client cannot slip a second request through a connection already passed.
pub struct UnixHttpProxy {
    pub path: PathBuf,
    /// `METHOD target` of every request seen, in order.
    seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl UnixHttpProxy {
    pub fn start(
        upstream: &Path,
        path: &Path,
        rule: impl Fn(&str, &str) -> HttpAction + Send + Sync + 'static,
    ) -> UnixHttpProxy {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).expect("binding the proxy socket");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<HttpRule> = Arc::new(rule);
        let upstream = upstream.to_path_buf();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(http_one(client, upstream.clone(), rule.clone(), s.clone()));
            }
        });
        UnixHttpProxy {
            path: path.to_path_buf(),
            seen,
            task,
        }
    }

    /// The address to give `--engine`.
    pub fn addr(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Requests seen so far whose target contains `part`.
    pub fn requests(&self, part: &str) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| r.contains(part))
            .count()
    }
}

impl Drop for UnixHttpProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads from `stream` until `buf` holds a whole HTTP head; returns its
/// length (through the blank line), `None` when the peer closed first.
pub(crate) async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn http_one(
    mut client: tokio::net::UnixStream,
    upstream: PathBuf,
    rule: Arc<HttpRule>,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    let Some(head_len) = read_head(&mut client, &mut buf).await else {
        return;
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or_default().to_owned();
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!("{method} {target}"));
    let action = rule(&method, &target);
    let stall = match action {
        HttpAction::Close => return,
        HttpAction::Answer(code) => {
            let body = format!("{{\"message\":\"{method} {target} refused by the test proxy\"}}");
            let answer = format!(
                "HTTP/1.1 {code} Refused\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(answer.as_bytes()).await;
            let _ = client.shutdown().await;
            return;
        }
        HttpAction::Pass => false,
        HttpAction::StallBody => true,
    };
    let Ok(mut up) = tokio::net::UnixStream::connect(&upstream).await else {
        return;
    };
    // One request per connection: the answer closes it.
    let mut rewritten: String = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    rewritten.push_str("Connection: close\r\n\r\n");
    if up.write_all(rewritten.as_bytes()).await.is_err()
        || up.write_all(&buf[head_len..]).await.is_err()
    {
        return;
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let forward = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        // The request is complete; keep the answer side open.
        std::future::pending::<()>().await;
    };
    let back = async {
        if stall {
            let mut answer = Vec::new();
            let Some(n) = read_head(&mut ur, &mut answer).await else {
                return;
            };
            let _ = cw.write_all(&answer[..n]).await;
            // The body never comes; the client has to give up.
            std::future::pending::<()>().await;
        }
        let _ = tokio::io::copy(&mut ur, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        () = forward => {}
        () = back => {}
    }
}
