//! `bundle create --from-engine`: the engine's export (`docker save`; 20.10
//! writes a docker-archive with uncompressed layer tars and no OCI
//! manifest) staged in `FILE.partial.d/`, read with the same care as a
//! bundle, then each image rebuilt as an OCI manifest: the config's bytes
//! exactly (the same image id), each layer gzipped once (checked against
//! its diff id on the way), so the bundle is about the size of
//! `docker save | gzip`. gzip here is deterministic (no name, mtime 0): the
//! same image gives the same manifest digest every time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::create::{Contents, Created, Src, config_platform, full_name};
use super::tar_out::partial_of;
use super::{
    BundleError, DockerManifest, Entry, Inventory, JSON_MAX, OCI_CONFIG, OCI_LAYER_GZIP,
    OCI_MANIFEST,
};
use crate::engine::Engine;
use crate::store::Descriptor;
use crate::transfer::layers::{chain_ids, diff_ids};

/// `bundle create --from-engine REF…`: every REF must name an image the
/// engine holds (else nothing is written).
pub async fn create_from_engine<E: Engine>(
    engine: &E,
    references: &[String],
    since: Option<&Inventory>,
    out: &Path,
) -> Result<Created, BundleError> {
    let mut wanted = Vec::new();
    for r in references {
        match engine.image(r).await? {
            Some(image) => wanted.push((full_name(r), image.id)),
            None => {
                return Err(BundleError::Image {
                    reference: r.clone(),
                    why: "the engine has no such image".into(),
                });
            }
        }
    }
    let staging = Staging::new(out)?;
    let export = staging.dir.join("export.tar");
    engine.export(references, &export).await?;
    let held: HashSet<String> = since.map(Inventory::chains).unwrap_or_default();
    let host = since.map(|i| i.host.clone());
    let out = out.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let contents = build(&export, &staging.dir, &wanted, &held)?;
        let created = contents.write(&out, host.as_deref());
        drop(staging);
        created
    })
    .await
    .map_err(|e| BundleError::Input(format!("the bundle writer failed: {e}")))?
}

/// `FILE.partial.d/`, removed when dropped.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging, BundleError> {
        let mut name = partial_of(out).into_os_string();
        name.push(".d");
        let dir = PathBuf::from(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| BundleError::Write {
            what: "cannot create",
            path: dir.clone(),
            source,
        })?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The export's regular files by name (offset, size), links resolved.
struct Export {
    path: PathBuf,
    files: HashMap<String, (u64, u64)>,
    links: HashMap<String, String>,
}

impl Export {
    fn scan(path: &Path) -> Result<Export, BundleError> {
        let bad = |why: String| {
            BundleError::Input(format!("the engine's export {}: {why}", path.display()))
        };
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut tar = tar::Archive::new(file);
        let mut export = Export {
            path: path.to_path_buf(),
            files: HashMap::new(),
            links: HashMap::new(),
        };
        for entry in tar.entries_with_seek().map_err(|e| bad(e.to_string()))? {
            let entry = entry.map_err(|e| bad(e.to_string()))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let name = name.trim_start_matches("./").to_owned();
            let kind = entry.header().entry_type();
            if kind.is_file() {
                export
                    .files
                    .insert(name, (entry.raw_file_position(), entry.size()));
            } else if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let target = if kind.is_symlink() {
                    resolve(&name, &target)
                } else {
                    Some(target)
                };
                if let Some(t) = target {
                    export.links.insert(name, t);
                }
            }
        }
        Ok(export)
    }

    /// A file's (offset, size), through at most a few links; never outside the tar.
    fn find(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = name.to_owned();
        for _ in 0..8 {
            if let Some(f) = self.files.get(&name) {
                return Some(*f);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }

    fn open(&self, name: &str) -> Result<std::io::Take<File>, BundleError> {
        let (offset, size) = self
            .find(name)
            .ok_or_else(|| BundleError::Input(format!("the engine's export has no {name}")))?;
        let io = |e: std::io::Error| BundleError::Write {
            what: "cannot read",
            path: self.path.clone(),
            source: e,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        Ok(file.take(size))
    }

    fn small(&self, name: &str) -> Result<Vec<u8>, BundleError> {
        let mut out = Vec::new();
        self.open(name)?
            .take(JSON_MAX + 1)
            .read_to_end(&mut out)
            .map_err(|e| BundleError::Input(format!("the engine's export, {name}: {e}")))?;
        if out.len() as u64 > JSON_MAX {
            return Err(BundleError::Input(format!(
                "the engine's export: {name} is too large"
            )));
        }
        Ok(out)
    }
}

/// A symlink's target as a name in the tar, relative to the link's folder.
fn resolve(link: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for p in target.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// The bundle's contents from the export: one OCI manifest per image.
fn build(
    export_path: &Path,
    staging: &Path,
    wanted: &[(String, String)],
    held: &HashSet<String>,
) -> Result<Contents, BundleError> {
    let export = Export::scan(export_path)?;
    let list: Vec<DockerManifest> = serde_json::from_slice(&export.small("manifest.json")?)
        .map_err(|e| BundleError::Input(format!("the engine's export: manifest.json: {e}")))?;
    // The images by id: the sha256 of their config file.
    let mut by_id: BTreeMap<String, (Vec<u8>, DockerManifest)> = BTreeMap::new();
    for m in list {
        let config = export.small(&m.config)?;
        let id = format!("sha256:{}", hex::encode(Sha256::digest(&config)));
        by_id.insert(id, (config, m));
    }
    let mut contents = Contents::default();
    let mut layers_done = HashMap::new();
    let mut manifests: HashMap<String, (Entry, Descriptor, Vec<Descriptor>, Vec<String>)> =
        HashMap::new();
    for (name, id) in wanted {
        if !manifests.contains_key(id) {
            let (config, m) = by_id.get(id).ok_or_else(|| BundleError::Image {
                reference: name.clone(),
                why: format!("the engine's export does not hold image {id}"),
            })?;
            let made = image(
                &export,
                staging,
                id,
                config,
                m,
                held,
                &mut layers_done,
                &mut contents,
            )
            .map_err(|why| BundleError::Image {
                reference: name.clone(),
                why,
            })?;
            manifests.insert(id.clone(), made);
        }
        let (entry, config, layers, omitted) = manifests[id].clone();
        contents.image(name, entry, &config, &layers, &omitted);
    }
    Ok(contents)
}

/// One image's OCI manifest, its config and gzipped layers into `contents`.
#[allow(clippy::too_many_arguments)]
fn image(
    export: &Export,
    staging: &Path,
    id: &str,
    config: &[u8],
    m: &DockerManifest,
    held: &HashSet<String>,
    done: &mut HashMap<String, (Descriptor, PathBuf)>,
    contents: &mut Contents,
) -> Result<(Entry, Descriptor, Vec<Descriptor>, Vec<String>), String> {
    let ids = diff_ids(config)?;
    if ids.len() != m.layers.len() {
        return Err(format!(
            "its config has {} diff ids, the export {} layers",
            ids.len(),
            m.layers.len()
        ));
    }
    let chains = chain_ids(&ids);
    let mut layers = Vec::new();
    let mut omitted = Vec::new();
    for (i, path) in m.layers.iter().enumerate() {
        let (d, staged) = match done.get(&ids[i]) {
            Some(held_before) => held_before.clone(),
            None => {
                // Gzipped even when left out: the manifest names its digest.
                let staged = staging.join(format!("layer-{}", done.len()));
                let d = gzip_layer(export, path, &ids[i], &staged)?;
                done.insert(ids[i].clone(), (d.clone(), staged.clone()));
                (d, staged)
            }
        };
        if held.contains(&chains[i]) {
            omitted.push(d.digest.clone());
        } else {
            contents.blob(&d, Src::File(staged));
        }
        layers.push(d);
    }
    let config_d = Descriptor {
        media_type: OCI_CONFIG.into(),
        digest: id.to_owned(),
        size: config.len() as u64,
    };
    contents.blob(&config_d, Src::Memory(config.to_vec()));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_d,
        "layers": layers,
    }))
    .expect("a manifest serialises");
    let manifest_d = Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&manifest))),
        size: manifest.len() as u64,
    };
    contents.blob(&manifest_d, Src::Memory(manifest));
    let entry = Entry {
        descriptor: manifest_d,
        platform: config_platform(config),
        annotations: BTreeMap::new(),
    };
    Ok((entry, config_d, layers, omitted))
}

/// Gzips one layer of the export into `to`; its descriptor. The
/// uncompressed bytes must hash to `diff_id`.
fn gzip_layer(export: &Export, path: &str, diff_id: &str, to: &Path) -> Result<Descriptor, String> {
    let mut src = export.open(path).map_err(|e| e.to_string())?;
    let file = File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let out = Tee {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        n: 0,
    };
    let mut gz = flate2::GzBuilder::new().write(out, flate2::Compression::best());
    let mut raw = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(|e| format!("{path}: {e}"))?;
        if n == 0 {
            break;
        }
        raw.update(&buf[..n]);
        gz.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", to.display()))?;
    }
    let mut out = gz.finish().map_err(|e| format!("{}: {e}", to.display()))?;
    out.inner
        .flush()
        .map_err(|e| format!("{}: {e}", to.display()))?;
    let got = format!("sha256:{}", hex::encode(raw.finalize()));
    if got != diff_id {
        return Err(format!(
            "layer {path} of the engine's export hashes to {got}, its config says {diff_id}"
        ));
    }
    Ok(Descriptor {
        media_type: OCI_LAYER_GZIP.into(),
        digest: format!("sha256:{}", hex::encode(out.hasher.finalize())),
        size: out.n,
    })
}

struct Tee<W> {
    inner: W,
    hasher: Sha256,
    n: u64,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn links_resolve_inside_the_export() {
        assert_eq!(
            resolve("b/layer.tar", "../a/layer.tar").as_deref(),
            Some("a/layer.tar")
        );
        assert_eq!(resolve("b/layer.tar", "/etc/passwd"), None);
        assert_eq!(resolve("layer.tar", "../../x"), None);
    }
}
