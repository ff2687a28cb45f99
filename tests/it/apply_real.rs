//! `stowage plan` / `apply` / `status` / `history` as a user runs them, against
//! the real private engine that `scripts/test` starts.
//!
//! One scenario per test; the dangling-image rule touches every dangling image
//! on the engine, so only `retention_scenario` uses it (cargo runs test
//! binaries one after another, so no other binary is loading images meanwhile).

use crate::engine_env;
use serde_json::Value;
use stowage::engine::Engine;

const DAY: i64 = 86_400;

use crate::engine_env::{stowage, text};

async fn refs_in(engine: &impl Engine, ns: &str) -> Vec<String> {
    let mut v: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .filter(|t| t.starts_with(ns))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn retention_scenario() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("retention");
    let now = chrono::Utc::now().timestamp();
    let app = format!("{ns}/app");
    let mut images = Vec::new();
    // A dozen semver tags, some not semver, on distinct images.
    for (i, v) in (0..=10).enumerate() {
        let mut img = engine_env::image(
            &[&format!("{app}:v1.{v}.0")],
            now - (100 - 9 * i as i64) * DAY,
            2048,
        );
        if v == 9 {
            img = img.tag(format!("{app}:hack"));
        }
        images.push(img);
    }
    images.push(engine_env::image(
        &[&format!("{app}:nightly")],
        now - 3 * DAY,
        2048,
    ));
    images.push(engine_env::image(
        &[&format!("{ns}/untouched:anything")],
        now - 400 * DAY,
        1024,
    ));
    // Two old dangling images.
    let dangling = [
        engine_env::image(&[], now - 900 * DAY, 512),
        engine_env::image(&[], now - 800 * DAY, 512),
    ];
    images.extend(dangling.iter().cloned());
    engine_env::load(&engine, &images).await;
    // v1.1.0 is used by a stopped container.
    let cid = engine_env::create_container(&addr, &format!("{app}:v1.1.0"));

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"version = 1
[daemon]
state_dir = "{state}"
min_age = "1h"

[[retain]]
name = "releases"
images = ["{app}"]
keep_last = 3
order = "semver"

[[retain]]
name = "dangling"
untagged = true
keep_within = "30d"

[[protect]]
name = "golden"
images = ["{app}"]
tags = ['v1\.0\.0']

[[float]]
name = "stable"
images = ["{app}"]
tag = "stable"
follow = 'v\d+\.\d+\.\d+'

[[tags]]
name = "conventions"
images = ["{ns}/**"]
allow = ['v\d+\.\d+\.\d+', 'stable', 'latest']
on_violation = "untag"
"#,
            state = dir.path().join("state").display(),
        ),
    )
    .unwrap();

    let check = stowage(&addr, &policy, &["check"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));

    let plan = stowage(&addr, &policy, &["plan", "--exit-code"]);
    assert_eq!(plan.status.code(), Some(1), "{}", text(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout).to_string();
    eprintln!("plan before apply:\n{shown}");
    assert!(shown.contains("beyond keep_last=3 by semver"), "{shown}");
    assert!(shown.contains("in use by container"), "{shown}");
    assert!(shown.contains("matches [[protect]] \"golden\""), "{shown}");

    let planned = stowage(&addr, &policy, &["plan", "--json"]);
    let planned: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let n_actions = planned["actions"].as_array().unwrap().len();
    assert!(n_actions >= 9, "{planned:#}");

    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));

    let mut want: Vec<String> = [
        "app:v1.0.0",
        "app:v1.1.0",
        "app:v1.8.0",
        "app:v1.9.0",
        "app:v1.10.0",
        "app:stable",
        "untouched:anything",
    ]
    .iter()
    .map(|r| format!("{ns}/{r}"))
    .collect();
    want.sort();
    assert_eq!(refs_in(&engine, &ns).await, want);
    // stable points at the newest release.
    let all = engine.list_images().await.unwrap();
    let holder = |r: &str| {
        all.iter()
            .find(|i| i.repo_tags.iter().any(|t| t == r))
            .map(|i| i.id.clone())
    };
    assert_eq!(
        holder(&format!("{app}:stable")),
        holder(&format!("{app}:v1.10.0"))
    );
    for d in &dangling {
        assert!(
            all.iter().all(|i| i.id != d.id()),
            "dangling {} still there",
            d.id()
        );
    }

    // Exactly one audit record per action, plus the warnings.
    let audit = stowage::audit::read(&dir.path().join("state/audit.jsonl")).unwrap();
    let acted: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.action != stowage::audit::Action::Warn)
        .collect();
    assert_eq!(acted.len(), n_actions, "{:#?}", audit.records);
    assert!(
        acted
            .iter()
            .all(|r| r.outcome == stowage::audit::Outcome::Ok)
    );

    // A second plan is empty.
    let again = stowage(&addr, &policy, &["plan", "--exit-code"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));

    // status and history read back what happened.
    let status = stowage(&addr, &policy, &["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let row = status["references"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ref"] == format!("{app}:v1.1.0"))
        .expect("v1.1.0 in status");
    assert_eq!(row["verdict"], "protected");
    assert_eq!(row["rule"], "in-use");
    let history = stowage(&addr, &policy, &["history", "--since", "1h"]);
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(
        history.lines().any(|l| l.contains(" remove ")
            && l.contains(" ok ")
            && l.contains(&format!("{app}:v1.2.0"))),
        "{history}"
    );

    engine_env::remove_container(&addr, &cid);
}

#[tokio::test]
async fn invalid_policy_changes_nothing() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("invalid-policy");
    let now = chrono::Utc::now().timestamp();
    engine_env::load(
        &engine,
        &[
            engine_env::image(&[&format!("{ns}/app:1")], now - 50 * DAY, 256),
            engine_env::image(&[&format!("{ns}/app:2")], now - 40 * DAY, 256),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("version = 1\n[[retain]]\nname = \"x\"\nimages = [\"{ns}/*\"]\nkeep_lst = 1\n"),
    )
    .unwrap();
    let before = refs_in(&engine, &ns).await;
    let out = stowage(&addr, &policy, &["apply"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.toml:5:1"), "{err}");
    assert!(err.contains("keep_last"), "{err}");
    assert_eq!(refs_in(&engine, &ns).await, before);
}

#[test]
fn unreachable_engine_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = stowage("unix:///nonexistent/docker.sock", &policy, &["plan"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the Docker engine at unix:///nonexistent/docker.sock"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
