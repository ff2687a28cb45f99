//! The local store: listing and inspecting images and containers, removing
//! and tagging, layers for disk accounting, and (testkit) load and save.

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};

use super::raw::as_u64;
use super::{DockerEngine, podman};
use crate::engine::{Container, EngineError, EngineKind, EngineResult, Image, Layer, Removed};

pub(super) async fn list_images(engine: &DockerEngine) -> EngineResult<Vec<Image>> {
    // `all=false`: the default list already holds dangling images;
    // `all=true` would add the intermediate parents of locally built
    // images, which cannot be removed while their children exist.
    let options = ListImagesOptionsBuilder::new().all(false).build();
    let images = podman::again(engine, || {
        engine.bounded("list images", engine.timeout, async {
            engine
                .docker
                .list_images(Some(options.clone()))
                .await
                .map_err(|e| engine.error(e, "list images"))
        })
    })
    .await?;
    Ok(images
        .into_iter()
        .map(|image| Image {
            id: image.id,
            repo_tags: engine.tags_out(real_refs(image.repo_tags)),
            repo_digests: engine.names_out(real_refs(image.repo_digests)),
            created: image.created,
            size: u64::try_from(image.size).unwrap_or(0),
        })
        .collect())
}

impl DockerEngine {
    /// Containers in every state; with `ancestor`, filtered by the engine so
    /// the answer stays small however many containers the host has.
    pub(super) async fn containers(&self, ancestor: Option<&str>) -> EngineResult<Vec<Container>> {
        let filters: std::collections::HashMap<&str, Vec<&str>> = ancestor
            .map(|a| ("ancestor", vec![a]))
            .into_iter()
            .collect();
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .bounded("list containers", self.timeout, async {
                self.docker
                    .list_containers(Some(options))
                    .await
                    .map_err(|e| self.error(e, "list containers"))
            })
            .await?;
        Ok(containers
            .into_iter()
            .map(|c| {
                let mut c = container_of(c);
                c.image = self.name_out(c.image);
                c
            })
            .collect())
    }
}

pub(super) async fn containers_using(
    engine: &DockerEngine,
    image_id: &str,
) -> EngineResult<Vec<Container>> {
    // `ancestor` also matches containers of child images; only exact
    // users count here. Podman's listing with Buildah's containers takes
    // no filter.
    let mut users = match engine.kind {
        EngineKind::Docker => engine.containers(Some(image_id)).await?,
        EngineKind::Podman => podman::containers(engine).await?,
    };
    users.retain(|c| c.image_id == image_id);
    Ok(users)
}

pub(super) async fn image_id_of(
    engine: &DockerEngine,
    reference: &str,
) -> EngineResult<Option<String>> {
    let reference = engine.name_in(reference);
    match engine
        .raw_json("GET", &format!("/images/{reference}/json"), engine.timeout)
        .await
    {
        Ok(v) => Ok(v["Id"].as_str().map(str::to_owned)),
        Err(EngineError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) async fn image(engine: &DockerEngine, reference: &str) -> EngineResult<Option<Image>> {
    let reference = engine.name_in(reference);
    match engine
        .raw_json("GET", &format!("/images/{reference}/json"), engine.timeout)
        .await
    {
        Ok(v) => Ok(v["Id"].as_str().map(|id| Image {
            id: id.to_owned(),
            repo_tags: engine.tags_out(real_refs(strings(&v["RepoTags"]))),
            repo_digests: engine.names_out(real_refs(strings(&v["RepoDigests"]))),
            created: v["Created"]
                .as_str()
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
                .map_or(0, |c| c.timestamp()),
            size: v["Size"].as_u64().unwrap_or(0),
        })),
        Err(EngineError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) async fn remove(engine: &DockerEngine, reference: &str) -> EngineResult<Removed> {
    // Never force; keep pruning of untagged parents (the engine default).
    let options = RemoveImageOptionsBuilder::new()
        .force(false)
        .noprune(false)
        .build();
    let call = format!("remove {reference}");
    let name = engine.name_in(reference);
    let items = engine
        .bounded(&call, engine.slow(), async {
            engine
                .docker
                .remove_image(&name, Some(options), None)
                .await
                .map_err(|e| engine.error(e, &call))
        })
        .await?;
    let mut removed = Removed::default();
    for item in items {
        removed
            .untagged
            .extend(item.untagged.map(|n| engine.name_out(n)));
        removed
            .deleted
            .extend(item.deleted.map(|id| podman::image_id(&id)));
    }
    Ok(removed)
}

pub(super) async fn tag(engine: &DockerEngine, source: &str, target: &str) -> EngineResult<()> {
    if target.contains('@') {
        return Err(EngineError::Other(format!(
            "tag {source} as {target}: a tag target cannot be a digest"
        )));
    }
    let (source_name, target_name) = (engine.name_in(source), engine.name_in(target));
    let (repo, tag) = split_reference(&target_name);
    let options = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
    let call = format!("tag {source} as {target}");
    engine
        .bounded(&call, engine.timeout, async {
            engine
                .docker
                .tag_image(&source_name, Some(options))
                .await
                .map_err(|e| engine.error(e, &call))
        })
        .await
}

pub(super) async fn image_layers(engine: &DockerEngine, id: &str) -> EngineResult<Vec<Layer>> {
    let name = engine.name_in(id);
    let id = name.as_ref();
    let inspect = engine
        .raw_json("GET", &format!("/images/{id}/json"), engine.timeout)
        .await?;
    let history = engine
        .raw_json("GET", &format!("/images/{id}/history"), engine.timeout)
        .await?;
    let diff_ids: Vec<&str> = inspect["RootFS"]["Layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    // History comes newest first; entries of non-empty layers carry the
    // layer's size, empty ones 0.
    let mut sizes: Vec<u64> = history
        .as_array()
        .map(|a| a.iter().map(|h| as_u64(&h["Size"])).collect())
        .unwrap_or_default();
    sizes.reverse();
    Ok(layers_from(id, &diff_ids, &sizes, as_u64(&inspect["Size"])))
}

#[cfg(feature = "testkit")]
pub(super) async fn load(
    engine: &DockerEngine,
    archive: bytes::Bytes,
) -> EngineResult<Vec<String>> {
    use bollard::query_parameters::ImportImageOptionsBuilder;
    let options = ImportImageOptionsBuilder::new().quiet(true).build();
    // The engine answers only once it has read the whole archive: the
    // first item may take long.
    let guard = engine.calls.start("load", engine.slow());
    let mut stream = std::pin::pin!(engine.docker.import_image(
        options,
        bollard::body_full(archive),
        None
    ));
    let mut loaded = Vec::new();
    while let Some(message) =
        DockerEngine::next_within(&mut stream, &guard, "load", engine.slow()).await?
    {
        let info = message.map_err(|e| engine.error(e, "load"))?;
        let Some(text) = info.stream else { continue };
        for line in text.lines() {
            // `Loaded image ID:` first: `Loaded image:` is its prefix.
            if let Some(id) = line.strip_prefix("Loaded image ID:") {
                loaded.push(id.trim().to_owned());
            } else if let Some(references) = line.strip_prefix("Loaded image:") {
                // Podman names every image of the archive on one line.
                loaded.extend(
                    references
                        .split(',')
                        .map(|r| engine.name_out(r.trim().to_owned())),
                );
            }
        }
    }
    Ok(loaded)
}

#[cfg(feature = "testkit")]
pub(super) async fn save(
    engine: &DockerEngine,
    references: &[String],
) -> EngineResult<bytes::Bytes> {
    let names: Vec<String> = references
        .iter()
        .map(|r| engine.name_in(r).into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let call = format!("save {}", references.join(" "));
    let guard = engine.calls.start(&call, engine.slow());
    let mut stream = std::pin::pin!(engine.docker.export_images(&names));
    let mut chunks = Vec::new();
    while let Some(chunk) =
        DockerEngine::next_within(&mut stream, &guard, &call, engine.slow()).await?
    {
        chunks.push(chunk.map_err(|e| engine.error(e, &call))?);
    }
    Ok(bytes::Bytes::from(chunks.concat()))
}

/// `docker save` of `references` streamed into the file `to` (fsynced).
pub(super) async fn export(
    engine: &DockerEngine,
    references: &[String],
    to: &std::path::Path,
) -> EngineResult<u64> {
    use tokio::io::AsyncWriteExt;
    let names: Vec<String> = references
        .iter()
        .map(|r| engine.name_in(r).into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let call = format!("save {}", references.join(" "));
    let file_error = |e: std::io::Error| EngineError::Other(format!("{}: {e}", to.display()));
    let mut file = tokio::fs::File::create(to).await.map_err(file_error)?;
    let guard = engine.calls.start(&call, engine.slow());
    let mut stream = std::pin::pin!(engine.docker.export_images(&names));
    let mut bytes = 0u64;
    while let Some(chunk) =
        DockerEngine::next_within(&mut stream, &guard, &call, engine.slow()).await?
    {
        let chunk = chunk.map_err(|e| engine.error(e, &call))?;
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(file_error)?;
    }
    file.sync_all().await.map_err(file_error)?;
    Ok(bytes)
}

/// The image's `RootFS.Layers` (its diff ids), bottom first.
pub(super) async fn diff_ids(engine: &DockerEngine, id: &str) -> EngineResult<Vec<String>> {
    let id = engine.name_in(id);
    let inspect = engine
        .raw_json("GET", &format!("/images/{id}/json"), engine.timeout)
        .await?;
    Ok(inspect["RootFS"]["Layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Splits `repo[:tag]` or `repo@digest` into the name and the tag or digest.
/// A missing tag means `latest`: an empty tag would make the engine pull
/// every tag of the repository.
pub(super) fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    match reference.rsplit_once(':') {
        // A colon before the last `/` is a registry port, not a tag.
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (reference, "latest"),
    }
}

/// The strings of a JSON array (nothing for anything else).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Drops the `<none>:<none>` / `<none>@<none>` placeholders older engines list
/// for dangling images.
fn real_refs(refs: Vec<String>) -> Vec<String> {
    refs.into_iter()
        .filter(|r| !r.starts_with("<none>"))
        .collect()
}

/// Pair diff ids with history sizes. Sizes map onto layers in order when the
/// history has one entry per layer, or when its non-zero entries match the
/// layers one to one; otherwise the image is one pseudo-layer of `total`
/// bytes, which is exact for the image alone and only loses sharing.
fn layers_from(id: &str, diff_ids: &[&str], sizes: &[u64], total: u64) -> Vec<Layer> {
    let nonzero: Vec<u64> = sizes.iter().copied().filter(|s| *s > 0).collect();
    let mapped = if sizes.len() == diff_ids.len() {
        Some(sizes.to_vec())
    } else if nonzero.len() == diff_ids.len() {
        Some(nonzero)
    } else {
        None
    };
    let Some(mapped) = mapped.filter(|_| !diff_ids.is_empty()) else {
        return vec![Layer {
            chain_id: id.to_owned(),
            size: total,
        }];
    };
    let mut chain = String::new();
    diff_ids
        .iter()
        .zip(mapped)
        .map(|(diff, size)| {
            chain = if chain.is_empty() {
                (*diff).to_owned()
            } else {
                use sha2::{Digest, Sha256};
                format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(format!("{chain} {diff}")))
                )
            };
            Layer {
                chain_id: chain.clone(),
                size,
            }
        })
        .collect()
}

fn container_of(c: bollard::models::ContainerSummary) -> Container {
    Container {
        id: c.id.unwrap_or_default(),
        name: c
            .names
            .and_then(|names| names.into_iter().next())
            .map(|name| name.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        image_id: c.image_id.unwrap_or_default(),
        image: c.image.unwrap_or_default(),
        state: c.state.map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_references() {
        assert_eq!(split_reference("nginx:1.25"), ("nginx", "1.25"));
        assert_eq!(split_reference("nginx"), ("nginx", "latest"));
        assert_eq!(
            split_reference("127.0.0.1:5000/team/app:v1"),
            ("127.0.0.1:5000/team/app", "v1")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/team/app"),
            ("127.0.0.1:5000/team/app", "latest")
        );
        assert_eq!(split_reference("r/app@sha256:abc"), ("r/app", "sha256:abc"));
    }

    #[test]
    fn drops_none_placeholders() {
        assert!(real_refs(vec!["<none>:<none>".into()]).is_empty());
        assert_eq!(real_refs(vec!["a:b".into()]), vec!["a:b".to_owned()]);
    }
}
