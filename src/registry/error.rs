//! The registry client's errors. Every URL in them is shown without its
//! query (presigned blob-storage URLs carry signatures there), no header
//! value is ever quoted, and registry messages are cut to one line of 2 KB
//! after the secrets are replaced.

use std::time::Duration;

use super::manifest::ManifestError;
use crate::store::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The caller's input (host, repository, reference, platform).
    #[error("{0}")]
    Input(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{url}: {}", causes(source))]
    Connect {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url}: no answer within {}", humantime::format_duration(*after))]
    Timeout { url: String, after: Duration },
    #[error("{url}: the answer was cut after {received} bytes: {}", causes(source))]
    Cut {
        url: String,
        received: u64,
        #[source]
        source: hyper::Error,
    },
    /// 401 (or 403) after the credentials, if any, were tried.
    #[error("{url}: {}{}", if *sent_credentials {
        "the registry refused the credentials for "
    } else {
        "no access without credentials, and none are configured for "
    }, host_and_message(host, message))]
    Unauthorized {
        url: String,
        host: String,
        sent_credentials: bool,
        message: String,
    },
    /// 404 of a manifest or blob: `what` names it (`blob sha256:…`), with
    /// the repository and the registry's own message.
    #[error("{what} of {repository} not found at {url}{}", colon(message))]
    NotFound {
        url: String,
        repository: String,
        what: String,
        message: String,
    },
    #[error("{url}: HTTP {code}{}", colon(message))]
    Status {
        url: String,
        code: u16,
        message: String,
    },
    #[error("{url}: the answer is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: redirect loop (back to {to})")]
    RedirectLoop { url: String, to: String },
    #[error("{url}: more than {limit} redirects")]
    TooManyRedirects { url: String, limit: usize },
    #[error("{url}: unusable range answer: {why}")]
    BadRange { url: String, why: String },
    #[error("{url}: unusable redirect: {why}")]
    BadRedirect { url: String, why: String },
    #[error("{url}: {source}")]
    Manifest {
        url: String,
        #[source]
        source: ManifestError,
    },
    #[error("{url}: token: {why}")]
    Token { url: String, why: String },
}

/// `err` and its sources, each once: hyper's own text ("client error
/// (Connect)") says little without the cause under it.
pub(super) fn causes(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn colon(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn host_and_message(host: &str, message: &str) -> String {
    format!("{host}{}", colon(message))
}

impl RegistryError {
    /// Whether trying again later may succeed (the link or the registry),
    /// rather than needing a change of input, credentials or registry content.
    pub fn retryable(&self) -> bool {
        match self {
            RegistryError::Connect { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::Cut { .. } => true,
            RegistryError::Status { code, .. } => retryable_status(*code),
            _ => false,
        }
    }
}

/// 5xx and 429 pass; 408 too (the server gave up waiting on a slow link).
pub(super) fn retryable_status(code: u16) -> bool {
    code >= 500 || code == 429 || code == 408
}

/// For the store's download loop: the kind it acts on, with the message kept
/// where the kind has room for it.
impl From<RegistryError> for SourceError {
    fn from(e: RegistryError) -> SourceError {
        match e {
            RegistryError::Connect { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::Cut { .. } => SourceError::Io(e.to_string()),
            RegistryError::Status { code, .. } => SourceError::Status {
                code,
                retryable: retryable_status(code),
            },
            RegistryError::NotFound {
                repository,
                message,
                ..
            } => SourceError::NotFound {
                repository,
                message,
            },
            RegistryError::Unauthorized { .. } => SourceError::Unauthorized,
            RegistryError::TooLarge { .. } => SourceError::TooLarge,
            RegistryError::RedirectLoop { .. } | RegistryError::TooManyRedirects { .. } => {
                SourceError::RedirectLoop
            }
            other => SourceError::Refused(other.to_string()),
        }
    }
}

/// `url` without its query and fragment.
pub(super) fn shown(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_owned()
}
