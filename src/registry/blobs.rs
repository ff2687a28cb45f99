//! Blobs of one repository for the content store: GET with `Range` from an
//! offset, the body as a stream, 206 told from 200.

use std::future::Future;

use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use super::{Registry, RegistryError};
use crate::refs::check_digest;
use crate::store::{BlobBody, BlobSource, SourceError};

/// The blobs of one repository at one registry.
#[derive(Clone, Debug)]
pub struct RepoBlobs {
    registry: Registry,
    repository: String,
}

impl RepoBlobs {
    pub(super) fn new(registry: Registry, repository: &str) -> RepoBlobs {
        RepoBlobs {
            registry,
            repository: repository.to_owned(),
        }
    }

    /// The blob from `offset`: `start` is `offset` when the server answered
    /// 206 for exactly that range, 0 when it sent the whole blob (200).
    async fn open(&self, digest: &str, offset: u64) -> Result<BlobBody, RegistryError> {
        check_digest(digest).map_err(RegistryError::Input)?;
        let path = format!("/v2/{}/blobs/{digest}", self.repository);
        let mut headers = vec![(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        )];
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                .map_err(|e| RegistryError::Input(e.to_string()))?;
            headers.push((header::RANGE, range));
        }
        let answer = self.registry.get(&self.repository, &path, &headers).await?;
        let answer = self
            .registry
            .expect(
                answer,
                &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
                &self.repository,
                &format!("blob {digest}"),
            )
            .await?;
        let url = answer.url.to_string();
        let start = if answer.response.status() == StatusCode::PARTIAL_CONTENT {
            let range = super::http::header_text(&answer.response, &header::CONTENT_RANGE);
            match range.and_then(range_start) {
                Some(first) if first == offset => offset,
                Some(first) => {
                    return Err(refused(
                        &url,
                        format!("asked for bytes from {offset}, the answer starts at {first}"),
                    ));
                }
                None => {
                    return Err(refused(
                        &url,
                        "a 206 answer without a usable Content-Range".into(),
                    ));
                }
            }
        } else {
            0
        };
        let mut received: u64 = 0;
        let stream = answer
            .response
            .into_body()
            .into_data_stream()
            .map(move |chunk| match chunk {
                Ok(bytes) => {
                    received += bytes.len() as u64;
                    Ok(bytes)
                }
                Err(e) => Err(SourceError::Io(format!(
                    "{url}: the answer was cut after {received} bytes: {}",
                    super::error::causes(&e)
                ))),
            })
            .boxed();
        Ok(BlobBody { start, stream })
    }
}

fn refused(url: &str, why: String) -> RegistryError {
    RegistryError::BadRange {
        url: url.to_owned(),
        why,
    }
}

/// The first byte of `bytes FIRST-LAST/TOTAL` (or `/*`).
fn range_start(content_range: &str) -> Option<u64> {
    let spec = content_range.trim().strip_prefix("bytes")?.trim_start();
    let (first, rest) = spec.split_once('-')?;
    let (last, _total) = rest.split_once('/')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    (last >= first).then_some(first)
}

impl BlobSource for RepoBlobs {
    fn fetch(
        &self,
        digest: &str,
        offset: u64,
    ) -> impl Future<Output = Result<BlobBody, SourceError>> + Send {
        let digest = digest.to_owned();
        async move { self.open(&digest, offset).await.map_err(SourceError::from) }
    }

    fn name(&self) -> &str {
        self.registry.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_give_their_first_byte() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes 0-0/*"), Some(0));
        assert_eq!(range_start("bytes  7-9/10"), Some(7));
        assert_eq!(range_start("bytes */200"), None, "unsatisfied range");
        assert_eq!(range_start("bytes 9-7/10"), None);
        assert_eq!(range_start("items 1-2/3"), None);
    }
}
