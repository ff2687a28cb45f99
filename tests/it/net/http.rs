//! The HTTP-aware TCP proxy: faults per request in front of a registry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::read_head;

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
    /// Forward it; drop this header from the answer (a proxy that strips
    /// `Docker-Content-Digest`).
    StripAnswerHeader(&'static str),
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

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

async fn http_tcp_one(mut client: TcpStream, shared: Arc<HttpShared>) {
    // The engine tries https first on a loopback registry: refuse it at
    // once (it then speaks http) rather than wait for a head that never comes.
    let mut first = [0u8; 1];
    if matches!(client.peek(&mut first).await, Ok(1) if first[0] == TLS_HANDSHAKE) {
        return;
    }
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
    let stripped: &[&str] = match &fault {
        Fault::StripAnswerHeader(h) => &[h],
        _ => &[],
    };
    if !send_back(
        &mut cw,
        rewrite_head(&answer_head, stripped).as_bytes(),
        &shared,
    )
    .await
    {
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
