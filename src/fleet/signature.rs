//! Signatures in the registry, cosign-shaped: a manifest whose one layer is
//! the simple-signing payload (the policy manifest's digest), the signature
//! in the layer's `dev.cosignproject.cosign/signature` annotation, and the
//! policy manifest as its `subject`. It is pushed under cosign's tag
//! `sha256-<hex>.sig`, so it is found on registries without the referrers
//! API (the subject makes it a referrer on those that have one); reading
//! asks the referrers API first, then the tag.

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use super::artifact::{EMPTY_JSON, EMPTY_MEDIA_TYPE, OCI_MANIFEST};
use super::sign::{self, PAYLOAD_MEDIA_TYPE, PrivateKey, PublicKey, SIGNATURE_ANNOTATION};
use super::{FleetError, PolicyRef};
use crate::registry::{Registry, RegistryError};
use crate::store::Descriptor;

/// `artifactType` of a stowage policy signature.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.stowage.policy.signature.v1";
/// More candidate signatures than this are not looked at (a registry full
/// of junk referrers must not cost a poll its whole deadline).
const MAX_CANDIDATES: usize = 8;

/// cosign's fallback tag for the signatures of `digest`.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1) + ".sig"
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    digest: String,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct SigManifest {
    #[serde(default)]
    layers: Vec<SigLayer>,
}

#[derive(Deserialize)]
struct SigLayer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// Why no signature was accepted, worst last (the reason `status` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    Unsigned,
    WrongKey,
    Tampered,
}

/// Accepts the policy manifest `policy` of `r` only when a signature made
/// with `key` vouches for its digest.
pub async fn check(
    registry: &Registry,
    r: &PolicyRef,
    policy: &Descriptor,
    key: &PublicKey,
) -> Result<(), FleetError> {
    let digest = &policy.digest;
    let mut candidates = Vec::new();
    if let Some(index) = registry
        .referrers(&r.repository, digest, SIGNATURE_ARTIFACT_TYPE)
        .await?
    {
        let index: Index = serde_json::from_slice(&index).unwrap_or(Index { manifests: vec![] });
        candidates.extend(
            index
                .manifests
                .into_iter()
                .filter(|e| e.artifact_type.as_deref() == Some(SIGNATURE_ARTIFACT_TYPE))
                .map(|e| e.digest),
        );
    }
    candidates.push(fallback_tag(digest));
    candidates.truncate(MAX_CANDIDATES);
    let mut worst = Refusal::Unsigned;
    let mut other = None;
    for candidate in candidates {
        let manifest = match registry.manifest_bytes(&r.repository, &candidate).await {
            Ok((_, bytes)) => bytes,
            Err(RegistryError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let Ok(m) = serde_json::from_slice::<SigManifest>(&manifest) else {
            continue;
        };
        for layer in m
            .layers
            .iter()
            .filter(|l| l.media_type == PAYLOAD_MEDIA_TYPE)
        {
            let Some(sig) = layer
                .annotations
                .get(SIGNATURE_ANNOTATION)
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            else {
                continue;
            };
            if layer.size > sign::MAX_PAYLOAD {
                continue;
            }
            let payload = registry
                .blob_bytes(&r.repository, &layer.digest, sign::MAX_PAYLOAD)
                .await?;
            if !key.verifies(&payload, &sig) {
                worst = worst.max(Refusal::WrongKey);
                continue;
            }
            match sign::payload_digest(&payload) {
                Some(d) if d == *digest => return Ok(()),
                found => {
                    worst = Refusal::Tampered;
                    other = found;
                }
            }
        }
    }
    let why = match worst {
        Refusal::Unsigned => format!(
            "unsigned: no signature of {digest} (referrers API, tag {})",
            fallback_tag(digest)
        ),
        Refusal::WrongKey => "signed, but not with the key given by --policy-key".to_owned(),
        Refusal::Tampered => format!(
            "tampered: the signature found vouches for {}, not {digest}",
            other.as_deref().unwrap_or("another manifest")
        ),
    };
    Err(FleetError::Signature {
        reference: r.at_digest(digest),
        why,
    })
}

/// Signs the policy manifest `policy` of `r` with `key` and publishes the
/// signature (referrer with `subject`, under the fallback tag).
pub async fn publish(
    registry: &Registry,
    r: &PolicyRef,
    policy: &Descriptor,
    key: &PrivateKey,
) -> Result<(), FleetError> {
    let payload = sign::payload(&r.repository_name(), &policy.digest);
    let sig = key.sign(&payload).map_err(FleetError::Input)?;
    if !key.public().verifies(&payload, &sig) {
        return Err(FleetError::Input(
            "the signature does not verify with the key's own public half".into(),
        ));
    }
    let config = registry
        .push_blob(
            &r.repository,
            EMPTY_MEDIA_TYPE,
            Bytes::from_static(EMPTY_JSON),
        )
        .await?;
    let layer = registry
        .push_blob(&r.repository, PAYLOAD_MEDIA_TYPE, Bytes::from(payload))
        .await?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE_ARTIFACT_TYPE,
        "config": { "mediaType": config.media_type, "digest": config.digest, "size": config.size },
        "layers": [{
            "mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
            "annotations": {
                SIGNATURE_ANNOTATION: base64::engine::general_purpose::STANDARD.encode(&sig),
            },
        }],
        "subject": { "mediaType": policy.media_type, "digest": policy.digest, "size": policy.size },
    });
    registry
        .put_manifest(
            &r.repository,
            &fallback_tag(&policy.digest),
            OCI_MANIFEST,
            Bytes::from(manifest.to_string()),
        )
        .await?;
    Ok(())
}
