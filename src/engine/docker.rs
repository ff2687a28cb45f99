//! The Docker engine over bollard: the one module that knows bollard.
//!
//! bollard types never leave this file; everything is mapped to the plain types
//! of [`super`]. Two endpoints go around bollard through a tiny raw HTTP/1.0
//! client ([`DockerEngine::raw_json`]) because bollard 0.21 only models the
//! newest API shape of them: `GET /system/df` (API < 1.52 answers `LayersSize`,
//! `Images`, `BuildCache`, which bollard's struct drops) and `POST /build/prune`
//! (API < 1.48 reads `keep-storage`, which bollard cannot send).
//!
//! Every call has a deadline that covers the whole answer, body included
//! (bollard's own timeout covers only the wait for headers), and a streamed
//! answer must deliver each next item within one; a missed deadline is
//! [`EngineError::Timeout`] naming the call. Calls in flight are tracked so
//! that the daemon's watchdog can tell a call that outlived its deadline.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, PushImageOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    BoxStream, Container, Credentials, DiskUsage, Engine, EngineError, EngineInfo, EngineResult,
    Event, Image, Layer, Progress, Removed, StuckCall,
};
use crate::fmt::one_line;

/// The engine's address when neither an explicit URI nor `DOCKER_HOST` is given.
const DEFAULT_ADDRESS: &str = "unix:///var/run/docker.sock";
/// Connecting must fail fast: a daemon that cannot reach its engine says so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds bollard's wait for response headers. Loading a large archive
/// answers only once it is read, so this is generous; everything else is
/// bounded tighter by [`CALL_TIMEOUT`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Deadline of one engine call, answer body included, and the longest quiet
/// gap inside a streamed answer. Removals, build-cache prunes, `system df`,
/// loads and saves may legitimately take [`SLOW_FACTOR`] times longer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Overrides [`CALL_TIMEOUT`] (a duration: `30s`, `5m`), for tests of hung
/// engines and for hosts whose engine is known to be slow.
pub const TIMEOUT_VAR: &str = "STOWAGE_ENGINE_TIMEOUT";
const SLOW_FACTOR: u32 = 5;
/// Longest quiet gap between two progress messages of a pull or push. The
/// transfer's stall watchdog (`daemon.stall_timeout`) abandons them first;
/// this only bounds a caller without one.
const TRANSFER_IDLE: Duration = Duration::from_secs(3600);
/// How far past its deadline a call counts as stuck: the timer has fired by
/// then unless something blocks the runtime.
const STUCK_SLACK: Duration = Duration::from_secs(5);

/// Where the engine listens, parsed from the address.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(String),
    /// `host:port`.
    Tcp(String),
}

/// A Docker engine reached over its API socket.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
    /// The address as given (or resolved), for messages.
    address: String,
    /// The same endpoint, for the raw requests bollard cannot express.
    endpoint: Endpoint,
    /// [`CALL_TIMEOUT`] or its override.
    timeout: Duration,
    /// Calls in flight, shared by clones.
    calls: Calls,
}

/// Engine calls in flight with their deadlines.
#[derive(Debug, Default)]
struct InFlight {
    next: u64,
    calls: HashMap<u64, (String, Instant)>,
}

#[derive(Debug, Clone, Default)]
struct Calls(Arc<Mutex<InFlight>>);

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        // Plain bookkeeping: a panic elsewhere does not make it wrong.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `call`, due within `within`; it is done when the guard drops.
    fn start(&self, call: &str, within: Duration) -> CallGuard {
        let mut g = self.lock();
        let id = g.next;
        g.next += 1;
        g.calls
            .insert(id, (call.to_owned(), Instant::now() + within));
        CallGuard {
            calls: self.clone(),
            id,
        }
    }

    /// The call furthest past its deadline by more than `slack`.
    fn overdue(&self, slack: Duration) -> Option<StuckCall> {
        let now = Instant::now();
        self.lock()
            .calls
            .values()
            .filter(|(_, due)| now > *due + slack)
            .min_by_key(|(_, due)| *due)
            .map(|(call, due)| StuckCall {
                call: call.clone(),
                overdue: now - *due,
            })
    }
}

/// One call in flight; dropping it (done, failed or cancelled) ends it.
struct CallGuard {
    calls: Calls,
    id: u64,
}

impl CallGuard {
    /// A streamed answer delivered an item: the next is due within `within`.
    fn renew(&self, within: Duration) {
        if let Some(c) = self.calls.lock().calls.get_mut(&self.id) {
            c.1 = Instant::now() + within;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls.lock().calls.remove(&self.id);
    }
}

/// [`CALL_TIMEOUT`], or the duration in [`TIMEOUT_VAR`].
fn call_timeout() -> EngineResult<Duration> {
    match std::env::var(TIMEOUT_VAR) {
        Ok(v) if !v.trim().is_empty() => humantime::parse_duration(v.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                EngineError::Other(format!(
                    "{TIMEOUT_VAR}={v:?} is not a duration above zero (e.g. 30s, 5m)"
                ))
            }),
        _ => Ok(CALL_TIMEOUT),
    }
}

impl DockerEngine {
    /// Connects to `uri`, else `DOCKER_HOST`, else the local socket; negotiates
    /// the API version down to the engine's and pings it.
    ///
    /// Accepts `unix:///path`, a bare `/path`, `tcp://host:port` and
    /// `http://host:port`.
    pub async fn connect(uri: Option<&str>) -> EngineResult<DockerEngine> {
        let address = resolve_address(uri);
        let timeout = call_timeout()?;
        let unreachable = |message: String| EngineError::Unreachable {
            address: address.clone(),
            message,
        };

        let (docker, endpoint) = if let Some(path) = address
            .strip_prefix("unix://")
            .or_else(|| address.starts_with('/').then_some(address.as_str()))
        {
            // bollard checks that the socket exists; give a plain message.
            if !std::path::Path::new(path).exists() {
                return Err(unreachable(format!("no socket at {path}")));
            }
            let docker = Docker::connect_with_unix(
                path,
                CONNECT_TIMEOUT.as_secs(),
                bollard::API_DEFAULT_VERSION,
            )
            .map_err(|e| unreachable(one_line(&chain(&e))))?;
            (docker, Endpoint::Unix(path.to_owned()))
        } else if let Some(host) = address
            .strip_prefix("tcp://")
            .or_else(|| address.strip_prefix("http://"))
        {
            let host = host.trim_end_matches('/');
            let docker = Docker::connect_with_http(
                &format!("tcp://{host}"),
                CONNECT_TIMEOUT.as_secs(),
                bollard::API_DEFAULT_VERSION,
            )
            .map_err(|e| unreachable(one_line(&chain(&e))))?;
            (docker, Endpoint::Tcp(host.to_owned()))
        } else {
            return Err(unreachable(
                "unsupported address (use unix:///PATH, tcp://HOST:PORT or http://HOST:PORT)"
                    .to_owned(),
            ));
        };

        // bollard speaks the newest API by default; older engines (20.10 is
        // 1.41) reject that, so settle on the engine's version first.
        // Bounded whole: an engine that sends headers and then nothing must
        // not hold a connection attempt (bollard bounds only the headers).
        let handshake = async {
            let docker = docker
                .negotiate_version()
                .await
                .map_err(|e| unreachable(root_cause(&e)))?;
            docker
                .ping()
                .await
                .map_err(|e| unreachable(root_cause(&e)))?;
            Ok(docker)
        };
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .unwrap_or_else(|_| {
                Err(unreachable(format!(
                    "no answer to version and ping within {}",
                    humantime::format_duration(CONNECT_TIMEOUT)
                )))
            })?;
        let docker = docker.with_timeout(REQUEST_TIMEOUT);
        Ok(DockerEngine {
            docker,
            address,
            endpoint,
            timeout,
            calls: Calls::default(),
        })
    }

    /// The deadline of calls that may legitimately take long.
    fn slow(&self) -> Duration {
        self.timeout * SLOW_FACTOR
    }

    fn timed_out(call: &str, after: Duration) -> EngineError {
        EngineError::Timeout {
            call: call.to_owned(),
            after,
        }
    }

    /// Runs one whole call (answer body included) within `within`.
    async fn bounded<T>(
        &self,
        call: &str,
        within: Duration,
        fut: impl Future<Output = EngineResult<T>>,
    ) -> EngineResult<T> {
        let _in_flight = self.calls.start(call, within);
        tokio::time::timeout(within, fut)
            .await
            .unwrap_or_else(|_| Err(Self::timed_out(call, within)))
    }

    /// The next item of a streamed answer, due within `within`.
    async fn next_within<S: Stream + Unpin>(
        stream: &mut S,
        guard: &CallGuard,
        call: &str,
        within: Duration,
    ) -> EngineResult<Option<S::Item>> {
        guard.renew(within);
        tokio::time::timeout(within, stream.next())
            .await
            .map_err(|_| Self::timed_out(call, within))
    }

    /// The address this engine was reached at.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Maps a bollard error of a local operation on `what`.
    fn error(&self, err: BollardError, what: &str) -> EngineError {
        match err {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => EngineError::NotFound(one_line(if message.is_empty() { what } else { &message })),
            BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            } => EngineError::Conflict(one_line(&message)),
            err if is_transport(&err) => EngineError::Unreachable {
                address: self.address.clone(),
                message: root_cause(&err),
            },
            err => EngineError::Other(one_line(&format!("{what}: {}", chain(&err)))),
        }
    }

    /// Maps a bollard error of a registry operation on `reference`; the
    /// engine's message is scrubbed of any secret in `credentials`.
    fn registry_error(
        &self,
        err: BollardError,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> EngineError {
        match err {
            err if is_transport(&err) => EngineError::Unreachable {
                address: self.address.clone(),
                message: root_cause(&err),
            },
            BollardError::DockerResponseServerError { message, .. }
            | BollardError::DockerStreamError { error: message } => EngineError::Registry {
                reference: reference.to_owned(),
                message: one_line(&redact(&message, credentials)),
            },
            err => EngineError::Registry {
                reference: reference.to_owned(),
                message: one_line(&redact(&chain(&err), credentials)),
            },
        }
    }

    /// Containers in every state; with `ancestor`, filtered by the engine so
    /// the answer stays small however many containers the host has.
    async fn containers(&self, ancestor: Option<&str>) -> EngineResult<Vec<Container>> {
        let filters: std::collections::HashMap<&str, Vec<&str>> = ancestor
            .map(|a| ("ancestor", vec![a]))
            .into_iter()
            .collect();
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .bounded("list containers", self.timeout, async {
                self.docker
                    .list_containers(Some(options))
                    .await
                    .map_err(|e| self.error(e, "list containers"))
            })
            .await?;
        Ok(containers.into_iter().map(container_of).collect())
    }

    /// Sends one request without bollard and parses the JSON answer. HTTP/1.0
    /// keeps the answer unchunked and ends it by closing the connection.
    async fn raw_json(
        &self,
        method: &str,
        path: &str,
        within: Duration,
    ) -> EngineResult<serde_json::Value> {
        let version = self.docker.client_version();
        let request = format!(
            "{method} /v{}.{}{path} HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n",
            version.major_version, version.minor_version
        );
        let unreachable = |e: std::io::Error| EngineError::Unreachable {
            address: self.address.clone(),
            message: e.to_string(),
        };
        let exchange = async {
            match &self.endpoint {
                Endpoint::Unix(path) => {
                    http_exchange(tokio::net::UnixStream::connect(path).await?, &request).await
                }
                Endpoint::Tcp(host) => {
                    http_exchange(tokio::net::TcpStream::connect(host).await?, &request).await
                }
            }
        };
        let answer = self
            .bounded(&format!("{method} {path}"), within, async {
                exchange.await.map_err(unreachable)
            })
            .await?;

        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| EngineError::Other(format!("{method} {path}: malformed answer")))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        if !(200..300).contains(&status) {
            let message = value["message"]
                .as_str()
                .map_or_else(|| one_line(body), one_line);
            return Err(match status {
                404 => EngineError::NotFound(message),
                409 => EngineError::Conflict(message),
                _ => EngineError::Other(format!("{method} {path}: {status} {message}")),
            });
        }
        Ok(value)
    }
}

/// The address [`DockerEngine::connect`] uses for `uri`: itself, else
/// `DOCKER_HOST`, else the local socket (the daemon shows it while the
/// engine is unreachable).
pub fn resolve_address(uri: Option<&str>) -> String {
    match uri {
        Some(uri) => uri.to_owned(),
        None => std::env::var("DOCKER_HOST")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned()),
    }
}

async fn http_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(answer)
}

/// True for errors of the connection itself rather than of the request.
fn is_transport(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. }
            | BollardError::SocketNotFoundError(_)
            | BollardError::RequestTimeoutError
            | BollardError::HyperResponseError { .. }
    )
}

/// The innermost cause, e.g. `Connection refused (os error 111)`: the layers
/// of client wrappers above it add words, not information.
fn root_cause(err: &dyn StdError) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    one_line(&cause.to_string())
}

/// The error and its sources, each cause once (not yet [`one_line`]).
fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Replaces any secret of `credentials` that an engine message might echo.
fn redact(message: &str, credentials: Option<&Credentials>) -> String {
    let Some(credentials) = credentials else {
        return message.to_owned();
    };
    let mut out = message.to_owned();
    for secret in [&credentials.password, &credentials.identity_token]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

fn docker_credentials(credentials: Option<&Credentials>) -> Option<DockerCredentials> {
    credentials.map(|c| DockerCredentials {
        username: c.username.clone(),
        password: c.password.clone(),
        identitytoken: c.identity_token.clone(),
        serveraddress: Some(c.server.clone()),
        ..Default::default()
    })
}

/// Splits `repo[:tag]` or `repo@digest` into the name and the tag or digest.
/// A missing tag means `latest`: an empty tag would make the engine pull
/// every tag of the repository.
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    match reference.rsplit_once(':') {
        // A colon before the last `/` is a registry port, not a tag.
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (reference, "latest"),
    }
}

fn progress(
    status: Option<String>,
    id: Option<String>,
    current: Option<i64>,
    total: Option<i64>,
) -> Progress {
    Progress {
        id,
        status: status.unwrap_or_default(),
        current: current.and_then(|v| u64::try_from(v).ok()),
        total: total.and_then(|v| u64::try_from(v).ok()),
    }
}

/// Drops the `<none>:<none>` / `<none>@<none>` placeholders older engines list
/// for dangling images.
/// The strings of a JSON array (nothing for anything else).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn real_refs(refs: Vec<String>) -> Vec<String> {
    refs.into_iter()
        .filter(|r| !r.starts_with("<none>"))
        .collect()
}

/// Pair diff ids with history sizes. Sizes map onto layers in order when the
/// history has one entry per layer, or when its non-zero entries match the
/// layers one to one; otherwise the image is one pseudo-layer of `total`
/// bytes, which is exact for the image alone and only loses sharing.
fn layers_from(id: &str, diff_ids: &[&str], sizes: &[u64], total: u64) -> Vec<Layer> {
    let nonzero: Vec<u64> = sizes.iter().copied().filter(|s| *s > 0).collect();
    let mapped = if sizes.len() == diff_ids.len() {
        Some(sizes.to_vec())
    } else if nonzero.len() == diff_ids.len() {
        Some(nonzero)
    } else {
        None
    };
    let Some(mapped) = mapped.filter(|_| !diff_ids.is_empty()) else {
        return vec![Layer {
            chain_id: id.to_owned(),
            size: total,
        }];
    };
    let mut chain = String::new();
    diff_ids
        .iter()
        .zip(mapped)
        .map(|(diff, size)| {
            chain = if chain.is_empty() {
                (*diff).to_owned()
            } else {
                use sha2::{Digest, Sha256};
                format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(format!("{chain} {diff}")))
                )
            };
            Layer {
                chain_id: chain.clone(),
                size,
            }
        })
        .collect()
}

fn container_of(c: bollard::models::ContainerSummary) -> Container {
    Container {
        id: c.id.unwrap_or_default(),
        name: c
            .names
            .and_then(|names| names.into_iter().next())
            .map(|name| name.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        image_id: c.image_id.unwrap_or_default(),
        image: c.image.unwrap_or_default(),
        state: c.state.map(|s| s.to_string()).unwrap_or_default(),
    }
}

fn as_u64(value: &serde_json::Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

impl Engine for DockerEngine {
    async fn list_images(&self) -> EngineResult<Vec<Image>> {
        // `all=false`: the default list already holds dangling images;
        // `all=true` would add the intermediate parents of locally built
        // images, which cannot be removed while their children exist.
        let options = ListImagesOptionsBuilder::new().all(false).build();
        let images = self
            .bounded("list images", self.timeout, async {
                self.docker
                    .list_images(Some(options))
                    .await
                    .map_err(|e| self.error(e, "list images"))
            })
            .await?;
        Ok(images
            .into_iter()
            .map(|image| Image {
                id: image.id,
                repo_tags: real_refs(image.repo_tags),
                repo_digests: real_refs(image.repo_digests),
                created: image.created,
                size: u64::try_from(image.size).unwrap_or(0),
            })
            .collect())
    }

    async fn list_containers(&self) -> EngineResult<Vec<Container>> {
        self.containers(None).await
    }

    async fn containers_using(&self, image_id: &str) -> EngineResult<Vec<Container>> {
        // `ancestor` also matches containers of child images; only exact
        // users count here.
        let mut users = self.containers(Some(image_id)).await?;
        users.retain(|c| c.image_id == image_id);
        Ok(users)
    }

    async fn image_id_of(&self, reference: &str) -> EngineResult<Option<String>> {
        match self
            .raw_json("GET", &format!("/images/{reference}/json"), self.timeout)
            .await
        {
            Ok(v) => Ok(v["Id"].as_str().map(str::to_owned)),
            Err(EngineError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn image(&self, reference: &str) -> EngineResult<Option<Image>> {
        match self
            .raw_json("GET", &format!("/images/{reference}/json"), self.timeout)
            .await
        {
            Ok(v) => Ok(v["Id"].as_str().map(|id| Image {
                id: id.to_owned(),
                repo_tags: real_refs(strings(&v["RepoTags"])),
                repo_digests: real_refs(strings(&v["RepoDigests"])),
                created: v["Created"]
                    .as_str()
                    .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
                    .map_or(0, |c| c.timestamp()),
                size: v["Size"].as_u64().unwrap_or(0),
            })),
            Err(EngineError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn tags_of(&self, image_id: &str) -> EngineResult<Option<Vec<String>>> {
        // One inspect, not a listing of every image: this runs per removal.
        match self
            .raw_json("GET", &format!("/images/{image_id}/json"), self.timeout)
            .await
        {
            Ok(v) => {
                let tags = v["RepoTags"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Some(real_refs(tags)))
            }
            Err(EngineError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, reference: &str) -> EngineResult<Removed> {
        // Never force; keep pruning of untagged parents (the engine default).
        let options = RemoveImageOptionsBuilder::new()
            .force(false)
            .noprune(false)
            .build();
        let call = format!("remove {reference}");
        let items = self
            .bounded(&call, self.slow(), async {
                self.docker
                    .remove_image(reference, Some(options), None)
                    .await
                    .map_err(|e| self.error(e, &call))
            })
            .await?;
        let mut removed = Removed::default();
        for item in items {
            removed.untagged.extend(item.untagged);
            removed.deleted.extend(item.deleted);
        }
        Ok(removed)
    }

    async fn tag(&self, source: &str, target: &str) -> EngineResult<()> {
        let (repo, tag) = split_reference(target);
        if target.contains('@') {
            return Err(EngineError::Other(format!(
                "tag {source} as {target}: a tag target cannot be a digest"
            )));
        }
        let options = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
        let call = format!("tag {source} as {target}");
        self.bounded(&call, self.timeout, async {
            self.docker
                .tag_image(source, Some(options))
                .await
                .map_err(|e| self.error(e, &call))
        })
        .await
    }

    async fn pull(
        &self,
        reference: &str,
        platform: Option<&str>,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        let (name, tag) = split_reference(reference);
        let mut options = CreateImageOptionsBuilder::new().from_image(name).tag(tag);
        if let Some(platform) = platform {
            options = options.platform(platform);
        }
        let call = format!("pull {reference}");
        let guard = self.calls.start(&call, TRANSFER_IDLE);
        let mut stream = std::pin::pin!(self.docker.create_image(
            Some(options.build()),
            None,
            docker_credentials(credentials)
        ));
        while let Some(message) =
            Self::next_within(&mut stream, &guard, &call, TRANSFER_IDLE).await?
        {
            let info = message.map_err(|e| self.registry_error(e, reference, credentials))?;
            // bollard only turns `errorDetail` into an error; a bare `error`
            // would otherwise pass as progress.
            if let Some(detail) = info.error_detail {
                return Err(EngineError::Registry {
                    reference: reference.to_owned(),
                    message: one_line(&redact(&detail.message.unwrap_or_default(), credentials)),
                });
            }
            let (current, total) = info
                .progress_detail
                .map_or((None, None), |p| (p.current, p.total));
            on_progress(&progress(info.status, info.id, current, total));
        }
        Ok(())
    }

    async fn push(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        let (name, tag) = split_reference(reference);
        let options = PushImageOptionsBuilder::new().tag(tag).build();
        let call = format!("push {reference}");
        let guard = self.calls.start(&call, TRANSFER_IDLE);
        let mut stream = std::pin::pin!(self.docker.push_image(
            name,
            Some(options),
            docker_credentials(credentials)
        ));
        while let Some(message) =
            Self::next_within(&mut stream, &guard, &call, TRANSFER_IDLE).await?
        {
            let info = message.map_err(|e| match e {
                // The local image is missing: not the registry's fault.
                BollardError::DockerResponseServerError {
                    status_code: 404,
                    message,
                } => EngineError::NotFound(one_line(&message)),
                // Older engines report a missing local image inside the stream.
                BollardError::DockerStreamError { error }
                    if error.contains("does not exist locally") =>
                {
                    EngineError::NotFound(one_line(&error))
                }
                e => self.registry_error(e, reference, credentials),
            })?;
            if let Some(detail) = info.error_detail {
                return Err(EngineError::Registry {
                    reference: reference.to_owned(),
                    message: one_line(&redact(&detail.message.unwrap_or_default(), credentials)),
                });
            }
            let (current, total) = info
                .progress_detail
                .map_or((None, None), |p| (p.current, p.total));
            on_progress(&progress(info.status, None, current, total));
        }
        Ok(())
    }

    async fn remote_digest(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> EngineResult<String> {
        let inspect = self
            .bounded(
                &format!("look up {reference} at its registry"),
                self.timeout,
                async {
                    self.docker
                        .inspect_registry_image(reference, docker_credentials(credentials))
                        .await
                        .map_err(|e| self.registry_error(e, reference, credentials))
                },
            )
            .await?;
        inspect
            .descriptor
            .digest
            .ok_or_else(|| EngineError::Registry {
                reference: reference.to_owned(),
                message: "the registry answered without a digest".to_owned(),
            })
    }

    #[cfg(feature = "testkit")]
    async fn load(&self, archive: bytes::Bytes) -> EngineResult<Vec<String>> {
        use bollard::query_parameters::ImportImageOptionsBuilder;
        let options = ImportImageOptionsBuilder::new().quiet(true).build();
        // The engine answers only once it has read the whole archive: the
        // first item may take long.
        let guard = self.calls.start("load", self.slow());
        let mut stream = std::pin::pin!(self.docker.import_image(
            options,
            bollard::body_full(archive),
            None
        ));
        let mut loaded = Vec::new();
        while let Some(message) =
            Self::next_within(&mut stream, &guard, "load", self.slow()).await?
        {
            let info = message.map_err(|e| self.error(e, "load"))?;
            let Some(text) = info.stream else { continue };
            for line in text.lines() {
                // `Loaded image ID:` first: `Loaded image:` is its prefix.
                if let Some(id) = line.strip_prefix("Loaded image ID:") {
                    loaded.push(id.trim().to_owned());
                } else if let Some(reference) = line.strip_prefix("Loaded image:") {
                    loaded.push(reference.trim().to_owned());
                }
            }
        }
        Ok(loaded)
    }

    #[cfg(feature = "testkit")]
    async fn save(&self, references: &[String]) -> EngineResult<bytes::Bytes> {
        let names: Vec<&str> = references.iter().map(String::as_str).collect();
        let call = format!("save {}", references.join(" "));
        let guard = self.calls.start(&call, self.slow());
        let mut stream = std::pin::pin!(self.docker.export_images(&names));
        let mut chunks = Vec::new();
        while let Some(chunk) = Self::next_within(&mut stream, &guard, &call, self.slow()).await? {
            chunks.push(chunk.map_err(|e| self.error(e, &call))?);
        }
        Ok(bytes::Bytes::from(chunks.concat()))
    }

    fn events(&self) -> BoxStream<'_, EngineResult<Event>> {
        let filters = HashMap::from([("type", vec!["container", "image"])]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        let events = self.docker.events(Some(options)).map(move |message| {
            let message = message.map_err(|e| self.error(e, "events"))?;
            let actor = message.actor.unwrap_or_default();
            let kind = message.typ.map(|t| t.to_string()).unwrap_or_default();
            let image = if kind == "container" {
                actor
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("image").cloned())
            } else {
                None
            };
            Ok(Event {
                kind,
                action: message.action.unwrap_or_default(),
                id: actor.id.unwrap_or_default(),
                image,
                time: message.time.unwrap_or_default(),
            })
        });
        // A quiet stream is normal (no events for hours); a quiet engine
        // that no longer answers is not: after a quiet deadline, ping, and
        // end the stream with the ping's error.
        let state = Some(Box::pin(events));
        Box::pin(futures_util::stream::unfold(
            state,
            move |state| async move {
                let mut events = state?;
                loop {
                    match tokio::time::timeout(self.timeout, events.next()).await {
                        Ok(Some(item)) => return Some((item, Some(events))),
                        Ok(None) => return None,
                        Err(_) => {
                            if let Err(e) = self.ping().await {
                                return Some((Err(e), None));
                            }
                        }
                    }
                }
            },
        ))
    }

    async fn image_layers(&self, id: &str) -> EngineResult<Vec<Layer>> {
        let inspect = self
            .raw_json("GET", &format!("/images/{id}/json"), self.timeout)
            .await?;
        let history = self
            .raw_json("GET", &format!("/images/{id}/history"), self.timeout)
            .await?;
        let diff_ids: Vec<&str> = inspect["RootFS"]["Layers"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        // History comes newest first; entries of non-empty layers carry the
        // layer's size, empty ones 0.
        let mut sizes: Vec<u64> = history
            .as_array()
            .map(|a| a.iter().map(|h| as_u64(&h["Size"])).collect())
            .unwrap_or_default();
        sizes.reverse();
        Ok(layers_from(id, &diff_ids, &sizes, as_u64(&inspect["Size"])))
    }

    fn is_local(&self) -> bool {
        match &self.endpoint {
            Endpoint::Unix(_) => true,
            Endpoint::Tcp(host) => {
                let h = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                matches!(h, "127.0.0.1" | "localhost" | "[::1]")
            }
        }
    }

    async fn info(&self) -> EngineResult<EngineInfo> {
        let info = self.raw_json("GET", "/info", self.timeout).await?;
        let version = self.raw_json("GET", "/version", self.timeout).await?;
        Ok(EngineInfo {
            data_root: info["DockerRootDir"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            server_version: version["Version"].as_str().unwrap_or_default().to_owned(),
            api_version: version["ApiVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    async fn ping(&self) -> EngineResult<()> {
        self.bounded("ping", self.timeout, async {
            self.docker
                .ping()
                .await
                .map(|_| ())
                .map_err(|e| self.error(e, "ping"))
        })
        .await
    }

    fn stuck_call(&self) -> Option<StuckCall> {
        self.calls.overdue(STUCK_SLACK)
    }

    async fn disk_usage(&self) -> EngineResult<DiskUsage> {
        // Sizing every layer takes a while on a large host.
        let df = self.raw_json("GET", "/system/df", self.slow()).await?;
        if df.get("ImageUsage").is_some() {
            // API >= 1.52: per-kind summaries.
            return Ok(DiskUsage {
                layers_size: as_u64(&df["ImageUsage"]["TotalSize"]),
                images: as_u64(&df["ImageUsage"]["TotalCount"]),
                build_cache_size: as_u64(&df["BuildCacheUsage"]["TotalSize"]),
            });
        }
        let build_cache_size = df["BuildCache"]
            .as_array()
            .map(|records| {
                records
                    .iter()
                    // Shared records are counted by the record that owns them.
                    .filter(|r| !r["Shared"].as_bool().unwrap_or(false))
                    .map(|r| as_u64(&r["Size"]))
                    .sum()
            })
            .unwrap_or(0);
        Ok(DiskUsage {
            layers_size: as_u64(&df["LayersSize"]),
            images: df["Images"].as_array().map_or(0, |a| a.len() as u64),
            build_cache_size,
        })
    }

    async fn prune_build_cache(&self, keep_bytes: u64) -> EngineResult<u64> {
        // `keep-storage` for API < 1.48, `reserved-space` after; each engine
        // ignores the one it does not know.
        let path = format!("/build/prune?keep-storage={keep_bytes}&reserved-space={keep_bytes}");
        let answer = self.raw_json("POST", &path, self.slow()).await?;
        Ok(as_u64(&answer["SpaceReclaimed"]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_references() {
        assert_eq!(split_reference("nginx:1.25"), ("nginx", "1.25"));
        assert_eq!(split_reference("nginx"), ("nginx", "latest"));
        assert_eq!(
            split_reference("127.0.0.1:5000/team/app:v1"),
            ("127.0.0.1:5000/team/app", "v1")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/team/app"),
            ("127.0.0.1:5000/team/app", "latest")
        );
        assert_eq!(split_reference("r/app@sha256:abc"), ("r/app", "sha256:abc"));
    }

    #[test]
    fn redacts_secrets() {
        let creds = Credentials {
            username: Some("me".into()),
            password: Some("hunter2".into()),
            identity_token: None,
            server: "r".into(),
        };
        assert_eq!(
            redact("denied: bad password hunter2", Some(&creds)),
            "denied: bad password ***"
        );
        assert_eq!(redact("x", None), "x");
    }

    #[test]
    fn drops_none_placeholders() {
        assert!(real_refs(vec!["<none>:<none>".into()]).is_empty());
        assert_eq!(real_refs(vec!["a:b".into()]), vec!["a:b".to_owned()]);
    }

    #[test]
    fn a_call_past_its_deadline_is_stuck_until_it_ends() {
        let calls = Calls::default();
        let late = calls.start("list images", Duration::ZERO);
        let _fine = calls.start("remove a:1", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        let stuck = calls.overdue(Duration::ZERO).expect("one call is overdue");
        assert_eq!(stuck.call, "list images");
        assert!(calls.overdue(Duration::from_secs(3600)).is_none());
        // A streamed answer that delivered an item is due again later.
        late.renew(Duration::from_secs(3600));
        assert!(calls.overdue(Duration::ZERO).is_none());
        drop(late);
        assert_eq!(calls.lock().calls.len(), 1);
    }

    #[test]
    fn timeout_names_the_call_and_its_deadline() {
        let e = DockerEngine::timed_out("list images", Duration::from_secs(120));
        assert_eq!(
            e.to_string(),
            "the Docker engine did not finish `list images` within 2m"
        );
    }

    #[tokio::test]
    async fn unreachable_socket_is_one_line() {
        let err = DockerEngine::connect(Some("unix:///nonexistent.sock"))
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Unreachable { .. }));
        assert_eq!(
            err.to_string(),
            "cannot reach the Docker engine at unix:///nonexistent.sock: no socket at /nonexistent.sock"
        );
    }
}
