//! `DockerEngine` against a real private dockerd and registry (started by
//! `scripts/test`). Every test works in its own repository namespace with
//! unique fixture seeds, so tests run in parallel on one engine.

use crate::engine_env;
use std::time::Duration;

use futures_util::StreamExt;
use stowage::engine::{DockerEngine, Engine, EngineError, EventKind, Image};

const CREATED: i64 = 1_600_000_000; // 2020-09-13T12:26:40Z

async fn find(engine: &DockerEngine, id: &str) -> Option<Image> {
    let images = engine.list_images().await.expect("list images");
    images.into_iter().find(|i| i.id == id)
}

fn no_progress() -> impl FnMut(&stowage::engine::Progress) + Send {
    |_| {}
}

#[tokio::test]
async fn list_reports_loaded_tags_created_and_size() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("list");
    let base = engine_env::unique_seed();
    let multi = engine_env::image(
        &[&format!("{ns}/app:v1"), &format!("{ns}/app:latest")],
        CREATED,
        3000,
    )
    .with_base(base, 5000);
    let single = engine_env::image(&[&format!("{ns}/other:1.0")], CREATED + 3600, 1234)
        .with_base(base, 5000);
    let dangling = engine_env::image(&[], CREATED - 86_400, 777);

    let loaded =
        engine_env::load(&engine, &[multi.clone(), single.clone(), dangling.clone()]).await;
    assert!(loaded.contains(&format!("{ns}/app:v1")), "{loaded:?}");
    assert!(loaded.contains(&format!("{ns}/other:1.0")), "{loaded:?}");
    assert!(
        loaded.contains(&dangling.id()),
        "dangling image reported by id: {loaded:?}"
    );

    let images = engine.list_images().await.unwrap();
    let got = images
        .iter()
        .find(|i| i.id == multi.id())
        .expect("multi-tag image listed");
    let mut tags = got.repo_tags.clone();
    tags.sort();
    assert_eq!(
        tags,
        vec![format!("{ns}/app:latest"), format!("{ns}/app:v1")]
    );
    assert_eq!(got.created, CREATED);
    assert_eq!(got.size, multi.total_size());
    assert!(
        got.repo_digests.is_empty(),
        "never pushed or pulled: {:?}",
        got.repo_digests
    );

    let got = images
        .iter()
        .find(|i| i.id == single.id())
        .expect("single-tag image listed");
    assert_eq!(got.repo_tags, vec![format!("{ns}/other:1.0")]);
    assert_eq!(got.created, CREATED + 3600);
    assert_eq!(got.size, 1234 + 5000);

    let got = images
        .iter()
        .find(|i| i.id == dangling.id())
        .expect("dangling image listed");
    assert!(got.repo_tags.is_empty(), "{:?}", got.repo_tags);
    assert!(got.repo_digests.is_empty(), "{:?}", got.repo_digests);
    assert_eq!(got.created, CREATED - 86_400);
}

#[tokio::test]
async fn load_of_dangling_fixture_gives_image_without_tags() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let dangling = engine_env::image(&[], CREATED, 100);
    let loaded = engine_env::load(&engine, std::slice::from_ref(&dangling)).await;
    assert_eq!(loaded, vec![dangling.id()]);
    let got = find(&engine, &dangling.id()).await.expect("listed");
    assert_eq!(got.repo_tags, Vec::<String>::new());
    engine.remove(&dangling.id()).await.unwrap();
}

#[tokio::test]
async fn tag_adds_a_reference() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("tag");
    let image = engine_env::image(&[&format!("{ns}/app:v1")], CREATED, 100);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;

    engine
        .tag(&format!("{ns}/app:v1"), &format!("{ns}/app:stable"))
        .await
        .unwrap();
    // Tagging by id works too, into another repository.
    engine
        .tag(&image.id(), &format!("{ns}/copy:v1"))
        .await
        .unwrap();

    let got = find(&engine, &image.id()).await.unwrap();
    for reference in ["app:v1", "app:stable", "copy:v1"] {
        assert!(
            got.repo_tags.contains(&format!("{ns}/{reference}")),
            "{:?}",
            got.repo_tags
        );
    }
    let err = engine
        .tag(&format!("{ns}/missing:v1"), &format!("{ns}/x:y"))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn removing_one_reference_of_a_multi_tag_image_only_untags() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("untag");
    let image = engine_env::image(
        &[&format!("{ns}/app:v1"), &format!("{ns}/app:v2")],
        CREATED,
        100,
    );
    engine_env::load(&engine, std::slice::from_ref(&image)).await;

    let removed = engine.remove(&format!("{ns}/app:v1")).await.unwrap();
    assert_eq!(removed.untagged, vec![format!("{ns}/app:v1")]);
    assert!(removed.deleted.is_empty(), "{removed:?}");
    let got = find(&engine, &image.id()).await.expect("image stays");
    assert_eq!(got.repo_tags, vec![format!("{ns}/app:v2")]);
}

#[tokio::test]
async fn removing_the_last_reference_deletes_the_image() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("delete");
    let image = engine_env::image(&[&format!("{ns}/app:v1")], CREATED, 100);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;

    let removed = engine.remove(&format!("{ns}/app:v1")).await.unwrap();
    assert_eq!(removed.untagged, vec![format!("{ns}/app:v1")]);
    assert!(removed.deleted.contains(&image.id()), "{removed:?}");
    assert!(find(&engine, &image.id()).await.is_none());

    let err = engine.remove(&format!("{ns}/app:v1")).await.unwrap_err();
    assert!(matches!(err, EngineError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn removing_an_image_used_by_a_stopped_container_is_refused() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("in-use");
    let reference = format!("{ns}/app:v1");
    let image = engine_env::image(&[&reference], CREATED, 100);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;
    let container = engine_env::create_container(&addr, &reference);

    let containers = engine.list_containers().await.unwrap();
    let listed = containers
        .iter()
        .find(|c| c.id == container)
        .expect("container listed");
    assert_eq!(listed.image_id, image.id());
    assert_eq!(listed.image, reference);
    assert_eq!(listed.state, "created");
    assert!(!listed.name.is_empty() && !listed.name.starts_with('/'));

    // By id: the engine refuses (409) because a container uses the image.
    let err = engine.remove(&image.id()).await.unwrap_err();
    assert!(matches!(err, EngineError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("container"), "{err}");
    assert!(
        find(&engine, &image.id()).await.is_some(),
        "image still there"
    );

    engine_env::remove_container(&addr, &container);
    engine.remove(&reference).await.unwrap();
}

#[tokio::test]
async fn push_remove_pull_roundtrip_and_remote_digest() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let ns = engine_env::unique_ns("push");
    let reference = format!("{registry}/{ns}/app:v1");
    let image = engine_env::image(&[&reference], CREATED, 4096);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;

    let mut statuses = Vec::new();
    engine
        .push(&reference, None, &mut |p| statuses.push(p.status.clone()))
        .await
        .unwrap();
    // The engine reports `v1: digest: sha256:... size: N` at the end of a push.
    let pushed = statuses
        .iter()
        .find_map(|s| s.split("digest: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest in push progress: {statuses:?}"))
        .to_owned();
    assert!(pushed.starts_with("sha256:"), "{pushed}");

    let got = find(&engine, &image.id()).await.unwrap();
    assert_eq!(
        got.repo_digests,
        vec![format!("{registry}/{ns}/app@{pushed}")]
    );
    assert_eq!(
        engine.remote_digest(&reference, None).await.unwrap(),
        pushed
    );

    engine.remove(&reference).await.unwrap();
    assert!(
        find(&engine, &image.id()).await.is_none(),
        "removed locally"
    );

    let mut messages = 0;
    engine
        .pull(&reference, None, None, &mut |_| messages += 1)
        .await
        .unwrap();
    assert!(messages > 0, "pull reported progress");
    let got = find(&engine, &image.id()).await.expect("pulled back");
    assert_eq!(got.repo_tags, vec![reference.clone()]);
    assert_eq!(got.created, CREATED);

    // Pull by digest also works and yields the same image.
    engine
        .pull(
            &format!("{registry}/{ns}/app@{pushed}"),
            Some("linux/amd64"),
            None,
            &mut no_progress(),
        )
        .await
        .unwrap();
    engine.remove(&reference).await.unwrap();
}

#[tokio::test]
async fn pull_of_a_missing_tag_is_a_registry_error() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let ns = engine_env::unique_ns("missing");
    let reference = format!("{registry}/{ns}/nothing:v0");
    let err = engine
        .pull(&reference, None, None, &mut no_progress())
        .await
        .unwrap_err();
    match &err {
        EngineError::Registry {
            reference: r,
            message,
        } => {
            assert_eq!(r, &reference);
            assert!(!message.is_empty());
        }
        other => panic!("expected a registry error, got {other:?}"),
    }
    let err = engine.remote_digest(&reference, None).await.unwrap_err();
    assert!(matches!(err, EngineError::Registry { .. }), "{err:?}");
}

#[tokio::test]
async fn unreachable_engine_gives_one_line_message() {
    let err = DockerEngine::connect(Some("unix:///nonexistent.sock"))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("cannot reach the Docker engine at unix:///nonexistent.sock: "),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");

    // A closed TCP port: connection refused, also one line.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("tcp://127.0.0.1:{port}");
    let err = DockerEngine::connect(Some(&address)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot reach the Docker engine at {address}: ")),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
}

#[tokio::test]
async fn tag_produces_an_image_event() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("events");
    let image = engine_env::image(&[&format!("{ns}/app:v1")], CREATED, 100);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;

    let mut events = engine.events();
    let watch = async {
        while let Some(event) = events.next().await {
            let event = event.expect("event stream");
            if event.kind == EventKind::Image && event.action == "tag" && event.id == image.id() {
                return event;
            }
        }
        panic!("event stream ended");
    };
    let act = async {
        // Give the stream time to subscribe before acting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        engine
            .tag(&image.id(), &format!("{ns}/app:v2"))
            .await
            .unwrap();
    };
    let (event, ()) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(watch, act) })
            .await
            .expect("a tag event within 20 s");
    assert!(event.time > 0);
    assert_eq!(event.image, None);
}

#[tokio::test]
async fn info_reports_the_private_data_root() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let socket = addr.trim_start_matches("unix://");
    let dir = std::path::Path::new(socket).parent().unwrap();
    let info = engine.info().await.unwrap();
    assert_eq!(std::path::Path::new(&info.data_root), dir.join("data"));
    assert!(!info.server_version.is_empty());
    assert!(info.api_version.starts_with("1."), "{}", info.api_version);
    assert_eq!(engine.address(), addr);
}

#[tokio::test]
async fn save_returns_a_loadable_archive() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("save");
    let reference = format!("{ns}/app:v1");
    let image = engine_env::image(&[&reference], CREATED, 100);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;

    let archive = engine.save(std::slice::from_ref(&reference)).await.unwrap();
    engine.remove(&reference).await.unwrap();
    let loaded = engine.load(archive).await.unwrap();
    assert_eq!(loaded, vec![reference.clone()]);
    assert_eq!(
        find(&engine, &image.id()).await.unwrap().repo_tags,
        vec![reference.clone()]
    );
    engine.remove(&reference).await.unwrap();
}

#[tokio::test]
async fn disk_usage_and_build_cache_prune_answer() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let image = engine_env::image(&[], CREATED, 10_000);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;
    let usage = engine.disk_usage().await.unwrap();
    assert!(usage.images >= 1, "{usage:?}");
    assert!(usage.layers_size >= 10_000, "{usage:?}");
    // Nothing is built here, so nothing to reclaim; the call must still work.
    engine.prune_build_cache(0).await.unwrap();
    engine.remove(&image.id()).await.unwrap();
}

#[tokio::test]
async fn push_of_a_missing_local_image_is_not_found() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let ns = engine_env::unique_ns("push-missing");
    let err = engine
        .push(&format!("{registry}/{ns}/app:v1"), None, &mut no_progress())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn narrow_lookups_used_right_before_each_removal() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("narrow");
    let used = engine_env::image(&[&format!("{ns}/app:used")], 1_700_000_000, 64);
    let free = engine_env::image(&[&format!("{ns}/app:free")], 1_700_000_000, 64);
    engine_env::load(&engine, &[used.clone(), free.clone()]).await;
    let cid = engine_env::create_container(&addr, &format!("{ns}/app:used"));

    let users = engine.containers_using(&used.id()).await.unwrap();
    assert_eq!(users.len(), 1);
    assert!(cid.starts_with(&users[0].id[..12]) || users[0].id.starts_with(&cid));
    assert!(
        engine
            .containers_using(&free.id())
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        engine.image_id_of(&format!("{ns}/app:free")).await.unwrap(),
        Some(free.id())
    );
    assert_eq!(
        engine
            .image_id_of(&format!("{ns}/app:missing"))
            .await
            .unwrap(),
        None
    );
    engine_env::remove_container(&addr, &cid);
}
