//! `builtin:secrets`: every file of every layer of an image's export (a
//! `docker save` tar, read as a stream: nothing is held whole) matched
//! against the rules of `rules.toml`. A file a later layer deletes is still
//! in the image, so each layer is read on its own. Findings carry the kind,
//! layer, file and line and at most a token's public prefix: the secret
//! itself is never kept.

use std::collections::BTreeSet;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use regex::bytes::{Regex, RegexSet};
use serde::Deserialize;

/// The rules, as shipped.
pub const RULES_TOML: &str = include_str!("rules.toml");
/// Bytes of one line looked at at once; a longer line is read in windows
/// of this size overlapping by `OVERLAP`, so memory stays bounded.
const LINE_MAX: usize = 64 * 1024;
const OVERLAP: usize = 512;
/// Files whose first bytes hold a NUL are binaries (ELF, images): skipped,
/// as gitleaks and trufflehog skip binary files.
const SNIFF: usize = 8 * 1024;
/// Findings kept per image (the count goes on).
const FINDINGS_MAX: usize = 100;

#[derive(Debug, Deserialize)]
struct RawRules {
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    kind: String,
    #[allow(dead_code)] // documentation in the data file
    source: String,
    regex: String,
    #[serde(default)]
    files: Vec<String>,
    entropy: Option<f64>,
    #[serde(default)]
    show: usize,
    #[allow(dead_code)] // read by the tests
    example: String,
    #[allow(dead_code)]
    clean: String,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Position in [`RULES`] (and in [`SET`]).
    index: usize,
    pub id: String,
    pub kind: String,
    regex: Regex,
    files: Vec<String>,
    entropy: Option<f64>,
    show: usize,
}

impl Rule {
    fn applies_to(&self, path: &str) -> bool {
        self.files.is_empty()
            || self
                .files
                .iter()
                .any(|f| path == f.as_str() || path.ends_with(&format!("/{f}")))
    }
}

/// The shipped rules, compiled once (tested: they compile).
pub static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    let raw: RawRules = toml::from_str(RULES_TOML).expect("rules.toml parses (tested)");
    raw.rule
        .into_iter()
        .enumerate()
        .map(|(index, r)| Rule {
            index,
            regex: Regex::new(&r.regex).expect("rules.toml regexes compile (tested)"),
            id: r.id,
            kind: r.kind,
            files: r.files,
            entropy: r.entropy,
            show: r.show,
        })
        .collect()
});

/// Every rule's regex in one automaton: a line is matched once, and only
/// the rules it hits run again for their captures.
static SET: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new(RULES.iter().map(|r| r.regex.as_str()))
        .expect("rules.toml regexes compile (tested)")
});

/// The same, multi-line, over a whole chunk read: a chunk it does not match
/// holds no line any rule matches (`^` matching at every line start only
/// widens it), so its lines are not looked at one by one.
static CHUNK_SET: LazyLock<RegexSet> = LazyLock::new(|| {
    regex::bytes::RegexSetBuilder::new(RULES.iter().map(|r| r.regex.as_str()))
        .multi_line(true)
        .build()
        .expect("rules.toml regexes compile (tested)")
});

/// One leaked secret, named but never shown.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub layer: String,
    pub file: String,
    pub line: u64,
    pub rule: String,
    pub kind: String,
    /// At most the rule's public prefix (`ghp_`), then `…`.
    pub masked: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) in /{}:{} of layer {}",
            self.kind, self.masked, self.file, self.line, self.layer
        )
    }
}

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The first `FINDINGS_MAX`, sorted.
    pub findings: Vec<Finding>,
    pub total: usize,
    /// Layer bytes read (uncompressed).
    pub bytes: u64,
    pub files: u64,
}

/// Scans the export at `archive`. `stop` is polled between files.
pub fn scan_archive(archive: &Path, stop: &AtomicBool) -> std::io::Result<Report> {
    let file = std::fs::File::open(archive)?;
    let mut outer = tar::Archive::new(BufReader::with_capacity(256 * 1024, file));
    let mut report = Report::default();
    let mut seen = BTreeSet::new();
    for entry in outer.entries()? {
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("stopped"));
        }
        let entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        let layer = layer_name(&name);
        scan_maybe_layer(entry, &layer, stop, &mut report, &mut seen)?;
    }
    report.findings = seen.into_iter().collect();
    Ok(report)
}

/// A short name for a layer entry: `<hex>/layer.tar` or `blobs/sha256/<hex>`.
fn layer_name(entry: &str) -> String {
    let hex = entry
        .split('/')
        .find(|p| p.len() >= 12 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or(entry);
    hex.chars().take(12).collect()
}

/// A layer is a tar, maybe gzip'd; anything else (config, manifests) is
/// skipped after its first bytes.
fn scan_maybe_layer<R: Read>(
    mut entry: R,
    layer: &str,
    stop: &AtomicBool,
    report: &mut Report,
    seen: &mut BTreeSet<Finding>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    (&mut entry).take(512).read_to_end(&mut head)?;
    let whole = std::io::Cursor::new(head.clone()).chain(entry);
    if head.starts_with(&[0x1f, 0x8b]) {
        let gz = flate2::read::GzDecoder::new(whole);
        return scan_layer(gz, layer, stop, report, seen);
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return scan_layer(whole, layer, stop, report, seen);
    }
    Ok(())
}

fn scan_layer<R: Read>(
    reader: R,
    layer: &str,
    stop: &AtomicBool,
    report: &mut Report,
    seen: &mut BTreeSet<Finding>,
) -> std::io::Result<()> {
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries()? {
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("stopped"));
        }
        let entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_owned();
        report.files += 1;
        report.bytes += entry.size();
        scan_file(entry, &path, layer, report, seen)?;
    }
    Ok(())
}

/// One file, line by line in bounded windows.
pub fn scan_file<R: Read>(
    mut file: R,
    path: &str,
    layer: &str,
    report: &mut Report,
    seen: &mut BTreeSet<Finding>,
) -> std::io::Result<()> {
    let rules: Vec<&Rule> = RULES.iter().filter(|r| r.applies_to(path)).collect();
    let mut buf: Vec<u8> = Vec::with_capacity(LINE_MAX + OVERLAP);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut line = 1u64;
    let mut first = true;
    loop {
        let n = file.read(&mut chunk)?;
        if first {
            first = false;
            if chunk[..n.min(SNIFF)].contains(&0) {
                // Binary: read past it unscanned.
                std::io::copy(&mut file, &mut std::io::sink())?;
                return Ok(());
            }
        }
        if n == 0 {
            if !buf.is_empty() {
                check(&buf, &rules, path, layer, line, report, seen);
            }
            return Ok(());
        }
        let mut data = &chunk[..n];
        let quiet = !CHUNK_SET.is_match(data);
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                // A whole line of a chunk no rule matches.
                Some(i) if quiet && buf.is_empty() => {
                    line += 1;
                    data = &data[i + 1..];
                }
                Some(i) => {
                    let room = LINE_MAX + OVERLAP - buf.len();
                    buf.extend_from_slice(&data[..i.min(room)]);
                    if i > room {
                        // The rest of an over-long line: the window moves on.
                        window(
                            &mut buf,
                            &rules,
                            path,
                            layer,
                            line,
                            report,
                            seen,
                            &data[room..i],
                        );
                    }
                    check(&buf, &rules, path, layer, line, report, seen);
                    buf.clear();
                    line += 1;
                    data = &data[i + 1..];
                }
                None => {
                    window(&mut buf, &rules, path, layer, line, report, seen, data);
                    data = &[];
                }
            }
        }
    }
}

/// Appends `more` to the line so far, checking and sliding the window
/// whenever it fills (keeping `OVERLAP` bytes so a secret across the cut is
/// still seen whole).
#[allow(clippy::too_many_arguments)]
fn window(
    buf: &mut Vec<u8>,
    rules: &[&Rule],
    path: &str,
    layer: &str,
    line: u64,
    report: &mut Report,
    seen: &mut BTreeSet<Finding>,
    mut more: &[u8],
) {
    while !more.is_empty() {
        let room = LINE_MAX + OVERLAP - buf.len();
        let take = room.min(more.len());
        buf.extend_from_slice(&more[..take]);
        more = &more[take..];
        if buf.len() == LINE_MAX + OVERLAP {
            check(buf, rules, path, layer, line, report, seen);
            buf.drain(..LINE_MAX);
        }
    }
}

fn check(
    text: &[u8],
    rules: &[&Rule],
    path: &str,
    layer: &str,
    line: u64,
    report: &mut Report,
    seen: &mut BTreeSet<Finding>,
) {
    // (finding, from a generic rule): a line a specific rule names is not
    // named again by a generic one (`_authToken=` is npm's, not "a secret").
    let mut here: Vec<(Finding, bool)> = Vec::new();
    let hits = SET.matches(text);
    if !hits.matched_any() {
        return;
    }
    for rule in rules.iter().filter(|r| hits.matched(r.index)) {
        for caps in rule.regex.captures_iter(text) {
            let Some(m) = caps.name("secret").or_else(|| caps.get(0)) else {
                continue;
            };
            let secret = m.as_bytes();
            if let Some(min) = rule.entropy
                && entropy(secret) < min
            {
                continue;
            }
            let shown: String =
                String::from_utf8_lossy(&secret[..rule.show.min(secret.len())]).into_owned();
            here.push((
                Finding {
                    layer: layer.to_owned(),
                    file: path.to_owned(),
                    line,
                    rule: rule.id.clone(),
                    kind: rule.kind.clone(),
                    masked: format!("{shown}…"),
                },
                rule.entropy.is_some(),
            ));
        }
    }
    let specific = here.iter().any(|(_, generic)| !generic);
    for (f, generic) in here {
        if (generic && specific) || seen.contains(&f) {
            continue;
        }
        report.total += 1;
        if seen.len() < FINDINGS_MAX {
            seen.insert(f);
        }
    }
}

/// Shannon entropy in bits per byte.
fn entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawRules {
        toml::from_str(RULES_TOML).unwrap()
    }

    fn findings(path: &str, text: &[u8]) -> Vec<Finding> {
        let mut report = Report::default();
        let mut seen = BTreeSet::new();
        scan_file(text, path, "l", &mut report, &mut seen).unwrap();
        seen.into_iter().collect()
    }

    /// The file a rule's example is tried in: its first `files` entry.
    fn home(r: &RawRule) -> String {
        r.files
            .first()
            .map_or_else(|| "etc/app.conf".to_owned(), |f| format!("app/{f}"))
    }

    /// A test per rule: its example is found by exactly that rule, its
    /// clean line by none, and nothing of the secret but its prefix shows.
    #[test]
    fn every_rule_finds_its_example_and_not_its_clean_line() {
        assert_eq!(RULES.len(), raw().rule.len());
        for r in raw().rule {
            let example = r.example.replace("@@", "");
            let got = findings(&home(&r), example.as_bytes());
            assert!(
                got.iter().any(|f| f.rule == r.id),
                "rule {} misses its example: {got:?}",
                r.id
            );
            for f in &got {
                assert!(f.masked.chars().count() <= r.show.max(11) + 1, "{f:?}");
            }
            let clean = findings(&home(&r), r.clean.as_bytes());
            assert!(
                clean.is_empty(),
                "rule {}: clean line found: {clean:?}",
                r.id
            );
        }
    }

    #[test]
    fn file_rules_apply_only_to_their_files() {
        let line = b"STRIPE_KEY=sk_live_abc123";
        assert!(!findings("app/.env", line).is_empty());
        assert!(findings("app/settings.txt", line).is_empty());
        assert!(
            !findings(
                "root/.docker/config.json",
                br#"{"auths":{"r":{"auth":"dXNlcjpwYXNz"}}}"#
            )
            .is_empty()
        );
        assert!(
            findings(
                "root/config.json",
                br#"{"auths":{"r":{"auth":"dXNlcjpwYXNz"}}}"#
            )
            .is_empty()
        );
    }

    #[test]
    fn line_numbers_count_from_one() {
        let text = b"a\nb\npassword: 'Zq8#kLm2!xVb9pQr'\n";
        let got = findings("x", text);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].line, 3);
        assert_eq!(got[0].masked, "…");
    }

    #[test]
    fn a_secret_deep_in_a_very_long_line_is_found_in_bounded_memory() {
        let mut text = vec![b'x'; 3 * LINE_MAX + 100];
        text.push(b' ');
        let token = format!("ghp_{}", "R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234");
        text.extend_from_slice(token.as_bytes());
        text.push(b' ');
        text.extend_from_slice(&[b'y'; 5000]);
        text.extend_from_slice(b"\nnext\n");
        let got = findings("x", &text);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].line, 1);
        assert_eq!(got[0].masked, "ghp_…");
        // Across a window's cut too.
        let mut text = vec![b'x'; LINE_MAX - 10];
        text.push(b' ');
        text.extend_from_slice(token.as_bytes());
        text.push(b',');
        text.extend_from_slice(&[b'z'; LINE_MAX]);
        assert_eq!(findings("x", &text).len(), 1);
    }

    #[test]
    fn binaries_are_skipped() {
        let mut text = b"\x7fELF\0\0\0".to_vec();
        text.extend_from_slice(b"password = 'Zq8#kLm2!xVb9pQr'\n");
        assert!(findings("bin/x", &text).is_empty());
    }

    #[test]
    fn low_entropy_assignments_are_not_secrets() {
        assert!(findings("x", b"password = aaaaaaaaaaaaaaaa").is_empty());
        assert!(findings("x", b"secret: ${SECRET_FROM_ENV_VAR}").is_empty());
    }
}
