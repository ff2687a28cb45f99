//! Pre-pulls (`[[prepull]]`) and mirror pushes (`[[mirror]]`): the transfer
//! phase of a reconcile, built for bad uplinks.
//!
//! Split like the rest of stowage into pure decisions and I/O:
//! - [`pull_intents`] and [`push_intents`] (pure): from policy, observed
//!   images, state and `now`, what each entry needs (missing, refresh due,
//!   pin unmet; backing off), with the candidate registries in order;
//! - [`decide_pull`] and [`push_needed`] (pure): given the digest a registry
//!   answered, which steps remain (nothing, a retag, a pull by digest, a push);
//! - [`run`] and [`preview`] (I/O): digest lookups, pulls and pushes through
//!   the [`Engine`], at most `concurrency` at once, each watched for stalls,
//!   with backoff bookkeeping in the [`State`] and one audit record per action.
//!
//! Every pull goes by digest (`repo@sha256:…`) and only then is the canonical
//! tag pointed at the result: the current image stays tagged until the new one
//! is completely pulled and verified, a pin is enforced by the engine's own
//! content check, and pulling from a `sources` registry leaves no
//! source-named tag behind.
//!
//! Shutdown cancels transfers in flight (the engine drops a transfer whose
//! request is closed); what finished stays recorded. A push names the image
//! locally with its target reference, a name the user could have made too, so
//! every such temporary tag is written to a journal in `state_dir` before it
//! exists and removed from it after the tag is gone: a tag that a killed run
//! left is recognised and removed at the next start, never taken for a user's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditError, AuditLog, Outcome, Record};
use crate::clock::Clock;
use crate::credentials::CredentialStore;
use crate::engine::{Credentials, Engine, EngineError, Image, Progress};
use crate::fmt::short_digest;
use crate::observe::{self, Observed};
use crate::policy::{Policy, Prepull, Refresh};
use crate::refs::{self, DEFAULT_REGISTRY, canonical_registry, split_tag};
use crate::state::{Backoff, State};

/// First retry delay; doubles per consecutive failure up to `retry_max`.
const BACKOFF_BASE_SECS: u64 = 10;

// ---------------------------------------------------------------- pure part

/// One registry to try for a pre-pull, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// `host[:port]`.
    pub registry: String,
    /// The repository as named at that registry, e.g. `mirror:5000/library/nginx`.
    pub repository: String,
    /// Why this registry may not be used (`allowed_registries`), if so.
    pub refused: Option<String>,
}

/// What one `[[prepull]]` entry needs this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullIntent {
    /// State key ([`Prepull::key`]).
    pub key: String,
    /// Backoff key ([`pull_key`]).
    pub backoff_key: String,
    /// The canonical reference as written in the policy.
    pub reference: String,
    /// `repo:tag` to point at the result; `None` for an image given by digest.
    pub tag_ref: Option<String>,
    /// Only this manifest digest is accepted (the `digest` pin, or the
    /// digest the image is written with).
    pub pin: Option<String>,
    pub platform: Option<String>,
    pub candidates: Vec<Candidate>,
    /// The image currently holding the reference, if any.
    pub current: Option<String>,
    /// Manifest digests (`sha256:…`) known for the current image.
    pub current_digests: Vec<String>,
    pub keep_previous: usize,
    /// The `rule` field of audit records: `prepull:<image>`.
    pub rule: String,
    /// Why a transfer may be needed, for people.
    pub reason: String,
}

/// What one local reference in a `[[mirror]]` scope needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushIntent {
    /// Backoff key: `push <target>`.
    pub key: String,
    /// The local reference replicated.
    pub source: String,
    /// Its image id.
    pub image: String,
    /// Manifest digests (`sha256:…`) known for the image.
    pub digests: Vec<String>,
    /// `<registry>/[<prefix>/]<path>:<tag>`.
    pub target: String,
    pub registry: String,
    /// Whether `target` already names this image locally (then it is no
    /// temporary tag and stays after the push).
    pub target_tagged: bool,
    pub refused: Option<String>,
    /// The mirror's name.
    pub rule: String,
}

/// A transfer not attempted this reconcile because its reference backs off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiting {
    pub action: &'static str,
    #[serde(rename = "ref")]
    pub reference: String,
    pub rule: String,
    pub failures: u32,
    /// Unix seconds.
    pub next_attempt: i64,
    pub last_error: String,
}

impl Waiting {
    pub fn reason(&self) -> String {
        format!(
            "backing off after {} failure{}: next attempt at {} (last error: {})",
            self.failures,
            if self.failures == 1 { "" } else { "s" },
            DateTime::from_timestamp(self.next_attempt, 0)
                .map_or_else(|| self.next_attempt.to_string(), |t| t.to_rfc3339()),
            self.last_error
        )
    }
}

/// The pre-pulls needed now, and those held back by backoff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullIntents {
    pub due: Vec<PullIntent>,
    pub waiting: Vec<Waiting>,
    /// Keys whose refresh check is due (their `last_checked` moves to now).
    pub checked: Vec<String>,
}

/// The mirror pushes to check now, and those held back by backoff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushIntents {
    pub due: Vec<PushIntent>,
    pub waiting: Vec<Waiting>,
}

/// The digest part of `repo@sha256:…` entries.
fn digests_of(image: &Image) -> Vec<String> {
    let mut v: Vec<String> = image
        .repo_digests
        .iter()
        .filter_map(|d| d.split_once('@').map(|(_, d)| d.to_owned()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether `registry` may be used; `Some(reason)` when it may not.
pub fn refusal(policy: &Policy, registry: &str) -> Option<String> {
    let allowed = policy.daemon.allowed_registries.as_ref()?;
    let canonical = canonical_registry(registry);
    (!allowed.contains(&canonical)).then(|| {
        format!(
            "registry {registry} is not in daemon.allowed_registries [{}]",
            allowed.join(", ")
        )
    })
}

/// The repository as a source registry names it: Docker Hub's official
/// images live under `library/` at any registry that mirrors them.
fn at_registry(source: &str, repository: &str) -> String {
    let path = refs::path_of(repository);
    if refs::registry_of(repository) == DEFAULT_REGISTRY && !path.contains('/') {
        format!("{source}/library/{path}")
    } else {
        format!("{source}/{path}")
    }
}

/// Whether the `refresh` schedule of `p` has fired since its last check.
fn refresh_due(policy: &Policy, p: &Prepull, last_checked: Option<i64>, now: i64) -> bool {
    let schedule = match &p.refresh {
        Refresh::Never => return false,
        Refresh::Daemon => &policy.daemon.schedule,
        Refresh::Cron(c) => c,
    };
    let Some(last) = last_checked.and_then(|t| DateTime::<Utc>::from_timestamp(t, 0)) else {
        return true;
    };
    schedule
        .schedule
        .after(&last)
        .next()
        .is_some_and(|t| t.timestamp() <= now)
}

/// `Some(waiting)` when `key` backs off at `now`.
fn backing_off(
    state: &State,
    key: &str,
    action: &'static str,
    reference: &str,
    rule: &str,
    now: i64,
) -> Option<Waiting> {
    let b = state.backoff.get(key)?;
    (b.next_attempt > now).then(|| Waiting {
        action,
        reference: reference.to_owned(),
        rule: rule.to_owned(),
        failures: b.failures,
        next_attempt: b.next_attempt,
        last_error: b.last_error.clone(),
    })
}

/// The backoff key of a pre-pull. The pin is part of it: changing the pin
/// is a new request, and its first attempt does not wait for the old one's
/// backoff.
pub fn pull_key(p: &Prepull) -> String {
    match &p.digest {
        Some(pin) => format!("pull {} {pin}", p.key()),
        None => format!("pull {}", p.key()),
    }
}

/// What each `[[prepull]]` entry needs. `force_refresh`: treat every refresh
/// as due (a one-shot `stowage apply`).
pub fn pull_intents(
    policy: &Policy,
    observed: &Observed,
    state: &State,
    now: i64,
    force_refresh: bool,
) -> PullIntents {
    let mut out = PullIntents::default();
    for p in &policy.prepull {
        let parsed = match refs::Reference::parse(&p.image) {
            Ok(r) => r,
            // Validation accepted it; a mismatch between the two parsers
            // must not take the reconcile down.
            Err(_) => continue,
        };
        let by_digest = parsed.digest.clone();
        let tag_ref = parsed
            .tag
            .as_ref()
            .map(|t| format!("{}:{t}", parsed.repository));
        let pin = p.digest.clone().or_else(|| by_digest.clone());
        let current = observed.images.iter().find(|i| match &tag_ref {
            Some(t) => i.repo_tags.contains(t),
            None => i.repo_digests.contains(&p.image),
        });
        let current_digests = current.map(digests_of).unwrap_or_default();
        let st = state.prepull.get(&p.key());
        let reason = match (current, &pin) {
            (None, _) => "missing on this host".to_owned(),
            (Some(_), Some(pin)) if !current_digests.contains(pin) => {
                format!("the image under the tag is not the pinned digest {pin}")
            }
            (Some(_), Some(_)) => continue,
            (Some(_), None) => {
                let due = !matches!(p.refresh, Refresh::Never)
                    && (force_refresh
                        || refresh_due(policy, p, st.and_then(|s| s.last_checked), now));
                if !due {
                    continue;
                }
                out.checked.push(p.key());
                "refresh: checking the registry for a newer digest".to_owned()
            }
        };
        let rule = format!("prepull:{}", p.image);
        let key = pull_key(p);
        if let Some(w) = backing_off(state, &key, "pull", &p.image, &rule, now) {
            out.waiting.push(w);
            continue;
        }
        let own = refs::registry_of(&parsed.repository).to_owned();
        let mut candidates: Vec<Candidate> = p
            .sources
            .iter()
            .map(|s| Candidate {
                registry: s.clone(),
                repository: at_registry(s, &parsed.repository),
                refused: refusal(policy, s),
            })
            .collect();
        candidates.push(Candidate {
            refused: refusal(policy, &own),
            registry: own,
            repository: parsed.repository.clone(),
        });
        out.due.push(PullIntent {
            backoff_key: key,
            key: p.key(),
            reference: p.image.clone(),
            tag_ref,
            pin,
            platform: p.platform.clone(),
            candidates,
            current: current.map(|i| i.id.clone()),
            current_digests,
            keep_previous: p.keep_previous,
            rule,
            reason,
        });
    }
    out
}

/// The target of a local reference in a mirror: `<registry>/[<prefix>/]<path>:<tag>`.
pub fn mirror_target(registry: &str, prefix: Option<&str>, repository: &str, tag: &str) -> String {
    let path = refs::path_of(repository);
    match prefix {
        Some(pre) => format!("{registry}/{pre}/{path}:{tag}"),
        None => format!("{registry}/{path}:{tag}"),
    }
}

/// Every local reference in a `[[mirror]]` scope with its target. A
/// reference already at the mirror registry is not replicated onto itself.
pub fn push_intents(policy: &Policy, observed: &Observed, state: &State, now: i64) -> PushIntents {
    let mut out = PushIntents::default();
    let mut seen = std::collections::HashSet::new();
    let mut images: Vec<&Image> = observed.images.iter().collect();
    images.sort_by(|a, b| a.id.cmp(&b.id));
    for m in &policy.mirror {
        let mut refs_in_scope: Vec<(&str, &Image)> = images
            .iter()
            .flat_map(|i| i.repo_tags.iter().map(move |t| (t.as_str(), *i)))
            .collect();
        refs_in_scope.sort_by(|a, b| a.0.cmp(b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        for (reference, image) in refs_in_scope {
            let (repository, Some(tag)) = split_tag(reference) else {
                continue;
            };
            if !m.scope.matches(repository, tag)
                || canonical_registry(refs::registry_of(repository))
                    == canonical_registry(&m.registry)
            {
                continue;
            }
            let target = mirror_target(&m.registry, m.prefix.as_deref(), repository, tag);
            // Two mirrors (or two references) mapping to one target: the first wins.
            if !seen.insert(target.clone()) {
                continue;
            }
            let key = format!("push {target}");
            if let Some(w) = backing_off(state, &key, "push", &target, &m.name, now) {
                out.waiting.push(w);
                continue;
            }
            // The engine drops the target's digest with the temporary tag;
            // the state remembers what was pushed.
            let mut digests = digests_of(image);
            if let Some(m) = state.mirrored.get(&target).filter(|m| m.image == image.id) {
                digests.push(m.digest.clone());
            }
            out.due.push(PushIntent {
                key,
                source: reference.to_owned(),
                image: image.id.clone(),
                digests,
                target_tagged: image.repo_tags.contains(&target),
                target,
                registry: m.registry.clone(),
                refused: refusal(policy, &m.registry),
                rule: m.name.clone(),
            });
        }
    }
    out
}

/// What remains for a pre-pull once a registry answered `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullStep {
    /// The current image already is that digest.
    UpToDate,
    /// Another local image already is that digest: point the tag at it.
    Retag { image: String },
    /// Pull `from` (`repo@sha256:…`), then point the tag at the result.
    Pull { from: String },
}

/// Pure: the step for `intent` when `candidate` serves `digest`.
pub fn decide_pull(
    intent: &PullIntent,
    candidate: &Candidate,
    digest: &str,
    observed: &Observed,
) -> PullStep {
    if intent.current_digests.iter().any(|d| d == digest) {
        return PullStep::UpToDate;
    }
    // Only for a tag: a digest-only reference is satisfied by the digest alone.
    if intent.tag_ref.is_some()
        && let Some(img) = observed
            .images
            .iter()
            .find(|i| digests_of(i).iter().any(|d| d == digest))
    {
        return PullStep::Retag {
            image: img.id.clone(),
        };
    }
    PullStep::Pull {
        from: format!("{}@{digest}", candidate.repository),
    }
}

/// Pure: whether a push is needed when the target answered `remote`.
pub fn push_needed(intent: &PushIntent, remote: Option<&str>) -> bool {
    remote.is_none_or(|r| !intent.digests.iter().any(|d| d == r))
}

/// The next backoff after one more failure: `BASE * 2^(failures-1)`, capped
/// at `retry_max`, with jitter (50–100 %) derived from the key and time, so
/// that hosts of a fleet failing together do not retry together.
pub fn next_backoff(
    previous: Option<&Backoff>,
    key: &str,
    error: &str,
    now: i64,
    retry_max: Duration,
) -> Backoff {
    let failures = previous.map_or(0, |b| b.failures).saturating_add(1);
    let exp = BACKOFF_BASE_SECS.saturating_mul(1u64 << (failures - 1).min(32));
    let capped = exp.min(retry_max.as_secs().max(1));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, failures, now).hash(&mut h);
    let fraction = 0.5 + (h.finish() % 1000) as f64 / 2000.0;
    let delay = ((capped as f64) * fraction).round().max(1.0) as i64;
    Backoff {
        failures,
        next_attempt: now.saturating_add(delay),
        last_error: error.to_owned(),
    }
}

// ------------------------------------------------------------------ the plan

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
            let _ = writeln!(
                out,
                "  {:<8} {}{from}  ({}: {})",
                i.kind.as_str(),
                i.reference,
                i.rule,
                i.reason
            );
        }
        out
    }
}

// -------------------------------------------------------------------- I/O

/// Why one transfer failed. Messages never contain credentials (engine
/// messages are scrubbed before they are stored anywhere).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("stalled: no progress for {}, abandoned{}", humantime::format_duration(*.after), last_status(.last))]
    Stalled {
        after: Duration,
        last: Option<String>,
    },
    #[error("no answer from the registry within {}", humantime::format_duration(*.0))]
    LookupTimeout(Duration),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("pulled {0}, but the engine lists no image for it")]
    Verify(String),
    #[error("interrupted by shutdown")]
    Interrupted,
}

fn last_status(last: &Option<String>) -> String {
    last.as_ref()
        .map(|s| format!(" (last engine status: {s})"))
        .unwrap_or_default()
}

/// Everything a transfer job needs, shared by all jobs of one reconcile.
struct Ctx<'a, E: Engine> {
    engine: &'a E,
    creds: &'a CredentialStore,
    /// Set when the credentials could not be read: every transfer fails
    /// with it rather than going out anonymously.
    creds_error: Option<String>,
    stall: Duration,
    /// Cancelled at shutdown: lookups and transfers in flight stop at once.
    shutdown: &'a CancellationToken,
}

impl<E: Engine> Ctx<'_, E> {
    fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.creds.for_registry(registry)
    }

    fn scrub(&self, text: &str) -> String {
        self.creds.scrub(text)
    }

    /// The digest `reference` has at its registry, bounded by the stall timeout.
    async fn lookup(&self, registry: &str, reference: &str) -> Result<String, TransferError> {
        let asked = tokio::time::timeout(
            self.stall,
            self.engine
                .remote_digest(reference, self.credentials(registry)),
        );
        tokio::select! {
            answer = asked => answer
                .map_err(|_| TransferError::LookupTimeout(self.stall))?
                .map_err(TransferError::from),
            () = self.shutdown.cancelled() => Err(TransferError::Interrupted),
        }
    }

    /// Pull `from`, abandoning it when no progress arrives for the stall timeout.
    async fn pull(
        &self,
        registry: &str,
        from: &str,
        platform: Option<&str>,
    ) -> Result<(), TransferError> {
        let watch = Watch::new();
        let mut on_progress = |p: &Progress| watch.saw(p);
        let fut = self
            .engine
            .pull(from, platform, self.credentials(registry), &mut on_progress);
        watched(fut, &watch, self.stall, self.shutdown).await
    }

    async fn push(&self, registry: &str, reference: &str) -> Result<(), TransferError> {
        let watch = Watch::new();
        let mut on_progress = |p: &Progress| watch.saw(p);
        let fut = self
            .engine
            .push(reference, self.credentials(registry), &mut on_progress);
        watched(fut, &watch, self.stall, self.shutdown).await
    }
}

/// Progress bookkeeping shared by a transfer and its watchdog.
struct Watch {
    inner: Mutex<(Instant, Option<String>)>,
}

impl Watch {
    fn new() -> Self {
        Watch {
            inner: Mutex::new((Instant::now(), None)),
        }
    }

    fn saw(&self, p: &Progress) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The engine's own retry countdown ("Retrying in 5 seconds") is not
        // progress: a transfer cut again and again must still time out.
        if !p.status.starts_with("Retrying") {
            g.0 = Instant::now();
        }
        g.1 = Some(p.status.clone());
    }

    fn idle(&self) -> (Duration, Option<String>) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.0.elapsed(), g.1.clone())
    }
}

/// Drive `fut` while no-progress stays under `stall` and `shutdown` is not
/// cancelled; dropping the future closes the request, which makes the engine
/// cancel the transfer.
async fn watched<F>(
    fut: F,
    watch: &Watch,
    stall: Duration,
    shutdown: &CancellationToken,
) -> Result<(), TransferError>
where
    F: std::future::Future<Output = Result<(), EngineError>>,
{
    let tick = (stall / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    tokio::pin!(fut);
    loop {
        tokio::select! {
            res = &mut fut => return res.map_err(TransferError::from),
            () = shutdown.cancelled() => return Err(TransferError::Interrupted),
            () = tokio::time::sleep(tick) => {
                let (idle, last) = watch.idle();
                if idle >= stall {
                    return Err(TransferError::Stalled { after: stall, last });
                }
            }
        }
    }
}

/// What a reconcile's transfer phase did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    pub pulled: usize,
    pub pushed: usize,
    pub tagged: usize,
    /// Temporary tags an earlier, interrupted push left, removed now.
    pub untagged: usize,
    pub failed: usize,
    /// Not attempted: backing off.
    pub backing_off: usize,
    pub dry_run: usize,
    /// Whether the engine's images changed (the caller notes the
    /// observation again).
    pub changed: bool,
    /// The observation could not be brought up to date after a change: the
    /// caller lists the engine again.
    pub stale: bool,
    pub interrupted: bool,
}

/// The result of one job, applied to the state and the audit log in order.
struct JobResult {
    records: Vec<Record>,
    /// Backoff key and `Err(message)` on failure, `Ok` on success.
    backoff: Option<(String, Result<(), String>)>,
    /// `(prepull key, old image, new image, keep_previous)` when a pull moved a tag.
    moved: Option<(String, Option<String>, String, usize)>,
    pulled: Option<String>,
    pushed: bool,
    /// `(target, image, digest)` after a push whose digest the engine showed.
    mirrored: Option<(String, String, String)>,
    tagged: bool,
    dry_run: bool,
    /// Stopped by shutdown before it completed; the host is as it was.
    interrupted: bool,
}

impl JobResult {
    fn new() -> Self {
        JobResult {
            records: Vec::new(),
            backoff: None,
            moved: None,
            pulled: None,
            pushed: false,
            mirrored: None,
            tagged: false,
            dry_run: false,
            interrupted: false,
        }
    }

    /// A transfer that shutdown stopped: one `skip` record (outcome
    /// `deferred`), no backoff (the uplink is not to blame), retried at the
    /// next reconcile.
    fn interrupted(mut self, mut rec: Record, what: &str) -> Self {
        rec.action = audit::Action::Skip;
        rec.outcome = Outcome::Deferred;
        rec.reason = format!(
            "{what} interrupted by shutdown before it completed, host unchanged; retried at the next reconcile ({})",
            rec.reason
        );
        rec.bytes = None;
        tracing::info!(
            "{}: {}",
            rec.reference.as_deref().unwrap_or("-"),
            rec.reason
        );
        self.records.push(rec);
        self.interrupted = true;
        self
    }
}

/// File in `state_dir` that names the temporary tags mirror pushes made and
/// have not removed yet (JSON: target reference -> [`TempTag`]).
pub const TEMP_TAGS_FILE: &str = "temp-tags.json";

/// One temporary tag a push made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TempTag {
    /// The image it was put on: a tag moved to another image since is no
    /// longer stowage's.
    image: String,
    /// The mirror's name, for the audit record of its removal.
    rule: String,
}

/// The journal of temporary tags. An entry is written (durably) before the
/// tag is made and dropped once the tag is gone, so a kill at any point
/// leaves either no tag or a tag the journal names.
struct TempTags {
    dir: PathBuf,
    entries: Mutex<BTreeMap<String, TempTag>>,
}

impl TempTags {
    fn path_in(dir: &Path) -> PathBuf {
        dir.join(TEMP_TAGS_FILE)
    }

    /// A missing journal is empty; an unreadable one is reported and treated
    /// as empty (its tags then look like the user's: nothing is removed).
    fn load(dir: &Path) -> Self {
        let path = Self::path_in(dir);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is unreadable ({e}); temporary tags it names are left alone",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(
                    "cannot read {} ({e}); temporary tags it names are left alone",
                    path.display()
                );
                BTreeMap::new()
            }
        };
        TempTags {
            dir: dir.to_path_buf(),
            entries: Mutex::new(entries),
        }
    }

    fn entries(&self) -> BTreeMap<String, TempTag> {
        self.lock().clone()
    }

    fn contains(&self, target: &str) -> bool {
        self.lock().contains_key(target)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TempTag>> {
        // Plain data: a panic elsewhere does not make it wrong.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note `target` before it is tagged; the tag must not be made if this fails.
    fn add(&self, target: &str, tag: TempTag) -> std::io::Result<()> {
        let mut entries = self.lock();
        entries.insert(target.to_owned(), tag);
        let written = self.write(&entries);
        if written.is_err() {
            entries.remove(target);
        }
        written
    }

    /// Forget `target` once its tag is gone. A failed write only leaves an
    /// entry whose tag the next start finds gone.
    fn forget(&self, target: &str) {
        let mut entries = self.lock();
        if entries.remove(target).is_some()
            && let Err(e) = self.write(&entries)
        {
            tracing::warn!("cannot update {}: {e}", Self::path_in(&self.dir).display());
        }
    }

    /// Atomically replace the journal (temp file, fsync, rename, fsync of
    /// the folder); an empty journal is no file.
    fn write(&self, entries: &BTreeMap<String, TempTag>) -> std::io::Result<()> {
        let path = Self::path_in(&self.dir);
        if entries.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(format!(".{TEMP_TAGS_FILE}.tmp"));
            let bytes = serde_json::to_vec_pretty(entries).map_err(std::io::Error::other)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

/// Remove the temporary tags that an earlier push could not remove (the
/// process was killed or abandoned it): they are stowage's, never a user's
/// reference. A tag moved to another image since is no longer stowage's and
/// stays. Like the push itself, removing the tag deletes the image when it
/// was its last reference (never forced).
#[allow(clippy::too_many_arguments)]
async fn remove_leftover_tags<E: Engine>(
    engine: &E,
    journal: &TempTags,
    observed: &mut Observed,
    audit: &mut AuditLog,
    run_id: &str,
    dry_run: bool,
    clock: &dyn Clock,
    report: &mut TransferReport,
) -> Result<(), AuditError> {
    for (target, tag) in journal.entries() {
        match engine.image_id_of(&target).await {
            Ok(Some(id)) if id == tag.image => {}
            // Gone, or pointed elsewhere by someone since: not stowage's now.
            Ok(_) => {
                journal.forget(&target);
                continue;
            }
            Err(e) => {
                tracing::warn!("cannot check the leftover temporary tag {target}: {e}");
                continue;
            }
        }
        let started = clock.now();
        let mut rec = Record {
            ts: started,
            run: run_id.to_owned(),
            action: audit::Action::Untag,
            reference: Some(target.clone()),
            image: Some(tag.image.clone()),
            rule: Some(tag.rule.clone()),
            reason: "temporary tag of a mirror push that an earlier run did not finish".into(),
            outcome: Outcome::Ok,
            error: None,
            bytes: None,
            duration_ms: None,
        };
        if dry_run {
            rec.outcome = Outcome::DryRun;
            report.dry_run += 1;
        } else {
            match engine.remove(&target).await {
                Ok(removed) => {
                    observed.removed(&removed);
                    journal.forget(&target);
                    tracing::info!(rule = %tag.rule, "untag {target}: {}", rec.reason);
                    report.untagged += 1;
                    report.changed = true;
                }
                Err(e) => {
                    // Kept in the journal: tried again at the next reconcile.
                    tracing::warn!(rule = %tag.rule, "cannot remove the leftover temporary tag {target}: {e}");
                    rec.outcome = Outcome::Failed;
                    rec.error = Some(e.to_string());
                    report.failed += 1;
                }
            }
            rec.duration_ms = elapsed_ms(clock, started);
        }
        audit.append(&rec);
    }
    Ok(())
}

fn elapsed_ms(clock: &dyn Clock, since: DateTime<Utc>) -> Option<u64> {
    u64::try_from((clock.now() - since).num_milliseconds()).ok()
}

/// Options of one transfer phase.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub dry_run: bool,
    /// Treat every refresh as due (one-shot `apply`).
    pub force_refresh: bool,
}

/// The transfer phase of a reconcile: pre-pulls first, then (on the store as
/// the pulls left it) mirror pushes. Updates `state` (backoff, previous
/// images, refresh checks) and writes one audit record per action. Leaves
/// `observed` as the store is after it: a removed leftover tag is taken out
/// of it, and after pulls the engine is listed once (the only listing here).
#[allow(clippy::too_many_arguments)]
pub async fn run<E: Engine>(
    engine: &E,
    policy: &Policy,
    observed: &mut Observed,
    state: &mut State,
    audit: &mut AuditLog,
    run_id: &str,
    options: RunOptions,
    clock: &dyn Clock,
    shutdown: &CancellationToken,
) -> Result<TransferReport, AuditError> {
    let mut report = TransferReport::default();
    // Before anything else, and whatever the policy asks now: a tag left by
    // a killed push must not be taken for a user's reference below.
    let journal = TempTags::load(&policy.daemon.state_dir);
    remove_leftover_tags(
        engine,
        &journal,
        observed,
        audit,
        run_id,
        options.dry_run,
        clock,
        &mut report,
    )
    .await?;
    if policy.prepull.is_empty() && policy.mirror.is_empty() {
        return Ok(report);
    }
    let (creds, creds_error) = load_credentials(policy);
    let ctx = Ctx {
        engine,
        creds: &creds,
        creds_error,
        stall: policy.daemon.stall_timeout,
        shutdown,
    };
    let now = clock.now().timestamp();

    let pulls = pull_intents(policy, observed, state, now, options.force_refresh);
    // Entries the policy no longer asks for (a pin or an image changed) go.
    let wanted: std::collections::HashSet<String> = policy.prepull.iter().map(pull_key).collect();
    state
        .backoff
        .retain(|k, _| !k.starts_with("pull ") || wanted.contains(k));
    write_waiting(&pulls.waiting, audit, run_id, clock, &mut report)?;
    for key in &pulls.checked {
        if !options.dry_run {
            state.prepull.entry(key.clone()).or_default().last_checked = Some(now);
        }
    }
    // Futures of plain `async fn`s collected first: closures returning async
    // blocks trip the compiler's `Send` inference for the daemon's spawn.
    let jobs: Vec<_> = pulls
        .due
        .iter()
        .map(|intent| pull_job(&ctx, intent, observed, run_id, options.dry_run, clock))
        .collect();
    let mut results = futures_util::stream::iter(jobs).buffer_unordered(policy.daemon.concurrency);
    while let Some(result) = results.next().await {
        apply_result(result, policy, state, audit, clock, &mut report)?;
    }
    drop(results);
    if shutdown.is_cancelled() {
        report.interrupted = true;
        return Ok(report);
    }

    // Mirrors see what the pulls brought: an edge gateway pulls from its
    // uplink and serves the local mirror in the same reconcile.
    if report.pulled + report.tagged > 0 {
        match observe::observe(engine).await {
            Ok(o) => *observed = o,
            Err(e) => {
                tracing::warn!(
                    "cannot list images after pulling: {e}; mirrors wait for the next reconcile"
                );
                // The caller lists again: the pulls changed the store.
                report.stale = true;
                return Ok(report);
            }
        }
    }
    let observed = &*observed;
    let mut pushes = push_intents(policy, observed, state, now);
    // A journaled tag still there (its removal failed) is stowage's too.
    for p in &mut pushes.due {
        p.target_tagged &= !journal.contains(&p.target);
    }
    // Backoff of targets no mirror maps to any more (policy or store changed) goes.
    let targets: std::collections::HashSet<String> = pushes
        .due
        .iter()
        .map(|p| p.key.clone())
        .chain(
            pushes
                .waiting
                .iter()
                .map(|w| format!("push {}", w.reference)),
        )
        .collect();
    state
        .backoff
        .retain(|k, _| !k.starts_with("push ") || targets.contains(k));
    write_waiting(&pushes.waiting, audit, run_id, clock, &mut report)?;
    let jobs: Vec<_> = pushes
        .due
        .iter()
        .map(|intent| push_job(&ctx, intent, &journal, run_id, options.dry_run, clock))
        .collect();
    let mut results = futures_util::stream::iter(jobs).buffer_unordered(policy.daemon.concurrency);
    while let Some(result) = results.next().await {
        apply_result(result, policy, state, audit, clock, &mut report)?;
    }
    Ok(report)
}

fn load_credentials(policy: &Policy) -> (CredentialStore, Option<String>) {
    match CredentialStore::load(policy.daemon.credentials_file.as_deref()) {
        Ok(store) => {
            for host in store.helper_only() {
                tracing::warn!(
                    "credentials for {host} are held by a Docker credential helper, which stowage does not run; \
                     put them in credentials_file to use them"
                );
            }
            (store, None)
        }
        Err(e) => (CredentialStore::default(), Some(e.to_string())),
    }
}

fn write_waiting(
    waiting: &[Waiting],
    audit: &mut AuditLog,
    run_id: &str,
    clock: &dyn Clock,
    report: &mut TransferReport,
) -> Result<(), AuditError> {
    for w in waiting {
        tracing::info!(rule = %w.rule, "skip {} {}: {}", w.action, w.reference, w.reason());
        audit.append(&Record {
            ts: clock.now(),
            run: run_id.to_owned(),
            action: audit::Action::Skip,
            reference: Some(w.reference.clone()),
            image: None,
            rule: Some(w.rule.clone()),
            reason: format!("{} not retried yet: {}", w.action, w.reason()),
            outcome: Outcome::Deferred,
            error: None,
            bytes: None,
            duration_ms: None,
        });
        report.backing_off += 1;
    }
    Ok(())
}

fn apply_result(
    result: Option<JobResult>,
    policy: &Policy,
    state: &mut State,
    audit: &mut AuditLog,
    clock: &dyn Clock,
    report: &mut TransferReport,
) -> Result<(), AuditError> {
    let Some(r) = result else {
        report.interrupted = true;
        return Ok(());
    };
    report.interrupted |= r.interrupted;
    for rec in &r.records {
        audit.append(rec);
    }
    let now = clock.now().timestamp();
    match r.backoff {
        Some((key, Err(error))) => {
            let next = next_backoff(
                state.backoff.get(&key),
                &key,
                &error,
                now,
                policy.daemon.retry_max,
            );
            state.backoff.insert(key, next);
            report.failed += 1;
        }
        Some((key, Ok(()))) => {
            state.backoff.remove(&key);
        }
        None => {}
    }
    if let Some((key, old, new, keep)) = r.moved {
        let ps = state.prepull.entry(key).or_default();
        if let Some(old) = old.filter(|o| *o != new) {
            ps.previous.retain(|p| *p != old);
            ps.previous.insert(0, old);
        }
        ps.previous.retain(|p| *p != new);
        ps.previous.truncate(keep);
    }
    if let Some(id) = &r.pulled {
        state.mark_pulled(id, now);
        report.pulled += 1;
        report.changed = true;
    }
    if r.tagged {
        report.tagged += 1;
        report.changed = true;
    }
    if r.pushed {
        report.pushed += 1;
    }
    if let Some((target, image, digest)) = r.mirrored {
        state
            .mirrored
            .insert(target, crate::state::Mirrored { image, digest });
    }
    if r.dry_run {
        report.dry_run += 1;
    }
    Ok(())
}

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
    }
}

/// One pre-pull: try each candidate registry in order until one serves the
/// image; the canonical reference moves only after a complete, verified pull.
async fn pull_job<E: Engine>(
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
        tracing::warn!(rule = %intent.rule, "pull {} failed: {error}", intent.reference);
        result.records.push(rec);
        result.backoff = Some((intent.backoff_key.clone(), Err(error)));
        result
    };
    if let Some(e) = &ctx.creds_error {
        return fail(result, vec![e.clone()]);
    }
    for c in &intent.candidates {
        if let Some(why) = &c.refused {
            causes.push(format!("{}: refused: {why}", c.registry));
            continue;
        }
        // A pin needs no lookup: the engine checks the content against it.
        let digest = match &intent.pin {
            Some(pin) => pin.clone(),
            None => {
                let tagged = format!(
                    "{}:{}",
                    c.repository,
                    intent
                        .tag_ref
                        .as_deref()
                        .and_then(|t| split_tag(t).1)
                        .unwrap_or("latest")
                );
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
        let image = match step {
            PullStep::UpToDate => unreachable!("returned above"),
            PullStep::Retag { image } => image,
            PullStep::Pull { from } => {
                if let Err(e) = ctx
                    .pull(&c.registry, &from, intent.platform.as_deref())
                    .await
                {
                    if matches!(e, TransferError::Interrupted) {
                        return result.interrupted(rec, "pull");
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
                    causes.push(cause);
                    continue;
                }
                // Verify: the engine has an image for exactly that digest
                // (one inspect of `repo@digest`, not a listing).
                let found = match ctx.engine.image(&from).await {
                    Ok(i) => i.filter(|i| i.repo_digests.contains(&from)),
                    Err(e) => {
                        causes.push(format!("after pulling {from}: {e}"));
                        continue;
                    }
                };
                match found {
                    Some(img) => {
                        rec.bytes = Some(img.size);
                        result.pulled = Some(img.id.clone());
                        img.id.clone()
                    }
                    None => {
                        causes.push(TransferError::Verify(from.clone()).to_string());
                        continue;
                    }
                }
            }
        };
        if let Some(tag_ref) = &intent.tag_ref
            && intent.current.as_deref() != Some(image.as_str())
        {
            if let Err(e) = ctx.engine.tag(&image, tag_ref).await {
                causes.push(format!("tagging {tag_ref}: {e}"));
                continue;
            }
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

/// One mirror push: skip when the target already holds the digest; else tag
/// locally under the target name, push, and remove that temporary tag.
async fn push_job<E: Engine>(
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
    if pushed.is_ok() {
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
    let ctx = Ctx {
        engine,
        creds: &creds,
        creds_error,
        stall: policy.daemon.stall_timeout,
        shutdown: &never,
    };
    // `stowage plan` shows what `stowage apply` would do: refresh is due.
    let pulls = pull_intents(policy, observed, state, now, true);
    let pushes = push_intents(policy, observed, state, now);
    for w in pulls.waiting.iter().chain(&pushes.waiting) {
        plan.items.push(TransferStep {
            kind: StepKind::Wait,
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
        reference: intent.target.clone(),
        from: Some(intent.source.clone()),
        rule: intent.rule.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PrepullState;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const NOW: i64 = 1_800_000_000;

    fn policy(extra: &str) -> Policy {
        crate::policy::parse(
            &format!("version = 1\n{extra}"),
            std::path::Path::new("p.toml"),
        )
        .unwrap_or_else(|d| panic!("{d}"))
    }

    fn image(id: &str, tags: &[&str], digests: &[&str]) -> Image {
        Image {
            id: id.into(),
            repo_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            repo_digests: digests.iter().map(|t| (*t).to_owned()).collect(),
            created: 0,
            size: 10,
        }
    }

    fn observed(images: Vec<Image>) -> Observed {
        Observed {
            images,
            ..Observed::default()
        }
    }

    #[test]
    fn temp_tag_journal_is_durable_and_no_file_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let journal = TempTags::load(&state_dir);
        let tag = TempTag {
            image: "sha256:a".into(),
            rule: "edge".into(),
        };
        journal.add("m:5000/app:1", tag.clone()).unwrap();
        journal.add("m:5000/app:2", tag.clone()).unwrap();
        journal.forget("m:5000/app:2");
        // What a later process finds.
        let again = TempTags::load(&state_dir);
        assert_eq!(
            again.entries().into_iter().collect::<Vec<_>>(),
            [("m:5000/app:1".to_owned(), tag)]
        );
        again.forget("m:5000/app:1");
        assert!(!state_dir.join(TEMP_TAGS_FILE).exists());
        // A torn journal names nothing: its tags are left alone.
        std::fs::write(state_dir.join(TEMP_TAGS_FILE), b"{\"m:5000/a").unwrap();
        assert!(TempTags::load(&state_dir).entries().is_empty());
    }

    #[test]
    fn missing_image_is_due_with_sources_first_and_library_paths() {
        let p = policy(
            r#"[[prepull]]
image = "nginx:1.25"
sources = ["mirror.local:5000", "127.0.0.1:6000"]
"#,
        );
        let i = pull_intents(&p, &observed(vec![]), &State::default(), NOW, false);
        assert_eq!(i.due.len(), 1);
        let due = &i.due[0];
        assert_eq!(due.reason, "missing on this host");
        let repos: Vec<&str> = due
            .candidates
            .iter()
            .map(|c| c.repository.as_str())
            .collect();
        assert_eq!(
            repos,
            [
                "mirror.local:5000/library/nginx",
                "127.0.0.1:6000/library/nginx",
                "nginx"
            ]
        );
        assert_eq!(due.tag_ref.as_deref(), Some("nginx:1.25"));
    }

    #[test]
    fn present_image_refreshes_on_schedule_or_when_forced_never_with_never() {
        let p = policy(
            r#"[[prepull]]
image = "r.local/app:1"
refresh = "0 0 * * * *"

[[prepull]]
image = "r.local/app:2"
refresh = "never"
"#,
        );
        let obs = observed(vec![
            image(
                "sha256:a",
                &["r.local/app:1"],
                &[&format!("r.local/app@{D1}")],
            ),
            image("sha256:b", &["r.local/app:2"], &[]),
        ]);
        let mut st = State::default();
        // Checked 10 minutes ago; the hourly schedule has not fired since.
        st.prepull.insert(
            "r.local/app:1".into(),
            PrepullState {
                previous: vec![],
                last_checked: Some(NOW - (NOW % 3600) + 1),
            },
        );
        let later = NOW - (NOW % 3600) + 1800;
        assert!(pull_intents(&p, &obs, &st, later, false).due.is_empty());
        let forced = pull_intents(&p, &obs, &st, later, true);
        assert_eq!(forced.due.len(), 1);
        assert_eq!(forced.checked, ["r.local/app:1"]);
        // Past the next full hour, the schedule has fired.
        let next_hour = NOW - (NOW % 3600) + 3600 + 5;
        assert_eq!(pull_intents(&p, &obs, &st, next_hour, false).due.len(), 1);
    }

    #[test]
    fn pin_is_checked_without_refresh() {
        let p = policy(&format!(
            "[[prepull]]\nimage = \"r.local/app:1\"\ndigest = \"{D2}\"\nrefresh = \"never\"\n"
        ));
        let obs = observed(vec![image(
            "sha256:a",
            &["r.local/app:1"],
            &[&format!("r.local/app@{D1}")],
        )]);
        let i = pull_intents(&p, &obs, &State::default(), NOW, false);
        assert_eq!(i.due.len(), 1);
        assert_eq!(i.due[0].pin.as_deref(), Some(D2));
        assert_eq!(
            decide_pull(&i.due[0], &i.due[0].candidates[0], D2, &obs),
            PullStep::Pull {
                from: format!("r.local/app@{D2}")
            }
        );
        // Pin met: nothing to do.
        let obs = observed(vec![image(
            "sha256:a",
            &["r.local/app:1"],
            &[&format!("r.local/app@{D2}")],
        )]);
        assert!(
            pull_intents(&p, &obs, &State::default(), NOW, true)
                .due
                .is_empty()
        );
    }

    #[test]
    fn decide_pull_up_to_date_retag_or_pull() {
        let p = policy("[[prepull]]\nimage = \"r.local/app:1\"\n");
        let obs = observed(vec![
            image(
                "sha256:a",
                &["r.local/app:1"],
                &[&format!("r.local/app@{D1}")],
            ),
            // A previous image, now dangling, that the registry serves again.
            image("sha256:b", &[], &[&format!("r.local/app@{D2}")]),
        ]);
        let i = &pull_intents(&p, &obs, &State::default(), NOW, true).due[0];
        let c = &i.candidates[0];
        assert_eq!(decide_pull(i, c, D1, &obs), PullStep::UpToDate);
        assert_eq!(
            decide_pull(i, c, D2, &obs),
            PullStep::Retag {
                image: "sha256:b".into()
            }
        );
        let d3 = format!("sha256:{}", "3".repeat(64));
        assert_eq!(
            decide_pull(i, c, &d3, &obs),
            PullStep::Pull {
                from: format!("r.local/app@{d3}")
            }
        );
    }

    #[test]
    fn allowed_registries_refuse_the_fallback_at_run_time() {
        let p = policy(
            r#"[daemon]
allowed_registries = ["mirror.local:5000"]
[[prepull]]
image = "r.local/app:1"
sources = ["mirror.local:5000"]
"#,
        );
        let i = pull_intents(&p, &observed(vec![]), &State::default(), NOW, false);
        let c = &i.due[0].candidates;
        assert_eq!(c[0].refused, None);
        assert!(
            c[1].refused
                .as_deref()
                .unwrap()
                .contains("registry r.local is not in daemon.allowed_registries"),
            "{c:?}"
        );
    }

    #[test]
    fn backoff_holds_a_reference_back_and_grows_to_the_cap() {
        let p = policy("[daemon]\nretry_max = \"1m\"\n[[prepull]]\nimage = \"r.local/app:1\"\n");
        let mut st = State::default();
        let b1 = next_backoff(None, "pull r.local/app:1", "down", NOW, p.daemon.retry_max);
        assert_eq!(b1.failures, 1);
        assert!((NOW + 5..=NOW + 10).contains(&b1.next_attempt), "{b1:?}");
        let mut b = b1.clone();
        for _ in 0..10 {
            b = next_backoff(
                Some(&b),
                "pull r.local/app:1",
                "down",
                NOW,
                p.daemon.retry_max,
            );
        }
        assert!((NOW + 30..=NOW + 60).contains(&b.next_attempt), "{b:?}");
        st.backoff.insert("pull r.local/app:1".into(), b1.clone());
        let i = pull_intents(&p, &observed(vec![]), &st, NOW + 1, false);
        assert!(i.due.is_empty());
        assert_eq!(i.waiting.len(), 1);
        assert!(i.waiting[0].reason().contains("last error: down"));
        let i = pull_intents(&p, &observed(vec![]), &st, b1.next_attempt, false);
        assert_eq!(i.due.len(), 1);
    }

    #[test]
    fn mirror_targets_and_skips() {
        let p = policy(
            r#"[[mirror]]
name = "edge"
registry = "127.0.0.1:7000"
prefix = "cache"
images = ["**"]
"#,
        );
        let obs = observed(vec![
            image(
                "sha256:a",
                &["r.local/team/app:1", "127.0.0.1:7000/cache/team/app:1"],
                &[&format!("r.local/team/app@{D1}")],
            ),
            image("sha256:b", &["nginx:1.25"], &[]),
        ]);
        let i = push_intents(&p, &obs, &State::default(), NOW);
        let targets: Vec<(&str, bool)> = i
            .due
            .iter()
            .map(|d| (d.target.as_str(), d.target_tagged))
            .collect();
        assert_eq!(
            targets,
            [
                ("127.0.0.1:7000/cache/nginx:1.25", false),
                ("127.0.0.1:7000/cache/team/app:1", true)
            ]
        );
        let app = &i.due[1];
        assert!(!push_needed(app, Some(D1)));
        assert!(push_needed(app, Some(D2)));
        assert!(push_needed(app, None));
    }

    #[test]
    fn transfer_plan_renders_and_counts_pending() {
        let plan = TransferPlan {
            items: vec![
                TransferStep {
                    kind: StepKind::Pull,
                    reference: "r/app:1".into(),
                    from: Some(format!("r/app@{D1}")),
                    rule: "prepull:r/app:1".into(),
                    reason: "missing on this host".into(),
                },
                TransferStep {
                    kind: StepKind::Wait,
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
    }
}
