//! `[[scan]]`: admission checks. A rule is a name, a scope (every
//! repository unless `images` is written), an argv with the placeholders
//! `{ref}`, `{image}` and `{archive}`, `on_fail` and a `timeout`.

use std::time::Duration;

use globset::{Glob, GlobSetBuilder};
use toml::Spanned;

use super::raw::{self, Section};
use super::validate::{At, RuleKind, Validator};
use super::{BUILTIN_SECRETS, Globs, OnFail, Scan, Scope};

/// `timeout` when not written.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The placeholders a command may use.
pub(crate) const PLACEHOLDERS: &[&str] = &["ref", "image", "archive"];

impl Validator<'_, '_> {
    pub(super) fn scan(&mut self, s: &Section<raw::RawScan>) -> Option<Scan> {
        let r = &s.raw;
        let at = At::new(RuleKind::Scan, s.index);
        let name = self.rule_name(s, &r.name, at);
        let scope = match &r.images {
            Some(_) => self.scope(s, &r.images, &r.tags, at),
            None => {
                let tags = match &r.tags {
                    Some(list) => self.patterns(list, &format!("{at}.tags")).map(Some),
                    None => Some(None),
                };
                tags.map(|tags| Scope {
                    images: every_repository(),
                    tags,
                })
            }
        };
        let command = match &r.command {
            Some(list) => self.command(list, at),
            None => {
                self.missing(
                    s,
                    "command",
                    at,
                    "an argv array like [\"trivy\", \"image\", \"--input\", \"{archive}\"], or [\"builtin:secrets\"]",
                );
                None
            }
        };
        let on_fail = match &r.on_fail {
            Some(v) => self.choice(
                v,
                &format!("{at}.on_fail"),
                &[("block", OnFail::Block), ("warn", OnFail::Warn)],
            ),
            None => Some(OnFail::Block),
        };
        let timeout = match &r.timeout {
            Some(v) => self.duration(v, &format!("{at}.timeout"), true),
            None => Some(DEFAULT_TIMEOUT),
        };
        Some(Scan {
            name: name?,
            scope: scope?,
            command: command?,
            on_fail: on_fail?,
            timeout: timeout?,
        })
    }

    fn command(&mut self, list: &Spanned<Vec<Spanned<String>>>, at: At) -> Option<Vec<String>> {
        let argv = list.get_ref();
        if argv.is_empty() {
            self.err(list.span(), format!("{at}.command: must not be empty"));
            return None;
        }
        let mut ok = true;
        for (i, arg) in argv.iter().enumerate() {
            let key = format!("{at}.command[{}]", i + 1);
            let text = arg.get_ref();
            if i == 0 && text.trim().is_empty() {
                self.err(arg.span(), format!("{key}: the program must not be empty"));
                ok = false;
            } else if text.contains('\0') {
                self.err(arg.span(), format!("{key}: must not contain NUL"));
                ok = false;
            } else if text.starts_with("builtin:") && (i > 0 || text != BUILTIN_SECRETS) {
                self.err(
                    arg.span(),
                    format!("{key}: {text:?} is not a built-in scan; the only one is [\"{BUILTIN_SECRETS}\"], alone"),
                );
                ok = false;
            } else if let Err(bad) = check_placeholders(text) {
                self.err(
                    arg.span(),
                    format!("{key}: unknown placeholder {{{bad}}}; use {{ref}}, {{image}} or {{archive}}"),
                );
                ok = false;
            }
        }
        if ok && argv[0].get_ref() == BUILTIN_SECRETS && argv.len() > 1 {
            self.err(
                argv[1].span(),
                format!("{at}.command: [\"{BUILTIN_SECRETS}\"] takes no arguments"),
            );
            ok = false;
        }
        ok.then(|| argv.iter().map(|a| a.get_ref().clone()).collect())
    }
}

/// Every `{word}` in `text` names a placeholder; `Err(word)` for the first
/// that does not. Braces without a word between them are plain text.
pub(crate) fn check_placeholders(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let word = &after[..close];
        if !word.is_empty()
            && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !PLACEHOLDERS.contains(&word)
        {
            return Err(word.to_owned());
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// The scope of a rule that writes no `images`: every repository.
fn every_repository() -> Globs {
    let mut b = GlobSetBuilder::new();
    // `**` is a valid glob; building it cannot fail.
    if let Ok(g) = Glob::new("**") {
        b.add(g);
    }
    Globs {
        set: b.build().unwrap_or_else(|_| globset::GlobSet::empty()),
    }
}
