//! Fixture images for tests, the demo seeder and benchmarks.
//!
//! Builds docker-archive tarballs (the legacy `docker save` format) in memory,
//! so one `Engine::load` call creates many distinct images with a chosen
//! creation time, size and tags, something `docker import` cannot do.
//!
//! Layout of the archive:
//! - `manifest.json`: `[{"Config": "<id>.json", "RepoTags": [...], "Layers": [...]}]`
//! - `<id>.json`: the image config; `<id>` is its sha256, i.e. the image id.
//! - `<diff_id>/layer.tar`: one uncompressed tar per layer.
//!
//! Everything is deterministic: the same [`FixtureImage`] always gives the same
//! image id, and a shared base layer is byte-identical across images.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One image to put in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureImage {
    /// `repository:tag` references; empty gives a dangling image.
    pub tags: Vec<String>,
    /// Creation time written into the config, seconds since the Unix epoch.
    pub created: i64,
    /// Bytes of the image's own layer (the engine reports this, plus the base).
    pub size: usize,
    /// Makes the own layer unique: different seeds give different images.
    pub seed: u64,
    /// A base layer `(seed, size)` shared with every image using the same
    /// pair, to exercise shared-layer accounting.
    pub shared_base: Option<(u64, usize)>,
}

impl FixtureImage {
    /// An image with one layer of `size` bytes made from `seed`.
    pub fn new(seed: u64, created: i64, size: usize) -> Self {
        FixtureImage {
            tags: Vec::new(),
            created,
            size,
            seed,
            shared_base: None,
        }
    }

    /// Adds a reference.
    #[must_use]
    pub fn tag(mut self, reference: impl Into<String>) -> Self {
        self.tags.push(reference.into());
        self
    }

    /// Puts a shared base layer under the image's own layer.
    #[must_use]
    pub fn with_base(mut self, seed: u64, size: usize) -> Self {
        self.shared_base = Some((seed, size));
        self
    }

    /// The image id the engine will report after loading: `sha256:<hex>`.
    pub fn id(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.config_json()))
    }

    /// Total bytes of all layer contents; what the engine lists as `Size`.
    pub fn total_size(&self) -> u64 {
        let base = self.shared_base.map_or(0, |(_, size)| size);
        (base + self.size) as u64
    }

    /// Layer tars, base first.
    fn layers(&self) -> Vec<Vec<u8>> {
        let mut layers = Vec::with_capacity(2);
        if let Some((seed, size)) = self.shared_base {
            layers.push(layer_tar("base", seed, size));
        }
        layers.push(layer_tar("own", self.seed, self.size));
        layers
    }

    fn config_json(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self
            .layers()
            .iter()
            .map(|layer| format!("sha256:{}", sha256_hex(layer)))
            .collect();
        config_json(self.created, &diff_ids)
    }
}

/// A docker-archive tarball holding every image in `images`, ready for one
/// `docker load`. Layers shared by several images are stored once.
pub fn archive(images: &[FixtureImage]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut written_layers = BTreeSet::new();
    let mut manifest = Vec::with_capacity(images.len());

    for image in images {
        let mut layer_paths = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in image.layers() {
            let hex = sha256_hex(&layer);
            let path = format!("{hex}/layer.tar");
            if written_layers.insert(hex.clone()) {
                append(&mut out, &path, &layer);
            }
            layer_paths.push(path);
            diff_ids.push(format!("sha256:{hex}"));
        }
        let config = config_json(image.created, &diff_ids);
        let config_path = format!("{}.json", sha256_hex(&config));
        append(&mut out, &config_path, &config);
        manifest.push(json!({
            "Config": config_path,
            // `null` (not `[]`) is what `docker save` writes for an untagged image.
            "RepoTags": if image.tags.is_empty() { json!(null) } else { json!(image.tags) },
            "Layers": layer_paths,
        }));
    }

    let manifest = serde_json::to_vec(&manifest).expect("a JSON value always serializes");
    append(&mut out, "manifest.json", &manifest);
    out.into_inner()
        .expect("finishing a tar in memory cannot fail")
}

fn config_json(created: i64, diff_ids: &[String]) -> Vec<u8> {
    let created: DateTime<Utc> =
        DateTime::from_timestamp(created, 0).unwrap_or(DateTime::UNIX_EPOCH);
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        // `docker create` needs a command; the binary need not exist.
        "config": { "Cmd": ["/bin/true"], "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        // One history entry per layer, as `docker build` writes: the engine's
        // history API (per-layer sizes) reads layers through it.
        "history": diff_ids.iter().map(|_| json!({
            "created": created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "created_by": "stowage fixture layer",
        })).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&config).expect("a JSON value always serializes")
}

/// A layer holding one file of `size` pseudo-random bytes derived from `seed`.
/// The file name carries the seed too, so even empty layers differ.
fn layer_tar(kind: &str, seed: u64, size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size);
    let mut state = seed ^ 0x5354_4f57_4147_4521; // "STOWAGE!"
    while data.len() < size {
        let word = splitmix64(&mut state).to_le_bytes();
        let take = (size - data.len()).min(word.len());
        data.extend_from_slice(&word[..take]);
    }
    let mut layer = tar::Builder::new(Vec::new());
    append(&mut layer, &format!("stowage-{kind}-{seed:016x}"), &data);
    layer
        .into_inner()
        .expect("finishing a tar in memory cannot fail")
}

fn append(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    // Fixed owner and mtime keep the bytes, and so the ids, deterministic.
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, path, data)
        .expect("appending to a tar in memory cannot fail (paths are short)");
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Read;

    use super::*;

    fn entries(archive: &[u8]) -> HashMap<String, Vec<u8>> {
        let mut out = HashMap::new();
        let mut reader = tar::Archive::new(archive);
        for entry in reader.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.insert(path, data);
        }
        out
    }

    #[test]
    fn same_seed_gives_same_id_and_bytes() {
        let a = FixtureImage::new(7, 1_700_000_000, 1000).tag("x/a:1");
        let b = FixtureImage::new(7, 1_700_000_000, 1000).tag("x/b:2");
        assert_eq!(a.id(), b.id(), "tags are not part of the image id");
        assert_eq!(archive(std::slice::from_ref(&a)), archive(&[a]));
    }

    #[test]
    fn seed_and_created_change_the_id() {
        let base = FixtureImage::new(1, 1_700_000_000, 10);
        assert_ne!(base.id(), FixtureImage::new(2, 1_700_000_000, 10).id());
        assert_ne!(base.id(), FixtureImage::new(1, 1_700_000_001, 10).id());
        // Empty layers still differ by seed.
        assert_ne!(
            FixtureImage::new(1, 0, 0).id(),
            FixtureImage::new(2, 0, 0).id()
        );
    }

    #[test]
    fn archive_has_manifest_config_and_layers() {
        let tagged = FixtureImage::new(1, 1_600_000_000, 2048)
            .tag("t/app:v1")
            .tag("t/app:latest")
            .with_base(99, 4096);
        let dangling = FixtureImage::new(2, 1_600_000_100, 10).with_base(99, 4096);
        let files = entries(&archive(&[tagged.clone(), dangling.clone()]));

        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let manifest = manifest.as_array().unwrap();
        assert_eq!(manifest.len(), 2);
        assert_eq!(manifest[0]["RepoTags"], json!(["t/app:v1", "t/app:latest"]));
        assert!(manifest[1]["RepoTags"].is_null());
        // The shared base layer is the same path in both and stored once.
        assert_eq!(manifest[0]["Layers"][0], manifest[1]["Layers"][0]);
        let layer_files = files.keys().filter(|p| p.ends_with("layer.tar")).count();
        assert_eq!(layer_files, 3);

        let config_path = manifest[0]["Config"].as_str().unwrap();
        assert_eq!(format!("sha256:{}", &config_path[..64]), tagged.id());
        let config: serde_json::Value = serde_json::from_slice(&files[config_path]).unwrap();
        assert_eq!(config["created"], "2020-09-13T12:26:40Z");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(diff_ids.len(), 2);
        for (diff_id, layer_path) in diff_ids
            .iter()
            .zip(manifest[0]["Layers"].as_array().unwrap())
        {
            let layer = &files[layer_path.as_str().unwrap()];
            assert_eq!(
                diff_id.as_str().unwrap(),
                format!("sha256:{}", sha256_hex(layer))
            );
        }
        assert_eq!(tagged.total_size(), 2048 + 4096);
    }

    #[test]
    fn layer_holds_exactly_size_bytes() {
        let layer = layer_tar("own", 3, 12_345);
        let files = entries(&layer);
        assert_eq!(files.len(), 1);
        assert_eq!(files.values().next().unwrap().len(), 12_345);
    }
}
