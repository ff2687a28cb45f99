//! The registry client against tiny hyper servers on 127.0.0.1 playing what
//! the real distribution registry cannot: a token server, redirects (to
//! another host, in a loop, without end), a huge manifest, a wrong digest,
//! schema 1, a `Range` ignored or answered wrongly, a body cut short.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use stowage::engine::Credentials;
use stowage::registry::{Options, Registry, RegistryError};
use stowage::store::SourceError;
use tokio::task::JoinHandle;

use crate::registry_real::{read_blob, sha256};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query.
    target: String,
    authorization: Option<String>,
    range: Option<String>,
    body: String,
}

/// A hyper HTTP/1 server on 127.0.0.1 answering with `handler(own addr, request)`.
struct FakeServer {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl FakeServer {
    async fn start(
        handler: impl Fn(&str, &Seen) -> Response<Body> + Send + Sync + 'static,
    ) -> FakeServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let (s, a) = (seen.clone(), addr.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (handler, seen, addr) = (handler.clone(), s.clone(), a.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (handler, seen, addr) = (handler.clone(), seen.clone(), addr.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes());
                        let header = |n: &str| {
                            parts
                                .headers
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let request = Seen {
                            method: parts.method.to_string(),
                            target: parts.uri.to_string(),
                            authorization: header("authorization"),
                            range: header("range"),
                            body: String::from_utf8_lossy(&body.unwrap_or_default()).into(),
                        };
                        seen.lock().unwrap().push(request.clone());
                        Ok::<_, Infallible>(handler(&addr, &request))
                    }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(conn);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        FakeServer { addr, seen, task }
    }

    /// Requests so far whose target starts with `prefix`.
    fn seen(&self, prefix: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.target.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    )
    .unwrap()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An OCI image manifest of `config` and one `layer`.
fn image_manifest(config: &[u8], layer: &[u8]) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        sha256(config),
        config.len(),
        sha256(layer),
        layer.len()
    )
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

fn creds(password: &str) -> Credentials {
    Credentials {
        username: Some("alice".into()),
        password: Some(password.into()),
        identity_token: None,
        server: "fake".into(),
    }
}

fn client(addr: &str, credentials: Option<&Credentials>) -> Registry {
    Registry::new(addr, credentials, &Options::default()).unwrap()
}

/// A registry behind a token server, as Docker Hub and most clouds are: the
/// token comes with the credentials (GET with Basic, or POST of an identity
/// token), is cached per scope, and a refused password is not shown even
/// when the token server echoes it.
#[tokio::test]
async fn bearer_tokens_are_fetched_with_the_credentials_and_cached_per_scope() {
    const CONFIG: &[u8] = br#"{"architecture":"amd64","os":"linux"}"#;
    const LAYER: &[u8] = b"layer bytes";
    let server = FakeServer::start(|addr, req| {
        let target = req.target.as_str();
        if target.starts_with("/token") {
            let scope = target
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("scope="))
                .or_else(|| req.body.split('&').find_map(|p| p.strip_prefix("scope=")))
                .unwrap_or("none")
                .replace("%3A", ":")
                .replace("%2F", "/");
            let by_password = req.authorization.as_deref() == Some(&basic("alice", "pw"));
            let by_refresh = req.method == "POST"
                && req.body.contains("grant_type=refresh_token")
                && req.body.contains("refresh_token=refresh-1");
            if !by_password && !by_refresh {
                let echoed = req.authorization.clone().unwrap_or_default();
                let decoded = echoed
                    .strip_prefix("Basic ")
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let body = format!(
                    r#"{{"errors":[{{"code":"UNAUTHORIZED","message":"bad login {decoded}"}}]}}"#
                );
                return reply(401, &[], body);
            }
            let field = if by_refresh { "access_token" } else { "token" };
            return reply(
                200,
                &[],
                format!(r#"{{"{field}":"tok-{scope}","expires_in":300}}"#),
            );
        }
        let repo = target
            .strip_prefix("/v2/")
            .and_then(|t| t.split_once("/manifests/").or(t.split_once("/blobs/")))
            .map_or("", |(r, _)| r);
        let scope = format!("repository:{repo}:pull");
        if req.authorization.as_deref() != Some(&format!("Bearer tok-{scope}")) {
            let challenge =
                format!(r#"Bearer realm="http://{addr}/token",service="fake",scope="{scope}""#);
            return reply(401, &[("WWW-Authenticate", &challenge)], "");
        }
        if target.ends_with("/manifests/1") {
            let manifest = image_manifest(CONFIG, LAYER);
            let digest = sha256(manifest.as_bytes());
            return reply(
                200,
                &[
                    ("Content-Type", OCI_MANIFEST),
                    ("Docker-Content-Digest", &digest),
                ],
                manifest,
            );
        }
        if target.ends_with(&sha256(LAYER)) {
            return reply(200, &[], LAYER);
        }
        reply(404, &[], "")
    })
    .await;

    let registry = client(&server.addr, Some(&creds("pw")));
    let resolved = registry
        .resolve("team/app", "1", "linux/amd64")
        .await
        .unwrap();
    assert_eq!(resolved.config.digest, sha256(CONFIG));
    let (_, layer) = read_blob(&registry.blobs("team/app"), &sha256(LAYER), 0)
        .await
        .unwrap();
    assert_eq!(layer, LAYER);
    let tokens = server.seen("/token");
    assert_eq!(tokens.len(), 1, "one token for the scope: {tokens:#?}");
    assert!(
        tokens[0].target.contains("service=fake")
            && tokens[0]
                .target
                .contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{tokens:?}"
    );
    registry.resolve("other", "1", "linux/amd64").await.unwrap();
    assert_eq!(
        server.seen("/token").len(),
        2,
        "another scope, another token"
    );
    let manifests = server.seen("/v2/team/app/manifests/");
    assert_eq!(manifests.len(), 2, "one 401, then with the token");

    let identity = Credentials {
        username: None,
        password: None,
        identity_token: Some("refresh-1".into()),
        server: "fake".into(),
    };
    let by_refresh = client(&server.addr, Some(&identity));
    by_refresh
        .resolve("team/app", "1", "linux/amd64")
        .await
        .unwrap();
    let posted = server.seen("/token");
    assert_eq!(posted.last().unwrap().method, "POST", "{posted:#?}");

    let wrong = client(&server.addr, Some(&creds("hunter2")));
    let err = wrong
        .resolve("team/app", "1", "linux/amd64")
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("bad login alice:***"), "{text}");
    let blob_err = read_blob(&wrong.blobs("team/app"), &sha256(LAYER), 0)
        .await
        .unwrap_err();
    assert!(
        matches!(blob_err, SourceError::Unauthorized),
        "{blob_err:?}"
    );
}

/// Blob storage behind a redirect gets no registry credentials; a loop or
/// an endless chain of redirects stops with a clear error, and a presigned
/// URL's signature never shows.
#[tokio::test]
async fn redirects_drop_credentials_on_another_host_and_loops_stop() {
    let storage = FakeServer::start(|_, req| match req.target.as_str() {
        t if t.starts_with("/bucket/blob") => reply(200, &[], "from storage"),
        _ => reply(404, &[], ""),
    })
    .await;
    let storage_addr = storage.addr.clone();
    let registry_server = FakeServer::start(move |_, req| {
        if req.authorization.as_deref() != Some(&basic("alice", "pw")) {
            return reply(401, &[("WWW-Authenticate", r#"Basic realm="fake""#)], "");
        }
        let target = req.target.as_str();
        let location = if target.ends_with(&"1".repeat(64)) {
            format!("http://{storage_addr}/bucket/blob?sig=very-secret-sig")
        } else if target.ends_with(&"2".repeat(64)) || target == "/loop/b" {
            "/loop/a".to_owned()
        } else if target == "/loop/a" {
            "/loop/b".to_owned()
        } else if let Some(n) = target.strip_prefix("/hop/") {
            format!("/hop/{}", n.parse::<u32>().unwrap() + 1)
        } else if target.ends_with(&"3".repeat(64)) {
            "/hop/0".to_owned()
        } else if target.ends_with("/manifests/loop") || target.starts_with("/sig/a") {
            "/sig/a?sig=another-secret".to_owned()
        } else {
            return reply(404, &[], "");
        };
        reply(307, &[("Location", &location)], "")
    })
    .await;
    let registry = client(&registry_server.addr, Some(&creds("pw")));
    let blobs = registry.blobs("app");
    let digest = |c: &str| format!("sha256:{}", c.repeat(64));

    let (start, body) = read_blob(&blobs, &digest("1"), 0).await.unwrap();
    assert_eq!((start, body.as_slice()), (0, &b"from storage"[..]));
    let at_storage = storage.seen("/bucket/blob");
    assert_eq!(at_storage.len(), 1);
    assert_eq!(
        at_storage[0].authorization, None,
        "no credentials to another host"
    );
    let at_registry = registry_server.seen("/v2/app/blobs/");
    assert_eq!(at_registry.len(), 2, "a 401, then Basic");

    let err = read_blob(&blobs, &digest("2"), 0).await.unwrap_err();
    assert!(matches!(err, SourceError::RedirectLoop), "{err:?}");
    let err = registry
        .resolve("app", "loop", "linux/amd64")
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::RedirectLoop { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("redirect loop (back to http://"), "{text}");
    assert!(!text.contains("secret"), "{text}");

    let err = read_blob(&blobs, &digest("3"), 0).await.unwrap_err();
    assert!(matches!(err, SourceError::RedirectLoop), "{err:?}");
    assert_eq!(
        registry_server.seen("/hop/").len(),
        5,
        "the first request and 5 redirects, the last one not followed"
    );
}

/// A manifest larger than the cap costs at most the cap in memory: a
/// declared length over it is refused unread, an undeclared one is read up
/// to the cap and the connection dropped.
#[tokio::test]
async fn a_huge_manifest_is_refused_reading_bounded() {
    const CAP: usize = 4 * 1024 * 1024;
    let produced = Arc::new(AtomicU64::new(0));
    let counter = produced.clone();
    let server = FakeServer::start(move |_, req| {
        let target = req.target.as_str();
        if target.ends_with("/manifests/endless") {
            // 256 MiB in 64 KiB chunks, no Content-Length.
            let counter = counter.clone();
            let chunks = stream::iter(0..4096).map(move |_| {
                counter.fetch_add(64 * 1024, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b' '; 64 * 1024])))
            });
            let body = StreamBody::new(chunks).boxed_unsync();
            return Response::builder().status(200).body(body).unwrap();
        }
        if target.ends_with("/manifests/declared") {
            let length = (CAP + 1).to_string();
            let mut r = reply(200, &[("Content-Type", OCI_MANIFEST)], " ".repeat(CAP + 1));
            r.headers_mut()
                .insert("content-length", length.parse().unwrap());
            return r;
        }
        if target.ends_with("/manifests/padded") {
            // A valid manifest of exactly the cap: it passes.
            let head = image_manifest(b"c", b"l");
            let pad = CAP - head.len() - r#","annotations":{"p":""}"#.len();
            let padded = format!(
                r#"{},"annotations":{{"p":"{}"}}}}"#,
                head.trim_end_matches('}'),
                "x".repeat(pad)
            );
            assert_eq!(padded.len(), CAP);
            return reply(200, &[("Content-Type", OCI_MANIFEST)], padded);
        }
        reply(404, &[], "")
    })
    .await;
    let registry = client(&server.addr, None);

    let err = registry
        .resolve("big", "declared", "linux/amd64")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::TooLarge { limit, .. } if limit == CAP as u64),
        "{err}"
    );

    let err = registry
        .resolve("big", "endless", "linux/amd64")
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
    // The server stops producing once the client hangs up; socket buffers
    // on loopback hold a few MB at most.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = produced.load(Ordering::SeqCst);
    assert!(sent < 64 * 1024 * 1024, "the server produced {sent} bytes");

    let fits = registry
        .resolve("big", "padded", "linux/amd64")
        .await
        .unwrap();
    assert_eq!(fits.top.0.size, CAP as u64);
}

/// Bytes that do not hash to what the registry or the reference say,
/// schema 1, a `Range` ignored (200: start 0) or answered from elsewhere,
/// error statuses, and a body cut short: each told apart.
#[tokio::test]
async fn wrong_digests_schema1_ranges_and_cuts_are_told_apart() {
    const BLOB: &[u8] = b"0123456789abcdefghij";
    let good = image_manifest(b"c", BLOB);
    let good_digest = sha256(good.as_bytes());
    let other_digest = sha256(b"something else");
    let (g, o) = (good.clone(), other_digest.clone());
    let server = FakeServer::start(move |_, req| {
        let t = req.target.as_str();
        let manifest = [("Content-Type", OCI_MANIFEST)];
        match t.rsplit('/').next().unwrap_or_default() {
            "lying" => reply(
                200,
                &[
                    ("Content-Type", OCI_MANIFEST),
                    ("Docker-Content-Digest", &o),
                ],
                g.clone(),
            ),
            d if d == o => reply(200, &manifest, g.clone()),
            "old" => reply(
                200,
                &[(
                    "Content-Type",
                    "application/vnd.docker.distribution.manifest.v1+prettyjws",
                )],
                r#"{"schemaVersion":1,"name":"a","tag":"old","fsLayers":[]}"#,
            ),
            _ if t.contains("/ignores/") => reply(200, &[], BLOB),
            _ if t.contains("/elsewhere/") => {
                reply(206, &[("Content-Range", "bytes 0-19/20")], BLOB)
            }
            _ if t.contains("/busy/") => reply(503, &[], "<html>".repeat(10_000)),
            _ if t.contains("/slow-down/") => reply(429, &[], ""),
            _ if t.contains("/cut/") => {
                // The head and 5 bytes go out, then the connection drops.
                let parts = stream::iter([Ok(Frame::data(Bytes::from_static(b"first")))]).chain(
                    stream::once(async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Err(std::io::Error::other("cut"))
                    }),
                );
                let mut r = Response::builder()
                    .status(200)
                    .body(StreamBody::new(parts).boxed_unsync())
                    .unwrap();
                r.headers_mut()
                    .insert("content-length", "1000".parse().unwrap());
                r
            }
            _ if t.contains("/honours/") => {
                let from: usize = req
                    .range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                let range = format!("bytes {from}-{}/{}", BLOB.len() - 1, BLOB.len());
                reply(206, &[("Content-Range", &range)], &BLOB[from..])
            }
            _ => reply(404, &[], ""),
        }
    })
    .await;
    let registry = client(&server.addr, None);
    let platform = "linux/amd64";

    let err = registry.resolve("a", "lying", platform).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Docker-Content-Digest header says")
            && text.contains(&format!("the bytes hash to {good_digest}")),
        "{text}"
    );
    let err = registry
        .resolve("a", &other_digest, platform)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("digest mismatch: the reference says"),
        "{err}"
    );
    let err = registry.resolve("a", "old", platform).await.unwrap_err();
    assert!(err.to_string().contains("schema 1 manifest"), "{err}");
    assert!(!err.retryable());

    let d = sha256(BLOB);
    let fetch = async |repo: &str, offset| read_blob(&registry.blobs(repo), &d, offset).await;
    assert_eq!(fetch("honours", 7).await.unwrap(), (7, BLOB[7..].to_vec()));
    let sent = server.seen("/v2/honours/");
    assert_eq!(sent[0].range.as_deref(), Some("bytes=7-"));
    assert_eq!(fetch("honours", 0).await.unwrap(), (0, BLOB.to_vec()));
    assert_eq!(
        server.seen("/v2/honours/")[1].range,
        None,
        "no Range from 0"
    );
    assert_eq!(
        fetch("ignores", 7).await.unwrap(),
        (0, BLOB.to_vec()),
        "200 to a Range: the whole blob, start 0"
    );
    let err = fetch("elsewhere", 7).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Refused(m) if m.contains("asked for bytes from 7, the answer starts at 0")),
        "{err:?}"
    );
    let busy = fetch("busy", 0).await.unwrap_err();
    assert!(
        matches!(
            busy,
            SourceError::Status {
                code: 503,
                retryable: true
            }
        ),
        "{busy:?}"
    );
    assert!(fetch("slow-down", 0).await.unwrap_err().retryable());
    let err = fetch("cut", 0).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Io(m) if m.contains("cut after 5 bytes")),
        "{err:?}"
    );
    assert!(err.retryable());

    // The HTML of a busy proxy is cut in the registry's own errors too.
    let err = registry.resolve("busy", "1", platform).await.unwrap_err();
    assert!(err.retryable());
    assert!(err.to_string().len() < 2200, "{}", err.to_string().len());
}
