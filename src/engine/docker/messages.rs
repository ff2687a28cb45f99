//! Engine and registry errors as stowage's typed [`EngineError`]s: one line,
//! bounded in length, never echoing a secret.

use std::error::Error as StdError;

use bollard::errors::Error as BollardError;

use super::DockerEngine;
use crate::engine::{Credentials, EngineError};

impl DockerEngine {
    /// Maps a bollard error of a local operation on `what`.
    pub(super) fn error(&self, err: BollardError, what: &str) -> EngineError {
        match err {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => EngineError::NotFound(one_line(if message.is_empty() { what } else { &message })),
            BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            } => EngineError::Conflict(one_line(&message)),
            err if is_transport(&err) => EngineError::Unreachable {
                address: self.address.clone(),
                message: root_cause(&err),
            },
            err => EngineError::Other(one_line(&format!("{what}: {}", chain(&err)))),
        }
    }

    /// Maps a bollard error of a registry operation on `reference`; the
    /// engine's message is scrubbed of any secret in `credentials`.
    pub(super) fn registry_error(
        &self,
        err: BollardError,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> EngineError {
        match err {
            err if is_transport(&err) => EngineError::Unreachable {
                address: self.address.clone(),
                message: root_cause(&err),
            },
            BollardError::DockerResponseServerError { message, .. }
            | BollardError::DockerStreamError { error: message } => EngineError::Registry {
                reference: reference.to_owned(),
                message: one_line(&redact(&message, credentials)),
            },
            err => EngineError::Registry {
                reference: reference.to_owned(),
                message: one_line(&redact(&chain(&err), credentials)),
            },
        }
    }
}

/// True for errors of the connection itself rather than of the request.
pub(super) fn is_transport(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. }
            | BollardError::SocketNotFoundError(_)
            | BollardError::RequestTimeoutError
            | BollardError::HyperResponseError { .. }
    )
}

/// The innermost cause, e.g. `Connection refused (os error 111)`: the layers
/// of client wrappers above it add words, not information.
pub(super) fn root_cause(err: &dyn StdError) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    one_line(&cause.to_string())
}

/// The error and its sources, each cause once (not yet [`one_line`]).
pub(super) fn chain(err: &dyn StdError) -> String {
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

/// Longest engine or registry message kept in an error, in bytes. A registry
/// (or a proxy before it) may answer an error with megabytes of HTML, which
/// the engine passes on whole; uncut, it lands in the log, the audit record
/// and the state's backoff entry at every attempt.
const MAX_MESSAGE: usize = 2048;

/// `text` on one line, cut after [`MAX_MESSAGE`] bytes with a marker saying
/// how much was cut. Secrets must be redacted before: a cut could split one.
pub(super) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE + 64));
    let mut words = text.split_whitespace();
    for word in words.by_ref() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() > MAX_MESSAGE {
            break;
        }
    }
    if out.len() <= MAX_MESSAGE {
        return out;
    }
    let mut end = MAX_MESSAGE;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    // What is left, counted as it would have been joined.
    let rest = out.len() - end + words.map(|w| w.len() + 1).sum::<usize>();
    out.truncate(end);
    out.push_str(&format!(" … [{rest} more bytes cut]"));
    out
}

/// Replaces any secret of `credentials` that an engine message might echo.
pub(super) fn redact(message: &str, credentials: Option<&Credentials>) -> String {
    let Some(credentials) = credentials else {
        return message.to_owned();
    };
    let mut out = message.to_owned();
    for secret in [&credentials.password, &credentials.identity_token]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets() {
        let creds = Credentials {
            username: Some("me".into()),
            password: Some("hunter2".into()),
            identity_token: None,
            server: "r".into(),
        };
        assert_eq!(
            redact("denied: bad password hunter2", Some(&creds)),
            "denied: bad password ***"
        );
        assert_eq!(redact("x", None), "x");
    }

    #[test]
    fn long_messages_are_cut_with_a_marker() {
        assert_eq!(one_line(" a \n b\t"), "a b");
        let page = "é".repeat(3000);
        let cut = one_line(&page);
        assert!(cut.len() < MAX_MESSAGE + 40, "{}", cut.len());
        let kept = cut.split(" … [").next().unwrap();
        assert_eq!(kept.len(), MAX_MESSAGE, "cut on a character boundary");
        assert!(cut.ends_with(&format!("[{} more bytes cut]", 6000 - MAX_MESSAGE)));
        // Many words: the rest is counted with its spaces.
        let words = "ab ".repeat(1000);
        let cut = one_line(&words);
        assert!(
            cut.ends_with(&format!("[{} more bytes cut]", 2999 - MAX_MESSAGE)),
            "{cut}"
        );
    }
}
