//! Pure: what the content store path needs to know about names, platforms
//! and layers, without I/O: the repository as a registry's API names it,
//! this host's platform, an image config's diff ids, chain ids, and which
//! layers the engine already holds.

use std::collections::HashSet;

use serde::Deserialize;

use crate::refs::{self, DEFAULT_REGISTRY, canonical_registry};
use crate::store::Descriptor;

/// The repository as its registry's API names it: without the host, Docker
/// Hub's official images under `library/`.
pub(crate) fn api_path(repository: &str) -> String {
    let path = refs::path_of(repository);
    if canonical_registry(refs::registry_of(repository)) == DEFAULT_REGISTRY && !path.contains('/')
    {
        format!("library/{path}")
    } else {
        path.to_owned()
    }
}

/// This host's platform as OCI names it (`linux/amd64`, `linux/arm64`,
/// `linux/arm/v7`).
pub(crate) fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm/v7",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// Pure: the config's `rootfs.diff_ids`.
pub(crate) fn diff_ids(config: &[u8]) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    serde_json::from_slice::<Config>(config)
        .map(|c| c.rootfs.diff_ids)
        .map_err(|e| format!("not an image config with rootfs.diff_ids: {e}"))
}

/// Pure: chain ids from diff ids, bottom first (as the engine names its
/// layers: the first is its diff id, each next the sha256 of
/// `"<chain below> <diff id>"`).
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(below) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{below} {d}")))
            ),
        };
        out.push(next);
    }
    out
}

/// Pure: the layers to fetch and those skipped because the engine holds
/// their chain (and so everything below). When the manifest's layers do
/// not pair up with the config's diff ids, every layer is fetched.
pub(super) fn split_layers(
    layers: &[Descriptor],
    diff_ids: &[String],
    held: &HashSet<String>,
) -> (Vec<Descriptor>, Vec<Descriptor>) {
    if layers.len() != diff_ids.len() {
        return (layers.to_vec(), Vec::new());
    }
    let chains = chain_ids(diff_ids);
    // Held chains are a prefix: the top held one covers all below it.
    let covered = chains
        .iter()
        .rposition(|c| held.contains(c))
        .map_or(0, |i| i + 1);
    (layers[covered..].to_vec(), layers[..covered].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
            digest: format!("sha256:{}", format!("{n:x}").repeat(64)),
            size: u64::from(n) * 100,
        }
    }

    #[test]
    fn api_paths_drop_the_host_and_add_library_for_docker_hub() {
        assert_eq!(api_path("nginx"), "library/nginx");
        assert_eq!(api_path("docker.io/nginx"), "library/nginx");
        assert_eq!(api_path("team/app"), "team/app");
        assert_eq!(api_path("127.0.0.1:5000/team/app"), "team/app");
        assert_eq!(api_path("mirror.local:5000/library/nginx"), "library/nginx");
        assert_eq!(api_path("mirror.local:5000/nginx"), "nginx");
    }

    #[test]
    fn chain_ids_match_the_engines_and_held_chains_skip_their_layers() {
        let diffs: Vec<String> = (1..=3)
            .map(|n| format!("sha256:{}", format!("{n}").repeat(64)))
            .collect();
        let chains = chain_ids(&diffs);
        assert_eq!(chains[0], diffs[0]);
        // sha256("<chain0> <diff1>"), as `docker image inspect` layers chain.
        use sha2::{Digest, Sha256};
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{} {}", diffs[0], diffs[1])))
        );
        assert_eq!(chains[1], want);
        let layers: Vec<Descriptor> = (1..=3).map(layer).collect();
        let none = HashSet::new();
        assert_eq!(
            split_layers(&layers, &diffs, &none),
            (layers.clone(), vec![])
        );
        let base: HashSet<String> = [chains[1].clone()].into();
        assert_eq!(
            split_layers(&layers, &diffs, &base),
            (layers[2..].to_vec(), layers[..2].to_vec())
        );
        // Layers that do not pair with the diff ids: all are fetched.
        assert_eq!(
            split_layers(&layers[..2], &diffs, &base).0,
            layers[..2].to_vec()
        );
    }

    #[test]
    fn diff_ids_come_from_the_config() {
        let config =
            br#"{"architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        assert_eq!(diff_ids(config).unwrap(), ["sha256:aa"]);
        assert!(diff_ids(b"{}").is_err());
    }

    #[test]
    fn the_host_platform_is_os_slash_arch() {
        let p = host_platform();
        assert!(refs::check_platform(&p).is_ok(), "{p}");
    }
}
