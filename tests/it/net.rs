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
async fn read_head<S: tokio::io::AsyncRead + Unpin>(
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

/// What [`HttpProxy`] does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward it and its answer.
    Pass,
    /// Answer this status itself (with a small JSON error); upstream never sees it.
    Answer(u16),
    /// Answer `307` to this location.
    Redirect(String),
    /// Forward it without its `Range` header: the registry sends the whole blob (200).
    IgnoreRange,
    /// Forward it; flip the lowest bit of the blob's byte at this offset
    /// when the answer carries it (a 206 starts at its range).
    Flip(u64),
    /// Forward it; close the connection after this many bytes of the body.
    CutAfter(u64),
    /// Forward it; after this many bytes of the body, send nothing more
    /// and keep the connection open until the client gives up.
    StallAfter(u64),
    /// Answer `200` with a manifest media type, no length and this many
    /// bytes of spaces (a huge manifest); upstream never sees it.
    Endless(u64),
}

/// One request [`HttpProxy`] saw, as it came from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The request target (`/v2/<name>/blobs/<digest>`).
    pub target: String,
    /// Its `Range` header, if any.
    pub range: Option<String>,
}

/// Decides per request, from it and how many requests for the same target
/// came before it.
pub type FaultRule = dyn Fn(&Seen, usize) -> Fault + Send + Sync;

struct HttpShared {
    upstream: String,
    rule: Box<FaultRule>,
    seen: Mutex<Vec<Seen>>,
    sent: AtomicU64,
    /// Bytes per second forwarded back per answer; 0: as fast as it comes.
    rate: AtomicU64,
    /// Connections being handled.
    open: AtomicU64,
}

/// Counts a connection in [`HttpShared::open`] while it lives.
struct Open(Arc<HttpShared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP/1.1-aware proxy on 127.0.0.1 in front of a registry (`upstream`,
/// `host:port`), injecting [`Fault`]s per request and counting the bytes it
/// sends back (the wire bytes of a download). Each connection carries one
/// request: it is forwarded with `Connection: close` and its answer says
/// so too, so every retry of the client is a request of its own.
pub struct HttpProxy {
    pub addr: String,
    shared: Arc<HttpShared>,
    task: JoinHandle<()>,
}

impl HttpProxy {
    pub async fn start(
        upstream: &str,
        rule: impl Fn(&Seen, usize) -> Fault + Send + Sync + 'static,
    ) -> HttpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let shared = Arc::new(HttpShared {
            upstream: upstream.to_owned(),
            rule: Box::new(rule),
            seen: Mutex::new(Vec::new()),
            sent: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.open.fetch_add(1, Ordering::SeqCst);
                let open = Open(s.clone());
                tokio::spawn(async move {
                    http_tcp_one(client, open.0.clone()).await;
                    drop(open);
                });
            }
        });
        HttpProxy { addr, shared, task }
    }

    /// Requests seen so far whose target contains `part`, in order.
    pub fn seen(&self, part: &str) -> Vec<Seen> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s.target.contains(part))
            .cloned()
            .collect()
    }

    /// Bytes sent back to clients so far (answers' heads included).
    pub fn bytes(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Connections still being handled (a client gone is noticed at the
    /// proxy's next write).
    pub fn open(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Limits each answer to `bytes_per_sec` from now on (0: no limit).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `name: value` of the head's first header called `name` (any case).
fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `head` (through its blank line) without the headers in `drop`, with
/// `Connection: close`.
fn rewrite_head(head: &str, drop: &[&str]) -> String {
    let mut out: String = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().trim();
            !name.eq_ignore_ascii_case("connection")
                && !drop.iter().any(|d| name.eq_ignore_ascii_case(d))
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// Writes `bytes` to the client at the proxy's rate, counting them; false
/// when the client is gone.
async fn send_back(
    cw: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut bytes: &[u8],
    shared: &HttpShared,
) -> bool {
    while !bytes.is_empty() {
        let rate = shared.rate.load(Ordering::SeqCst);
        // A tenth of a second's worth at a time.
        let take = if rate == 0 {
            bytes.len()
        } else {
            usize::try_from((rate / 10).max(1))
                .unwrap_or(usize::MAX)
                .min(bytes.len())
        };
        if cw.write_all(&bytes[..take]).await.is_err() {
            return false;
        }
        shared.sent.fetch_add(take as u64, Ordering::SeqCst);
        bytes = &bytes[take..];
        if rate != 0 {
            tokio::time::sleep(Duration::from_secs_f64(take as f64 / rate as f64)).await;
        }
    }
    true
}

/// A whole answer made by the proxy itself.
fn own_answer(code: u16, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} Test Proxy\r\nContent-Type: application/json\r\n{extra}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn http_tcp_one(mut client: TcpStream, shared: Arc<HttpShared>) {
    let mut buf = Vec::new();
    let Some(head_len) = read_head(&mut client, &mut buf).await else {
        return;
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut words = head.split_whitespace();
    let seen = Seen {
        method: words.next().unwrap_or_default().to_owned(),
        target: words.next().unwrap_or_default().to_owned(),
        range: header_of(&head, "range").map(str::to_owned),
    };
    let fault = {
        let mut all = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        let before = all.iter().filter(|s| s.target == seen.target).count();
        all.push(seen.clone());
        (shared.rule)(&seen, before)
    };
    let (mut cr, mut cw) = client.into_split();
    let made = match &fault {
        Fault::Answer(code) => Some(own_answer(
            *code,
            "",
            &format!(
                "{{\"errors\":[{{\"code\":\"UNKNOWN\",\"message\":\"{} {} answered {code} by the test proxy\"}}]}}",
                seen.method, seen.target
            ),
        )),
        Fault::Redirect(to) => Some(own_answer(307, &format!("Location: {to}\r\n"), "")),
        _ => None,
    };
    if let Some(answer) = made {
        send_back(&mut cw, answer.as_bytes(), &shared).await;
        let _ = cw.shutdown().await;
        return;
    }
    if let Fault::Endless(n) = fault {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                    Connection: close\r\n\r\n";
        if !send_back(&mut cw, head.as_bytes(), &shared).await {
            return;
        }
        let chunk = vec![b' '; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let take = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            if !send_back(&mut cw, &chunk[..take], &shared).await {
                return;
            }
            left -= take as u64;
        }
        let _ = cw.shutdown().await;
        return;
    }
    let Ok(mut up) = TcpStream::connect(&shared.upstream).await else {
        return;
    };
    let dropped: &[&str] = if fault == Fault::IgnoreRange {
        &["range"]
    } else {
        &[]
    };
    let request = rewrite_head(&head, dropped);
    if up.write_all(request.as_bytes()).await.is_err()
        || up.write_all(&buf[head_len..]).await.is_err()
    {
        return;
    }
    let mut answer = Vec::new();
    let Some(answer_len) = read_head(&mut up, &mut answer).await else {
        return;
    };
    let answer_head = String::from_utf8_lossy(&answer[..answer_len]).into_owned();
    if !send_back(&mut cw, rewrite_head(&answer_head, &[]).as_bytes(), &shared).await {
        return;
    }
    // Where the body starts in the blob: a 206 names its first byte.
    let start: u64 = header_of(&answer_head, "content-range")
        .and_then(|r| r.strip_prefix("bytes "))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body_sent: u64 = 0;
    let mut pending = answer.split_off(answer_len);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if pending.is_empty() {
            match up.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
        let limit = match fault {
            Fault::CutAfter(n) | Fault::StallAfter(n) => n,
            _ => u64::MAX,
        };
        let room = usize::try_from(limit - body_sent).unwrap_or(usize::MAX);
        let mut part: Vec<u8> = pending.drain(..room.min(pending.len())).collect();
        if let Fault::Flip(at) = fault {
            let first = start + body_sent;
            if (first..first + part.len() as u64).contains(&at) {
                part[usize::try_from(at - first).expect("within the part")] ^= 0x01;
            }
        }
        if !send_back(&mut cw, &part, &shared).await {
            return;
        }
        body_sent += part.len() as u64;
        if body_sent == limit {
            if let Fault::StallAfter(_) = fault {
                // Nothing more; wait for the client to hang up.
                let mut sink = [0u8; 4096];
                while matches!(cr.read(&mut sink).await, Ok(n) if n > 0) {}
            }
            return;
        }
    }
    let _ = cw.shutdown().await;
}
