//! The Docker engine over bollard: the one module that knows bollard.
//!
//! bollard types never leave this file; everything is mapped to the plain types
//! of [`super`]. Two endpoints go around bollard through a tiny raw HTTP/1.0
//! client ([`DockerEngine::raw_json`]) because bollard 0.21 only models the
//! newest API shape of them: `GET /system/df` (API < 1.52 answers `LayersSize`,
//! `Images`, `BuildCache`, which bollard's struct drops) and `POST /build/prune`
//! (API < 1.48 reads `keep-storage`, which bollard cannot send).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, EventsOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, PushImageOptionsBuilder,
    RemoveImageOptionsBuilder, TagImageOptionsBuilder,
};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    BoxStream, Container, Credentials, DiskUsage, Engine, EngineError, EngineInfo, EngineResult,
    Event, Image, Layer, Progress, Removed,
};

/// The engine's address when neither an explicit URI nor `DOCKER_HOST` is given.
const DEFAULT_ADDRESS: &str = "unix:///var/run/docker.sock";
/// Connecting must fail fast: a daemon that cannot reach its engine says so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds the wait for response headers (not for streamed bodies). Loading a
/// large archive answers only once it is read, so this is generous.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

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
}

impl DockerEngine {
    /// Connects to `uri`, else `DOCKER_HOST`, else the local socket; negotiates
    /// the API version down to the engine's and pings it.
    ///
    /// Accepts `unix:///path`, a bare `/path`, `tcp://host:port` and
    /// `http://host:port`.
    pub async fn connect(uri: Option<&str>) -> EngineResult<DockerEngine> {
        let address = resolve_address(uri);
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
            .map_err(|e| unreachable(chain(&e)))?;
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
            .map_err(|e| unreachable(chain(&e)))?;
            (docker, Endpoint::Tcp(host.to_owned()))
        } else {
            return Err(unreachable(
                "unsupported address (use unix:///PATH, tcp://HOST:PORT or http://HOST:PORT)"
                    .to_owned(),
            ));
        };

        // bollard speaks the newest API by default; older engines (20.10 is
        // 1.41) reject that, so settle on the engine's version first.
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(root_cause(&e)))?;
        docker
            .ping()
            .await
            .map_err(|e| unreachable(root_cause(&e)))?;
        let docker = docker.with_timeout(REQUEST_TIMEOUT);
        Ok(DockerEngine {
            docker,
            address,
            endpoint,
        })
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
            err => EngineError::Other(format!("{what}: {}", chain(&err))),
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
                message: redact(&one_line(&message), credentials),
            },
            err => EngineError::Registry {
                reference: reference.to_owned(),
                message: redact(&chain(&err), credentials),
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
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.error(e, "list containers"))?;
        Ok(containers.into_iter().map(container_of).collect())
    }

    /// Sends one request without bollard and parses the JSON answer. HTTP/1.0
    /// keeps the answer unchunked and ends it by closing the connection.
    async fn raw_json(&self, method: &str, path: &str) -> EngineResult<serde_json::Value> {
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
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
            .map_err(unreachable)?;

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
                .map_or_else(|| one_line(body), str::to_owned);
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

/// The error and its sources on one line, each cause once.
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
    one_line(&out)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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
            .docker
            .list_images(Some(options))
            .await
            .map_err(|e| self.error(e, "list images"))?;
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
            .raw_json("GET", &format!("/images/{reference}/json"))
            .await
        {
            Ok(v) => Ok(v["Id"].as_str().map(str::to_owned)),
            Err(EngineError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn tags_of(&self, image_id: &str) -> EngineResult<Option<Vec<String>>> {
        // One inspect, not a listing of every image: this runs per removal.
        match self
            .raw_json("GET", &format!("/images/{image_id}/json"))
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
        let items = self
            .docker
            .remove_image(reference, Some(options), None)
            .await
            .map_err(|e| self.error(e, &format!("remove {reference}")))?;
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
        self.docker
            .tag_image(source, Some(options))
            .await
            .map_err(|e| self.error(e, &format!("tag {source} as {target}")))
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
        let mut stream =
            self.docker
                .create_image(Some(options.build()), None, docker_credentials(credentials));
        while let Some(message) = stream.next().await {
            let info = message.map_err(|e| self.registry_error(e, reference, credentials))?;
            // bollard only turns `errorDetail` into an error; a bare `error`
            // would otherwise pass as progress.
            if let Some(detail) = info.error_detail {
                return Err(EngineError::Registry {
                    reference: reference.to_owned(),
                    message: redact(&one_line(&detail.message.unwrap_or_default()), credentials),
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
        let mut stream =
            self.docker
                .push_image(name, Some(options), docker_credentials(credentials));
        while let Some(message) = stream.next().await {
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
                    message: redact(&one_line(&detail.message.unwrap_or_default()), credentials),
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
            .docker
            .inspect_registry_image(reference, docker_credentials(credentials))
            .await
            .map_err(|e| self.registry_error(e, reference, credentials))?;
        inspect
            .descriptor
            .digest
            .ok_or_else(|| EngineError::Registry {
                reference: reference.to_owned(),
                message: "the registry answered without a digest".to_owned(),
            })
    }

    async fn load(&self, archive: Bytes) -> EngineResult<Vec<String>> {
        let options = ImportImageOptionsBuilder::new().quiet(true).build();
        let mut stream = self
            .docker
            .import_image(options, bollard::body_full(archive), None);
        let mut loaded = Vec::new();
        while let Some(message) = stream.next().await {
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

    async fn save(&self, references: &[String]) -> EngineResult<Bytes> {
        let names: Vec<&str> = references.iter().map(String::as_str).collect();
        let chunks: Vec<Bytes> = self
            .docker
            .export_images(&names)
            .try_collect()
            .await
            .map_err(|e| self.error(e, &format!("save {}", references.join(" "))))?;
        Ok(Bytes::from(chunks.concat()))
    }

    fn events(&self) -> BoxStream<'_, EngineResult<Event>> {
        let filters = HashMap::from([("type", vec!["container", "image"])]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        let stream = self.docker.events(Some(options)).map(move |message| {
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
        Box::pin(stream)
    }

    async fn image_layers(&self, id: &str) -> EngineResult<Vec<Layer>> {
        let inspect = self.raw_json("GET", &format!("/images/{id}/json")).await?;
        let history = self
            .raw_json("GET", &format!("/images/{id}/history"))
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
        let info = self.raw_json("GET", "/info").await?;
        let version = self.raw_json("GET", "/version").await?;
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

    async fn disk_usage(&self) -> EngineResult<DiskUsage> {
        let df = self.raw_json("GET", "/system/df").await?;
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
        let answer = self.raw_json("POST", &path).await?;
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
