//! Checks of single values, each reporting under the key it was given:
//! repository globs and tag regexes (a rule's scope), cron expressions,
//! durations, counts, sizes, percentages, enumerated words, tags, registry
//! hosts, the metrics address and paths.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};
use regex::{Regex, RegexSet};
use toml::Spanned;

use crate::refs::{check_host, check_tag};

use super::raw::{self, List, Section, SizeValue};
use super::validate::{At, RuleKind, Validator};
use super::{Cron, Globs, Patterns, Scope};

/// `[daemon].schedule` by default, and the example in cron messages.
pub(super) const DEFAULT_SCHEDULE: &str = "0 */10 * * * *";
const DURATION_HINT: &str = r#"write e.g. "30s", "15m", "6h", "14d" or "2w""#;

impl Cron {
    /// Parse a six-field (seconds first) cron expression.
    pub(super) fn parse(source: &str) -> Result<Cron, String> {
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

impl Validator<'_, '_> {
    /// `images` (required) plus optional `tags`.
    pub(super) fn scope<T>(
        &mut self,
        s: &Section<T>,
        images: &List,
        tags: &List,
        at: At,
    ) -> Option<Scope> {
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

    pub(super) fn images<T>(&mut self, s: &Section<T>, images: &List, at: At) -> Option<Globs> {
        match images {
            Some(list) => self.globs(list, &format!("{at}.images")),
            None => {
                // A missing `images` in a retain rule was already explained
                // together with `untagged`.
                if at.kind != RuleKind::Retain {
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
            Ok(set) => Some(Globs { set }),
            Err(e) => {
                self.err(list.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    pub(super) fn patterns(
        &mut self,
        list: &Spanned<Vec<Spanned<String>>>,
        key: &str,
    ) -> Option<Patterns> {
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
    pub(super) fn regex(&mut self, v: &Spanned<String>, key: &str) -> Option<Regex> {
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

    pub(super) fn cron(&mut self, v: &Spanned<String>, key: &str) -> Option<Cron> {
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

    pub(super) fn duration(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        positive: bool,
    ) -> Option<Duration> {
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

    pub(super) fn count(
        &mut self,
        v: &Spanned<i64>,
        key: &str,
        min: i64,
        max: Option<i64>,
    ) -> Option<usize> {
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

    pub(super) fn size(&mut self, v: &Spanned<SizeValue>, key: &str) -> Option<u64> {
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

    pub(super) fn percent(&mut self, v: &Spanned<String>, key: &str) -> Option<f64> {
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

    pub(super) fn choice<T: Copy>(
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

    pub(super) fn tag(&mut self, v: &Spanned<String>, key: &str) -> Option<String> {
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

    pub(super) fn registry(&mut self, v: &Spanned<String>, key: &str) -> Option<String> {
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

    pub(super) fn metrics(&mut self, v: &Spanned<String>) -> Option<String> {
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

    pub(super) fn path_value(&mut self, v: &Spanned<String>, key: &str) -> Option<PathBuf> {
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

pub(super) fn default_schedule() -> Cron {
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
fn parse_size(text: &str) -> Result<u64, String> {
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
