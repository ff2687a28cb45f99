//! `bundle verify`: every blob of the file hashed once (in file order), then
//! every image of `index.json` walked from its entry to its layers: each
//! blob it needs present, of the size its descriptor says, with its sha256.
//! A delta bundle's left-out layers (named in its entries' annotations) are
//! not damage: they are listed per image, with their diff ids, for the
//! importing host to have. Damage names the blob and the images it breaks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;

use sha2::{Digest as _, Sha256};

use super::archive::{Archive, Member};
use super::{
    ANNOTATION_NAME, ANNOTATION_OMITTED, ANNOTATION_REF, ANNOTATION_SERVED, ANNOTATION_SINCE,
    BundleError, DOCKER_LIST, Damage, DockerManifest, IndexDoc, JSON_MAX, OCI_INDEX,
};
use crate::refs::{check_digest, split_tag};
use crate::registry::manifest::image_parts;
use crate::store::Descriptor;
use crate::transfer::layers::{chain_ids, diff_ids};

/// A layer a delta bundle leaves out: the importing host must hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingLayer {
    pub layer: Descriptor,
    /// Its diff id (the uncompressed tar's sha256), from the image config.
    pub diff_id: String,
    /// Its chain id: this layer and every one below it, as the engine names it.
    pub chain_id: String,
}

/// One image of a verified bundle (one `index.json` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleImage {
    /// The full reference (`io.containerd.image.name`), e.g.
    /// `127.0.0.1:5000/team/app:1`.
    pub name: String,
    /// Its tag (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// The `index.json` entry itself (stowage's own OCI index around a
    /// Docker-typed manifest, or `top`).
    pub entry: Descriptor,
    /// What the registry served for the reference (index or manifest),
    /// byte for byte: pins of it hold.
    pub top: Descriptor,
    /// The platform's image manifest (`== top` for a single manifest).
    pub manifest: Descriptor,
    /// `os/arch[/variant]` when `top` is an index.
    pub platform: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The config's `rootfs.diff_ids`, bottom first.
    pub diff_ids: Vec<String>,
    /// Layers left out of a delta bundle; empty for a complete image.
    pub missing: Vec<MissingLayer>,
}

impl BundleImage {
    /// The image id the engine gives it (its config digest).
    pub fn id(&self) -> &str {
        &self.config.digest
    }
}

/// A bundle whose every blob and image checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `sha256:` of `index.json`.
    pub digest: String,
    pub images: Vec<BundleImage>,
    /// For a delta bundle: the host of the inventory it was made against.
    pub since: Option<String>,
    blobs: Vec<Descriptor>,
}

impl Verified {
    /// Every blob in the bundle (media type as the images reference it).
    pub fn blobs(&self) -> &[Descriptor] {
        &self.blobs
    }

    /// Whether some image lacks layers the importing host must have.
    pub fn is_delta(&self) -> bool {
        self.images.iter().any(|i| !i.missing.is_empty())
    }

    /// Bytes of all blobs.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}

/// Verifies `archive` whole; with `expect`, its digest must be that one
/// (checked first, before any blob is read).
pub fn verify(archive: &Archive, expect: Option<&str>) -> Result<Verified, BundleError> {
    let digest = archive.digest();
    if let Some(expected) = expect
        && expected.trim() != digest
    {
        return Err(BundleError::NotExpected {
            path: archive.path().to_path_buf(),
            expected: expected.trim().to_owned(),
            actual: digest,
        });
    }
    let index: IndexDoc = serde_json::from_slice(archive.index_bytes())
        .map_err(|e| archive.layout(&format!("index.json is not an OCI index: {e}")))?;
    if index.schema_version != 2 {
        return Err(archive.layout("index.json does not say schemaVersion 2"));
    }
    if index.manifests.is_empty() {
        return Err(archive.layout("index.json lists no image"));
    }
    let mut walk = Walk {
        archive,
        hashed: hash_all(archive)?,
        users: BTreeMap::new(),
        damage: BTreeMap::new(),
        types: HashMap::new(),
    };
    let mut images = Vec::new();
    for (i, entry) in index.manifests.iter().enumerate() {
        let d = &entry.descriptor;
        let name = entry
            .annotations
            .get(ANNOTATION_NAME)
            .cloned()
            .ok_or_else(|| {
                archive.layout(&format!(
                    "index.json entry {i} ({}) has no {ANNOTATION_NAME} annotation",
                    d.digest
                ))
            })?;
        check_digest(&d.digest).map_err(|e| {
            archive.layout(&format!(
                "index.json entry {i} ({name}) names {:?}, not a blob of the layout ({e})",
                d.digest
            ))
        })?;
        let tag = entry
            .annotations
            .get(ANNOTATION_REF)
            .cloned()
            .or_else(|| split_tag(&name).1.map(str::to_owned))
            .unwrap_or_default();
        let omitted: BTreeSet<&str> = entry
            .annotations
            .get(ANNOTATION_OMITTED)
            .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        let served = entry.annotations.get(ANNOTATION_SERVED).map(String::as_str);
        if let Some(image) = walk.image(&name, &tag, d, served, &omitted) {
            images.push(image);
        }
    }
    if let Some(bytes) = archive.json("manifest.json")? {
        walk.docker_manifest(&bytes);
    }
    // Blobs no image uses are still checked: a damaged one is damage.
    for (digest, result) in &walk.hashed {
        if let Err(why) = result
            && !walk.damage.contains_key(digest)
        {
            walk.damage.insert(digest.clone(), why.clone());
        }
    }
    if !walk.damage.is_empty() {
        let damage = walk
            .damage
            .iter()
            .map(|(blob, why)| Damage {
                blob: blob.clone(),
                why: why.clone(),
                images: walk
                    .users
                    .get(blob)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
            })
            .collect();
        return Err(BundleError::Damaged {
            path: archive.path().to_path_buf(),
            damage,
        });
    }
    let blobs = archive
        .blobs()
        .map(|(digest, m)| Descriptor {
            media_type: walk
                .types
                .get(&digest)
                .cloned()
                .unwrap_or_else(|| "application/octet-stream".into()),
            digest,
            size: m.size,
        })
        .collect();
    Ok(Verified {
        digest,
        images,
        since: index.annotations.get(ANNOTATION_SINCE).cloned(),
        blobs,
    })
}

/// Every blob hashed once, in file order: `Err(why)` for one cut short or
/// whose bytes do not hash to its name.
fn hash_all(archive: &Archive) -> Result<BTreeMap<String, Result<(), String>>, BundleError> {
    let mut blobs: Vec<(String, Member)> = archive.blobs().collect();
    blobs.sort_by_key(|(_, m)| m.offset);
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 20];
    for (digest, m) in blobs {
        if m.truncated() {
            out.insert(
                digest,
                Err(format!(
                    "cut short: {} of its {} bytes are in the file",
                    m.present, m.size
                )),
            );
            continue;
        }
        let mut reader = archive.reader(m);
        let mut hasher = Sha256::new();
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|source| BundleError::Unreadable {
                    path: archive.path().to_path_buf(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        let result = if got == digest {
            Ok(())
        } else {
            Err(format!("its bytes hash to {got}"))
        };
        out.insert(digest, result);
    }
    Ok(out)
}

struct Walk<'a> {
    archive: &'a Archive,
    hashed: BTreeMap<String, Result<(), String>>,
    /// Which images need each blob (for the damage report).
    users: BTreeMap<String, BTreeSet<String>>,
    damage: BTreeMap<String, String>,
    /// Media types as the images reference the blobs.
    types: HashMap<String, String>,
}

impl Walk<'_> {
    /// One image from its `index.json` entry; `None` when damage stops the
    /// walk (recorded).
    fn image(
        &mut self,
        name: &str,
        tag: &str,
        entry: &Descriptor,
        served: Option<&str>,
        omitted: &BTreeSet<&str>,
    ) -> Option<BundleImage> {
        let entry_bytes = self.need(name, entry)?;
        let (top, manifest, platform, manifest_bytes) =
            if matches!(entry.media_type.as_str(), OCI_INDEX | DOCKER_LIST) {
                let index: IndexDoc = match serde_json::from_slice(&entry_bytes) {
                    Ok(i) => i,
                    Err(e) => return self.bad(&entry.digest, format!("not an index: {e}")),
                };
                let child = |digest: &str| {
                    index
                        .manifests
                        .iter()
                        .find(|c| c.descriptor.digest == digest)
                        .map(|c| c.descriptor.clone())
                };
                let top = match served {
                    None => entry.clone(),
                    Some(s) => match child(s) {
                        Some(t) => t,
                        None => {
                            return self.bad(
                                &entry.digest,
                                format!("{ANNOTATION_SERVED} names {s}, which it does not list"),
                            );
                        }
                    },
                };
                if top != *entry {
                    self.need(name, &top)?;
                }
                // The platform's manifest is the child with a platform that is here.
                let Some(pick) = index.manifests.iter().find(|c| {
                    c.platform.is_some()
                        && !matches!(c.descriptor.media_type.as_str(), OCI_INDEX | DOCKER_LIST)
                        && self.archive.blob_member(&c.descriptor.digest).is_some()
                }) else {
                    return self.bad(
                        &entry.digest,
                        "none of the platform manifests it lists is in the bundle".into(),
                    );
                };
                let bytes = self.need(name, &pick.descriptor)?;
                let platform = pick.platform.as_ref().map(super::Platform::text);
                (top, pick.descriptor.clone(), platform, bytes)
            } else {
                (entry.clone(), entry.clone(), None, entry_bytes)
            };
        let (config, layers) = match image_parts(&manifest_bytes) {
            Ok(parts) => parts,
            Err(e) => return self.bad(&manifest.digest, e.to_string()),
        };
        let config_bytes = self.need(name, &config)?;
        let ids = match diff_ids(&config_bytes) {
            Ok(ids) => ids,
            Err(e) => return self.bad(&config.digest, e),
        };
        let chains = chain_ids(&ids);
        let mut missing = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let left_out = omitted.contains(layer.digest.as_str())
                && self.archive.blob_member(&layer.digest).is_none();
            if left_out {
                missing.push(MissingLayer {
                    layer: layer.clone(),
                    diff_id: ids.get(i).cloned().unwrap_or_default(),
                    chain_id: chains.get(i).cloned().unwrap_or_default(),
                });
            } else {
                self.check(name, layer);
            }
        }
        Some(BundleImage {
            name: name.to_owned(),
            tag: tag.to_owned(),
            entry: entry.clone(),
            top,
            manifest,
            platform,
            config,
            layers,
            diff_ids: ids,
            missing,
        })
    }

    /// Records that `image` needs `d`; whether it is present, of its size
    /// and hashes right (damage recorded otherwise).
    fn check(&mut self, image: &str, d: &Descriptor) -> bool {
        self.users
            .entry(d.digest.clone())
            .or_default()
            .insert(image.to_owned());
        self.types
            .entry(d.digest.clone())
            .or_insert_with(|| d.media_type.clone());
        if self.damage.contains_key(&d.digest) {
            return false;
        }
        let why = match self.archive.blob_member(&d.digest) {
            None if check_digest(&d.digest).is_err() => Some(format!(
                "{:?} is not a sha256 digest of the layout",
                d.digest
            )),
            None => Some("missing from the bundle".to_owned()),
            Some(m) if m.size != d.size => {
                Some(format!("{} bytes, its descriptor says {}", m.size, d.size))
            }
            Some(_) => self.hashed.get(&d.digest).and_then(|r| r.clone().err()),
        };
        match why {
            Some(why) => {
                self.damage.insert(d.digest.clone(), why);
                false
            }
            None => true,
        }
    }

    /// [`Walk::check`], then the blob's bytes (a JSON document, bounded).
    fn need(&mut self, image: &str, d: &Descriptor) -> Option<Vec<u8>> {
        if !self.check(image, d) {
            return None;
        }
        if d.size > JSON_MAX {
            return self.bad(
                &d.digest,
                format!("{} bytes: larger than any manifest or config read", d.size),
            );
        }
        let mut out = Vec::new();
        match self.archive.blob(&d.digest).and_then(|mut r| {
            r.read_to_end(&mut out)
                .map_err(|source| BundleError::Unreadable {
                    path: self.archive.path().to_path_buf(),
                    source,
                })
        }) {
            Ok(_) => Some(out),
            Err(e) => self.bad(&d.digest, e.to_string()),
        }
    }

    fn bad<T>(&mut self, digest: &str, why: String) -> Option<T> {
        self.damage.entry(digest.to_owned()).or_insert(why);
        None
    }

    /// Docker's `manifest.json`: each path it names is a blob of the bundle.
    fn docker_manifest(&mut self, bytes: &[u8]) {
        let images: Vec<DockerManifest> = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.damage.insert(
                    "manifest.json".into(),
                    format!("not a Docker manifest list: {e}"),
                );
                return;
            }
        };
        for image in images {
            let name = image
                .repo_tags
                .as_ref()
                .and_then(|t| t.first().cloned())
                .unwrap_or_else(|| image.config.clone());
            for path in std::iter::once(&image.config).chain(&image.layers) {
                if self.archive.member(path).is_none() || !path.starts_with("blobs/sha256/") {
                    self.users
                        .entry(path.clone())
                        .or_default()
                        .insert(name.clone());
                    self.damage.entry(path.clone()).or_insert_with(|| {
                        "manifest.json names it; it is not a blob of the bundle".into()
                    });
                }
            }
        }
    }
}
