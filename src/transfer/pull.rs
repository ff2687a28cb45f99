//! One pre-pull job: try each candidate registry in order until one serves
//! the image; the canonical reference moves only after a complete, verified
//! pull by digest.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::content::Content;
use super::{
    Candidate, Ctx, JobResult, OnProgress, Phase, PullCounters, PullIntent, PullStep,
    TransferError, decide_pull, elapsed_ms, load_credentials,
};
use crate::audit::{self, AuditLog, Outcome, Record};
use crate::clock::Clock;
use crate::engine::Engine;
use crate::fmt::short_digest;
use crate::observe::Observed;
use crate::refs::split_tag;

fn pull_record(intent: &PullIntent, run_id: &str, ts: DateTime<Utc>) -> Record {
    Record {
        ts,
        run: run_id.to_owned(),
        action: audit::Action::Pull,
        reference: Some(intent.reference.clone()),
        image: intent.current.clone(),
        rule: Some(intent.rule.clone()),
        reason: intent.reason.clone(),
        outcome: Outcome::Ok,
        error: None,
        bytes: None,
        duration_ms: None,
        resumed_bytes: None,
    }
}

/// One pre-pull: try each candidate registry in order until one serves the
/// image; the canonical reference moves only after a complete, verified pull.
pub(super) async fn pull_job<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PullIntent,
    observed: &Observed,
    run_id: &str,
    dry_run: bool,
    clock: &dyn Clock,
) -> Option<JobResult> {
    // A transfer not started yet is not started at all.
    if ctx.shutdown.is_cancelled() {
        return None;
    }
    Some(pull_once(ctx, intent, observed, run_id, dry_run, clock).await)
}

async fn pull_once<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PullIntent,
    observed: &Observed,
    run_id: &str,
    dry_run: bool,
    clock: &dyn Clock,
) -> JobResult {
    let started = clock.now();
    let mut result = JobResult::new();
    let mut causes: Vec<String> = Vec::new();
    let fail = |mut result: JobResult, causes: Vec<String>| {
        let error = causes.join("; ");
        let mut rec = pull_record(intent, run_id, started);
        rec.outcome = Outcome::Failed;
        rec.error = Some(error.clone());
        rec.duration_ms = elapsed_ms(clock, started);
        if result.counters.bytes_received > 0 {
            rec.bytes = Some(result.counters.bytes_received);
            rec.resumed_bytes = Some(result.counters.resumed_bytes);
        }
        tracing::warn!(rule = %intent.rule, "pull {} failed: {error}", intent.reference);
        result.records.push(rec);
        result.backoff = Some((intent.backoff_key.clone(), Err(error)));
        result
    };
    if let Some(e) = &ctx.creds_error {
        return fail(result, vec![e.clone()]);
    }
    if let Some(Err(e)) = &ctx.content {
        return fail(result, vec![e.clone()]);
    }
    let content = ctx.content.as_ref().and_then(|c| c.as_ref().ok()).copied();
    for c in &intent.candidates {
        if let Some(why) = &c.refused {
            causes.push(format!("{}: refused: {why}", c.registry));
            continue;
        }
        // With a local engine the registry client resolves the reference
        // (and checks a pin); else a pin needs no lookup: the engine checks
        // the content against it.
        let source = match content {
            Some(store) => match store.resolve(ctx, intent, c, &mut result.counters).await {
                Ok(s) => Some(s),
                Err(TransferError::Interrupted) => {
                    return result.interrupted(pull_record(intent, run_id, started), "pull");
                }
                Err(e) => {
                    let mut cause = format!("{}: {}", c.registry, ctx.scrub(&e.to_string()));
                    if let Some(pin) = &intent.pin
                        && intent.tag_ref.is_some()
                        && let Some(d) = store.tag_digest(ctx, intent, c).await
                        && &d != pin
                    {
                        let _ = write!(
                            cause,
                            " (pinned {pin}, the registry's tag now serves {d}: rejected)"
                        );
                    }
                    causes.push(cause);
                    continue;
                }
            },
            None => None,
        };
        let digest = match (&source, &intent.pin) {
            (Some(s), _) => s.digest().to_owned(),
            (None, Some(pin)) => pin.clone(),
            (None, None) => {
                let tagged = format!("{}:{}", c.repository, tag_of(intent));
                match ctx.lookup(&c.registry, &tagged).await {
                    Ok(d) => d,
                    Err(TransferError::Interrupted) => {
                        return result.interrupted(pull_record(intent, run_id, started), "pull");
                    }
                    Err(e) => {
                        causes.push(format!("{}: {}", c.registry, ctx.scrub(&e.to_string())));
                        continue;
                    }
                }
            }
        };
        let step = decide_pull(intent, c, &digest, observed);
        let mut rec = pull_record(intent, run_id, started);
        match &step {
            PullStep::UpToDate => {
                tracing::debug!(
                    "{} is up to date ({})",
                    intent.reference,
                    short_digest(&digest)
                );
                result.backoff = Some((intent.backoff_key.clone(), Ok(())));
                result.up_to_date = Some(digest);
                return result;
            }
            PullStep::Retag { image } => {
                rec.action = audit::Action::Tag;
                rec.image = Some(image.clone());
                rec.reason = format!(
                    "{}; {} serves {}, already on this host",
                    intent.reason,
                    c.registry,
                    short_digest(&digest)
                );
            }
            PullStep::Pull { from } => {
                rec.reason = format!("{}; pulling {from}", intent.reason);
            }
        }
        if dry_run {
            rec.outcome = Outcome::DryRun;
            result.records.push(rec);
            result.dry_run = true;
            return result;
        }
        let mut handed = None;
        let image = match &step {
            PullStep::UpToDate => unreachable!("returned above"),
            PullStep::Retag { image } => image.clone(),
            PullStep::Pull { from } => {
                let got = match (content, &source) {
                    (Some(store), Some(src)) => store
                        .pull(ctx, intent, src, observed, &mut result.counters)
                        .await
                        .map(|h| {
                            let id = h.image.clone();
                            handed = Some(h);
                            id
                        })
                        .map_err(|e| match e {
                            TransferError::Interrupted => Attempt::Interrupted,
                            e => Attempt::Failed(format!(
                                "{}: {}",
                                c.registry,
                                ctx.scrub(&e.to_string())
                            )),
                        }),
                    _ => engine_pull(ctx, intent, c, from, &mut result.counters).await,
                };
                match got {
                    Ok(id) => {
                        rec.bytes = Some(result.counters.bytes_received);
                        rec.resumed_bytes = Some(result.counters.resumed_bytes);
                        result.pulled = Some(id.clone());
                        id
                    }
                    Err(Attempt::Interrupted) => return result.interrupted(rec, "pull"),
                    Err(Attempt::Failed(cause)) => {
                        causes.push(cause);
                        continue;
                    }
                }
            }
        };
        // Admission checks before the reference moves: a blocked image is
        // not tagged, and one this pull brought is removed again.
        if let Some(why) = admission(ctx, intent, &image, run_id, clock, &mut result).await {
            if let (Some(store), Some(h), PullStep::Pull { from }) = (content, handed, &step) {
                store.finish(ctx, intent, c, from, h).await;
            }
            if result.pulled.take().is_some() {
                remove_blocked(ctx, &image).await;
            }
            causes.push(why);
            return fail(result, causes);
        }
        let tagged = match &intent.tag_ref {
            Some(tag_ref) if intent.current.as_deref() != Some(image.as_str()) => ctx
                .engine
                .tag(&image, tag_ref)
                .await
                .map_err(|e| (tag_ref, e)),
            _ => Ok(()),
        };
        // Whatever the tag did: the hand-off's loopback name goes, the
        // upstream's digest reference comes.
        if let (Some(store), Some(h), PullStep::Pull { from }) = (content, handed, &step) {
            store.finish(ctx, intent, c, from, h).await;
        }
        if let Err((tag_ref, e)) = tagged {
            causes.push(format!("tagging {tag_ref}: {e}"));
            continue;
        }
        if intent.tag_ref.is_some() && intent.current.as_deref() != Some(image.as_str()) {
            result.tagged = result.pulled.is_none();
        }
        result.moved = Some((
            intent.key.clone(),
            intent.current.clone(),
            image.clone(),
            intent.keep_previous,
        ));
        rec.image = Some(image);
        rec.duration_ms = elapsed_ms(clock, started);
        tracing::info!(rule = %intent.rule, "{} {}: {}", rec.action.as_str(), intent.reference, rec.reason);
        result.records.push(rec);
        result.backoff = Some((intent.backoff_key.clone(), Ok(())));
        return result;
    }
    fail(result, causes)
}

/// Runs the `[[scan]]` checks on `image` before `intent`'s reference moves
/// to it, their records into `result`; `Some(why)` when one blocks.
async fn admission<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PullIntent,
    image: &str,
    run_id: &str,
    clock: &dyn Clock,
    result: &mut JobResult,
) -> Option<String> {
    let scan = ctx.scan?;
    if intent.current.as_deref() == Some(image) || !scan.in_scope(&intent.reference) {
        return None;
    }
    let arrival = [(intent.reference.clone(), image.to_owned())];
    match crate::scan::admit(scan, &arrival).await {
        Ok(verdicts) => {
            for v in &verdicts {
                result.records.push(v.record(run_id, clock.now()));
            }
            crate::scan::blocking(&verdicts).map(|v| {
                format!(
                    "blocked by scan {:?}: {}; {} not moved",
                    v.rule, v.reason, intent.reference
                )
            })
        }
        Err(e) => Some(format!("admission checks could not run: {e}; not moved")),
    }
}

/// A blocked image this pull brought goes again: nothing else names it
/// (its loopback and upstream digest references go with it).
async fn remove_blocked<E: Engine>(ctx: &Ctx<'_, E>, image: &str) {
    match ctx.engine.remove(image).await {
        Ok(_) => tracing::info!("removed the blocked image {}", crate::fmt::short_id(image)),
        Err(e) => tracing::warn!(
            "cannot remove the blocked image {}: {e}; left untagged",
            crate::fmt::short_id(image)
        ),
    }
}

/// The tag `intent` follows (`latest` for a reference given by digest only).
fn tag_of(intent: &PullIntent) -> &str {
    intent
        .tag_ref
        .as_deref()
        .and_then(|t| split_tag(t).1)
        .unwrap_or("latest")
}

/// Why one candidate's pull did not bring the image.
enum Attempt {
    /// Shutdown: the host is as it was.
    Interrupted,
    /// The cause, for the record (credentials scrubbed).
    Failed(String),
}

/// The engine's own pull of `from` (a remote engine), then the check that
/// the engine lists an image for exactly that digest.
async fn engine_pull<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PullIntent,
    c: &Candidate,
    from: &str,
    counters: &mut PullCounters,
) -> Result<String, Attempt> {
    let (pulled, wire) = ctx
        .pull(&c.registry, from, intent.platform.as_deref())
        .await;
    counters.bytes_received += wire;
    if let Err(e) = pulled {
        if matches!(e, TransferError::Interrupted) {
            return Err(Attempt::Interrupted);
        }
        let mut cause = format!("{}: {}", c.registry, ctx.scrub(&e.to_string()));
        if intent.pin.is_some() {
            // Say what the tag holds now, if the registry tells.
            let tagged = intent.tag_ref.as_deref().and_then(|t| split_tag(t).1);
            if let Some(tag) = tagged
                && let Ok(d) = ctx
                    .lookup(&c.registry, &format!("{}:{tag}", c.repository))
                    .await
                && Some(&d) != intent.pin.as_ref()
            {
                let _ = write!(
                    cause,
                    " (pinned {}, the registry's tag now serves {}: rejected)",
                    intent.pin.as_deref().unwrap_or_default(),
                    d
                );
            }
        }
        return Err(Attempt::Failed(cause));
    }
    // Verify: the engine has an image for exactly that digest (one inspect
    // of `repo@digest`, not a listing).
    let found = match ctx.engine.image(from).await {
        Ok(i) => i.filter(|i| i.repo_digests.iter().any(|d| d == from)),
        Err(e) => return Err(Attempt::Failed(format!("after pulling {from}: {e}"))),
    };
    match found {
        Some(img) => Ok(img.id),
        None => {
            counters.verify_failures += 1;
            Err(Attempt::Failed(
                TransferError::Verify(from.to_owned()).to_string(),
            ))
        }
    }
}

/// What `stowage pull` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    /// The current image already is what the registry serves.
    UpToDate { digest: String },
    /// Pulled by digest, verified, tagged.
    Pulled { image: String },
    /// Another local image was that digest: the reference points at it now.
    Tagged { image: String },
    /// Every candidate failed; the host is as it was.
    Failed { error: String },
    /// Stopped by a signal before it completed; the host is as it was.
    Interrupted,
}

/// `stowage pull REFERENCE`: one pull outside the policy, done as a
/// pre-pull does it (candidates in order, by digest, verified, then tagged)
/// with its audit records (rule `cli`). No backoff or other state is kept:
/// the command is run again by whoever asked. `progress` hears how far the
/// download has come.
pub async fn pull_one<E: Engine>(
    phase: &Phase<'_, E>,
    intent: &PullIntent,
    observed: &Observed,
    audit: &mut AuditLog,
    progress: Option<OnProgress<'_>>,
) -> (PullOutcome, PullCounters) {
    let (creds, creds_error) = load_credentials(phase.policy);
    let daemon = &phase.policy.daemon;
    // Someone waits for this pull: it keeps trying for longer than a
    // reconcile's, which backs off and resumes later.
    let content = if phase.engine.is_local() {
        let give_up = daemon.retry_max.max(daemon.stall_timeout);
        Some(
            Content::open(phase.policy, give_up)
                .await
                .map_err(|e| e.to_string()),
        )
    } else {
        None
    };
    // No verdict cache outside the daemon's state: `stowage pull` scans.
    let admission = (!phase.policy.scan.is_empty()).then(|| {
        crate::scan::Admission::new(
            phase.engine,
            phase.policy,
            std::collections::BTreeMap::new(),
            phase.shutdown.clone(),
        )
    });
    let ctx = Ctx {
        engine: phase.engine,
        creds: &creds,
        creds_error,
        stall: daemon.stall_timeout,
        shutdown: phase.shutdown,
        progress,
        content: content.as_ref().map(|c| c.as_ref().map_err(Clone::clone)),
        scan: admission.as_ref(),
    };
    let r = pull_once(&ctx, intent, observed, phase.run_id, false, phase.clock).await;
    if let Some(Ok(store)) = &content {
        store
            .gc(phase.policy, phase.clock.now().timestamp(), false)
            .await;
    }
    for rec in &r.records {
        audit.append(rec);
    }
    let outcome = if r.interrupted {
        PullOutcome::Interrupted
    } else if let Some(digest) = r.up_to_date {
        PullOutcome::UpToDate { digest }
    } else if let Some(Err(error)) = r.backoff.map(|(_, b)| b) {
        PullOutcome::Failed { error }
    } else {
        match (r.pulled, r.moved) {
            (Some(image), _) => PullOutcome::Pulled { image },
            (None, Some((_, _, image, _))) => PullOutcome::Tagged { image },
            // Every path of `pull_once` ends in one of the above.
            (None, None) => PullOutcome::Failed {
                error: "the pull ended without a result".to_owned(),
            },
        }
    };
    (outcome, r.counters)
}
