//! Stage two: raw sections -> validated [`Policy`], collecting every problem.
//!
//! Each check reports to the [`Sink`] and yields `None` on failure; a rule is
//! only built when all of its parts are valid, and the policy only when no
//! diagnostic was reported at all. Nothing here does I/O except [`load`].
//!
//! This module is the orchestration: the [`Validator`], the order of the
//! sections, rule names (unique across every kind) and the checks that span
//! several rules. Each section's rules are in [`super::sections`], the checks
//! of single values in [`super::values`].

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::DeTable;

use crate::refs::{Reference, canonical_registry, check_host};

use super::Policy;
use super::diag::{Diagnostics, Sink};
use super::raw::{self, Opt, RawPolicy, Section};

/// Read and validate the policy at `path` (see `policy::file`: a regular
/// file, bounded, UTF-8). An unreadable file is a single diagnostic without
/// a position.
pub fn load(path: &Path) -> Result<Policy, Diagnostics> {
    let bytes = super::file::read(path)?;
    load_bytes(&bytes, path)
}

/// Validate the policy file's `bytes` as read by `policy::file::read`:
/// text that is not UTF-8 is refused, never repaired, so a reload accepts
/// exactly what a start accepts.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<Policy, Diagnostics> {
    parse(super::file::decode(bytes, path)?, path)
}

/// Validate policy `text`; `path` is used for messages and to resolve
/// relative paths (against its folder). Pure: no I/O.
pub fn parse(text: &str, path: &Path) -> Result<Policy, Diagnostics> {
    parse_in(text, path, None)
}

/// A policy fetched from a registry (`-p oci://…`), named `source` in
/// messages: the same reader and validator as a file's, but the host's
/// `state_dir` is given (`--state-dir`), since the policy naming it may not
/// be reachable. It is the default, relative paths are relative to it, and
/// a policy whose own `state_dir` differs is refused.
pub fn load_remote(bytes: &[u8], source: &Path, state_dir: &Path) -> Result<Policy, Diagnostics> {
    parse_in(super::file::decode(bytes, source)?, source, Some(state_dir))
}

fn parse_in(text: &str, path: &Path, state_dir: Option<&Path>) -> Result<Policy, Diagnostics> {
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
    let mut validator = Validator::new(&mut sink, path);
    validator.host_state_dir = state_dir;
    let policy = validator.policy(raw);
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

/// The kinds of rule written as arrays of tables (`[[retain]]`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RuleKind {
    Retain,
    Protect,
    Tags,
    Float,
    Prepull,
    Mirror,
    Scan,
}

impl RuleKind {
    /// The table's key, as written in the policy.
    fn key(self) -> &'static str {
        match self {
            RuleKind::Retain => "retain",
            RuleKind::Protect => "protect",
            RuleKind::Tags => "tags",
            RuleKind::Float => "float",
            RuleKind::Prepull => "prepull",
            RuleKind::Mirror => "mirror",
            RuleKind::Scan => "scan",
        }
    }
}

/// `[[retain]]`: how messages name a kind of rule.
impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[[{}]]", self.key())
    }
}

/// Where a rule is, shown as `retain[2]` (1-based, in file order): the
/// prefix of every message about its keys.
#[derive(Debug, Clone, Copy)]
pub(super) struct At {
    pub(super) kind: RuleKind,
    index: usize,
}

impl At {
    pub(super) fn new(kind: RuleKind, index: usize) -> Self {
        At { kind, index }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.kind.key(), self.index)
    }
}

/// Checks a [`raw::RawPolicy`] into a [`Policy`], reporting to the sink.
pub(super) struct Validator<'s, 'a> {
    sink: &'s mut Sink<'a>,
    /// The policy file, for `source` and for resolving relative paths.
    path: &'a Path,
    /// Rule names seen so far: name -> (rule kind, span), for uniqueness
    /// across every rule kind (the audit log names rules without their kind).
    names: HashMap<String, (RuleKind, Range<usize>)>,
    /// A registry policy's host state dir (`--state-dir`): the default and
    /// the base of relative paths; the policy may not name another.
    pub(super) host_state_dir: Option<&'a Path>,
}

impl<'s, 'a> Validator<'s, 'a> {
    fn new(sink: &'s mut Sink<'a>, path: &'a Path) -> Self {
        Validator {
            sink,
            path,
            names: HashMap::new(),
            host_state_dir: None,
        }
    }

    pub(super) fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
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
        let scan = collect(raw.scan.iter().map(|s| self.scan(s)), &mut ok);
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
            scan,
            storage,
        })
    }

    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else if let Some(dir) = self.host_state_dir {
            dir.join(p)
        } else {
            self.path.parent().unwrap_or_else(|| Path::new("")).join(p)
        }
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

    pub(super) fn missing<T>(&mut self, s: &Section<T>, key: &str, at: At, what: &str) {
        if !s.bad.contains(key) {
            self.err(
                s.span.clone(),
                format!("{at}: missing required key `{key}` ({what})"),
            );
        }
    }

    pub(super) fn rule_name<T>(
        &mut self,
        s: &Section<T>,
        field: &Opt<String>,
        at: At,
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
                self.unique_name(name.to_owned(), v.span(), at.kind, &format!("{at}.name"))
            }
            None => {
                self.missing(s, "name", at, "written into the audit log as the reason");
                None
            }
        }
    }

    pub(super) fn unique_name(
        &mut self,
        name: String,
        span: Range<usize>,
        kind: RuleKind,
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
