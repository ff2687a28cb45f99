//! Planner properties over random stores and policies:
//! - nothing protected is ever planned for removal;
//! - plan, apply to the fake engine, plan again gives no actions;
//! - shuffling the input does not change the plan;
//! - with the trash on, nothing is deleted, each image that goes keeps one
//!   trash reference, and its window's end removes exactly those.

use std::collections::{BTreeMap, HashSet};

use crate::fake_store::{DAY, NOW, container, img, policy};
use proptest::prelude::*;
use stowage::audit::AuditLog;
use stowage::engine::fake::FakeEngine;
use stowage::engine::{Container, Image};
use stowage::fixture::FixedClock;
use stowage::plan::{self, Kind, Observed};
use stowage::policy::Policy;
use stowage::reconcile;
use stowage::state::{ImageState, State};
use tokio_util::sync::CancellationToken;

const REPOS: [&str; 4] = ["app", "team/web", "team/web/sub", "127.0.0.1:5000/team/app"];
const TAGS: [&str; 12] = [
    "v1.0.0",
    "v1.2.0",
    "v1.10.0",
    "1.1",
    "latest",
    "dev-1",
    "dev-2",
    "main-3",
    "feat-4",
    "stable",
    "tmp",
    "2.0.0-rc.1",
];

/// Policies exercising every rule kind, parameterised by small numbers.
fn policies(n: usize, days: u64, max_removals: usize) -> Vec<Policy> {
    policies_with(n, days, max_removals, "")
}

/// [`policies`] with more `[daemon]` lines.
fn policies_with(n: usize, days: u64, max_removals: usize, daemon: &str) -> Vec<Policy> {
    let base = format!("[daemon]\nmin_age = \"2d\"\nmax_removals = {max_removals}\n{daemon}");
    vec![
        policy(&format!(
            "{base}[[retain]]\nname = \"all\"\nimages = [\"**\"]\nkeep_last = {n}\norder = \"semver\"\n\
             [[retain]]\nname = \"dangling\"\nuntagged = true\nkeep_within = \"{days}d\"\n"
        )),
        policy(&format!(
            "{base}[[retain]]\nname = \"recent\"\nimages = [\"team/*\", \"app\"]\nkeep_within = \"{days}d\"\n\
             [[retain]]\nname = \"groups\"\nimages = [\"**\"]\nkeep_last = {n}\ngroup_by = '^([a-z]+)-\\d+$'\norder = \"last_used\"\n\
             [[protect]]\nimages = [\"team/**\"]\ntags = ['latest']\n"
        )),
        policy(&format!(
            "{base}[[float]]\nname = \"stable\"\nimages = [\"**\"]\ntag = \"stable\"\nfollow = 'v?\\d+\\.\\d+(\\.\\d+)?'\n\
             [[retain]]\nname = \"rel\"\nimages = [\"**\"]\nkeep_last = {n}\n\
             [[retain]]\nname = \"dangling\"\nuntagged = true\n\
             [[tags]]\nname = \"conv\"\nimages = [\"**\"]\nallow = ['v.*', 'latest', 'stable']\non_violation = \"untag\"\n\
             [[prepull]]\nimage = \"app:latest\"\nrefresh = \"never\"\n"
        )),
    ]
}

#[derive(Debug, Clone)]
struct Store {
    images: Vec<Image>,
    containers: Vec<Container>,
    state: State,
}

fn store() -> impl Strategy<Value = Store> {
    let image = (
        prop::collection::vec((0..REPOS.len(), 0..TAGS.len()), 0..3),
        0u32..60,
        any::<bool>(),
        prop::option::of(0u32..60),
    );
    prop::collection::vec(image, 1..25).prop_map(|specs| {
        let mut images = Vec::new();
        let mut containers = Vec::new();
        let mut state = State {
            initialized: true,
            ..State::default()
        };
        let mut taken = HashSet::new();
        for (i, (refs, age, used, last_used)) in specs.into_iter().enumerate() {
            // A reference names one image at a time, as on a real engine.
            let tags: Vec<String> = refs
                .into_iter()
                .map(|(r, t)| format!("{}:{}", REPOS[r], TAGS[t]))
                .filter(|r| taken.insert(r.clone()))
                .collect();
            let name = format!("i{i}");
            let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
            let image = img(&name, f64::from(age) / 2.0, &tag_refs);
            state.images.insert(
                image.id.clone(),
                ImageState {
                    first_seen: image.created,
                    last_used: last_used.map(|d| NOW - i64::from(d) * DAY / 3),
                    last_pulled: None,
                    ..ImageState::default()
                },
            );
            images.push(image);
            if used {
                containers.push(container(&format!("c{i}"), &name));
            }
        }
        Store {
            images,
            containers,
            state,
        }
    })
}

fn protected_image(p: &Policy, s: &Store, image: &Image) -> bool {
    let in_use = s.containers.iter().any(|c| c.image_id == image.id);
    let st = &s.state.images[&image.id];
    let young = NOW - st.first_seen < p.daemon.min_age.as_secs() as i64;
    let prepull = p
        .prepull
        .iter()
        .any(|pp| image.repo_tags.contains(&pp.image));
    in_use || young || prepull
}

fn protected_ref(p: &Policy, reference: &str) -> bool {
    let (repo, tag) = stowage::refs::split_tag(reference);
    p.protect.iter().any(|pr| {
        pr.scope
            .matches(repo, tag.unwrap_or(""), stowage::refs::Naming::Docker)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn nothing_protected_is_ever_planned_for_removal(
        s in store(), which in 0usize..3, n in 1usize..4, days in 1u64..30,
    ) {
        let p = &policies(n, days, 1000)[which];
        let observed = Observed { images: s.images.clone(), containers: s.containers.clone(), ..Observed::default() };
        let plan = plan::plan(p, &observed, &s.state, NOW);
        for a in plan.actions.iter().chain(&plan.deferred) {
            if a.kind == Kind::Tag {
                continue;
            }
            let image = s.images.iter().find(|i| i.id == a.image).expect("planned image exists");
            prop_assert!(!protected_image(p, &s, image), "protected image planned: {a:?}");
            if let Some(r) = &a.reference {
                prop_assert!(!protected_ref(p, r), "protected reference planned: {a:?}");
            }
        }
    }

    #[test]
    fn shuffling_the_input_does_not_change_the_plan_nor_leaving_out_verdicts(
        s in store(), which in 0usize..3, n in 1usize..4, days in 1u64..30, seed in any::<u64>(),
    ) {
        let p = &policies(n, days, 5)[which];
        let observed = Observed { images: s.images.clone(), containers: s.containers.clone(), ..Observed::default() };
        let want = plan::plan(p, &observed, &s.state, NOW);
        let mut shuffled = observed.clone();
        // A cheap deterministic shuffle: rotate and reverse, and reverse tag lists.
        let k = (seed as usize) % shuffled.images.len().max(1);
        shuffled.images.rotate_left(k);
        if seed % 2 == 0 {
            shuffled.images.reverse();
            shuffled.containers.reverse();
        }
        for i in &mut shuffled.images {
            i.repo_tags.reverse();
        }
        let got = plan::plan(p, &shuffled, &s.state, NOW);
        prop_assert_eq!(&got, &want);
        // Each removal is planned once, now or later.
        let mut seen = HashSet::new();
        for a in want.actions.iter().chain(&want.deferred).filter(|a| a.kind.is_removal()) {
            prop_assert!(seen.insert((a.reference.clone(), a.image.clone())), "planned twice: {a:?}");
        }
        // The backlog counts exactly the deferred removals, per kind and rule.
        let mut counted: BTreeMap<(String, Kind), usize> = BTreeMap::new();
        for a in &want.deferred {
            *counted.entry((a.rule.clone(), a.kind)).or_default() += 1;
        }
        let backlog: BTreeMap<(String, Kind), usize> =
            want.backlog.iter().map(|b| ((b.rule.clone(), b.kind), b.count)).collect();
        prop_assert_eq!(backlog.len(), want.backlog.len());
        prop_assert_eq!(backlog, counted);
        // What a reconcile executes is the same plan without the verdicts,
        // and with the deferred removals only counted.
        let mut bare = want;
        bare.verdicts.clear();
        bare.deferred.clear();
        prop_assert_eq!(plan::plan_to_apply(p, &shuffled, &s.state, NOW), bare);
    }

    #[test]
    fn plan_apply_plan_is_empty(
        s in store(), which in 0usize..3, n in 1usize..4, days in 1u64..30,
    ) {
        let p = &policies(n, days, 1000)[which];
        let engine = FakeEngine::new(s.images.clone(), s.containers.clone());
        let observed = Observed { images: s.images.clone(), containers: s.containers.clone(), ..Observed::default() };
        let first = plan::plan(p, &observed, &s.state, NOW);
        let dir = tempfile::tempdir().unwrap();
        let mut audit = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let report = rt.block_on(reconcile::execute(
            &engine, &first, &mut audit, "r", false, &FixedClock(NOW), &CancellationToken::new(),
        )).unwrap();
        prop_assert_eq!(report.failed, 0);
        prop_assert_eq!(report.skipped, 0);
        let after = Observed { images: engine.images(), containers: s.containers.clone(), ..Observed::default() };
        let second = plan::plan(p, &after, &s.state, NOW);
        prop_assert!(second.actions.is_empty(), "second plan not empty: {:#?}\nfirst: {}", second.actions, plan::render(&first));
        prop_assert!(second.deferred.is_empty());
        // One audit record per action, warnings included.
        let h = stowage::audit::read(&dir.path().join("audit.jsonl")).unwrap();
        prop_assert_eq!(h.records.len(), first.actions.len() + first.warnings.len());
    }

    #[test]
    fn with_the_trash_on_nothing_is_deleted_until_the_window_ends(
        s in store(), which in 0usize..3, n in 1usize..4, days in 1u64..30,
    ) {
        let p = &policies_with(n, days, 1000, "trash = \"7d\"\n")[which];
        let engine = FakeEngine::new(s.images.clone(), s.containers.clone());
        let observed = Observed { images: s.images.clone(), containers: s.containers.clone(), ..Observed::default() };
        let first = plan::plan(p, &observed, &s.state, NOW);
        prop_assert!(first.actions.iter().all(|a| a.kind != Kind::Remove), "{}", plan::render(&first));
        let dir = tempfile::tempdir().unwrap();
        let mut audit = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let report = rt.block_on(reconcile::execute(
            &engine, &first, &mut audit, "r", false, &FixedClock(NOW), &CancellationToken::new(),
        )).unwrap();
        prop_assert_eq!(report.failed + report.skipped, 0);
        let now = engine.images();
        prop_assert_eq!(now.len(), s.images.len(), "an image was deleted");
        let trashed = first.actions.iter().filter(|a| a.kind == Kind::Trash).count();
        prop_assert_eq!(report.trashed.len(), trashed);
        for (id, entry) in &report.trashed {
            let img = now.iter().find(|i| &i.id == id).expect("still there");
            prop_assert_eq!(&img.repo_tags, &vec![entry.reference.clone()]);
            // Its former references: what the plan took off it (a floating
            // tag moved elsewhere by the plan is not among them).
            let planned = first.trashing(id).expect("planned");
            prop_assert_eq!(&entry.former, &planned.refs);
            let before = s.images.iter().find(|i| &i.id == id).unwrap();
            prop_assert!(entry.former.iter().all(|r| before.repo_tags.contains(r)));
        }
        let after = Observed { images: now.clone(), containers: s.containers.clone(), ..Observed::default() };
        let second = plan::plan(p, &after, &s.state, NOW);
        prop_assert!(second.actions.is_empty(), "second plan not empty: {:#?}", second.actions);
        // After the window: exactly the trashed images go, rule `trash`.
        let later = plan::plan(p, &after, &s.state, NOW + 7 * DAY);
        let mut expired: Vec<&str> = later.actions.iter().filter(|a| a.rule == "trash").map(|a| a.image.as_str()).collect();
        expired.sort_unstable();
        let mut want: Vec<&str> = report.trashed.iter().map(|(id, _)| id.as_str()).collect();
        want.sort_unstable();
        prop_assert_eq!(expired, want);
        prop_assert!(later.actions.iter().filter(|a| a.rule == "trash").all(|a| a.kind == Kind::Remove));
    }
}
