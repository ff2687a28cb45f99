//! Admission checks (`[[scan]]`): every image that arrives (a pre-pull, a
//! `stowage pull`, a bundle import) is scanned *before* its reference moves
//! to it, and every image about to be mirrored before it is pushed.
//!
//! - [`admit`]: the one entry point, for the transfer jobs and the bundle
//!   import: runs each rule in scope of each `(reference, image id)` and
//!   returns the verdicts; [`blocking`] says whether one of them keeps the
//!   image out.
//! - `run`: an external command, bounded (output, time; the process group
//!   killed at the timeout).
//! - `secrets`: `builtin:secrets`, stowage's own scan of the layers.
//!
//! `{archive}` is the engine's export of the image (`Engine::export`),
//! written under `<state_dir>/scan/` only when a rule in scope uses it (or is
//! `builtin:secrets`), shared by those rules and deleted afterwards.
//! Verdicts are cached per image id and command (a hash of the argv, and of
//! the rules file for the built-in) in the state: an image is scanned once.
//! Could-not-run results (export failed, program missing, timeout) are not
//! cached: they are tried again at the next arrival. They fail the check.

pub mod run;
pub mod secrets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Outcome, Record};
use crate::engine::Engine;
use crate::fmt::short_id;
use crate::policy::{OnFail, Policy, Scan};
use crate::refs::Naming;
use crate::refs::Reference;
use crate::state::ScanVerdict;

/// Folder of the exports under `state_dir`.
const WORK_DIR: &str = "scan";
/// Verdicts kept in the state at most (the oldest go first): a host that
/// sees many images does not grow its state without end.
const CACHE_MAX: usize = 10_000;
/// Makes each export's file name unique within the process (two jobs may
/// admit the same image at once).
static EXPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Why the admission checks could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("scan work folder {}: {source}", .path.display())]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How one rule judged one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    Passed,
    Failed,
    /// Could not run (export, spawn, timeout, shutdown): fails the check,
    /// is not cached.
    Error,
}

/// One rule's verdict on one arriving image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub rule: String,
    pub reference: String,
    pub image: String,
    pub judged: Judged,
    /// The command's first line of output, or the secrets found (kind,
    /// file, line), or why it could not run. Never a secret.
    pub reason: String,
    pub on_fail: OnFail,
    /// From the cache: nothing ran now.
    pub cached: bool,
}

impl Verdict {
    /// Keeps the image out: a `block` rule that did not pass.
    pub fn blocks(&self) -> bool {
        self.on_fail == OnFail::Block && self.judged != Judged::Passed
    }

    /// The audit record `scan` (outcome `ok`/`failed`).
    pub fn record(&self, run_id: &str, ts: DateTime<Utc>) -> Record {
        let failed = self.judged != Judged::Passed;
        Record {
            ts,
            run: run_id.to_owned(),
            action: audit::Action::Scan,
            reference: Some(self.reference.clone()),
            image: Some(self.image.clone()),
            rule: Some(self.rule.clone()),
            reason: self.reason.clone(),
            outcome: if failed { Outcome::Failed } else { Outcome::Ok },
            error: failed.then(|| match (self.judged, self.on_fail) {
                (Judged::Error, _) => "could not run".to_owned(),
                (_, OnFail::Block) => "failed: blocked".to_owned(),
                (_, OnFail::Warn) => "failed: on_fail = warn, admitted".to_owned(),
            }),
            bytes: None,
            duration_ms: None,
            resumed_bytes: None,
        }
    }
}

/// The first verdict that keeps the image out, if any.
pub fn blocking(verdicts: &[Verdict]) -> Option<&Verdict> {
    verdicts.iter().find(|v| v.blocks())
}

/// What admission checks run with: the engine, the rules, the verdict
/// cache (taken from the state, given back with [`Admission::into_cache`]).
pub struct Admission<'a, E: Engine> {
    pub engine: &'a E,
    pub rules: &'a [Scan],
    pub work_dir: PathBuf,
    pub shutdown: CancellationToken,
    cache: Mutex<BTreeMap<String, ScanVerdict>>,
    /// Commands run (not cached), for tests and `status`.
    ran: std::sync::atomic::AtomicU64,
}

impl<'a, E: Engine> Admission<'a, E> {
    pub fn new(
        engine: &'a E,
        policy: &'a Policy,
        cache: BTreeMap<String, ScanVerdict>,
        shutdown: CancellationToken,
    ) -> Self {
        Admission {
            engine,
            rules: &policy.scan,
            work_dir: policy.daemon.state_dir.join(WORK_DIR),
            shutdown,
            cache: Mutex::new(cache),
            ran: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether any rule applies to `reference`.
    pub fn in_scope(&self, reference: &str) -> bool {
        self.rules
            .iter()
            .any(|r| applies(r, reference, self.engine.kind().naming()))
    }

    /// Scans that ran (not answered from the cache).
    pub fn ran(&self) -> u64 {
        self.ran.load(Ordering::Relaxed)
    }

    /// Whether `image` still waits for a verdict of some rule on `reference`.
    pub fn pending(&self, reference: &str, image: &str) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        self.rules
            .iter()
            .filter(|r| applies(r, reference, self.engine.kind().naming()))
            .any(|r| !cache.contains_key(&cache_key(image, &r.command)))
    }

    /// The verdict cache, for the state.
    pub fn into_cache(self) -> BTreeMap<String, ScanVerdict> {
        let mut cache = self.cache.into_inner().unwrap_or_else(|p| p.into_inner());
        if cache.len() > CACHE_MAX {
            let mut ages: Vec<i64> = cache.values().map(|v| v.at).collect();
            ages.sort_unstable();
            let cutoff = ages[cache.len() - CACHE_MAX];
            cache.retain(|_, v| v.at >= cutoff);
        }
        cache
    }
}

/// Whether any `[[scan]]` rule of `policy` applies to `reference` (`plan`'s
/// "pending scan").
pub fn any_in_scope(policy: &Policy, reference: &str, naming: Naming) -> bool {
    policy.scan.iter().any(|r| applies(r, reference, naming))
}

fn applies(rule: &Scan, reference: &str, naming: Naming) -> bool {
    match Reference::parse(reference) {
        Ok(r) => rule
            .scope
            .matches(&r.repository, r.tag.as_deref().unwrap_or(""), naming),
        // An unparsable name is in scope of a rule for every repository.
        Err(_) => rule.scope.tags.is_none(),
    }
}

/// The cache key of `command` on `image`: the argv, and for the built-in
/// the rules it ran with (new rules scan again).
pub fn cache_key(image: &str, command: &[String]) -> String {
    let mut h = Sha256::new();
    for a in command {
        h.update(a.as_bytes());
        h.update([0]);
    }
    if command.len() == 1 && command[0] == crate::policy::BUILTIN_SECRETS {
        h.update(secrets::RULES_TOML.as_bytes());
    }
    format!("{image} {}", &hex::encode(h.finalize())[..16])
}

/// Runs every `[[scan]]` rule in scope of each arrival `(reference, image
/// id)` and returns the verdicts (cached ones included), in rule order.
/// The caller tags only when [`blocking`] finds none; it writes the
/// verdicts' [`Verdict::record`]s to the audit log.
pub async fn admit<E: Engine>(
    ctx: &Admission<'_, E>,
    arrivals: &[(String, String)],
) -> Result<Vec<Verdict>, ScanError> {
    let mut out = Vec::new();
    for (reference, image) in arrivals {
        let naming = ctx.engine.kind().naming();
        let rules: Vec<&Scan> = ctx
            .rules
            .iter()
            .filter(|r| applies(r, reference, naming))
            .collect();
        let mut archive: Option<Result<Export, String>> = None;
        for rule in rules {
            let key = cache_key(image, &rule.command);
            let hit = ctx
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            if let Some(c) = hit {
                out.push(Verdict {
                    rule: rule.name.clone(),
                    reference: reference.clone(),
                    image: image.clone(),
                    judged: if c.passed {
                        Judged::Passed
                    } else {
                        Judged::Failed
                    },
                    reason: c.reason,
                    on_fail: rule.on_fail,
                    cached: true,
                });
                continue;
            }
            let wants_archive =
                rule.is_builtin_secrets() || rule.command.iter().any(|a| a.contains("{archive}"));
            if wants_archive && archive.is_none() {
                archive = Some(Export::make(ctx, image).await?);
            }
            let (judged, reason) = match (&archive, wants_archive) {
                (Some(Err(e)), true) => (Judged::Error, e.clone()),
                (a, _) => {
                    let path = a
                        .as_ref()
                        .and_then(|a| a.as_ref().ok())
                        .map(|e| e.path.clone());
                    ctx.ran.fetch_add(1, Ordering::Relaxed);
                    judge(ctx, rule, reference, image, path).await
                }
            };
            let now = Utc::now().timestamp();
            if judged != Judged::Error {
                ctx.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    key,
                    ScanVerdict {
                        passed: judged == Judged::Passed,
                        reason: reason.clone(),
                        at: now,
                    },
                );
            }
            let v = Verdict {
                rule: rule.name.clone(),
                reference: reference.clone(),
                image: image.clone(),
                judged,
                reason,
                on_fail: rule.on_fail,
                cached: false,
            };
            match v.judged {
                Judged::Passed => {
                    tracing::info!(rule = %v.rule, "scan {reference} ({}): passed", short_id(image))
                }
                _ => {
                    tracing::warn!(rule = %v.rule, "scan {reference} ({}): {}", short_id(image), v.reason)
                }
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// One rule on one image.
async fn judge<E: Engine>(
    ctx: &Admission<'_, E>,
    rule: &Scan,
    reference: &str,
    image: &str,
    archive: Option<PathBuf>,
) -> (Judged, String) {
    if rule.is_builtin_secrets() {
        let Some(path) = archive else {
            return (Judged::Error, "no export to scan".to_owned());
        };
        return builtin_secrets(path, rule.timeout, &ctx.shutdown).await;
    }
    let archive_text = archive
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let argv: Vec<String> = rule
        .command
        .iter()
        .map(|a| {
            a.replace("{ref}", reference)
                .replace("{image}", image)
                .replace("{archive}", &archive_text)
        })
        .collect();
    match run::run(&argv, rule.timeout, &ctx.shutdown).await {
        Err(e) => (
            Judged::Error,
            format!("cannot run {:?}: {e}", rule.command[0]),
        ),
        Ok(r) if r.timed_out => (
            Judged::Error,
            format!(
                "timed out after {}, killed",
                humantime::format_duration(rule.timeout)
            ),
        ),
        Ok(r) if r.interrupted => (Judged::Error, "interrupted by shutdown".to_owned()),
        Ok(r) => {
            if !r.output.is_empty() {
                tracing::debug!(
                    rule = %rule.name,
                    "scan output ({} bytes printed, {} kept): {}",
                    r.printed,
                    r.output.len(),
                    String::from_utf8_lossy(&r.output)
                );
            }
            let line = r.first_line();
            match r.code {
                Some(0) => (Judged::Passed, line),
                Some(code) if line.is_empty() => (Judged::Failed, format!("exit status {code}")),
                Some(_) => (Judged::Failed, line),
                None => (Judged::Error, "ended by a signal".to_owned()),
            }
        }
    }
}

async fn builtin_secrets(
    path: PathBuf,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> (Judged, String) {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let work = crate::blocking::off_loop(move || secrets::scan_archive(&path, &flag));
    let result = tokio::select! {
        r = work => Some(r),
        () = tokio::time::sleep(timeout) => None,
        () = shutdown.cancelled() => None,
    };
    stop.store(true, Ordering::Relaxed);
    match result {
        None => (
            Judged::Error,
            "builtin:secrets did not finish (timeout or shutdown)".to_owned(),
        ),
        Some(Err(e)) => (Judged::Error, format!("reading the export: {e}")),
        Some(Ok(report)) if report.total == 0 => (
            Judged::Passed,
            format!("no secrets in {} files", report.files),
        ),
        Some(Ok(report)) => {
            let shown: Vec<String> = report
                .findings
                .iter()
                .take(5)
                .map(ToString::to_string)
                .collect();
            let more = report.total.saturating_sub(shown.len());
            let mut reason = format!("{} secrets found: {}", report.total, shown.join("; "));
            if more > 0 {
                reason.push_str(&format!("; and {more} more"));
            }
            (Judged::Failed, run::cut(&reason, 2000))
        }
    }
}

/// The image's export under the work folder, removed when dropped.
struct Export {
    path: PathBuf,
}

impl Export {
    /// `Err(ScanError)` only for the work folder; a failed export is the
    /// verdict's reason (`Ok(Err)`).
    async fn make<E: Engine>(
        ctx: &Admission<'_, E>,
        image: &str,
    ) -> Result<Result<Export, String>, ScanError> {
        tokio::fs::create_dir_all(&ctx.work_dir)
            .await
            .map_err(|source| ScanError::WorkDir {
                path: ctx.work_dir.clone(),
                source,
            })?;
        let hex = image.trim_start_matches("sha256:");
        let path = ctx.work_dir.join(format!(
            "{}.{}.{}.tar",
            &hex[..hex.len().min(16)],
            std::process::id(),
            EXPORTS.fetch_add(1, Ordering::Relaxed)
        ));
        let export = Export { path };
        match ctx.engine.export(&[image.to_owned()], &export.path).await {
            Ok(_) => Ok(Ok(export)),
            Err(e) => Ok(Err(format!("exporting {}: {e}", short_id(image)))),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        // A leftover export is only disk; the next one of the image replaces it.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_differ_by_command_and_image() {
        let a = vec!["trivy".to_owned(), "{archive}".to_owned()];
        let b = vec!["trivy".to_owned(), "{ref}".to_owned()];
        assert_ne!(cache_key("sha256:1", &a), cache_key("sha256:1", &b));
        assert_ne!(cache_key("sha256:1", &a), cache_key("sha256:2", &a));
        assert_eq!(cache_key("sha256:1", &a), cache_key("sha256:1", &a));
    }
}
