//! The executor on the in-memory engine: order, failures that do not stop the
//! others, removals racing a new container or a re-pointed tag while others
//! are in flight, dry runs, one record per action in plan order.

use crate::fake_store::{NOW, container, img, policy};
use stowage::audit::{self, Action as AuditAction, AuditLog, Outcome};
use stowage::engine::fake::FakeEngine;
use stowage::fixture::FixedClock;
use stowage::plan::{self, Kind, Observed};
use stowage::reconcile;
use stowage::state::State;
use tokio_util::sync::CancellationToken;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use stowage::engine::{
    BoxStream, Container, Credentials, DiskUsage, Engine, EngineInfo, EngineResult, Event, Image,
    Layer, Progress, Removed,
};

const POLICY: &str = "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n\n\
    [[float]]\nname = \"stable\"\nimages = [\"app\"]\ntag = \"stable\"\nfollow = '\\d+'\n";

fn store() -> Vec<stowage::engine::Image> {
    vec![
        img("a1", 30.0, &["app:1", "app:stable"]),
        img("a2", 20.0, &["app:2"]),
        img("a3", 10.0, &["app:3"]),
        img("z1", 10.0, &["other:1"]),
    ]
}

fn run(
    engine: &FakeEngine,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> (plan::Plan, reconcile::Report, Vec<audit::Record>) {
    let p = policy(POLICY);
    let observed = Observed {
        images: engine.images(),
        containers: vec![],
        ..Observed::default()
    };
    let pl = plan::plan(&p, &observed, &State::default(), NOW);
    let (report, records) = execute(engine, &pl, dry_run, shutdown);
    (pl, report, records)
}

/// Execute a plan as run `run-1` (tokio time paused: delays are free): the
/// report and the audit records. The journal of removals in flight is gone
/// afterwards, whatever happened.
fn execute<E: Engine>(
    engine: &E,
    pl: &plan::Plan,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> (reconcile::Report, Vec<audit::Record>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let report = rt
        .block_on(reconcile::execute(
            engine,
            pl,
            &mut log,
            "run-1",
            dry_run,
            &FixedClock(NOW),
            shutdown,
        ))
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["audit.jsonl"], "only the audit log is left");
    (report, audit::read(&path).unwrap().records)
}

#[test]
fn floating_tag_moves_before_anything_is_removed() {
    let engine = FakeEngine::new(store(), vec![]);
    let (pl, report, records) = run(&engine, false, &CancellationToken::new());
    assert_eq!(pl.actions[0].kind, Kind::Tag);
    let calls = engine.calls();
    let tag_at = calls.iter().position(|c| c.starts_with("tag ")).unwrap();
    let first_remove = calls.iter().position(|c| c.starts_with("remove ")).unwrap();
    assert!(tag_at < first_remove, "{calls:?}");
    assert_eq!(report.failed, 0);
    assert_eq!(engine.references(), vec!["app:3", "app:stable", "other:1"]);
    assert_eq!(records.len(), pl.actions.len());
    assert!(
        records
            .iter()
            .all(|r| r.outcome == Outcome::Ok && r.run == "run-1")
    );
}

#[test]
fn a_failed_removal_does_not_stop_the_others() {
    let engine = FakeEngine::new(store(), vec![]);
    engine.fail_removal_of("app:1");
    let (_, report, records) = run(&engine, false, &CancellationToken::new());
    assert_eq!(report.failed, 1);
    assert!(report.ok >= 2);
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Failed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].reference.as_deref(), Some("app:1"));
    assert!(failed[0].error.as_deref().unwrap().contains("injected"));
    // app:2 was still removed after app:1 failed.
    assert!(!engine.references().contains(&"app:2".to_string()));
}

#[test]
fn removal_racing_a_new_container_is_skipped_not_forced() {
    let engine = FakeEngine::new(store(), vec![]);
    // The first container listing is the plan's; the race shows up after it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        use stowage::engine::Engine;
        engine.list_containers().await.unwrap();
    });
    engine.add_container_later(container("race", "a2"));
    let (_, report, records) = run(&engine, false, &CancellationToken::new());
    assert_eq!(report.skipped, 1);
    assert_eq!(report.failed, 0);
    let skip = records
        .iter()
        .find(|r| r.action == AuditAction::Skip)
        .expect("a skip record");
    assert_eq!(skip.reference.as_deref(), Some("app:2"));
    assert!(
        skip.reason.contains("created since planning"),
        "{}",
        skip.reason
    );
    assert!(engine.references().contains(&"app:2".to_string()));
}

#[test]
fn dry_run_changes_nothing_and_records_every_action() {
    let engine = FakeEngine::new(store(), vec![]);
    let before = engine.references();
    let (pl, report, records) = run(&engine, true, &CancellationToken::new());
    assert_eq!(engine.references(), before);
    assert_eq!(report.dry_run, pl.actions.len());
    assert!(!pl.actions.is_empty());
    assert_eq!(records.len(), pl.actions.len());
    assert!(records.iter().all(|r| r.outcome == Outcome::DryRun));
    assert!(
        engine
            .calls()
            .iter()
            .all(|c| !c.starts_with("remove") && !c.starts_with("tag"))
    );
}

#[test]
fn shutdown_stops_between_actions() {
    let engine = FakeEngine::new(store(), vec![]);
    let token = CancellationToken::new();
    token.cancel();
    let (_, report, records) = run(&engine, false, &token);
    assert!(report.interrupted);
    assert!(records.is_empty());
    assert_eq!(engine.references().len(), 5);
}

/// A backlog is one `deferred` record per kind and rule, whatever its size:
/// a reconcile does not write a record per removal it will not make.
#[test]
fn deferred_removals_are_one_record_per_kind_and_rule() {
    let p = policy(
        "[daemon]\nmax_removals = 1\n\n\
         [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n\n\
         [[retain]]\nname = \"dangling\"\nuntagged = true\n",
    );
    let images = vec![
        img("a1", 40.0, &["app:1"]),
        img("a2", 30.0, &["app:2"]),
        img("a3", 20.0, &["app:3"]),
        img("a4", 10.0, &["app:4"]),
        img("d1", 10.0, &[]),
        img("d2", 10.0, &[]),
    ];
    let engine = FakeEngine::new(images.clone(), vec![]);
    let observed = Observed {
        images,
        ..Observed::default()
    };
    let full = plan::plan(&p, &observed, &State::default(), NOW);
    let pl = plan::plan_to_apply(&p, &observed, &State::default(), NOW);
    assert_eq!((full.actions.len(), full.deferred.len()), (1, 4));
    assert!(pl.deferred.is_empty(), "{:?}", pl.deferred);
    assert_eq!(pl.deferred_count(), 4);
    let (report, records) = execute(&engine, &pl, false, &CancellationToken::new());
    assert_eq!((report.removed, report.deferred), (1, 4));
    let deferred: Vec<(Option<&str>, &str)> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Deferred)
        .map(|r| (r.rule.as_deref(), r.reason.as_str()))
        .collect();
    // Dangling images sort after references: the one removal made now is
    // `app`'s oldest release; two of `app` and two dangling images wait.
    assert_eq!(
        deferred,
        vec![
            (
                Some("app"),
                "2 deferred: max_removals reached; they wait for the next reconcile (`stowage plan` lists them)"
            ),
            (
                Some("dangling"),
                "2 deferred: max_removals reached; they wait for the next reconcile (`stowage plan` lists them)"
            ),
        ]
    );
    assert!(
        records
            .iter()
            .filter(|r| r.outcome == Outcome::Deferred)
            .all(|r| r.action == AuditAction::Remove && r.reference.is_none())
    );
}

/// The fake engine with removals that take time (tokio time) and a change
/// made by someone else when a given removal starts: removals overlap as
/// on a real engine, and races land while others are in flight.
struct Paced {
    inner: FakeEngine,
    /// How long the removal of each reference takes (default: 1 ms).
    takes: HashMap<String, Duration>,
    /// When the removal of `.0` starts, `.2` is tagged onto image `.1`.
    repoint: Option<(String, String, String)>,
    /// When the removal of `.0` starts, `.1` is cancelled (SIGTERM).
    cancel: Option<(String, CancellationToken)>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    in_flight: usize,
    most_in_flight: usize,
    /// References in the order their removal finished.
    finished: Vec<String>,
}

impl Paced {
    fn new(inner: FakeEngine, takes: &[(&str, u64)]) -> Paced {
        Paced {
            inner,
            takes: takes
                .iter()
                .map(|(r, ms)| (r.to_string(), Duration::from_millis(*ms)))
                .collect(),
            repoint: None,
            cancel: None,
            seen: Mutex::default(),
        }
    }
}

impl Engine for Paced {
    async fn list_images(&self) -> EngineResult<Vec<Image>> {
        self.inner.list_images().await
    }
    async fn list_containers(&self) -> EngineResult<Vec<Container>> {
        self.inner.list_containers().await
    }
    async fn image(&self, reference: &str) -> EngineResult<Option<Image>> {
        self.inner.image(reference).await
    }
    async fn remove(&self, reference: &str) -> EngineResult<Removed> {
        if let Some((when, image, tag)) = &self.repoint
            && when == reference
        {
            self.inner.tag(image, tag).await.unwrap();
        }
        if let Some((when, token)) = &self.cancel
            && when == reference
        {
            token.cancel();
        }
        {
            let mut s = self.seen.lock().unwrap();
            s.in_flight += 1;
            s.most_in_flight = s.most_in_flight.max(s.in_flight);
        }
        let takes = self.takes.get(reference).copied();
        tokio::time::sleep(takes.unwrap_or(Duration::from_millis(1))).await;
        let removed = self.inner.remove(reference).await;
        let mut s = self.seen.lock().unwrap();
        s.in_flight -= 1;
        s.finished.push(reference.to_owned());
        removed
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
    async fn load(&self, archive: bytes::Bytes) -> EngineResult<Vec<String>> {
        self.inner.load(archive).await
    }
    async fn save(&self, references: &[String]) -> EngineResult<bytes::Bytes> {
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

/// `app:1` (oldest) to `app:7`; `keep_last = 1` removes six.
fn seven() -> Vec<Image> {
    (1..=7)
        .map(|n| img(&format!("a{n}"), 10.0 - n as f64, &[&format!("app:{n}")]))
        .collect()
}

fn keep_one(engine: &Paced) -> plan::Plan {
    let p = policy("[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n");
    let observed = Observed {
        images: engine.inner.images(),
        ..Observed::default()
    };
    plan::plan(&p, &observed, &State::default(), NOW)
}

fn planned(pl: &plan::Plan) -> Vec<String> {
    pl.actions
        .iter()
        .map(|a| a.reference.clone().unwrap())
        .collect()
}

/// Removals overlap (a few at once, not all), the engine finishes them out
/// of order, and the records still come in plan order, one per action.
#[test]
fn removals_overlap_and_their_records_keep_plan_order() {
    let engine = Paced::new(
        FakeEngine::new(seven(), vec![]),
        &[("app:1", 40), ("app:2", 5), ("app:3", 20), ("app:5", 30)],
    );
    let pl = keep_one(&engine);
    assert_eq!(pl.actions.len(), 6);
    let (report, records) = execute(&engine, &pl, false, &CancellationToken::new());
    assert_eq!((report.removed, report.failed), (6, 0));
    assert_eq!(engine.inner.references(), ["app:7"]);
    let seen = engine.seen.lock().unwrap();
    assert!(
        (2..=4).contains(&seen.most_in_flight),
        "{} removals in flight at most",
        seen.most_in_flight
    );
    assert_ne!(seen.finished, planned(&pl), "finished out of order");
    let recorded: Vec<String> = records
        .iter()
        .map(|r| r.reference.clone().unwrap())
        .collect();
    assert_eq!(recorded, planned(&pl));
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
}

/// A tag re-pointed by someone while removals are in flight is seen by the
/// re-check of its own removal: the reference stays on the image it now
/// names, and the record says why.
#[test]
fn a_tag_repointed_while_removals_are_in_flight_is_kept() {
    let mut engine = Paced::new(
        FakeEngine::new(seven(), vec![]),
        &[("app:1", 50), ("app:2", 50), ("app:3", 50), ("app:4", 50)],
    );
    // When app:1's removal starts, app:6 (planned for removal, started once
    // a slot is free) is tagged onto the image that stays.
    engine.repoint = Some(("app:1".into(), crate::fake_store::id("a7"), "app:6".into()));
    let pl = keep_one(&engine);
    assert_eq!(planned(&pl).last().map(String::as_str), Some("app:6"));
    let (report, records) = execute(&engine, &pl, false, &CancellationToken::new());
    assert_eq!((report.removed, report.skipped, report.failed), (5, 1, 0));
    assert_eq!(engine.inner.references(), ["app:6", "app:7"]);
    let last = records.last().unwrap();
    assert_eq!(
        (last.action, last.reference.as_deref()),
        (AuditAction::Skip, Some("app:6"))
    );
    assert!(
        last.reason.contains("now points at another image"),
        "{}",
        last.reason
    );
}

/// Shutdown while removals are in flight: they finish and are recorded,
/// nothing more starts.
#[test]
fn shutdown_lets_the_removals_in_flight_finish_and_starts_no_more() {
    let token = CancellationToken::new();
    let mut engine = Paced::new(FakeEngine::new(seven(), vec![]), &[("app:1", 30)]);
    engine.cancel = Some(("app:2".into(), token.clone()));
    let pl = keep_one(&engine);
    let (report, records) = execute(&engine, &pl, false, &token);
    assert!(report.interrupted);
    let asked = engine.seen.lock().unwrap().finished.clone();
    assert!(
        (2..6).contains(&asked.len()),
        "{asked:?}: those in flight, no more"
    );
    let recorded: Vec<String> = records
        .iter()
        .map(|r| r.reference.clone().unwrap())
        .collect();
    assert_eq!(recorded, planned(&pl)[..asked.len()]);
    assert_eq!(report.removed, asked.len());
    assert_eq!(engine.inner.references().len(), 7 - asked.len());
}
