//! Stage two: raw sections -> validated [`Policy`], collecting every problem.
//!
//! Each check reports to the [`Sink`] and yields `None` on failure; a rule is
//! only built when all of its parts are valid, and the policy only when no
//! diagnostic was reported at all. Nothing here does I/O except [`load`].

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};
use regex::{Regex, RegexSet};
use toml::Spanned;
use toml::de::DeTable;

use crate::refs::{
    Reference, canonical_registry, check_digest, check_host, check_path, check_platform, check_tag,
};

use super::diag::{Diagnostics, Sink};
use super::raw::{self, List, Opt, RawPolicy, Section, SizeValue};
use super::{
    Cron, Daemon, EvictOrder, Float, FloatOrder, Globs, Mirror, OnViolation, Order, Patterns,
    Policy, Prepull, Protect, Refresh, Retain, RetainScope, Scope, Storage, TagRule,
};

pub const DEFAULT_SCHEDULE: &str = "0 */10 * * * *";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stowage";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/stowage/control.sock";
const DEFAULT_MIN_AGE: Duration = Duration::from_secs(3600);
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(15 * 60);
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// `audit_max` default: 50 MB.
const DEFAULT_AUDIT_MAX: u64 = 50_000_000;
/// Smallest `audit_max`: below this a log would rotate away the records of
/// a single reconcile.
const MIN_AUDIT_MAX: u64 = 64 * 1024;
const DEFAULT_MAX_REMOVALS: usize = 100;
const DEFAULT_CONCURRENCY: usize = 2;
/// More parallel pulls than this only thrashes the uplink and the disk.
const MAX_CONCURRENCY: i64 = 64;
const DURATION_HINT: &str = r#"write e.g. "30s", "15m", "6h", "14d" or "2w""#;

/// Read and validate the policy at `path` (see [`super::file`]: a regular
/// file, bounded, UTF-8). An unreadable file is a single diagnostic without
/// a position.
pub fn load(path: &Path) -> Result<Policy, Diagnostics> {
    let bytes = super::file::read(path)?;
    load_bytes(&bytes, path)
}

/// Validate the policy file's `bytes` as read by [`super::file::read`]:
/// text that is not UTF-8 is refused, never repaired, so a reload accepts
/// exactly what a start accepts.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<Policy, Diagnostics> {
    parse(super::file::decode(bytes, path)?, path)
}

/// Validate policy `text`; `path` is used for messages and to resolve
/// relative paths (against its folder). Pure: no I/O.
pub fn parse(text: &str, path: &Path) -> Result<Policy, Diagnostics> {
    let mut sink = Sink::new(path, text);
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        // The recovered tree of a broken document would produce follow-on
        // noise ("missing version"), so syntax errors are reported alone.
        for e in errors {
            sink.error(
                e.span().unwrap_or(0..0),
                format!("invalid TOML: {}", e.message()),
            );
        }
        return Err(sink.finish());
    }
    let raw = raw::read(doc.get_ref(), &mut sink);
    let policy = Validator::new(&mut sink, path).policy(raw);
    match policy {
        Some(p) if !sink.has_errors() => Ok(p),
        _ => {
            if !sink.has_errors() {
                // Defensive: a rule was dropped without saying why.
                sink.error(0..0, "policy is invalid");
            }
            Err(sink.finish())
        }
    }
}

impl Policy {
    /// One line for `stowage check`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "policy OK: {} retain, {} protect, {} tags, {} float, {} prepull, {} mirror rules; storage {}; schedule {:?}",
            self.retain.len(),
            self.protect.len(),
            self.tags.len(),
            self.float.len(),
            self.prepull.len(),
            self.mirror.len(),
            if self.storage.is_some() { "on" } else { "off" },
            self.daemon.schedule.source,
        );
        if self.daemon.dry_run {
            s.push_str("; dry_run");
        }
        s
    }
}

impl Cron {
    /// Parse a six-field (seconds first) cron expression.
    pub fn parse(source: &str) -> Result<Cron, String> {
        let source = source.trim();
        let fields = source.split_whitespace().count();
        if !source.starts_with('@') && !(6..=7).contains(&fields) {
            return Err(format!(
                "expected 6 fields with seconds first (sec min hour day-of-month month day-of-week), found {fields}; e.g. \"{DEFAULT_SCHEDULE}\""
            ));
        }
        match cron::Schedule::from_str(source) {
            Ok(schedule) => Ok(Cron {
                source: source.to_owned(),
                schedule,
            }),
            // The crate's message echoes the expression with a caret line;
            // keep only the explanation, if it has one.
            Err(e) => {
                let text = e.to_string();
                let detail = text
                    .lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty() && *l != source && !l.trim_matches('^').is_empty())
                    .unwrap_or("cannot parse it");
                Err(detail.to_owned())
            }
        }
    }
}

struct Validator<'s, 'a> {
    sink: &'s mut Sink<'a>,
    /// The policy file, for `source` and for resolving relative paths.
    path: &'a Path,
    /// Rule names seen so far: name -> (rule kind, span), for uniqueness
    /// across every rule kind (the audit log names rules without their kind).
    names: HashMap<String, (&'static str, Range<usize>)>,
}

impl<'s, 'a> Validator<'s, 'a> {
    fn new(sink: &'s mut Sink<'a>, path: &'a Path) -> Self {
        Validator {
            sink,
            path,
            names: HashMap::new(),
        }
    }

    fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.sink.error(span, msg);
    }

    fn policy(&mut self, raw: RawPolicy) -> Option<Policy> {
        match &raw.version {
            Some(v) if *v.get_ref() == 1 => {}
            Some(v) => {
                let msg = format!(
                    "version: unsupported policy version {}; this stowage reads version 1",
                    v.get_ref()
                );
                self.err(v.span(), msg);
            }
            None if raw.version_written => {}
            None => self.err(
                0..0,
                "missing required key `version`; add `version = 1` at the top",
            ),
        }

        let daemon = match &raw.daemon {
            Some(s) => self.daemon(s),
            None => Some(self.default_daemon()),
        };

        let mut ok = true;
        let retain = collect(raw.retain.iter().map(|s| self.retain(s)), &mut ok);
        let protect = collect(raw.protect.iter().map(|s| self.protect(s)), &mut ok);
        let tags = collect(raw.tags.iter().map(|s| self.tag_rule(s)), &mut ok);
        let float = collect(raw.float.iter().map(|s| self.float(s)), &mut ok);
        let prepull = collect(raw.prepull.iter().map(|s| self.prepull(s)), &mut ok);
        let mirror = collect(raw.mirror.iter().map(|s| self.mirror(s)), &mut ok);
        let storage = match &raw.storage {
            Some(s) => Some(self.storage(s)?),
            None => None,
        };
        let daemon = daemon?;

        self.prepull_duplicates(&raw);
        if let Some(allowed) = &daemon.allowed_registries {
            self.allowed(allowed, &raw);
        }

        if !ok {
            return None;
        }
        Some(Policy {
            source: self.path.to_path_buf(),
            daemon,
            retain,
            protect,
            tags,
            float,
            prepull,
            mirror,
            storage,
        })
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or_else(|| Path::new("")).join(p)
        }
    }

    fn default_daemon(&self) -> Daemon {
        let state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        Daemon {
            schedule: default_schedule(),
            watch: true,
            audit_log: state_dir.join("audit.jsonl"),
            audit_max: DEFAULT_AUDIT_MAX,
            state_dir,
            dry_run: false,
            min_age: DEFAULT_MIN_AGE,
            max_removals: DEFAULT_MAX_REMOVALS,
            concurrency: DEFAULT_CONCURRENCY,
            retry_max: DEFAULT_RETRY_MAX,
            allowed_registries: None,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            metrics: None,
            credentials_file: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }

    fn daemon(&mut self, s: &Section<raw::RawDaemon>) -> Option<Daemon> {
        let r = &s.raw;
        let mut d = self.default_daemon();
        let mut ok = true;
        if let Some(v) = &r.schedule {
            ok &= set(&mut d.schedule, self.cron(v, "daemon.schedule"));
        }
        if let Some(v) = &r.watch {
            d.watch = *v.get_ref();
        }
        if let Some(v) = &r.dry_run {
            d.dry_run = *v.get_ref();
        }
        if let Some(v) = &r.state_dir {
            ok &= set(&mut d.state_dir, self.path_value(v, "daemon.state_dir"));
            d.audit_log = d.state_dir.join("audit.jsonl");
        }
        if let Some(v) = &r.audit_log {
            ok &= set(&mut d.audit_log, self.path_value(v, "daemon.audit_log"));
        }
        if let Some(v) = &r.audit_max {
            match self.size(v, "daemon.audit_max") {
                Some(n) if n < MIN_AUDIT_MAX => {
                    self.err(
                        v.span(),
                        format!(
                            "daemon.audit_max: {n} bytes is too small; at least {}KiB",
                            MIN_AUDIT_MAX / 1024
                        ),
                    );
                    ok = false;
                }
                Some(n) => d.audit_max = n,
                None => ok = false,
            }
        }
        if let Some(v) = &r.control_socket {
            ok &= set(
                &mut d.control_socket,
                self.path_value(v, "daemon.control_socket"),
            );
        }
        if let Some(v) = &r.credentials_file {
            d.credentials_file = self.path_value(v, "daemon.credentials_file");
            ok &= d.credentials_file.is_some();
        }
        if let Some(v) = &r.min_age {
            ok &= set(&mut d.min_age, self.duration(v, "daemon.min_age", false));
        }
        if let Some(v) = &r.retry_max {
            ok &= set(&mut d.retry_max, self.duration(v, "daemon.retry_max", true));
        }
        if let Some(v) = &r.stall_timeout {
            ok &= set(
                &mut d.stall_timeout,
                self.duration(v, "daemon.stall_timeout", true),
            );
        }
        if let Some(v) = &r.max_removals {
            ok &= set(
                &mut d.max_removals,
                self.count(v, "daemon.max_removals", 0, None),
            );
        }
        if let Some(v) = &r.concurrency {
            ok &= set(
                &mut d.concurrency,
                self.count(v, "daemon.concurrency", 1, Some(MAX_CONCURRENCY)),
            );
        }
        if let Some(list) = &r.allowed_registries {
            let mut hosts = Vec::new();
            for (i, h) in list.get_ref().iter().enumerate() {
                let key = format!("daemon.allowed_registries[{}]", i + 1);
                match self.registry(h, &key) {
                    Some(h) => hosts.push(canonical_registry(&h)),
                    None => ok = false,
                }
            }
            d.allowed_registries = Some(hosts);
        }
        if let Some(v) = &r.metrics {
            d.metrics = self.metrics(v);
            ok &= d.metrics.is_some();
        }
        ok.then_some(d)
    }

    fn retain(&mut self, s: &Section<raw::RawRetain>) -> Option<Retain> {
        let r = &s.raw;
        let at = format!("retain[{}]", s.index);
        let name = self.rule_name(s, &r.name, &at, "[[retain]]");
        let untagged = r.untagged.as_ref().is_some_and(|v| *v.get_ref());
        let mut ok = true;

        let scope = if untagged {
            for (field, key) in [(&r.images, "images"), (&r.tags, "tags")] {
                if let Some(v) = field {
                    self.err(
                        v.span(),
                        format!(
                            "{at}.{key}: not allowed with `untagged = true` (the rule scopes dangling images, which have no repository or tag)"
                        ),
                    );
                    ok = false;
                }
            }
            if let Some(v) = &r.group_by {
                self.err(
                    v.span(),
                    format!("{at}.group_by: not allowed with `untagged = true` (dangling images have no tag)"),
                );
                ok = false;
            }
            if let Some(v) = &r.order
                && v.get_ref() == "semver"
            {
                self.err(
                    v.span(),
                    format!("{at}.order: \"semver\" needs tags; dangling images have none (use \"created\" or \"last_used\")"),
                );
                ok = false;
            }
            Some(RetainScope::Untagged)
        } else {
            // A mistyped `untagged` was reported already; do not guess.
            if !s.written(&r.images, "images") && !s.bad.contains("untagged") {
                self.err(
                    s.span.clone(),
                    format!("{at}: missing `images` (repository globs); or set `untagged = true` to scope dangling images"),
                );
            }
            self.scope(s, &r.images, &r.tags, &at)
                .map(RetainScope::Tagged)
        };

        let keep_last = match &r.keep_last {
            Some(v) => {
                let n = self.count(v, &format!("{at}.keep_last"), 1, None);
                ok &= n.is_some();
                n
            }
            None => None,
        };
        let needs_keep_last = |key: &str| {
            format!("{at}.{key}: only affects `keep_last`, which this rule does not set")
        };
        let order = match &r.order {
            Some(v) => {
                if !s.written(&r.keep_last, "keep_last") {
                    self.err(v.span(), needs_keep_last("order"));
                    ok = false;
                }
                self.choice(
                    v,
                    &format!("{at}.order"),
                    &[
                        ("created", Order::Created),
                        ("semver", Order::Semver),
                        ("last_used", Order::LastUsed),
                    ],
                )
            }
            None => Some(Order::Created),
        };
        let group_by = match &r.group_by {
            // Already reported as not allowed with `untagged`.
            Some(_) if untagged => None,
            Some(v) => {
                if !s.written(&r.keep_last, "keep_last") {
                    self.err(v.span(), needs_keep_last("group_by"));
                    ok = false;
                }
                let key = format!("{at}.group_by");
                match self.regex(v, &key) {
                    // captures_len counts the whole match as group 0.
                    Some(re) if re.captures_len() == 2 => Some(Some(re)),
                    Some(re) => {
                        self.err(
                            v.span(),
                            format!(
                                "{key}: needs exactly one capture group, found {} in {:?}",
                                re.captures_len() - 1,
                                v.get_ref()
                            ),
                        );
                        None
                    }
                    None => None,
                }
            }
            None => Some(None),
        };
        let keep_within = match &r.keep_within {
            Some(v) => {
                let d = self.duration(v, &format!("{at}.keep_within"), true);
                ok &= d.is_some();
                d
            }
            None => None,
        };

        let (name, scope, order, group_by) = (name?, scope?, order?, group_by?);
        ok.then_some(Retain {
            name,
            scope,
            keep_last,
            order,
            group_by,
            keep_within,
        })
    }

    fn protect(&mut self, s: &Section<raw::RawProtect>) -> Option<Protect> {
        let r = &s.raw;
        let at = format!("protect[{}]", s.index);
        let name = match &r.name {
            Some(_) => self.rule_name(s, &r.name, &at, "[[protect]]"),
            None if s.bad.contains("name") => None,
            // Unnamed entries get a positional name, which must not collide
            // with a name given elsewhere either.
            None => self.unique_name(at.clone(), s.span.clone(), "[[protect]]", &at),
        };
        let scope = self.scope(s, &r.images, &r.tags, &at);
        Some(Protect {
            name: name?,
            scope: scope?,
        })
    }

    fn tag_rule(&mut self, s: &Section<raw::RawTags>) -> Option<TagRule> {
        let r = &s.raw;
        let at = format!("tags[{}]", s.index);
        let name = self.rule_name(s, &r.name, &at, "[[tags]]");
        let images = self.images(s, &r.images, &at);
        let allow = match &r.allow {
            Some(list) => self.patterns(list, &format!("{at}.allow")),
            None => {
                self.missing(s, "allow", &at, "tag regexes that references must match");
                None
            }
        };
        let on_violation = match &r.on_violation {
            Some(v) => self.choice(
                v,
                &format!("{at}.on_violation"),
                &[("warn", OnViolation::Warn), ("untag", OnViolation::Untag)],
            ),
            None => Some(OnViolation::Warn),
        };
        Some(TagRule {
            name: name?,
            images: images?,
            allow: allow?,
            on_violation: on_violation?,
        })
    }

    fn float(&mut self, s: &Section<raw::RawFloat>) -> Option<Float> {
        let r = &s.raw;
        let at = format!("float[{}]", s.index);
        let name = self.rule_name(s, &r.name, &at, "[[float]]");
        let images = self.images(s, &r.images, &at);
        let tag = match &r.tag {
            Some(v) => self.tag(v, &format!("{at}.tag")),
            None => {
                self.missing(
                    s,
                    "tag",
                    &at,
                    "the floating tag to maintain, e.g. \"stable\"",
                );
                None
            }
        };
        let follow = match &r.follow {
            Some(v) => self.regex(v, &format!("{at}.follow")),
            None => {
                self.missing(s, "follow", &at, "a regex over candidate tags");
                None
            }
        };
        let order = match &r.order {
            Some(v) => self.choice(
                v,
                &format!("{at}.order"),
                &[
                    ("semver", FloatOrder::Semver),
                    ("created", FloatOrder::Created),
                ],
            ),
            None => Some(FloatOrder::Semver),
        };
        let (tag, follow) = (tag?, follow?);
        if follow.is_match(&tag)
            && let Some(v) = &r.follow
        {
            // The floating tag would be its own candidate and never move.
            self.err(
                v.span(),
                format!("{at}.follow: matches the floating tag {tag:?} itself; exclude it from the pattern"),
            );
            return None;
        }
        Some(Float {
            name: name?,
            images: images?,
            tag,
            follow,
            order: order?,
        })
    }

    fn prepull(&mut self, s: &Section<raw::RawPrepull>) -> Option<Prepull> {
        let r = &s.raw;
        let at = format!("prepull[{}]", s.index);
        let mut ok = true;
        let reference = match &r.image {
            Some(v) => match Reference::parse_explicit(v.get_ref()) {
                // The image as written, and whether it is pinned by digest.
                Ok(parts) => Some((v.get_ref().clone(), parts.digest.is_some())),
                Err(e) => {
                    self.err(
                        v.span(),
                        format!("{at}.image: invalid reference {:?}: {e}", v.get_ref()),
                    );
                    None
                }
            },
            None => {
                self.missing(s, "image", &at, "a reference like \"nginx:1.25\"");
                None
            }
        };
        let by_digest = reference.as_ref().is_some_and(|(_, pinned)| *pinned);
        let digest = match &r.digest {
            Some(v) => {
                if by_digest {
                    self.err(
                        v.span(),
                        format!("{at}.digest: the image is already pinned by digest in `image`"),
                    );
                    ok = false;
                }
                match check_digest(v.get_ref()) {
                    Ok(()) => Some(v.get_ref().clone()),
                    Err(e) => {
                        self.err(v.span(), format!("{at}.digest: {e}"));
                        ok = false;
                        None
                    }
                }
            }
            None => None,
        };
        let platform = match &r.platform {
            Some(v) => match check_platform(v.get_ref()) {
                Ok(()) => Some(v.get_ref().clone()),
                Err(e) => {
                    self.err(v.span(), format!("{at}.platform: {e}"));
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let refresh = match &r.refresh {
            Some(v) if v.get_ref().trim() == "never" => Some(Refresh::Never),
            Some(v) => match Cron::parse(v.get_ref()) {
                // A digest never changes: there is nothing to check for.
                Ok(_) if by_digest => {
                    self.err(
                        v.span(),
                        format!("{at}.refresh: an image pinned by digest never changes; use \"never\" or drop `refresh`"),
                    );
                    None
                }
                Ok(c) => Some(Refresh::Cron(c)),
                Err(e) => {
                    self.err(
                        v.span(),
                        format!(
                            "{at}.refresh: expected a cron expression or \"never\", got {:?}: {e}",
                            v.get_ref()
                        ),
                    );
                    None
                }
            },
            None => Some(Refresh::Daemon),
        };
        let mut sources = Vec::new();
        if let Some(list) = &r.sources {
            for (i, h) in list.get_ref().iter().enumerate() {
                match self.registry(h, &format!("{at}.sources[{}]", i + 1)) {
                    Some(h) => sources.push(h),
                    None => ok = false,
                }
            }
        }
        let keep_previous = match &r.keep_previous {
            Some(v) => self.count(v, &format!("{at}.keep_previous"), 0, None),
            None => Some(0),
        };
        let ((image, _), refresh, keep_previous) = (reference?, refresh?, keep_previous?);
        ok.then_some(Prepull {
            image,
            digest,
            platform,
            refresh,
            sources,
            keep_previous,
        })
    }

    fn mirror(&mut self, s: &Section<raw::RawMirror>) -> Option<Mirror> {
        let r = &s.raw;
        let at = format!("mirror[{}]", s.index);
        let name = self.rule_name(s, &r.name, &at, "[[mirror]]");
        let registry = match &r.registry {
            Some(v) => self.registry(v, &format!("{at}.registry")),
            None => {
                self.missing(s, "registry", &at, "the target registry, host[:port]");
                None
            }
        };
        let scope = self.scope(s, &r.images, &r.tags, &at);
        let prefix = match &r.prefix {
            Some(v) => match check_path(v.get_ref()) {
                Ok(()) => Some(Some(v.get_ref().clone())),
                Err(e) => {
                    self.err(v.span(), format!("{at}.prefix: {e}"));
                    None
                }
            },
            None => Some(None),
        };
        Some(Mirror {
            name: name?,
            registry: registry?,
            scope: scope?,
            prefix: prefix?,
        })
    }

    fn storage(&mut self, s: &Section<raw::RawStorage>) -> Option<Storage> {
        let r = &s.raw;
        let mut ok = true;
        let max_size = match &r.max_size {
            Some(v) => {
                let n = self.size(v, "storage.max_size");
                ok &= n.is_some();
                n
            }
            None => None,
        };
        let build_cache_max = match &r.build_cache_max {
            Some(v) => {
                let n = self.size(v, "storage.build_cache_max");
                ok &= n.is_some();
                n
            }
            None => None,
        };
        let high = r
            .high_watermark
            .as_ref()
            .map(|v| (v.span(), self.percent(v, "storage.high_watermark")));
        let low = r
            .low_watermark
            .as_ref()
            .map(|v| (v.span(), self.percent(v, "storage.low_watermark")));
        let (mut high_watermark, mut low_watermark) = (None, None);
        match (high, low) {
            (Some((_, Some(h))), Some((lspan, Some(l)))) => {
                if l >= h {
                    self.err(
                        lspan,
                        format!("storage.low_watermark: {l}% must be below high_watermark ({h}%)"),
                    );
                    ok = false;
                }
                (high_watermark, low_watermark) = (Some(h), Some(l));
            }
            (Some((_, None)), _) | (_, Some((_, None))) => ok = false,
            (Some((span, Some(_))), None) if !s.bad.contains("low_watermark") => {
                self.err(span, "storage.high_watermark: set together with `low_watermark` (evict above high, stop below low)");
                ok = false;
            }
            (None, Some((span, Some(_)))) if !s.bad.contains("high_watermark") => {
                self.err(span, "storage.low_watermark: set together with `high_watermark` (evict above high, stop below low)");
                ok = false;
            }
            _ => {}
        }
        let order = match &r.order {
            Some(v) => self.choice(
                v,
                "storage.order",
                &[("lru", EvictOrder::Lru), ("created", EvictOrder::Created)],
            ),
            None => Some(EvictOrder::Lru),
        };
        let any_target = [
            "max_size",
            "high_watermark",
            "low_watermark",
            "build_cache_max",
        ]
        .iter()
        .any(|k| s.bad.contains(*k))
            || r.max_size.is_some()
            || r.high_watermark.is_some()
            || r.low_watermark.is_some()
            || r.build_cache_max.is_some();
        if !any_target {
            self.err(
                s.span.clone(),
                "[storage]: sets no target; set `max_size`, `high_watermark` and `low_watermark`, or `build_cache_max` (or remove the table)",
            );
            ok = false;
        }
        let order = order?;
        ok.then_some(Storage {
            max_size,
            high_watermark,
            low_watermark,
            order,
            build_cache_max,
        })
    }

    // ---- cross-rule checks ----

    fn prepull_duplicates(&mut self, raw: &RawPolicy) {
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for s in &raw.prepull {
            let Some(image) = &s.raw.image else { continue };
            let platform = s
                .raw
                .platform
                .as_ref()
                .map(|p| p.get_ref().clone())
                .unwrap_or_default();
            let key = (image.get_ref().clone(), platform);
            if let Some(first) = seen.get(&key) {
                let msg = format!(
                    "prepull[{}].image: {:?} is already listed in prepull[{first}]",
                    s.index,
                    image.get_ref()
                );
                self.err(image.span(), msg);
            } else {
                seen.insert(key, s.index);
            }
        }
    }

    /// Registries outside `allowed_registries` are refused at run time; say
    /// so now rather than fail every reconcile.
    fn allowed(&mut self, allowed: &[String], raw: &RawPolicy) {
        let is_allowed = |h: &str| allowed.iter().any(|a| *a == canonical_registry(h));
        for s in &raw.prepull {
            let sources: Vec<&Spanned<String>> = s
                .raw
                .sources
                .as_ref()
                .map(|l| l.get_ref().iter().collect())
                .unwrap_or_default();
            for (i, h) in sources.iter().enumerate() {
                if check_host(h.get_ref()).is_ok() && !is_allowed(h.get_ref()) {
                    self.err(
                        h.span(),
                        format!(
                            "prepull[{}].sources[{}]: registry {:?} is not in daemon.allowed_registries",
                            s.index,
                            i + 1,
                            h.get_ref()
                        ),
                    );
                }
            }
            // With sources, the image's own registry is only the fallback.
            if sources.is_empty()
                && let Some(image) = &s.raw.image
                && let Ok(parts) = Reference::parse_explicit(image.get_ref())
                && !is_allowed(parts.registry())
            {
                self.err(
                    image.span(),
                    format!(
                        "prepull[{}].image: registry {:?} is not in daemon.allowed_registries",
                        s.index,
                        parts.registry()
                    ),
                );
            }
        }
        for s in &raw.mirror {
            if let Some(r) = &s.raw.registry
                && check_host(r.get_ref()).is_ok()
                && !is_allowed(r.get_ref())
            {
                self.err(
                    r.span(),
                    format!(
                        "mirror[{}].registry: {:?} is not in daemon.allowed_registries",
                        s.index,
                        r.get_ref()
                    ),
                );
            }
        }
    }

    // ---- building blocks ----

    fn missing<T>(&mut self, s: &Section<T>, key: &str, at: &str, what: &str) {
        if !s.bad.contains(key) {
            self.err(
                s.span.clone(),
                format!("{at}: missing required key `{key}` ({what})"),
            );
        }
    }

    fn rule_name<T>(
        &mut self,
        s: &Section<T>,
        field: &Opt<String>,
        at: &str,
        kind: &'static str,
    ) -> Option<String> {
        match field {
            Some(v) => {
                let name = v.get_ref().trim();
                if name.is_empty() {
                    self.err(v.span(), format!("{at}.name: must not be empty"));
                    return None;
                }
                if name.chars().any(char::is_control) {
                    self.err(
                        v.span(),
                        format!("{at}.name: must not contain control characters"),
                    );
                    return None;
                }
                self.unique_name(name.to_owned(), v.span(), kind, &format!("{at}.name"))
            }
            None => {
                self.missing(s, "name", at, "written into the audit log as the reason");
                None
            }
        }
    }

    fn unique_name(
        &mut self,
        name: String,
        span: Range<usize>,
        kind: &'static str,
        key: &str,
    ) -> Option<String> {
        if let Some((other_kind, other_span)) = self.names.get(&name) {
            let line = self.sink.line_of(other_span.start);
            let msg = format!(
                "{key}: duplicate rule name {name:?}, already used by {other_kind} at line {line}; names are unique across all rules"
            );
            self.err(span, msg);
            return None;
        }
        self.names.insert(name.clone(), (kind, span));
        Some(name)
    }

    /// `images` (required) plus optional `tags`.
    fn scope<T>(&mut self, s: &Section<T>, images: &List, tags: &List, at: &str) -> Option<Scope> {
        let globs = self.images(s, images, at);
        let tags = match tags {
            Some(list) => self.patterns(list, &format!("{at}.tags")).map(Some),
            None => Some(None),
        };
        Some(Scope {
            images: globs?,
            tags: tags?,
        })
    }

    fn images<T>(&mut self, s: &Section<T>, images: &List, at: &str) -> Option<Globs> {
        match images {
            Some(list) => self.globs(list, &format!("{at}.images")),
            None => {
                // A missing `images` in a retain rule was already explained
                // together with `untagged`.
                if !at.starts_with("retain[") {
                    self.missing(s, "images", at, "repository globs in scope");
                }
                None
            }
        }
    }

    fn globs(&mut self, list: &Spanned<Vec<Spanned<String>>>, key: &str) -> Option<Globs> {
        if list.get_ref().is_empty() {
            self.err(list.span(), format!("{key}: must not be empty"));
            return None;
        }
        let mut builder = GlobSetBuilder::new();
        let mut ok = true;
        for (i, g) in list.get_ref().iter().enumerate() {
            let text = g.get_ref();
            let k = format!("{key}[{}]", i + 1);
            let last = text.rsplit('/').next().unwrap_or_default();
            if text.is_empty() {
                self.err(g.span(), format!("{k}: empty glob"));
                ok = false;
            } else if last.contains(':') || text.contains('@') {
                self.err(
                    g.span(),
                    format!("{k}: {text:?} includes a tag or digest; `images` matches repositories only, put tag patterns in `tags`"),
                );
                ok = false;
            } else {
                match GlobBuilder::new(text).literal_separator(true).build() {
                    Ok(glob) => {
                        builder.add(glob);
                    }
                    Err(e) => {
                        self.err(
                            g.span(),
                            format!("{k}: invalid glob {text:?}: {}", e.kind()),
                        );
                        ok = false;
                    }
                }
            }
        }
        if !ok {
            return None;
        }
        match builder.build() {
            Ok(set) => Some(Globs {
                sources: list.get_ref().iter().map(|g| g.get_ref().clone()).collect(),
                set,
            }),
            Err(e) => {
                self.err(list.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    fn patterns(&mut self, list: &Spanned<Vec<Spanned<String>>>, key: &str) -> Option<Patterns> {
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                format!("{key}: must not be empty (omit the key to mean every tag)"),
            );
            return None;
        }
        let mut ok = true;
        for (i, p) in list.get_ref().iter().enumerate() {
            ok &= self.regex(p, &format!("{key}[{}]", i + 1)).is_some();
        }
        if !ok {
            return None;
        }
        let anchored: Vec<String> = list.get_ref().iter().map(|p| anchor(p.get_ref())).collect();
        match RegexSet::new(&anchored) {
            Ok(set) => Some(Patterns {
                sources: list.get_ref().iter().map(|p| p.get_ref().clone()).collect(),
                set,
            }),
            Err(e) => {
                self.err(list.span(), format!("{key}: {}", regex_error(&e)));
                None
            }
        }
    }

    /// An implicitly anchored regex over a whole tag.
    fn regex(&mut self, v: &Spanned<String>, key: &str) -> Option<Regex> {
        // Compile the pattern as written first: a valid pattern is balanced,
        // so wrapping it cannot change its meaning, and errors then refer to
        // the operator's own text.
        let compiled = Regex::new(v.get_ref()).and_then(|_| Regex::new(&anchor(v.get_ref())));
        match compiled {
            Ok(re) => Some(re),
            Err(e) => {
                let msg = format!(
                    "{key}: invalid regex {:?}: {}",
                    v.get_ref(),
                    regex_error(&e)
                );
                self.err(v.span(), msg);
                None
            }
        }
    }

    fn cron(&mut self, v: &Spanned<String>, key: &str) -> Option<Cron> {
        match Cron::parse(v.get_ref()) {
            Ok(c) => Some(c),
            Err(e) => {
                self.err(
                    v.span(),
                    format!("{key}: invalid cron expression {:?}: {e}", v.get_ref()),
                );
                None
            }
        }
    }

    fn duration(&mut self, v: &Spanned<String>, key: &str, positive: bool) -> Option<Duration> {
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if positive && d.is_zero() => {
                self.err(v.span(), format!("{key}: must be longer than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                let msg = format!(
                    "{key}: invalid duration {:?}: {e}; {DURATION_HINT}",
                    v.get_ref()
                );
                self.err(v.span(), msg);
                None
            }
        }
    }

    fn count(&mut self, v: &Spanned<i64>, key: &str, min: i64, max: Option<i64>) -> Option<usize> {
        let n = *v.get_ref();
        if n < min {
            let msg = if min == 0 {
                format!("{key}: must not be negative, got {n}")
            } else {
                format!("{key}: must be at least {min}, got {n}")
            };
            self.err(v.span(), msg);
            return None;
        }
        if let Some(max) = max
            && n > max
        {
            self.err(v.span(), format!("{key}: must be at most {max}, got {n}"));
            return None;
        }
        match usize::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.err(v.span(), format!("{key}: {n} is too large"));
                None
            }
        }
    }

    fn size(&mut self, v: &Spanned<SizeValue>, key: &str) -> Option<u64> {
        let parsed = match v.get_ref() {
            SizeValue::Bytes(n) => u64::try_from(*n).map_err(|_| "must not be negative".to_owned()),
            SizeValue::Text(t) => parse_size(t),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                let shown = match v.get_ref() {
                    SizeValue::Bytes(n) => n.to_string(),
                    SizeValue::Text(t) => format!("{t:?}"),
                };
                self.err(v.span(), format!("{key}: invalid size {shown}: {e}"));
                None
            }
        }
    }

    fn percent(&mut self, v: &Spanned<String>, key: &str) -> Option<f64> {
        match parse_percent(v.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err(
                    v.span(),
                    format!("{key}: invalid percentage {:?}: {e}", v.get_ref()),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        if let Some((_, t)) = options.iter().find(|(s, _)| s == v.get_ref()) {
            return Some(*t);
        }
        let words: Vec<&str> = options.iter().map(|(s, _)| *s).collect();
        let list: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
        let mut msg = format!("{key}: {:?} is not one of {}", v.get_ref(), list.join(", "));
        if let Some(s) = raw::suggest(v.get_ref(), &words) {
            msg.push_str(&format!("; did you mean {s:?}?"));
        }
        self.err(v.span(), msg);
        None
    }

    fn tag(&mut self, v: &Spanned<String>, key: &str) -> Option<String> {
        match check_tag(v.get_ref()) {
            Ok(()) => Some(v.get_ref().clone()),
            Err(e) => {
                self.err(
                    v.span(),
                    format!("{key}: invalid tag {:?}: {e}", v.get_ref()),
                );
                None
            }
        }
    }

    fn registry(&mut self, v: &Spanned<String>, key: &str) -> Option<String> {
        match check_host(v.get_ref()) {
            Ok(()) => Some(v.get_ref().clone()),
            Err(e) => {
                self.err(
                    v.span(),
                    format!("{key}: invalid registry {:?}: {e}", v.get_ref()),
                );
                None
            }
        }
    }

    fn metrics(&mut self, v: &Spanned<String>) -> Option<String> {
        let text = v.get_ref();
        // ":9184" binds loopback: metrics are not exposed unless asked for.
        let full = if text.starts_with(':') {
            format!("127.0.0.1{text}")
        } else {
            text.clone()
        };
        let valid = match check_host(&full) {
            Ok(()) => has_port(&full),
            Err(_) => false,
        };
        if valid {
            Some(full)
        } else {
            self.err(
                v.span(),
                format!(
                    "daemon.metrics: expected host:port (e.g. \"127.0.0.1:9184\"), got {text:?}"
                ),
            );
            None
        }
    }

    fn path_value(&mut self, v: &Spanned<String>, key: &str) -> Option<PathBuf> {
        if v.get_ref().trim().is_empty() {
            self.err(v.span(), format!("{key}: must not be empty"));
            return None;
        }
        if v.get_ref().contains('\0') {
            self.err(v.span(), format!("{key}: must not contain NUL"));
            return None;
        }
        Some(self.resolve(v.get_ref()))
    }
}

/// Keep only the rules that validated; remember whether any did not.
fn collect<T>(items: impl Iterator<Item = Option<T>>, ok: &mut bool) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Some(t) => out.push(t),
            None => *ok = false,
        }
    }
    out
}

/// Overwrite a default with a validated value; report whether it was valid.
fn set<T>(slot: &mut T, value: Option<T>) -> bool {
    match value {
        Some(v) => {
            *slot = v;
            true
        }
        None => false,
    }
}

fn default_schedule() -> Cron {
    Cron {
        source: DEFAULT_SCHEDULE.to_owned(),
        // A constant the crate accepts; the unit test `default_schedule_parses`
        // proves it, and a bad constant would be a build-time bug.
        schedule: cron::Schedule::from_str(DEFAULT_SCHEDULE).expect("default schedule is valid"),
    }
}

fn anchor(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

/// The regex crate's syntax errors span several lines (the pattern and a
/// caret); a diagnostic is one line, so keep the explanation.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or("syntax error")
            .to_owned(),
        regex::Error::CompiledTooBig(limit) => {
            format!("pattern is too big (compiled size over {limit} bytes)")
        }
        other => other.to_string(),
    }
}

/// `500MB`, `20GiB`, `1.5GB`, or plain digits (bytes). Decimal units are
/// 1000-based, binary ones 1024-based; units are case-insensitive.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let valid = !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && frac.chars().all(|c| c.is_ascii_digit())
        && !(number.ends_with('.'));
    if !valid {
        return Err(
            r#"expected a number with an optional unit, e.g. "500MB", "20GiB" or "1.5GB""#
                .to_owned(),
        );
    }
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u128.pow(2),
        "gb" => 1000u128.pow(3),
        "tb" => 1000u128.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown unit {unit:?}; use B, KB, MB, GB, TB (1000-based) or KiB, MiB, GiB, TiB (1024-based)"
            ));
        }
    };
    // Exact integer arithmetic: 1.5GB is exactly 1_500_000_000 bytes.
    let too_large = || "too large".to_owned();
    // u64::MAX has 20 digits; sub-byte precision beyond 18 decimals is moot.
    let frac = &frac[..frac.len().min(18)];
    if whole.len() > 20 {
        return Err(too_large());
    }
    let digits: u128 = format!("{whole}{frac}").parse().map_err(|_| too_large())?;
    let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| too_large())?);
    let bytes = digits.checked_mul(multiplier).ok_or_else(too_large)? / scale;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// `"85%"` -> 85.0, within 0..=100.
fn parse_percent(text: &str) -> Result<f64, String> {
    let number = text
        .trim()
        .strip_suffix('%')
        .ok_or_else(|| r#"expected a percentage like "85%""#.to_owned())?
        .trim();
    let valid = !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.');
    let p: f64 = match number.parse() {
        Ok(p) if valid => p,
        _ => return Err(r#"expected a percentage like "85%""#.to_owned()),
    };
    if !(0.0..=100.0).contains(&p) {
        return Err("must be between 0% and 100%".to_owned());
    }
    Ok(p)
}

fn has_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((_, p)) => p.parse::<u16>().is_ok_and(|n| n > 0) && !text.ends_with(']'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_parses() {
        assert_eq!(default_schedule().source, DEFAULT_SCHEDULE);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2 kib"), Ok(2048));
        assert!(parse_size("1.5.2GB").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("-5MB").is_err());
        assert_eq!(parse_size("1.0000000000000000000001KB"), Ok(1000));
        assert!(
            parse_size("lots")
                .unwrap_err()
                .starts_with("expected a number")
        );
    }

    #[test]
    fn percents() {
        assert_eq!(parse_percent("85%"), Ok(85.0));
        assert_eq!(parse_percent("12.5 %"), Ok(12.5));
        assert!(parse_percent("85").is_err());
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("-1%").is_err());
        assert!(parse_percent("NaN%").is_err());
    }

    #[test]
    fn cron_messages_are_one_line() {
        let e = Cron::parse("*/10 * * * *").unwrap_err();
        assert!(e.contains("found 5"), "{e}");
        let e = Cron::parse("0 */61 * * * *").unwrap_err();
        assert!(!e.contains('\n') && e.contains("59"), "{e}");
        assert!(Cron::parse("0 0 3 * * Sun").is_ok());
    }
}
