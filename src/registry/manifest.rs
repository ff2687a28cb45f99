//! Manifests and indexes as bytes, pure: what kind a document is, its digest
//! checks, the platform entry of an index, the config and layers of an image.
//! No I/O: the client hands in the bytes and headers it received.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::refs::check_digest;
use crate::store::Descriptor;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What the client asks for: every kind stowage reads, never schema 1 (a
/// registry that has only schema 1 may still send it; [`classify`] refuses it).
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Why a document cannot be used; the caller adds where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "schema 1 manifest (deprecated, unsupported): push the image again with a current docker or another tool"
    )]
    Schema1,
    #[error("unsupported media type {0:?} (expected an OCI or Docker schema 2 manifest or index)")]
    MediaType(String),
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("digest mismatch: {what} says {expected}, the bytes hash to {actual}")]
    Digest {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("size mismatch: the index says {expected} bytes, got {actual}")]
    Size { expected: u64, actual: u64 },
    #[error("no manifest for platform {wanted} (the index has: {available})")]
    NoPlatform { wanted: String, available: String },
    #[error("an index whose {platform} entry is an index again ({media_type}) is not supported")]
    NestedIndex {
        platform: String,
        media_type: String,
    },
}

/// The kind of a top-level document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Index,
    Image,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Only what classification needs: registries may omit the body's
/// `mediaType` (OCI allows it) or send a generic `Content-Type`.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
}

/// The media type and kind of a manifest document from the answer's
/// `Content-Type` (parameters dropped) and the body: a known `Content-Type`
/// wins, then the body's `mediaType`, then its shape (OCI documents may
/// carry neither).
pub fn classify(content_type: Option<&str>, body: &[u8]) -> Result<(String, Kind), ManifestError> {
    let header = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    let probe: Probe = serde_json::from_slice(body)
        .map_err(|e| ManifestError::Invalid(format!("not a JSON object ({e})")))?;
    let schema1 = |t: &str| t == DOCKER_SCHEMA1 || t == DOCKER_SCHEMA1_SIGNED;
    if probe.schema_version == Some(1)
        || header.as_deref().is_some_and(schema1)
        || probe.media_type.as_deref().is_some_and(schema1)
    {
        return Err(ManifestError::Schema1);
    }
    let kind_of = |t: &str| match t {
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        _ => None,
    };
    for t in [header.as_deref(), probe.media_type.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Some(kind) = kind_of(t) {
            return Ok((t.to_owned(), kind));
        }
    }
    match (&probe.manifests, &probe.config, &probe.layers) {
        (Some(_), None, None) => Ok((OCI_INDEX.to_owned(), Kind::Index)),
        (None, Some(_), Some(_)) => Ok((OCI_MANIFEST.to_owned(), Kind::Image)),
        _ => Err(ManifestError::MediaType(
            probe
                .media_type
                .or(header)
                .unwrap_or_else(|| "(none)".to_owned()),
        )),
    }
}

/// The digest of `body`, checked against the `Docker-Content-Digest` header
/// (when it names a sha256 digest: another algorithm cannot be checked
/// here) and against the reference when that is a digest.
pub fn check_digest_of(
    body: &[u8],
    header: Option<&str>,
    reference: &str,
) -> Result<String, ManifestError> {
    let actual = sha256_digest(body);
    let checks = [
        ("the Docker-Content-Digest header", header.map(str::trim)),
        ("the reference", Some(reference)),
    ];
    for (what, expected) in checks {
        if let Some(expected) = expected.filter(|e| e.starts_with("sha256:"))
            && expected != actual
        {
            return Err(ManifestError::Digest {
                what,
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    Ok(actual)
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(flatten)]
    descriptor: Descriptor,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// `(os, arch, variant)` with the defaults the engine applies: `arm64` is
/// `v8` and `arm` is `v7` unless said otherwise; `x86_64`/`aarch64` are the
/// Go names' aliases.
fn normalise(os: &str, arch: &str, variant: Option<&str>) -> (String, String, String) {
    let arch = match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "armhf" => "arm",
        a => a,
    };
    let variant = match (arch, variant.filter(|v| !v.is_empty())) {
        ("arm64", None | Some("8")) => "v8",
        ("arm", None | Some("7")) => "v7",
        (_, Some(v)) => v,
        (_, None) => "",
    };
    (os.to_owned(), arch.to_owned(), variant.to_owned())
}

/// The entry of an index for `platform` (`os/arch[/variant]`, already
/// validated): the first entry whose normalised platform equals it.
/// Entries without a platform (attestations, artifacts) never match.
pub fn select_platform(index: &[u8], platform: &str) -> Result<Descriptor, ManifestError> {
    let index: Index =
        serde_json::from_slice(index).map_err(|e| ManifestError::Invalid(format!("index: {e}")))?;
    let mut parts = platform.splitn(3, '/');
    let (os, arch) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let wanted = normalise(os, arch, parts.next());
    let mut available = Vec::new();
    for entry in index.manifests {
        let Some(p) = entry.platform else { continue };
        if normalise(&p.os, &p.architecture, p.variant.as_deref()) == wanted {
            check_descriptor(&entry.descriptor, "index entry")?;
            if matches!(
                entry.descriptor.media_type.as_str(),
                OCI_INDEX | DOCKER_LIST
            ) {
                return Err(ManifestError::NestedIndex {
                    platform: platform.to_owned(),
                    media_type: entry.descriptor.media_type,
                });
            }
            return Ok(entry.descriptor);
        }
        let name = match p.variant.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        };
        if p.os != "unknown" && !available.contains(&name) {
            available.push(name);
        }
    }
    Err(ManifestError::NoPlatform {
        wanted: platform.to_owned(),
        available: if available.is_empty() {
            "no platform entries".to_owned()
        } else {
            available.join(", ")
        },
    })
}

#[derive(Deserialize)]
struct Image {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The config and layers of an image manifest, every digest sha256.
pub fn image_parts(manifest: &[u8]) -> Result<(Descriptor, Vec<Descriptor>), ManifestError> {
    let image: Image = serde_json::from_slice(manifest)
        .map_err(|e| ManifestError::Invalid(format!("image manifest: {e}")))?;
    check_descriptor(&image.config, "config")?;
    for layer in &image.layers {
        check_descriptor(layer, "layer")?;
    }
    Ok((image.config, image.layers))
}

/// Only sha256 digests, as the store accepts.
fn check_descriptor(d: &Descriptor, what: &str) -> Result<(), ManifestError> {
    check_digest(&d.digest).map_err(|e| ManifestError::Invalid(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn index() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D1}","size":10,
                "platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D2}","size":20,
                "platform":{{"os":"linux","architecture":"arm","variant":"v6"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D3}","size":30,
                "platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":5,
                "platform":{{"os":"unknown","architecture":"unknown"}}}}
            ]}}"#
        )
    }

    #[test]
    fn platforms_are_matched_with_the_engines_defaults() {
        let index = index();
        let pick = |p| select_platform(index.as_bytes(), p).map(|d| d.digest);
        assert_eq!(pick("linux/amd64").unwrap(), D1);
        assert_eq!(pick("linux/arm64").unwrap(), D3, "arm64 means arm64/v8");
        assert_eq!(pick("linux/arm64/v8").unwrap(), D3);
        assert_eq!(pick("linux/arm/v6").unwrap(), D2);
        let err = pick("linux/arm").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no manifest for platform linux/arm (the index has: linux/amd64, linux/arm/v6, linux/arm64/v8)",
            "arm means arm/v7; the attestation entry is not offered"
        );
    }

    #[test]
    fn kinds_come_from_the_header_then_the_body_then_the_shape() {
        let list = index();
        assert_eq!(
            classify(Some("application/json"), list.as_bytes()).unwrap(),
            (DOCKER_LIST.to_owned(), Kind::Index)
        );
        let bare = r#"{"schemaVersion":2,"config":{},"layers":[]}"#.as_bytes();
        assert_eq!(
            classify(None, bare).unwrap(),
            (OCI_MANIFEST.to_owned(), Kind::Image)
        );
        assert_eq!(
            classify(Some(&format!("{OCI_MANIFEST}; charset=utf-8")), bare).unwrap(),
            (OCI_MANIFEST.to_owned(), Kind::Image)
        );
        let bare_index = r#"{"schemaVersion":2,"manifests":[]}"#.as_bytes();
        assert_eq!(classify(None, bare_index).unwrap().1, Kind::Index);
        let odd = r#"{"schemaVersion":2,"mediaType":"text/plain"}"#.as_bytes();
        assert_eq!(
            classify(None, odd).unwrap_err(),
            ManifestError::MediaType("text/plain".into())
        );
        assert!(matches!(
            classify(None, b"<html>"),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn schema1_is_refused_whatever_the_header_says() {
        let signed = r#"{"schemaVersion":1,"name":"a","tag":"1","fsLayers":[]}"#.as_bytes();
        for header in [None, Some(DOCKER_SCHEMA1_SIGNED), Some(DOCKER_MANIFEST)] {
            let err = classify(header, signed).unwrap_err();
            assert_eq!(err, ManifestError::Schema1);
            assert!(err.to_string().contains("schema 1"), "{err}");
        }
    }

    #[test]
    fn digests_are_checked_against_header_and_reference() {
        let body = b"{}";
        let real = sha256_digest(body);
        assert_eq!(check_digest_of(body, Some(&real), "latest").unwrap(), real);
        assert_eq!(check_digest_of(body, None, &real).unwrap(), real);
        // Another algorithm cannot be checked here; the reference still is.
        assert_eq!(
            check_digest_of(body, Some("sha512:abc"), "v1").unwrap(),
            real
        );
        let err = check_digest_of(body, Some(D1), "v1").unwrap_err();
        assert!(
            err.to_string()
                .contains("Docker-Content-Digest header says sha256:1111"),
            "{err}"
        );
        let err = check_digest_of(body, Some(&real), D2).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::Digest {
                what: "the reference",
                ..
            }
        ));
    }

    #[test]
    fn image_parts_need_sha256_digests() {
        let ok = format!(
            r#"{{"config":{{"mediaType":"c","digest":"{D1}","size":1}},
                "layers":[{{"mediaType":"l","digest":"{D2}","size":2,"urls":["x"]}}]}}"#
        );
        let (config, layers) = image_parts(ok.as_bytes()).unwrap();
        assert_eq!((config.size, layers[0].size), (1, 2));
        let bad = r#"{"config":{"mediaType":"c","digest":"sha512:ab","size":1},"layers":[]}"#;
        let err = image_parts(bad.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("config"), "{err}");
    }

    #[test]
    fn nested_indexes_are_refused() {
        let nested = format!(
            r#"{{"manifests":[{{"mediaType":"{OCI_INDEX}","digest":"{D1}","size":1,
                "platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        assert!(matches!(
            select_platform(nested.as_bytes(), "linux/amd64"),
            Err(ManifestError::NestedIndex { .. })
        ));
    }
}
