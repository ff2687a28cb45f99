//! An in-memory engine for planner, executor and loop tests. It follows the
//! real engine's rules that stowage relies on: removing a reference of a
//! multi-tag image only untags; an image used by any container is refused.
//! Never the only proof of engine behaviour: `tests/it/engine_real.rs` is.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{
    BoxStream, Container, Credentials, DiskUsage, Engine, EngineError, EngineInfo, EngineKind,
    EngineResult, Event, Image, Layer, Progress, Removed, StuckCall,
};

#[derive(Debug, Default)]
struct Inner {
    images: Vec<Image>,
    containers: Vec<Container>,
    /// References whose removal fails (fault injection).
    fail_remove: HashSet<String>,
    /// Containers to create right before the next removal (races).
    race_containers: Vec<Container>,
    /// Every call made, for assertions on call counts.
    calls: Vec<String>,
    /// How long each image listing takes (a slow engine, for loop tests
    /// under paused tokio time).
    list_delay: Option<std::time::Duration>,
    /// Per-image layers; images without an entry are one pseudo-layer.
    layers: std::collections::HashMap<String, Vec<Layer>>,
    /// What `stuck_call` answers, shared with the test that flips it.
    stuck: Arc<Mutex<Option<StuckCall>>>,
    /// The engine it poses as (`kind`, `info`).
    kind: EngineKind,
}

#[derive(Debug, Default)]
pub struct FakeEngine {
    inner: Mutex<Inner>,
}

impl FakeEngine {
    pub fn new(images: Vec<Image>, containers: Vec<Container>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                images,
                containers,
                ..Inner::default()
            }),
        }
    }

    /// Poses as `kind` (Podman's naming, for planner and loop tests).
    pub fn with_kind(self, kind: EngineKind) -> Self {
        self.lock().kind = kind;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic in a test holding the lock poisons it; the data is still fine.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn images(&self) -> Vec<Image> {
        self.lock().images.clone()
    }

    /// All references on the engine, sorted.
    pub fn references(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .images
            .iter()
            .flat_map(|i| i.repo_tags.clone())
            .collect();
        v.sort();
        v
    }

    pub fn fail_removal_of(&self, reference: &str) {
        self.lock().fail_remove.insert(reference.to_string());
    }

    /// A container using `image_id` appears right before the next engine call
    /// that lists containers after planning, or the next removal, whichever
    /// comes first (simulates a race).
    pub fn add_container_later(&self, c: Container) {
        self.lock().race_containers.push(c);
    }

    /// Give an image explicit layers (for shared-layer accounting).
    pub fn set_layers(&self, image: &str, layers: Vec<Layer>) {
        self.lock().layers.insert(image.to_string(), layers);
    }

    /// Makes every image listing take `delay` (tokio time).
    pub fn set_list_delay(&self, delay: std::time::Duration) {
        self.lock().list_delay = Some(delay);
    }

    /// `stuck_call` answers what `handle` holds (a call past its deadline,
    /// for watchdog tests).
    pub fn with_stuck_calls(self, handle: Arc<Mutex<Option<StuckCall>>>) -> Self {
        self.lock().stuck = handle;
        self
    }

    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }
}

fn find<'a>(images: &'a mut [Image], reference: &str) -> Option<&'a mut Image> {
    let idx = images
        .iter()
        .position(|i| i.id == reference || i.repo_tags.iter().any(|t| t == reference))?;
    images.get_mut(idx)
}

impl Engine for FakeEngine {
    async fn list_images(&self) -> EngineResult<Vec<Image>> {
        let delay = self.lock().list_delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut g = self.lock();
        g.calls.push("list_images".into());
        Ok(g.images.clone())
    }

    async fn list_containers(&self) -> EngineResult<Vec<Container>> {
        let mut g = self.lock();
        g.calls.push("list_containers".into());
        // Racing containers appear once planning is over: the first listing
        // after the initial observation sees them.
        if g.calls.iter().filter(|c| *c == "list_containers").count() > 1 {
            let race = std::mem::take(&mut g.race_containers);
            g.containers.extend(race);
        }
        Ok(g.containers.clone())
    }

    async fn image(&self, reference: &str) -> EngineResult<Option<Image>> {
        let mut g = self.lock();
        g.calls.push(format!("image {reference}"));
        Ok(g.images
            .iter()
            .find(|i| {
                i.id == reference
                    || i.repo_tags.iter().any(|t| t == reference)
                    || i.repo_digests.iter().any(|d| d == reference)
            })
            .cloned())
    }

    async fn remove(&self, reference: &str) -> EngineResult<Removed> {
        let mut g = self.lock();
        g.calls.push(format!("remove {reference}"));
        if g.fail_remove.contains(reference) {
            return Err(EngineError::Other(format!(
                "injected failure removing {reference}"
            )));
        }
        // A racing container exists by the time of any removal, whether or
        // not the executor asked for containers first (the engine checks).
        let race = std::mem::take(&mut g.race_containers);
        g.containers.extend(race);
        let inner = &mut *g;
        let Some(img) = find(&mut inner.images, reference) else {
            return Err(EngineError::NotFound(reference.to_string()));
        };
        let by_id = img.id == reference;
        if !by_id && img.repo_tags.len() > 1 {
            img.repo_tags.retain(|t| t != reference);
            return Ok(Removed {
                untagged: vec![reference.to_string()],
                deleted: vec![],
            });
        }
        if by_id && img.repo_tags.len() > 1 {
            return Err(EngineError::Conflict(format!(
                "image {reference} is referenced in multiple repositories"
            )));
        }
        let id = img.id.clone();
        if let Some(c) = inner.containers.iter().find(|c| c.image_id == id) {
            return Err(EngineError::Conflict(format!(
                "unable to remove {reference}: image is being used by container {}",
                c.id
            )));
        }
        let untagged = img.repo_tags.clone();
        inner.images.retain(|i| i.id != id);
        Ok(Removed {
            untagged,
            deleted: vec![id],
        })
    }

    async fn tag(&self, source: &str, target: &str) -> EngineResult<()> {
        let mut g = self.lock();
        g.calls.push(format!("tag {source} {target}"));
        for i in &mut g.images {
            i.repo_tags.retain(|t| t != target);
        }
        let img =
            find(&mut g.images, source).ok_or_else(|| EngineError::NotFound(source.into()))?;
        img.repo_tags.push(target.to_string());
        Ok(())
    }

    async fn pull(
        &self,
        reference: &str,
        _platform: Option<&str>,
        _credentials: Option<&Credentials>,
        _on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        Err(EngineError::Registry {
            reference: reference.to_string(),
            message: "the fake engine has no registry".into(),
        })
    }

    async fn push(
        &self,
        reference: &str,
        _credentials: Option<&Credentials>,
        _on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        Err(EngineError::Registry {
            reference: reference.to_string(),
            message: "the fake engine has no registry".into(),
        })
    }

    async fn remote_digest(
        &self,
        reference: &str,
        _credentials: Option<&Credentials>,
    ) -> EngineResult<String> {
        Err(EngineError::Registry {
            reference: reference.to_string(),
            message: "the fake engine has no registry".into(),
        })
    }

    async fn load(&self, _archive: Bytes) -> EngineResult<Vec<String>> {
        Err(EngineError::Other(
            "the fake engine cannot load archives".into(),
        ))
    }

    async fn save(&self, _references: &[String]) -> EngineResult<Bytes> {
        Err(EngineError::Other(
            "the fake engine cannot save archives".into(),
        ))
    }

    fn stuck_call(&self) -> Option<StuckCall> {
        let handle = self.lock().stuck.clone();
        handle.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn events(&self) -> BoxStream<'_, EngineResult<Event>> {
        Box::pin(futures_util::stream::pending())
    }

    async fn image_layers(&self, id: &str) -> EngineResult<Vec<Layer>> {
        let g = self.lock();
        let img = g
            .images
            .iter()
            .find(|i| i.id == id)
            .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
        Ok(g.layers.get(id).cloned().unwrap_or_else(|| {
            vec![Layer {
                chain_id: id.to_string(),
                size: img.size,
            }]
        }))
    }

    async fn info(&self) -> EngineResult<EngineInfo> {
        Ok(EngineInfo {
            kind: self.lock().kind,
            data_root: "/fake".into(),
            server_version: "fake".into(),
            api_version: "1.41".into(),
            platform: "linux/amd64".into(),
        })
    }

    fn kind(&self) -> EngineKind {
        self.lock().kind
    }

    async fn disk_usage(&self) -> EngineResult<DiskUsage> {
        let g = self.lock();
        Ok(DiskUsage {
            layers_size: g.images.iter().map(|i| i.size).sum(),
            images: g.images.len() as u64,
            build_cache_size: 0,
        })
    }

    async fn prune_build_cache(&self, _keep_bytes: u64) -> EngineResult<u64> {
        Ok(0)
    }
}
