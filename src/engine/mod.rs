//! The engine boundary. The rest of stowage talks to Docker only through the
//! [`Engine`] trait; `docker/` is the one module that knows bollard, and
//! `fake.rs` (feature `testkit`) is an in-memory engine for planner and loop tests.

pub mod docker;
#[cfg(feature = "testkit")]
pub mod fake;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use serde::{Deserialize, Serialize};

pub use docker::DockerEngine;

/// One local image as the engine lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:...` image (config) id.
    pub id: String,
    /// `repository:tag` references; empty for a dangling image.
    pub repo_tags: Vec<String>,
    /// `repository@sha256:...` manifest digests known for this image.
    pub repo_digests: Vec<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// Total size in bytes, layers shared with other images included.
    pub size: u64,
}

/// One layer of an image, as far as disk accounting needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layer {
    /// Chain id: identifies the layer together with everything below it, so
    /// images sharing a base share these ids.
    pub chain_id: String,
    /// Bytes on disk (uncompressed diff size).
    pub size: u64,
}

/// One container, in any state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    /// First name without the leading `/`, if any.
    pub name: String,
    /// `sha256:...` id of the image the container was created from.
    pub image_id: String,
    /// The image as the container was created with (reference or id).
    pub image: String,
    /// `created`, `running`, `exited`, ...
    pub state: String,
}

/// Which engine answers the Docker API at the address: Podman's service
/// speaks it too, with differences the rest of stowage asks about here
/// rather than knowing the engine (see `docs/podman.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Docker,
    /// `podman system service`: its version's `Components` name a "Podman Engine".
    Podman,
}

impl EngineKind {
    /// The engine's name as people know it.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Docker => "Docker",
            EngineKind::Podman => "Podman",
        }
    }

    /// How it names images (`localhost/…` for local ones on Podman).
    pub fn naming(self) -> crate::refs::Naming {
        match self {
            EngineKind::Docker => crate::refs::Naming::Docker,
            EngineKind::Podman => crate::refs::Naming::Podman,
        }
    }

    /// Whether a push leaves the digest it pushed among the image's
    /// `RepoDigests`. Podman's do not (and it lists every name with every
    /// digest it knows the image by): the digest comes from the registry.
    pub fn records_pushed_digest(self) -> bool {
        self == EngineKind::Docker
    }

    /// Whether the engine keeps a build cache apart from its images
    /// (BuildKit's). Podman's build layers are images: retention and
    /// eviction cover them, and `build_cache_max` has nothing to prune.
    pub fn has_build_cache(self) -> bool {
        self == EngineKind::Docker
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the engine reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Docker or Podman.
    #[serde(default)]
    pub kind: EngineKind,
    /// The engine's data root (`DockerRootDir`).
    pub data_root: String,
    pub server_version: String,
    pub api_version: String,
    /// `os/arch[/variant]` as OCI names it, from the engine's `Os`, `Arch`
    /// and (for arm) its machine's `Architecture`.
    pub platform: String,
}

/// The engine's disk usage summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Unique bytes of all layers of all images.
    pub layers_size: u64,
    pub images: u64,
    pub build_cache_size: u64,
}

/// Registry credentials for one registry. `Debug` never shows the secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<String>,
    pub identity_token: Option<String>,
    pub server: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// One progress message of a pull or push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub id: Option<String>,
    pub status: String,
    pub current: Option<u64>,
    pub total: Option<u64>,
}

/// What an [`Event`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Container,
    Image,
    /// Anything else the engine sends (stowage asks for the two above only).
    Other,
}

/// An event from the engine's event stream that stowage cares about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// `create`, `start`, `pull`, `load`, `tag`, `delete`, ...
    pub action: String,
    /// The object id (container id, or image reference/id for image events).
    pub id: String,
    /// For container events: the image as given (`image` attribute).
    pub image: Option<String>,
    /// Seconds since the Unix epoch.
    pub time: i64,
}

/// Outcome of removing one reference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// References that were untagged.
    pub untagged: Vec<String>,
    /// Image/layer ids that were deleted.
    pub deleted: Vec<String>,
}

/// Typed engine errors. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("no such image or reference: {0}")]
    NotFound(String),
    /// The engine refused because of a conflict, e.g. an image used by a
    /// container; stowage never forces.
    #[error("refused by the engine: {0}")]
    Conflict(String),
    #[error("registry error for {reference}: {message}")]
    Registry { reference: String, message: String },
    /// The engine answered too slowly (or stopped halfway through an
    /// answer): `call` names the call, `after` its deadline.
    #[error("the Docker engine did not finish `{call}` within {}", humantime::format_duration(*.after))]
    Timeout { call: String, after: Duration },
    /// TLS to the engine could not be set up, or one side refused the
    /// other: which file, which certificate (see [`docker::TlsError`]).
    #[error("cannot reach the Docker engine at {address} over TLS: {error}")]
    Tls {
        address: String,
        #[source]
        error: docker::TlsError,
    },
    /// Registry credentials would cross a plain-text connection to an engine
    /// on another host; refused before anything was sent.
    #[error(
        "refusing to send the registry credentials for {registry} in clear text to the Docker \
         engine at {address}: use TLS (--tlsverify with the engine's certificates, or \
         DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH), or allow it with \
         --allow-plaintext-credentials (STOWAGE_ALLOW_PLAINTEXT_CREDENTIALS=1)"
    )]
    PlaintextCredentials { address: String, registry: String },
    /// The engine has no such call (Podman 4 answers no
    /// `/distribution/…/json`): the caller has another way or says so.
    #[error("the engine cannot {0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}

impl EngineError {
    /// Whether the engine cannot be reached at all (an outage, or TLS that
    /// fails), as opposed to one call's failure.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            EngineError::Unreachable { .. } | EngineError::Tls { .. }
        )
    }
}

/// An engine call still in flight past its deadline: the deadline did not
/// fire, so whoever waits on it is stuck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckCall {
    pub call: String,
    /// How long past its deadline.
    pub overdue: Duration,
}

pub type EngineResult<T> = Result<T, EngineError>;
pub type BoxStream<'a, T> = Pin<Box<dyn Stream<Item = T> + Send + 'a>>;

/// What stowage needs from a container engine.
///
/// Removal is never forced: an image used by any container is refused by the
/// engine and reported as [`EngineError::Conflict`].
pub trait Engine: Send + Sync {
    /// Every image, dangling ones included.
    fn list_images(&self) -> impl Future<Output = EngineResult<Vec<Image>>> + Send;
    /// Every container in every state.
    fn list_containers(&self) -> impl Future<Output = EngineResult<Vec<Container>>> + Send;
    /// Containers in any state created from exactly this image id. The
    /// executor asks right before each removal, so it must be cheap.
    fn containers_using(
        &self,
        image_id: &str,
    ) -> impl Future<Output = EngineResult<Vec<Container>>> + Send {
        async move {
            let all = self.list_containers().await?;
            Ok(all.into_iter().filter(|c| c.image_id == image_id).collect())
        }
    }
    /// The image a reference (`repo:tag`, `repo@digest`) or image id names
    /// now, `None` when it names nothing. Asked right before removals: one
    /// inspect, not a listing.
    fn image(&self, reference: &str) -> impl Future<Output = EngineResult<Option<Image>>> + Send {
        async move {
            let images = self.list_images().await?;
            Ok(images.into_iter().find(|i| {
                i.id == reference
                    || i.repo_tags.iter().any(|t| t == reference)
                    || i.repo_digests.iter().any(|d| d == reference)
            }))
        }
    }
    /// The image id a reference names now, `None` when it names nothing.
    fn image_id_of(
        &self,
        reference: &str,
    ) -> impl Future<Output = EngineResult<Option<String>>> + Send {
        async move {
            let images = self.list_images().await?;
            Ok(images
                .into_iter()
                .find(|i| i.repo_tags.iter().any(|t| t == reference))
                .map(|i| i.id))
        }
    }
    /// Remove one reference (or an image id). Untags when the image keeps
    /// other references; never forced, never prunes stopped-container images.
    fn remove(&self, reference: &str) -> impl Future<Output = EngineResult<Removed>> + Send;
    /// Point `target` (`repo:tag`) at `source` (reference or id).
    fn tag(&self, source: &str, target: &str) -> impl Future<Output = EngineResult<()>> + Send;
    /// Pull a reference; `on_progress` sees every progress message. An error
    /// reported inside the stream is an error.
    fn pull(
        &self,
        reference: &str,
        platform: Option<&str>,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> impl Future<Output = EngineResult<()>> + Send;
    /// Push a local reference to its registry.
    fn push(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> impl Future<Output = EngineResult<()>> + Send;
    /// The manifest digest a registry holds for `reference`, without pulling.
    fn remote_digest(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> impl Future<Output = EngineResult<String>> + Send;
    /// Load a `docker save`/docker-archive tarball; returns the loaded references or ids.
    /// Tests and demos seed engines with it; stowage itself never loads.
    #[cfg(feature = "testkit")]
    fn load(&self, archive: bytes::Bytes)
    -> impl Future<Output = EngineResult<Vec<String>>> + Send;
    /// Save images as a docker-archive tarball (tests only, like `load`).
    #[cfg(feature = "testkit")]
    fn save(
        &self,
        references: &[String],
    ) -> impl Future<Output = EngineResult<bytes::Bytes>> + Send;
    /// Writes the engine's export of `references` (`docker save`: a
    /// docker-archive tar) to the file `to`, streamed; returns its bytes.
    /// `bundle create --from-engine` reads it from there.
    fn export(
        &self,
        references: &[String],
        to: &std::path::Path,
    ) -> impl Future<Output = EngineResult<u64>> + Send {
        let _ = (references, to);
        async {
            Err(EngineError::Other(
                "this engine cannot export images".into(),
            ))
        }
    }
    /// The image's `rootfs` diff ids, bottom first (`stowage inventory`).
    fn diff_ids(&self, id: &str) -> impl Future<Output = EngineResult<Vec<String>>> + Send {
        let _ = id;
        async {
            Err(EngineError::Other(
                "this engine cannot tell diff ids".into(),
            ))
        }
    }
    /// The engine's event stream (container and image events), from now on.
    fn events(&self) -> BoxStream<'_, EngineResult<Event>>;
    /// The layers of an image, bottom first, with their sizes. When the
    /// engine cannot tell per-layer sizes (no history), one pseudo-layer named
    /// after the image carries its whole size.
    fn image_layers(&self, id: &str) -> impl Future<Output = EngineResult<Vec<Layer>>> + Send;
    fn info(&self) -> impl Future<Output = EngineResult<EngineInfo>> + Send;
    /// The platform the engine pulls for when none is named
    /// (`linux/amd64`, `linux/arm/v7`): its own, not this program's.
    fn platform(&self) -> impl Future<Output = EngineResult<String>> + Send {
        async move { self.info().await.map(|i| i.platform) }
    }
    /// Whether the engine answers at all (cheap, bounded).
    fn ping(&self) -> impl Future<Output = EngineResult<()>> + Send {
        async move { self.info().await.map(|_| ()) }
    }
    /// The oldest call in flight past its deadline, if any, for the daemon's
    /// watchdog: a reconcile waiting on it makes no progress.
    fn stuck_call(&self) -> Option<StuckCall> {
        None
    }
    /// Docker or Podman, as the engine said when connected.
    fn kind(&self) -> EngineKind {
        EngineKind::Docker
    }
    /// Whether the engine runs on this host, so that its data root can be
    /// measured here (false for a remote `tcp://` engine).
    fn is_local(&self) -> bool {
        true
    }
    fn disk_usage(&self) -> impl Future<Output = EngineResult<DiskUsage>> + Send;
    /// Prune the build cache down to `keep_bytes`; returns bytes reclaimed.
    fn prune_build_cache(&self, keep_bytes: u64) -> impl Future<Output = EngineResult<u64>> + Send;
}
