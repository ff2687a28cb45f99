//! Formatting for people, shared by plans, logs, `status` and audit
//! reasons: sizes, durations, ages, shortened ids, and error text on one
//! line cut at 2 KB. A leaf: it imports nothing of the crate.

use std::fmt;

/// `1.5 GB`-style sizes (decimal units, as `docker images` shows them).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Compact durations for reasons: the largest whole unit (`45d`, `5h`, `10m`).
pub fn human_duration(secs: i64) -> String {
    Human(secs).to_string()
}

/// [`human_duration`] written in place, without a string of its own.
pub struct Human(pub i64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        units(f, self.0, 86_400)
    }
}

/// Ages in `status` columns: as [`human_duration`], but days only from two
/// days on (`36h` rather than `1d`), where the difference still matters.
pub fn human_age(secs: i64) -> String {
    struct Age(i64);
    impl fmt::Display for Age {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            units(f, self.0, 2 * 86_400)
        }
    }
    Age(secs).to_string()
}

/// The largest whole unit of `secs` (negative counts as 0), days from
/// `days_from` seconds on.
fn units(f: &mut fmt::Formatter<'_>, secs: i64, days_from: i64) -> fmt::Result {
    match secs.max(0) {
        s if s >= days_from => write!(f, "{}d", s / 86_400),
        s if s >= 3_600 => write!(f, "{}h", s / 3_600),
        s if s >= 60 => write!(f, "{}m", s / 60),
        s => write!(f, "{s}s"),
    }
}

/// The first 12 characters of an image id or digest's hex (`sha256:`
/// dropped), for display. Ids and digests come from an engine or a
/// registry and are not trusted to be ASCII: never sliced inside a character.
pub fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    first_chars(hex, 12)
}

/// A digest shortened for display, keeping its algorithm: `sha256:0123456789ab`.
pub fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &digest[..digest.len() - hex.len() + first_chars(hex, 12).len()]
}

fn first_chars(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// What kind of file `t` is, with its article ("a FIFO"), for messages
/// that refuse a path: a policy that is not a regular file, a
/// `control_socket` that is not a socket.
pub fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Longest engine or registry message kept in an error, in bytes. A registry
/// (or a proxy before it) may answer an error with megabytes of HTML, which
/// the engine passes on whole; uncut, it lands in the log, the audit record
/// and the state's backoff entry at every attempt.
pub const MAX_MESSAGE: usize = 2048;

/// `text` on one line, cut after [`MAX_MESSAGE`] bytes with a marker saying
/// how much was cut. Secrets must be redacted before: a cut could split one.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE + 64));
    let mut words = text.split_whitespace();
    for word in words.by_ref() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() > MAX_MESSAGE {
            break;
        }
    }
    if out.len() <= MAX_MESSAGE {
        return out;
    }
    let mut end = MAX_MESSAGE;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    // What is left, counted as it would have been joined.
    let rest = out.len() - end + words.map(|w| w.len() + 1).sum::<usize>();
    out.truncate(end);
    out.push_str(&format!(" … [{rest} more bytes cut]"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms_never_cut_a_character() {
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("sha256:abc"), "abc");
        assert_eq!(short_id("sha256:"), "");
        assert_eq!(short_id("sha256:éééééééééééééé"), "éééééééééééé");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
        assert_eq!(short_digest("sha256:ééééééééééééé€"), "sha256:éééééééééééé");
        assert_eq!(short_digest("x"), "x");
    }

    #[test]
    fn durations_and_ages_differ_only_below_two_days() {
        assert_eq!(human_duration(90_000), "1d");
        assert_eq!(human_age(90_000), "25h");
        assert_eq!(human_age(2 * 86_400), "2d");
        assert_eq!(human_duration(-5), "0s");
        assert_eq!(human_age(61), "1m");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
    }

    #[test]
    fn long_messages_are_cut_with_a_marker() {
        assert_eq!(one_line(" a \n b\t"), "a b");
        let page = "é".repeat(3000);
        let cut = one_line(&page);
        assert!(cut.len() < MAX_MESSAGE + 40, "{}", cut.len());
        let kept = cut.split(" … [").next().unwrap();
        assert_eq!(kept.len(), MAX_MESSAGE, "cut on a character boundary");
        assert!(cut.ends_with(&format!("[{} more bytes cut]", 6000 - MAX_MESSAGE)));
        // Many words: the rest is counted with its spaces.
        let words = "ab ".repeat(1000);
        let cut = one_line(&words);
        assert!(
            cut.ends_with(&format!("[{} more bytes cut]", 2999 - MAX_MESSAGE)),
            "{cut}"
        );
    }
}
