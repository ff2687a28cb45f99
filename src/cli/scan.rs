//! `stowage scan REFERENCE`: the policy's `[[scan]]` rules run now on a
//! local image, verdicts one a line (0 all passed, 1 one failed, 2 could
//! not run). Nothing is cached or changed; each verdict is an audit record.

use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::{ConnectOptions, Fatal, connect, emit, errln, load_policy, stop_on_signals};
use crate::audit::{self, AuditLog};
use crate::clock::{Clock, SystemClock};
use crate::engine::Engine;
use crate::fmt::short_id;
use crate::scan::{self, Admission, Judged};

pub(super) async fn cmd_scan(
    path: &Path,
    engine: &ConnectOptions,
    reference: &str,
) -> Result<ExitCode, Fatal> {
    let shutdown = CancellationToken::new();
    let _signalled = stop_on_signals(shutdown.clone())?;
    let policy = load_policy(path).await?;
    let engine = connect(engine).await?;
    let Some(image) = engine.image(reference).await? else {
        return Err(Fatal::Message(format!(
            "{reference}: no such image on this host; nothing scanned"
        )));
    };
    let admission = Admission::new(&engine, &policy, Default::default(), shutdown);
    if !admission.in_scope(reference) {
        outln!("{reference}: no [[scan]] rule applies")?;
        return Ok(ExitCode::SUCCESS);
    }
    let arrival = [(reference.to_owned(), image.id.clone())];
    let verdicts = scan::admit(&admission, &arrival)
        .await
        .map_err(|e| Fatal::Message(e.to_string()))?;
    let clock = SystemClock;
    let run_id = crate::reconcile::run_id(clock.now());
    let mut log = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    let mut code = 0u8;
    for v in &verdicts {
        log.append(&v.record(&run_id, clock.now()));
        let word = match v.judged {
            Judged::Passed => "pass",
            Judged::Failed => {
                code = 1;
                "FAIL"
            }
            Judged::Error => {
                if code == 0 {
                    code = 2;
                }
                "ERROR"
            }
        };
        outln!(
            "{word} {:?} {reference} ({}): {}",
            v.rule,
            short_id(&v.image),
            if v.reason.is_empty() { "-" } else { &v.reason }
        )?;
    }
    log.sync().await;
    for line in audit::take_unwritten(&policy.daemon.audit_log) {
        errln(format_args!("unwritten audit record: {line}"));
    }
    Ok(ExitCode::from(code))
}
