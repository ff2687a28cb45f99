//! The control socket: line-delimited JSON over a local unix socket.
//!
//! Each request is one JSON object on one line, each answer likewise; a
//! connection may carry several requests in turn.
//!
//! ```text
//! -> {"request":"status"}
//! <- {"response":"status","daemon":{...},"references":[...],"images":12}
//! -> {"request":"reconcile"}
//! <- {"response":"reconcile","result":{"run":"...","failed":0,"summary":"removed 3, ..."}}
//! <- {"response":"error","message":"..."}          (any request)
//! ```
//!
//! The socket is created mode 0600: only its owner (root, for the packaged
//! unit) may ask for status or reconciles.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use crate::status::{DaemonStatus, ReconcileResult, StatusRow};

/// A request line must arrive whole within this of the connection opening or
/// the previous answer, else the client is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An answer the client does not read within this drops the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request line longer than this is refused (requests are tiny).
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once; more wait unaccepted until one leaves. `status`
/// and `reconcile` are rare, and the socket is its owner's alone.
pub const MAX_CLIENTS: usize = 8;
/// At shutdown, answers in flight get this long to be written.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The daemon's view and every reference's verdict.
    Status,
    /// Reconcile now and answer with the result (waits for it).
    Reconcile,
    /// `restore --protect` beside the daemon: hold an image out of
    /// retention until then (written with the next activity marks).
    Hold { image: String, until: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status {
        /// Boxed: the other answers are a few words.
        daemon: Box<DaemonStatus>,
        /// Verdicts under the policy in force; `None` when the engine could
        /// not be asked (see `references_error`).
        references: Option<Vec<StatusRow>>,
        /// Images on the engine.
        images: Option<usize>,
        references_error: Option<String>,
        /// What the trash holds (`[daemon] trash`), with the references.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trash: Option<crate::trash::Totals>,
        /// The cached `[[scan]]` verdicts: how many, how many failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scans: Option<crate::status::ScanCounts>,
    },
    Reconcile {
        result: ReconcileResult,
    },
    /// A `hold` is taken.
    Held,
    Error {
        message: String,
    },
}

/// What the daemon answers; implemented by the daemon loop's shared handle.
pub trait Handler: Send + Sync + 'static {
    fn status(&self) -> impl Future<Output = Response> + Send;
    fn reconcile(&self) -> impl Future<Output = Response> + Send;
    /// A `hold`; a handler without a state says so.
    fn hold(&self, image: String, until: i64) -> impl Future<Output = Response> + Send {
        let _ = (image, until);
        async {
            Response::Error {
                message: "this handler holds no state".into(),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket folder {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another stowage daemon already answers at {0}")]
    AlreadyRunning(PathBuf),
    #[error(
        "control_socket {path} is {kind}, not a socket; nothing was removed (point daemon.control_socket at a path of its own)"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot check the control socket path {path}: {source}")]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the control socket at `path`, creating its folder. A stale socket
/// (left by a crash: a socket file nobody listens on) is replaced; a live one
/// means another daemon runs. Anything else at `path` (a regular file such as
/// the policy itself, a folder, a symlink) is never removed: that is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    remove_stale(path)?;
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Removes a stale socket at `path`; leaves every other kind of file alone.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::FileTypeExt;
    let inspect = |source| ControlError::Inspect {
        path: path.to_path_buf(),
        source,
    };
    // Not followed: a symlink is reported as one, whatever it points at.
    let kind = match std::fs::symlink_metadata(path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(inspect(e)),
    };
    if !kind.is_socket() {
        let kind = crate::fmt::file_kind(kind);
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
            kind,
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyRunning(path.to_path_buf())),
        // Nobody listens: the socket of a daemon that crashed.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(inspect)
        }
        // Unknown state (e.g. permission denied): do not guess, do not delete.
        Err(e) => Err(inspect(e)),
    }
}

/// Answers requests until `shutdown`; then lets the answers in flight be
/// written for up to `DRAIN` and removes the socket file. At most
/// [`MAX_CLIENTS`] connections are served at once.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    path: PathBuf,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut backoff = Duration::from_millis(10);
    loop {
        // A slot before accepting (as mini-redis does): over the cap, clients
        // wait unaccepted instead of costing a descriptor each.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                let handler = handler.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &*handler, &shutdown).await {
                        tracing::debug!("control socket client: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    // Every slot back means every connection ended.
    let all = u32::try_from(MAX_CLIENTS).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::debug!("control socket: answers still in flight at shutdown abandoned");
    }
}

/// Why a control connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("no whole request line within {}s", IDLE_TIMEOUT.as_secs())]
    Idle,
    #[error("the client did not take the answer within {}s", WRITE_TIMEOUT.as_secs())]
    WriteTimeout,
    #[error("request line longer than {MAX_LINE} bytes; connection closed")]
    TooLong,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn connection<H: Handler>(
    stream: UnixStream,
    handler: &H,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE));
    loop {
        // The whole line, not each read, must come within the limit: a
        // client trickling bytes is cut off as one that sends nothing.
        let next = tokio::select! {
            // Idle between requests: nothing to finish.
            () = shutdown.cancelled() => return Ok(()),
            n = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => n,
        };
        let line = match next {
            Err(_) => return Err(ConnectionError::Idle),
            Ok(None) => return Ok(()),
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => {
                // Answered, then closed: what follows an over-long or broken
                // line is never read as a request of its own.
                let (message, error) = match e {
                    LinesCodecError::MaxLineLengthExceeded => (
                        format!("bad request: line longer than {MAX_LINE} bytes"),
                        ConnectionError::TooLong,
                    ),
                    LinesCodecError::Io(e) => (format!("bad request: {e}"), e.into()),
                };
                send(&mut framed, Response::Error { message }).await?;
                return Err(error);
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer(handler, request).await,
            Err(e) => Response::Error {
                message: format!(
                    "bad request ({e}); send one JSON object per line: {{\"request\":\"status\"}} or {{\"request\":\"reconcile\"}}"
                ),
            },
        };
        send(&mut framed, response).await?;
    }
}

/// The handler's answer, or an error once [`Request::default_timeout`] has
/// passed: a connection holds one of the [`MAX_CLIENTS`] slots meanwhile,
/// and its client may have given up long ago (which cannot be told from a
/// client that half-closed and still waits).
async fn answer<H: Handler>(handler: &H, request: Request) -> Response {
    let deadline = request.default_timeout();
    let handled = async {
        match request {
            Request::Status => handler.status().await,
            Request::Reconcile => handler.reconcile().await,
            Request::Hold { ref image, until } => handler.hold(image.clone(), until).await,
        }
    };
    match tokio::time::timeout(deadline, handled).await {
        Ok(response) => response,
        Err(_) => Response::Error {
            message: format!(
                "no {} answer within {}{}",
                request.name(),
                humantime::format_duration(deadline),
                match request {
                    Request::Reconcile => {
                        "; the reconcile goes on: see `stowage status` and `stowage history`"
                    }
                    Request::Status | Request::Hold { .. } => "",
                }
            ),
        },
    }
}

/// Writes one answer line; a client that does not read it is dropped.
async fn send(
    framed: &mut Framed<UnixStream, LinesCodec>,
    response: Response,
) -> Result<(), ConnectionError> {
    // A status answer lists every reference: serialising it is CPU work.
    let line = crate::blocking::off_loop(move || serde_json::to_string(&response))
        .await
        .map_err(std::io::Error::other)?;
    match tokio::time::timeout(WRITE_TIMEOUT, framed.send(line)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(LinesCodecError::Io(e))) => Err(e.into()),
        // The encoder has no line limit today; should it get one, say so.
        Ok(Err(LinesCodecError::MaxLineLengthExceeded)) => Err(ConnectionError::TooLong),
        Err(_) => Err(ConnectionError::WriteTimeout),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no stowage daemon answers at {path} ({source})")]
    NoDaemon {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: unexpected answer: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error(
        "the daemon at {path} did not answer the {request} request within {} (a hung daemon?{hint})",
        humantime::format_duration(*.after)
    )]
    TimedOut {
        path: PathBuf,
        request: &'static str,
        after: Duration,
        hint: &'static str,
    },
}

impl Request {
    fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reconcile => "reconcile",
            Request::Hold { .. } => "hold",
        }
    }

    /// How long a client waits for the answer unless told otherwise, and the
    /// longest the daemon takes to answer (with an error if need be). The
    /// daemon bounds its engine listing for `status` at 15 s; a `reconcile`
    /// waits for the running one and then its own, pulls included.
    pub fn default_timeout(&self) -> Duration {
        match self {
            Request::Status => Duration::from_secs(60),
            Request::Reconcile => Duration::from_secs(30 * 60),
            Request::Hold { .. } => Duration::from_secs(10),
        }
    }
}

/// Sends one request to the daemon at `path` and reads its answer, waiting
/// at most [`Request::default_timeout`] (tests; stowage's commands give
/// their own timeout to [`request_within`]).
#[cfg(any(test, feature = "testkit"))]
pub async fn request(path: &Path, request: &Request) -> Result<Response, ClientError> {
    request_within(path, request, request.default_timeout()).await
}

/// Sends one request and reads its answer; the whole exchange (connect,
/// write, answer) ends after `timeout` with [`ClientError::TimedOut`].
pub async fn request_within(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    match tokio::time::timeout(timeout, exchange(path, request)).await {
        Ok(answer) => answer,
        Err(_) => Err(ClientError::TimedOut {
            path: path.to_path_buf(),
            request: request.name(),
            after: timeout,
            hint: match request {
                Request::Reconcile => {
                    " the reconcile may still run: see `stowage status` and `stowage history`"
                }
                Request::Status | Request::Hold { .. } => "",
            },
        }),
    }
}

async fn exchange(path: &Path, request: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).await.map_err(|source| {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        match source.kind() {
            NotFound | ConnectionRefused => ClientError::NoDaemon {
                path: path.to_path_buf(),
                source,
            },
            _ => io(source),
        }
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol {
            path: path.to_path_buf(),
            message: "the daemon closed the connection without answering (shutting down?)".into(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"reconcile"}"#).unwrap(),
            Request::Reconcile
        );
        let e = Response::Error {
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"response":"error","message":"x"}"#
        );
    }

    struct Echo;
    impl Handler for Echo {
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

    #[tokio::test]
    async fn round_trip_stale_socket_and_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        // A stale socket file from a crashed daemon is replaced.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(ControlError::AlreadyRunning(_))));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, path.clone(), Arc::new(Echo), stop.clone()));
        let answer = request(&path, &Request::Reconcile).await.unwrap();
        assert_eq!(
            answer,
            Response::Error {
                message: "reconcile".into()
            }
        );
        // A malformed line gets an error answer, not a dropped connection.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"hello\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).await.unwrap();
        assert!(line.contains("bad request"), "{line}");
        stop.cancel();
        server.await.unwrap();
        assert!(!path.exists(), "socket file removed on shutdown");
        assert!(matches!(
            request(&path, &Request::Status).await,
            Err(ClientError::NoDaemon { .. })
        ));
    }
}
