//! The registry client: the one module that speaks HTTP to registries (the
//! distribution API), as `engine/docker.rs` is the one that knows bollard.
//!
//! - [`Registry::resolve`]: a tag or digest to the top manifest or index
//!   (exact bytes), the platform's image manifest, its config and layers;
//!   OCI and Docker schema 2, schema 1 refused; digests checked against
//!   `Docker-Content-Digest` and a digest reference; manifests capped and
//!   read bounded.
//! - [`Registry::blobs`]: a [`BlobSource`](crate::store::BlobSource) for the
//!   content store: a blob from an offset with HTTP `Range`, saying whether
//!   the server honoured it (206) or sent it whole (200).
//! - Auth: anonymous first; on a 401, Bearer tokens (with the credentials
//!   when there are any, cached per scope) or Basic. Redirects (to blob
//!   storage) are followed up to a bound, never carrying `Authorization` to
//!   another host.
//! - http for loopback hosts, https (rustls, the host's CA store) otherwise.
//!
//! Credentials never appear in errors or logs; error answers are read
//! bounded and cut to one line of 2 KB.

mod auth;
mod blobs;
mod error;
mod http;
pub(crate) mod manifest;
mod publish;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

use self::auth::Auth;
pub use self::blobs::RepoBlobs;
pub use self::error::RegistryError;
use self::http::{Answer, Request, Transport, Url};
use self::manifest::Kind;
pub use self::publish::Pushed;
use crate::engine::Credentials;
use crate::refs::{check_digest, check_host, check_path, check_platform, check_tag};
use crate::store::Descriptor;

/// Loads the host's CA certificates (once per process, tens of
/// milliseconds of parsing) on a thread of its own when one of `hosts` is
/// reached over https, so that its first handshake finds them ready: call
/// it before waiting on something else, such as the engine's handshake.
/// Loopback registries (plain http) never need them.
pub fn prepare_tls<'a>(hosts: impl IntoIterator<Item = &'a str>) {
    if hosts.into_iter().any(over_https) {
        std::thread::spawn(http::load_host_roots);
    }
}

/// Whether a registry at `host` (`host[:port]`) is reached over https:
/// every host but loopback, which plain http serves (as the engine allows).
fn over_https(host: &str) -> bool {
    !http::is_loopback(http::host_of(host))
}

/// Where Docker Hub's API answers (`docker.io` names it in references).
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Limits of one registry client.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline for connecting and for each answer's head; for small
    /// answers (manifests, tokens) for the whole answer. Blob bodies have
    /// none here: the store's download loop times each chunk out.
    pub timeout: Duration,
    /// Largest manifest or index accepted, in bytes.
    pub max_manifest: u64,
    /// Redirects followed for one request.
    pub max_redirects: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: Duration::from_secs(30),
            max_manifest: 4 * 1024 * 1024,
            max_redirects: 5,
        }
    }
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What the tag points at (index or manifest): its descriptor and raw bytes.
    pub top: (Descriptor, Bytes),
    /// The platform's image manifest (== top when top is not an index).
    pub manifest: (Descriptor, Bytes),
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A client for one registry host; cheap to clone (shared connections and tokens).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host[:port]` as the caller named it.
    name: String,
    /// `http(s)://host[:port]/`, Docker Hub's API host for `docker.io`.
    base: Url,
    transport: Transport,
    auth: Auth,
    options: Options,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// One manifest document as served.
struct Document {
    descriptor: Descriptor,
    bytes: Bytes,
    kind: Kind,
    url: Url,
}

impl Registry {
    /// A client for `host` (`host[:port]`, e.g. `127.0.0.1:5000` or
    /// `docker.io`): plain http for loopback hosts, https otherwise.
    pub fn new(
        host: &str,
        credentials: Option<&Credentials>,
        options: &Options,
    ) -> Result<Registry, RegistryError> {
        check_host(host).map_err(|e| RegistryError::Input(format!("registry {host:?}: {e}")))?;
        let name = host.to_ascii_lowercase();
        let api = if name == "docker.io" || name == "index.docker.io" {
            DOCKER_HUB_API
        } else {
            &name
        };
        let https = over_https(api);
        let transport = Transport::new(options.timeout, options.max_redirects, https)?;
        Ok(Registry {
            inner: Arc::new(Inner {
                base: Url::new(https, api, "/"),
                name,
                transport,
                auth: Auth::new(credentials),
                options: options.clone(),
            }),
        })
    }

    /// `host[:port]` of this registry, as given.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Resolve `reference` (a tag or `sha256:` digest) in `repository` (the
    /// path at this registry, e.g. `library/nginx`) to the top-level
    /// manifest (index or image manifest, exact bytes as served) and, for an
    /// index, the entry for `platform` (`os/arch[/variant]`, the caller's
    /// default being the engine's platform).
    pub async fn resolve(
        &self,
        repository: &str,
        reference: &str,
        platform: &str,
    ) -> Result<Resolved, RegistryError> {
        let input = RegistryError::Input;
        check_path(repository).map_err(|e| input(format!("repository {repository:?}: {e}")))?;
        if reference.contains(':') {
            check_digest(reference).map_err(input)?;
        } else {
            check_tag(reference).map_err(|e| input(format!("tag {reference:?}: {e}")))?;
        }
        check_platform(platform).map_err(input)?;
        let repository = &self.api_repository(repository);
        let top = self.manifest(repository, reference, None).await?;
        let image = match top.kind {
            Kind::Image => None,
            Kind::Index => {
                let entry = manifest::select_platform(&top.bytes, platform).map_err(|source| {
                    RegistryError::Manifest {
                        url: top.url.to_string(),
                        source,
                    }
                })?;
                let doc = self
                    .manifest(repository, &entry.digest, Some(&entry))
                    .await?;
                if doc.kind == Kind::Index {
                    return Err(RegistryError::Manifest {
                        url: doc.url.to_string(),
                        source: manifest::ManifestError::NestedIndex {
                            platform: platform.to_owned(),
                            media_type: doc.descriptor.media_type,
                        },
                    });
                }
                Some(doc)
            }
        };
        let image_doc = image.as_ref().unwrap_or(&top);
        let (config, layers) =
            manifest::image_parts(&image_doc.bytes).map_err(|source| RegistryError::Manifest {
                url: image_doc.url.to_string(),
                source,
            })?;
        let manifest = (image_doc.descriptor.clone(), image_doc.bytes.clone());
        Ok(Resolved {
            top: (top.descriptor, top.bytes),
            manifest,
            config,
            layers,
        })
    }

    /// A [`BlobSource`](crate::store::BlobSource) for `repository` at this registry.
    pub fn blobs(&self, repository: &str) -> RepoBlobs {
        RepoBlobs::new(self.clone(), &self.api_repository(repository))
    }

    /// Docker Hub keeps its official images under `library/`: `nginx` is
    /// `library/nginx` there, as the engine resolves it.
    fn api_repository(&self, repository: &str) -> String {
        if self.inner.base.authority() == DOCKER_HUB_API && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        }
    }

    /// One manifest or index; `expected` is the index entry it must match.
    async fn manifest(
        &self,
        repository: &str,
        reference: &str,
        expected: Option<&Descriptor>,
    ) -> Result<Document, RegistryError> {
        let options = &self.inner.options;
        let deadline = tokio::time::Instant::now() + options.timeout;
        let accept = [(header::ACCEPT, HeaderValue::from_static(manifest::ACCEPT))];
        let path = format!("/v2/{repository}/manifests/{reference}");
        let answer = self.get(repository, &path, &accept).await?;
        let what = format!("manifest {reference}");
        let answer = self
            .expect(answer, &[StatusCode::OK], repository, &what)
            .await?;
        let url = answer.url.clone();
        let content_type =
            http::header_text(&answer.response, &header::CONTENT_TYPE).map(str::to_owned);
        let digest_header = http::header_text(
            &answer.response,
            &HeaderName::from_static("docker-content-digest"),
        )
        .map(str::to_owned);
        let bytes = http::read_bounded(
            &url,
            answer.response,
            options.max_manifest,
            deadline,
            options.timeout,
        )
        .await?;
        let bad = |source| RegistryError::Manifest {
            url: url.to_string(),
            source,
        };
        let digest =
            manifest::check_digest_of(&bytes, digest_header.as_deref(), reference).map_err(bad)?;
        let (media_type, kind) =
            manifest::classify(content_type.as_deref(), &bytes).map_err(bad)?;
        if let Some(e) = expected
            && e.size != bytes.len() as u64
        {
            return Err(bad(manifest::ManifestError::Size {
                expected: e.size,
                actual: bytes.len() as u64,
            }));
        }
        Ok(Document {
            descriptor: Descriptor {
                media_type,
                digest,
                size: bytes.len() as u64,
            },
            bytes,
            kind,
            url,
        })
    }

    /// GET `path` at this registry with the pull scope of `repository`.
    async fn get(
        &self,
        repository: &str,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer, RegistryError> {
        let url = self.url(path);
        let scope = format!("repository:{repository}:pull");
        self.send(Method::GET, &scope, url, headers, None).await
    }

    /// `path` (with its query) at this registry.
    fn url(&self, path: &str) -> Url {
        let base = &self.inner.base;
        Url::new(base.is_https(), base.authority(), path)
    }

    /// One request with `scope` (`repository:NAME:pull` or `…:pull,push`):
    /// anonymous or with what earlier challenges asked for; on a 401 from
    /// the registry itself, answer its challenge and try once more.
    /// Credentials go only to this registry's own `host:port` (an upload
    /// `Location` elsewhere gets none).
    async fn send(
        &self,
        method: Method,
        scope: &str,
        url: Url,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<Answer, RegistryError> {
        let inner = &self.inner;
        let to_us = url.authority() == inner.base.authority();
        let mut answered = false;
        loop {
            let answer = inner
                .transport
                .send(Request {
                    method: method.clone(),
                    url: url.clone(),
                    headers,
                    authorization: inner.auth.header(scope).filter(|_| to_us),
                    form: None,
                    body: body.clone(),
                })
                .await?;
            let status = answer.response.status();
            let ours = answer.url.authority() == url.authority();
            let denied = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
            if !ours || !denied {
                return Ok(answer);
            }
            if status == StatusCode::UNAUTHORIZED
                && to_us
                && !answered
                && inner
                    .auth
                    .answer(&inner.transport, answer.response.headers(), scope)
                    .await?
            {
                answered = true;
                continue;
            }
            let message = inner.auth.scrub(&http::error_text(answer.response).await);
            return Err(RegistryError::Unauthorized {
                url: answer.url.to_string(),
                host: inner.name.clone(),
                sent_credentials: inner.auth.has_credentials(),
                message,
            });
        }
    }

    /// `answer` when its status is one of `ok`, else its error; `what`
    /// (`blob sha256:…`) in `repository` is what a 404 says is missing.
    async fn expect(
        &self,
        answer: Answer,
        ok: &[StatusCode],
        repository: &str,
        what: &str,
    ) -> Result<Answer, RegistryError> {
        let status = answer.response.status();
        if ok.contains(&status) {
            return Ok(answer);
        }
        let url = answer.url.to_string();
        let message = self
            .inner
            .auth
            .scrub(&http::error_text(answer.response).await);
        Err(match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                url,
                repository: repository.to_owned(),
                what: what.to_owned(),
                message,
            },
            _ => RegistryError::Status {
                url,
                code: status.as_u16(),
                message,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_give_their_scheme_and_api_address() {
        let options = Options::default();
        let hub = Registry::new("docker.io", None, &options).unwrap();
        assert_eq!(hub.name(), "docker.io");
        assert_eq!(hub.inner.base.to_string(), "https://registry-1.docker.io/");
        assert_eq!(hub.api_repository("nginx"), "library/nginx");
        assert_eq!(hub.api_repository("team/app"), "team/app");
        let local = Registry::new("127.0.0.1:5000", None, &options).unwrap();
        assert_eq!(local.inner.base.to_string(), "http://127.0.0.1:5000/");
        assert_eq!(local.api_repository("nginx"), "nginx");
        let named = Registry::new("Localhost:5000", None, &options).unwrap();
        assert_eq!(named.inner.base.to_string(), "http://localhost:5000/");
        let remote = Registry::new("r.example:5000", None, &options).unwrap();
        assert_eq!(remote.inner.base.to_string(), "https://r.example:5000/");
        for bad in ["", "http://r.example", "r.example/path", "r:0"] {
            assert!(
                matches!(
                    Registry::new(bad, None, &options),
                    Err(RegistryError::Input(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn clients_and_their_futures_cross_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let registry = Registry::new("127.0.0.1:1", None, &Options::default()).unwrap();
        send_sync(&registry);
        send(&registry.resolve("a", "1", "linux/amd64"));
        send_sync(&registry.blobs("a"));
    }
}
