//! Engine and registry errors as stowage's typed [`EngineError`]s: one line,
//! bounded in length, never echoing a secret.

use std::error::Error as StdError;

use bollard::errors::Error as BollardError;

use super::DockerEngine;
use crate::engine::{Credentials, EngineError};
/// The one 2 KB cut of error text, shared with the registry client.
pub(super) use crate::fmt::one_line;

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
            // Podman refuses an unforced removal by id of an image with
            // several tags as a 500.
            BollardError::DockerResponseServerError {
                status_code: 500,
                message,
            } if message.contains("please force removal") => {
                EngineError::Conflict(one_line(&message))
            }
            err if is_transport(&err) => self.transport_error(&err),
            err => EngineError::Other(one_line(&format!("{what}: {}", chain(&err)))),
        }
    }

    /// The connection failed: unreachable, or TLS that one side refused.
    fn transport_error(&self, err: &BollardError) -> EngineError {
        let tls = match &self.endpoint {
            super::Endpoint::Tls(_, client) => client.explain(err),
            _ => None,
        };
        match tls {
            Some(error) => EngineError::Tls {
                address: self.address.clone(),
                error,
            },
            None => EngineError::Unreachable {
                address: self.address.clone(),
                message: root_cause(err),
            },
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
            err if is_transport(&err) => self.transport_error(&err),
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
}
