//! The Docker engine over bollard: the one module that knows bollard.
//!
//! bollard types never leave this module; everything is mapped to the plain
//! types of [`crate::engine`]. This file connects and maps each [`Engine`]
//! call to the file of its job: `images` (the local store), `transfer`
//! (pulls, pushes, registry look-ups), `events` (the event stream), `raw`
//! (the HTTP/1.0 client for the two endpoints bollard 0.21 models only in
//! their newest shape, `system df` and `build prune`, and engine info),
//! `messages` (errors as one bounded, redacted line), `deadline`, and
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
mod transfer;

use std::time::Duration;

use bollard::Docker;

use super::{
    BoxStream, Container, Credentials, DiskUsage, Engine, EngineError, EngineInfo, EngineKind,
    EngineResult, Event, Image, Layer, Progress, Removed, StuckCall,
};
use deadline::{Calls, STUCK_SLACK};
use messages::{chain, one_line, root_cause};

/// The engine's address when neither an explicit URI nor `DOCKER_HOST` is given.
const DEFAULT_ADDRESS: &str = "unix:///var/run/docker.sock";
/// Podman's rootful socket (`podman.socket`); the rootless one is
/// `$XDG_RUNTIME_DIR/podman/podman.sock`.
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
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
    /// Docker or Podman, told by the engine's version at connect.
    kind: EngineKind,
    /// Podman's libpod API version (`4.3.1`) for the calls it answers only
    /// there; empty on Docker.
    libpod_api: String,
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
            let version = docker
                .version()
                .await
                .map_err(|e| unreachable(root_cause(&e)))?;
            Ok((docker, podman::kind_of(&version)))
        };
        let (docker, (kind, libpod_api)) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
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
            kind,
            libpod_api,
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

/// The address [`DockerEngine::connect`] uses for `uri`: itself, else
/// `DOCKER_HOST`, else the local socket (the daemon shows it while the
/// engine is unreachable).
pub fn resolve_address(uri: Option<&str>) -> String {
    match uri {
        Some(uri) => uri.to_owned(),
        None => std::env::var("DOCKER_HOST")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| {
                let runtime_dir = std::env::var("XDG_RUNTIME_DIR").ok();
                local_socket(runtime_dir.as_deref(), |p| std::path::Path::new(p).exists())
            }),
    }
}

/// The local socket when no address is given: Docker's, else (when it
/// does not exist) Podman's rootful then rootless one, else Docker's (for
/// the message).
fn local_socket(runtime_dir: Option<&str>, exists: impl Fn(&str) -> bool) -> String {
    let docker = DEFAULT_ADDRESS.trim_start_matches("unix://");
    let rootless = runtime_dir.map(|d| format!("{}/podman/podman.sock", d.trim_end_matches('/')));
    [
        Some(docker.to_owned()),
        Some(PODMAN_SOCKET.to_owned()),
        rootless,
    ]
    .into_iter()
    .flatten()
    .find(|p| exists(p))
    .map_or_else(|| DEFAULT_ADDRESS.to_owned(), |p| format!("unix://{p}"))
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
            Endpoint::Tcp(host) => {
                let h = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                matches!(h, "127.0.0.1" | "localhost" | "[::1]")
            }
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

    #[test]
    fn podman_sockets_serve_when_dockers_is_missing() {
        let only = |there: &'static [&'static str]| move |p: &str| there.contains(&p);
        let xdg = Some("/run/user/1000");
        assert_eq!(
            local_socket(
                xdg,
                only(&["/var/run/docker.sock", "/run/podman/podman.sock"])
            ),
            "unix:///var/run/docker.sock"
        );
        assert_eq!(
            local_socket(xdg, only(&["/run/podman/podman.sock"])),
            "unix:///run/podman/podman.sock"
        );
        assert_eq!(
            local_socket(xdg, only(&["/run/user/1000/podman/podman.sock"])),
            "unix:///run/user/1000/podman/podman.sock"
        );
        assert_eq!(local_socket(None, only(&[])), "unix:///var/run/docker.sock");
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
