//! The content store as a read-only registry on loopback, for the engine to
//! pull complete images from (`127.0.0.1:PORT/<repo>@<digest>`: the engine
//! treats 127.0.0.0/8 registries as insecure-allowed).
//!
//! Bound to 127.0.0.1 only, bounded like the metrics endpoint
//! ([`crate::httpd`]); GET and HEAD only, of:
//! - `/v2/`: `{}`;
//! - `/v2/<name>/manifests/<sha256 digest>`: the manifest or index, with
//!   the media type it names (OCI's inferred when it names none);
//! - `/v2/<name>/blobs/<digest>`: streamed from disk.
//!
//! Only complete blobs are served (never a partial), by digest only (no
//! tags, no catalog); anything else is 404 or 405 with an OCI error body.
//! Every body is hashed as it goes out: a blob whose bytes no longer match
//! is removed and its answer broken off, so the engine never takes it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::blocking::off_loop;

use super::index::MANIFEST_MAX;
use super::{Store, StoreError};

const LIMITS: crate::httpd::Limits = crate::httpd::Limits {
    name: "content store",
    // The engine downloads a few layers at once (3 by default).
    connections: 16,
    header_timeout: Duration::from_secs(5),
    // A whole layer goes over one connection: generous, but bounded.
    deadline: Duration::from_secs(3600),
    max_request: 16 * 1024,
    drain: Duration::from_secs(2),
};
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const API_VERSION: &str = "Docker-Distribution-API-Version";
const CONTENT_DIGEST: &str = "Docker-Content-Digest";
/// Read, hashed and sent at once: few trips to the blocking pool.
const CHUNK: usize = 1 << 20;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The endpoint while it runs; dropping it (or `shutdown`) stops it.
#[derive(Debug)]
pub struct Serving {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Stops accepting, lets the requests in flight finish (briefly).
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `store` on `127.0.0.1:<a free port>` until `shutdown` or until the
/// [`Serving`] is dropped.
pub async fn serve(store: Store, shutdown: &CancellationToken) -> Result<Serving, StoreError> {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| super::io("cannot listen on 127.0.0.1 for", store.root(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| super::io("cannot listen on 127.0.0.1 for", store.root(), e))?;
    let stop = shutdown.child_token();
    let service = hyper::service::service_fn(move |req| {
        let store = store.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&store, &req).await) }
    });
    let task = tokio::spawn(crate::httpd::serve(listener, LIMITS, stop.clone(), service));
    Ok(Serving { addr, stop, task })
}

async fn answer<B>(store: &Store, req: &Request<B>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if !head && req.method() != Method::GET {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry is read-only",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    if path == "/v2/" || path == "/v2" {
        return ok(head, "application/json", None, Bytes::from_static(b"{}"));
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a registry path");
    };
    let (name, kind, reference) = if let Some((n, r)) = rest.rsplit_once("/manifests/") {
        (n, Kind::Manifest, r)
    } else if let Some((n, r)) = rest.rsplit_once("/blobs/") {
        (n, Kind::Blob, r)
    } else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "only manifests and blobs by digest are served here",
        );
    };
    if !valid_name(name) {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_INVALID",
            "invalid repository name",
        );
    }
    let unknown = kind.unknown();
    if crate::refs::check_digest(reference).is_err() {
        return error(
            StatusCode::NOT_FOUND,
            unknown,
            "only digests are served here, not tags",
        );
    }
    let Ok(path) = store.blob_path(reference) else {
        return error(StatusCode::NOT_FOUND, unknown, "invalid digest");
    };
    let digest = reference.to_owned();
    let opened = off_loop(move || {
        let file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        // Serving is using: the LRU order of `gc`.
        let _ = file.set_modified(std::time::SystemTime::now());
        Ok::<_, std::io::Error>((file, len, path))
    })
    .await;
    let Ok((file, len, path)) = opened else {
        return error(StatusCode::NOT_FOUND, unknown, "not in the content store");
    };
    match kind {
        Kind::Manifest => manifest(file, len, path, digest, head).await,
        Kind::Blob if head => ok(true, "application/octet-stream", Some(&digest), len),
        Kind::Blob => blob(file, len, path, digest),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Manifest,
    Blob,
}

impl Kind {
    fn unknown(self) -> &'static str {
        match self {
            Kind::Manifest => "MANIFEST_UNKNOWN",
            Kind::Blob => "BLOB_UNKNOWN",
        }
    }
}

/// A manifest or index, read whole (bounded), checked, with its media type.
async fn manifest(
    file: std::fs::File,
    len: u64,
    path: PathBuf,
    digest: String,
    head: bool,
) -> Response<Body> {
    let unknown = |why| error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", why);
    if len > MANIFEST_MAX {
        return unknown("that blob is not a manifest");
    }
    let want = digest.clone();
    let read = off_loop(move || {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes)?;
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if got != want {
            remove_corrupt(&path, &want, &got);
            return Ok(None);
        }
        Ok::<_, std::io::Error>(Some(bytes))
    })
    .await;
    let Ok(Some(bytes)) = read else {
        return unknown("not in the content store");
    };
    let Some(media_type) = media_type(&bytes) else {
        return unknown("that blob is not a manifest");
    };
    let mut r = ok(head, "application/json", Some(&digest), Bytes::from(bytes));
    if let Ok(v) = HeaderValue::from_str(&media_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// The media type a manifest or index names, else OCI's by its shape;
/// `None` when the bytes are not a JSON object.
fn media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = v.as_object()?;
    if let Some(t) = object.get("mediaType").and_then(|t| t.as_str()) {
        return Some(t.to_owned());
    }
    Some(
        if object.contains_key("manifests") {
            OCI_INDEX
        } else {
            OCI_MANIFEST
        }
        .to_owned(),
    )
}

/// A blob streamed from disk and hashed on the way, both on the blocking
/// pool in [`CHUNK`]s. Its last chunk goes out only after the hash matched:
/// otherwise the blob is removed and the body ends in an error, short of
/// its length (the client sees a broken answer, never a whole wrong one).
fn blob(file: std::fs::File, len: u64, path: PathBuf, digest: String) -> Response<Body> {
    struct Reading {
        file: std::fs::File,
        hasher: Sha256,
        left: u64,
        path: PathBuf,
        digest: String,
    }
    let state = Reading {
        file,
        hasher: Sha256::new(),
        left: len,
        path,
        digest: digest.clone(),
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let s = state?;
        if s.left == 0 {
            return None;
        }
        let (s, read) = off_loop(move || {
            let mut s = s;
            let read = next_chunk(&mut s.file, &mut s.hasher, &mut s.left);
            if read.is_ok() && s.left == 0 {
                // The last bytes go out only once all of them matched.
                let got = format!("sha256:{}", hex::encode(s.hasher.clone().finalize()));
                if got != s.digest {
                    remove_corrupt(&s.path, &s.digest, &got);
                    return (s, Err(std::io::Error::other("the blob is corrupt")));
                }
            }
            (s, read)
        })
        .await;
        match read {
            Ok(buf) => Some((Ok(Frame::data(buf)), Some(s))),
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    set_headers(&mut r, "application/octet-stream", Some(&digest), len);
    r
}

/// Up to [`CHUNK`] more bytes of a blob of which `left` are still to come,
/// hashed into `hasher`.
fn next_chunk(
    file: &mut std::fs::File,
    hasher: &mut Sha256,
    left: &mut u64,
) -> std::io::Result<Bytes> {
    use std::io::Read as _;
    let want = usize::try_from(*left).map_or(CHUNK, |l| l.min(CHUNK));
    let mut buf = BytesMut::zeroed(want);
    let mut filled = 0;
    while filled < want {
        match file.read(&mut buf[filled..])? {
            0 => return Err(std::io::Error::other("the blob is shorter than it was")),
            n => filled += n,
        }
    }
    hasher.update(&buf);
    *left -= want as u64;
    Ok(buf.freeze())
}

fn remove_corrupt(path: &std::path::Path, want: &str, got: &str) {
    tracing::warn!("content store: blob {want} hashes to {got}: removed, not served");
    let _ = std::fs::remove_file(path);
}

/// A 200 answer: `body` for GET, its headers alone for HEAD. `body` is the
/// bytes, or (for a HEAD of a blob) only their length.
fn ok(
    head: bool,
    content_type: &str,
    digest: Option<&str>,
    body: impl Into<Answer>,
) -> Response<Body> {
    let (len, bytes) = match body.into() {
        Answer::Bytes(b) => (b.len() as u64, b),
        Answer::Length(n) => (n, Bytes::new()),
    };
    let bytes = if head { Bytes::new() } else { bytes };
    let mut r = Response::new(full(bytes));
    set_headers(&mut r, content_type, digest, len);
    r
}

enum Answer {
    Bytes(Bytes),
    Length(u64),
}

impl From<Bytes> for Answer {
    fn from(b: Bytes) -> Self {
        Answer::Bytes(b)
    }
}

impl From<u64> for Answer {
    fn from(n: u64) -> Self {
        Answer::Length(n)
    }
}

fn set_headers(r: &mut Response<Body>, content_type: &str, digest: Option<&str>, len: u64) {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    // HEAD says how long the GET answer would be.
    h.insert(header::CONTENT_LENGTH, len.into());
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    if let Some(v) = digest.and_then(|d| HeaderValue::from_str(d).ok()) {
        h.insert(CONTENT_DIGEST, v);
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An OCI distribution error answer.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    let bytes = Bytes::from(serde_json::to_vec(&body).expect("JSON always serializes"));
    let len = bytes.len() as u64;
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    set_headers(&mut r, "application/json", None, len);
    r
}

/// A repository name as the distribution spec allows: lowercase path
/// components of alphanumerics separated by `.`, `_`, `__` or `-`s.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::tests::{blob, image, leave_partial, open};
    use super::*;

    #[test]
    fn media_type_is_named_or_inferred() {
        assert_eq!(
            media_type(br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#)
                .as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(
            media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            media_type(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(media_type(b"\x1f\x8b binary layer"), None);
        assert_eq!(media_type(b"[1,2]"), None);
    }

    #[test]
    fn repository_names_follow_the_distribution_grammar() {
        for good in ["a", "library/nginx", "stowage-test/x_y.z-1", "a/b/c"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "A", "a//b", "-a", "a-", "../x", "a/./b", "x y"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    /// `(status, headers, body)` of one request to the loopback endpoint;
    /// status 0 when the answer broke off before its head.
    async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
    ) -> (u16, String, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        // A broken-off answer may not even have its head.
        let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (0, String::new(), out);
        };
        let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head, out[split + 4..].to_vec())
    }

    #[tokio::test]
    async fn the_loopback_endpoint_serves_complete_blobs_by_digest_only() {
        let (_d, store) = open();
        let (manifest, _, layer) = image(&store, 50);
        let (p_data, p) = blob(1000, 51);
        leave_partial(&store, &p, &p_data, Some(1000));
        let stop = CancellationToken::new();
        let serving = serve(store.clone(), &stop).await.unwrap();
        let addr = serving.addr;
        assert!(addr.ip().is_loopback());

        let (status, head, body) = request(addr, "GET", "/v2/").await;
        assert_eq!((status, body.as_slice()), (200, b"{}".as_slice()));
        assert!(
            head.contains("docker-distribution-api-version: registry/2.0"),
            "{head}"
        );

        let path = format!("/v2/team/app/manifests/{}", manifest.digest);
        let (status, head, body) = request(addr, "GET", &path).await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: application/vnd.oci.image.manifest.v1+json"),
            "{head}"
        );
        assert!(
            head.contains(&format!("docker-content-digest: {}", manifest.digest)),
            "{head}"
        );
        assert_eq!(body.len() as u64, manifest.size);

        let path = format!("/v2/team/app/blobs/{}", layer.digest);
        let (status, head, body) = request(addr, "GET", &path).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-length: 3000"), "{head}");
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&body))),
            layer.digest
        );
        let (status, head, body) = request(addr, "HEAD", &path).await;
        assert_eq!((status, body.len()), (200, 0));
        assert!(head.contains("content-length: 3000"), "{head}");

        // Partials, tags, writes and other paths are not served.
        let (status, _, body) =
            request(addr, "GET", &format!("/v2/team/app/blobs/{}", p.digest)).await;
        assert_eq!(status, 404);
        assert!(String::from_utf8_lossy(&body).contains("BLOB_UNKNOWN"));
        let (status, _, body) = request(addr, "GET", "/v2/team/app/manifests/latest").await;
        assert_eq!(status, 404);
        assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
        for path in [
            "/v2/team/app/tags/list",
            "/v2/_catalog",
            "/metrics",
            "/v2/UP/manifests/x",
        ] {
            assert_eq!(request(addr, "GET", path).await.0, 404, "{path}");
        }
        let (status, head, _) =
            request(addr, "PUT", &format!("/v2/team/app/blobs/{}", layer.digest)).await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"), "{head}");
        assert_eq!(
            request(addr, "POST", "/v2/team/app/blobs/uploads/").await.0,
            405
        );
        assert_eq!(request(addr, "DELETE", &path).await.0, 405);
        // A layer is not a manifest.
        let (status, _, _) =
            request(addr, "GET", &format!("/v2/x/manifests/{}", layer.digest)).await;
        assert_eq!(status, 404);

        // A blob corrupted on disk: its answer is broken off, and it is removed.
        let on_disk = store.blob_path(&layer.digest).unwrap();
        let mut bytes = fs::read(&on_disk).unwrap();
        bytes[10] ^= 1;
        fs::write(&on_disk, bytes).unwrap();
        let (_, _, body) = request(addr, "GET", &path).await;
        assert!(body.len() < 3000, "the wrong bytes are never all sent");
        assert!(!store.has(&layer.digest));
        serving.stop().await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "stopped"
        );
    }
}
