//! `-p oci://…`: a policy from a registry for every command, `stowage
//! policy push`, and what `stowage run` needs to poll it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use super::{Fatal, emit, errln};
use crate::clock::{Clock, SystemClock};
use crate::fleet::poll::{self, Opened, Poller};
use crate::fleet::{self, PolicyRef, PrivateKey, PublicKey};
use crate::policy::{self, Policy};

/// The global flags that matter only for a registry policy.
#[derive(Debug, Clone, Default)]
pub(super) struct RemoteArgs {
    /// `--state-dir` / `STOWAGE_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--policy-key` / `STOWAGE_POLICY_KEY`.
    pub policy_key: Option<PathBuf>,
}

/// Set once from the command line, before any command runs.
static ARGS: OnceLock<RemoteArgs> = OnceLock::new();
/// The registry policy this command read (a command reads one policy), for
/// `status` without a daemon.
static OPENED: OnceLock<poll::RemoteStatus> = OnceLock::new();

/// What this command's registry policy is (source, digest, fallback).
pub(super) fn opened() -> Option<&'static poll::RemoteStatus> {
    OPENED.get()
}

pub(super) fn set_args(args: RemoteArgs) {
    let _ = ARGS.set(args);
}

fn args() -> RemoteArgs {
    ARGS.get().cloned().unwrap_or_default()
}

/// The reference, when `path` is `oci://…`.
pub(super) fn reference(path: &Path) -> Result<Option<PolicyRef>, Fatal> {
    PolicyRef::from_arg(path)
        .transpose()
        .map_err(Fatal::Message)
}

pub(super) fn state_dir() -> PathBuf {
    args()
        .state_dir
        .unwrap_or_else(|| PathBuf::from(fleet::DEFAULT_STATE_DIR))
}

fn key() -> Result<Option<PublicKey>, Fatal> {
    args()
        .policy_key
        .map(|p| PublicKey::load(&p))
        .transpose()
        .map_err(|e| Fatal::Message(format!("--policy-key: {e}")))
}

fn refused(e: fleet::FleetError) -> Fatal {
    Fatal::Message(format!("{e}; nothing done"))
}

/// The registry policy for a command: read now, or with the registry
/// unreachable (or the policy there refused) and `fallback`, the last good
/// one this host kept, said on stderr.
pub(super) async fn open(r: &PolicyRef, fallback: bool, keep: bool) -> Result<Opened, Fatal> {
    let key = key()?;
    let opened = poll::open(
        r,
        &state_dir(),
        key.as_ref(),
        fallback,
        keep,
        SystemClock.now(),
    )
    .await
    .map_err(refused)?;
    let _ = OPENED.set(opened.status.clone());
    Ok(opened)
}

/// `stowage check -p oci://…`: the policy there, as it is (no fallback).
pub(super) async fn check(r: &PolicyRef) -> Result<ExitCode, Fatal> {
    let opened = open(r, false, false).await?;
    outln!(
        "{r} ({}): {}",
        opened.current.digest,
        opened.policy.summary()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `stowage policy push FILE oci://HOST/REPO:TAG [--sign KEY]`.
pub(super) async fn push(
    file: &Path,
    target: &str,
    sign: Option<&Path>,
) -> Result<ExitCode, Fatal> {
    let r = PolicyRef::parse(target).map_err(Fatal::Message)?;
    let bytes = policy::file::read(file).map_err(|d| invalid(&d))?;
    // The same validation a host gives it, so what is published loads.
    policy::load_bytes(&bytes, file).map_err(|d| invalid(&d))?;
    let key = sign
        .map(PrivateKey::load)
        .transpose()
        .map_err(|e| Fatal::Message(format!("--sign: {e}")))?;
    let registry = r.registry().map_err(|e| Fatal::Message(e.to_string()))?;
    let digest = fleet::publish(
        &registry,
        &r,
        Bytes::from(bytes),
        SystemClock.now(),
        key.as_ref(),
    )
    .await
    .map_err(|e| Fatal::Message(format!("{e}; the policy was not published")))?;
    outln!("{digest}")?;
    errln(format_args!(
        "published {} as {r}{}",
        file.display(),
        if key.is_some() { " (signed)" } else { "" }
    ));
    Ok(ExitCode::SUCCESS)
}

fn invalid(d: &policy::Diagnostics) -> Fatal {
    Fatal::Message(format!(
        "invalid policy, nothing published:\n{}",
        d.to_string().trim_end()
    ))
}

/// Where `status` and `reconcile` find the daemon of a registry policy:
/// the last good policy's `control_socket`, else the default.
pub(super) fn control_socket() -> PathBuf {
    let dir = state_dir();
    fleet::last_good::load(&dir)
        .ok()
        .flatten()
        .and_then(|g| policy::load_remote(g.text.as_bytes(), Path::new(&g.source), &dir).ok())
        .map(|p| p.daemon.control_socket)
        .unwrap_or_else(|| PathBuf::from("/run/stowage/control.sock"))
}

/// What `stowage run` adds for a registry policy: the poller, started on
/// the runtime, and what the daemon shares with it.
pub(super) fn start_poller(
    r: PolicyRef,
    opened: &Opened,
    policy: &Policy,
    events: tokio::sync::mpsc::Sender<crate::daemon::Trigger>,
) -> Result<crate::daemon::Remote, Fatal> {
    let status = Arc::new(Mutex::new(opened.status.clone()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let registry = r.registry().map_err(|e| Fatal::Message(e.to_string()))?;
    let poller = Poller {
        r,
        registry,
        key: key()?,
        state_dir: state_dir(),
        interval: policy.daemon.policy_poll,
        current: opened.current.clone(),
        status: status.clone(),
        clock: Arc::new(SystemClock),
        wake: wake.clone(),
    };
    tokio::spawn(poller.run(events));
    Ok(crate::daemon::Remote { status, wake })
}
