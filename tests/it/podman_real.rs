//! Podman as the engine: the real `podman system service` that `scripts/test`
//! starts beside the Docker engine (`STOWAGE_TEST_PODMAN`: vfs storage,
//! config, locks and temporary files under the test's folder), the harness
//! registry on loopback, and the stowage binary against them.
//!
//! Telling Podman apart; `localhost/…` names matched by globs written
//! without a registry, Docker Hub names shown short; protection by
//! containers in every state, pods' infra containers and Buildah's working
//! containers; the event stream the daemon reacts to; disk usage; pulls
//! and pushes through libpod; the content store's loopback hand-off.
//!
//! The service is shared by tests running in parallel: each test keeps to
//! its own repository namespace (`unique_ns`), and only asserts about it.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use stowage::engine::{DockerEngine, Engine, EngineError, EngineKind, EventKind};
use stowage::registry::{Options, Registry};

use crate::engine_env::{self, podman_cli, text, unique_ns};
use crate::transfer_real::{Dir, stowage};

const DAY: i64 = 86_400;

/// The private Podman service and its address, or `None` (after a SKIP
/// line) outside CI.
async fn podman() -> Option<(DockerEngine, String)> {
    let engine = engine_env::podman().await?;
    let addr = engine_env::podman_addr()?;
    Some((engine, addr))
}

/// Every reference the engine holds in namespace `ns`, sorted.
async fn refs(engine: &DockerEngine, ns: &str) -> Vec<String> {
    let mut v: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .filter(|t| t.contains(&format!("{ns}/")))
        .collect();
    v.sort();
    v
}

/// `stowage status --json`'s rows of namespace `ns`: reference -> (verdict, reason).
async fn verdicts(addr: &str, policy: &Path, ns: &str) -> Vec<(String, String, String)> {
    let out = stowage(addr, policy, &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut rows: Vec<(String, String, String)> = v["references"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| {
            let reference = r["ref"].as_str()?;
            reference.contains(&format!("{ns}/")).then(|| {
                (
                    reference.to_owned(),
                    r["verdict"].as_str().unwrap_or_default().to_owned(),
                    r["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect();
    rows.sort();
    rows
}

/// A docker-archive of one runnable image: busybox as `/bin/sleep`,
/// `/bin/true` and `/bin/sh`, a file unique to `seed` (a new image id),
/// `Cmd` a long sleep, tagged `reference`.
fn runnable(reference: &str, seed: u64, created: i64) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox (busybox-static) for runnable images");
    let mut layer = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    layer
        .append_data(&mut dir, "bin/", std::io::empty())
        .unwrap();
    let mut file = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        layer.append_data(&mut h, path, data).unwrap();
    };
    file("bin/busybox", &busybox, 0o755);
    file("seed", seed.to_string().as_bytes(), 0o644);
    for applet in ["sleep", "true", "sh"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        layer
            .append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let diff = format!("sha256:{}", hex::encode(Sha256::digest(&layer)));
    let created = chrono::DateTime::from_timestamp(created, 0)
        .unwrap()
        .to_rfc3339();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": created,
        "config": { "Cmd": ["/bin/sleep", "600"] },
        "rootfs": { "type": "layers", "diff_ids": [diff] },
        "history": [{ "created": created, "created_by": "podman_real fixture" }],
    }))
    .unwrap();
    let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [reference], "Layers": ["layer.tar"],
    }]))
    .unwrap();
    let mut out = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("layer.tar", &layer),
        (config_name.as_str(), &config),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        out.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    out.into_inner().unwrap()
}

#[tokio::test]
async fn podman_is_told_apart_and_named_in_plan_status_and_check() {
    let Some((engine, addr)) = podman().await else {
        return;
    };
    assert_eq!(engine.kind(), EngineKind::Podman);
    let info = engine.info().await.unwrap();
    assert_eq!(info.kind, EngineKind::Podman);
    assert!(
        info.server_version
            .starts_with(|c: char| c.is_ascii_digit()),
        "{info:?}"
    );
    // The data root is the service's graphroot, measurable here.
    assert!(Path::new(&info.data_root).is_dir(), "{info:?}");
    assert!(engine.is_local());
    assert_eq!(engine.event_logger().await.as_deref(), Some("file"));
    // The Docker engine beside it is not taken for Podman.
    if let Some(docker) = engine_env::engine().await {
        assert_eq!(docker.kind(), EngineKind::Docker);
        assert!(docker.event_logger().await.is_none());
    }

    let dir = Dir::new();
    let policy = dir.policy(
        "[[retain]]\nname = \"r\"\nimages = [\"nobody-here/*\"]\nkeep_last = 1\n\
         [storage]\nbuild_cache_max = \"1GB\"\n",
    );
    let header = format!("engine: Podman {} (API ", info.server_version);
    for args in [&["plan"][..], &["status"]] {
        let out = stowage(&addr, &policy, args).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains(&header), "{args:?}: {shown}");
        assert!(
            shown.contains("note: Podman names images built or loaded here localhost/"),
            "{shown}"
        );
        assert!(
            shown.contains("note: [storage] build_cache_max does nothing on Podman"),
            "{shown}"
        );
    }
    let out = stowage(&addr, &policy, &["plan", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["engine"]["kind"], "podman", "{v:#}");
    assert_eq!(
        v["engine"]["notes"].as_array().map(Vec::len),
        Some(2),
        "{v:#}"
    );
    // `check` touches the engine only when named.
    let out = stowage(&addr, &policy, &["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&header),
        "{}",
        text(&out)
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["check", "-p"])
        .arg(&policy)
        .env_remove("DOCKER_HOST")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("engine:"),
        "{}",
        text(&out)
    );
    // Named and unreachable: exit 2, saying so.
    let gone = stowage("unix:///nonexistent/podman.sock", &policy, &["check"]).await;
    assert_eq!(gone.status.code(), Some(2), "{}", text(&gone));
}

#[tokio::test]
async fn localhost_names_match_globs_without_a_registry_and_come_back_from_the_trash() {
    let Some((engine, addr)) = podman().await else {
        return;
    };
    let ns = unique_ns("podman-names");
    let now = chrono::Utc::now().timestamp();
    let images: Vec<_> = (1..=3)
        .map(|i| engine_env::image(&[&format!("{ns}/app:{i}")], now - (10 - i) * DAY, 300))
        .chain([engine_env::image(
            &[&format!("{ns}/keep:1")],
            now - 20 * DAY,
            300,
        )])
        .collect();
    engine_env::load(&engine, &images).await;
    // Podman names what it loads `localhost/…`, and stowage shows it so.
    assert_eq!(
        refs(&engine, &ns).await,
        vec![
            format!("localhost/{ns}/app:1"),
            format!("localhost/{ns}/app:2"),
            format!("localhost/{ns}/app:3"),
            format!("localhost/{ns}/keep:1"),
        ]
    );
    // A name without a registry that stowage hands Podman is Docker Hub's,
    // whatever Podman's short-name rules: listed short, as dockerd does.
    engine
        .tag(&images[0].id(), &format!("{ns}/hub:v1"))
        .await
        .unwrap();
    let hub = engine
        .image(&format!("{ns}/hub:v1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hub.id, images[0].id());
    assert!(hub.repo_tags.contains(&format!("{ns}/hub:v1")), "{hub:?}");

    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "min_age = \"0s\"\ntrash = \"1h\"\n\
         [[retain]]\nname = \"apps\"\nimages = [\"{ns}/app\"]\nkeep_last = 1\n\
         [[retain]]\nname = \"keep\"\nimages = [\"{ns}/keep\"]\n\
         [[protect]]\nname = \"kept\"\nimages = [\"{ns}/keep\"]\n\
         [[retain]]\nname = \"hub\"\nimages = [\"docker.io/{ns}/*\"]\nkeep_last = 5\n"
    ));
    let out = stowage(&addr, &policy, &["plan"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    // The plan names the references as Podman holds them.
    assert!(shown.contains(&format!("localhost/{ns}/app:1")), "{shown}");
    assert!(shown.contains(&format!("localhost/{ns}/app:2")), "{shown}");
    assert!(
        !shown.contains(&format!("localhost/{ns}/app:3 ")),
        "{shown}"
    );
    let rows = verdicts(&addr, &policy, &ns).await;
    let verdict = |r: &str| {
        rows.iter()
            .find(|(reference, _, _)| reference == r)
            .map(|(_, v, _)| v.clone())
            .unwrap_or_else(|| panic!("{r} not in {rows:?}"))
    };
    assert_eq!(verdict(&format!("localhost/{ns}/app:3")), "keep");
    assert_eq!(verdict(&format!("localhost/{ns}/keep:1")), "protected");
    // `docker.io/…` globs match Docker Hub names (shown short), never localhost/ ones.
    assert_eq!(verdict(&format!("{ns}/hub:v1")), "keep");
    assert_ne!(verdict(&format!("localhost/{ns}/app:1")), "keep");

    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Applying then planning again: nothing left to do.
    let again = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let left = refs(&engine, &ns).await;
    assert!(left.contains(&format!("localhost/{ns}/app:3")), "{left:?}");
    assert!(left.contains(&format!("localhost/{ns}/keep:1")), "{left:?}");
    assert!(left.contains(&format!("{ns}/hub:v1")), "{left:?}");
    assert!(!left.iter().any(|r| r.ends_with("app:2")), "{left:?}");
    // app:1's image keeps hub:v1, so it was only untagged; app:2's went to
    // the trash under a reference stowage made (`stowage-trash/…`, a Docker
    // Hub name to Podman).
    let out = stowage(&addr, &policy, &["trash", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let trash: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = trash.as_array().cloned().unwrap_or_default();
    let row = rows
        .iter()
        .find(|r| r.to_string().contains(&format!("localhost/{ns}/app:2")))
        .unwrap_or_else(|| panic!("app:2 not in the trash: {trash:#}"));
    let trashed = engine.image(&images[1].id()).await.unwrap().unwrap();
    assert!(
        trashed
            .repo_tags
            .iter()
            .all(|t| t.starts_with("stowage-trash/")),
        "{trashed:?} ({row})"
    );
    let out = stowage(
        &addr,
        &policy,
        &["restore", &format!("localhost/{ns}/app:2")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let back = engine.image(&images[1].id()).await.unwrap().unwrap();
    assert_eq!(
        back.repo_tags,
        vec![format!("localhost/{ns}/app:2")],
        "{back:?}"
    );
    for r in refs(&engine, &ns).await {
        let _ = engine.remove(&r).await;
    }
}

#[tokio::test]
async fn containers_in_every_state_pods_and_buildah_containers_protect_their_images() {
    let Some((engine, addr)) = podman().await else {
        return;
    };
    let ns = unique_ns("podman-users");
    let old = chrono::Utc::now().timestamp() - 30 * DAY;
    let states = [
        "created", "running", "exited", "paused", "infra", "inpod", "buildah",
    ];
    for (i, s) in states.iter().enumerate() {
        let archive = runnable(
            &format!("{ns}/run:{s}"),
            engine_env::unique_seed(),
            old + i as i64,
        );
        engine.load(Bytes::from(archive)).await.unwrap();
    }
    let image = |s: &str| format!("localhost/{ns}/run:{s}");
    let name = |s: &str| format!("{}-{s}", ns.replace('/', "-"));
    podman_cli(
        &addr,
        &["create", "--name", &name("created"), &image("created")],
    );
    podman_cli(
        &addr,
        &["run", "-d", "--name", &name("running"), &image("running")],
    );
    podman_cli(
        &addr,
        &[
            "run",
            "--name",
            &name("exited"),
            &image("exited"),
            "/bin/true",
        ],
    );
    podman_cli(
        &addr,
        &["run", "-d", "--name", &name("paused"), &image("paused")],
    );
    podman_cli(&addr, &["pause", &name("paused")]);
    // A pod whose infra container runs one image, another container in it the next.
    podman_cli(
        &addr,
        &[
            "pod",
            "create",
            "--name",
            &name("pod"),
            "--infra-image",
            &image("infra"),
        ],
    );
    podman_cli(
        &addr,
        &[
            "create",
            "--pod",
            &name("pod"),
            "--name",
            &name("inpod"),
            &image("inpod"),
        ],
    );
    podman_cli(&addr, &["pod", "start", &name("pod")]);
    // Buildah's working container: in Podman's storage, not in its Docker listing.
    engine_env::buildah(&[
        "from",
        "--pull=never",
        "--name",
        &name("buildah"),
        &image("buildah"),
    ]);

    for (who, state) in [
        ("created", "created"),
        ("running", "running"),
        ("exited", "exited"),
        ("paused", "paused"),
        ("inpod", "running"),
    ] {
        let is = podman_cli(
            &addr,
            &["inspect", "--format", "{{.State.Status}}", &name(who)],
        );
        assert_eq!(is, state, "{who}");
    }
    let users = engine.list_containers().await.unwrap();
    for s in states {
        let id = engine.image_id_of(&image(s)).await.unwrap().unwrap();
        let using = engine.containers_using(&id).await.unwrap();
        assert!(
            !using.is_empty(),
            "no container uses {s} ({id}) in {users:?}"
        );
        assert!(users.iter().any(|c| c.image_id == id), "{s}");
    }
    assert!(
        users
            .iter()
            .any(|c| c.state == "storage" && c.name == name("buildah")),
        "Buildah's container missing: {users:?}"
    );

    // A rule that keeps nothing: only protection stands in its way.
    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "min_age = \"0s\"\nmax_removals = 1000\n[[retain]]\nname = \"none\"\nimages = [\"{ns}/*\"]\n"
    ));
    let rows = verdicts(&addr, &policy, &ns).await;
    assert_eq!(rows.len(), states.len(), "{rows:?}");
    for (reference, verdict, reason) in &rows {
        assert_eq!(verdict, "protected", "{reference}: {reason}");
        assert!(
            reason.contains("in use by container"),
            "{reference}: {reason}"
        );
    }
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(refs(&engine, &ns).await.len(), states.len());

    // Without their containers the same rule takes every one.
    podman_cli(
        &addr,
        &["pod", "rm", "--force", "--time", "0", &name("pod")],
    );
    for s in ["created", "running", "exited", "paused"] {
        podman_cli(&addr, &["rm", "--force", "--time", "0", &name(s)]);
    }
    engine_env::buildah(&["rm", &name("buildah")]);
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(refs(&engine, &ns).await, Vec::<String>::new());
}

#[tokio::test]
async fn the_event_stream_names_images_and_the_daemon_marks_use() {
    let Some((engine, addr)) = podman().await else {
        return;
    };
    let ns = unique_ns("podman-events");
    let now = chrono::Utc::now().timestamp();
    let archive = runnable(
        &format!("{ns}/app:1"),
        engine_env::unique_seed(),
        now - 5 * DAY,
    );
    let loaded = engine.load(Bytes::from(archive)).await.unwrap();
    assert_eq!(loaded, vec![format!("localhost/{ns}/app:1")]);
    let id = engine.image_id_of(&loaded[0]).await.unwrap().unwrap();

    // The engine's own stream: a tag names the image by its id, a
    // container's create by the image as Podman holds it.
    let cname = format!("{}-ev", ns.replace('/', "-"));
    let watched = async {
        let mut events = engine.events();
        let (mut tagged, mut created) = (false, false);
        while !(tagged && created) {
            let next = events.next().await.expect("the stream goes on").unwrap();
            match (next.kind, next.action.as_str()) {
                (EventKind::Image, "tag") if next.id == id => tagged = true,
                (EventKind::Container, "create")
                    if next.image.as_deref() == Some(loaded[0].as_str()) =>
                {
                    created = true;
                }
                _ => {}
            }
        }
    };
    let acted = async {
        // The stream is subscribed once polled and answered: a moment.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        engine
            .tag(&id, &format!("localhost/{ns}/app:2"))
            .await
            .unwrap();
        let addr = addr.clone();
        let cname = cname.clone();
        let image = loaded[0].clone();
        tokio::task::spawn_blocking(move || {
            podman_cli(&addr, &["create", "--name", &cname, &image]);
        })
        .await
        .unwrap();
    };
    let both = async { tokio::join!(watched, acted) };
    tokio::time::timeout(Duration::from_secs(30), both)
        .await
        .expect("a tag and a create event within 30 s");
    podman_cli(&addr, &["rm", "--force", &cname]);

    // The daemon: a container created while it runs marks its image used.
    let dir = engine_env::short_folder("pe-");
    let d = dir.path();
    std::fs::write(
        d.join("policy.toml"),
        format!(
            "version = 1\n[daemon]\nschedule = \"0 0 0 1 1 * 2099\"\nwatch = false\n\
             state_dir = \"{s}/state\"\ncontrol_socket = \"{s}/control.sock\"\nmin_age = \"0s\"\n\
             [[retain]]\nname = \"r\"\nimages = [\"{ns}/app\"]\nkeep_last = 5\n",
            s = d.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("daemon.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["run", "--engine", &addr, "-p"])
        .arg(d.join("policy.toml"))
        .env_remove("DOCKER_HOST")
        .env_remove("NOTIFY_SOCKET")
        .env("STOWAGE_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon_log = || std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default();
    engine_env::wait(30, "the daemon's first reconcile", || {
        d.join("state/state.json").exists()
    });
    let started = daemon_log();
    assert!(started.contains("(Podman) reachable"), "{started}");
    assert!(
        started.contains("Podman names images built or loaded here localhost/"),
        "{started}"
    );
    let cname = format!("{}-daemon", ns.replace('/', "-"));
    // The watcher subscribes right after connecting: wait a little first.
    std::thread::sleep(Duration::from_millis(500));
    podman_cli(&addr, &["create", "--name", &cname, &loaded[0]]);
    let used = || {
        std::fs::read(d.join("state/state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| s["images"][&id]["last_used"].as_i64().is_some())
    };
    // Marks are written in batches between reconciles: ask for one.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !used() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap(),
            rustix::process::Signal::USR1,
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    let _ = child.kill();
    let _ = child.wait();
    podman_cli(&addr, &["rm", "--force", &cname]);
    assert!(used(), "last_used of {id} never written:\n{}", daemon_log());
}

#[tokio::test]
async fn disk_usage_and_eviction_on_podman_and_no_build_cache() {
    let Some((engine, addr)) = podman().await else {
        return;
    };
    let usage = engine.disk_usage().await.unwrap();
    assert_eq!(usage.build_cache_size, 0);
    assert!(matches!(
        engine.prune_build_cache(0).await,
        Err(EngineError::Unsupported(_))
    ));
    let ns = unique_ns("podman-disk");
    let now = chrono::Utc::now().timestamp();
    let images: Vec<_> = (1..=2)
        .map(|i| engine_env::image(&[&format!("{ns}/big:{i}")], now - 40 * DAY, 400_000))
        .collect();
    engine_env::load(&engine, &images).await;
    let layers = engine.image_layers(&images[0].id()).await.unwrap();
    assert!(
        layers.iter().map(|l| l.size).sum::<u64>() >= 400_000,
        "{layers:?}"
    );
    // A budget nothing fits in: both images are to go (the plan alone:
    // other tests' images share the service).
    let dir = Dir::new();
    let policy =
        dir.policy("min_age = \"0s\"\nmax_removals = 10000\n[storage]\nmax_size = \"1B\"\n");
    let out = stowage(&addr, &policy, &["plan"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    for i in 1..=2 {
        let line = shown
            .lines()
            .find(|l| l.contains(&format!("localhost/{ns}/big:{i}")))
            .unwrap_or_else(|| panic!("big:{i} not in the plan:\n{shown}"));
        assert!(line.contains("evict"), "{line}");
    }
    for r in refs(&engine, &ns).await {
        engine.remove(&r).await.unwrap();
    }
}

#[tokio::test]
async fn pulls_pushes_and_the_content_store_hand_off_through_libpod() {
    let Some((engine, addr)) = podman().await else {
        return;
    };
    let Some(reg) = engine_env::registry() else {
        return;
    };
    let ns = unique_ns("podman-transfer");
    let now = chrono::Utc::now().timestamp();
    let client = Registry::new(&reg, None, &Options::default()).unwrap();

    // Engine push and pull of a loopback registry: Podman trusts none
    // unasked; stowage asks it to skip TLS for loopback only.
    let direct = engine_env::image(&[&format!("{reg}/{ns}/direct:v1")], now - DAY, 500);
    engine_env::load(&engine, std::slice::from_ref(&direct)).await;
    let mut said = Vec::new();
    engine
        .push(&direct.tags[0], None, &mut |p| said.push(p.status.clone()))
        .await
        .unwrap_or_else(|e| panic!("push {}: {e}", direct.tags[0]));
    assert!(!said.is_empty(), "no progress from the push");
    let pushed = client
        .manifest_digest(&format!("{ns}/direct"), "v1")
        .await
        .unwrap();
    engine.remove(&direct.tags[0]).await.unwrap();
    assert!(engine.image(&direct.id()).await.unwrap().is_none());
    engine
        .pull(
            &format!("{reg}/{ns}/direct@{pushed}"),
            None,
            None,
            &mut |_| {},
        )
        .await
        .unwrap();
    let back = engine
        .image(&format!("{reg}/{ns}/direct@{pushed}"))
        .await
        .unwrap()
        .expect("pulled by digest");
    assert_eq!(back.id, direct.id());
    engine
        .remove(&format!("{reg}/{ns}/direct@{pushed}"))
        .await
        .unwrap();
    // An error inside Podman's stream is an error.
    let missing = engine
        .pull(&format!("{reg}/{ns}/nothing:v1"), None, None, &mut |_| {})
        .await;
    assert!(
        matches!(&missing, Err(EngineError::Registry { message, .. }) if message.contains("manifest unknown")),
        "{missing:?}"
    );
    // Podman answers no registry look-up: stowage's client does it.
    assert!(matches!(
        engine
            .remote_digest(&format!("{reg}/{ns}/direct:v1"), None)
            .await,
        Err(EngineError::Unsupported(_))
    ));

    // A mirror of a local image, then a pre-pull of another image into
    // Podman through the content store's loopback endpoint.
    let source = engine_env::image(&[&format!("{ns}/src:v1")], now - 2 * DAY, 700);
    let upstream = engine_env::image(&[&format!("{reg}/{ns}/pre:v1")], now - 3 * DAY, 900);
    engine_env::load(&engine, &[source.clone(), upstream.clone()]).await;
    engine
        .push(&upstream.tags[0], None, &mut |_| {})
        .await
        .unwrap();
    engine.remove(&upstream.tags[0]).await.unwrap();
    assert!(engine.image(&upstream.id()).await.unwrap().is_none());

    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "min_age = \"0s\"\n\
         [[mirror]]\nname = \"m\"\nregistry = \"{reg}\"\nprefix = \"mirror\"\nimages = [\"{ns}/src\"]\n\
         [[prepull]]\nimage = \"{reg}/{ns}/pre:v1\"\n"
    ));
    let plan = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(plan.status.code(), Some(1), "{}", text(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout);
    assert!(
        shown.contains(&format!(
            "push     {reg}/mirror/{ns}/src:v1 <- localhost/{ns}/src:v1"
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("pull     {reg}/{ns}/pre:v1")),
        "{shown}"
    );
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The mirror holds the image; the temporary tag is gone.
    client
        .manifest_digest(&format!("mirror/{ns}/src"), "v1")
        .await
        .unwrap_or_else(|e| panic!("the mirror lacks it: {e}\n{}", text(&out)));
    assert_eq!(
        refs(&engine, &ns).await,
        vec![
            format!("{reg}/{ns}/pre:v1"),
            format!("localhost/{ns}/src:v1"),
        ]
    );
    // The pre-pull came from the content store, handed over on loopback:
    // the image is the registry's, under its reference, and no loopback
    // reference of the endpoint is left.
    let pre = engine
        .image(&format!("{reg}/{ns}/pre:v1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pre.id, upstream.id());
    let port = reg.rsplit(':').next().unwrap();
    assert!(
        pre.repo_digests
            .iter()
            .all(|d| !d.starts_with("127.0.0.1:") || d.starts_with(&format!("127.0.0.1:{port}/"))),
        "{pre:?}"
    );
    let audit = dir.audit();
    let pulled = audit
        .iter()
        .find(|r| r.action == stowage::audit::Action::Pull)
        .unwrap_or_else(|| panic!("no pull record: {audit:?}"));
    assert_eq!(pulled.outcome, stowage::audit::Outcome::Ok, "{pulled:?}");
    assert!(
        dir.path().join("state/cache/oci-layout").exists(),
        "the pull did not go through the content store"
    );
    // Applied: nothing more to push or pull (the mirror's digest came from
    // the registry; Podman keeps none of what it pushed).
    let again = stowage(&addr, &policy, &["plan", "--exit-code"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let out = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pushes = dir
        .audit()
        .iter()
        .filter(|r| r.action == stowage::audit::Action::Push)
        .count();
    assert_eq!(pushes, 1, "{:?}", dir.audit());

    // `stowage pull` of a reference Podman lacks: the same hand-off.
    let out = stowage(&addr, &policy, &["pull", &format!("{reg}/{ns}/direct:v1")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let got = engine
        .image(&format!("{reg}/{ns}/direct:v1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, direct.id());
    for r in refs(&engine, &ns).await {
        let _ = engine.remove(&r).await;
    }
}
