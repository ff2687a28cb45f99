//! A flaky uplink for `scripts/bench pull`: a TCP proxy on 127.0.0.1 that
//! closes every connection after it has sent back `--cut-every` bytes, then
//! refuses new connections for `--down` seconds, as a link that drops every
//! few minutes does. It counts the bytes it sent back (the wire bytes a pull
//! cost) and rewrites `--stats FILE` after every connection: `bytes cuts`.
//!
//! Usage: `flaky_proxy LISTEN_PORT UPSTREAM [--cut-every BYTES] [--down SECS]
//! [--stats FILE]`. Only loopback upstreams are accepted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

struct Link {
    cut_every: u64,
    down: Duration,
    stats: Option<String>,
    /// Bytes sent back to clients, over every connection.
    sent: AtomicU64,
    cuts: AtomicU64,
    /// While set and in the future, new connections are reset.
    down_until: Mutex<Option<Instant>>,
}

impl Link {
    fn write_stats(&self) {
        if let Some(path) = &self.stats {
            let line = format!(
                "{} {}\n",
                self.sent.load(Ordering::SeqCst),
                self.cuts.load(Ordering::SeqCst)
            );
            let tmp = format!("{path}.tmp");
            if std::fs::write(&tmp, line).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: flaky_proxy LISTEN_PORT UPSTREAM [--cut-every BYTES] [--down SECS] [--stats FILE]"
    );
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let upstream = args.next().unwrap_or_else(|| usage());
    if !(upstream.starts_with("127.") || upstream.starts_with("localhost:")) {
        eprintln!("error: upstream {upstream} is not on loopback");
        std::process::exit(2);
    }
    let (mut cut_every, mut down, mut stats) = (0u64, 0u64, None);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--cut-every" => cut_every = value.parse().unwrap_or_else(|_| usage()),
            "--down" => down = value.parse().unwrap_or_else(|_| usage()),
            "--stats" => stats = Some(value),
            _ => usage(),
        }
    }
    let link = Arc::new(Link {
        cut_every,
        down: Duration::from_secs(down),
        stats,
        sent: AtomicU64::new(0),
        cuts: AtomicU64::new(0),
        down_until: Mutex::new(None),
    });
    link.write_stats();
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    while let Ok((client, _)) = listener.accept().await {
        let down = {
            let until = link.down_until.lock().await;
            until.is_some_and(|u| Instant::now() < u)
        };
        if down {
            // A reset, as from a port with nothing listening.
            #[allow(deprecated)] // zero linger never blocks on drop
            let _ = client.set_linger(Some(Duration::ZERO));
            continue;
        }
        let link = link.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            forward(client, &upstream, &link).await;
            link.write_stats();
        });
    }
}

/// Forward one connection, cutting it once `cut_every` bytes went back.
async fn forward(client: TcpStream, upstream: &str, link: &Link) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let ahead = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
        std::future::pending::<()>().await;
    };
    let back = async {
        let mut this_conn = 0u64;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let room = if link.cut_every == 0 {
                n as u64
            } else {
                link.cut_every.saturating_sub(this_conn).min(n as u64)
            };
            let take = usize::try_from(room).unwrap_or(n);
            if cw.write_all(&buf[..take]).await.is_err() {
                return;
            }
            this_conn += take as u64;
            link.sent.fetch_add(take as u64, Ordering::SeqCst);
            if take < n {
                link.cuts.fetch_add(1, Ordering::SeqCst);
                if !link.down.is_zero() {
                    *link.down_until.lock().await = Some(Instant::now() + link.down);
                }
                return;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        () = ahead => {}
        () = back => {}
    }
}
