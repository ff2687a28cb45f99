//! Faults around transfers and removals, against the real private engine and
//! registry (issue 12): a dangling image tagged between planning and its
//! removal; SIGTERM (and `kill -9`) in the middle of a mirror push.

mod common;

use std::sync::Mutex;

use bytes::Bytes;
use stowage::audit::{self, Action as AuditAction, AuditLog, Outcome};
use stowage::engine::{
    BoxStream, Container, Credentials, DiskUsage, DockerEngine, Engine, EngineInfo, EngineResult,
    Event, Image, Layer, Progress, Removed,
};
use stowage::plan::{self, Kind, Observed};
use stowage::reconcile::{self, SystemClock};
use stowage::state::State;
use tokio_util::sync::CancellationToken;

const DAY: i64 = 86_400;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The real engine, with one hook: the first time the executor asks which
/// containers use `image` (its re-check right before the removal), `tag` is
/// given to that image, as `docker tag <id> app:keep` by someone else would.
struct TagsDuringRemoval {
    inner: DockerEngine,
    image: String,
    tag: String,
    fired: Mutex<bool>,
}

impl Engine for TagsDuringRemoval {
    async fn list_images(&self) -> EngineResult<Vec<Image>> {
        self.inner.list_images().await
    }
    async fn list_containers(&self) -> EngineResult<Vec<Container>> {
        self.inner.list_containers().await
    }
    async fn containers_using(&self, image_id: &str) -> EngineResult<Vec<Container>> {
        let fire =
            image_id == self.image && !std::mem::replace(&mut *self.fired.lock().unwrap(), true);
        if fire {
            self.inner.tag(&self.image, &self.tag).await?;
        }
        self.inner.containers_using(image_id).await
    }
    async fn image_id_of(&self, reference: &str) -> EngineResult<Option<String>> {
        self.inner.image_id_of(reference).await
    }
    async fn tags_of(&self, image_id: &str) -> EngineResult<Option<Vec<String>>> {
        self.inner.tags_of(image_id).await
    }
    async fn remove(&self, reference: &str) -> EngineResult<Removed> {
        self.inner.remove(reference).await
    }
    async fn tag(&self, source: &str, target: &str) -> EngineResult<()> {
        self.inner.tag(source, target).await
    }
    async fn pull(
        &self,
        reference: &str,
        platform: Option<&str>,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        self.inner
            .pull(reference, platform, credentials, on_progress)
            .await
    }
    async fn push(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        self.inner.push(reference, credentials, on_progress).await
    }
    async fn remote_digest(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> EngineResult<String> {
        self.inner.remote_digest(reference, credentials).await
    }
    async fn load(&self, archive: Bytes) -> EngineResult<Vec<String>> {
        self.inner.load(archive).await
    }
    async fn save(&self, references: &[String]) -> EngineResult<Bytes> {
        self.inner.save(references).await
    }
    fn events(&self) -> BoxStream<'_, EngineResult<Event>> {
        self.inner.events()
    }
    async fn image_layers(&self, id: &str) -> EngineResult<Vec<Layer>> {
        self.inner.image_layers(id).await
    }
    async fn info(&self) -> EngineResult<EngineInfo> {
        self.inner.info().await
    }
    async fn disk_usage(&self) -> EngineResult<DiskUsage> {
        self.inner.disk_usage().await
    }
    async fn prune_build_cache(&self, keep_bytes: u64) -> EngineResult<u64> {
        self.inner.prune_build_cache(keep_bytes).await
    }
}

/// Regression (issue 12, item 11): a dangling image was removed by id after
/// only a container re-check, so a tag given to it meanwhile went with it.
#[tokio::test]
async fn dangling_image_tagged_after_planning_keeps_its_new_tag() {
    let Some(engine) = common::engine().await else {
        return;
    };
    let ns = common::unique_ns("dangling-race");
    let dangling = common::image(&[], now() - 30 * DAY, 4096);
    let other = common::image(&[], now() - 30 * DAY, 4096);
    common::load(&engine, &[dangling.clone(), other.clone()]).await;
    let keep = format!("{ns}/app:keep");

    let dir = tempfile::tempdir_in(common::scratch_dir()).unwrap();
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(
        &policy_path,
        "version = 1\n[[retain]]\nname = \"dangling\"\nuntagged = true\n",
    )
    .unwrap();
    let policy = stowage::policy::load(&policy_path).unwrap();
    // Plan on this test's two images only: the engine is shared, and other
    // tests' dangling images are none of this test's business.
    let listed = engine.list_images().await.unwrap();
    let observed = Observed {
        images: listed
            .into_iter()
            .filter(|i| i.id == dangling.id() || i.id == other.id())
            .collect(),
        ..Observed::default()
    };
    assert_eq!(observed.images.len(), 2, "both fixtures are loaded");
    let planned = plan::plan(&policy, &observed, &State::default(), now());
    let removals: Vec<&str> = planned
        .actions
        .iter()
        .filter(|a| a.kind == Kind::Remove && a.reference.is_none())
        .map(|a| a.image.as_str())
        .collect();
    assert_eq!(removals.len(), 2, "{}", plan::render(&planned));

    let hooked = TagsDuringRemoval {
        inner: engine,
        image: dangling.id(),
        tag: keep.clone(),
        fired: Mutex::new(false),
    };
    let mut log = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
    let report = reconcile::execute(
        &hooked,
        &planned,
        &mut log,
        "run-race",
        false,
        &SystemClock,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    drop(log);
    let engine = hooked.inner;

    // The image tagged meanwhile is still there, and still named app:keep.
    assert_eq!(
        engine.image_id_of(&keep).await.unwrap(),
        Some(dangling.id()),
        "app:keep was removed with the image that was dangling when planned"
    );
    // The other one, still dangling, went as planned.
    let left = engine.list_images().await.unwrap();
    assert!(!left.iter().any(|i| i.id == other.id()));
    assert_eq!((report.removed, report.skipped), (1, 1), "{report:?}");
    let records = audit::read(&dir.path().join("audit.jsonl"))
        .unwrap()
        .records;
    let skip = records
        .iter()
        .find(|r| r.action == AuditAction::Skip)
        .unwrap_or_else(|| panic!("no skip record: {records:#?}"));
    assert_eq!(skip.image.as_deref(), Some(dangling.id().as_str()));
    assert_eq!(skip.outcome, Outcome::Ok);
    assert!(skip.reason.contains(&keep), "{}", skip.reason);

    engine.remove(&keep).await.unwrap();
}
