//! The policy artifact, pure: the manifest stowage publishes, and reading
//! one (stowage's or ORAS's) down to its policy layer and `created` time.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;

use crate::store::Descriptor;

/// The layer holding the policy text.
pub const POLICY_MEDIA_TYPE: &str = "application/vnd.stowage.policy.v1+toml";
/// The manifest's `artifactType` as stowage publishes it (ORAS's default
/// `application/vnd.unknown.artifact.v1` is read too: the layer decides).
pub const ARTIFACT_TYPE: &str = "application/vnd.stowage.policy.v1";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI's empty descriptor, the config of an artifact.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
pub const CREATED: &str = "org.opencontainers.image.created";
/// The policy file's own limit (`policy::file`): 4 MiB.
pub const MAX_POLICY: u64 = 4 * 1024 * 1024;

/// What a policy manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub layer: Descriptor,
    pub created: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(default)]
    layers: Vec<Layer>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

/// The policy layer and `created` of a manifest; why not, as one line.
pub fn read(manifest: &[u8]) -> Result<Parsed, String> {
    let m: Manifest =
        serde_json::from_slice(manifest).map_err(|e| format!("not an OCI manifest ({e})"))?;
    if m.schema_version != Some(2) {
        return Err("not an OCI manifest (schemaVersion is not 2)".into());
    }
    let mut policy = m
        .layers
        .iter()
        .filter(|l| l.media_type == POLICY_MEDIA_TYPE);
    let layer = match (policy.next(), policy.next()) {
        (Some(l), None) => l,
        (None, _) => {
            let found: Vec<&str> = m.layers.iter().map(|l| l.media_type.as_str()).collect();
            return Err(format!(
                "no layer of media type {POLICY_MEDIA_TYPE} (layers: {})",
                if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join(", ")
                }
            ));
        }
        (Some(_), Some(_)) => {
            return Err(format!(
                "more than one layer of media type {POLICY_MEDIA_TYPE}"
            ));
        }
    };
    crate::refs::check_digest(&layer.digest).map_err(|e| format!("policy layer: {e}"))?;
    if layer.size > MAX_POLICY {
        return Err(format!(
            "the policy layer is {} bytes, over the {} MiB a policy may be",
            layer.size,
            MAX_POLICY / (1024 * 1024)
        ));
    }
    let created = match m.annotations.get(CREATED) {
        None => None,
        Some(t) => Some(
            DateTime::parse_from_rfc3339(t)
                .map_err(|e| format!("annotation {CREATED} {t:?} is not an RFC 3339 time ({e})"))?
                .with_timezone(&Utc),
        ),
    };
    Ok(Parsed {
        layer: Descriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
        },
        created,
    })
}

fn descriptor_json(d: &Descriptor) -> serde_json::Value {
    serde_json::json!({ "mediaType": d.media_type, "digest": d.digest, "size": d.size })
}

/// The manifest stowage publishes for a policy layer, created `at`.
pub fn manifest(config: &Descriptor, layer: &Descriptor, at: DateTime<Utc>) -> Bytes {
    let mut layer_json = descriptor_json(layer);
    layer_json["annotations"] =
        serde_json::json!({ "org.opencontainers.image.title": "policy.toml" });
    let mut config_json = descriptor_json(config);
    config_json["data"] = serde_json::json!("e30=");
    let value = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config_json,
        "layers": [layer_json],
        "annotations": { CREATED: at.to_rfc3339_opts(SecondsFormat::Millis, true) },
    });
    Bytes::from(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(media_type: &str, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size,
        }
    }

    #[test]
    fn what_is_published_reads_back() {
        let at = DateTime::parse_from_rfc3339("2025-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        let bytes = manifest(&d(EMPTY_MEDIA_TYPE, 2), &d(POLICY_MEDIA_TYPE, 10), at);
        let parsed = read(&bytes).unwrap();
        assert_eq!(parsed.layer, d(POLICY_MEDIA_TYPE, 10));
        assert_eq!(parsed.created, Some(at));
        assert!(String::from_utf8_lossy(&bytes).contains(ARTIFACT_TYPE));
    }

    #[test]
    fn an_oras_push_reads_the_same() {
        // `oras push r/p:1 policy.toml:application/vnd.stowage.policy.v1+toml` (oras 1.2).
        let oras = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/vnd.unknown.artifact.v1","config":{{"mediaType":"{EMPTY_MEDIA_TYPE}","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2,"data":"e30="}},"layers":[{{"mediaType":"{POLICY_MEDIA_TYPE}","digest":"sha256:{}","size":12,"annotations":{{"org.opencontainers.image.title":"policy.toml"}}}}],"annotations":{{"{CREATED}":"2025-01-02T03:04:05Z"}}}}"#,
            "b".repeat(64)
        );
        let parsed = read(oras.as_bytes()).unwrap();
        assert_eq!(parsed.layer.size, 12);
        assert!(parsed.created.is_some());
    }

    #[test]
    fn other_artifacts_are_refused_with_what_they_hold() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"sha256:{0}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{0}","size":1}}]}}"#,
            "c".repeat(64)
        );
        let e = read(image.as_bytes()).unwrap_err();
        assert!(
            e.contains("layers: application/vnd.oci.image.layer.v1.tar+gzip"),
            "{e}"
        );
        let big = manifest(
            &d(EMPTY_MEDIA_TYPE, 2),
            &d(POLICY_MEDIA_TYPE, MAX_POLICY + 1),
            Utc::now(),
        );
        assert!(read(&big).unwrap_err().contains("over the 4 MiB"));
    }
}
