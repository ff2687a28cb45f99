//! Planner table tests, snapshot style: policy + observed store -> rendered
//! plan. Snapshots (insta) live in `tests/snapshots/plan/NAME.snap`; each was
//! read and checked by hand. After an intended change,
//! `INSTA_UPDATE=always cargo test --test it plan_table::` rewrites them (or
//! `cargo insta review`, with cargo-insta); then read the diff. In CI a
//! difference fails and writes nothing.

use crate::fake_store::{DAY, NOW, container, id, img, policy};
use stowage::engine::{Container, Image};
use stowage::plan::{self, Observed};
use stowage::state::{ImageState, State};

fn snapshot(name: &str, body: &str, images: Vec<Image>, containers: Vec<Container>) {
    snapshot_with_state(name, body, images, containers, State::default());
}

fn snapshot_with_state(
    name: &str,
    body: &str,
    images: Vec<Image>,
    containers: Vec<Container>,
    state: State,
) {
    let p = policy(body);
    let observed = Observed {
        images,
        containers,
        ..Observed::default()
    };
    let got = plan::render(&plan::plan(&p, &observed, &state, NOW));
    assert_plan_snapshot(name, &got);
}

/// `got` against `tests/snapshots/plan/NAME.snap`, the one place snapshots
/// are compared (and written, see the module comment).
fn assert_plan_snapshot(name: &str, got: &str) {
    insta::with_settings!({
        snapshot_path => "../snapshots/plan",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!(name, got);
    });
}

const APP5: [(&str, f64, &str); 5] = [
    ("a1", 50.0, "app:1.0.0"),
    ("a2", 40.0, "app:1.1.0"),
    ("a3", 30.0, "app:1.2.0"),
    ("a4", 20.0, "app:2.0.0"),
    ("a5", 10.0, "app:2.1.0"),
];

fn app5() -> Vec<Image> {
    APP5.iter().map(|(n, d, t)| img(n, *d, &[t])).collect()
}

#[test]
fn keep_last_by_created() {
    snapshot(
        "keep_last_by_created",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 2\n",
        app5(),
        vec![],
    );
}

#[test]
fn keep_last_by_semver_sorts_non_semver_oldest() {
    snapshot(
        "keep_last_by_semver",
        "[[retain]]\nname = \"rel\"\nimages = [\"team/app\"]\nkeep_last = 3\norder = \"semver\"\n",
        vec![
            img("b1", 1.0, &["team/app:v1.2.0"]),
            img("b2", 2.0, &["team/app:v1.10.0"]),
            img("b3", 3.0, &["team/app:v1.9.0"]),
            img("b4", 0.5, &["team/app:latest"]),
            img("b5", 0.2, &["team/app:dev"]),
            img("b6", 4.0, &["team/app:1.11"]),
            img("b7", 5.0, &["team/app:v2.0.0-rc.1"]),
        ],
        vec![],
    );
}

#[test]
fn keep_last_by_last_used() {
    let mut state = State::default();
    state.images.insert(
        id("a1"),
        ImageState {
            first_seen: NOW - 60 * DAY,
            last_used: Some(NOW - DAY),
            last_pulled: None,
            ..ImageState::default()
        },
    );
    snapshot_with_state(
        "keep_last_by_last_used",
        "[[retain]]\nname = \"used\"\nimages = [\"app\"]\nkeep_last = 2\norder = \"last_used\"\n",
        app5(),
        vec![],
        state,
    );
}

#[test]
fn group_by_counts_per_capture() {
    snapshot(
        "group_by",
        "[[retain]]\nname = \"branches\"\nimages = [\"ci/app\"]\nkeep_last = 1\ngroup_by = '^([a-z]+)-\\d+$'\n",
        vec![
            img("c1", 5.0, &["ci/app:main-12"]),
            img("c2", 4.0, &["ci/app:main-13"]),
            img("c3", 3.0, &["ci/app:feat-3"]),
            img("c4", 2.0, &["ci/app:feat-4"]),
            img("c5", 1.0, &["ci/app:feat-5"]),
            img("c6", 6.0, &["ci/app:odd"]),
        ],
        vec![],
    );
}

#[test]
fn keep_within_keeps_recent_activity() {
    snapshot(
        "keep_within",
        "[[retain]]\nname = \"recent\"\nimages = [\"app\"]\nkeep_within = \"25d\"\n",
        app5(),
        vec![],
    );
}

#[test]
fn keep_last_or_keep_within_either_keeps() {
    snapshot(
        "keep_last_or_within",
        "[[retain]]\nname = \"both\"\nimages = [\"app\"]\nkeep_last = 1\nkeep_within = \"35d\"\n",
        app5(),
        vec![],
    );
}

#[test]
fn keep_wins_across_rules() {
    snapshot(
        "keep_wins",
        "[[retain]]\nname = \"few\"\nimages = [\"app\"]\nkeep_last = 1\n\n\
         [[retain]]\nname = \"majors\"\nimages = [\"app\"]\ntags = ['\\d+\\.0\\.0']\nkeep_last = 5\n",
        app5(),
        vec![],
    );
}

#[test]
fn untagged_rule_scopes_dangling_images() {
    snapshot(
        "untagged",
        "[[retain]]\nname = \"dangling\"\nuntagged = true\nkeep_within = \"2d\"\n",
        vec![
            img("d1", 5.0, &[]),
            img("d2", 1.0, &[]),
            img("d3", 9.0, &["keep:me"]),
        ],
        vec![],
    );
}

#[test]
fn references_outside_every_rule_are_untouched() {
    snapshot(
        "unscoped_untouched",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n",
        vec![
            img("a1", 50.0, &["app:1"]),
            img("a2", 40.0, &["app:2"]),
            img("e1", 90.0, &["other:1"]),
            img("e2", 90.0, &["app/sub:1"]),
            img("e3", 90.0, &[]),
        ],
        vec![],
    );
}

#[test]
fn stopped_container_protects_its_image() {
    snapshot(
        "in_use",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n",
        app5(),
        vec![container("f00d", "a1"), container("beef", "a1")],
    );
}

#[test]
fn protect_entry_protects_references() {
    snapshot(
        "protect",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n\n\
         [[protect]]\nname = \"golden\"\nimages = [\"app\"]\ntags = ['1\\.1\\..*']\n",
        app5(),
        vec![],
    );
}

#[test]
fn prepull_images_are_protected() {
    snapshot(
        "prepull_protected",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n\n\
         [[prepull]]\nimage = \"app:1.0.0\"\nrefresh = \"never\"\n",
        app5(),
        vec![],
    );
}

/// A `[[prepull]]` by digest names the image holding that digest, whatever
/// its tags.
#[test]
fn prepull_by_digest_is_protected() {
    let digest = format!("app@sha256:{}", "d".repeat(64));
    let mut images = app5();
    images[1].repo_digests = vec![digest.clone()];
    snapshot(
        "prepull_by_digest",
        &format!(
            "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n\n\
             [[prepull]]\nimage = \"{digest}\"\nrefresh = \"never\"\n"
        ),
        images,
        vec![],
    );
}

#[test]
fn min_age_protects_new_images() {
    let mut state = State {
        initialized: true,
        ..State::default()
    };
    state.images.insert(
        id("a1"),
        ImageState {
            first_seen: NOW - 600,
            last_used: None,
            last_pulled: None,
            ..ImageState::default()
        },
    );
    snapshot_with_state(
        "min_age",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n",
        app5(),
        vec![],
        state,
    );
}

#[test]
fn multi_tag_image_untags_then_removes() {
    snapshot(
        "multi_tag",
        "[[retain]]\nname = \"app\"\nimages = [\"app\", \"mirror/app\"]\nkeep_last = 1\n",
        vec![
            img("m1", 30.0, &["app:1", "mirror/app:1"]),
            img("m2", 20.0, &["app:2", "mirror/app:old"]),
            img("m3", 10.0, &["app:3"]),
            img("m4", 5.0, &["mirror/app:4"]),
        ],
        vec![],
    );
}

#[test]
fn float_moves_to_newest_semver() {
    snapshot(
        "float_semver",
        "[[float]]\nname = \"stable\"\nimages = [\"app\"]\ntag = \"stable\"\nfollow = '\\d+\\.\\d+\\.\\d+'\n",
        {
            let mut v = app5();
            v[1].repo_tags.push("app:stable".into());
            v
        },
        vec![],
    );
}

#[test]
fn float_already_in_place_is_quiet() {
    snapshot(
        "float_in_place",
        "[[float]]\nname = \"stable\"\nimages = [\"app\"]\ntag = \"stable\"\nfollow = '\\d.*'\n\n\
         [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 2\n",
        {
            let mut v = app5();
            v[4].repo_tags.push("app:stable".into());
            v
        },
        vec![],
    );
}

#[test]
fn float_by_created() {
    snapshot(
        "float_created",
        "[[float]]\nname = \"edge\"\nimages = [\"**\"]\ntag = \"edge\"\nfollow = 'build-.*'\norder = \"created\"\n",
        vec![
            img("g1", 3.0, &["team/svc:build-9"]),
            img("g2", 1.0, &["team/svc:build-10"]),
            img("g3", 2.0, &["team/svc:build-8"]),
            img("g4", 1.0, &["team/svc:release"]),
        ],
        vec![],
    );
}

#[test]
fn floating_reference_is_never_removed_by_retention() {
    // Every 1.x candidate goes by retention: `stable` stays where it is (its
    // image keeps that name) rather than following a tag about to vanish.
    snapshot(
        "float_vs_retention",
        "[[float]]\nname = \"stable\"\nimages = [\"app\"]\ntag = \"stable\"\nfollow = '1\\..*'\n\n\
         [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n",
        {
            let mut v = app5();
            v[1].repo_tags.push("app:stable".into());
            v
        },
        vec![],
    );
}

#[test]
fn float_follows_the_newest_candidate_that_stays() {
    // 2.0.0 goes by retention, so it is no candidate (4, not 5): the float
    // only ever points at a tag that stays.
    snapshot(
        "float_follows_survivor",
        "[[float]]\nname = \"stable\"\nimages = [\"app\"]\ntag = \"stable\"\nfollow = '\\d.*'\n\n\
         [[retain]]\nname = \"app\"\nimages = [\"app\"]\ntags = ['2\\..*']\nkeep_last = 1\norder = \"semver\"\n",
        app5(),
        vec![],
    );
}

#[test]
fn float_move_leaves_old_image_dangling_and_it_goes_in_the_same_plan() {
    snapshot(
        "float_leaves_dangling",
        "[[float]]\nname = \"stable\"\nimages = [\"app\"]\ntag = \"stable\"\nfollow = '\\d.*'\n\n\
         [[retain]]\nname = \"dangling\"\nuntagged = true\n",
        vec![
            img("h1", 30.0, &["app:stable"]),
            img("h2", 20.0, &["app:1.0.0"]),
            img("h3", 10.0, &["app:1.1.0"]),
        ],
        vec![],
    );
}

#[test]
fn tag_convention_warns() {
    snapshot(
        "tags_warn",
        "[[tags]]\nname = \"semver-only\"\nimages = [\"team/**\"]\nallow = ['v\\d+\\.\\d+\\.\\d+', 'latest']\n",
        vec![
            img("t1", 3.0, &["team/app:v1.0.0"]),
            img("t2", 2.0, &["team/app:my-hack"]),
            img("t3", 1.0, &["team/sub/app:latest", "team/sub/app:wip"]),
            img("t4", 1.0, &["other:anything"]),
        ],
        vec![],
    );
}

#[test]
fn tag_convention_untags_only_where_a_name_remains() {
    snapshot(
        "tags_untag",
        "[[tags]]\nname = \"clean\"\nimages = [\"team/**\"]\nallow = ['v\\d+\\.\\d+\\.\\d+', 'latest']\non_violation = \"untag\"\n",
        vec![
            img(
                "t1",
                3.0,
                &["team/app:v1.0.0", "team/app:tmp", "team/app:tmp2"],
            ),
            img("t2", 2.0, &["team/app:my-hack"]),
            img("t3", 1.0, &["team/app:v1.1.0", "team/app:scratch"]),
        ],
        vec![container("cafe", "t3")],
    );
}

#[test]
fn max_removals_defers_the_rest() {
    snapshot(
        "max_removals",
        "[daemon]\nmin_age = \"1h\"\nmax_removals = 2\n\n\
         [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n",
        app5(),
        vec![],
    );
}

#[test]
fn retain_tags_narrow_the_scope() {
    snapshot(
        "retain_tags_scope",
        "[[retain]]\nname = \"prs\"\nimages = [\"app\"]\ntags = ['pr-\\d+']\nkeep_last = 1\n",
        vec![
            img("p1", 5.0, &["app:pr-1"]),
            img("p2", 4.0, &["app:pr-2"]),
            img("p3", 3.0, &["app:pr-3"]),
            img("p4", 9.0, &["app:main"]),
            img("p5", 9.0, &["app:pr-x"]),
        ],
        vec![],
    );
}

#[test]
fn single_star_stays_in_one_segment() {
    snapshot(
        "glob_segments",
        "[[retain]]\nname = \"one-level\"\nimages = [\"team/*\"]\n\n\
         [[retain]]\nname = \"deep\"\nimages = [\"deep/**\"]\n",
        vec![
            img("s1", 5.0, &["team/app:1"]),
            img("s2", 5.0, &["team/app/sub:1"]),
            img("s3", 5.0, &["deep/a/b/c:1"]),
            img("s4", 5.0, &["deep:1"]),
        ],
        vec![],
    );
}

#[test]
fn registry_host_is_part_of_the_repository() {
    snapshot(
        "registry_host",
        "[[retain]]\nname = \"local-registry\"\nimages = [\"127.0.0.1:5000/**\"]\nkeep_last = 1\norder = \"semver\"\n",
        vec![
            img("r1", 5.0, &["127.0.0.1:5000/team/app:v1.0.0"]),
            img("r2", 4.0, &["127.0.0.1:5000/team/app:v1.1.0"]),
            img("r3", 3.0, &["team/app:v0.1.0"]),
        ],
        vec![],
    );
}

#[test]
fn in_use_image_keeps_all_its_references() {
    snapshot(
        "in_use_multi_tag",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 1\n",
        vec![
            img("u1", 30.0, &["app:1", "app:one"]),
            img("u2", 10.0, &["app:2"]),
        ],
        vec![container("d00d", "u1")],
    );
}

#[test]
fn nothing_to_do() {
    snapshot(
        "nothing",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 10\n",
        app5(),
        vec![],
    );
}

#[test]
fn semver_prereleases_sort_below_releases() {
    snapshot(
        "semver_prerelease",
        "[[retain]]\nname = \"rel\"\nimages = [\"app\"]\nkeep_last = 2\norder = \"semver\"\n",
        vec![
            img("q1", 1.0, &["app:2.0.0-rc.1"]),
            img("q2", 2.0, &["app:2.0.0"]),
            img("q3", 3.0, &["app:1.9.9"]),
            img("q4", 0.5, &["app:2.0.0-beta"]),
        ],
        vec![],
    );
}

#[test]
fn everything_together() {
    snapshot(
        "combined",
        "[daemon]\nmin_age = \"1h\"\nmax_removals = 4\n\n\
         [[retain]]\nname = \"releases\"\nimages = [\"team/*\"]\ntags = ['v.*']\nkeep_last = 2\norder = \"semver\"\n\n\
         [[retain]]\nname = \"dev\"\nimages = [\"team/*\"]\ntags = ['dev-.*']\nkeep_within = \"3d\"\n\n\
         [[retain]]\nname = \"dangling\"\nuntagged = true\nkeep_within = \"1d\"\n\n\
         [[protect]]\nimages = [\"team/db\"]\n\n\
         [[float]]\nname = \"stable\"\nimages = [\"team/*\"]\ntag = \"stable\"\nfollow = 'v\\d+\\.\\d+\\.\\d+'\n\n\
         [[tags]]\nname = \"conventions\"\nimages = [\"team/**\"]\nallow = ['v.*', 'dev-.*', 'stable']\n",
        vec![
            img("w1", 40.0, &["team/web:v1.0.0"]),
            img("w2", 30.0, &["team/web:v1.1.0"]),
            img("w3", 20.0, &["team/web:v1.2.0", "team/web:hotfix"]),
            img("w4", 5.0, &["team/web:dev-a"]),
            img("w5", 1.0, &["team/web:dev-b"]),
            img("x1", 40.0, &["team/db:v0.9.0"]),
            img("x2", 30.0, &["team/db:v1.0.0"]),
            img("x3", 20.0, &["team/db:v1.0.1"]),
            img("y1", 3.0, &[]),
            img("y2", 0.5, &[]),
        ],
        vec![container("abcd", "w1")],
    );
}

// ---- disk pressure ([storage]) ----

use stowage::engine::Layer;
use stowage::storage::Disk;

const MB: u64 = 1_000_000;

fn layer(name: &str, mb: u64) -> Layer {
    Layer {
        chain_id: format!("sha256:{name}"),
        size: mb * MB,
    }
}

/// Images with layers: (name, days old, tags, layers).
fn layered(specs: &[(&str, f64, &[&str], Vec<Layer>)]) -> (Vec<Image>, stowage::plan::LayerMap) {
    let mut images = Vec::new();
    let mut layers = stowage::plan::LayerMap::default();
    for (name, days, tags, ls) in specs {
        let mut i = img(name, *days, tags);
        i.size = ls.iter().map(|l| l.size).sum();
        layers.insert(i.id.clone(), ls.clone());
        images.push(i);
    }
    (images, layers)
}

fn snapshot_observed(name: &str, body: &str, observed: Observed, state: State) {
    let p = policy(body);
    let got = plan::render(&plan::plan(&p, &observed, &state, NOW));
    assert_plan_snapshot(name, &got);
}

fn used(state: &mut State, name: &str, days_ago: f64) {
    state.images.insert(
        id(name),
        ImageState {
            first_seen: NOW - 400 * DAY,
            last_used: Some(NOW - (days_ago * DAY as f64) as i64),
            ..ImageState::default()
        },
    );
}

#[test]
fn max_size_counts_shared_layers_once_and_evicts_by_last_use() {
    let (images, layers) = layered(&[
        (
            "k1",
            90.0,
            &["web:1"],
            vec![layer("base", 100), layer("k1", 10)],
        ),
        (
            "k2",
            80.0,
            &["web:2"],
            vec![layer("base", 100), layer("k2", 10)],
        ),
        ("k3", 70.0, &["api:1"], vec![layer("k3", 50)]),
        ("k4", 60.0, &["api:2", "api:latest"], vec![layer("k4", 50)]),
    ]);
    // Unique bytes: 100 + 10 + 10 + 50 + 50 = 220 MB; max 150 MB: free 70.
    let mut state = State::default();
    used(&mut state, "k1", 50.0);
    used(&mut state, "k2", 1.0);
    used(&mut state, "k3", 40.0);
    used(&mut state, "k4", 2.0);
    snapshot_observed(
        "storage_max_size",
        "[storage]\nmax_size = \"150MB\"\n",
        Observed {
            images,
            layers,
            ..Observed::default()
        },
        state,
    );
}

/// The store of `storage_max_size` with a content store of 60 MB (40 MB
/// of complete blobs, 10 MB of them for an unfinished download, and 20 MB
/// of partial downloads) against 200 MB: 80 MB to free, the store's 30 MB
/// that may go first, then images for the other 50 MB.
#[test]
fn the_content_store_counts_and_shrinks_before_eviction() {
    let (images, layers) = layered(&[
        (
            "k1",
            90.0,
            &["web:1"],
            vec![layer("base", 100), layer("k1", 10)],
        ),
        (
            "k2",
            80.0,
            &["web:2"],
            vec![layer("base", 100), layer("k2", 10)],
        ),
        ("k3", 70.0, &["api:1"], vec![layer("k3", 50)]),
        ("k4", 60.0, &["api:2", "api:latest"], vec![layer("k4", 50)]),
    ]);
    let mut state = State::default();
    used(&mut state, "k1", 50.0);
    used(&mut state, "k2", 1.0);
    used(&mut state, "k3", 40.0);
    used(&mut state, "k4", 2.0);
    snapshot_observed(
        "storage_content_store",
        "[storage]\nmax_size = \"200MB\"\n",
        Observed {
            images,
            layers,
            cache: Some(stowage::storage::Cache {
                complete: 40 * MB,
                partial: 20 * MB,
                pinned: 10 * MB,
                on_data_root: false,
            }),
            ..Observed::default()
        },
        state,
    );
}

#[test]
fn watermarks_evict_unprotected_images_down_to_low() {
    let (images, layers) = layered(&[
        ("n1", 90.0, &["old:1"], vec![layer("n1", 100)]),
        ("n2", 80.0, &["used:1"], vec![layer("n2", 100)]),
        ("n3", 70.0, &["keep:1"], vec![layer("n3", 100)]),
        ("n4", 60.0, &["old:2"], vec![layer("n4", 100)]),
        ("n5", 5.0, &["new:1"], vec![layer("n5", 100)]),
    ]);
    snapshot_observed(
        "storage_watermarks",
        "[storage]\nhigh_watermark = \"90%\"\nlow_watermark = \"75%\"\n\n\
         [[protect]]\nname = \"pinned\"\nimages = [\"keep\"]\n",
        Observed {
            images,
            layers,
            containers: vec![container("c1", "n2")],
            disk: Some(Disk {
                path: "/var/lib/docker".into(),
                total: 1000 * MB,
                available: 50 * MB,
            }),
            ..Observed::default()
        },
        State::default(),
    );
}

#[test]
fn unreachable_target_reports_protected_bytes() {
    let (images, layers) = layered(&[
        ("o1", 90.0, &["db:1"], vec![layer("o1", 300)]),
        ("o2", 80.0, &["db:2"], vec![layer("o2", 200)]),
        ("o3", 80.0, &["tmp:1"], vec![layer("o3", 50)]),
    ]);
    snapshot_observed(
        "storage_unreachable",
        "[storage]\nmax_size = \"100MB\"\n\n[[protect]]\nname = \"databases\"\nimages = [\"db\"]\n",
        Observed {
            images,
            layers,
            containers: vec![container("c2", "o2")],
            ..Observed::default()
        },
        State::default(),
    );
}

#[test]
fn retention_frees_first_then_eviction_and_build_cache() {
    let (images, layers) = layered(&[
        ("r1", 90.0, &["app:1"], vec![layer("r1", 100)]),
        ("r2", 80.0, &["app:2"], vec![layer("r2", 100)]),
        ("r3", 70.0, &["app:3"], vec![layer("r3", 100)]),
        ("r4", 60.0, &["tool:1"], vec![layer("r4", 100)]),
    ]);
    snapshot_observed(
        "storage_after_retention",
        "[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 2\n\n\
         [storage]\nmax_size = \"250MB\"\nbuild_cache_max = \"1GB\"\n",
        Observed {
            images,
            layers,
            build_cache: Some(3_000 * MB),
            ..Observed::default()
        },
        State::default(),
    );
}

#[test]
fn watermarks_without_a_local_data_root_say_so() {
    let (images, layers) = layered(&[("p1", 90.0, &["x:1"], vec![layer("p1", 100)])]);
    snapshot_observed(
        "storage_remote_engine",
        "[storage]\nhigh_watermark = \"90%\"\nlow_watermark = \"75%\"\n",
        Observed {
            images,
            layers,
            disk_error: Some(
                "the engine is not on this host, so its data root /var/lib/docker cannot be measured here"
                    .into(),
            ),
            ..Observed::default()
        },
        State::default(),
    );
}

/// The plan of the synthetic benchmark store (references of every shape,
/// with layers, containers, state and every rule kind), verdicts included,
/// as text.
fn synthetic_text(references: usize, seed: u64) -> String {
    use stowage::fixture::{SYNTHETIC_NOW, synthetic_policy, synthetic_store};
    let store = synthetic_store(references, seed);
    let p = stowage::policy::parse(
        &synthetic_policy(store.unique_bytes),
        std::path::Path::new("synthetic.toml"),
    )
    .expect("the synthetic policy is valid");
    let plan = plan::plan(&p, &store.observed, &store.state, SYNTHETIC_NOW);
    let mut got = plan::render(&plan);
    got.push_str("verdicts\n");
    for v in &plan.verdicts {
        got.push_str(&format!(
            "  {} {} {} {:?}: {}\n",
            v.reference.as_deref().unwrap_or("<none>"),
            &v.image[7..19],
            v.decision.as_str(),
            v.rule,
            v.reason
        ));
    }
    got
}

/// Both snapshots below were written by the planner before its rewrite for
/// speed (commit 105b16d): they pin that the rewrite changed no decision
/// and no word, on the small store and on one large enough for the
/// planner's second thread.
#[test]
fn synthetic_store_plan_and_verdicts() {
    assert_plan_snapshot("synthetic_400", &synthetic_text(400, 3));
}

/// 20k references (5.5 MB of text): kept as its SHA-256.
#[test]
fn synthetic_store_20k_plan_and_verdicts() {
    use sha2::{Digest, Sha256};
    let got = synthetic_text(20_000, 5);
    let digest = hex::encode(Sha256::digest(got.as_bytes()));
    assert_eq!(
        digest, "c7a390dbf18abae81be8902215d6b1689280e69e1656dcee94a9a5a861f62580",
        "plan of the 20k synthetic store differs from the one the planner made before its rewrite"
    );
}

/// `[daemon] trash`: the image retention removes whole goes to the trash as
/// one action (its other references folded in); one that keeps a name is
/// only untagged.
#[test]
fn trash_instead_of_remove() {
    let mut images = app5();
    images[0].repo_tags.push("app:old".into());
    images.push(img("c1", 30.0, &["app:2.1.0-dev", "keep:me"]));
    snapshot(
        "trash_instead_of_remove",
        "[daemon]\nmin_age = \"1h\"\ntrash = \"7d\"\n\
         [[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = 2\n",
        images,
        vec![],
    );
}

/// Expiry: exactly the trash references stowage made whose window ended
/// go (rule `trash`), with or without their state entry; those within the
/// window, and hand-made `stowage-trash/` tags, stay; none of them counts
/// toward `keep_last` or is in a rule's scope.
#[test]
fn trash_expiry_takes_only_expired_entries_stowage_made() {
    let trash_ref = |name: &str, at: i64| format!("stowage-trash/{}:{at}", &id(name)[7..19]);
    let expired = trash_ref("t1", NOW - DAY);
    let lost = trash_ref("t2", NOW - 2 * DAY);
    let running = trash_ref("t3", NOW + DAY);
    let images = vec![
        img("t1", 10.0, &[&expired]),
        img("t2", 10.0, &[&lost]),
        img("t3", 10.0, &[&running]),
        // Hand-made: another image's id prefix, and a tag that is no time.
        img("h1", 10.0, &[&trash_ref("zz", NOW - DAY)]),
        img(
            "h2",
            10.0,
            &[&format!("stowage-trash/{}:latest", &id("h2")[7..19])],
        ),
        img("a1", 1.0, &["app:1"]),
    ];
    let mut state = State::default();
    state.trash.insert(
        id("t1"),
        stowage::trash::Entry {
            reference: expired.clone(),
            former: vec!["app:0".into()],
            rule: "app".into(),
            removed_at: NOW - 8 * DAY,
            expires: NOW - DAY,
            size: 1_000_000,
            ..Default::default()
        },
    );
    snapshot_with_state(
        "trash_expiry",
        "[daemon]\nmin_age = \"1h\"\ntrash = \"7d\"\n\
         [[retain]]\nname = \"all\"\nimages = [\"**\"]\nkeep_last = 1\n",
        images,
        vec![],
        state,
    );
}

/// The same store planned as Docker lists it and as Podman does: on Podman
/// `team/*` takes the local `localhost/team/app` (its own repository for
/// `keep_last`, apart from Docker Hub's `team/app`); on Docker a
/// `localhost/` name is a registry on this host and stays out of it.
#[test]
fn podman_local_names_match_globs_without_a_registry() {
    let p = policy(
        "[[retain]]\nname = \"team\"\nimages = [\"team/*\"]\nkeep_last = 1\n\
         [[protect]]\nname = \"pinned\"\nimages = [\"team/pinned\"]\n",
    );
    let images = vec![
        img("l1", 30.0, &["localhost/team/app:v1"]),
        img("l2", 20.0, &["localhost/team/app:v2"]),
        img("l3", 10.0, &["localhost/team/app:v3"]),
        img("h1", 40.0, &["team/app:v1"]),
        img("p1", 50.0, &["localhost/team/pinned:v1"]),
        img("p2", 5.0, &["localhost/team/pinned:v2"]),
    ];
    let planned = |engine| {
        let observed = Observed {
            engine,
            images: images.clone(),
            ..Observed::default()
        };
        plan::render(&plan::plan(&p, &observed, &State::default(), NOW))
    };
    // The first word of a plan line is its action, the second the reference.
    let acts = |plan: &str, action: &str, reference: &str| {
        plan.lines().any(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(action) && words.next() == Some(reference)
        })
    };
    let touched = |plan: &str, reference: &str| {
        ["remove", "untag", "trash", "evict"]
            .iter()
            .any(|a| acts(plan, a, reference))
    };
    let podman = planned(stowage::engine::EngineKind::Podman);
    for gone in ["localhost/team/app:v1", "localhost/team/app:v2"] {
        assert!(acts(&podman, "remove", gone), "{gone}:\n{podman}");
    }
    assert!(!touched(&podman, "localhost/team/app:v3"), "{podman}");
    // Docker Hub's team/app is a repository of its own, newest there.
    assert!(!touched(&podman, "team/app:v1"), "{podman}");
    // Protection takes the local name too.
    assert!(
        podman.contains("  localhost/team/pinned:v1  (pinned: matches [[protect]]"),
        "{podman}"
    );
    assert!(!touched(&podman, "localhost/team/pinned:v1"), "{podman}");

    let docker = planned(stowage::engine::EngineKind::Docker);
    assert!(!docker.contains("localhost/"), "{docker}");
    assert!(!touched(&docker, "team/app:v1"), "{docker}");
}
