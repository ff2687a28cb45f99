//! The policy: raw TOML (`raw`), validated into [`Policy`] (`validate`, with
//! the rules of each section in `sections` and single values in `values`),
//! with diagnostics that carry `FILE:LINE:COL` (`diag`).
//!
//! Everything here is pure: parsing takes a string, never touches the engine,
//! and never reads the clock.

mod diag;
pub(crate) mod file;
mod raw;
mod scan;
mod sections;
mod validate;
mod values;

pub use diag::{Diagnostic, Diagnostics};
pub use validate::{load, load_bytes, load_remote, parse};

use std::path::PathBuf;
use std::time::Duration;

use crate::refs::{self, Naming};
use globset::GlobSet;
use regex::{Regex, RegexSet};

/// A validated policy. Every regex, glob, cron expression, duration and size is
/// compiled; nothing here can fail at reconcile time.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Where the policy was read from (for messages and reload).
    pub source: PathBuf,
    pub daemon: Daemon,
    pub retain: Vec<Retain>,
    pub protect: Vec<Protect>,
    pub tags: Vec<TagRule>,
    pub float: Vec<Float>,
    pub prepull: Vec<Prepull>,
    pub mirror: Vec<Mirror>,
    /// `[[scan]]`: admission checks on arriving and outgoing images.
    pub scan: Vec<Scan>,
    pub storage: Option<Storage>,
}

impl Policy {
    /// One line for `stowage check`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "policy OK: {} retain, {} protect, {} tags, {} float, {} prepull, {} mirror{} rules; storage {}; schedule {:?}",
            self.retain.len(),
            self.protect.len(),
            self.tags.len(),
            self.float.len(),
            self.prepull.len(),
            self.mirror.len(),
            // Said only when written, so existing summaries read the same.
            if self.scan.is_empty() {
                String::new()
            } else {
                format!(", {} scan", self.scan.len())
            },
            if self.storage.is_some() { "on" } else { "off" },
            self.daemon.schedule.source,
        );
        if self.daemon.dry_run {
            s.push_str("; dry_run");
        }
        s
    }
}

#[derive(Debug, Clone)]
pub struct Daemon {
    pub schedule: Cron,
    pub watch: bool,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    /// The audit log is rotated to `<audit_log>.1` before it would pass
    /// this many bytes (one generation kept).
    pub audit_max: u64,
    /// The content store (an OCI image layout plus partial downloads):
    /// `<state_dir>/cache` unless set.
    pub cache_dir: PathBuf,
    /// Bytes of complete blobs kept in the content store after they reached
    /// the engine (least recently used go first); 0 keeps none. Partial
    /// downloads are kept regardless until complete or no longer wanted.
    pub cache_max: u64,
    /// A folder the daemon imports bundles from (`inbox/done/`,
    /// `inbox/failed/` beside them); none unless set.
    pub inbox: Option<PathBuf>,
    pub dry_run: bool,
    pub min_age: Duration,
    pub max_removals: usize,
    pub concurrency: usize,
    pub retry_max: Duration,
    /// `None`: every registry is allowed.
    pub allowed_registries: Option<Vec<String>>,
    pub control_socket: PathBuf,
    /// `host:port` for Prometheus text metrics.
    pub metrics: Option<String>,
    /// Docker `config.json`-format credentials, instead of the engine user's.
    pub credentials_file: Option<PathBuf>,
    /// A pull or push with no progress for this long is abandoned (and
    /// retried with backoff): a stalled uplink must not hold a transfer slot
    /// forever. Also bounds each registry digest lookup.
    pub stall_timeout: Duration,
    /// With a registry policy (`-p oci://…`): how often the daemon checks
    /// the reference for a new digest (jittered ±10 %).
    pub policy_poll: Duration,
    /// How long an image that retention or a `[[tags]]` rule removes stays
    /// restorable under a `stowage-trash/` reference; zero: removed at once.
    pub trash: Duration,
}

/// A compiled cron schedule together with its source text (for display).
#[derive(Debug, Clone)]
pub struct Cron {
    pub source: String,
    pub schedule: cron::Schedule,
}

/// Repository globs (`*` within one `/` segment, `**` across) plus optional
/// whole-tag regexes: the scope shared by every rule kind.
#[derive(Debug, Clone)]
pub struct Scope {
    pub images: Globs,
    /// `None`: every tag is in scope.
    pub tags: Option<Patterns>,
}

impl Scope {
    /// Whether a reference the engine holds, `repository:tag` as stowage
    /// shows it, is in scope on an engine that names images `naming`'s way.
    pub fn matches(&self, repository: &str, tag: &str, naming: Naming) -> bool {
        self.images.matches_repo(repository, naming)
            && self.tags.as_ref().is_none_or(|t| t.is_match(tag))
    }
}

/// Compiled repository globs.
#[derive(Debug, Clone)]
pub struct Globs {
    pub set: GlobSet,
}

impl Globs {
    /// Whether the globs match a repository the engine holds, under its
    /// name or the one other name it answers to ([`refs::glob_alias`]:
    /// `docker.io/library/nginx` for `nginx`; on Podman `team/app` for
    /// `localhost/team/app`).
    pub(crate) fn matches_repo(&self, repository: &str, naming: Naming) -> bool {
        self.set.is_match(repository)
            || refs::glob_alias(repository, naming).is_some_and(|a| self.set.is_match(a.as_ref()))
    }
}

/// Compiled, implicitly anchored tag regexes with their source text.
#[derive(Debug, Clone)]
pub struct Patterns {
    pub sources: Vec<String>,
    pub set: RegexSet,
}

impl Patterns {
    pub fn is_match(&self, tag: &str) -> bool {
        self.set.is_match(tag)
    }
}

#[derive(Debug, Clone)]
pub struct Retain {
    pub name: String,
    pub scope: RetainScope,
    pub keep_last: Option<usize>,
    pub order: Order,
    /// Anchored regex with exactly one capture group over the tag.
    pub group_by: Option<Regex>,
    pub keep_within: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum RetainScope {
    Tagged(Scope),
    /// The rule scopes dangling images (`<none>:<none>`).
    Untagged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Created,
    Semver,
    LastUsed,
}

#[derive(Debug, Clone)]
pub struct Protect {
    /// The given name, or `protect[N]` (1-based) when none was given.
    pub name: String,
    pub scope: Scope,
}

#[derive(Debug, Clone)]
pub struct TagRule {
    pub name: String,
    pub images: Globs,
    pub allow: Patterns,
    pub on_violation: OnViolation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    Warn,
    Untag,
}

#[derive(Debug, Clone)]
pub struct Float {
    pub name: String,
    pub images: Globs,
    pub tag: String,
    /// Anchored regex over candidate tags.
    pub follow: Regex,
    pub order: FloatOrder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatOrder {
    Semver,
    Created,
}

#[derive(Debug, Clone)]
pub struct Prepull {
    /// The reference as written (`repo:tag` or `repo@sha256:...`).
    pub image: String,
    pub digest: Option<String>,
    pub platform: Option<String>,
    pub refresh: Refresh,
    /// Registries (`host[:port]`) tried in order before the image's own.
    pub sources: Vec<String>,
    pub keep_previous: usize,
}

impl Prepull {
    /// The key of this entry in the persistent state (previous images, last
    /// refresh check, backoff): the image, plus the platform when one is set,
    /// since the same image may be listed once per platform.
    pub(crate) fn key(&self) -> String {
        match &self.platform {
            Some(p) => format!("{} {p}", self.image),
            None => self.image.clone(),
        }
    }
}

// A policy holds a handful of these; boxing the schedule would only make
// matching on it clumsier for the planner.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Refresh {
    /// Follow `[daemon].schedule`.
    Daemon,
    Never,
    Cron(Cron),
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub name: String,
    pub registry: String,
    pub scope: Scope,
    pub prefix: Option<String>,
}

/// One `[[scan]]` rule: a command (or `builtin:secrets`) every arriving
/// image in scope passes before its reference moves to it.
#[derive(Debug, Clone)]
pub struct Scan {
    pub name: String,
    /// Every repository when `images` is not written.
    pub scope: Scope,
    /// The argv as written, placeholders (`{ref}`, `{image}`, `{archive}`)
    /// still in it; `["builtin:secrets"]` for stowage's own secret scan.
    pub command: Vec<String>,
    pub on_fail: OnFail,
    /// A scan still running after this long is killed and fails.
    pub timeout: Duration,
}

impl Scan {
    /// Whether the command is stowage's own secret scan.
    pub fn is_builtin_secrets(&self) -> bool {
        self.command.len() == 1 && self.command[0] == BUILTIN_SECRETS
    }
}

/// The one built-in scan's command word.
pub const BUILTIN_SECRETS: &str = "builtin:secrets";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFail {
    /// A failing image is not tagged into place and not mirrored.
    Block,
    /// Recorded only.
    Warn,
}

#[derive(Debug, Clone)]
pub struct Storage {
    /// Bytes.
    pub max_size: Option<u64>,
    /// Percent of the filesystem holding the engine's data root, `0.0..=100.0`.
    pub high_watermark: Option<f64>,
    pub low_watermark: Option<f64>,
    pub order: EvictOrder,
    /// Bytes.
    pub build_cache_max: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictOrder {
    Lru,
    Created,
}
