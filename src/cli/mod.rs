//! The command line: `check`, `plan`, `apply`, `run`, `reconcile`, `status`,
//! `history`, `pull`, `scan`, `bundle create|verify|import`, `inventory`, `trash`,
//! `restore`, `policy push`, `completions`, `man` (these two in `docs`).
//! `-p` takes a file or `oci://…` (see `remote`).
//!
//! Exit codes follow the spec: 0 success; `plan --exit-code` 1 when actions
//! are pending; `apply` and `pull` 1 when some actions failed; 2 when a
//! command could not run (invalid policy or input, unreachable engine,
//! unreadable files).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::clock::{Clock, SystemClock};
use crate::daemon::{self, control};
use crate::engine::docker::ConnectOptions;
use crate::engine::{DockerEngine, Engine};
use crate::fleet::PolicyRef;
use crate::fmt::human_bytes;
use crate::plan;
use crate::policy::{self, Policy};
use crate::reconcile;
use crate::state::{StateError, StateLock, StateStore};
use crate::status;

const DEFAULT_POLICY: &str = "/etc/stowage/policy.toml";
/// How long `apply` waits for another `apply` that owns the state.
const APPLY_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "stowage",
    version,
    about = "Declarative image lifecycle for Docker hosts"
)]
struct Cli {
    /// Policy file, or a registry policy oci://HOST[:PORT]/REPO:TAG (or @sha256:…)
    /// [default: $STOWAGE_POLICY, then /etc/stowage/policy.toml]
    #[arg(short = 'p', long = "policy", global = true, env = "STOWAGE_POLICY")]
    policy: Option<PathBuf>,
    /// With a registry policy: the state dir (the policy must name the same or none)
    #[arg(
        long,
        global = true,
        env = "STOWAGE_STATE_DIR",
        default_value = "/var/lib/stowage"
    )]
    state_dir: PathBuf,
    /// With a registry policy: accept only policies signed with this public key (PEM)
    #[arg(long, global = true, env = "STOWAGE_POLICY_KEY")]
    policy_key: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the engine: the address, and TLS as the docker CLI's
/// global flags and environment say (see `engine::docker::ConnectOptions`).
#[derive(Debug, clap::Args)]
struct EngineArgs {
    /// Engine address: unix:///PATH, tcp://HOST:PORT, https://HOST:PORT
    /// [default: $DOCKER_HOST, then /var/run/docker.sock, else Podman's /run/podman/podman.sock
    /// or $XDG_RUNTIME_DIR/podman/podman.sock; tcp://localhost:2376 with TLS]
    #[arg(long, global = true, value_name = "URI")]
    engine: Option<String>,
    /// Use TLS to a tcp:// engine, without verifying it; implied by
    /// --tlsverify [default: on when $DOCKER_TLS is set]
    #[arg(long, global = true, value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    tls: Option<bool>,
    /// Use TLS and verify the engine's certificate; given at all (even
    /// =false), TLS is on [default: on when $DOCKER_TLS_VERIFY is set]
    #[arg(long, global = true, value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    tlsverify: Option<bool>,
    /// Trust only engine certificates signed by this CA ('' for the host's CA
    /// store) [default: ca.pem in $DOCKER_CERT_PATH, else ~/.docker]
    #[arg(long, global = true, value_name = "FILE",
          value_parser = clap::builder::OsStringValueParser::new())]
    tlscacert: Option<std::ffi::OsString>,
    /// TLS client certificate [default: cert.pem in $DOCKER_CERT_PATH, else
    /// ~/.docker, when it exists]
    #[arg(long, global = true, value_name = "FILE")]
    tlscert: Option<PathBuf>,
    /// TLS client key [default: key.pem beside the default certificate]
    #[arg(long, global = true, value_name = "FILE")]
    tlskey: Option<PathBuf>,
    /// Send registry credentials to a plain tcp:// engine on another host
    /// (refused otherwise: they would cross the network in clear text)
    #[arg(long, global = true, env = "STOWAGE_ALLOW_PLAINTEXT_CREDENTIALS",
          value_parser = clap::builder::BoolishValueParser::new())]
    allow_plaintext_credentials: bool,
}

impl EngineArgs {
    fn options(&self) -> ConnectOptions {
        ConnectOptions {
            address: self.engine.clone(),
            tls: self.tls,
            tls_verify: self.tlsverify,
            ca_cert: self.tlscacert.clone().map(PathBuf::from),
            cert: self.tlscert.clone(),
            key: self.tlskey.clone(),
            allow_plaintext_credentials: self.allow_plaintext_credentials,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the policy: every error as FILE:LINE:COL, exit 2 when invalid
    Check,
    /// Show what a reconcile would do, with reasons, and what is protected
    Plan {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Exit 1 when actions are pending
        #[arg(long)]
        exit_code: bool,
    },
    /// Run one reconcile
    Apply {
        /// Plan and record, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// The daemon: reconcile on schedule, policy changes and signals
    Run,
    /// Ask the running daemon to reconcile now and wait for the result
    Reconcile {
        /// The daemon's control socket [default: daemon.control_socket of the policy]
        #[arg(long, env = "STOWAGE_CONTROL_SOCKET")]
        control_socket: Option<PathBuf>,
        /// Give up (exit 2) when the daemon has not answered after this long
        /// (e.g. 90s); the reconcile itself may still run. The daemon answers
        /// within 30m, with an error if the reconcile is still running
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
        timeout: std::time::Duration,
    },
    /// Every reference on the host with its verdict and the rule behind it,
    /// and the daemon's view when one runs
    Status {
        #[arg(long)]
        json: bool,
        /// The daemon's control socket [default: daemon.control_socket of the policy]
        #[arg(long, env = "STOWAGE_CONTROL_SOCKET")]
        control_socket: Option<PathBuf>,
    },
    /// Pull one image (a resumable `docker pull` for bad links): by digest,
    /// verified, then tagged; outside the policy (audit rule `cli`)
    Pull {
        /// `repository[:tag][@digest]`; no tag and no digest means `:latest`
        reference: String,
        /// `os/arch[/variant]` of an index [default: the engine's own]
        #[arg(long)]
        platform: Option<String>,
    },
    /// Run the policy's `[[scan]]` admission checks on a local image now
    /// (0 all passed, 1 one failed, 2 could not run)
    Scan {
        /// A local image: `repository:tag`, `repo@digest` or an image id
        reference: String,
    },
    /// Bundles for offline hosts: create, verify, import
    Bundle {
        #[command(subcommand)]
        command: bundle::BundleCommand,
    },
    /// What this host holds (images, references, layers by diff id), as
    /// JSON, for `bundle create --since`
    Inventory {
        /// Write it to this file (atomically) instead of stdout
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// What `[daemon] trash` holds: former references, rule, removed at,
    /// expires, size
    Trash {
        #[arg(long)]
        json: bool,
    },
    /// Put a trashed image's former references back (exit 1, nothing
    /// changed, when it cannot); after its window, pull it back by digest
    Restore {
        /// A former reference, the `stowage-trash/…` reference, or the image id
        target: String,
        /// Hold it out of retention for one trash window (the policy is unchanged)
        #[arg(long)]
        protect: bool,
    },
    /// Registry policies: `stowage policy push FILE oci://HOST/REPO:TAG`
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The audit log, readable
    History {
        /// Only records newer than this (e.g. 2h, 7d)
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Print the completion script for SHELL on stdout (the .deb installs
    /// bash, zsh and fish ones)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (stowage.1, stowage-SUBCOMMAND.1) into DIR, one
    /// path a line on stdout (the .deb installs them)
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate FILE and publish it as an OCI artifact; prints its digest
    Push {
        file: PathBuf,
        /// oci://HOST[:PORT]/REPO:TAG
        reference: String,
        /// Sign it with this private key (PEM, ed25519 or P-256, as openssl writes)
        #[arg(long)]
        sign: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    remote::set_args(remote::RemoteArgs {
        state_dir: Some(cli.state_dir.clone()),
        policy_key: cli.policy_key.clone(),
    });
    let policy_path = cli
        .policy
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY));
    // `check` touches no engine unless one is named with `--engine`.
    let mut checked = None;
    if let Command::Check = cli.command
        && PolicyRef::from_arg(&policy_path).is_none()
    {
        match (check(&policy_path), &cli.engine.engine) {
            (Ok(policy), Some(_)) => checked = Some(policy),
            (Ok(_), None) => return ExitCode::SUCCESS,
            (Err(code), _) => return code,
        }
    }
    // No policy, engine or runtime: output made from the clap definitions.
    match &cli.command {
        Command::Completions { shell } => return docs::completions(*shell),
        Command::Man { out } => return docs::man_pages(out),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(2);
        }
    };
    let code = match checked {
        Some(policy) => runtime.block_on(check_engine(&policy, &cli.engine.options())),
        None => runtime.block_on(run(cli, policy_path)),
    };
    // What is still buffered goes now, under the same rule as every write.
    match finish_output() {
        Ok(()) => code,
        Err(msg) => {
            errln(format_args!("error: {msg}"));
            ExitCode::from(2)
        }
    }
}

/// Set once a write to stdout found its reader gone (`stowage history | head`).
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Writes command output to stdout. A reader that went away is not an
/// error: output stops, the command finishes as it would have and keeps
/// its exit code (a closed pipe is exit 0, as ripgrep has it). Any other
/// write error (a full disk under `> file`) ends the command.
fn emit(args: std::fmt::Arguments<'_>) -> Result<(), Fatal> {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let result = std::io::stdout().lock().write_fmt(args);
    output_result(result)
}

fn finish_output() -> Result<(), Fatal> {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    output_result(std::io::stdout().lock().flush())
}

fn output_result(result: std::io::Result<()>) -> Result<(), Fatal> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(Fatal::Output(e)),
        Ok(()) => Ok(()),
    }
}

/// `true` once nobody reads stdout: long listings stop early.
fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

/// A message on stderr; a closed stderr must not turn it into a panic.
fn errln(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

macro_rules! out {
    ($($arg:tt)*) => { emit(format_args!($($arg)*)) };
}

macro_rules! outln {
    ($($arg:tt)*) => { emit(format_args!("{}\n", format_args!($($arg)*))) };
}

// After the macros: `pull`, `bundle`, `import`, `scan`, `trash` and `remote` use them.
mod bundle;
mod docs;
pub use docs::command;
mod import;
mod pull;
mod remote;
mod scan;
mod trash;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STOWAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes in journald or a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A failure that ends a command with exit 2, printed as one line. The
/// error it came from stays typed and reachable through `source()`.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error("{0}")]
    Message(String),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Reconcile(#[from] reconcile::ReconcileError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Control(#[from] control::ClientError),
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error("cannot encode the answer as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn run(cli: Cli, policy_path: PathBuf) -> ExitCode {
    let engine = cli.engine.options();
    let result = match cli.command {
        Command::Check => match remote::reference(&policy_path) {
            Ok(Some(r)) => remote::check(&r).await,
            Ok(None) => unreachable!("a file policy is checked before the runtime starts"),
            Err(e) => Err(e),
        },
        Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("completions and man pages are written before the runtime starts")
        }
        Command::Policy {
            command:
                PolicyCommand::Push {
                    file,
                    reference,
                    sign,
                },
        } => remote::push(&file, &reference, sign.as_deref()).await,
        Command::Plan { json, exit_code } => cmd_plan(&policy_path, &engine, json, exit_code).await,
        Command::Apply { dry_run } => cmd_apply(&policy_path, &engine, dry_run).await,
        Command::Run => cmd_run(&policy_path, &engine).await,
        Command::Reconcile {
            control_socket,
            timeout,
        } => cmd_reconcile(&policy_path, control_socket, timeout).await,
        Command::Status {
            json,
            control_socket,
        } => cmd_status(&policy_path, &engine, json, control_socket).await,
        Command::History { since, json } => cmd_history(&policy_path, since, json).await,
        Command::Bundle { command } => bundle::cmd_bundle(&policy_path, &engine, command).await,
        Command::Inventory { output } => bundle::cmd_inventory(&engine, output.as_deref()).await,
        Command::Trash { json } => trash::cmd_trash(&policy_path, &engine, json).await,
        Command::Restore { target, protect } => {
            trash::cmd_restore(&policy_path, &engine, &target, protect).await
        }
        Command::Scan { reference } => scan::cmd_scan(&policy_path, &engine, &reference).await,
        Command::Pull {
            reference,
            platform,
        } => pull::cmd_pull(&policy_path, &engine, &reference, platform.as_deref()).await,
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            errln(format_args!("error: {msg}"));
            ExitCode::from(2)
        }
    }
}

fn check(path: &Path) -> Result<Policy, ExitCode> {
    match policy::load(path) {
        Ok(p) => match outln!("{}: {}", path.display(), p.summary()) {
            Ok(()) => Ok(p),
            Err(msg) => {
                errln(format_args!("error: {msg}"));
                Err(ExitCode::from(2))
            }
        },
        Err(diags) => {
            errln(format_args!("{}", diags.to_string().trim_end()));
            Err(ExitCode::from(2))
        }
    }
}

/// `check --engine ADDRESS`: the valid policy against that engine, which
/// engine it is and what differs there for this policy (exit 2 when it
/// does not answer).
async fn check_engine(policy: &Policy, engine: &ConnectOptions) -> ExitCode {
    let shown = async {
        let engine = connect(engine).await?;
        let (header, _) = engine_header(&engine, policy).await?;
        out!("{header}")
    };
    match shown.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            errln(format_args!("error: {msg}"));
            ExitCode::from(2)
        }
    }
}

/// The `engine:` header of `plan`, `status` and `check --engine` (which
/// engine, and what differs there for `policy`), and the same as JSON.
async fn engine_header(
    engine: &DockerEngine,
    policy: &Policy,
) -> Result<(String, serde_json::Value), Fatal> {
    let info = engine.info().await?;
    let logger = engine.event_logger().await;
    let notes = status::engine_notes(info.kind, engine.is_local(), policy, logger.as_deref());
    let json = serde_json::json!({
        "kind": info.kind,
        "version": info.server_version,
        "api_version": info.api_version,
        "address": engine.address(),
        "notes": notes,
    });
    Ok((status::render_engine(&info, engine.address(), &notes), json))
}

/// Load and validate the policy (a file, or `oci://…` with the last good
/// one as the fallback); an invalid one ends the command (exit 2) with
/// every diagnostic printed, before anything touches the engine.
async fn load_policy(path: &Path) -> Result<Policy, Fatal> {
    if let Some(r) = remote::reference(path)? {
        return Ok(remote::open(&r, true, false).await?.policy);
    }
    policy::load(path).map_err(|d| {
        let text = d.to_string();
        Fatal::Message(format!(
            "invalid policy, nothing done:\n{}",
            text.trim_end()
        ))
    })
}

/// Says once, at start, where registry credentials come from: under a
/// service the answer is not obvious (no `HOME`), and a silent miss is a
/// 401 forever.
fn announce_credentials(policy: &Policy) {
    tracing::info!(
        "{}",
        crate::credentials::describe(policy.daemon.credentials_file.as_deref())
    );
}

async fn connect(engine: &ConnectOptions) -> Result<DockerEngine, Fatal> {
    Ok(DockerEngine::connect_with(engine).await?)
}

fn load_state(policy: &Policy, at: DateTime<Utc>) -> crate::state::State {
    let loaded = StateStore::new(&policy.daemon.state_dir).load_readonly(at.timestamp());
    if let Some(w) = loaded.warning {
        tracing::warn!("{w}");
    }
    loaded.state
}

/// What the read-only commands (`plan`, `status` without a daemon) start
/// from: the validated policy, the engine, the state as it is, and a plan.
struct ReadView {
    policy: Policy,
    engine: DockerEngine,
    /// When the view was taken.
    at: DateTime<Utc>,
    state: crate::state::State,
    observed: crate::observe::Observed,
    plan: crate::plan::Plan,
}

async fn plan_here(path: &Path, engine: &ConnectOptions) -> Result<ReadView, Fatal> {
    let policy = load_policy(path).await?;
    let engine = connect(engine).await?;
    let now = SystemClock.now();
    let state = load_state(&policy, now);
    let (observed, plan) = reconcile::plan_now(&engine, &policy, &state, now).await?;
    Ok(ReadView {
        policy,
        engine,
        at: now,
        state,
        observed,
        plan,
    })
}

async fn cmd_plan(
    path: &Path,
    engine: &ConnectOptions,
    json: bool,
    exit_code: bool,
) -> Result<ExitCode, Fatal> {
    let ReadView {
        policy,
        engine,
        at,
        state,
        observed,
        plan,
    } = plan_here(path, engine).await?;
    // Pending pulls and pushes: read-only registry lookups; an unreachable
    // registry shows up in the plan instead of failing it.
    let transfers =
        crate::transfer::preview(&engine, &policy, &observed, &state, at.timestamp()).await;
    let (header, engine_json) = engine_header(&engine, &policy).await?;
    if json {
        let mut value = serde_json::to_value(&plan)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("transfers".into(), serde_json::to_value(&transfers.items)?);
            map.insert("engine".into(), engine_json);
        }
        print_json(&value)?;
    } else {
        out!("{header}")?;
        out!("{}", transfers.render())?;
        out!("{}", plan::render(&plan))?;
    }
    Ok(if exit_code && !(plan.is_empty() && transfers.is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Who runs `apply`'s reconcile: this process, owning the state, or the
/// daemon that owns it (its answer already printed, with the exit code).
enum Owner {
    Here(StateLock),
    Daemon(ExitCode),
}

/// One owner of the state: take its lock; if the daemon holds it, ask the
/// daemon to reconcile (as `stowage reconcile` does); if another `apply`
/// holds it, wait for it up to [`APPLY_LOCK_WAIT`].
async fn own_state(policy: &Policy) -> Result<Owner, Fatal> {
    let store = StateStore::new(&policy.daemon.state_dir);
    match store.try_lock("stowage apply") {
        Ok(lock) => return Ok(Owner::Here(lock)),
        Err(StateError::Held { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let socket = &policy.daemon.control_socket;
    let request = control::Request::Reconcile;
    if let Some(answer) = daemon::ask(socket, &request, request.default_timeout()).await? {
        errln(format_args!(
            "the stowage daemon owns the state in {}: it ran this reconcile",
            store.dir().display()
        ));
        return print_reconcile(answer).map(Owner::Daemon);
    }
    let lock = store
        .lock_within("stowage apply", APPLY_LOCK_WAIT, |holder| {
            errln(format_args!(
                "the state in {} is in use by {holder}; waiting up to {}s for it",
                store.dir().display(),
                APPLY_LOCK_WAIT.as_secs()
            ));
        })
        .await
        .map_err(|e| match e {
            StateError::Held { dir, holder } => Fatal::Message(format!(
                "the state in {} is still in use by {holder} after {}s; nothing done (run `stowage apply` again when it has finished)",
                dir.display(),
                APPLY_LOCK_WAIT.as_secs()
            )),
            e => e.into(),
        })?;
    Ok(Owner::Here(lock))
}

/// SIGTERM or SIGINT stop an `apply` cleanly: transfers in flight are
/// cancelled (their temporary tags removed), a removal in flight finishes,
/// the state is saved. A second signal exits at once (a temporary tag left
/// then is removed by the next run). Returns the signal number seen.
fn stop_on_signals(shutdown: CancellationToken) -> Result<Arc<AtomicI32>, Fatal> {
    use tokio::signal::unix::{SignalKind, signal};
    let seen = Arc::new(AtomicI32::new(0));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let got = seen.clone();
    tokio::spawn(async move {
        loop {
            let (name, number) = tokio::select! {
                Some(()) = term.recv() => ("SIGTERM", signal_hook::consts::SIGTERM),
                Some(()) = int.recv() => ("SIGINT", signal_hook::consts::SIGINT),
                else => return,
            };
            if shutdown.is_cancelled() {
                errln(format_args!("{name} again: exiting now"));
                std::process::exit(128 + number);
            }
            tracing::info!("{name}: stopping the transfer or finishing the action in flight");
            got.store(number, Ordering::SeqCst);
            shutdown.cancel();
        }
    });
    Ok(seen)
}

async fn cmd_apply(path: &Path, engine: &ConnectOptions, dry_run: bool) -> Result<ExitCode, Fatal> {
    let shutdown = CancellationToken::new();
    // First: a signal during the policy load or the connection stops too.
    let signalled = stop_on_signals(shutdown.clone())?;
    let policy = load_policy(path).await?;
    announce_credentials(&policy);
    // A dry run writes no state (it reads it as `plan` does): no owner needed.
    let _owner = if dry_run {
        None
    } else {
        match own_state(&policy).await? {
            Owner::Here(lock) => Some(lock),
            Owner::Daemon(code) => return Ok(code),
        }
    };
    let engine = connect(engine).await?;
    // A one-shot apply checks pre-pull refreshes now, not on their schedule.
    let options = reconcile::Options {
        dry_run,
        force_refresh: true,
    };
    let (plan, report) =
        reconcile::reconcile_with(&engine, &policy, &SystemClock, options, &shutdown).await?;
    // Stopped during the transfers, nothing was planned.
    if !(report.interrupted && plan.is_empty()) {
        out!("{}", plan::render(&plan))?;
    }
    outln!("run {}: {}", report.run, report.summary())?;
    // This process ends here: records the disk would not take go to stderr
    // rather than nowhere.
    for line in audit::take_unwritten(&policy.daemon.audit_log) {
        errln(format_args!("unwritten audit record: {line}"));
    }
    let signal = signalled.load(Ordering::SeqCst);
    // An unsaved state or unwritten records are a failure to report too.
    let unwritten = report.unsaved.is_some() || report.audit_held > 0;
    // Stopped by a signal: 128 + its number, as a shell reports it.
    Ok(if signal != 0 {
        ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
    } else if report.failed > 0 || report.backing_off > 0 || unwritten {
        // A reference backing off after earlier failures is not as declared yet.
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn cmd_run(path: &Path, engine: &ConnectOptions) -> Result<ExitCode, Fatal> {
    let reference = remote::reference(path)?;
    let opened = match &reference {
        Some(r) => Some(remote::open(r, true, true).await?),
        None => None,
    };
    let policy = match &opened {
        Some(o) => o.policy.clone(),
        None => load_policy(path).await?,
    };
    announce_credentials(&policy);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handlers first: a SIGHUP right after start must reload, not kill.
    let shutdown = daemon::sources::signals(tx.clone())?;
    // A registry policy is polled (SIGHUP checks it now); a file is watched.
    let remote = match (reference, &opened) {
        (Some(r), Some(o)) => Some(remote::start_poller(r, o, &policy, tx.clone())?),
        _ => None,
    };
    // Kept alive for the daemon's lifetime; without it SIGHUP still reloads.
    let watched = match remote {
        Some(_) => None,
        None => Some(daemon::sources::watch_policy(path, tx)),
    };
    let _watcher = match watched {
        None => None,
        Some(Ok(w)) => Some(w),
        Some(Err(e)) => {
            tracing::warn!(
                "cannot watch {} for changes ({e}); reload with SIGHUP",
                daemon::sources::policy_folder(path).display()
            );
            None
        }
    };
    let config = daemon::Config {
        policy,
        engine_address: crate::engine::docker::resolve_address(engine),
        clock: std::sync::Arc::new(SystemClock),
        notifier: daemon::notify::Notifier::from_env(),
        metrics: std::sync::Arc::default(),
        remote,
    };
    let engine = engine.clone();
    daemon::run(
        config,
        move || {
            let engine = engine.clone();
            async move { DockerEngine::connect_with(&engine).await }
        },
        rx,
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// The control socket to use: `--control-socket`, else the policy's.
fn control_socket(path: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| match PolicyRef::from_arg(path) {
        Some(_) => remote::control_socket(),
        None => daemon::control_socket_for(path),
    })
}

async fn cmd_reconcile(
    path: &Path,
    socket: Option<PathBuf>,
    timeout: std::time::Duration,
) -> Result<ExitCode, Fatal> {
    let socket = control_socket(path, socket);
    match daemon::ask(&socket, &control::Request::Reconcile, timeout).await? {
        None => Err(Fatal::Message(format!(
            "no stowage daemon answers at {} (is `stowage run` running? `stowage apply` reconciles without one)",
            socket.display()
        ))),
        Some(answer) => print_reconcile(answer),
    }
}

/// Prints the daemon's answer to a `reconcile` request; its exit code.
fn print_reconcile(answer: control::Response) -> Result<ExitCode, Fatal> {
    match answer {
        control::Response::Reconcile { result } => {
            if let Some(e) = &result.error {
                errln(format_args!("error: the reconcile could not run: {e}"));
            } else {
                outln!("run {}: {}", result.run, result.summary)?;
            }
            Ok(ExitCode::from(result.exit_code()))
        }
        control::Response::Error { message } => Err(Fatal::Message(message)),
        other => Err(Fatal::Message(format!(
            "unexpected answer from the daemon: {other:?}"
        ))),
    }
}

async fn cmd_status(
    path: &Path,
    engine: &ConnectOptions,
    json: bool,
    socket: Option<PathBuf>,
) -> Result<ExitCode, Fatal> {
    let socket = control_socket(path, socket);
    let request = control::Request::Status;
    match daemon::ask(&socket, &request, request.default_timeout()).await? {
        Some(control::Response::Status {
            daemon,
            references,
            images,
            references_error,
            trash,
            scans,
        }) => {
            // As `plan` and `apply` say it, from the daemon's reading.
            if let Some(w) = &daemon.state_warning {
                tracing::warn!("{w}");
            }
            if json {
                print_json(&serde_json::json!({
                    "daemon": daemon,
                    "policy": daemon.policy,
                    "engine": daemon.engine,
                    "references": references,
                    "references_error": references_error,
                    "trash": trash,
                    "scans": scans,
                }))?;
                return Ok(ExitCode::SUCCESS);
            }
            let now = SystemClock.now();
            let mut out = status::render_daemon(&daemon, now);
            out.push('\n');
            match (references, references_error) {
                (Some(rows), _) => {
                    out.push_str(&status::render_table(
                        &rows,
                        images.unwrap_or_default(),
                        &daemon.policy,
                        now,
                    ));
                    out.push_str(&status::render_trash(&trash.unwrap_or_default()));
                    if let Some(line) = scans.and_then(status::render_scans) {
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
                (None, e) => out.push_str(&format!(
                    "references not shown: {}\n",
                    e.unwrap_or_else(|| "unknown reason".into())
                )),
            }
            out!("{out}")?;
            Ok(ExitCode::SUCCESS)
        }
        Some(control::Response::Error { message }) => Err(Fatal::Message(message)),
        Some(other) => Err(Fatal::Message(format!(
            "unexpected answer from the daemon: {other:?}"
        ))),
        // No daemon: work from the engine directly.
        None => cmd_status_direct(path, engine, json).await,
    }
}

async fn cmd_status_direct(
    path: &Path,
    engine: &ConnectOptions,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let ReadView {
        policy,
        engine,
        at,
        state,
        observed,
        plan,
    } = plan_here(path, engine).await?;
    let rows = status::rows(&observed, &plan, &state);
    let trash = crate::trash::totals(&observed.images);
    let (header, engine_json) = engine_header(&engine, &policy).await?;
    if json {
        print_json(&serde_json::json!({
            "daemon": null,
            "policy": policy.source,
            "policy_remote": remote::opened(),
            "engine": engine.address(),
            "engine_info": engine_json,
            "references": rows,
            "trash": trash,
            "scans": status::scan_counts(&state),
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let source = remote::opened().map(|r| crate::fleet::render_status(r, at));
    out!(
        "daemon: not running\n{header}{}\n{}{}",
        source.unwrap_or_default(),
        status::render_table(&rows, observed.images.len(), &policy.source, at),
        status::render_trash(&trash)
    )?;
    if let Some(line) = status::scan_line(&state) {
        outln!("{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_history(
    path: &Path,
    since: Option<std::time::Duration>,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let policy = load_policy(path).await?;
    let cutoff = match since {
        None => None,
        Some(d) => Some(since_cutoff(SystemClock.now(), d)?),
    };
    let log = &policy.daemon.audit_log;
    // Streamed line by line: a large log costs no memory.
    let mut records = audit::records(log);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in records.by_ref() {
        let r = r?;
        if cutoff.is_some_and(|c| r.ts < c) {
            continue;
        }
        let written = if json {
            writeln!(out, "{}", serde_json::to_string(&r)?)
        } else {
            writeln!(out, "{}", history_line(&r))
        };
        // A reader that went away ends the listing, not the command.
        output_result(written)?;
        if stdout_gone() {
            break;
        }
    }
    output_result(out.flush())?;
    if records.unreadable() > 0 {
        tracing::warn!(
            "{} unreadable line(s) in {} skipped (a torn line after a crash?)",
            records.unreadable(),
            log.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The time `--since D` reaches back to, or a clear error when that is
/// before any time a record can carry (`--since 300000y`).
fn since_cutoff(
    at: chrono::DateTime<chrono::Utc>,
    since: std::time::Duration,
) -> Result<chrono::DateTime<chrono::Utc>, Fatal> {
    chrono::Duration::from_std(since)
        .ok()
        .and_then(|d| at.checked_sub_signed(d))
        .ok_or_else(|| {
            Fatal::Message(format!(
                "--since {}: reaches back further than any time the audit log can hold; give a shorter duration",
                humantime::format_duration(since)
            ))
        })
}

fn history_line(r: &audit::Record) -> String {
    let mut line = format!(
        "{} {:<8} {:<11} {:<8} {}",
        r.ts.format("%Y-%m-%d %H:%M:%S"),
        r.run.rsplit('-').next().unwrap_or(&r.run),
        r.action.as_str(),
        r.outcome.as_str(),
        r.reference.as_deref().or(r.image.as_deref()).unwrap_or("-"),
    );
    if let Some(rule) = &r.rule {
        line.push_str(&format!("  ({rule}: {})", r.reason));
    } else {
        line.push_str(&format!("  ({})", r.reason));
    }
    if let Some(b) = r.bytes {
        line.push_str(&format!(" [{}]", human_bytes(b)));
    }
    if let Some(e) = &r.error {
        line.push_str(&format!(" error: {e}"));
    }
    line
}

fn print_json<T: Serialize>(value: &T) -> Result<(), Fatal> {
    let text = serde_json::to_string_pretty(value)?;
    outln!("{text}")
}
