//! Fixture images for tests, the demo seeder and benchmarks, and the tests'
//! fixed clock ([`FixedClock`]).
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

/// A clock stopped at a time (Unix seconds): the one fixed clock of the
/// tests, unit and integration alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedClock(pub i64);

impl crate::reconcile::Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.0, 0).expect("a fixed time within chrono's range")
    }
}

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

/// A synthetic image store, built in memory for planner benchmarks
/// (`benches/planner.rs`, `examples/plan_scale.rs`): never loaded into an
/// engine, so it can hold 100k references.
#[derive(Debug, Clone)]
pub struct SyntheticStore {
    /// Images, containers and per-image layers, as `reconcile::observe_for`
    /// would gather them.
    pub observed: crate::plan::Observed,
    /// First-seen and last-used times, as after earlier reconciles.
    pub state: crate::state::State,
    /// References plus dangling images: what `n` counts.
    pub references: usize,
    /// Unique bytes of all layers (what `[storage] max_size` limits).
    pub unique_bytes: u64,
}

/// The "now" of synthetic stores (2026-01-01T00:00:00Z): fixed so that
/// runs are comparable.
pub const SYNTHETIC_NOW: i64 = 1_767_225_600;

/// A store of about `references` references (tags plus dangling images) with
/// the shapes seen on CI runners and build hosts, deterministic per `seed`:
///
/// - release repositories `registry.example.com/teamT/svcR` with semver tags,
///   some images carrying a second `vX.Y` tag, the newest also `latest`;
/// - CI repositories `ci/appR` with `branch-build` tags on a few branches,
///   some `pr-N` and rule-breaking tags (`debug`, `tmp-N`);
/// - `library/*` images with `1.25`, `1.25-alpine`, `latest` tags;
/// - `tools/*` images ordered by last use;
/// - about 5% dangling images;
/// - containers on about 5% of images; last-use times on some more;
/// - a base layer shared by every image of a repository (`Observed.layers`).
pub fn synthetic_store(references: usize, seed: u64) -> SyntheticStore {
    use crate::engine::{Container, Image, Layer};
    use crate::state::{ImageState, State};

    const DAY: i64 = 86_400;
    const MB: u64 = 1_000_000;
    let mut rng = seed ^ 0x5359_4e54_4845_5449; // "SYNTHETI"
    let mut next = move || splitmix64(&mut rng);
    let mut images: Vec<Image> = Vec::new();
    let mut layers = crate::plan::LayerMap::default();
    let mut count = 0usize;
    let mut serial = 0u64;
    let new_id = |serial: &mut u64| {
        *serial += 1;
        let mut s = seed.wrapping_add(*serial);
        format!(
            "sha256:{:016x}{:016x}{:016x}{:016x}",
            splitmix64(&mut s),
            splitmix64(&mut s),
            splitmix64(&mut s),
            splitmix64(&mut s)
        )
    };
    let push = |images: &mut Vec<Image>,
                layers: &mut crate::plan::LayerMap,
                id: String,
                tags: Vec<String>,
                created: i64,
                base: &Layer,
                own: u64| {
        layers.insert(
            id.clone(),
            vec![
                base.clone(),
                Layer {
                    chain_id: format!("{id}-own"),
                    size: own,
                },
            ],
        );
        images.push(Image {
            id,
            repo_tags: tags,
            repo_digests: Vec::new(),
            created,
            size: base.size + own,
        });
    };

    let mut repo = 0u64;
    while count < references {
        repo += 1;
        let base = Layer {
            chain_id: format!("sha256:base-{seed:x}-{repo}"),
            size: (20 + next() % 60) * MB,
        };
        let kind = next() % 100;
        // (tags, created) of each image of this repository, oldest first.
        let mut repo_images: Vec<(Vec<String>, i64)> = Vec::new();
        let start = SYNTHETIC_NOW - (30 + (next() % 400) as i64) * DAY;
        let span = (SYNTHETIC_NOW - start).max(DAY);
        if kind < 45 {
            let name = format!("registry.example.com/team{}/svc{repo}", repo % 40);
            let releases = 10 + (next() % 50) as usize;
            let (mut major, mut minor, mut patch) = (1u64, 0u64, 0u64);
            for r in 0..releases {
                match next() % 10 {
                    0 => (major, minor, patch) = (major + 1, 0, 0),
                    1..=3 => (minor, patch) = (minor + 1, 0),
                    _ => patch += 1,
                }
                let mut tags = vec![format!("{name}:v{major}.{minor}.{patch}")];
                if next() % 5 == 0 {
                    tags.push(format!("{name}:v{major}.{minor}"));
                }
                if r + 1 == releases {
                    tags.push(format!("{name}:latest"));
                }
                let created = start + span * r as i64 / releases as i64;
                repo_images.push((tags, created));
            }
            // A float left behind on an older release, for `[[float]]` to move.
            if next() % 3 == 0 && releases > 2 {
                repo_images[releases - 2].0.push(format!("{name}:stable"));
            }
        } else if kind < 80 {
            let name = format!("ci/app{repo}");
            let branches = 2 + (next() % 6) as usize;
            for b in 0..branches {
                let branch = match b {
                    0 => "main".to_string(),
                    1 => "develop".to_string(),
                    _ => format!("feat-{}", next() % 1000),
                };
                let builds = 2 + (next() % 14) as i64;
                for n in 0..builds {
                    let created = start + span * n / builds + (b as i64) * 600;
                    let mut tags = vec![format!("{name}:{branch}-{}", 100 + n)];
                    // CI also tags by commit: against the tag convention.
                    if next() % 4 == 0 {
                        tags.push(format!("{name}:git-{:07x}", next() % 0xfff_ffff));
                    }
                    repo_images.push((tags, created));
                }
            }
            for _ in 0..(next() % 4) {
                let created = start + (next() % span as u64) as i64;
                let tag = match next() % 3 {
                    0 => format!("pr-{}", next() % 5000),
                    1 => "debug".to_string(),
                    _ => format!("tmp-{}", next() % 100),
                };
                repo_images.push((vec![format!("{name}:{tag}")], created));
            }
        } else if kind < 90 {
            let name = format!("library/lib{repo}");
            let versions = 2 + (next() % 10) as i64;
            for v in 0..versions {
                let created = start + span * v / versions;
                let mut tags = vec![format!("{name}:1.{v}")];
                if next() % 2 == 0 {
                    tags.push(format!("{name}:1.{v}-alpine"));
                }
                if v + 1 == versions {
                    tags.push(format!("{name}:latest"));
                }
                repo_images.push((tags, created));
            }
        } else {
            let name = format!("tools/tool{repo}");
            for t in 0..(2 + (next() % 8) as i64) {
                let created = start + (next() % span as u64) as i64;
                repo_images.push((vec![format!("{name}:v{t}")], created));
            }
        }
        for (mut tags, created) in repo_images {
            if count >= references {
                break;
            }
            tags.truncate(references - count);
            count += tags.len();
            let id = new_id(&mut serial);
            let own = (1 + next() % 30) * MB;
            push(&mut images, &mut layers, id, tags, created, &base, own);
            // About one dangling image per twenty references: old builds
            // whose tag moved on, on the same base.
            if count < references && next() % 20 == 0 {
                count += 1;
                let id = new_id(&mut serial);
                let own = (1 + next() % 30) * MB;
                push(
                    &mut images,
                    &mut layers,
                    id,
                    Vec::new(),
                    created - DAY,
                    &base,
                    own,
                );
            }
        }
    }

    let mut containers = Vec::new();
    let mut state = State {
        initialized: true,
        ..State::default()
    };
    for (i, img) in images.iter().enumerate() {
        let mut st = ImageState {
            first_seen: img.created,
            ..ImageState::default()
        };
        let roll = next() % 100;
        if roll < 5 {
            let id = format!("{:016x}{:016x}", next(), next());
            containers.push(Container {
                name: format!("c{i}"),
                image_id: img.id.clone(),
                image: img
                    .repo_tags
                    .first()
                    .cloned()
                    .unwrap_or_else(|| img.id.clone()),
                state: ["running", "exited", "created"][(next() % 3) as usize].to_string(),
                id,
            });
        }
        if roll < 15 {
            let since = (SYNTHETIC_NOW - img.created).max(1) as u64;
            st.last_used = Some(img.created + (next() % since) as i64);
        }
        state.images.insert(img.id.clone(), st);
    }
    let observed = crate::plan::Observed {
        images,
        containers,
        layers,
        ..crate::plan::Observed::default()
    };
    let unique_bytes = crate::storage::unique_bytes(&observed.layers, &observed.images);
    SyntheticStore {
        observed,
        state,
        references: count,
        unique_bytes,
    }
}

/// The benchmark policy for [`synthetic_store`]: about twenty rules of every
/// kind (retention with `keep_last`, `semver`, `group_by`, `keep_within`,
/// `last_used`, untagged; protect; tag conventions; floats; pre-pulls) and a
/// `[storage] max_size` of 80% of `unique_bytes`, so eviction has work.
/// `max_removals` stays at its default: what a host runs with.
pub fn synthetic_policy(unique_bytes: u64) -> String {
    let max_size = unique_bytes / 10 * 8;
    format!(
        r#"version = 1
[daemon]
state_dir = "/nonexistent/stowage-bench"
min_age = "1h"

[[retain]]
name = "releases"
images = ["registry.example.com/**"]
tags = ['v\d+\.\d+\.\d+']
keep_last = 15
order = "semver"

[[retain]]
name = "releases-recent"
images = ["registry.example.com/**"]
tags = ['v\d+\.\d+\.\d+', 'v\d+\.\d+']
keep_within = "30d"

[[retain]]
name = "minor-aliases"
images = ["registry.example.com/**"]
tags = ['v\d+\.\d+']
keep_last = 3
order = "semver"

[[retain]]
name = "branch-builds"
images = ["ci/*"]
tags = ['.+-\d+']
keep_last = 3
group_by = '(.+)-\d+'
keep_within = "7d"

[[retain]]
name = "pull-requests"
images = ["ci/*"]
tags = ['pr-\d+']
keep_within = "3d"

[[retain]]
name = "library"
images = ["library/*"]
keep_last = 4
order = "created"

[[retain]]
name = "tools"
images = ["tools/*"]
keep_last = 2
order = "last_used"
keep_within = "14d"

[[retain]]
name = "dangling"
untagged = true
keep_within = "2d"

[[protect]]
name = "production"
images = ["registry.example.com/team0/**"]
tags = ["latest", "stable"]

[[protect]]
name = "base-images"
images = ["library/lib1*"]

[[protect]]
name = "debug-images"
images = ["ci/*"]
tags = ["debug"]

[[tags]]
name = "ci-tag-style"
images = ["ci/*"]
allow = ['(main|develop|feat-\d+)-\d+', 'pr-\d+', "debug"]
on_violation = "untag"

[[tags]]
name = "release-tag-style"
images = ["registry.example.com/**"]
allow = ['v\d+\.\d+\.\d+', 'v\d+\.\d+', "latest", "stable"]
on_violation = "warn"

[[float]]
name = "stable"
images = ["registry.example.com/**"]
tag = "stable"
follow = 'v\d+\.\d+\.\d+'
order = "semver"

[[float]]
name = "ci-latest"
images = ["ci/*"]
tag = "latest"
follow = 'main-\d+'
order = "created"

[[prepull]]
image = "registry.example.com/team1/svc2:latest"
refresh = "never"

[[prepull]]
image = "library/lib3:latest"
refresh = "never"
keep_previous = 1

[storage]
max_size = {max_size}
order = "lru"
"#
    )
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
    fn synthetic_store_has_the_asked_references_and_a_valid_policy() {
        let a = synthetic_store(2_000, 1);
        assert_eq!(a.references, 2_000);
        let refs: usize = a
            .observed
            .images
            .iter()
            .map(|i| i.repo_tags.len().max(1))
            .sum();
        assert_eq!(refs, 2_000);
        assert!(a.observed.images.iter().any(|i| i.repo_tags.is_empty()));
        assert!(!a.observed.containers.is_empty());
        let b = synthetic_store(2_000, 1);
        assert_eq!(
            a.observed.images, b.observed.images,
            "deterministic per seed"
        );
        let policy = synthetic_policy(a.unique_bytes);
        let policy = crate::policy::parse(&policy, std::path::Path::new("bench.toml"))
            .expect("the benchmark policy is valid");
        assert!(policy.storage.is_some());
        let plan = crate::plan::plan(&policy, &a.observed, &a.state, SYNTHETIC_NOW);
        assert!(!plan.actions.is_empty(), "the store gives the planner work");
    }

    #[test]
    fn layer_holds_exactly_size_bytes() {
        let layer = layer_tar("own", 3, 12_345);
        let files = entries(&layer);
        assert_eq!(files.len(), 1);
        assert_eq!(files.values().next().unwrap().len(), 12_345);
    }
}
