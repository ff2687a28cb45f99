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

mod arrive;
mod backoff;
mod content;
mod downloads;
mod intents;
pub(crate) mod layers;
mod preview;
mod pull;
mod push;
mod temp_tags;
mod watch;

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditError, AuditLog, Outcome, Record};
use crate::clock::Clock;
use crate::credentials::CredentialStore;
use crate::engine::{Credentials, Engine, EngineError, Progress};
use crate::observe::{self, Observed};
use crate::policy::Policy;
use crate::state::State;

pub use arrive::{
    Arrival, Arrived, ImportLock, arrive, forget_import, note_import, recover_imports,
};
pub use backoff::{Waiting, next_backoff};
pub use intents::{
    Candidate, PullIntent, PullIntents, PullStep, PushIntent, PushIntents, cli_intent, decide_pull,
    mirror_target, pull_intents, pull_key, push_intents, push_needed, refusal,
};
pub use preview::{Downloaded, StepKind, TransferPlan, TransferStep, preview};
pub use pull::{PullOutcome, pull_one};
pub use temp_tags::TEMP_TAGS_FILE;

use content::Content;
use pull::pull_job;
use push::push_job;
use temp_tags::{TempTags, remove_leftover_tags};
use watch::{Downloads, Watch, watched};

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
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The image config could not be read back or has no diff ids.
    #[error("{0}")]
    Config(String),
    /// The engine could not take the complete image from the content
    /// store's loopback endpoint.
    #[error("handing the image to the engine from the content store ({loopback}): {source}")]
    HandOff {
        loopback: String,
        #[source]
        source: Box<TransferError>,
    },
    /// The content store cannot be used (its folder, its layout).
    #[error("content store: {0}")]
    Unusable(String),
    /// An arriving image failed a `[[scan]]` rule with `on_fail = "block"`
    /// (or its checks could not run): not tagged into place.
    #[error("{0}")]
    Blocked(String),
}

fn last_status(last: &Option<String>) -> String {
    last.as_ref()
        .map(|s| format!(" (last engine status: {s})"))
        .unwrap_or_default()
}

/// How far a pull has come, for a progress line on a terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// Bytes so far: received in this attempt plus what partials already had.
    pub done: u64,
    /// Bytes of all that is to come, when known.
    pub total: Option<u64>,
}

/// Called with each new [`PullProgress`] of a pull.
pub type OnProgress<'a> = &'a (dyn Fn(PullProgress) + Sync);

/// What pulls moved and checked: per reconcile in its report, summed by the
/// daemon for `status` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullCounters {
    /// Bytes received over the network, failed attempts included.
    pub bytes_received: u64,
    /// Bytes that partial downloads already had: not fetched again.
    pub resumed_bytes: u64,
    /// Downloads that failed verification (discarded, never handed on).
    pub verify_failures: u64,
}

impl PullCounters {
    pub fn add(&mut self, other: &PullCounters) {
        self.bytes_received = self.bytes_received.saturating_add(other.bytes_received);
        self.resumed_bytes = self.resumed_bytes.saturating_add(other.resumed_bytes);
        self.verify_failures = self.verify_failures.saturating_add(other.verify_failures);
    }

    pub fn is_zero(&self) -> bool {
        *self == PullCounters::default()
    }
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
    /// Told how far each pull has come (`stowage pull` on a terminal).
    progress: Option<OnProgress<'a>>,
    /// With a local engine, pulls go through the content store; `Err` when
    /// it cannot be used: every pull fails with that rather than going
    /// around it.
    content: Option<Result<&'a Content, String>>,
    /// The `[[scan]]` admission checks; `None` when the policy has none.
    scan: Option<&'a crate::scan::Admission<'a, E>>,
}

impl<E: Engine> Ctx<'_, E> {
    fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.creds.for_registry(registry)
    }

    fn scrub(&self, text: &str) -> String {
        self.creds.scrub(text)
    }

    /// The digest `reference` has at its registry, bounded by the stall
    /// timeout: the engine's look-up, or the registry client's where the
    /// engine has none (Podman).
    async fn lookup(&self, registry: &str, reference: &str) -> Result<String, TransferError> {
        let ask = async {
            match self
                .engine
                .remote_digest(reference, self.credentials(registry))
                .await
            {
                Err(EngineError::Unsupported(_)) => self.registry_digest(registry, reference).await,
                answer => answer.map_err(TransferError::from),
            }
        };
        let asked = tokio::time::timeout(self.stall, ask);
        tokio::select! {
            answer = asked => answer
                .map_err(|_| TransferError::LookupTimeout(self.stall))?,
            () = self.shutdown.cancelled() => Err(TransferError::Interrupted),
        }
    }

    /// The digest `reference` names at `registry`, from a manifest `HEAD`
    /// of stowage's own registry client (the top of an index, as the
    /// engine's look-up answers).
    async fn registry_digest(
        &self,
        registry: &str,
        reference: &str,
    ) -> Result<String, TransferError> {
        let parsed = crate::refs::Reference::parse(reference)
            .map_err(|e| TransferError::Engine(EngineError::Other(format!("{reference}: {e}"))))?;
        let wanted = parsed
            .digest
            .or(parsed.tag)
            .unwrap_or_else(|| "latest".to_owned());
        let options = crate::registry::Options {
            timeout: self.stall,
            ..crate::registry::Options::default()
        };
        let client =
            crate::registry::Registry::new(registry, self.credentials(registry), &options)?;
        Ok(client
            .manifest_digest(&layers::api_path(&parsed.repository), &wanted)
            .await?)
    }

    /// Pull `from`, abandoning it when no progress arrives for the stall
    /// timeout; with the bytes the engine says it downloaded, whatever the
    /// outcome.
    async fn pull(
        &self,
        registry: &str,
        from: &str,
        platform: Option<&str>,
    ) -> (Result<(), TransferError>, u64) {
        self.engine_pull(registry, from, platform, self.progress)
            .await
    }

    /// [`Ctx::pull`] whose progress nobody is told: a hand-off from the
    /// content store or a manifest-only pull, not network downloads.
    async fn pull_quiet(
        &self,
        registry: &str,
        from: &str,
        platform: Option<&str>,
    ) -> (Result<(), TransferError>, u64) {
        self.engine_pull(registry, from, platform, None).await
    }

    async fn engine_pull(
        &self,
        registry: &str,
        from: &str,
        platform: Option<&str>,
        progress: Option<OnProgress<'_>>,
    ) -> (Result<(), TransferError>, u64) {
        let watch = Watch::new();
        let mut downloads = Downloads::default();
        let mut on_progress = |p: &Progress| {
            watch.saw(p);
            downloads.saw(p);
            if let Some(tell) = progress {
                tell(downloads.progress());
            }
        };
        let fut = self
            .engine
            .pull(from, platform, self.credentials(registry), &mut on_progress);
        let result = watched(fut, &watch, self.stall, self.shutdown).await;
        (result, downloads.received())
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
    pub counters: PullCounters,
    /// Blobs `(digest, size)` of downloads into the content store not
    /// finished yet ([`Observed::downloading`]): `[storage]` keeps them.
    pub downloading: Vec<(String, u64)>,
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
    /// The digest the registry serves is the current image's: nothing done.
    up_to_date: Option<String>,
    counters: PullCounters,
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
            up_to_date: None,
            counters: PullCounters::default(),
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

/// What one transfer phase runs with, the same for all its jobs; what it
/// changes (observation, state, audit log) is passed to [`run`] beside it.
pub struct Phase<'a, E: Engine> {
    pub engine: &'a E,
    pub policy: &'a Policy,
    /// The reconcile's run id, in every audit record.
    pub run_id: &'a str,
    pub options: RunOptions,
    pub clock: &'a dyn Clock,
    /// Cancelled at shutdown: lookups and transfers in flight stop at once.
    pub shutdown: &'a CancellationToken,
}

/// The transfer phase of a reconcile: pre-pulls first, then (on the store as
/// the pulls left it) mirror pushes. Updates `state` (backoff, previous
/// images, refresh checks) and writes one audit record per action. Leaves
/// `observed` as the store is after it: a removed leftover tag is taken out
/// of it, and after pulls the engine is listed once (the only listing here).
pub async fn run<E: Engine>(
    phase: &Phase<'_, E>,
    observed: &mut Observed,
    state: &mut State,
    audit: &mut AuditLog,
) -> Result<TransferReport, AuditError> {
    // The verdict cache is lent to the admission checks and given back on
    // every way out.
    let admission = (!phase.policy.scan.is_empty()).then(|| {
        crate::scan::Admission::new(
            phase.engine,
            phase.policy,
            std::mem::take(&mut state.scans),
            phase.shutdown.clone(),
        )
    });
    let result = run_phase(phase, observed, state, audit, admission.as_ref()).await;
    if let Some(a) = admission {
        state.scans = a.into_cache();
    }
    result
}

async fn run_phase<E: Engine>(
    phase: &Phase<'_, E>,
    observed: &mut Observed,
    state: &mut State,
    audit: &mut AuditLog,
    scan: Option<&crate::scan::Admission<'_, E>>,
) -> Result<TransferReport, AuditError> {
    let Phase {
        engine,
        policy,
        run_id,
        options,
        clock,
        shutdown,
    } = *phase;
    let mut report = TransferReport::default();
    // Before anything else, and whatever the policy asks now: a tag left by
    // a killed push must not be taken for a user's reference below.
    let journal = TempTags::load(&policy.daemon.state_dir);
    remove_leftover_tags(phase, &journal, observed, audit, &mut report).await?;
    // Likewise what a killed bundle import left (unless one is running).
    if !options.dry_run && engine.is_local() {
        let undone = arrive::recover_imports(engine, &policy.daemon.state_dir, None).await;
        if !undone.is_empty() {
            tracing::info!("undid an interrupted bundle import: {}", undone.join(", "));
            report.changed = true;
            report.stale = true;
        }
    }
    let content = content_for(engine, policy, policy.daemon.stall_timeout).await;
    if policy.prepull.is_empty() && policy.mirror.is_empty() && content.is_none() {
        return Ok(report);
    }
    let (creds, creds_error) = load_credentials(policy);
    let ctx = Ctx {
        engine,
        creds: &creds,
        creds_error,
        stall: policy.daemon.stall_timeout,
        shutdown,
        progress: None,
        content: content.as_ref().map(|c| c.as_ref().map_err(Clone::clone)),
        scan,
    };
    let now = clock.now().timestamp();
    let store = content.as_ref().and_then(|c| c.as_ref().ok());
    if let Some(store) = store
        && !options.dry_run
    {
        // Upstream digest references earlier hand-offs could not record.
        store.catch_up(&ctx, observed).await;
    }

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
    if let Some(store) = store {
        report.downloading = store.gc(policy, now, options.dry_run).await;
        observed.downloading = report.downloading.clone();
    }
    if shutdown.is_cancelled() {
        report.interrupted = true;
        return Ok(report);
    }

    // Mirrors see what the pulls brought: an edge gateway pulls from its
    // uplink and serves the local mirror in the same reconcile.
    if report.pulled + report.tagged > 0 {
        match observe::observe(engine).await {
            Ok(o) => {
                *observed = o;
                observed.downloading = report.downloading.clone();
            }
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

/// The content store pulls go through: for a local engine, when the policy
/// pulls or an earlier `stowage pull` left work in the store's journal.
/// `Err` (the message) when it cannot be opened.
async fn content_for<E: Engine>(
    engine: &E,
    policy: &Policy,
    give_up: Duration,
) -> Option<Result<Content, String>> {
    let journal = policy.daemon.state_dir.join(downloads::DOWNLOADS_FILE);
    let wanted = !policy.prepull.is_empty() || journal.exists();
    if !engine.is_local() || !wanted {
        return None;
    }
    Some(
        Content::open(policy, give_up)
            .await
            .map_err(|e| e.to_string()),
    )
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
            resumed_bytes: None,
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
    report.counters.add(&r.counters);
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

/// What the unit tests of the transfer modules share.
#[cfg(test)]
mod fixtures {
    use crate::engine::Image;
    use crate::observe::Observed;
    use crate::policy::Policy;

    pub const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    pub const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    pub const NOW: i64 = 1_800_000_000;

    pub fn policy(extra: &str) -> Policy {
        crate::policy::parse(
            &format!("version = 1\n{extra}"),
            std::path::Path::new("p.toml"),
        )
        .unwrap_or_else(|d| panic!("{d}"))
    }

    pub fn image(id: &str, tags: &[&str], digests: &[&str]) -> Image {
        Image {
            id: id.into(),
            repo_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            repo_digests: digests.iter().map(|t| (*t).to_owned()).collect(),
            created: 0,
            size: 10,
        }
    }

    pub fn observed(images: Vec<Image>) -> Observed {
        Observed {
            images,
            ..Observed::default()
        }
    }
}
