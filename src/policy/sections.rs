//! The rules of each section: `[daemon]` (over its defaults), `[[retain]]`,
//! `[[protect]]`, `[[tags]]`, `[[float]]`, `[[prepull]]`, `[[mirror]]` and
//! `[storage]`. A rule is built only when every one of its keys is valid; the
//! keys' values are checked in [`super::values`].

use std::path::PathBuf;
use std::time::Duration;

use crate::refs::{Reference, canonical_registry, check_digest, check_path, check_platform};

use super::raw::{self, Section};
use super::validate::{At, RuleKind, Validator};
use super::values::default_schedule;
use super::{
    Cron, Daemon, EvictOrder, Float, FloatOrder, Mirror, OnViolation, Order, Prepull, Protect,
    Refresh, Retain, RetainScope, Storage, TagRule,
};

const DEFAULT_STATE_DIR: &str = "/var/lib/stowage";
const DEFAULT_CONTROL_SOCKET: &str = "/run/stowage/control.sock";
const DEFAULT_MIN_AGE: Duration = Duration::from_secs(3600);
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(15 * 60);
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(2 * 60);
const DEFAULT_POLICY_POLL: Duration = Duration::from_secs(5 * 60);
/// `audit_max` default: 50 MB.
const DEFAULT_AUDIT_MAX: u64 = 50_000_000;
/// Smallest `audit_max`: below this a log would rotate away the records of
/// a single reconcile.
const MIN_AUDIT_MAX: u64 = 64 * 1024;
/// `cache_dir` default, inside `state_dir`.
const CACHE_DIR: &str = "cache";
const DEFAULT_MAX_REMOVALS: usize = 100;
const DEFAULT_CONCURRENCY: usize = 2;
/// More parallel pulls than this only thrashes the uplink and the disk.
const MAX_CONCURRENCY: i64 = 64;

impl Validator<'_, '_> {
    pub(super) fn default_daemon(&self) -> Daemon {
        let state_dir = self
            .host_state_dir
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
        Daemon {
            schedule: default_schedule(),
            watch: true,
            audit_log: state_dir.join("audit.jsonl"),
            audit_max: DEFAULT_AUDIT_MAX,
            cache_dir: state_dir.join(CACHE_DIR),
            cache_max: 0,
            inbox: None,
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
            policy_poll: DEFAULT_POLICY_POLL,
            trash: Duration::ZERO,
        }
    }

    pub(super) fn daemon(&mut self, s: &Section<raw::RawDaemon>) -> Option<Daemon> {
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
            if let Some(host) = self.host_state_dir
                && d.state_dir != host
            {
                self.err(
                    v.span(),
                    format!(
                        "daemon.state_dir: this registry policy names {}, but this host's state dir is {} (--state-dir or STOWAGE_STATE_DIR); refused",
                        d.state_dir.display(),
                        host.display()
                    ),
                );
                ok = false;
            }
            d.audit_log = d.state_dir.join("audit.jsonl");
            d.cache_dir = d.state_dir.join(CACHE_DIR);
        }
        if let Some(v) = &r.cache_dir {
            ok &= set(&mut d.cache_dir, self.path_value(v, "daemon.cache_dir"));
        }
        if let Some(v) = &r.inbox {
            let mut inbox = PathBuf::new();
            ok &= set(&mut inbox, self.path_value(v, "daemon.inbox"));
            d.inbox = Some(inbox);
        }
        if let Some(v) = &r.cache_max {
            ok &= set(&mut d.cache_max, self.size(v, "daemon.cache_max"));
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
        if let Some(v) = &r.trash {
            ok &= set(&mut d.trash, self.duration(v, "daemon.trash", false));
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
        if let Some(v) = &r.policy_poll {
            ok &= set(
                &mut d.policy_poll,
                self.duration(v, "daemon.policy_poll", true),
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

    pub(super) fn retain(&mut self, s: &Section<raw::RawRetain>) -> Option<Retain> {
        let r = &s.raw;
        let at = At::new(RuleKind::Retain, s.index);
        let name = self.rule_name(s, &r.name, at);
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
            self.scope(s, &r.images, &r.tags, at)
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

    pub(super) fn protect(&mut self, s: &Section<raw::RawProtect>) -> Option<Protect> {
        let r = &s.raw;
        let at = At::new(RuleKind::Protect, s.index);
        let name = match &r.name {
            Some(_) => self.rule_name(s, &r.name, at),
            None if s.bad.contains("name") => None,
            // Unnamed entries get a positional name, which must not collide
            // with a name given elsewhere either.
            None => {
                let key = at.to_string();
                self.unique_name(key.clone(), s.span.clone(), at.kind, &key)
            }
        };
        let scope = self.scope(s, &r.images, &r.tags, at);
        Some(Protect {
            name: name?,
            scope: scope?,
        })
    }

    pub(super) fn tag_rule(&mut self, s: &Section<raw::RawTags>) -> Option<TagRule> {
        let r = &s.raw;
        let at = At::new(RuleKind::Tags, s.index);
        let name = self.rule_name(s, &r.name, at);
        let images = self.images(s, &r.images, at);
        let allow = match &r.allow {
            Some(list) => self.patterns(list, &format!("{at}.allow")),
            None => {
                self.missing(s, "allow", at, "tag regexes that references must match");
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

    pub(super) fn float(&mut self, s: &Section<raw::RawFloat>) -> Option<Float> {
        let r = &s.raw;
        let at = At::new(RuleKind::Float, s.index);
        let name = self.rule_name(s, &r.name, at);
        let images = self.images(s, &r.images, at);
        let tag = match &r.tag {
            Some(v) => self.tag(v, &format!("{at}.tag")),
            None => {
                self.missing(
                    s,
                    "tag",
                    at,
                    "the floating tag to maintain, e.g. \"stable\"",
                );
                None
            }
        };
        let follow = match &r.follow {
            Some(v) => self.regex(v, &format!("{at}.follow")),
            None => {
                self.missing(s, "follow", at, "a regex over candidate tags");
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

    pub(super) fn prepull(&mut self, s: &Section<raw::RawPrepull>) -> Option<Prepull> {
        let r = &s.raw;
        let at = At::new(RuleKind::Prepull, s.index);
        let mut ok = true;
        let image = match &r.image {
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
                self.missing(s, "image", at, "a reference like \"nginx:1.25\"");
                None
            }
        };
        let by_digest = image.as_ref().is_some_and(|(_, pinned)| *pinned);
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
        let ((image, _), refresh, keep_previous) = (image?, refresh?, keep_previous?);
        ok.then_some(Prepull {
            image,
            digest,
            platform,
            refresh,
            sources,
            keep_previous,
        })
    }

    pub(super) fn mirror(&mut self, s: &Section<raw::RawMirror>) -> Option<Mirror> {
        let r = &s.raw;
        let at = At::new(RuleKind::Mirror, s.index);
        let name = self.rule_name(s, &r.name, at);
        let registry = match &r.registry {
            Some(v) => self.registry(v, &format!("{at}.registry")),
            None => {
                self.missing(s, "registry", at, "the target registry, host[:port]");
                None
            }
        };
        let scope = self.scope(s, &r.images, &r.tags, at);
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

    pub(super) fn storage(&mut self, s: &Section<raw::RawStorage>) -> Option<Storage> {
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
