//! The transfer part of `stowage plan`: what a reconcile's transfers would
//! do, from read-only registry lookups.

use std::fmt::Write as _;

use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::content::Content;
use super::{
    Candidate, Ctx, PullIntent, PullStep, PushIntent, decide_pull, load_credentials, pull_intents,
    push_intents, push_needed,
};
use crate::engine::Engine;
use crate::fmt::{human_progress, short_digest};
use crate::observe::Observed;
use crate::policy::Policy;
use crate::refs::split_tag;
use crate::state::State;

/// What one line of the transfer part of `stowage plan` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Pull,
    Tag,
    Push,
    /// Backing off after failures.
    Wait,
    /// No registry answered.
    Unknown,
    /// Every candidate is outside `allowed_registries`.
    Refused,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Pull => "pull",
            StepKind::Tag => "tag",
            StepKind::Push => "push",
            StepKind::Wait => "wait",
            StepKind::Unknown => "unknown",
            StepKind::Refused => "refused",
        }
    }
}

/// One line of the transfer part of `stowage plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferStep {
    pub kind: StepKind,
    #[serde(rename = "ref")]
    pub reference: String,
    /// Where from: `repo@sha256:…` for a pull, the local reference for a push.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub rule: String,
    pub reason: String,
    /// For a pull the content store holds part of: how much.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downloaded: Option<Downloaded>,
}

/// How much of an image's download the content store already holds
/// (complete blobs and the committed bytes of partial ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Downloaded {
    pub have: u64,
    pub total: u64,
}

impl Downloaded {
    /// From `(size, bytes held)` per blob of an image; `None` while nothing
    /// is held (a pull from zero shows no progress) or all of it is.
    pub fn of(blobs: impl IntoIterator<Item = (u64, u64)>) -> Option<Downloaded> {
        let (have, total) = blobs
            .into_iter()
            .fold((0u64, 0u64), |(h, t), (size, held)| {
                (h.saturating_add(held.min(size)), t.saturating_add(size))
            });
        (have > 0 && have < total).then_some(Downloaded { have, total })
    }
}

impl TransferStep {
    /// Whether this is work a reconcile would do (for `plan --exit-code`).
    pub fn is_pending(&self) -> bool {
        matches!(
            self.kind,
            StepKind::Pull | StepKind::Tag | StepKind::Push | StepKind::Unknown
        )
    }
}

/// The transfer part of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TransferPlan {
    pub items: Vec<TransferStep>,
}

impl TransferPlan {
    pub fn is_empty(&self) -> bool {
        !self.items.iter().any(TransferStep::is_pending)
    }

    /// Text for people; empty when there is nothing to show.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.items.is_empty() {
            return out;
        }
        out.push_str("transfers\n");
        for i in &self.items {
            let from = i
                .from
                .as_ref()
                .map(|f| format!(" <- {f}"))
                .unwrap_or_default();
            let downloaded = i
                .downloaded
                .map(|d| format!("  {} downloaded", human_progress(d.have, d.total)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<8} {}{from}{downloaded}  ({}: {})",
                i.kind.as_str(),
                i.reference,
                i.rule,
                i.reason
            );
        }
        out
    }
}

/// The transfer part of `stowage plan`: read-only digest lookups (at most
/// `concurrency` at once); an unreachable registry is reported, not fatal.
pub async fn preview<E: Engine>(
    engine: &E,
    policy: &Policy,
    observed: &Observed,
    state: &State,
    now: i64,
) -> TransferPlan {
    let mut plan = TransferPlan::default();
    if policy.prepull.is_empty() && policy.mirror.is_empty() {
        return plan;
    }
    let (creds, creds_error) = load_credentials(policy);
    // Read-only lookups: nothing to cancel cooperatively.
    let never = CancellationToken::new();
    // Partial downloads are read from a content store that exists; `plan`
    // creates none.
    let layout = policy.daemon.cache_dir.join("oci-layout");
    let content = if engine.is_local() && layout.exists() {
        Content::open(policy, policy.daemon.stall_timeout)
            .await
            .inspect_err(|e| tracing::debug!("partial downloads not shown: {e}"))
            .ok()
    } else {
        None
    };
    let ctx = Ctx {
        engine,
        creds: &creds,
        creds_error,
        stall: policy.daemon.stall_timeout,
        shutdown: &never,
        progress: None,
        content: content.as_ref().map(Ok),
        scan: None,
    };
    // `stowage plan` shows what `stowage apply` would do: refresh is due.
    let pulls = pull_intents(policy, observed, state, now, true);
    let pushes = push_intents(policy, observed, state, now);
    for w in pulls.waiting.iter().chain(&pushes.waiting) {
        plan.items.push(TransferStep {
            kind: StepKind::Wait,
            downloaded: None,
            reference: w.reference.clone(),
            from: None,
            rule: w.rule.clone(),
            reason: w.reason(),
        });
    }
    let pull_items: Vec<_> = pulls
        .due
        .iter()
        .map(|intent| preview_pull(&ctx, intent, observed))
        .collect();
    let found: Vec<Option<TransferStep>> = futures_util::stream::iter(pull_items)
        .buffered(policy.daemon.concurrency)
        .collect()
        .await;
    plan.items.extend(found.into_iter().flatten());
    let push_items: Vec<_> = pushes
        .due
        .iter()
        .map(|intent| preview_push(&ctx, intent))
        .collect();
    let found: Vec<Option<TransferStep>> = futures_util::stream::iter(push_items)
        .buffered(policy.daemon.concurrency)
        .collect()
        .await;
    plan.items.extend(found.into_iter().flatten());
    // A pulled image is new to the host: its admission checks are to come.
    for step in &mut plan.items {
        if step.kind == StepKind::Pull
            && crate::scan::any_in_scope(policy, &step.reference, engine.kind().naming())
        {
            step.reason.push_str("; pending scan");
        }
    }
    plan
}

async fn preview_pull<E: Engine>(
    ctx: &Ctx<'_, E>,
    intent: &PullIntent,
    observed: &Observed,
) -> Option<TransferStep> {
    let mut causes = Vec::new();
    let usable: Vec<&Candidate> = intent
        .candidates
        .iter()
        .filter(|c| c.refused.is_none())
        .collect();
    if usable.is_empty() {
        let why: Vec<&str> = intent
            .candidates
            .iter()
            .filter_map(|c| c.refused.as_deref())
            .collect();
        return Some(TransferStep {
            kind: StepKind::Refused,
            downloaded: None,
            reference: intent.reference.clone(),
            from: None,
            rule: intent.rule.clone(),
            reason: why.join("; "),
        });
    }
    if let Some(e) = &ctx.creds_error {
        causes.push(e.clone());
    } else {
        for c in usable {
            let digest = match &intent.pin {
                Some(pin) => pin.clone(),
                None => {
                    let tag = intent
                        .tag_ref
                        .as_deref()
                        .and_then(|t| split_tag(t).1)
                        .unwrap_or("latest");
                    match ctx
                        .lookup(&c.registry, &format!("{}:{tag}", c.repository))
                        .await
                    {
                        Ok(d) => d,
                        Err(e) => {
                            causes.push(format!("{}: {}", c.registry, ctx.scrub(&e.to_string())));
                            continue;
                        }
                    }
                }
            };
            return match decide_pull(intent, c, &digest, observed) {
                PullStep::UpToDate => None,
                PullStep::Retag { image } => Some(TransferStep {
                    kind: StepKind::Tag,
                    downloaded: None,
                    reference: intent.reference.clone(),
                    from: Some(image),
                    rule: intent.rule.clone(),
                    reason: format!(
                        "{}; {} serves {}",
                        intent.reason,
                        c.registry,
                        short_digest(&digest)
                    ),
                }),
                PullStep::Pull { from } => Some(TransferStep {
                    kind: StepKind::Pull,
                    downloaded: match &ctx.content {
                        Some(Ok(store)) => store.downloaded(&intent.key, &digest).await,
                        _ => None,
                    },
                    reference: intent.reference.clone(),
                    from: Some(from),
                    rule: intent.rule.clone(),
                    reason: intent.reason.clone(),
                }),
            };
        }
    }
    Some(TransferStep {
        kind: StepKind::Unknown,
        downloaded: None,
        reference: intent.reference.clone(),
        from: None,
        rule: intent.rule.clone(),
        reason: format!(
            "{}; no registry answered: {}",
            intent.reason,
            causes.join("; ")
        ),
    })
}

async fn preview_push<E: Engine>(ctx: &Ctx<'_, E>, intent: &PushIntent) -> Option<TransferStep> {
    if let Some(why) = &intent.refused {
        return Some(TransferStep {
            kind: StepKind::Refused,
            downloaded: None,
            reference: intent.target.clone(),
            from: Some(intent.source.clone()),
            rule: intent.rule.clone(),
            reason: why.clone(),
        });
    }
    let remote = ctx.lookup(&intent.registry, &intent.target).await;
    let reason = match &remote {
        Ok(d) if !push_needed(intent, Some(d)) => return None,
        Ok(d) => format!("the target holds {}, not this image", short_digest(d)),
        Err(e) => format!(
            "the target lacks it or cannot be asked ({})",
            ctx.scrub(&e.to_string())
        ),
    };
    Some(TransferStep {
        kind: StepKind::Push,
        downloaded: None,
        reference: intent.target.clone(),
        from: Some(intent.source.clone()),
        rule: intent.rule.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::fixtures::D1;

    #[test]
    fn transfer_plan_renders_and_counts_pending() {
        let plan = TransferPlan {
            items: vec![
                TransferStep {
                    kind: StepKind::Pull,
                    downloaded: None,
                    reference: "r/app:1".into(),
                    from: Some(format!("r/app@{D1}")),
                    rule: "prepull:r/app:1".into(),
                    reason: "missing on this host".into(),
                },
                TransferStep {
                    kind: StepKind::Pull,
                    downloaded: Downloaded::of([(50_000_000, 12_000_000), (1_000, 1_000)]),
                    reference: "r/big:1".into(),
                    from: Some(format!("r/big@{D1}")),
                    rule: "cli".into(),
                    reason: "missing on this host".into(),
                },
                TransferStep {
                    kind: StepKind::Wait,
                    downloaded: None,
                    reference: "r/app:2".into(),
                    from: None,
                    rule: "prepull:r/app:2".into(),
                    reason: "backing off".into(),
                },
            ],
        };
        assert!(!plan.is_empty());
        let text = plan.render();
        assert!(
            text.starts_with("transfers\n  pull     r/app:1 <- r/app@sha256:1111"),
            "{text}"
        );
        assert!(
            text.contains("  wait     r/app:2  (prepull:r/app:2: backing off)"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "  pull     r/big:1 <- r/big@{D1}  12.0/50.0 MB downloaded  (cli: missing"
            )),
            "{text}"
        );
        // Nothing held, or everything: no progress to show.
        assert_eq!(Downloaded::of([(10, 0)]), None);
        assert_eq!(Downloaded::of([(10, 10)]), None);
        assert_eq!(
            Downloaded::of([(10, 4), (10, 0)]),
            Some(Downloaded { have: 4, total: 20 })
        );
    }
}
