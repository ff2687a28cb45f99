//! The trash against kills, restarts, disk pressure and a registry, on the
//! real private engine: a `kill -9` of `stowage apply` or the daemon between
//! the trash reference and the state's save loses neither the window nor the
//! former references (the trash journal); the window survives a daemon
//! restart and restore works beside it; eviction takes the trash first and
//! frees the bytes it planned; after the window, restore pulls the image
//! back by its recorded digest from the registry.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use stowage::engine::{DockerEngine, Engine};

use crate::engine_env::{self, stowage, text};
use crate::net::{HttpAction, UnixHttpProxy};

const DAY: i64 = 86_400;
const MIB: usize = 1024 * 1024;

fn write_policy(dir: &Path, app: &str, window: &str, extra: &str) -> PathBuf {
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"version = 1
[daemon]
schedule = "0 0 0 1 1 * 2099"
state_dir = "{d}/state"
control_socket = "{d}/control.sock"
min_age = "0s"
trash = "{window}"

[[retain]]
name = "releases"
images = ["{app}"]
keep_last = 2
{extra}"#,
            d = dir.display(),
        ),
    )
    .unwrap();
    policy
}

/// `v1` and `old` on the oldest image (the one trashed), `v2`, `v3`.
async fn load_app(engine: &DockerEngine, app: &str, size: usize) -> String {
    let now = chrono::Utc::now().timestamp();
    let images = [
        engine_env::image(
            &[&format!("{app}:v1"), &format!("{app}:old")],
            now - 30 * DAY,
            size,
        ),
        engine_env::image(&[&format!("{app}:v2")], now - 20 * DAY, size),
        engine_env::image(&[&format!("{app}:v3")], now - 10 * DAY, size),
    ];
    engine_env::load(engine, &images).await;
    images[0].id()
}

async fn tags(engine: &DockerEngine, id: &str) -> Vec<String> {
    let mut t = engine
        .image(id)
        .await
        .unwrap()
        .map(|i| i.repo_tags)
        .unwrap_or_default();
    t.sort();
    t
}

fn state(dir: &Path) -> Value {
    std::fs::read(dir.join("state/state.json"))
        .map(|b| serde_json::from_slice(&b).expect("state.json is whole"))
        .unwrap_or(Value::Null)
}

fn listed_former(addr: &str, policy: &Path, id: &str) -> Value {
    let out = stowage(addr, policy, &["trash", "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).expect("json");
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["image"] == id)
        .map_or(Value::Null, |r| r["former"].clone())
}

/// `stowage ARGS` in the background, its log in `dir/NAME.log`.
fn spawn(addr: &str, policy: &Path, args: &[&str], dir: &Path, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    engine_env::stowage_cmd(addr, policy, args)
        .env_remove("NOTIFY_SOCKET")
        .env("STOWAGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting stowage")
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits until the daemon's log says `n` reconciles finished.
fn wait_reconciles(dir: &Path, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = log(dir, name);
        let done = l
            .lines()
            .filter(|l| l.contains("reconcile ") && l.contains(" done in "))
            .count();
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "no reconcile finished:\n{l}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's `/metrics` text.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn stop(mut child: Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the daemon stopped with {status:?}");
}

/// Starts `stowage ARGS` through a proxy that holds the answer to the
/// untag of `v1` (the trash's last step: the trash reference is on, the
/// former references are off, the state not saved), then `kill -9`s it.
async fn kill_mid_trash(
    engine: &DockerEngine,
    dir: &Path,
    policy: &Path,
    app: &str,
    id: &str,
    args: &[&str],
) {
    let upstream = PathBuf::from(
        engine_env::engine_addr()
            .unwrap()
            .trim_start_matches("unix://"),
    );
    let held = Arc::new(AtomicBool::new(false));
    let h = held.clone();
    let last = app.rsplit('/').next().unwrap().to_owned();
    let proxy = UnixHttpProxy::start(&upstream, &dir.join("p.sock"), move |method, target| {
        let v1 = [format!("{last}:v1"), format!("{last}%3Av1")];
        if method == "DELETE" && v1.iter().any(|t| target.contains(t.as_str())) {
            h.store(true, Ordering::SeqCst);
            HttpAction::StallBody
        } else {
            HttpAction::Pass
        }
    });
    let mut child = spawn(&proxy.addr(), policy, args, dir, "killed");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !held.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the trash never reached its untag:\n{}",
            log(dir, "killed")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The engine has the untag; the answer never comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.image(&format!("{app}:v1")).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the untag was not done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(proxy);
    let left = tags(engine, id).await;
    assert!(
        left.len() == 1 && left[0].starts_with("stowage-trash/"),
        "{left:?}\n{}",
        log(dir, "killed")
    );
    assert!(
        state(dir)["trash"].get(id).is_none(),
        "the state was saved before the kill: the test missed its window"
    );
    assert!(dir.join("state/trash-journal.json").exists());
}

/// Regression (issue 17): a `kill -9` between the trash reference and the
/// state's save lost the entry's former references. The daemon killed so,
/// then started twice: the window and the references survive, and a restore
/// beside the daemon puts them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trash_survives_kill_9_of_the_daemon_and_its_restarts() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("trash-kill-daemon");
    let app = format!("{ns}/app");
    let id = load_app(&engine, &app, 2048).await;
    let dir = engine_env::short_folder("tk-");
    let policy = write_policy(dir.path(), &app, "7d", "");
    let metrics = format!("127.0.0.1:{}", crate::net::free_port());
    let text_of = std::fs::read_to_string(&policy).unwrap().replace(
        "trash = \"7d\"\n",
        &format!("trash = \"7d\"\nmetrics = \"{metrics}\"\n"),
    );
    std::fs::write(&policy, text_of).unwrap();
    kill_mid_trash(&engine, dir.path(), &policy, &app, &id, &["run"]).await;
    let former = serde_json::json!([format!("{app}:old"), format!("{app}:v1")]);
    // Before any reconcile, `stowage trash` reads the journal.
    assert_eq!(listed_former(&addr, &policy, &id), former);

    // The next start recovers the entry into the state, the journal goes.
    let daemon = spawn(&addr, &policy, &["run"], dir.path(), "first");
    wait_reconciles(dir.path(), "first", 1);
    assert_eq!(
        state(dir.path())["trash"][&id]["former"],
        former,
        "{}",
        log(dir.path(), "first")
    );
    assert!(!dir.path().join("state/trash-journal.json").exists());
    stop(daemon);

    // A restart: still in the trash, same references.
    let daemon = spawn(&addr, &policy, &["run"], dir.path(), "second");
    wait_reconciles(dir.path(), "second", 1);
    let held = tags(&engine, &id).await;
    assert!(
        held.len() == 1 && held[0].starts_with("stowage-trash/"),
        "{held:?}"
    );
    assert_eq!(state(dir.path())["trash"][&id]["former"], former);
    assert_eq!(listed_former(&addr, &policy, &id), former);
    // `status` shows the trash (from the daemon).
    let status = stowage(&addr, &policy, &["status", "--json"]);
    let shown: Value = serde_json::from_slice(&status.stdout).expect("json");
    assert!(
        shown["trash"]["images"].as_u64() >= Some(1),
        "{}",
        text(&status)
    );

    // And its metrics.
    let scraped = scrape(&metrics);
    let gauge = scraped
        .lines()
        .find_map(|l| l.strip_prefix("stowage_trash_images "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(gauge >= Some(1), "{scraped}");
    assert!(scraped.contains("\nstowage_trash_bytes "), "{scraped}");

    // Restore beside the daemon, held out of retention; the daemon's next
    // reconcile drops the entry and keeps the image.
    let restore = stowage(
        &addr,
        &policy,
        &["restore", &format!("{app}:v1"), "--protect"],
    );
    assert_eq!(restore.status.code(), Some(0), "{}", text(&restore));
    let want = vec![format!("{app}:old"), format!("{app}:v1")];
    assert_eq!(tags(&engine, &id).await, want);
    let again = stowage(&addr, &policy, &["reconcile"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(tags(&engine, &id).await, want, "{}", text(&again));
    stop(daemon);
    assert!(state(dir.path())["trash"].get(&id).is_none());
}

/// The same kill of `stowage apply`: the next `apply` recovers the entry and
/// `restore` puts the references back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trash_survives_kill_9_of_apply() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("trash-kill-apply");
    let app = format!("{ns}/app");
    let id = load_app(&engine, &app, 2048).await;
    let dir = engine_env::short_folder("tk-");
    let policy = write_policy(dir.path(), &app, "7d", "");
    kill_mid_trash(&engine, dir.path(), &policy, &app, &id, &["apply"]).await;
    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let former = serde_json::json!([format!("{app}:old"), format!("{app}:v1")]);
    assert_eq!(state(dir.path())["trash"][&id]["former"], former);
    assert!(!dir.path().join("state/trash-journal.json").exists());
    let restore = stowage(&addr, &policy, &["restore", &id]);
    assert_eq!(restore.status.code(), Some(0), "{}", text(&restore));
    assert_eq!(
        tags(&engine, &id).await,
        vec![format!("{app}:old"), format!("{app}:v1")]
    );
}

/// Disk pressure on an engine of the test's own: the trashed image goes
/// first although another is older, and the engine frees what was planned.
#[tokio::test]
async fn trash_is_evicted_first_and_frees_the_bytes_planned() {
    let Some(own) = engine_env::PrivateEngine::start(None) else {
        return;
    };
    let engine = DockerEngine::connect(Some(&own.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    // The oldest image is no rule's; 10 + 3 * 8 MiB in all.
    let other = engine_env::image(&["other/base:1"], now - 90 * DAY, 10 * MIB);
    engine_env::load(&engine, std::slice::from_ref(&other)).await;
    let id = load_app(&engine, "team/app", 8 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "team/app", "7d", "");
    let apply = stowage(&own.addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    assert!(tags(&engine, &id).await[0].starts_with("stowage-trash/"));
    let before = engine.disk_usage().await.unwrap().layers_size;
    // Under `created` order the oldest (`other`) would go; the trash first.
    let policy = write_policy(
        dir.path(),
        "team/app",
        "7d",
        &format!(
            "\n[storage]\nmax_size = \"{}\"\norder = \"created\"\n",
            before - 4 * MIB as u64
        ),
    );
    let status = stowage(&own.addr, &policy, &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("trash: 1 image(s)"),
        "{}",
        text(&status)
    );
    let apply = stowage(&own.addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let after = engine.disk_usage().await.unwrap().layers_size;
    let audit = stowage::audit::read(&dir.path().join("state/audit.jsonl")).unwrap();
    let evicted: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.action == stowage::audit::Action::Evict)
        .collect();
    assert_eq!(evicted.len(), 1, "{evicted:#?}");
    assert_eq!(evicted[0].image.as_deref(), Some(id.as_str()));
    assert_eq!(Some(before - after), evicted[0].bytes);
    assert!(engine.image(&id).await.unwrap().is_none());
    assert!(engine.image("other/base:1").await.unwrap().is_some());
}

/// `restore` within the window gives the image its registry digest
/// reference back; after the window it pulls the image back by that digest
/// (recorded when it was trashed): same image, its tags.
#[tokio::test]
async fn trash_restore_after_the_window_pulls_back_by_digest() {
    let (Some(engine), Some(reg)) = (engine_env::engine().await, engine_env::registry()) else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("trash-digest");
    let app = format!("{reg}/{ns}/app");
    let id = load_app(&engine, &app, 4096).await;
    let v1 = format!("{app}:v1");
    // The push gives the image its `RepoDigests`.
    engine.push(&v1, None, &mut |_| {}).await.unwrap();
    let digests = engine.image(&id).await.unwrap().unwrap().repo_digests;
    assert!(!digests.is_empty());
    let dir = tempfile::tempdir().unwrap();
    // Within the window: the tags come back, and the digest reference by a
    // pull of the manifest (the engine dropped it with the tags).
    let policy = write_policy(dir.path(), &app, "7d", "");
    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    assert!(
        engine
            .image(&id)
            .await
            .unwrap()
            .unwrap()
            .repo_digests
            .is_empty()
    );
    let restore = stowage(&addr, &policy, &["restore", &v1]);
    assert_eq!(restore.status.code(), Some(0), "{}", text(&restore));
    let back = engine.image(&id).await.unwrap().unwrap();
    assert_eq!(back.repo_digests, digests, "{}", text(&restore));
    assert_eq!(
        tags(&engine, &id).await,
        vec![format!("{app}:old"), v1.clone()]
    );

    // After the window: pulled back whole.
    let policy = write_policy(dir.path(), &app, "1s", "");
    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    assert_eq!(
        state(dir.path())["trash"][&id]["repo_digests"],
        serde_json::json!(digests)
    );
    std::thread::sleep(Duration::from_millis(2100));
    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    assert!(
        engine.image(&id).await.unwrap().is_none(),
        "expired, removed"
    );
    let restore = stowage(&addr, &policy, &["restore", &v1, "--protect"]);
    assert_eq!(restore.status.code(), Some(0), "{}", text(&restore));
    assert!(
        String::from_utf8_lossy(&restore.stdout).contains("pulled back by digest"),
        "{}",
        text(&restore)
    );
    assert_eq!(
        tags(&engine, &id).await,
        vec![format!("{app}:old"), v1.clone()]
    );
}
