//! The registry client (`stowage::registry`) against the real distribution
//! registry: images pushed by the real engine, an index PUT by hand, basic
//! auth from htpasswd, blobs whole and from an offset. What the distribution
//! registry cannot do (issue tokens, loop redirects, serve a huge or wrong
//! manifest) is played by a tiny hyper server in `registry_servers`.

use std::time::Duration;

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use stowage::engine::{Credentials, DockerEngine, Engine};
use stowage::registry::{Options, Registry, RegistryError};
use stowage::store::{BlobSource, Descriptor, SourceError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::engine_env;
use crate::net::TestRegistry;

const DAY: i64 = 86_400;
const PLATFORM: &str = "linux/amd64";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Loads a two-layer fixture image as `reference`, pushes it (with
/// `credentials`), drops the local tag; returns the image id (= config digest).
async fn push(engine: &DockerEngine, reference: &str, credentials: Option<&Credentials>) -> String {
    let image = engine_env::image(&[reference], 1_600_000_000 + DAY, 3000)
        .with_base(engine_env::unique_seed(), 70_000);
    engine_env::load(engine, std::slice::from_ref(&image)).await;
    engine
        .push(reference, credentials, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
    engine.remove(reference).await.unwrap();
    image.id()
}

/// The whole body of a blob from `offset`, and where it started.
pub async fn read_blob<S: BlobSource>(
    source: &S,
    digest: &str,
    offset: u64,
) -> Result<(u64, Vec<u8>), SourceError> {
    let mut body = source.fetch(digest, offset).await?;
    let mut out = Vec::new();
    while let Some(chunk) = body.stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok((body.start, out))
}

/// `PUT /v2/<repo>/manifests/<tag>` with raw HTTP; the status code.
async fn put_manifest(registry: &str, repo: &str, tag: &str, media_type: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(registry).await.unwrap();
    let head = format!(
        "PUT /v2/{repo}/manifests/{tag} HTTP/1.0\r\nHost: {registry}\r\n\
         Content-Type: {media_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

fn client(addr: &str, credentials: Option<&Credentials>) -> Registry {
    Registry::new(addr, credentials, &Options::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_a_pushed_image_by_tag_and_by_digest() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::registry().unwrap();
    let repo = engine_env::unique_ns("resolve");
    let id = push(&engine, &format!("{addr}/{repo}:1"), None).await;
    let registry = client(&addr, None);

    let by_tag = registry.resolve(&repo, "1", PLATFORM).await.unwrap();
    assert_eq!(
        by_tag.top, by_tag.manifest,
        "not an index: top is the manifest"
    );
    let (desc, bytes) = &by_tag.top;
    assert_eq!(
        desc.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(desc.digest, sha256(bytes), "exact bytes as served");
    assert_eq!(desc.size, bytes.len() as u64);
    assert_eq!(by_tag.config.digest, id, "the config is the image id");
    assert_eq!(by_tag.layers.len(), 2, "{:?}", by_tag.layers);
    assert!(by_tag.layers[0].size > by_tag.layers[1].size, "base first");

    let by_digest = registry
        .resolve(&repo, &desc.digest, PLATFORM)
        .await
        .unwrap();
    assert_eq!(by_digest, by_tag);

    let missing = registry.resolve(&repo, "2", PLATFORM).await.unwrap_err();
    assert!(
        matches!(missing, RegistryError::NotFound { .. }) && !missing.retryable(),
        "{missing}"
    );
    // The repository, the reference and the registry's own words.
    let text = missing.to_string();
    assert!(
        text.starts_with(&format!(
            "manifest 2 of {repo} not found at http://{addr}/v2/{repo}/manifests/2: "
        )) && text.contains("MANIFEST_UNKNOWN"),
        "{text}"
    );
    let bad = registry.resolve(&repo, "1", "linux").await.unwrap_err();
    assert!(matches!(bad, RegistryError::Input(_)), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_a_blob_whole_and_from_an_offset() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::registry().unwrap();
    let repo = engine_env::unique_ns("blob");
    push(&engine, &format!("{addr}/{repo}:1"), None).await;
    let registry = client(&addr, None);
    let resolved = registry.resolve(&repo, "1", PLATFORM).await.unwrap();
    let blobs = registry.blobs(&repo);
    assert_eq!(blobs.name(), addr);

    for blob in resolved.layers.iter().chain([&resolved.config]) {
        let (start, whole) = read_blob(&blobs, &blob.digest, 0).await.unwrap();
        assert_eq!((start, whole.len() as u64), (0, blob.size));
        assert_eq!(sha256(&whole), blob.digest);
        let offset = blob.size / 3;
        let (start, tail) = read_blob(&blobs, &blob.digest, offset).await.unwrap();
        assert_eq!(start, offset, "206: the registry honoured the range");
        assert_eq!(tail, whole[offset as usize..]);
    }

    let absent = format!("sha256:{}", "0".repeat(64));
    let err = read_blob(&blobs, &absent, 0).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::NotFound { repository, message }
            if repository == &repo && message.contains("BLOB_UNKNOWN")),
        "{err:?}"
    );
    assert!(!err.retryable());
    let err = read_blob(&blobs, "sha256:nothex", 0).await.unwrap_err();
    assert!(matches!(err, SourceError::Refused(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_takes_the_right_password_and_names_no_wrong_one() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let secret = format!("s3cret-{:x}", engine_env::unique_seed());
    let wrong = format!("wr0ng-{:x}", engine_env::unique_seed());
    let hash = std::process::Command::new("htpasswd")
        .args(["-Bbn", "stowage", &secret])
        .output()
        .expect("htpasswd (apt-get install apache2-utils)");
    assert!(hash.status.success());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &hash.stdout).unwrap();
    let server = TestRegistry::start(&dir.path().join("registry"), Some(&htpasswd));
    let creds = |password: &str| Credentials {
        username: Some("stowage".into()),
        password: Some(password.into()),
        identity_token: None,
        server: server.addr.clone(),
    };
    let repo = engine_env::unique_ns("basic");
    let id = push(
        &engine,
        &format!("{}/{repo}:1", server.addr),
        Some(&creds(&secret)),
    )
    .await;

    let right = client(&server.addr, Some(&creds(&secret)));
    let resolved = right.resolve(&repo, "1", PLATFORM).await.unwrap();
    assert_eq!(resolved.config.digest, id);
    let (_, config) = read_blob(&right.blobs(&repo), &id, 0).await.unwrap();
    assert_eq!(sha256(&config), id);

    let refused = client(&server.addr, Some(&creds(&wrong)));
    let err = refused.resolve(&repo, "1", PLATFORM).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        matches!(
            err,
            RegistryError::Unauthorized {
                sent_credentials: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(text.contains("refused the credentials for"), "{text}");
    assert!(!text.contains(&wrong) && !text.contains(&secret), "{text}");
    let blob_err = read_blob(&refused.blobs(&repo), &id, 0).await.unwrap_err();
    assert!(
        matches!(blob_err, SourceError::Unauthorized),
        "{blob_err:?}"
    );

    let anonymous = client(&server.addr, None);
    let err = anonymous.resolve(&repo, "1", PLATFORM).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("no access without credentials, and none are configured for"),
        "{err}"
    );
    assert!(!err.retryable());
}

/// A manifest list or OCI index of two pushed images, PUT by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_of_two_platforms_gives_each_its_manifest() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::registry().unwrap();
    let repo = engine_env::unique_ns("index");
    let amd = push(&engine, &format!("{addr}/{repo}:amd"), None).await;
    let arm = push(&engine, &format!("{addr}/{repo}:arm"), None).await;
    let registry = client(&addr, None);
    let manifest_of = async |tag| {
        registry
            .resolve(&repo, tag, PLATFORM)
            .await
            .unwrap()
            .manifest
            .0
    };
    let (amd_manifest, arm_manifest) = (manifest_of("amd").await, manifest_of("arm").await);
    let entry = |d: &Descriptor, platform: &str| {
        format!(
            r#"{{"mediaType":"{}","digest":"{}","size":{},"platform":{platform}}}"#,
            d.media_type, d.digest, d.size
        )
    };
    for (tag, media_type) in [
        (
            "list",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ),
        ("oci", "application/vnd.oci.image.index.v1+json"),
    ] {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","manifests":[{},{}]}}"#,
            entry(&amd_manifest, r#"{"os":"linux","architecture":"amd64"}"#),
            entry(
                &arm_manifest,
                r#"{"os":"linux","architecture":"arm64","variant":"v8"}"#
            ),
        );
        assert_eq!(
            put_manifest(&addr, &repo, tag, media_type, &index).await,
            201
        );

        let on_amd = registry.resolve(&repo, tag, "linux/amd64").await.unwrap();
        assert_eq!(on_amd.top.0.media_type, media_type);
        assert_eq!(on_amd.top.0.digest, sha256(&on_amd.top.1));
        assert_eq!(on_amd.top.1, index.as_bytes(), "the index's exact bytes");
        assert_eq!(on_amd.manifest.0, amd_manifest);
        assert_eq!(on_amd.config.digest, amd);
        let on_arm = registry.resolve(&repo, tag, "linux/arm64").await.unwrap();
        assert_eq!(on_arm.top, on_amd.top);
        assert_eq!(on_arm.manifest.0, arm_manifest);
        assert_eq!(on_arm.config.digest, arm);
        let by_digest = registry
            .resolve(&repo, &on_arm.top.0.digest, "linux/arm64/v8")
            .await
            .unwrap();
        assert_eq!(by_digest, on_arm);

        let none = registry
            .resolve(&repo, tag, "linux/s390x")
            .await
            .unwrap_err();
        assert_eq!(
            none.to_string().split_once(": ").unwrap().1,
            "no manifest for platform linux/s390x (the index has: linux/amd64, linux/arm64/v8)",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_over_the_cap_is_refused() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::registry().unwrap();
    let repo = engine_env::unique_ns("cap");
    push(&engine, &format!("{addr}/{repo}:1"), None).await;
    let size = client(&addr, None)
        .resolve(&repo, "1", PLATFORM)
        .await
        .unwrap()
        .top
        .0
        .size;
    let options = Options {
        max_manifest: size - 1,
        ..Options::default()
    };
    let small = Registry::new(&addr, None, &options).unwrap();
    let err = small.resolve(&repo, "1", PLATFORM).await.unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
    assert!(
        err.to_string()
            .ends_with(&format!("larger than the limit of {} bytes", size - 1)),
        "{err}"
    );
    let exact = Options {
        max_manifest: size,
        ..Options::default()
    };
    let fits = Registry::new(&addr, None, &exact).unwrap();
    assert!(fits.resolve(&repo, "1", PLATFORM).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_down_is_a_retryable_error() {
    let addr = format!("127.0.0.1:{}", crate::net::free_port());
    let options = Options {
        timeout: Duration::from_secs(5),
        ..Options::default()
    };
    let registry = Registry::new(&addr, None, &options).unwrap();
    let err = registry.resolve("a/b", "1", PLATFORM).await.unwrap_err();
    assert!(matches!(err, RegistryError::Connect { .. }), "{err}");
    assert!(err.retryable());
    assert!(
        err.to_string()
            .starts_with(&format!("http://{addr}/v2/a/b/manifests/1")),
        "{err}"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    let blob = read_blob(&registry.blobs("a/b"), &digest, 7)
        .await
        .unwrap_err();
    assert!(
        matches!(blob, SourceError::Io(_)) && blob.retryable(),
        "{blob:?}"
    );

    let bad = Registry::new("not a host", None, &options).unwrap_err();
    assert!(matches!(bad, RegistryError::Input(_)), "{bad}");
    // A non-loopback registry is https; nothing is sent by building it.
    assert!(Registry::new("registry.example:443", None, &options).is_ok());
}
