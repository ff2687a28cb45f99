//! The content store against the real registry and engine: an image the
//! private registry holds (pushed there by the private engine) is downloaded
//! blob by blob into a store, served on loopback, and pulled by the REAL
//! engine from there; a full disk (a small tmpfs) keeps the partial.
//!
//! The registry side is a minimal test-only [`BlobSource`] over plain HTTP
//! (the product's registry client lives in `src/registry/`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use stowage::engine::{DockerEngine, Engine};
use stowage::store::{
    BlobBody, BlobSource, Descriptor, FetchOptions, Fetched, Progress, SourceError, Store,
    StoreError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::engine_env;

const CREATED: i64 = 1_700_000_000;
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";

/// An answer's status, headers (lowercase names) and the socket left to read.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    rest: Vec<u8>,
    socket: tokio::net::TcpStream,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`) and the answer's head.
async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> std::io::Result<Answer> {
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("no whole answer head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        rest: buf[end + 4..].to_vec(),
        socket,
    })
}

async fn read_body(mut a: Answer) -> Vec<u8> {
    let mut body = a.rest;
    a.socket.read_to_end(&mut body).await.unwrap();
    body
}

/// Blobs of one repository at the private registry, over plain HTTP.
struct RegistryBlobs {
    addr: String,
    repository: String,
}

impl BlobSource for RegistryBlobs {
    fn fetch(
        &self,
        digest: &str,
        offset: u64,
    ) -> impl Future<Output = Result<BlobBody, SourceError>> + Send {
        let path = format!("/v2/{}/blobs/{digest}", self.repository);
        let addr = self.addr.clone();
        async move {
            let range = (offset > 0).then(|| ("Range", format!("bytes={offset}-")));
            let a = request(&addr, "GET", &path, range.as_slice())
                .await
                .map_err(|e| SourceError::Io(e.to_string()))?;
            let start = match a.status {
                200 => 0,
                206 => a
                    .header("content-range")
                    .and_then(|r| r.strip_prefix("bytes "))
                    .and_then(|r| r.split('-').next())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| SourceError::Refused("206 without a Content-Range".into()))?,
                404 => {
                    return Err(SourceError::NotFound {
                        repository: self.repository.clone(),
                        message: String::new(),
                    });
                }
                code => {
                    return Err(SourceError::Status {
                        code,
                        retryable: code >= 500 || code == 429,
                    });
                }
            };
            let first = Bytes::from(a.rest);
            let socket = a.socket;
            let rest = futures_util::stream::unfold(socket, |mut s| async move {
                let mut buf = vec![0u8; 64 * 1024];
                match s.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), s))
                    }
                    Err(e) => Some((Err(SourceError::Io(e.to_string())), s)),
                }
            });
            let stream = futures_util::stream::iter((!first.is_empty()).then_some(Ok(first)))
                .chain(rest)
                .boxed();
            Ok(BlobBody { start, stream })
        }
    }

    fn name(&self) -> &str {
        &self.addr
    }
}

/// The manifest of `repository:tag` at `addr`: its descriptor, config and layers.
async fn manifest(addr: &str, repository: &str, tag: &str) -> (Descriptor, Bytes, Vec<Descriptor>) {
    let a = request(
        addr,
        "GET",
        &format!("/v2/{repository}/manifests/{tag}"),
        &[("Accept", MANIFEST_TYPES.to_owned())],
    )
    .await
    .expect("the registry answers");
    assert_eq!(a.status, 200);
    let bytes = Bytes::from(read_body(a).await);
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON manifest");
    let desc = Descriptor {
        media_type: v["mediaType"].as_str().expect("mediaType").to_owned(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
        size: bytes.len() as u64,
    };
    let mut blobs: Vec<Descriptor> = vec![serde_json::from_value(v["config"].clone()).unwrap()];
    blobs.extend(serde_json::from_value::<Vec<Descriptor>>(v["layers"].clone()).unwrap());
    (desc, bytes, blobs)
}

/// A fixture image pushed to the private registry as `<ns>/app:v1`, then
/// removed from the engine: `(repository, its id)`.
async fn pushed_image(
    engine: &DockerEngine,
    registry: &str,
    test: &str,
    size: usize,
) -> (String, String) {
    let repository = format!("{}/app", engine_env::unique_ns(test));
    let reference = format!("{registry}/{repository}:v1");
    let image = engine_env::image(&[&reference], CREATED, size);
    engine_env::load(engine, std::slice::from_ref(&image)).await;
    engine
        .push(&reference, None, &mut |_| {})
        .await
        .expect("push");
    engine.remove(&reference).await.expect("remove after push");
    assert!(engine.image(&image.id()).await.unwrap().is_none());
    (repository, image.id())
}

fn options<'a>(
    cancel: &'a CancellationToken,
    progress: &'a (dyn Fn(Progress) + Sync),
) -> FetchOptions<'a> {
    FetchOptions {
        stall: Duration::from_secs(30),
        give_up: Duration::from_secs(60),
        cancel,
        progress,
    }
}

#[tokio::test]
async fn the_engine_pulls_a_complete_image_from_the_loopback_endpoint() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let (repository, id) = pushed_image(&engine, &registry, "store-serve", 3 << 20).await;
    let (top, bytes, blobs) = manifest(&registry, &repository, "v1").await;
    assert_eq!(blobs[0].digest, id, "the config's digest is the image id");

    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let store = Store::open(&dir.path().join("cache")).unwrap();
    store.put(&top, &bytes).unwrap();
    let src = RegistryBlobs {
        addr: registry.clone(),
        repository: repository.clone(),
    };
    let cancel = CancellationToken::new();
    let mut wire = 0;
    for blob in &blobs {
        let got = store
            .fetch(&src, blob, &options(&cancel, &|_| {}))
            .await
            .unwrap_or_else(|e| panic!("fetching {}: {e}", blob.digest));
        assert_eq!(got.resumed, 0);
        wire += got.bytes;
    }
    let sizes: u64 = blobs.iter().map(|b| b.size).sum();
    assert_eq!(wire, sizes, "each byte once over the wire");
    let name = format!("{registry}/{repository}:v1");
    store.add_image(&name, &top, &top).unwrap();

    let serving = stowage::store::serve(store.clone(), &cancel).await.unwrap();
    let port = serving.addr.port();
    let loopback = format!("127.0.0.1:{port}/{repository}@{}", top.digest);
    let mut messages = Vec::new();
    engine
        .pull(&loopback, None, None, &mut |p| {
            messages.push(p.status.clone())
        })
        .await
        .unwrap_or_else(|e| panic!("the engine pulling {loopback}: {e}; {messages:?}"));
    let image = engine
        .image(&id)
        .await
        .unwrap()
        .expect("the pulled image has the config's digest as its id");
    assert!(
        image.repo_digests.contains(&loopback),
        "{:?}",
        image.repo_digests
    );
    // The engine saw every layer whole: nothing was "Already exists".
    assert!(
        !messages.iter().any(|m| m.contains("Already exists")),
        "{messages:?}"
    );

    // Tags, writes and uploads are not served.
    let addr = serving.addr.to_string();
    let tag = request(&addr, "GET", &format!("/v2/{repository}/manifests/v1"), &[])
        .await
        .unwrap();
    assert_eq!(tag.status, 404);
    assert!(String::from_utf8_lossy(&read_body(tag).await).contains("MANIFEST_UNKNOWN"));
    for (method, path) in [
        ("PUT", format!("/v2/{repository}/manifests/v2")),
        ("POST", format!("/v2/{repository}/blobs/uploads/")),
        (
            "DELETE",
            format!("/v2/{repository}/manifests/{}", top.digest),
        ),
    ] {
        let a = request(&addr, method, &path, &[]).await.unwrap();
        assert_eq!(a.status, 405, "{method} {path}");
    }
    // The engine's own push to it is refused.
    let push_ref = format!("127.0.0.1:{port}/{repository}:pushed");
    engine.tag(&id, &push_ref).await.unwrap();
    let pushed = engine.push(&push_ref, None, &mut |_| {}).await;
    assert!(pushed.is_err(), "a push to the read-only endpoint failed");
    // Its only tag: the image goes with it.
    engine.remove(&push_ref).await.unwrap();
    assert!(engine.image(&id).await.unwrap().is_none());
    serving.stop().await;

    // With nothing wanted and no cache, gc empties the store and its index.
    let freed = store.gc(0, &HashSet::new()).unwrap();
    assert_eq!(freed, sizes + top.size);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cache/index.json")).unwrap())
            .unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));
}

/// A tmpfs of `size` mounted on `dir` for the test's life.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// `None` (after a SKIP line) outside CI when it cannot be mounted.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        if out.status.success() {
            return Some(Tmpfs(dir.to_path_buf()));
        }
        let why = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !engine_env::in_ci(),
            "cannot mount a tmpfs (root needed): {why}"
        );
        eprintln!("SKIP: cannot mount a tmpfs: {why}");
        None
    }

    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("running mount")
            .success();
        assert!(ok, "remount of {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_keeps_the_partial_says_so_and_resumes_once_there_is_room() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let (repository, _) = pushed_image(&engine, &registry, "store-enospc", 12 << 20).await;
    let (_, _, blobs) = manifest(&registry, &repository, "v1").await;
    let layer = blobs.iter().max_by_key(|b| b.size).unwrap().clone();
    assert!(layer.size > 10 << 20, "{layer:?}");

    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("small"), "8m") else {
        return;
    };
    let store = Store::open(&disk.0.join("cache")).unwrap();
    let src = RegistryBlobs {
        addr: registry.clone(),
        repository,
    };
    let cancel = CancellationToken::new();
    let err = store
        .fetch(&src, &layer, &options(&cancel, &|_| {}))
        .await
        .unwrap_err();
    let StoreError::NoSpace {
        kept, ref digest, ..
    } = err
    else {
        panic!("expected a full disk, got {err:?}");
    };
    assert_eq!(digest, &layer.digest);
    assert!(kept > 0 && kept < layer.size, "{kept}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("no space left writing blob {}", layer.digest))
            && message.contains(&format!("{kept} bytes kept")),
        "{message}"
    );
    assert!(!store.has(&layer.digest));
    assert_eq!(store.partial_len(&layer.digest), Some(kept));

    disk.resize("32m");
    let got: Fetched = store
        .fetch(&src, &layer, &options(&cancel, &|_| {}))
        .await
        .unwrap();
    assert_eq!(got.resumed, kept, "the kept bytes are not fetched again");
    assert_eq!(got.bytes, layer.size - kept);
    assert!(store.has(&layer.digest));
    store.verify(&layer.digest).unwrap();
    drop(store);
}

#[tokio::test]
async fn a_blob_corrupted_on_disk_never_reaches_the_engine() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let (repository, id) = pushed_image(&engine, &registry, "store-corrupt", 1 << 20).await;
    let (top, bytes, blobs) = manifest(&registry, &repository, "v1").await;
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let store = Store::open(&dir.path().join("cache")).unwrap();
    store.put(&top, &bytes).unwrap();
    let src = RegistryBlobs {
        addr: registry.clone(),
        repository: repository.clone(),
    };
    let cancel = CancellationToken::new();
    for blob in &blobs {
        store
            .fetch(&src, blob, &options(&cancel, &|_| {}))
            .await
            .unwrap();
    }
    // One flipped byte in the layer, after it was stored and verified.
    let layer = &blobs[1];
    let path = dir
        .path()
        .join("cache/blobs/sha256")
        .join(&layer.digest[7..]);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[1000] ^= 0x01;
    std::fs::write(&path, on_disk).unwrap();

    let serving = stowage::store::serve(store.clone(), &cancel).await.unwrap();
    let loopback = format!(
        "127.0.0.1:{}/{repository}@{}",
        serving.addr.port(),
        top.digest
    );
    let pulled = engine.pull(&loopback, None, None, &mut |_| {}).await;
    assert!(pulled.is_err(), "the engine got no image from wrong bytes");
    assert!(engine.image(&id).await.unwrap().is_none());
    assert!(!store.has(&layer.digest), "the corrupt blob was removed");
    serving.stop().await;
}
