//! Bundles for offline hosts: one tar file holding an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/<hex>`, each blob once) plus a
//! Docker `manifest.json`, so that `docker load`, `skopeo` (`oci-archive:`),
//! `podman load` and `ctr import` read it as it is. See `docs/bundles.md`.
//!
//! - [`archive`]: the safe tar reader: one scan building an entry table;
//!   anything but the layout's own names refused; blobs read by offset.
//! - [`verify`]: every blob's size and sha256, every image complete (a delta
//!   bundle's left-out layers named), the bundle's digest.
//! - [`create`]: a bundle from registries (through the content store) or
//!   from the engine's export, written as `FILE.partial` then renamed.
//! - [`inventory`]: what a host holds, for `bundle create --since`.
//!
//! The reader trusts nothing in the file: names, sizes, digests and JSON are
//! checked before anything is read by them, and JSON reads are bounded.

pub mod archive;
pub mod create;
pub mod from_engine;
pub mod import;
pub mod inventory;
mod tar_out;
pub mod verify;

use std::path::PathBuf;

pub use archive::{Archive, BlobReader};
pub use create::{Created, Fetching, Wanted, create_from_registry, full_name};
pub use from_engine::create_from_engine;
pub use inventory::Inventory;
pub use verify::{BundleImage, MissingLayer, Verified, verify};

use crate::store::Descriptor;

/// The full reference of an image (`docker.io/library/busybox:1`), as
/// containerd and Docker 25+ name it in `index.json`.
pub const ANNOTATION_NAME: &str = "io.containerd.image.name";
/// The tag alone (`1`): what `skopeo … oci-archive:FILE:TAG` looks for.
pub const ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";
/// On an `index.json` entry that is stowage's own OCI index around a
/// Docker-typed manifest as served: the digest of what the registry served.
pub const ANNOTATION_SERVED: &str = "io.stowage.served";
/// On an `index.json` entry of a delta bundle: the layer digests left out
/// (comma-separated), which the importing host must already hold.
pub const ANNOTATION_OMITTED: &str = "io.stowage.omitted";
/// On `index.json` of a delta bundle: the host of the inventory it is made against.
pub const ANNOTATION_SINCE: &str = "io.stowage.since";

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Largest JSON document read from a bundle (`index.json`, `manifest.json`,
/// a manifest, a config): larger ones are refused, never read whole.
pub const JSON_MAX: u64 = 4 << 20;

/// What is wrong with one blob of a bundle, and the images it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// `sha256:<hex>` (or the entry's name when that is what is wrong).
    pub blob: String,
    pub why: String,
    /// Full references of the images that need the blob.
    pub images: Vec<String>,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blob {}: {}", self.blob, self.why)?;
        if self.images.is_empty() {
            write!(f, " (no image uses it)")
        } else {
            write!(f, " (breaks {})", self.images.join(", "))
        }
    }
}

/// Typed bundle errors. [`BundleError::exit_code`] maps them to the spec's
/// table: 1 for a bundle that is damaged, unsafe or not the expected one,
/// 2 for one that cannot be read at all (or a command that could not run).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file cannot be opened or read.
    #[error("cannot read bundle {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a tar file at all.
    #[error("{} is not a bundle: {why}", path.display())]
    NotATar { path: PathBuf, why: String },
    /// A tar entry that has no place in a bundle (path traversal, links,
    /// devices, duplicates, unknown names): refused before anything is read by it.
    #[error("bundle {} refused: entry {entry:?} {why}", path.display())]
    Unsafe {
        path: PathBuf,
        entry: String,
        why: String,
    },
    /// The layout files are missing or wrong (`oci-layout`, `index.json`,
    /// `manifest.json`), or an entry of `index.json` is invalid.
    #[error("bundle {} is not a valid image layout: {why}", path.display())]
    Layout { path: PathBuf, why: String },
    /// Blobs that are damaged, truncated or missing.
    #[error("bundle {} is damaged: {}", path.display(), list(damage))]
    Damaged { path: PathBuf, damage: Vec<Damage> },
    /// `--expect` named another bundle.
    #[error("bundle {} is not the expected one: its digest is {actual}, expected {expected}", path.display())]
    NotExpected {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// `bundle create`: an image that cannot be had (nothing written).
    #[error("{reference}: {why}")]
    Image { reference: String, why: String },
    /// `bundle create`/`inventory`: bad input (a reference, an inventory file).
    #[error("{0}")]
    Input(String),
    /// Writing the bundle or a temporary file failed.
    #[error("{what} {}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn list(damage: &[Damage]) -> String {
    damage
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl BundleError {
    /// The exit code of `bundle verify`/`bundle create` for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            BundleError::Unsafe { .. }
            | BundleError::Layout { .. }
            | BundleError::Damaged { .. }
            | BundleError::NotExpected { .. }
            | BundleError::Image { .. } => 1,
            BundleError::Unreadable { .. }
            | BundleError::NotATar { .. }
            | BundleError::Input(_)
            | BundleError::Write { .. }
            | BundleError::Engine(_)
            | BundleError::Store(_) => 2,
        }
    }
}

/// `blobs/sha256/<hex>` of a digest already checked.
pub(crate) fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// A descriptor as it appears in an `index.json` or an index: with its
/// platform and annotations.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Entry {
    #[serde(flatten)]
    pub descriptor: Descriptor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    pub(crate) fn parse(p: &str) -> Platform {
        let mut parts = p.splitn(3, '/');
        Platform {
            os: parts.next().unwrap_or_default().to_owned(),
            architecture: parts.next().unwrap_or_default().to_owned(),
            variant: parts.next().map(str::to_owned),
        }
    }

    pub(crate) fn text(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// `index.json` (and an OCI index blob).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct IndexDoc {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Entry>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// One image of a Docker `manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerManifest {
    pub config: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(default)]
    pub layers: Vec<String>,
}
