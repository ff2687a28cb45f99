//! The seam types between the registry client and the content store (stub:
//! the store helper owns this file; only the types the registry needs).

use std::future::Future;

/// An OCI content descriptor: what a manifest says about one blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<64 hex>` (only sha256 is accepted).
    pub digest: String,
    pub size: u64,
}

/// Where blobs come from (implemented by `registry::RepoBlobs`).
pub trait BlobSource: Send + Sync {
    /// GET the blob from byte `offset` (HTTP Range `bytes=offset-` when offset > 0).
    fn fetch(
        &self,
        digest: &str,
        offset: u64,
    ) -> impl Future<Output = Result<BlobBody, SourceError>> + Send;
    /// For messages and audit: `host[:port]` of this source.
    fn name(&self) -> &str;
}

/// A blob's body from some offset.
pub struct BlobBody {
    /// Where the body starts: `offset` when the server answered 206 for it, 0 when it
    /// ignored the Range (200 with the whole blob): the store then skips what it has.
    pub start: u64,
    pub stream: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, SourceError>>,
}

/// Why a source gave no (more) bytes; `retryable()` says whether to try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Connection refused, reset, cut mid-body, timed out.
    #[error("{0}")]
    Io(String),
    #[error("the registry answered HTTP {code}")]
    Status { code: u16, retryable: bool },
    #[error("blob not found")]
    NotFound,
    #[error("unauthorized")]
    Unauthorized,
    /// An answer that cannot be used (bad `Content-Range`, a redirect elsewhere than http(s)).
    #[error("{0}")]
    Refused(String),
    #[error("the answer is larger than allowed")]
    TooLarge,
    #[error("redirect loop")]
    RedirectLoop,
}

impl SourceError {
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::Io(_) => true,
            SourceError::Status { retryable, .. } => *retryable,
            _ => false,
        }
    }
}
