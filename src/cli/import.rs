//! `stowage bundle import FILE [--expect DIGEST]`: a bundle into the engine,
//! verified first, all or nothing ([`crate::bundle::import`]). One line on
//! stdout for what was done; refusals and failures on stderr, host unchanged.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::{ConnectOptions, Fatal, connect, emit, errln, load_policy, stop_on_signals};
use crate::audit::{self, AuditLog};
use crate::bundle::import::{self, Origin};
use crate::clock::{Clock, SystemClock};
use crate::fmt::{human_bytes, short_id};

pub(super) async fn cmd_import(
    path: &Path,
    engine: &ConnectOptions,
    file: &Path,
    expect: Option<&str>,
) -> Result<ExitCode, Fatal> {
    let shutdown = CancellationToken::new();
    let signalled = stop_on_signals(shutdown.clone())?;
    let policy = load_policy(path).await?;
    let engine = connect(engine).await?;
    let clock = SystemClock;
    let run_id = crate::reconcile::run_id(clock.now());
    let mut audit = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    let run = import::Run {
        engine: &engine,
        policy: &policy,
        clock: &clock,
        run_id: &run_id,
        origin: Origin::Cli,
        shutdown: &shutdown,
    };
    let result = import::import(&run, file, expect, &mut audit).await;
    audit.sync().await;
    for line in audit::take_unwritten(&policy.daemon.audit_log) {
        errln(format_args!("unwritten audit record: {line}"));
    }
    let code = match &result {
        Ok(done) => {
            outln!(
                "imported {} ({}): {}; {} copied into the content store",
                file.display(),
                done.digest,
                done.summary(),
                human_bytes(done.copied)
            )?;
            for (name, id) in done.arrived.brought.iter().chain(&done.arrived.tagged) {
                outln!("  {name} -> {}", short_id(id))?;
            }
            u8::from(audit.held() > 0)
        }
        Err(e) => {
            let what = if e.exit_code() == 2 {
                "cannot import"
            } else {
                "import refused, host unchanged"
            };
            errln(format_args!("error: {what}: {} ({e})", file.display()));
            e.exit_code()
        }
    };
    let signal = signalled.load(Ordering::SeqCst);
    Ok(if signal != 0 {
        ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
    } else {
        ExitCode::from(code)
    })
}
