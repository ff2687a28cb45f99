//! Fleets: the policy comes from an OCI registry (`-p oci://HOST/REPO:TAG`
//! or `@sha256:…`), the distribution a fleet already pulls from.
//!
//! - The policy is an OCI artifact: a manifest with `artifactType` and one
//!   layer of [`POLICY_MEDIA_TYPE`] holding the policy text; ORAS pushes of
//!   that media type read the same ([`artifact`]).
//! - [`fetch`] reads the manifest and the layer by digest (bounded, checked)
//!   through the one registry client, and with a key checks the signature
//!   ([`signature`]); [`publish`] is `stowage policy push`.
//! - The text is validated by the same reader as a file's
//!   (`policy::load_remote`), with the host's `--state-dir`.
//! - [`last_good`]: the last accepted policy under `state_dir`, for a start
//!   with the registry down; [`poll`]: the daemon's checks.

pub mod artifact;
pub mod last_good;
pub mod poll;
pub mod sign;
pub mod signature;

use std::fmt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::credentials::CredentialStore;
use crate::policy::{self, Diagnostics, Policy};
use crate::refs::{check_digest, check_host, check_path, check_tag};
use crate::registry::{Options, Registry, RegistryError};

pub use artifact::POLICY_MEDIA_TYPE;
pub use poll::render as render_status;
pub use sign::{PrivateKey, PublicKey};

/// Where the state lives when the policy that would name it is remote.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stowage";

/// `oci://HOST[:PORT]/REPO:TAG` or `oci://HOST[:PORT]/REPO@sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyRef {
    pub host: String,
    pub repository: String,
    /// A tag, or a `sha256:` digest (pinned: it never changes).
    pub reference: String,
}

impl PolicyRef {
    /// `Some` for an `oci://` policy argument, with its error when malformed.
    pub fn from_arg(arg: &Path) -> Option<Result<PolicyRef, String>> {
        let text = arg.to_str()?;
        text.starts_with("oci://").then(|| PolicyRef::parse(text))
    }

    pub fn parse(text: &str) -> Result<PolicyRef, String> {
        let bad = |why: String| format!("policy reference {text:?}: {why}");
        let rest = text
            .strip_prefix("oci://")
            .ok_or_else(|| bad("must start with oci://".into()))?;
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("write oci://HOST[:PORT]/REPO:TAG".into()))?;
        check_host(host).map_err(bad)?;
        let (repository, reference) = match path.split_once('@') {
            Some((repo, digest)) => {
                check_digest(digest).map_err(bad)?;
                (repo, digest)
            }
            None => match path.rsplit_once(':') {
                Some((repo, tag)) => {
                    check_tag(tag).map_err(|e| bad(format!("tag {tag:?}: {e}")))?;
                    (repo, tag)
                }
                None => (path, "latest"),
            },
        };
        check_path(repository).map_err(|e| bad(format!("repository {repository:?}: {e}")))?;
        Ok(PolicyRef {
            host: host.to_ascii_lowercase(),
            repository: repository.to_owned(),
            reference: reference.to_owned(),
        })
    }

    /// Pinned by digest: what it names never changes, and rollback rules
    /// do not apply (the operator chose that exact policy).
    pub fn pinned(&self) -> bool {
        self.reference.starts_with("sha256:")
    }

    /// `host/repo`, as a signature's payload names it.
    pub fn repository_name(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }

    /// The same artifact by `digest`, for messages.
    pub fn at_digest(&self, digest: &str) -> String {
        format!("oci://{}/{}@{digest}", self.host, self.repository)
    }

    /// A client for its registry, with the credentials of Docker's own
    /// `config.json` (the policy's `credentials_file` is not known before
    /// the policy is).
    pub fn registry(&self) -> Result<Registry, RegistryError> {
        let store = CredentialStore::load(None).unwrap_or_else(|e| {
            tracing::warn!("registry credentials not used: {e}");
            CredentialStore::default()
        });
        Registry::new(
            &self.host,
            store.for_registry(&self.host),
            &Options::default(),
        )
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.pinned() { '@' } else { ':' };
        write!(
            f,
            "oci://{}/{}{sep}{}",
            self.host, self.repository, self.reference
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{reference}: not a stowage policy: {why}")]
    NotPolicy { reference: String, why: String },
    #[error("{reference}: signature refused: {why}")]
    Signature { reference: String, why: String },
    #[error("invalid policy in {reference}:\n{}", .diagnostics.to_string().trim_end())]
    Invalid {
        reference: String,
        diagnostics: Diagnostics,
    },
    #[error("{0}")]
    Input(String),
}

impl FleetError {
    /// Worth trying again later (the registry or the link), as opposed to
    /// a policy that is refused as it is.
    pub fn retryable(&self) -> bool {
        matches!(self, FleetError::Registry(e) if e.retryable())
    }
}

/// A policy artifact as fetched and checked, not yet validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The manifest digest: the policy's revision.
    pub digest: String,
    /// `org.opencontainers.image.created` of the manifest, when present.
    pub created: Option<DateTime<Utc>>,
    /// The policy text as published (bytes; validated by the caller).
    pub text: Bytes,
}

/// Reads the policy artifact `digest` of `r` (manifest, then its policy
/// layer), and with `key` checks its signature first.
pub async fn fetch(
    registry: &Registry,
    r: &PolicyRef,
    digest: &str,
    key: Option<&PublicKey>,
) -> Result<Fetched, FleetError> {
    let (descriptor, manifest) = registry.manifest_bytes(&r.repository, digest).await?;
    let parsed = artifact::read(&manifest).map_err(|why| FleetError::NotPolicy {
        reference: r.at_digest(digest),
        why,
    })?;
    if let Some(key) = key {
        signature::check(registry, r, &descriptor, key).await?;
    }
    let text = registry
        .blob_bytes(&r.repository, &parsed.layer.digest, artifact::MAX_POLICY)
        .await?;
    Ok(Fetched {
        digest: descriptor.digest,
        created: parsed.created,
        text,
    })
}

/// The digest `r` names now, then the artifact: what a command reads.
pub async fn fetch_current(
    registry: &Registry,
    r: &PolicyRef,
    key: Option<&PublicKey>,
) -> Result<Fetched, FleetError> {
    let digest = registry
        .manifest_digest(&r.repository, &r.reference)
        .await?;
    fetch(registry, r, &digest, key).await
}

/// Validates `fetched` as the policy of this host (`state_dir`); its
/// `source` is the reference, which messages name.
pub fn validate(fetched: &Fetched, r: &PolicyRef, state_dir: &Path) -> Result<Policy, FleetError> {
    let source = PathBuf::from(r.to_string());
    policy::load_remote(&fetched.text, &source, state_dir).map_err(|diagnostics| {
        FleetError::Invalid {
            reference: r.to_string(),
            diagnostics,
        }
    })
}

/// `stowage policy push`: publishes `text` (already validated) as `r`'s
/// tag, created `at`, signed with `key` when given. Returns the digest.
pub async fn publish(
    registry: &Registry,
    r: &PolicyRef,
    text: Bytes,
    at: DateTime<Utc>,
    key: Option<&PrivateKey>,
) -> Result<String, FleetError> {
    if r.pinned() {
        return Err(FleetError::Input(format!(
            "{r}: push to a tag (oci://HOST/REPO:TAG); a digest is what the push gives"
        )));
    }
    let config = registry
        .push_blob(
            &r.repository,
            artifact::EMPTY_MEDIA_TYPE,
            Bytes::from_static(artifact::EMPTY_JSON),
        )
        .await?;
    let layer = registry
        .push_blob(&r.repository, POLICY_MEDIA_TYPE, text)
        .await?;
    let manifest = artifact::manifest(&config, &layer, at);
    let pushed = registry
        .put_manifest(
            &r.repository,
            &r.reference,
            artifact::OCI_MANIFEST,
            manifest.clone(),
        )
        .await?;
    if let Some(key) = key {
        let descriptor = crate::store::Descriptor {
            media_type: artifact::OCI_MANIFEST.to_owned(),
            digest: pushed.digest.clone(),
            size: manifest.len() as u64,
        };
        signature::publish(registry, r, &descriptor, key).await?;
    }
    Ok(pushed.digest)
}
