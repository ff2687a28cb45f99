//! Policy signatures: keys an operator makes with `openssl` (ed25519 or
//! ECDSA P-256, PEM), the signed payload, and checking a signature.
//!
//! The payload is cosign's "simple signing" JSON naming the policy
//! manifest's digest; the manifest names the policy layer's digest, so the
//! text and its `created` annotation are covered. ECDSA signatures are
//! ASN.1 DER over SHA-256 (cosign's), ed25519 the plain 64 bytes. The
//! crypto is ring's (already built for the registry client's TLS).

use std::path::Path;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::Deserialize;

/// Media type of the payload layer (cosign's).
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature (cosign's).
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Largest payload read: it is one short JSON line.
pub const MAX_PAYLOAD: u64 = 64 * 1024;

/// DER prefixes of SubjectPublicKeyInfo for the two accepted kinds; the
/// encodings are canonical, so the key is what follows.
const SPKI_ED25519: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
const SPKI_P256: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The algorithm OIDs as they appear in a PKCS#8 key.
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {why}")]
    Unusable { path: String, why: String },
}

/// A public key that policies must be signed with (`--policy-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Ed25519(Vec<u8>),
    /// The uncompressed point.
    P256(Vec<u8>),
}

/// A private key that signs (`stowage policy push --sign`).
pub enum PrivateKey {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

const MAKE_KEYS: &str = "make one with `openssl genpkey -algorithm ed25519 -out key.pem` (or `-algorithm EC -pkeyopt ec_paramgen_curve:P-256`) and its public half with `openssl pkey -in key.pem -pubout -out key.pub`";

/// The DER inside the first PEM block labelled `label`.
fn pem(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| {
        let found = text
            .lines()
            .find_map(|l| l.strip_prefix("-----BEGIN "))
            .map(|l| l.trim_end_matches('-'));
        match found {
            Some(other) => format!("a PEM {other:?}, not a {label:?}; {MAKE_KEYS}"),
            None => format!("not a PEM key; {MAKE_KEYS}"),
        }
    })? + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| format!("the PEM block has no {end} line"))?;
    let body: String = text[start..start + stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("the PEM block is not base64 ({e})"))
}

fn read_key(path: &Path) -> Result<String, KeyError> {
    let unusable = |why: String| KeyError::Unusable {
        path: path.display().to_string(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| unusable(format!("cannot read: {e}")))?;
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return Err(unusable(
            "not a key file (a regular file of a few lines)".into(),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| unusable(format!("cannot read: {e}")))
}

impl PublicKey {
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        Self::parse(&read_key(path)?).map_err(|why| KeyError::Unusable {
            path: path.display().to_string(),
            why,
        })
    }

    /// A `PUBLIC KEY` PEM (SubjectPublicKeyInfo): ed25519 or P-256.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let der = pem(text, "PUBLIC KEY")?;
        if let Some(key) = der.strip_prefix(SPKI_ED25519).filter(|k| k.len() == 32) {
            return Ok(PublicKey::Ed25519(key.to_vec()));
        }
        if let Some(point) = der
            .strip_prefix(SPKI_P256)
            .filter(|p| p.len() == 65 && p[0] == 4)
        {
            return Ok(PublicKey::P256(point.to_vec()));
        }
        Err(format!(
            "not an ed25519 or P-256 public key (uncompressed); {MAKE_KEYS}"
        ))
    }

    /// Whether `signature` is this key's over `payload`.
    pub fn verifies(&self, payload: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Ed25519(k) => UnparsedPublicKey::new(&signature::ED25519, k)
                .verify(payload, signature)
                .is_ok(),
            PublicKey::P256(p) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, p)
                .verify(payload, signature)
                .is_ok(),
        }
    }
}

impl PrivateKey {
    pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
        Self::parse(&read_key(path)?).map_err(|why| KeyError::Unusable {
            path: path.display().to_string(),
            why,
        })
    }

    /// An unencrypted PKCS#8 `PRIVATE KEY` PEM (what `openssl genpkey` writes).
    pub fn parse(text: &str) -> Result<PrivateKey, String> {
        if text.contains("-----BEGIN EC PRIVATE KEY-----") {
            return Err(
                "a SEC1 \"EC PRIVATE KEY\": convert it with `openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.p8.pem`"
                    .into(),
            );
        }
        let der = pem(text, "PRIVATE KEY")?;
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        if has(OID_ED25519) {
            return Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                .map(PrivateKey::Ed25519)
                .map_err(|e| format!("unusable ed25519 key: {e}"));
        }
        if has(OID_P256) {
            return EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &der,
                &SystemRandom::new(),
            )
            .map(PrivateKey::P256)
            .map_err(|e| format!("unusable P-256 key: {e}"));
        }
        Err(format!("not an ed25519 or P-256 private key; {MAKE_KEYS}"))
    }

    pub fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            PrivateKey::Ed25519(k) => Ok(k.sign(payload).as_ref().to_vec()),
            PrivateKey::P256(k) => k
                .sign(&SystemRandom::new(), payload)
                .map(|s| s.as_ref().to_vec())
                .map_err(|e| format!("signing failed: {e}")),
        }
    }

    /// The public half, to check a signature before it is published.
    pub fn public(&self) -> PublicKey {
        match self {
            PrivateKey::Ed25519(k) => PublicKey::Ed25519(k.public_key().as_ref().to_vec()),
            PrivateKey::P256(k) => PublicKey::P256(k.public_key().as_ref().to_vec()),
        }
    }
}

/// The payload signed for the manifest `digest` of `repository` (named
/// `host/repo`, as cosign does; only the digest is checked: a mirror
/// serves the same manifest under another host).
pub fn payload(repository: &str, digest: &str) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": { "docker-reference": repository },
            "image": { "docker-manifest-digest": digest },
            "type": "cosign container image signature",
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

/// The manifest digest a payload vouches for.
pub fn payload_digest(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Payload {
        critical: Critical,
    }
    #[derive(Deserialize)]
    struct Critical {
        image: Image,
    }
    #[derive(Deserialize)]
    struct Image {
        #[serde(rename = "docker-manifest-digest")]
        digest: String,
    }
    serde_json::from_slice::<Payload>(payload)
        .ok()
        .map(|p| p.critical.image.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `openssl genpkey` (ed25519; EC P-256) and `openssl pkey -pubout`.
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIMJN0+UBwX0h7wdAlrGTJyeLMtRcBe4csJIw50yFSPAy\n-----END PRIVATE KEY-----\n";
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgDgjOC8nxF56dkGC2
u0GbWVWwlwl+FyCHXEOqeh0fQ6uhRANCAASg//mdfZs9Zs3HvP1pypVS16oGifcZ
EgPJ/mpgPz0PXPCnoVR1RhNNSHpIP+tMd0gwqlDtZKfUiseI//My63vF
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEoP/5nX2bPWbNx7z9acqVUteqBon3
GRIDyf5qYD89D1zwp6FUdUYTTUh6SD/rTHdIMKpQ7WSn1IrHiP/zMut7xQ==
-----END PUBLIC KEY-----
";

    #[test]
    fn p256_keys_from_openssl_sign_and_verify() {
        let key = PrivateKey::parse(EC_PRIVATE).unwrap();
        let public = PublicKey::parse(EC_PUBLIC).unwrap();
        assert_eq!(key.public(), public);
        let payload = payload("r/p", "sha256:01");
        let sig = key.sign(&payload).unwrap();
        assert!(public.verifies(&payload, &sig));
        assert!(!public.verifies(b"other", &sig));
        let ed = PrivateKey::parse(ED_PRIVATE).unwrap().public();
        assert!(!ed.verifies(&payload, &sig), "a key of another kind");
    }

    #[test]
    fn ed25519_signs_and_only_its_key_verifies() {
        let key = PrivateKey::parse(ED_PRIVATE).unwrap();
        let public = key.public();
        let payload = payload("r/p", "sha256:00");
        let sig = key.sign(&payload).unwrap();
        assert!(public.verifies(&payload, &sig));
        let mut other = payload.clone();
        other[0] ^= 1;
        assert!(!public.verifies(&other, &sig), "tampered payload");
        let PublicKey::Ed25519(mut bytes) = public else {
            panic!("ed25519")
        };
        bytes[0] ^= 1;
        assert!(
            !PublicKey::Ed25519(bytes).verifies(&payload, &sig),
            "another key"
        );
        assert_eq!(payload_digest(&payload).as_deref(), Some("sha256:00"));
    }

    #[test]
    fn wrong_kinds_of_key_are_named() {
        let e = PublicKey::parse(ED_PRIVATE).unwrap_err();
        assert!(e.contains("\"PRIVATE KEY\", not a \"PUBLIC KEY\""), "{e}");
        let e = PrivateKey::parse(
            "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n",
        )
        .err()
        .unwrap();
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
        assert!(
            PublicKey::parse("hello")
                .unwrap_err()
                .contains("not a PEM key")
        );
    }
}
