//! `stowage pull REFERENCE [--platform P]`: one pull outside the policy, as
//! a pre-pull does it, for people on bad links. Progress goes to stderr only
//! when stderr is a terminal; the result is one line on stdout.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{
    ConnectOptions, Fatal, announce_credentials, connect, emit, errln, load_policy, stop_on_signals,
};
use crate::audit::{self, AuditLog};
use crate::clock::{Clock, SystemClock};
use crate::fmt::{human_bytes, short_digest, short_id};
use crate::observe::{self, Observed};
use crate::transfer::{self, PullCounters, PullOutcome, PullProgress};

/// How often the progress line is redrawn at most.
const REDRAW: Duration = Duration::from_millis(200);

pub(super) async fn cmd_pull(
    path: &Path,
    engine: &ConnectOptions,
    reference: &str,
    platform: Option<&str>,
) -> Result<ExitCode, Fatal> {
    let shutdown = CancellationToken::new();
    let signalled = stop_on_signals(shutdown.clone())?;
    let policy = load_policy(path).await?;
    // Bad input is refused before the engine is asked anything.
    let early = transfer::cli_intent(&policy, &Observed::default(), reference, platform)
        .map_err(|e| Fatal::Message(format!("{reference}: {e}; nothing done")))?;
    announce_credentials(&policy);
    crate::registry::prepare_tls(early.candidates.iter().map(|c| c.registry.as_str()));
    let engine = connect(engine).await?;
    let observed = observe::observe(&engine).await?;
    let intent = transfer::cli_intent(&policy, &observed, reference, platform)
        .map_err(|e| Fatal::Message(format!("{reference}: {e}; nothing done")))?;
    let clock = SystemClock;
    let run_id = crate::reconcile::run_id(clock.now());
    let mut audit = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    let phase = transfer::Phase {
        engine: &engine,
        policy: &policy,
        run_id: &run_id,
        options: transfer::RunOptions {
            dry_run: false,
            force_refresh: true,
        },
        clock: &clock,
        shutdown: &shutdown,
    };
    let meter = std::io::stderr()
        .is_terminal()
        .then(|| Meter::new(&intent.reference));
    let tell = |p: PullProgress| {
        if let Some(m) = &meter {
            m.show(p);
        }
    };
    let (outcome, counters) =
        transfer::pull_one(&phase, &intent, &observed, &mut audit, Some(&tell)).await;
    if let Some(m) = &meter {
        m.clear();
    }
    audit.sync().await;
    // This process ends here: records the disk would not take go to stderr.
    for line in audit::take_unwritten(&policy.daemon.audit_log) {
        errln(format_args!("unwritten audit record: {line}"));
    }
    let unwritten = audit.held() > 0;
    let code = match &outcome {
        PullOutcome::UpToDate { digest } => {
            outln!(
                "{}: up to date ({})",
                intent.reference,
                short_digest(digest)
            )?;
            0
        }
        PullOutcome::Pulled { image } => {
            outln!(
                "pulled {} ({}; {})",
                intent.reference,
                short_id(image),
                moved(&counters)
            )?;
            0
        }
        PullOutcome::Tagged { image } => {
            outln!(
                "tagged {} -> {} (already on this host)",
                intent.reference,
                short_id(image)
            )?;
            0
        }
        PullOutcome::Failed { error } => {
            errln(format_args!(
                "error: pull {} failed, host unchanged: {error}",
                intent.reference
            ));
            1
        }
        PullOutcome::Interrupted => 1,
    };
    let signal = signalled.load(Ordering::SeqCst);
    Ok(if signal != 0 {
        // Stopped by a signal: 128 + its number, as a shell reports it.
        ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
    } else if unwritten {
        ExitCode::from(1)
    } else {
        ExitCode::from(code)
    })
}

/// `received 48.0 MB, resumed 12.0 MB`.
fn moved(c: &PullCounters) -> String {
    let mut s = format!("received {}", human_bytes(c.bytes_received));
    if c.resumed_bytes > 0 {
        s.push_str(&format!(", resumed {}", human_bytes(c.resumed_bytes)));
    }
    s
}

/// One progress line on a terminal, redrawn in place.
struct Meter {
    label: String,
    last: Mutex<Option<Instant>>,
}

impl Meter {
    fn new(label: &str) -> Self {
        Meter {
            label: label.to_owned(),
            last: Mutex::new(None),
        }
    }

    fn show(&self, p: PullProgress) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        *last = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{}: {}", self.label, progress_text(p));
        let _ = err.flush();
    }

    fn clear(&self) {
        if self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// `12.0/50.0 MB`, or `12.0 MB` while the size is not known.
fn progress_text(p: PullProgress) -> String {
    match p.total {
        Some(total) if total > 0 => crate::fmt::human_progress(p.done, total),
        _ => human_bytes(p.done),
    }
}
