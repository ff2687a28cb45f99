//! Pre-pull and mirror against the real private engine and real registries on
//! loopback, with a fault-injecting proxy between engine and registry.
//!
//! The harness registry (`STOWAGE_TEST_REGISTRY`) serves where no fault is
//! needed; tests that stop a registry, add auth or need a second one start
//! their own (`net::TestRegistry`). The binary runs through
//! `tokio::process` on a multi-thread runtime so that the in-process proxy keeps
//! serving while `stowage` waits on it.

use crate::engine_env;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::engine_env::text;
use crate::net::{Mode, Proxy, TestRegistry};
use serde_json::Value;
use stowage::audit::{self, Action, Outcome, Record};
use stowage::engine::{Credentials, DockerEngine, Engine};
use stowage::fixture::FixtureImage;

const DAY: i64 = 86_400;

/// Tests of this binary run in parallel on one engine. A pull by digest leaves
/// its image dangling until the reference is tagged, and the one test with a
/// rule for dangling images would take other tests' images in that window: it
/// runs alone (write), the others together (read).
pub(crate) static ENGINE_WIDE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs the stowage binary; `DOCKER_CONFIG` points at an empty folder so the
/// machine's own Docker credentials never take part.
pub(crate) async fn stowage(engine: &str, policy: &Path, args: &[&str]) -> Output {
    let empty = policy.parent().unwrap().join("docker-config");
    std::fs::create_dir_all(&empty).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("--engine")
        .arg(engine)
        .arg("-p")
        .arg(policy)
        .args(args)
        .env_remove("DOCKER_HOST")
        .env("DOCKER_CONFIG", &empty)
        .output()
        .await
        .expect("running stowage")
}

/// A test's folder: policy, state and audit log live here.
pub(crate) struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    pub(crate) fn new() -> Dir {
        Dir {
            tmp: tempfile::tempdir_in(engine_env::scratch_dir()).unwrap(),
        }
    }
    pub(crate) fn path(&self) -> &Path {
        self.tmp.path()
    }
    pub(crate) fn policy(&self, body: &str) -> PathBuf {
        let p = self.path().join("policy.toml");
        std::fs::write(
            &p,
            format!(
                "version = 1\n[daemon]\nstate_dir = \"{}\"\n{body}",
                self.path().join("state").display()
            ),
        )
        .unwrap();
        p
    }
    pub(crate) fn audit(&self) -> Vec<Record> {
        audit::read(&self.path().join("state/audit.jsonl"))
            .unwrap()
            .records
    }
    pub(crate) fn audit_file_missing(&self) -> bool {
        !self.path().join("state/audit.jsonl").exists()
    }
    pub(crate) fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.path().join("state/state.json")).unwrap())
            .unwrap()
    }
}

/// Loads `image` into the engine, pushes each of its tags, then removes the
/// local tags (the image is gone from the host, present in the registry).
/// Returns the manifest digest of the last push.
pub(crate) async fn publish(
    engine: &DockerEngine,
    image: &FixtureImage,
    credentials: Option<&Credentials>,
) -> String {
    engine_env::load(engine, std::slice::from_ref(image)).await;
    for t in &image.tags {
        engine
            .push(t, credentials, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("pushing {t}: {e}"));
    }
    let listed = engine.list_images().await.unwrap();
    let img = listed.iter().find(|i| i.id == image.id()).unwrap();
    let digest = img
        .repo_digests
        .last()
        .and_then(|d| d.split_once('@'))
        .map(|(_, d)| d.to_owned())
        .expect("a pushed image has a RepoDigest");
    for t in &image.tags {
        engine.remove(t).await.unwrap();
    }
    digest
}

/// The same registry under another name (`localhost:PORT`): publishing
/// through it leaves the references under `127.0.0.1:PORT` on the host alone.
fn alias(registry: &str) -> String {
    registry.replace("127.0.0.1:", "localhost:")
}

/// The image id `reference` names on the engine, if any.
pub(crate) async fn holder(engine: &DockerEngine, reference: &str) -> Option<String> {
    engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.repo_tags.iter().any(|t| t == reference))
        .map(|i| i.id)
}

pub(crate) async fn has_image(engine: &DockerEngine, id: &str) -> bool {
    engine
        .list_images()
        .await
        .unwrap()
        .iter()
        .any(|i| i.id == id)
}

pub(crate) fn records(all: Vec<Record>, action: Action, outcome: Outcome) -> Vec<Record> {
    all.into_iter()
        .filter(|r| r.action == action && r.outcome == outcome)
        .collect()
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_missing_image_then_nothing_to_do() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("pull-missing");
    let reference = format!("{reg}/{ns}/app:1");
    let image = engine_env::image(&[&reference], now() - DAY, 64 * 1024);
    publish(&engine, &image, None).await;
    assert!(!has_image(&engine, &image.id()).await);

    let dir = Dir::new();
    let policy = dir.policy(&format!("[[prepull]]\nimage = \"{reference}\"\n"));
    let plan = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(plan.status.code(), Some(1), "{}", text(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout);
    assert!(
        shown.contains(&format!("pull     {reference} <- {reg}/{ns}/app@sha256:")),
        "{shown}"
    );
    assert!(shown.contains("missing on this host"), "{shown}");

    // A dry run records what it would pull and pulls nothing.
    let dry = stowage(&addr, &policy, &["apply", "--dry-run"]).await;
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert!(!has_image(&engine, &image.id()).await);
    assert_eq!(records(dir.audit(), Action::Pull, Outcome::DryRun).len(), 1);

    let apply = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    assert!(
        String::from_utf8_lossy(&apply.stdout).contains("pulled 1"),
        "{}",
        text(&apply)
    );
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    let pulls = records(dir.audit(), Action::Pull, Outcome::Ok);
    assert_eq!(pulls.len(), 1, "{:#?}", dir.audit());
    assert_eq!(pulls[0].reference.as_deref(), Some(reference.as_str()));
    assert_eq!(pulls[0].image.as_deref(), Some(image.id().as_str()));
    assert!(pulls[0].duration_ms.is_some());

    // Refresh is due on every apply; the digest is unchanged: nothing moves.
    let again = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(dir.audit().len(), 2, "{:#?}", dir.audit());
    let plan = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_keeps_cache_backs_off_and_catches_up() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let addr = engine_env::engine_addr().unwrap();
    let dir = Dir::new();
    let mut registry = TestRegistry::start(&dir.path().join("registry"), None);
    let proxy = Proxy::start(&registry.addr).await;
    let ns = engine_env::unique_ns("registry-down");
    // Published through the registry's own address; pulled through the proxy.
    let a = engine_env::image(
        &[&format!("{}/{ns}/app:1", registry.addr)],
        now() - DAY,
        4096,
    );
    publish(&engine, &a, None).await;
    let reference = format!("{}/{ns}/app:1", proxy.addr);
    let policy = dir.policy(&format!(
        "retry_max = \"1h\"\nstall_timeout = \"10s\"\n[[prepull]]\nimage = \"{reference}\"\n"
    ));
    let first = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));

    // The uplink goes down: the cached image stays, tagged; the record says why.
    registry.stop();
    let down = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(down.status.code(), Some(1), "{}", text(&down));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    let error = failed[0].error.clone().unwrap();
    assert!(error.contains(&proxy.addr), "{error}");
    let key = format!("pull {reference}");
    let backoff = &dir.state()["backoff"][&key];
    assert_eq!(backoff["failures"], 1, "{}", dir.state());
    assert!(backoff["next_attempt"].as_i64().unwrap() > now());

    // `plan` says the registry cannot be asked, and still succeeds.
    let plan = stowage(&addr, &policy, &["plan"]).await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("wait     "),
        "{}",
        text(&plan)
    );

    // Within the backoff window: not retried (no connection), and it says so.
    let connections = proxy.connections();
    let waiting = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(waiting.status.code(), Some(1), "{}", text(&waiting));
    assert_eq!(
        proxy.connections(),
        connections,
        "retried within the window"
    );
    let skips = records(dir.audit(), Action::Skip, Outcome::Deferred);
    assert_eq!(skips.len(), 1, "{:#?}", dir.audit());
    assert!(
        skips[0].reason.contains("backing off after 1 failure"),
        "{:?}",
        skips[0]
    );
    assert!(String::from_utf8_lossy(&waiting.stdout).contains("backing off 1"));

    // The uplink returns and the window passes: it catches up.
    registry.restart();
    let b = engine_env::image(&[&format!("{}/{ns}/app:1", registry.addr)], now(), 4096);
    publish(&engine, &b, None).await;
    let mut state = dir.state();
    state["backoff"][&key]["next_attempt"] = Value::from(0);
    std::fs::write(
        dir.path().join("state/state.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    let back = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(back.status.code(), Some(0), "{}", text(&back));
    assert_eq!(holder(&engine, &reference).await, Some(b.id()));
    assert!(
        dir.state()["backoff"].get(&key).is_none(),
        "{}",
        dir.state()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_is_abandoned_within_its_timeout() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let proxy = Proxy::start(&reg).await;
    let ns = engine_env::unique_ns("stall");
    let a = engine_env::image(&[&format!("{reg}/{ns}/a:1")], now() - DAY, 1 << 20);
    let b = engine_env::image(&[&format!("{reg}/{ns}/b:1")], now() - DAY, 1 << 20);
    let healthy = format!("{reg}/{ns}/c:1");
    let c = engine_env::image(&[&healthy], now() - DAY, 4096);
    publish(&engine, &a, None).await;
    let b_digest = publish(&engine, &b, None).await;
    publish(&engine, &c, None).await;
    let dir = Dir::new();
    // `a` is resolved by its tag, `b` by its pinned digest (the registry
    // client's deadline covers both); `c` comes straight from the registry
    // and must not wait for them.
    let policy = dir.policy(&format!(
        "stall_timeout = \"3s\"\nconcurrency = 3\n\
         [[prepull]]\nimage = \"{p}/{ns}/a:1\"\n\
         [[prepull]]\nimage = \"{p}/{ns}/b:1\"\ndigest = \"{b_digest}\"\n\
         [[prepull]]\nimage = \"{healthy}\"\n",
        p = proxy.addr
    ));
    proxy.set(Mode::Stall);
    let started = Instant::now();
    let out = stowage(&addr, &policy, &["apply"]).await;
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Both abandoned after ~3 s, in parallel: far less than the engine's own timeouts.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 2, "{:#?}", dir.audit());
    let error_of = |name: &str| {
        failed
            .iter()
            .find(|r| r.reference.as_deref().unwrap().contains(name))
            .and_then(|r| r.error.clone())
            .unwrap()
    };
    for name in ["/a:1", "/b:1"] {
        assert!(
            error_of(name).contains("no answer within 3s"),
            "{}",
            error_of(name)
        );
    }
    assert!(!has_image(&engine, &a.id()).await && !has_image(&engine, &b.id()).await);
    // One failing reference never blocks the others.
    assert_eq!(holder(&engine, &healthy).await, Some(c.id()));
    let ok = records(dir.audit(), Action::Pull, Outcome::Ok);
    assert_eq!(ok.len(), 1, "{:#?}", dir.audit());
    let done_after = ok[0].duration_ms.unwrap();
    assert!(done_after < 3000, "the healthy pull took {done_after} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_fall_back_in_order_and_tag_the_canonical_reference() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let addr = engine_env::engine_addr().unwrap();
    let dir = Dir::new();
    let second = TestRegistry::start(&dir.path().join("second"), None);
    // The first source and the image's own registry are both down.
    let first = Proxy::start("127.0.0.1:9").await;
    first.set(Mode::Refuse);
    let canonical = Proxy::start("127.0.0.1:9").await;
    canonical.set(Mode::Refuse);
    let ns = engine_env::unique_ns("sources");
    let image = engine_env::image(&[&format!("{}/{ns}/app:1", second.addr)], now() - DAY, 4096);
    publish(&engine, &image, None).await;
    let reference = format!("{}/{ns}/app:1", canonical.addr);
    let policy = dir.policy(&format!(
        "[[prepull]]\nimage = \"{reference}\"\nsources = [\"{}\", \"{}\"]\n",
        first.addr, second.addr
    ));
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    assert!(first.connections() > 0, "the first source was not tried");
    assert_eq!(
        canonical.connections(),
        0,
        "fell back past a source that served"
    );
    // No source-named tag is left behind.
    let tags: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.id == image.id())
        .flat_map(|i| i.repo_tags)
        .collect();
    assert_eq!(tags, std::slice::from_ref(&reference));
    let pulls = records(dir.audit(), Action::Pull, Outcome::Ok);
    assert_eq!(pulls.len(), 1, "{:#?}", dir.audit());
    assert!(pulls[0].reason.contains(&second.addr), "{:?}", pulls[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_pin_mismatch_is_rejected_and_the_image_stays() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("pin");
    let reference = format!("{reg}/{ns}/app:1");
    let a = engine_env::image(&[&reference], now() - 2 * DAY, 4096);
    let a_digest = publish(&engine, &a, None).await;
    let dir = Dir::new();
    let pinned = |d: &str| format!("[[prepull]]\nimage = \"{reference}\"\ndigest = \"{d}\"\n");
    let out = stowage(&addr, &dir.policy(&pinned(&a_digest)), &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));

    // The registry's tag moves on, and the pin names a digest it does not have.
    let b = engine_env::image(&[&format!("{}/{ns}/app:1", alias(&reg))], now() - DAY, 4096);
    let b_digest = publish(&engine, &b, None).await;
    let bogus = format!("sha256:{}", "ab".repeat(32));
    let out = stowage(&addr, &dir.policy(&pinned(&bogus)), &["apply"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));
    assert!(
        !has_image(&engine, &b.id()).await,
        "the unpinned image came in"
    );
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    let error = failed[0].error.clone().unwrap();
    assert!(
        error.contains(&format!("pinned {bogus}")) && error.contains(&b_digest),
        "{error}"
    );

    // Pinning the new digest moves the tag.
    let out = stowage(&addr, &dir.policy(&pinned(&b_digest)), &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(b.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_picks_up_a_new_digest_and_keeps_the_previous_one() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.write().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("refresh");
    let reference = format!("{reg}/{ns}/app:1");
    let dir = Dir::new();
    // Dangling images go at once unless protected: keep_previous must shield.
    let policy = dir.policy(&format!(
        "min_age = \"0s\"\n\
         [[prepull]]\nimage = \"{reference}\"\nkeep_previous = 1\n\
         [[retain]]\nname = \"dangling\"\nuntagged = true\n"
    ));
    // Later versions are published under the registry's other name, so the
    // host's reference stays on the current image until stowage moves it.
    let later = format!("{}/{ns}/app:1", alias(&reg));
    let a = engine_env::image(&[&reference], now() - 3 * DAY, 4096);
    let b = engine_env::image(&[&later], now() - 2 * DAY, 4096);
    let c = engine_env::image(&[&later], now() - DAY, 4096);
    publish(&engine, &a, None).await;
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));

    publish(&engine, &b, None).await;
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(b.id()));
    assert!(
        has_image(&engine, &a.id()).await,
        "previous image lost: {:#?}\n{}",
        dir.audit(),
        dir.state()
    );
    assert_eq!(
        dir.state()["prepull"][&reference]["previous"],
        serde_json::json!([a.id()])
    );
    let plan = stowage(&addr, &policy, &["plan"]).await;
    let shown = String::from_utf8_lossy(&plan.stdout);
    assert!(
        shown.contains(&format!("previous image of [[prepull]] {reference}")),
        "{shown}"
    );

    publish(&engine, &c, None).await;
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(c.id()));
    assert!(
        has_image(&engine, &b.id()).await,
        "kept previous image lost"
    );
    assert!(
        !has_image(&engine, &a.id()).await,
        "beyond keep_previous, still there"
    );
}

/// The digest a registry holds for `name:tag`, asked with skopeo: a client
/// independent of the engine.
fn skopeo_digest(registry: &str, name: &str, tag: &str, creds: Option<&str>) -> Option<String> {
    let mut cmd = std::process::Command::new("skopeo");
    cmd.args(["inspect", "--tls-verify=false"]);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    let out = cmd
        .arg(format!("docker://{registry}/{name}:{tag}"))
        .output()
        .expect("running skopeo");
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["Digest"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_pushes_once_verified_by_skopeo() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let addr = engine_env::engine_addr().unwrap();
    let dir = Dir::new();
    let target = TestRegistry::start(&dir.path().join("mirror"), None);
    let ns = engine_env::unique_ns("mirror");
    let images = [
        engine_env::image(&[&format!("{ns}/app:1")], now() - DAY, 4096),
        engine_env::image(&[&format!("{ns}/app:2")], now() - DAY, 4096),
        engine_env::image(&[&format!("{ns}/other:1")], now() - DAY, 4096),
    ];
    engine_env::load(&engine, &images).await;
    let policy = dir.policy(&format!(
        "[[mirror]]\nname = \"edge\"\nregistry = \"{}\"\nprefix = \"cache\"\nimages = [\"{ns}/app\"]\n",
        target.addr
    ));
    let plan = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(plan.status.code(), Some(1), "{}", text(&plan));
    assert!(String::from_utf8_lossy(&plan.stdout).contains(&format!(
        "push     {}/cache/{ns}/app:1 <- {ns}/app:1",
        target.addr
    )));

    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pushes = records(dir.audit(), Action::Push, Outcome::Ok);
    assert_eq!(pushes.len(), 2, "{:#?}", dir.audit());
    let listed = engine.list_images().await.unwrap();
    let state = dir.state();
    for (tag, img) in [("1", &images[0]), ("2", &images[1])] {
        let remote = skopeo_digest(&target.addr, &format!("cache/{ns}/app"), tag, None)
            .unwrap_or_else(|| panic!("the mirror lacks app:{tag}"));
        // What the target holds is what stowage pushed, of this image.
        let pushed = &state["mirrored"][format!("{}/cache/{ns}/app:{tag}", target.addr)];
        assert_eq!(pushed["digest"], remote.as_str(), "{state}");
        assert_eq!(pushed["image"], img.id().as_str(), "{state}");
        // The temporary tag made for the push is gone.
        let local = listed.iter().find(|i| i.id == img.id()).unwrap();
        assert_eq!(local.repo_tags, [format!("{ns}/app:{tag}")]);
    }
    assert!(skopeo_digest(&target.addr, &format!("cache/{ns}/other"), "1", None).is_none());

    // Already there with the same digest: nothing is pushed again.
    let again = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(
        records(dir.audit(), Action::Push, Outcome::Ok).len(),
        2,
        "{:#?}",
        dir.audit()
    );
    let plan = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_registries_refuse_the_fallback() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("allowed");
    let reference = format!("{reg}/{ns}/app:1");
    let image = engine_env::image(&[&reference], now() - DAY, 4096);
    publish(&engine, &image, None).await;
    // The one allowed source is down; the image's own registry serves it but
    // is not allowed.
    let source = Proxy::start("127.0.0.1:9").await;
    source.set(Mode::Refuse);
    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "allowed_registries = [\"{s}\"]\n[[prepull]]\nimage = \"{reference}\"\nsources = [\"{s}\"]\n",
        s = source.addr
    ));
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!has_image(&engine, &image.id()).await);
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    let error = failed[0].error.clone().unwrap();
    assert!(
        error.contains(&format!(
            "registry {reg} is not in daemon.allowed_registries"
        )),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_and_never_shown() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let addr = engine_env::engine_addr().unwrap();
    let dir = Dir::new();
    let secret = format!("s3cret-{:x}", engine_env::unique_seed());
    let wrong = format!("wr0ng-{:x}", engine_env::unique_seed());
    let htpasswd = dir.path().join("htpasswd");
    let hash = std::process::Command::new("htpasswd")
        .args(["-Bbn", "stowage", &secret])
        .output()
        .expect("htpasswd (apt-get install apache2-utils)");
    assert!(hash.status.success());
    std::fs::write(&htpasswd, &hash.stdout).unwrap();
    let registry = TestRegistry::start(&dir.path().join("registry"), Some(&htpasswd));
    let creds = Credentials {
        username: Some("stowage".into()),
        password: Some(secret.clone()),
        identity_token: None,
        server: registry.addr.clone(),
    };
    let ns = engine_env::unique_ns("creds");
    let pulled = format!("{}/{ns}/app:1", registry.addr);
    let image = engine_env::image(&[&pulled], now() - DAY, 4096);
    publish(&engine, &image, Some(&creds)).await;
    let local = engine_env::image(&[&format!("{ns}/local:1")], now() - DAY, 4096);
    engine_env::load(&engine, std::slice::from_ref(&local)).await;

    let write_creds = |password: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("stowage:{password}"));
        // Not named after the password: paths are logged (which file holds
        // the credentials), secrets never.
        let name = if password == secret { "right" } else { "wrong" };
        let path = dir.path().join(format!("creds-{name}.json"));
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"http://{}/v2/": {{"auth": "{auth}"}}}}}}"#,
                registry.addr
            ),
        )
        .unwrap();
        path
    };
    let body = |creds: &Path| {
        format!(
            "credentials_file = \"{}\"\nretry_max = \"1s\"\n\
             [[prepull]]\nimage = \"{pulled}\"\n\
             [[mirror]]\nname = \"m\"\nregistry = \"{}\"\nimages = [\"{ns}/local\"]\n",
            creds.display(),
            registry.addr
        )
    };
    let mut outputs = String::new();

    // Wrong password: both fail, with the registry's reason, and no secret shown.
    let policy = dir.policy(&body(&write_creds(&wrong)));
    for args in [&["plan"][..], &["apply"], &["history"]] {
        let o = stowage(&addr, &policy, args).await;
        outputs.push_str(&text(&o));
        if args == ["apply"] {
            assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        }
    }
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    assert_eq!(records(dir.audit(), Action::Push, Outcome::Failed).len(), 1);

    // Right password: pulled and pushed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let policy = dir.policy(&body(&write_creds(&secret)));
    for args in [
        &["plan"][..],
        &["apply"],
        &["status"],
        &["history", "--json"],
    ] {
        let o = stowage(&addr, &policy, args).await;
        outputs.push_str(&text(&o));
        if args == ["apply"] {
            assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        }
    }
    assert_eq!(holder(&engine, &pulled).await, Some(image.id()));
    let creds_arg = format!("stowage:{secret}");
    assert!(
        skopeo_digest(
            &registry.addr,
            &format!("{ns}/local"),
            "1",
            Some(&creds_arg)
        )
        .is_some(),
        "the mirror push did not arrive"
    );

    outputs.push_str(&std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap());
    outputs.push_str(&std::fs::read_to_string(dir.path().join("state/state.json")).unwrap());
    for s in [&secret, &wrong] {
        assert!(
            !outputs.contains(s.as_str()),
            "secret {s} leaked:\n{outputs}"
        );
    }
}
