//! The executor on the in-memory engine: order, failures that do not stop the
//! others, removals racing a new container, dry runs, one record per action.

use crate::fake_store::{NOW, container, img, policy};
use stowage::audit::{self, Action as AuditAction, AuditLog, Outcome};
use stowage::engine::fake::FakeEngine;
use stowage::fixture::FixedClock;
use stowage::plan::{self, Kind, Observed};
use stowage::reconcile;
use stowage::state::State;
use tokio_util::sync::CancellationToken;

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

/// Execute a plan as run `run-1`: the report and the audit records.
fn execute(
    engine: &FakeEngine,
    pl: &plan::Plan,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> (reconcile::Report, Vec<audit::Record>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
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
