//! `bundle create`: the images gathered (from registries through the
//! content store, or from the engine's export, see [`super::from_engine`]),
//! then one tar written: `oci-layout`, `index.json`, `manifest.json`, then
//! the blobs in digest order, each once.
//!
//! From a registry, manifests go into the bundle as served (their digests,
//! and pins, hold). skopeo 1.9 finds names only among OCI-typed
//! `index.json` entries, so a Docker-typed manifest sits behind an OCI
//! index of stowage's own (one platform entry; annotation
//! [`ANNOTATION_SERVED`] names what was served).
//!
//! `--since INVENTORY`: a layer is left out when the inventory's host holds
//! it at the same place (its chain id: the layer and everything below it,
//! as the engine keeps layers), and is named in the entry's
//! [`ANNOTATION_OMITTED`]. An image with left-out layers is not in
//! `manifest.json` (`docker load` cannot load it).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::tar_out::TarOut;
use super::{
    ANNOTATION_NAME, ANNOTATION_OMITTED, ANNOTATION_REF, ANNOTATION_SERVED, ANNOTATION_SINCE,
    BundleError, DockerManifest, Entry, IndexDoc, Inventory, OCI_INDEX, OCI_MANIFEST, Platform,
    blob_name,
};
use crate::credentials::CredentialStore;
use crate::refs::{DEFAULT_REGISTRY, Reference, canonical_registry, path_of, registry_of};
use crate::registry::{self, Registry};
use crate::store::{Descriptor, FetchOptions, Store};
use crate::transfer::layers::{api_path, chain_ids, diff_ids, host_platform};

/// Largest config read back from the store.
const CONFIG_MAX: u64 = 4 << 20;

/// What `bundle create` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub path: PathBuf,
    /// `sha256:` of its `index.json`.
    pub digest: String,
    /// Full references, in `index.json` order.
    pub images: Vec<String>,
    /// Bytes of the file.
    pub bytes: u64,
    /// Layers left out (`--since`), by digest.
    pub left_out: Vec<String>,
}

/// Where one blob's bytes come from when the tar is written.
#[derive(Debug, Clone)]
pub(crate) enum Src {
    Memory(Vec<u8>),
    /// A file holding exactly the blob (the store's, or a staged layer).
    File(PathBuf),
}

/// The bundle's contents before they are written.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    pub entries: Vec<Entry>,
    pub docker: Vec<DockerManifest>,
    pub blobs: BTreeMap<String, (u64, Src)>,
    pub left_out: Vec<String>,
}

impl Contents {
    pub(crate) fn blob(&mut self, d: &Descriptor, src: Src) {
        self.blobs.entry(d.digest.clone()).or_insert((d.size, src));
    }

    /// One image: its `index.json` entry (named), and its `manifest.json`
    /// line unless layers were left out.
    pub(crate) fn image(
        &mut self,
        name: &str,
        mut entry: Entry,
        config: &Descriptor,
        layers: &[Descriptor],
        omitted: &[String],
    ) {
        entry
            .annotations
            .insert(ANNOTATION_NAME.into(), name.to_owned());
        entry
            .annotations
            .insert(ANNOTATION_REF.into(), ref_name(name).to_owned());
        if omitted.is_empty() {
            let tag = familiar(name);
            match self
                .docker
                .iter_mut()
                .find(|m| m.config == blob_name(&config.digest))
            {
                Some(m) => m.repo_tags.get_or_insert_with(Vec::new).push(tag),
                None => self.docker.push(DockerManifest {
                    config: blob_name(&config.digest),
                    repo_tags: Some(vec![tag]),
                    layers: layers.iter().map(|l| blob_name(&l.digest)).collect(),
                }),
            }
        } else {
            entry
                .annotations
                .insert(ANNOTATION_OMITTED.into(), omitted.join(","));
            for o in omitted {
                if !self.left_out.contains(o) {
                    self.left_out.push(o.clone());
                }
            }
        }
        self.entries.push(entry);
    }

    /// Writes the tar: `FILE.partial`, fsynced, renamed to `out`. File
    /// sources are hashed as they are copied.
    pub(crate) fn write(self, out: &Path, since: Option<&str>) -> Result<Created, BundleError> {
        let mut annotations = BTreeMap::new();
        if let Some(host) = since {
            annotations.insert(ANNOTATION_SINCE.to_owned(), host.to_owned());
        }
        let images = self
            .entries
            .iter()
            .filter_map(|e| e.annotations.get(ANNOTATION_NAME).cloned())
            .collect();
        let index = IndexDoc {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests: self.entries,
            annotations,
        };
        let index = serde_json::to_vec(&index).expect("an index serialises");
        let docker = serde_json::to_vec(&self.docker).expect("a manifest list serialises");
        // The layout files first: a file cut short still says what it held
        // and names the blobs it lost.
        let mut tar = TarOut::create(out)?;
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        tar.file("oci-layout", layout.len() as u64, &layout[..])?;
        tar.file("index.json", index.len() as u64, index.as_slice())?;
        tar.file("manifest.json", docker.len() as u64, docker.as_slice())?;
        for (digest, (size, src)) in &self.blobs {
            let name = blob_name(digest);
            match src {
                Src::Memory(bytes) => tar.file(&name, *size, bytes.as_slice())?,
                Src::File(path) => {
                    let file = std::fs::File::open(path).map_err(|source| BundleError::Write {
                        what: "cannot read blob",
                        path: path.clone(),
                        source,
                    })?;
                    let mut hashing = Hashing {
                        inner: file.take(*size),
                        hasher: Sha256::new(),
                    };
                    tar.file(&name, *size, &mut hashing)?;
                    let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
                    if &got != digest {
                        return Err(BundleError::Write {
                            what: "blob changed on disk",
                            path: path.clone(),
                            source: std::io::Error::other(format!("{digest} now hashes to {got}")),
                        });
                    }
                }
            }
        }
        let bytes = tar.finish()?;
        Ok(Created {
            path: out.to_path_buf(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&index))),
            images,
            bytes,
            left_out: self.left_out,
        })
    }
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// `docker.io/library/busybox:1` for `busybox:1`: the full reference.
pub fn full_name(reference: &str) -> String {
    let host = canonical_registry(registry_of(reference));
    let path = path_of(reference);
    if host == DEFAULT_REGISTRY && !path.contains('/') {
        format!("{host}/library/{path}")
    } else {
        format!("{host}/{path}")
    }
}

/// `busybox:1` for `docker.io/library/busybox:1`: as `docker images` shows it.
pub(crate) fn familiar(name: &str) -> String {
    let rest = name
        .strip_prefix("docker.io/library/")
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name);
    rest.to_owned()
}

/// The tag of a full reference (its digest when it has no tag).
fn ref_name(name: &str) -> &str {
    let (named, digest) = match name.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (name, None),
    };
    match crate::refs::split_tag(named).1 {
        Some(tag) => tag,
        None => digest.unwrap_or("latest"),
    }
}

/// One image asked for from a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The full reference it is named by in the bundle (with its tag, or
    /// its digest when it has none).
    pub name: String,
    /// Registries tried in order (`host[:port]`): a prepull's `sources`, then its own.
    pub registries: Vec<String>,
    /// The repository path at the registry's API.
    pub path: String,
    /// What is resolved: the pin when there is one, else the tag.
    pub reference: String,
    pub platform: Option<String>,
}

impl Wanted {
    /// From `repo[:tag][@digest]` (a missing tag is `latest`), pinned to
    /// `pin` when given.
    pub fn parse(
        text: &str,
        pin: Option<&str>,
        platform: Option<&str>,
        sources: &[String],
    ) -> Result<Wanted, BundleError> {
        let r = Reference::parse(text)
            .map_err(|e| BundleError::Input(format!("{text:?} is not an image reference: {e}")))?;
        let digest = pin.map(str::to_owned).or(r.digest.clone());
        let tag = r
            .tag
            .clone()
            .or_else(|| digest.is_none().then(|| "latest".to_owned()));
        let named = match (&tag, &digest) {
            (Some(t), _) => format!("{}:{t}", r.repository),
            (None, Some(d)) => format!("{}@{d}", r.repository),
            (None, None) => unreachable!("a tag or a digest"),
        };
        let mut registries = sources.to_vec();
        registries.push(registry_of(&r.repository).to_owned());
        Ok(Wanted {
            name: full_name(&named),
            registries,
            path: api_path(&r.repository),
            reference: digest.or(tag).expect("a tag or a digest"),
            platform: platform.map(str::to_owned),
        })
    }
}

/// How registry downloads behave.
#[derive(Debug, Clone)]
pub struct Fetching<'a> {
    pub store: &'a Store,
    pub credentials: &'a CredentialStore,
    /// An attempt without a byte for this long is retried.
    pub stall: Duration,
    /// A download without a byte for this long fails (its partial kept).
    pub give_up: Duration,
    pub cancel: &'a CancellationToken,
}

/// `bundle create` from registries: each image resolved, its blobs fetched
/// into the content store (resumable, verified), then the tar written from
/// the store. Any image that cannot be had: nothing written.
pub async fn create_from_registry(
    wanted: &[Wanted],
    fetching: &Fetching<'_>,
    since: Option<&Inventory>,
    out: &Path,
) -> Result<Created, BundleError> {
    let held: HashSet<String> = since.map(Inventory::chains).unwrap_or_default();
    let mut contents = Contents::default();
    for w in wanted {
        add_from_registry(w, fetching, &held, &mut contents).await?;
    }
    let host = since.map(|i| i.host.clone());
    let out = out.to_path_buf();
    tokio::task::spawn_blocking(move || contents.write(&out, host.as_deref()))
        .await
        .map_err(|e| BundleError::Input(format!("the bundle writer failed: {e}")))?
}

async fn add_from_registry(
    w: &Wanted,
    f: &Fetching<'_>,
    held: &HashSet<String>,
    contents: &mut Contents,
) -> Result<(), BundleError> {
    let image_error = |why: String| BundleError::Image {
        reference: w.name.clone(),
        why,
    };
    let platform = w.platform.clone().unwrap_or_else(host_platform);
    let mut failures = Vec::new();
    let mut found = None;
    for host in &w.registries {
        let options = registry::Options {
            timeout: f.stall,
            ..registry::Options::default()
        };
        let client = match Registry::new(host, f.credentials.for_registry(host), &options) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{host}: {e}"));
                continue;
            }
        };
        match client.resolve(&w.path, &w.reference, &platform).await {
            Ok(r) => {
                found = Some((client, r));
                break;
            }
            Err(e) => failures.push(format!("{host}: {e}")),
        }
    }
    let Some((client, resolved)) = found else {
        return Err(image_error(failures.join("; ")));
    };
    let store = f.store;
    store.put(&resolved.top.0, &resolved.top.1)?;
    store.put(&resolved.manifest.0, &resolved.manifest.1)?;
    let source = client.blobs(&w.path);
    let progress = |_: crate::store::Progress| {};
    let opts = FetchOptions {
        stall: f.stall,
        give_up: f.give_up,
        cancel: f.cancel,
        progress: &progress,
    };
    store
        .fetch(&source, &resolved.config, &opts)
        .await
        .map_err(|e| image_error(e.to_string()))?;
    let config_bytes = store.read(&resolved.config.digest, CONFIG_MAX)?;
    let ids = diff_ids(&config_bytes).map_err(|e| image_error(format!("config: {e}")))?;
    let chains = chain_ids(&ids);
    let mut omitted = Vec::new();
    for (i, layer) in resolved.layers.iter().enumerate() {
        let have = resolved.layers.len() == chains.len() && held.contains(&chains[i]);
        if have {
            omitted.push(layer.digest.clone());
            continue;
        }
        store
            .fetch(&source, layer, &opts)
            .await
            .map_err(|e| image_error(e.to_string()))?;
        contents.blob(layer, Src::File(store.blob_file(&layer.digest)?));
    }
    let file = |d: &Descriptor| store.blob_file(&d.digest).map(Src::File);
    contents.blob(&resolved.config, file(&resolved.config)?);
    contents.blob(&resolved.top.0, Src::Memory(resolved.top.1.to_vec()));
    contents.blob(
        &resolved.manifest.0,
        Src::Memory(resolved.manifest.1.to_vec()),
    );
    let top = &resolved.top.0;
    let oci = matches!(top.media_type.as_str(), OCI_INDEX | OCI_MANIFEST);
    let entry = if oci {
        Entry {
            descriptor: top.clone(),
            platform: None,
            annotations: BTreeMap::new(),
        }
    } else {
        // stowage's own OCI index in front of what was served.
        let mut manifests = vec![Entry {
            descriptor: resolved.manifest.0.clone(),
            platform: Some(
                config_platform(&config_bytes).unwrap_or_else(|| Platform::parse(&platform)),
            ),
            annotations: BTreeMap::new(),
        }];
        if top != &resolved.manifest.0 {
            manifests.push(Entry {
                descriptor: top.clone(),
                platform: None,
                annotations: BTreeMap::new(),
            });
        }
        let wrapper = IndexDoc {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests,
            annotations: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&wrapper).expect("an index serialises");
        let d = Descriptor {
            media_type: OCI_INDEX.into(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            size: bytes.len() as u64,
        };
        contents.blob(&d, Src::Memory(bytes));
        let mut annotations = BTreeMap::new();
        annotations.insert(ANNOTATION_SERVED.to_owned(), top.digest.clone());
        Entry {
            descriptor: d,
            platform: None,
            annotations,
        }
    };
    contents.image(&w.name, entry, &resolved.config, &resolved.layers, &omitted);
    Ok(())
}

/// `os/architecture[/variant]` of an image config.
pub(crate) fn config_platform(config: &[u8]) -> Option<Platform> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    Some(Platform {
        os: v["os"].as_str()?.to_owned(),
        architecture: v["architecture"].as_str()?.to_owned(),
        variant: v["variant"].as_str().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_full_and_familiar() {
        assert_eq!(full_name("busybox:1"), "docker.io/library/busybox:1");
        assert_eq!(full_name("team/app:2"), "docker.io/team/app:2");
        assert_eq!(
            full_name("127.0.0.1:5000/ns/app:1"),
            "127.0.0.1:5000/ns/app:1"
        );
        assert_eq!(familiar("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(
            familiar("127.0.0.1:5000/ns/app:1"),
            "127.0.0.1:5000/ns/app:1"
        );
        assert_eq!(ref_name("127.0.0.1:5000/ns/app:1"), "1");
        assert_eq!(ref_name("r/app@sha256:ab"), "sha256:ab");
    }

    #[test]
    fn wanted_takes_pins_and_registries() {
        let w = Wanted::parse(
            "127.0.0.1:5000/ns/app:1",
            Some("sha256:aa"),
            None,
            &["m:5000".into()],
        )
        .unwrap();
        assert_eq!(w.name, "127.0.0.1:5000/ns/app:1");
        assert_eq!(w.reference, "sha256:aa");
        assert_eq!(w.registries, ["m:5000", "127.0.0.1:5000"]);
        assert_eq!(w.path, "ns/app");
        assert!(Wanted::parse("Bad Name", None, None, &[]).is_err());
    }
}
