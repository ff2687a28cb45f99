//! Pulls and pushes with their progress streams, and registry look-ups.

use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{CreateImageOptionsBuilder, PushImageOptionsBuilder};

use super::images::split_reference;
use super::messages::{one_line, redact};
use super::{DockerEngine, podman};
use crate::engine::{Credentials, EngineError, EngineKind, EngineResult, Progress};

/// Longest quiet gap between two progress messages of a pull or push. The
/// transfer's stall watchdog (`daemon.stall_timeout`) abandons them first;
/// this only bounds a caller without one.
const TRANSFER_IDLE: Duration = Duration::from_secs(3600);

pub(super) async fn pull(
    engine: &DockerEngine,
    reference: &str,
    platform: Option<&str>,
    credentials: Option<&Credentials>,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
) -> EngineResult<()> {
    if engine.kind == EngineKind::Podman {
        return podman::pull(
            engine,
            reference,
            platform,
            credentials,
            on_progress,
            TRANSFER_IDLE,
        )
        .await;
    }
    let (name, tag) = split_reference(reference);
    let mut options = CreateImageOptionsBuilder::new().from_image(name).tag(tag);
    if let Some(platform) = platform {
        options = options.platform(platform);
    }
    let auth = docker_credentials(engine, credentials)?;
    let call = format!("pull {reference}");
    let guard = engine.calls.start(&call, TRANSFER_IDLE);
    let mut stream = std::pin::pin!(
        engine
            .docker
            .create_image(Some(options.build()), None, auth)
    );
    while let Some(message) =
        DockerEngine::next_within(&mut stream, &guard, &call, TRANSFER_IDLE).await?
    {
        let info = message.map_err(|e| engine.registry_error(e, reference, credentials))?;
        // bollard only turns `errorDetail` into an error; a bare `error`
        // would otherwise pass as progress.
        if let Some(detail) = info.error_detail {
            return Err(EngineError::Registry {
                reference: reference.to_owned(),
                message: one_line(&redact(&detail.message.unwrap_or_default(), credentials)),
            });
        }
        let (current, total) = info
            .progress_detail
            .map_or((None, None), |p| (p.current, p.total));
        on_progress(&progress(info.status, info.id, current, total));
    }
    Ok(())
}

pub(super) async fn push(
    engine: &DockerEngine,
    reference: &str,
    credentials: Option<&Credentials>,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
) -> EngineResult<()> {
    if engine.kind == EngineKind::Podman {
        return podman::push(engine, reference, credentials, on_progress, TRANSFER_IDLE).await;
    }
    let (name, tag) = split_reference(reference);
    let options = PushImageOptionsBuilder::new().tag(tag).build();
    let auth = docker_credentials(engine, credentials)?;
    let call = format!("push {reference}");
    let guard = engine.calls.start(&call, TRANSFER_IDLE);
    let mut stream = std::pin::pin!(engine.docker.push_image(name, Some(options), auth));
    while let Some(message) =
        DockerEngine::next_within(&mut stream, &guard, &call, TRANSFER_IDLE).await?
    {
        let info = message.map_err(|e| match e {
            // The local image is missing: not the registry's fault.
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => EngineError::NotFound(one_line(&message)),
            // Older engines report a missing local image inside the stream.
            BollardError::DockerStreamError { error }
                if error.contains("does not exist locally") =>
            {
                EngineError::NotFound(one_line(&error))
            }
            e => engine.registry_error(e, reference, credentials),
        })?;
        if let Some(detail) = info.error_detail {
            return Err(EngineError::Registry {
                reference: reference.to_owned(),
                message: one_line(&redact(&detail.message.unwrap_or_default(), credentials)),
            });
        }
        let (current, total) = info
            .progress_detail
            .map_or((None, None), |p| (p.current, p.total));
        on_progress(&progress(info.status, None, current, total));
    }
    Ok(())
}

pub(super) async fn remote_digest(
    engine: &DockerEngine,
    reference: &str,
    credentials: Option<&Credentials>,
) -> EngineResult<String> {
    let auth = docker_credentials(engine, credentials)?;
    let inspect = engine
        .bounded(
            &format!("look up {reference} at its registry"),
            engine.timeout,
            async {
                engine
                    .docker
                    .inspect_registry_image(reference, auth)
                    .await
                    .map_err(|e| engine.registry_error(e, reference, credentials))
            },
        )
        .await?;
    inspect
        .descriptor
        .digest
        .ok_or_else(|| EngineError::Registry {
            reference: reference.to_owned(),
            message: "the registry answered without a digest".to_owned(),
        })
}

/// `credentials` as bollard sends them (`X-Registry-Auth`): the one way
/// they reach the engine, so the one place that refuses, before anything is
/// sent, to put them in clear text on the way to another host.
fn docker_credentials(
    engine: &DockerEngine,
    credentials: Option<&Credentials>,
) -> EngineResult<Option<DockerCredentials>> {
    let Some(c) = credentials else {
        return Ok(None);
    };
    if engine.endpoint.plaintext_remote() && !engine.allow_plaintext_credentials {
        return Err(EngineError::PlaintextCredentials {
            address: engine.address.clone(),
            registry: c.server.clone(),
        });
    }
    Ok(Some(DockerCredentials {
        username: c.username.clone(),
        password: c.password.clone(),
        identitytoken: c.identity_token.clone(),
        serveraddress: Some(c.server.clone()),
        ..Default::default()
    }))
}

fn progress(
    status: Option<String>,
    id: Option<String>,
    current: Option<i64>,
    total: Option<i64>,
) -> Progress {
    Progress {
        id,
        status: status.unwrap_or_default(),
        current: current.and_then(|v| u64::try_from(v).ok()),
        total: total.and_then(|v| u64::try_from(v).ok()),
    }
}
