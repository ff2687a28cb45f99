//! Podman's service (`podman system service`) behind the Docker API: how it
//! is told apart, and the few calls it answers its own way.
//!
//! - Names: Podman lists full names (`docker.io/library/nginx:1.25`) and
//!   names what is built or loaded here `localhost/…`. Names going out are
//!   shown in Docker's short form ([`refs::familiar`]: `nginx:1.25`, as
//!   dockerd lists the same image); names coming in get their registry back
//!   ([`refs::qualified`]), so that Podman's own short-name rules (its
//!   `containers.conf`) never decide what a reference means.
//! - Containers: the libpod listing with `external=true`, so that Buildah's
//!   working containers (state `storage`), which the Docker listing leaves
//!   out, protect their images too. Pods' infra containers are in both.
//! - Pulls and pushes: the libpod endpoints, which take `tlsVerify`; the
//!   Docker ones take no TLS option, and Podman, unlike dockerd, does not
//!   talk plain HTTP to loopback registries unasked. `tlsVerify=false` goes
//!   only with a loopback registry (the content store's endpoint), as
//!   dockerd treats `127.0.0.0/8`; any other follows Podman's
//!   `registries.conf`.
//! - No `/distribution/…/json` (registry digests) and no build cache: the
//!   callers are told [`EngineError::Unsupported`].

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::deadline::CallGuard;
use super::messages::{one_line, redact};
use super::{DockerEngine, Endpoint};
use crate::engine::{Container, Credentials, EngineError, EngineKind, EngineResult, Progress};
use crate::refs;

/// The longest line of a libpod answer read; a progress line is short.
const LINE_MAX: usize = 1 << 20;
/// The most of an error answer's body read.
const ERROR_BODY_MAX: usize = 64 << 10;

/// Docker or Podman, and Podman's libpod API version (`4.3.1`), from the
/// engine's `/version`: Podman names a "Podman Engine" among its
/// `Components`.
pub(super) fn kind_of(version: &bollard::models::SystemVersion) -> (EngineKind, String) {
    let podman = version
        .components
        .iter()
        .flatten()
        .find(|c| c.name == "Podman Engine");
    match podman {
        Some(c) => {
            let api = c
                .details
                .as_ref()
                .and_then(|d| d.get("APIVersion"))
                .filter(|v| !v.is_empty())
                .unwrap_or(&c.version);
            (EngineKind::Podman, api.clone())
        }
        None => (EngineKind::Docker, String::new()),
    }
}

impl DockerEngine {
    /// A name the engine listed, as stowage shows it.
    pub(super) fn name_out(&self, name: String) -> String {
        match self.kind {
            EngineKind::Docker => name,
            EngineKind::Podman => match refs::familiar(&name) {
                std::borrow::Cow::Borrowed(n) if n.len() == name.len() => name,
                short => short.into_owned(),
            },
        }
    }

    pub(super) fn names_out(&self, names: Vec<String>) -> Vec<String> {
        names.into_iter().map(|n| self.name_out(n)).collect()
    }

    /// An image's `RepoTags` as stowage shows them. Podman lists the name
    /// an image was pulled by digest under (`repo@sha256:…`) among its
    /// tags too; it is in `RepoDigests` as well, and is no tag.
    pub(super) fn tags_out(&self, names: Vec<String>) -> Vec<String> {
        let mut names = self.names_out(names);
        if self.kind == EngineKind::Podman {
            names.retain(|n| !n.contains('@'));
        }
        names
    }

    /// A name (or image id) stowage hands the engine, as it must read it.
    pub(super) fn name_in<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        match self.kind {
            EngineKind::Docker => std::borrow::Cow::Borrowed(name),
            EngineKind::Podman => refs::qualified(name),
        }
    }

    /// Podman's events logger (`journald`, `file`, `none`) from its libpod
    /// info: with `none` its event stream stays silent. `None` on Docker
    /// or when Podman does not say.
    pub async fn event_logger(&self) -> Option<String> {
        if self.kind != EngineKind::Podman {
            return None;
        }
        let info = self
            .raw_json_at("GET", &self.libpod("/info"), "/info", self.timeout)
            .await
            .inspect_err(|e| tracing::debug!("Podman's info: {e}"))
            .ok()?;
        info["host"]["eventLogger"].as_str().map(str::to_owned)
    }

    /// `/v<libpod API>/libpod<path>`.
    fn libpod(&self, path: &str) -> String {
        format!("/v{}/libpod{path}", self.libpod_api)
    }
}

/// An image id as Docker writes it (`sha256:<hex>`): Podman's libpod
/// answers, its events and its removal answers give the bare hex.
pub(super) fn image_id(id: &str) -> String {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("sha256:{id}")
    } else {
        id.to_owned()
    }
}

/// How often a Podman listing that raced a removal is asked again.
const RACED_RETRIES: usize = 3;

/// `call`, asked again (up to [`RACED_RETRIES`] more times) while Podman
/// answers it with an object it was describing gone: its listings fail
/// whole, with a 500, when another client removes an image or container
/// meanwhile. Docker's answers are taken as they come.
pub(super) async fn again<T, F, Fut>(engine: &DockerEngine, call: F) -> EngineResult<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = EngineResult<T>>,
{
    let mut answer = call().await;
    for _ in 0..RACED_RETRIES {
        match &answer {
            Err(EngineError::Other(m)) if engine.kind == EngineKind::Podman && raced(m) => {
                tracing::debug!("asking Podman again: {m}");
                answer = call().await;
            }
            _ => break,
        }
    }
    answer
}

/// Podman's words for an image or container that went away.
fn raced(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("not known") || m.contains("no such")
}

/// Every container Podman knows, in any state, Buildah's included.
pub(super) async fn containers(engine: &DockerEngine) -> EngineResult<Vec<Container>> {
    let path = "/containers/json?all=true&external=true";
    let versioned = engine.libpod(path);
    let list = again(engine, || {
        engine.raw_json_at("GET", &versioned, path, engine.timeout)
    })
    .await?;
    Ok(list
        .as_array()
        .map(|a| a.iter().map(|c| container_of(engine, c)).collect())
        .unwrap_or_default())
}

/// One entry of the libpod container listing.
fn container_of(engine: &DockerEngine, c: &serde_json::Value) -> Container {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    Container {
        id: text(&c["Id"]),
        name: c["Names"]
            .as_array()
            .and_then(|n| n.first())
            .map(|n| text(n).trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        image_id: image_id(c["ImageID"].as_str().unwrap_or_default()),
        image: engine.name_out(text(&c["Image"])),
        state: text(&c["State"]),
    }
}

/// `application/x-www-form-urlencoded` of `pairs` (for query strings).
fn query(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        out.push(if out.is_empty() { '?' } else { '&' });
        for (i, part) in [k, v].into_iter().enumerate() {
            if i == 1 {
                out.push('=');
            }
            for b in part.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    out.push(char::from(b));
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}

/// The `X-Registry-Auth` header value, as the Docker CLI and bollard send it.
fn auth_header(credentials: Option<&Credentials>) -> Option<String> {
    let c = credentials?;
    let json = serde_json::json!({
        "username": c.username,
        "password": c.password,
        "identitytoken": c.identity_token,
        "serveraddress": c.server,
    });
    Some(base64::engine::general_purpose::URL_SAFE.encode(json.to_string()))
}

/// Whether `reference`'s registry is this host's loopback. A bare
/// `localhost` is Podman's name for local images, not a registry.
fn on_loopback(reference: &str) -> bool {
    let (repository, _) = refs::split_tag(reference.split('@').next().unwrap_or(reference));
    let registry = refs::registry_of(repository);
    registry != "localhost" && refs::is_loopback_registry(registry)
}

pub(super) async fn pull(
    engine: &DockerEngine,
    reference: &str,
    platform: Option<&str>,
    credentials: Option<&Credentials>,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
    idle: Duration,
) -> EngineResult<()> {
    let name = engine.name_in(reference);
    // `always`: a digest the engine holds under another name is still
    // named here, as dockerd's pull does.
    let mut pairs = vec![
        ("reference", name.as_ref()),
        ("policy", "always"),
        ("quiet", "false"),
    ];
    if on_loopback(&name) {
        pairs.push(("tlsVerify", "false"));
    }
    let parts: Vec<&str> = platform.map(|p| p.split('/').collect()).unwrap_or_default();
    for (key, value) in ["os", "arch", "variant"].into_iter().zip(&parts) {
        pairs.push((key, value));
    }
    let path = engine.libpod(&format!("/images/pull{}", query(&pairs)));
    let call = format!("pull {reference}");
    lines(
        engine,
        &path,
        credentials,
        reference,
        &call,
        idle,
        on_progress,
    )
    .await
}

pub(super) async fn push(
    engine: &DockerEngine,
    reference: &str,
    credentials: Option<&Credentials>,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
    idle: Duration,
) -> EngineResult<()> {
    let name = engine.name_in(reference);
    let mut pairs = vec![("destination", name.as_ref()), ("quiet", "false")];
    if on_loopback(&name) {
        pairs.push(("tlsVerify", "false"));
    }
    let path = engine.libpod(&format!("/images/{name}/push{}", query(&pairs)));
    let call = format!("push {reference}");
    lines(
        engine,
        &path,
        credentials,
        reference,
        &call,
        idle,
        on_progress,
    )
    .await
}

/// One `POST` whose answer is JSON lines (`{"stream": …}` as it goes,
/// `{"error": …}` when it fails), each next line due within `idle`.
async fn lines(
    engine: &DockerEngine,
    path: &str,
    credentials: Option<&Credentials>,
    reference: &str,
    call: &str,
    idle: Duration,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
) -> EngineResult<()> {
    let mut request = format!("POST {path} HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n");
    if let Some(auth) = auth_header(credentials) {
        request.push_str(&format!("X-Registry-Auth: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let guard = engine.calls.start(call, idle);
    let unreachable = |e: std::io::Error| EngineError::Unreachable {
        address: engine.address.clone(),
        message: e.to_string(),
    };
    let registry = |message: &str| EngineError::Registry {
        reference: reference.to_owned(),
        message: one_line(&redact(message, credentials)),
    };
    let mut on_line = |line: &serde_json::Value| -> EngineResult<()> {
        if let Some(error) = line["error"].as_str() {
            return Err(registry(error));
        }
        if let Some(text) = line["stream"].as_str() {
            on_progress(&Progress {
                id: None,
                status: text.trim().to_owned(),
                current: None,
                total: None,
            });
        }
        Ok(())
    };
    let read = Reader {
        guard: &guard,
        idle,
    };
    let answer = match &engine.endpoint {
        Endpoint::Unix(socket) => match read.open(tokio::net::UnixStream::connect(socket)).await {
            Ok(stream) => read.exchange(stream, &request, &mut on_line).await,
            Err(e) => Err(e),
        },
        Endpoint::Tcp(host) => match read.open(tokio::net::TcpStream::connect(host)).await {
            Ok(stream) => read.exchange(stream, &request, &mut on_line).await,
            Err(e) => Err(e),
        },
        Endpoint::Tls(host, client) => match read.open(client.stream(host)).await {
            Ok(stream) => read.exchange(stream, &request, &mut on_line).await,
            Err(e) => Err(e),
        },
    };
    match answer {
        Ok(Answer::Done) => Ok(()),
        Ok(Answer::Refused { status, body }) => {
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            let message = value["message"].as_str().unwrap_or(&text);
            Err(match status {
                // A push of an image the engine does not have.
                404 => EngineError::NotFound(one_line(message)),
                _ => registry(message),
            })
        }
        Err(Failure::Io(e)) => Err(unreachable(e)),
        Err(Failure::Quiet) => Err(DockerEngine::timed_out(call, idle)),
        Err(Failure::Engine(e)) => Err(e),
        Err(Failure::Malformed(what)) => Err(EngineError::Other(format!("{call}: {what}"))),
    }
}

/// How a streamed answer ended.
enum Answer {
    Done,
    /// A status other than 2xx, with (up to [`ERROR_BODY_MAX`] of) its body.
    Refused {
        status: u16,
        body: Vec<u8>,
    },
}

enum Failure {
    Io(std::io::Error),
    /// No byte within the idle deadline.
    Quiet,
    Engine(EngineError),
    Malformed(&'static str),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

/// Reads a streamed answer, each read due within `idle`.
struct Reader<'a> {
    guard: &'a CallGuard,
    idle: Duration,
}

impl Reader<'_> {
    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        self.guard.renew(self.idle);
        tokio::time::timeout(self.idle, fut).await
    }

    /// The connection, within the idle deadline.
    async fn open<S>(
        &self,
        connect: impl std::future::Future<Output = std::io::Result<S>>,
    ) -> Result<S, Failure> {
        Ok(self.within(connect).await.map_err(|_| Failure::Quiet)??)
    }

    /// Sends `request` and hands each JSON line of a 2xx answer to
    /// `on_line` as it arrives. HTTP/1.0: the body is neither chunked nor
    /// sized; it ends when the engine closes the connection.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        request: &str,
        on_line: &mut (dyn FnMut(&serde_json::Value) -> EngineResult<()> + Send),
    ) -> Result<Answer, Failure> {
        self.within(stream.write_all(request.as_bytes()))
            .await
            .map_err(|_| Failure::Quiet)??;
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        let mut chunk = vec![0u8; 16 << 10];
        let mut status = None;
        loop {
            let n = self
                .within(stream.read(&mut chunk))
                .await
                .map_err(|_| Failure::Quiet)??;
            buf.extend_from_slice(&chunk[..n]);
            if status.is_none() {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if n == 0 {
                        return Err(Failure::Malformed("the engine closed before answering"));
                    }
                    if buf.len() > LINE_MAX {
                        return Err(Failure::Malformed("an answer head beyond 1 MiB"));
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let code: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or(Failure::Malformed("no status in the answer"))?;
                buf.drain(..end + 4);
                status = Some(code);
            }
            let code = status.unwrap_or_default();
            if !(200..300).contains(&code) {
                if n == 0 || buf.len() >= ERROR_BODY_MAX {
                    buf.truncate(ERROR_BODY_MAX);
                    return Ok(Answer::Refused {
                        status: code,
                        body: buf,
                    });
                }
                continue;
            }
            while let Some(at) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                handle(&line, on_line)?;
            }
            if n == 0 {
                handle(&buf, on_line)?;
                return Ok(Answer::Done);
            }
            if buf.len() > LINE_MAX {
                return Err(Failure::Malformed("an answer line beyond 1 MiB"));
            }
        }
    }
}

fn handle(
    line: &[u8],
    on_line: &mut (dyn FnMut(&serde_json::Value) -> EngineResult<()> + Send),
) -> Result<(), Failure> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Ok(());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| Failure::Malformed("an answer line not JSON"))?;
    on_line(&value).map_err(Failure::Engine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn version(components: &[(&str, &[(&str, &str)])]) -> bollard::models::SystemVersion {
        bollard::models::SystemVersion {
            components: Some(
                components
                    .iter()
                    .map(|(name, details)| bollard::models::SystemVersionComponents {
                        name: (*name).to_owned(),
                        version: "4.3.1".to_owned(),
                        details: Some(
                            details
                                .iter()
                                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                                .collect::<HashMap<_, _>>(),
                        ),
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn podman_is_told_by_its_engine_component() {
        let podman = version(&[
            ("Podman Engine", &[("APIVersion", "4.3.1")]),
            ("Conmon", &[]),
        ]);
        assert_eq!(kind_of(&podman), (EngineKind::Podman, "4.3.1".to_owned()));
        let docker = version(&[("Engine", &[("ApiVersion", "1.41")]), ("containerd", &[])]);
        assert_eq!(kind_of(&docker), (EngineKind::Docker, String::new()));
        let bare = bollard::models::SystemVersion::default();
        assert_eq!(kind_of(&bare).0, EngineKind::Docker);
    }

    #[test]
    fn raced_listings_are_told_by_their_words() {
        assert!(raced(
            "list images: Docker responded with status code 500: retrieving label for image \"e6\": image not known"
        ));
        assert!(raced("GET /containers/json: 500 no such container"));
        assert!(!raced("GET /containers/json: 500 database is locked"));
    }

    #[test]
    fn libpod_ids_get_their_algorithm() {
        let hex = "a".repeat(64);
        assert_eq!(image_id(&hex), format!("sha256:{hex}"));
        assert_eq!(image_id(&format!("sha256:{hex}")), format!("sha256:{hex}"));
        assert_eq!(image_id(""), "");
    }

    #[test]
    fn only_loopback_registries_skip_tls_verification() {
        assert!(on_loopback("127.0.0.1:41234/team/app@sha256:abc"));
        assert!(on_loopback("[::1]:5000/app:v1"));
        assert!(!on_loopback("docker.io/library/nginx:1.25"));
        assert!(!on_loopback("registry.example.com/app:v1"));
        assert!(!on_loopback("10.0.0.5:5000/app:v1"));
        assert!(!on_loopback("localhost/team/app:v1"));
        assert!(on_loopback("localhost:5000/team/app:v1"));
    }

    #[test]
    fn query_strings_are_encoded() {
        assert_eq!(
            query(&[
                ("reference", "127.0.0.1:5000/a/b@sha256:0f"),
                ("os", "linux")
            ]),
            "?reference=127.0.0.1%3A5000%2Fa%2Fb%40sha256%3A0f&os=linux"
        );
    }

    #[test]
    fn registry_auth_is_the_cli_header() {
        let creds = Credentials {
            username: Some("me".into()),
            password: Some("pw".into()),
            identity_token: None,
            server: "127.0.0.1:5000".into(),
        };
        let header = auth_header(Some(&creds)).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE
            .decode(header)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["username"], "me");
        assert_eq!(v["serveraddress"], "127.0.0.1:5000");
        assert!(auth_header(None).is_none());
    }
}
