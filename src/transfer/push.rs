//! One mirror push job: skip when the target already holds the digest; else
//! tag locally under the target name (journaled first), push, and remove
//! that temporary tag.

use super::temp_tags::{TempTag, TempTags};
use super::{Ctx, JobResult, PushIntent, TransferError, elapsed_ms, push_needed};
use crate::audit::{self, Outcome, Record};
use crate::clock::Clock;
use crate::engine::Engine;
use crate::fmt::short_digest;
use crate::refs::split_tag;

/// One mirror push: skip when the target already holds the digest; else tag
/// locally under the target name, push, and remove that temporary tag.
pub(super) async fn push_job<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PushIntent,
    journal: &TempTags,
    run_id: &str,
    dry_run: bool,
    clock: &dyn Clock,
) -> Option<JobResult> {
    if ctx.shutdown.is_cancelled() {
        return None;
    }
    Some(push_once(ctx, intent, journal, run_id, dry_run, clock).await)
}

async fn push_once<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PushIntent,
    journal: &TempTags,
    run_id: &str,
    dry_run: bool,
    clock: &dyn Clock,
) -> JobResult {
    let started = clock.now();
    let mut result = JobResult::new();
    let mut rec = Record {
        ts: started,
        run: run_id.to_owned(),
        action: audit::Action::Push,
        reference: Some(intent.target.clone()),
        image: Some(intent.image.clone()),
        rule: Some(intent.rule.clone()),
        reason: format!("mirror of {}", intent.source),
        outcome: Outcome::Ok,
        error: None,
        bytes: None,
        duration_ms: None,
        resumed_bytes: None,
    };
    let fail = |result: &mut JobResult, mut rec: Record, error: String| {
        rec.outcome = Outcome::Failed;
        rec.duration_ms = elapsed_ms(clock, started);
        tracing::warn!(rule = %intent.rule, "push {} failed: {error}", intent.target);
        rec.error = Some(error.clone());
        result.records.push(rec);
        result.backoff = Some((intent.key.clone(), Err(error)));
    };
    if let Some(why) = &intent.refused {
        fail(&mut result, rec, format!("refused: {why}"));
        return result;
    }
    if let Some(e) = &ctx.creds_error {
        fail(&mut result, rec, e.clone());
        return result;
    }
    let remote = match ctx.lookup(&intent.registry, &intent.target).await {
        Ok(d) => Some(d),
        Err(TransferError::Interrupted) => return result.interrupted(rec, "push"),
        // Not there yet, or the registry is down: the push finds out which.
        Err(e) => {
            tracing::debug!("lookup {}: {}", intent.target, ctx.scrub(&e.to_string()));
            None
        }
    };
    if !push_needed(intent, remote.as_deref()) {
        result.backoff = Some((intent.key.clone(), Ok(())));
        return result;
    }
    rec.reason = match &remote {
        Some(d) => format!(
            "mirror of {}; the target holds {}",
            intent.source,
            short_digest(d)
        ),
        None => format!("mirror of {}; the target lacks it", intent.source),
    };
    if dry_run {
        rec.outcome = Outcome::DryRun;
        result.records.push(rec);
        result.dry_run = true;
        return result;
    }
    // A failing image is not mirrored onward.
    if let Some(scan) = ctx.scan
        && scan.in_scope(&intent.source)
    {
        let arrival = [(intent.source.clone(), intent.image.clone())];
        let blocked = match crate::scan::admit(scan, &arrival).await {
            Ok(verdicts) => {
                for v in &verdicts {
                    result.records.push(v.record(run_id, clock.now()));
                }
                crate::scan::blocking(&verdicts)
                    .map(|v| format!("blocked by scan {:?}: {}; not pushed", v.rule, v.reason))
            }
            Err(e) => Some(format!("admission checks could not run: {e}; not pushed")),
        };
        if let Some(why) = blocked {
            fail(&mut result, rec, why);
            return result;
        }
    }
    // The last safe point before the host changes.
    if ctx.shutdown.is_cancelled() {
        return result.interrupted(rec, "push");
    }
    if !intent.target_tagged {
        let noted = journal.add(
            &intent.target,
            TempTag {
                image: intent.image.clone(),
                rule: intent.rule.clone(),
            },
        );
        if let Err(e) = noted {
            let error = format!(
                "cannot note the temporary tag {} in {}: {e}; not tagged",
                intent.target,
                TempTags::path_in(&journal.dir).display()
            );
            fail(&mut result, rec, error);
            return result;
        }
        if let Err(e) = ctx.engine.tag(&intent.image, &intent.target).await {
            journal.forget(&intent.target);
            fail(&mut result, rec, format!("tagging {}: {e}", intent.target));
            return result;
        }
    }
    let pushed = ctx.push(&intent.registry, &intent.target).await;
    if pushed.is_ok() && !ctx.engine.kind().records_pushed_digest() {
        // Podman keeps no record of what it pushed (and lists every name
        // with every digest it knows): the registry says.
        match ctx.lookup(&intent.registry, &intent.target).await {
            Ok(digest) => {
                result.mirrored = Some((intent.target.clone(), intent.image.clone(), digest));
            }
            Err(e) => tracing::debug!(
                "pushed {} but cannot read its digest back: {}",
                intent.target,
                ctx.scrub(&e.to_string())
            ),
        }
    } else if pushed.is_ok() {
        // Read the target digest before the temporary tag (and with it the
        // engine's record of that digest) goes.
        let repo = split_tag(&intent.target).0;
        let prefix = format!("{repo}@");
        if let Ok(Some(img)) = ctx.engine.image(&intent.image).await
            && let Some(digest) = img
                .repo_digests
                .iter()
                .find_map(|d| d.strip_prefix(&prefix))
        {
            result.mirrored = Some((
                intent.target.clone(),
                intent.image.clone(),
                digest.to_owned(),
            ));
        }
    }
    // The temporary tag goes whatever happened (shutdown included): it is
    // no one's reference. Left in the journal if that fails, so the next
    // reconcile removes it.
    if !intent.target_tagged {
        match ctx.engine.remove(&intent.target).await {
            Ok(_) => journal.forget(&intent.target),
            Err(e) => tracing::warn!(
                "cannot remove the temporary tag {}: {e}; tried again at the next reconcile",
                intent.target
            ),
        }
    }
    match pushed {
        Err(TransferError::Interrupted) => return result.interrupted(rec, "push"),
        Ok(()) => {
            rec.duration_ms = elapsed_ms(clock, started);
            tracing::info!(rule = %intent.rule, "push {}: {}", intent.target, rec.reason);
            result.records.push(rec);
            result.pushed = true;
            result.backoff = Some((intent.key.clone(), Ok(())));
        }
        Err(e) => fail(&mut result, rec, ctx.scrub(&e.to_string())),
    }
    result
}
