//! The Docker engine over bollard: the one module that knows bollard.
//!
//! bollard types never leave this module; everything is mapped to the plain
//! types of [`crate::engine`]. This file connects and maps each [`Engine`]
//! call to the file of its job: `images` (the local store), `transfer`
//! (pulls, pushes, registry look-ups), `events` (the event stream), `raw`
//! (the HTTP/1.0 client for the two endpoints bollard 0.21 models only in
//! their newest shape, `system df` and `build prune`, and engine info),
//! `messages` (errors as one bounded, redacted line), `deadline`, `tls`
//! (the address and TLS settings as the docker CLI reads them, the rustls
//! client, and whether registry credentials may cross the connection), and
//! `podman` (what Podman's service does its own way: names, containers,
//! pulls and pushes; the engine's [`EngineKind`] says which it is).
//!
//! Every call has a deadline that covers the whole answer, body included
//! (bollard's own timeout covers only the wait for headers), and a streamed
//! answer must deliver each next item within one; a missed deadline is
//! [`EngineError::Timeout`] naming the call. Calls in flight are tracked so
//! that the daemon's watchdog can tell a call that outlived its deadline.

mod deadline;
mod events;
mod images;
mod messages;
mod podman;
mod raw;
mod tls;
mod transfer;

use std::time::Duration;

use bollard::{ClientVersion, Docker};

use super::{
    BoxStream, Container, Credentials, DiskUsage, Engine, EngineError, EngineInfo, EngineKind,
    EngineResult, Event, Image, Layer, Progress, Removed, StuckCall,
};
use deadline::{Calls, STUCK_SLACK};
use messages::{chain, one_line, root_cause};
pub use tls::{ConnectOptions, TlsError};
use tls::{DockerEnv, Target, TlsClient};
/// Connecting must fail fast: a daemon that cannot reach its engine says so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds bollard's wait for response headers. Loading a large archive
/// answers only once it is read, so this is generous; everything else is
/// bounded tighter by [`CALL_TIMEOUT`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Deadline of one engine call, answer body included, and the longest quiet
/// gap inside a streamed answer. Removals, build-cache prunes, `system df`,
/// loads and saves may legitimately take `SLOW_FACTOR` times longer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Overrides [`CALL_TIMEOUT`] (a duration: `30s`, `5m`), for tests of hung
/// engines and for hosts whose engine is known to be slow.
pub const TIMEOUT_VAR: &str = "STOWAGE_ENGINE_TIMEOUT";
const SLOW_FACTOR: u32 = 5;

/// Where the engine listens, parsed from the address.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(String),
    /// `host:port`, plain text.
    Tcp(String),
    /// `host:port` over TLS.
    Tls(String, TlsClient),
}

impl Endpoint {
    /// A bollard client for this endpoint speaking API `version` (no I/O).
    fn client(&self, version: &ClientVersion) -> Result<Docker, String> {
        let secs = CONNECT_TIMEOUT.as_secs();
        match self {
            Endpoint::Unix(path) => {
                Docker::connect_with_unix(path, secs, version).map_err(|e| one_line(&chain(&e)))
            }
            Endpoint::Tcp(host) => {
                Docker::connect_with_http(&format!("tcp://{host}"), secs, version)
                    .map_err(|e| one_line(&chain(&e)))
            }
            Endpoint::Tls(host, client) => client.docker(host, CONNECT_TIMEOUT, version),
        }
    }

    /// Plain text to another host: what registry credentials must not cross.
    fn plaintext_remote(&self) -> bool {
        matches!(self, Endpoint::Tcp(host) if !tls::is_loopback(host))
    }
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
    /// `--allow-plaintext-credentials`: registry credentials may go to a
    /// plain `tcp://` engine on another host.
    allow_plaintext_credentials: bool,
    /// Docker or Podman, told by the engine's version at connect.
    kind: EngineKind,
    /// Podman's libpod API version (`4.3.1`) for the calls it answers only
    /// there; empty on Docker.
    libpod_api: String,
    /// `Os` and `Arch` of the version asked at connect (Go's names).
    os: String,
    arch: String,
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
    /// Connects to `uri`, else `DOCKER_HOST`, else the local socket, with
    /// TLS as the docker CLI's environment says (see [`Self::connect_with`]).
    pub async fn connect(uri: Option<&str>) -> EngineResult<DockerEngine> {
        DockerEngine::connect_with(&ConnectOptions {
            address: uri.map(str::to_owned),
            ..ConnectOptions::default()
        })
        .await
    }

    /// Connects as `options` and the docker CLI's environment say;
    /// negotiates the API version down to the engine's and pings it.
    ///
    /// Accepts `unix:///path`, a bare `/path`, `tcp://host:port` (TLS with
    /// `--tls`/`--tlsverify`, `DOCKER_TLS`/`DOCKER_TLS_VERIFY`),
    /// `https://host:port` and `http://host:port`. Certificate files are
    /// read now: a missing or unreadable one is an error naming it.
    pub async fn connect_with(options: &ConnectOptions) -> EngineResult<DockerEngine> {
        let resolved = tls::resolve(options, &DockerEnv::from_process());
        let address = match &resolved {
            Ok((address, _)) => address.clone(),
            Err(_) => options.address.clone().unwrap_or_default(),
        };
        let timeout = call_timeout()?;
        let unreachable = |message: String| EngineError::Unreachable {
            address: address.clone(),
            message,
        };
        let tls_error = |error: TlsError| EngineError::Tls {
            address: address.clone(),
            error,
        };

        let endpoint = match resolved.map_err(unreachable)?.1 {
            Target::Unix(path) => {
                // bollard checks that the socket exists; give a plain message.
                if !std::path::Path::new(&path).exists() {
                    return Err(unreachable(format!("no socket at {path}")));
                }
                Endpoint::Unix(path)
            }
            Target::Tcp(host) => Endpoint::Tcp(host),
            Target::Tls(host, files) => Endpoint::Tls(
                host.clone(),
                TlsClient::new(&host, &files).map_err(tls_error)?,
            ),
        };
        let docker = endpoint
            .client(bollard::API_DEFAULT_VERSION)
            .map_err(unreachable)?;
        // A TLS failure says which side refused what; a TLS engine reached
        // in plain text says so.
        let failed = |e: bollard::errors::Error| match &endpoint {
            Endpoint::Tls(_, client) => client
                .explain(&e)
                .map_or_else(|| unreachable(root_cause(&e)), tls_error),
            _ if wants_tls(&e) => tls_error(TlsError::EngineWantsTls),
            _ => unreachable(root_cause(&e)),
        };

        // One `/version` (unversioned, so any engine answers it) is the
        // whole handshake: it proves the engine is there, tells Docker from
        // Podman, its platform, and its API version, which bollard must
        // speak (it speaks the newest by default; 20.10 is 1.41). On 20.10
        // it takes 6-12 ms, so it is asked once, not by negotiate, ping and
        // version in turn. Bounded whole: an engine that sends headers and
        // then nothing must not hold a connection attempt (bollard bounds
        // only the headers).
        let version = tokio::time::timeout(CONNECT_TIMEOUT, docker.version())
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no answer to version within {}",
                    humantime::format_duration(CONNECT_TIMEOUT)
                ))
            })?
            .map_err(failed)?;
        let api = negotiated(&version).ok_or_else(|| {
            unreachable(format!(
                "the engine names no usable API version ({:?})",
                version.api_version
            ))
        })?;
        let docker = endpoint.client(&api).map_err(unreachable)?;
        let (kind, libpod_api) = podman::kind_of(&version);
        let (os, arch) = (
            version.os.clone().unwrap_or_default(),
            version.arch.clone().unwrap_or_default(),
        );
        let docker = docker.with_timeout(REQUEST_TIMEOUT);
        Ok(DockerEngine {
            docker,
            address,
            endpoint,
            timeout,
            calls: Calls::default(),
            allow_plaintext_credentials: options.allow_plaintext_credentials,
            kind,
            libpod_api,
            os,
            arch,
        })
    }

    /// The deadline of calls that may legitimately take long.
    fn slow(&self) -> Duration {
        self.timeout * SLOW_FACTOR
    }

    /// The address this engine was reached at.
    pub fn address(&self) -> &str {
        &self.address
    }
}

/// The API version to speak to the engine that answered `version`: its
/// own, or bollard's newest when the engine's is newer still.
fn negotiated(version: &bollard::models::SystemVersion) -> Option<ClientVersion> {
    let (major, minor) = version.api_version.as_deref()?.trim().split_once('.')?;
    let theirs = ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    };
    let ours = *bollard::API_DEFAULT_VERSION;
    Some(if theirs < ours { theirs } else { ours })
}

/// The answer of a TLS-only engine to plain HTTP (Go's `net/http`).
fn wants_tls(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 400, message }
        if message.contains("HTTP request to an HTTPS server"))
}

/// The address [`DockerEngine::connect_with`] uses for `options`: the given
/// one, else `DOCKER_HOST`, else the local socket, Docker's or Podman's (the
/// daemon shows it while the engine is unreachable).
pub fn resolve_address(options: &ConnectOptions) -> String {
    match tls::resolve(options, &DockerEnv::from_process()) {
        Ok((address, _)) => address,
        Err(_) => options.address.clone().unwrap_or_default(),
    }
}

impl Engine for DockerEngine {
    async fn list_images(&self) -> EngineResult<Vec<Image>> {
        images::list_images(self).await
    }

    async fn list_containers(&self) -> EngineResult<Vec<Container>> {
        match self.kind {
            EngineKind::Docker => self.containers(None).await,
            EngineKind::Podman => podman::containers(self).await,
        }
    }

    async fn containers_using(&self, image_id: &str) -> EngineResult<Vec<Container>> {
        images::containers_using(self, image_id).await
    }

    async fn image_id_of(&self, reference: &str) -> EngineResult<Option<String>> {
        images::image_id_of(self, reference).await
    }

    async fn image(&self, reference: &str) -> EngineResult<Option<Image>> {
        images::image(self, reference).await
    }

    async fn remove(&self, reference: &str) -> EngineResult<Removed> {
        images::remove(self, reference).await
    }

    async fn tag(&self, source: &str, target: &str) -> EngineResult<()> {
        images::tag(self, source, target).await
    }

    async fn pull(
        &self,
        reference: &str,
        platform: Option<&str>,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        transfer::pull(self, reference, platform, credentials, on_progress).await
    }

    async fn push(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        transfer::push(self, reference, credentials, on_progress).await
    }

    async fn remote_digest(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> EngineResult<String> {
        if self.kind == EngineKind::Podman {
            return Err(EngineError::Unsupported(
                "look up a registry digest (Podman answers no /distribution API)".to_owned(),
            ));
        }
        transfer::remote_digest(self, reference, credentials).await
    }

    #[cfg(feature = "testkit")]
    async fn load(&self, archive: bytes::Bytes) -> EngineResult<Vec<String>> {
        images::load(self, archive).await
    }

    #[cfg(feature = "testkit")]
    async fn save(&self, references: &[String]) -> EngineResult<bytes::Bytes> {
        images::save(self, references).await
    }

    async fn export(&self, references: &[String], to: &std::path::Path) -> EngineResult<u64> {
        images::export(self, references, to).await
    }

    async fn diff_ids(&self, id: &str) -> EngineResult<Vec<String>> {
        images::diff_ids(self, id).await
    }

    fn events(&self) -> BoxStream<'_, EngineResult<Event>> {
        events::events(self)
    }

    async fn image_layers(&self, id: &str) -> EngineResult<Vec<Layer>> {
        images::image_layers(self, id).await
    }

    fn is_local(&self) -> bool {
        match &self.endpoint {
            Endpoint::Unix(_) => true,
            Endpoint::Tcp(host) | Endpoint::Tls(host, _) => tls::is_loopback(host),
        }
    }

    async fn info(&self) -> EngineResult<EngineInfo> {
        podman::again(self, || raw::info(self)).await
    }

    async fn platform(&self) -> EngineResult<String> {
        raw::platform(self).await
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

    fn kind(&self) -> EngineKind {
        self.kind
    }

    async fn disk_usage(&self) -> EngineResult<DiskUsage> {
        podman::again(self, || raw::disk_usage(self)).await
    }

    async fn prune_build_cache(&self, keep_bytes: u64) -> EngineResult<u64> {
        if !self.kind.has_build_cache() {
            return Err(EngineError::Unsupported(
                "prune a build cache (Podman keeps none apart from its images)".to_owned(),
            ));
        }
        raw::prune_build_cache(self, keep_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
