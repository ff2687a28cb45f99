//! HTTP for the registry client: URLs, one request with its redirects,
//! bounded answer bodies. hyper's client over rustls; nothing here knows
//! about manifests or tokens.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::time::Instant;

use super::error::RegistryError;
use crate::tls_check::{CertCheck, Checked};

const USER_AGENT: &str = concat!("stowage/", env!("CARGO_PKG_VERSION"));
/// Most of an error answer read for its message; the rest is dropped unread.
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// How long an error answer's body may take: its message is a courtesy.
const ERROR_BODY_TIME: Duration = Duration::from_secs(5);

/// An absolute http(s) URL. Displayed without its query: presigned
/// blob-storage URLs carry their signature there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Url {
    https: bool,
    authority: String,
    /// Path and query, starting with `/`.
    path: String,
}

impl Url {
    pub(super) fn new(https: bool, authority: &str, path: &str) -> Url {
        Url {
            https,
            authority: authority.to_owned(),
            path: path.to_owned(),
        }
    }

    /// An absolute `http://` or `https://` URL without user info.
    pub(super) fn parse(text: &str) -> Option<Url> {
        let uri: Uri = text.parse().ok()?;
        let https = match uri.scheme_str()? {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let authority = uri.authority()?.as_str();
        if authority.contains('@') || authority.is_empty() {
            return None;
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(Url::new(
            https,
            authority,
            if path.is_empty() { "/" } else { path },
        ))
    }

    /// `location` (a redirect's target) against this URL.
    pub(super) fn join(&self, location: &str) -> Option<Url> {
        let scheme = if self.https { "https" } else { "http" };
        if location.starts_with("//") {
            Url::parse(&format!("{scheme}:{location}"))
        } else if location.starts_with('/') {
            Url::parse(&format!("{scheme}://{}{location}", self.authority))
        } else if let Some(absolute) = Url::parse(location) {
            Some(absolute)
        } else if location.contains("://") {
            // Another scheme (ftp://, file://): not followed.
            None
        } else {
            let path = self.path.split('?').next().unwrap_or_default();
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            Url::parse(&format!("{scheme}://{}{dir}{location}", self.authority))
        }
    }

    /// This URL with `pairs` added to its query, form-encoded.
    pub(super) fn with_query(&self, pairs: &[(&str, &str)]) -> Url {
        let mut path = self.path.clone();
        for (i, (k, v)) in pairs.iter().enumerate() {
            let sep = if i == 0 && !path.contains('?') {
                '?'
            } else {
                '&'
            };
            path.push(sep);
            path.push_str(&form_encode(&[(k, v)]));
        }
        Url {
            path,
            ..self.clone()
        }
    }

    pub(super) fn authority(&self) -> &str {
        &self.authority
    }

    pub(super) fn is_https(&self) -> bool {
        self.https
    }

    /// The host without its port (`[::1]` keeps its brackets).
    pub(super) fn host(&self) -> &str {
        host_of(&self.authority)
    }

    fn uri(&self) -> Result<Uri, RegistryError> {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.path)
            .parse()
            .map_err(|_| RegistryError::Input(format!("not a valid URL: {self}")))
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let path = self.path.split(['?', '#']).next().unwrap_or_default();
        write!(f, "{scheme}://{}{path}", self.authority)
    }
}

/// `host` of `host[:port]` or `[v6]:port`.
pub(super) fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// Loopback hosts: plain http is fine there (and the engine thinks so too).
pub(super) fn is_loopback(host: &str) -> bool {
    crate::refs::is_loopback_host(host)
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub(super) fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        for (i, part) in [k, v].into_iter().enumerate() {
            if i == 1 {
                out.push('=');
            }
            for b in part.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}

/// One request: what is sent on every hop, and the credentials that go only
/// to the first URL's host.
pub(super) struct Request<'a> {
    pub method: Method,
    pub url: Url,
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// Sent only to `url`'s `host:port`, never to a redirect's other host.
    pub authorization: Option<HeaderValue>,
    /// A form body (token requests), else empty.
    pub form: Option<String>,
    /// A body sent as it is (blob uploads, manifest pushes); its
    /// `Content-Type` is among `headers`.
    pub body: Option<Bytes>,
}

/// The answer, with the URL it finally came from.
pub(super) struct Answer {
    pub url: Url,
    pub response: Response<Incoming>,
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(super) struct Transport {
    client: HttpsClient,
    timeout: Duration,
    max_redirects: usize,
}

/// The host's CA store as a verifier, loaded once per process (some tens
/// of milliseconds: Debian's bundle and its directory, parsed).
fn host_verifier() -> Result<Arc<WebPkiServerVerifier>, String> {
    static VERIFIER: OnceLock<Result<Arc<WebPkiServerVerifier>, String>> = OnceLock::new();
    VERIFIER
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(format!("no trusted CA certificates on this host ({why})"));
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("the host's CA certificates: {e}"))
        })
        .clone()
}

/// Verifies servers against the host's CA store, loaded at the first
/// certificate it is shown: a client of a plain-http registry (loopback)
/// never waits for the store, and one of an https registry finds it loaded
/// by [`super::prepare_tls`] beside the engine's handshake.
#[derive(Debug)]
struct HostRoots;

impl CertCheck for HostRoots {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        host_verifier()
            .map_err(rustls::Error::General)?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
}

/// Loads the host's CA store now (see [`super::prepare_tls`]).
pub(super) fn load_host_roots() {
    let _ = host_verifier();
}

/// rustls with ring over the host's CA store (see [`HostRoots`]).
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = provider();
            let verifier = Checked::new(HostRoots, &provider);
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports rustls's default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Transport {
    /// `needs_tls`: the registry is reached over https, so missing CA
    /// certificates are an error now rather than at the first request.
    pub(super) fn new(
        timeout: Duration,
        max_redirects: usize,
        needs_tls: bool,
    ) -> Result<Transport, RegistryError> {
        if needs_tls {
            host_verifier().map_err(RegistryError::Tls)?;
        }
        let tls = tls_config();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Transport {
            client,
            timeout,
            max_redirects,
        })
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req`, following redirects (301, 302, 303, 307, 308) up to the
    /// bound. `Authorization` goes only to the first URL's `host:port`; a
    /// redirect from https to plain http elsewhere than loopback, a loop, or
    /// more hops than the bound are errors. Connecting and each answer's
    /// head have the transport's deadline; the body is the caller's.
    pub(super) async fn send(&self, req: Request<'_>) -> Result<Answer, RegistryError> {
        let origin = req.url.authority.clone();
        let (mut url, mut method, mut form) = (req.url.clone(), req.method, req.form);
        let mut raw_body = req.body;
        let mut seen = HashSet::from([url.clone()]);
        for hop in 0..=self.max_redirects {
            let mut builder = hyper::Request::builder()
                .method(method.clone())
                .uri(url.uri()?)
                .header(header::USER_AGENT, USER_AGENT);
            for (name, value) in req.headers {
                builder = builder.header(name, value);
            }
            if let Some(auth) = req
                .authorization
                .as_ref()
                .filter(|_| url.authority == origin)
            {
                builder = builder.header(header::AUTHORIZATION, auth);
            }
            let body = match &form {
                Some(f) => {
                    builder =
                        builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                    Bytes::from(f.clone())
                }
                None => raw_body.clone().unwrap_or_default(),
            };
            let request = builder
                .body(Full::new(body))
                .map_err(|e| RegistryError::Input(format!("{url}: {e}")))?;
            tracing::debug!(%method, %url, "registry request");
            let response =
                match tokio::time::timeout(self.timeout, self.client.request(request)).await {
                    Err(_) => {
                        return Err(RegistryError::Timeout {
                            url: url.to_string(),
                            after: self.timeout,
                        });
                    }
                    Ok(Err(source)) => {
                        return Err(RegistryError::Connect {
                            url: url.to_string(),
                            source,
                        });
                    }
                    Ok(Ok(r)) => r,
                };
            let status = response.status();
            if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok(Answer { url, response });
            }
            let bad = |why: String| RegistryError::BadRedirect {
                url: url.to_string(),
                why,
            };
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| bad(format!("HTTP {} without a Location", status.as_u16())))?;
            let next = url
                .join(location)
                .ok_or_else(|| bad("the Location is not an http(s) URL".to_owned()))?;
            if url.https && !next.https && !is_loopback(next.host()) {
                return Err(bad(format!("from https down to plain http ({next})")));
            }
            if !seen.insert(next.clone()) {
                return Err(RegistryError::RedirectLoop {
                    url: req.url.to_string(),
                    to: next.to_string(),
                });
            }
            if hop == self.max_redirects {
                break;
            }
            if status == StatusCode::SEE_OTHER || (method == Method::POST && status.as_u16() < 303)
            {
                method = Method::GET;
                form = None;
                raw_body = None;
            }
            url = next;
        }
        Err(RegistryError::TooManyRedirects {
            url: req.url.to_string(),
            limit: self.max_redirects,
        })
    }
}

/// The body of `response`, at most `limit` bytes, by `deadline`: a
/// `Content-Length` over the limit is refused before reading, and reading
/// stops at the first byte past it, so a huge or endless answer costs at
/// most `limit` bytes of memory.
pub(super) async fn read_bounded(
    url: &Url,
    response: Response<Incoming>,
    limit: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<Bytes, RegistryError> {
    let too_large = || RegistryError::TooLarge {
        url: url.to_string(),
        limit,
    };
    if content_length(&response).is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = response.into_body();
    let mut out = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(RegistryError::Timeout {
                    url: url.to_string(),
                    after: timeout,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(source))) => {
                return Err(RegistryError::Cut {
                    url: url.to_string(),
                    received: out.len() as u64,
                    source,
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if (out.len() + data.len()) as u64 > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

pub(super) fn content_length(response: &Response<Incoming>) -> Option<u64> {
    response
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A header's value as text, if it is text.
pub(super) fn header_text<'r>(
    response: &'r Response<Incoming>,
    name: &HeaderName,
) -> Option<&'r str> {
    response.headers().get(name)?.to_str().ok()
}

/// What an error answer says, best effort and not yet cut: the
/// distribution API's `{"errors": [{"code", "message"}]}` as
/// `CODE: message`, else the text. The caller scrubs secrets and cuts it.
pub(super) async fn error_text(response: Response<Incoming>) -> String {
    let deadline = Instant::now() + ERROR_BODY_TIME;
    let mut body = response.into_body();
    let mut bytes = BytesMut::new();
    // Read up to the cap, drop the rest: a proxy's HTML page may be huge.
    while (bytes.len() as u64) < MAX_ERROR_BODY {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    bytes.truncate(MAX_ERROR_BODY as usize);
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(&bytes) {
        return parsed
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (false, true) => e.code.clone(),
                _ => e.message.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_join_like_a_browser() {
        let base = Url::parse("https://r.example:5000/v2/a/blobs/sha256:1?x=1").unwrap();
        let join = |l| base.join(l).map(|u| format!("{}|{}", u, u.path));
        assert_eq!(
            join("/other?sig=s").unwrap(),
            "https://r.example:5000/other|/other?sig=s",
            "the query stays off the display"
        );
        assert_eq!(
            join("http://s3.example/bucket/x").unwrap(),
            "http://s3.example/bucket/x|/bucket/x"
        );
        assert_eq!(join("//cdn.example/x").unwrap(), "https://cdn.example/x|/x");
        assert_eq!(
            join("next").unwrap(),
            "https://r.example:5000/v2/a/blobs/next|/v2/a/blobs/next"
        );
        assert_eq!(join("ftp://x/y"), None);
        assert_eq!(
            join("/x?back=http://y/").unwrap(),
            "https://r.example:5000/x|/x?back=http://y/"
        );
        assert_eq!(join("http://user:pw@x/y"), None, "no user info");
    }

    /// An https server with a certificate of the test PKI (`scripts/lib.sh`)
    /// for 127.0.0.1, which the host's CA store does not trust: the request
    /// is refused by the verifier that loads that store when first shown a
    /// certificate, with rustls's reason; with the test CA added to the
    /// store's place it would pass, which the engine's TLS tests show.
    #[tokio::test]
    async fn an_untrusted_certificate_is_refused_by_the_host_store() {
        let Some(dir) = std::env::var_os("STOWAGE_TEST_TLS_CERTS").filter(|d| !d.is_empty()) else {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
            assert!(!ci, "STOWAGE_TEST_TLS_CERTS is not set: run scripts/test");
            eprintln!(
                "SKIP an_untrusted_certificate_is_refused_by_the_host_store: STOWAGE_TEST_TLS_CERTS is not set"
            );
            return;
        };
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let dir = std::path::PathBuf::from(dir);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server-cert.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // The client gives up during the handshake.
            acceptor.accept(tcp).await.is_err()
        });
        let transport = Transport::new(Duration::from_secs(10), 3, true).unwrap();
        let err = transport
            .send(Request {
                method: Method::GET,
                url: Url::new(true, &addr.to_string(), "/v2/"),
                headers: &[],
                authorization: None,
                form: None,
                body: None,
            })
            .await
            .err()
            .expect("an untrusted certificate must not be accepted");
        let text = format!("{err}");
        assert!(
            text.contains("UnknownIssuer") || text.contains("unknown issuer"),
            "the reason is rustls's: {text}"
        );
        assert!(server.await.unwrap(), "the server saw the handshake fail");
    }

    #[test]
    fn loopback_and_hosts() {
        for h in [
            "localhost",
            "127.0.0.1",
            "127.9.9.9",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1", "r.example", "[::2]", "localhost.example"] {
            assert!(!is_loopback(h), "{h}");
        }
        assert_eq!(host_of("[::1]:5000"), "[::1]");
        assert_eq!(host_of("r:5000"), "r");
        assert_eq!(host_of("r"), "r");
    }

    #[test]
    fn queries_are_form_encoded() {
        let u = Url::parse("https://auth.example/token?a=b").unwrap();
        let u = u.with_query(&[("scope", "repository:x/y:pull"), ("service", "r s")]);
        assert_eq!(
            u.path,
            "/token?a=b&scope=repository%3Ax%2Fy%3Apull&service=r%20s"
        );
        assert_eq!(u.to_string(), "https://auth.example/token");
    }
}
