//! Small documents read and written whole: a manifest's digest by `HEAD`,
//! a manifest or a small blob by digest, the referrers of a manifest, and
//! publishing (blob upload, manifest `PUT`). What the policy artifacts of
//! `fleet` need; images still go through `resolve` and `blobs`.

use bytes::Bytes;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use sha2::{Digest as _, Sha256};

use super::http::{self, Url};
use super::manifest::{self, ManifestError};
use super::{Registry, RegistryError};
use crate::refs::{check_digest, check_path, check_tag};
use crate::store::Descriptor;

const DIGEST_HEADER: &str = "docker-content-digest";
/// Set by a registry that indexed a pushed manifest's `subject` (the
/// referrers API); without it the client tags the referrer itself.
const SUBJECT_HEADER: &str = "oci-subject";

/// A manifest accepted by the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub digest: String,
    /// The registry indexed the manifest's `subject` (`OCI-Subject`).
    pub subject_indexed: bool,
}

fn check_reference(reference: &str) -> Result<(), RegistryError> {
    let input = RegistryError::Input;
    if reference.contains(':') {
        check_digest(reference).map_err(input)
    } else {
        check_tag(reference).map_err(|e| input(format!("tag {reference:?}: {e}")))
    }
}

fn check_repository(repository: &str) -> Result<(), RegistryError> {
    check_path(repository)
        .map_err(|e| RegistryError::Input(format!("repository {repository:?}: {e}")))
}

impl Registry {
    /// The digest `reference` names now, from a manifest `HEAD` (no body).
    /// A registry or proxy that leaves `Docker-Content-Digest` off the
    /// answer costs one `GET` of the manifest, hashed here.
    pub async fn manifest_digest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<String, RegistryError> {
        check_repository(repository)?;
        check_reference(reference)?;
        let repository = &self.api_repository(repository);
        let path = format!("/v2/{repository}/manifests/{reference}");
        let accept = [(header::ACCEPT, HeaderValue::from_static(manifest::ACCEPT))];
        let scope = format!("repository:{repository}:pull");
        let answer = self
            .send(Method::HEAD, &scope, self.url(&path), &accept, None)
            .await?;
        let answer = self
            .expect(
                answer,
                &[StatusCode::OK],
                repository,
                &format!("manifest {reference}"),
            )
            .await?;
        let header = http::header_text(&answer.response, &HeaderName::from_static(DIGEST_HEADER))
            .map(str::trim)
            .filter(|d| d.starts_with("sha256:") && check_digest(d).is_ok())
            .map(str::to_owned);
        match header {
            Some(digest) => {
                if reference.starts_with("sha256:") && digest != reference {
                    return Err(RegistryError::Manifest {
                        url: answer.url.to_string(),
                        source: ManifestError::Digest {
                            what: "the Docker-Content-Digest header",
                            expected: reference.to_owned(),
                            actual: digest,
                        },
                    });
                }
                Ok(digest)
            }
            None => Ok(self
                .manifest(repository, reference, None)
                .await?
                .descriptor
                .digest),
        }
    }

    /// The manifest `reference` names, exact bytes as served, its digest
    /// checked against the header and a digest reference.
    pub async fn manifest_bytes(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<(Descriptor, Bytes), RegistryError> {
        check_repository(repository)?;
        check_reference(reference)?;
        let doc = self
            .manifest(&self.api_repository(repository), reference, None)
            .await?;
        Ok((doc.descriptor, doc.bytes))
    }

    /// A small blob read whole: at most `limit` bytes, refused before it is
    /// read when it says it is larger, and its sha256 checked against
    /// `digest`.
    pub async fn blob_bytes(
        &self,
        repository: &str,
        digest: &str,
        limit: u64,
    ) -> Result<Bytes, RegistryError> {
        check_repository(repository)?;
        check_digest(digest).map_err(RegistryError::Input)?;
        let repository = &self.api_repository(repository);
        let path = format!("/v2/{repository}/blobs/{digest}");
        let answer = self.get(repository, &path, &[]).await?;
        let answer = self
            .expect(
                answer,
                &[StatusCode::OK],
                repository,
                &format!("blob {digest}"),
            )
            .await?;
        let url = answer.url.clone();
        let timeout = self.inner.options.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let bytes = http::read_bounded(&url, answer.response, limit, deadline, timeout).await?;
        let actual = manifest::sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::Manifest {
                url: url.to_string(),
                source: ManifestError::Digest {
                    what: "the blob's digest",
                    expected: digest.to_owned(),
                    actual,
                },
            });
        }
        Ok(bytes)
    }

    /// The referrers API's index for `digest` (filtered by `artifact_type`),
    /// or `None` when the registry has no referrers API (404).
    pub async fn referrers(
        &self,
        repository: &str,
        digest: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        check_repository(repository)?;
        check_digest(digest).map_err(RegistryError::Input)?;
        let repository = &self.api_repository(repository);
        let path = format!(
            "/v2/{repository}/referrers/{digest}?{}",
            http::form_encode(&[("artifactType", artifact_type)])
        );
        let answer = self.get(repository, &path, &[]).await?;
        if answer.response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let answer = self
            .expect(
                answer,
                &[StatusCode::OK],
                repository,
                &format!("referrers of {digest}"),
            )
            .await?;
        let options = &self.inner.options;
        let deadline = tokio::time::Instant::now() + options.timeout;
        let bytes = http::read_bounded(
            &answer.url,
            answer.response,
            options.max_manifest,
            deadline,
            options.timeout,
        )
        .await?;
        Ok(Some(bytes))
    }

    /// Uploads `bytes` as a blob of `repository` (unless the registry has
    /// it already): `POST` for an upload session, then one `PUT` with the
    /// digest. Returns its descriptor with `media_type`.
    pub async fn push_blob(
        &self,
        repository: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Descriptor, RegistryError> {
        check_repository(repository)?;
        let repository = &self.api_repository(repository);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let descriptor = Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.clone(),
            size: bytes.len() as u64,
        };
        let scope = format!("repository:{repository}:pull,push");
        let head = self
            .send(
                Method::HEAD,
                &scope,
                self.url(&format!("/v2/{repository}/blobs/{digest}")),
                &[],
                None,
            )
            .await?;
        if head.response.status() == StatusCode::OK {
            return Ok(descriptor);
        }
        let start = self
            .send(
                Method::POST,
                &scope,
                self.url(&format!("/v2/{repository}/blobs/uploads/")),
                &[],
                Some(Bytes::new()),
            )
            .await?;
        let start = self
            .expect(start, &[StatusCode::ACCEPTED], repository, "a blob upload")
            .await?;
        let location = http::header_text(&start.response, &header::LOCATION)
            .and_then(|l| start.url.join(l))
            .ok_or_else(|| RegistryError::BadRedirect {
                url: start.url.to_string(),
                why: "upload session without a usable Location".to_owned(),
            })?;
        let url: Url = location.with_query(&[("digest", &digest)]);
        let octets = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )];
        let put = self
            .send(Method::PUT, &scope, url, &octets, Some(bytes))
            .await?;
        self.expect(
            put,
            &[StatusCode::CREATED],
            repository,
            &format!("blob upload {digest}"),
        )
        .await?;
        Ok(descriptor)
    }

    /// Publishes `bytes` (a manifest of `media_type`) as `reference` (a tag
    /// or its digest); the registry's digest must be the bytes' own.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Pushed, RegistryError> {
        check_repository(repository)?;
        check_reference(reference)?;
        let repository = &self.api_repository(repository);
        let digest = manifest::sha256_digest(&bytes);
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| RegistryError::Input(format!("media type {media_type:?}")))?;
        let scope = format!("repository:{repository}:pull,push");
        let path = format!("/v2/{repository}/manifests/{reference}");
        let answer = self
            .send(
                Method::PUT,
                &scope,
                self.url(&path),
                &[(header::CONTENT_TYPE, content_type)],
                Some(bytes),
            )
            .await?;
        let answer = self
            .expect(
                answer,
                &[StatusCode::CREATED],
                repository,
                &format!("manifest {reference}"),
            )
            .await?;
        let served = http::header_text(&answer.response, &HeaderName::from_static(DIGEST_HEADER));
        if let Some(served) = served.map(str::trim).filter(|d| d.starts_with("sha256:"))
            && served != digest
        {
            return Err(RegistryError::Manifest {
                url: answer.url.to_string(),
                source: ManifestError::Digest {
                    what: "the Docker-Content-Digest header",
                    expected: digest,
                    actual: served.to_owned(),
                },
            });
        }
        let subject_indexed = answer
            .response
            .headers()
            .contains_key(HeaderName::from_static(SUBJECT_HEADER));
        Ok(Pushed {
            digest,
            subject_indexed,
        })
    }
}
