//! Diagnostics: `FILE:LINE:COL: error: MESSAGE`, one per problem.
//!
//! Positions come from byte spans of the TOML parser; [`LineIndex`] turns them
//! into 1-based line and column (columns count characters, not bytes, so they
//! agree with what an editor shows).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    /// 1-based; `None` when the problem is not inside the file (e.g. unreadable).
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub col: Option<usize>,
    /// One line, naming the key it is about.
    pub message: String,
}

impl Diagnostic {
    /// A problem with the file as a whole, not at a position.
    pub(super) fn file(path: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            path: path.to_path_buf(),
            line: None,
            col: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.col {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": error: {}", self.message)
    }
}

/// Every problem found in a policy, sorted by position. Never empty when
/// returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Byte offset -> (line, column), both 1-based.
pub(super) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { text, starts }
    }

    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        // Spans may point one past the end (an error at EOF) or, defensively,
        // into the middle of a character: clamp to a char boundary.
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let col = self.text[start..offset].chars().count() + 1;
        (line, col)
    }
}

/// Collects diagnostics while validating, so that every problem is reported.
pub(super) struct Sink<'a> {
    path: &'a Path,
    index: LineIndex<'a>,
    diags: Vec<Diagnostic>,
}

impl<'a> Sink<'a> {
    pub(super) fn new(path: &'a Path, text: &'a str) -> Self {
        Sink {
            path,
            index: LineIndex::new(text),
            diags: Vec::new(),
        }
    }

    /// Report `message` at the start of `span`.
    pub(super) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = self.index.position(span.start);
        self.diags.push(Diagnostic {
            path: self.path.to_path_buf(),
            line: Some(line),
            col: Some(col),
            message: bounded(message.into()),
        });
    }

    /// The 1-based line of a byte offset, for "already used at line N".
    pub(super) fn line_of(&self, offset: usize) -> usize {
        self.index.position(offset).0
    }

    pub(super) fn has_errors(&self) -> bool {
        !self.diags.is_empty()
    }

    /// Sorted by position; exact duplicates (the same problem found twice by
    /// different checks) are reported once.
    pub(super) fn finish(mut self) -> Diagnostics {
        self.diags.sort_by_key(|d| (d.line, d.col));
        self.diags.dedup();
        if self.diags.len() > MAX_DIAGNOSTICS {
            let more = self.diags.len() - MAX_DIAGNOSTICS;
            self.diags.truncate(MAX_DIAGNOSTICS);
            self.diags.push(Diagnostic::file(
                self.path,
                format!("{more} more errors not shown; fix the ones above first"),
            ));
        }
        Diagnostics(self.diags)
    }
}

/// Enough to fix a policy by; a generated file with thousands of bad
/// entries must not print megabytes.
const MAX_DIAGNOSTICS: usize = 200;
/// Characters of one message; messages quote the offending value, which
/// may be megabytes long.
const MAX_MESSAGE_CHARS: usize = 400;

/// `message`, with the middle of an over-long one left out: its start names
/// the key and the value's beginning, its end carries the hint.
fn bounded(message: String) -> String {
    let chars = message.chars().count();
    if chars <= MAX_MESSAGE_CHARS {
        return message;
    }
    let (head, tail) = (MAX_MESSAGE_CHARS * 2 / 3, MAX_MESSAGE_CHARS / 4);
    let at = |n: usize| {
        message
            .char_indices()
            .nth(n)
            .map_or(message.len(), |(i, _)| i)
    };
    format!(
        "{} [... {} characters left out ...] {}",
        &message[..at(head)],
        chars - head - tail,
        &message[at(chars - tail)..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_chars() {
        let idx = LineIndex::new("ab\nçd\n");
        assert_eq!(idx.position(0), (1, 1));
        assert_eq!(idx.position(2), (1, 3));
        assert_eq!(idx.position(3), (2, 1));
        // 'ç' is two bytes: 'd' is byte 5 but column 2.
        assert_eq!(idx.position(5), (2, 2));
        // Inside 'ç' clamps back to its start; past the end clamps to the end.
        assert_eq!(idx.position(4), (2, 1));
        assert_eq!(idx.position(99), (3, 1));
    }

    #[test]
    fn long_messages_and_many_errors_are_bounded() {
        let text = "x".repeat(10_000);
        let mut sink = Sink::new(Path::new("p.toml"), &text);
        let huge = format!(
            "k: invalid tag {:?}: too long; use at most 128 characters",
            "y".repeat(10_000_000)
        );
        sink.error(0..0, huge);
        for i in 0..1000 {
            sink.error(i..i, format!("bad {i}"));
        }
        let all = sink.finish();
        assert_eq!(all.len(), MAX_DIAGNOSTICS + 1);
        let first = &all.0[0].message;
        assert!(
            first.chars().count() < MAX_MESSAGE_CHARS + 60,
            "{}",
            first.len()
        );
        assert!(first.starts_with("k: invalid tag \"yyy"), "{first}");
        assert!(first.ends_with("use at most 128 characters"), "{first}");
        assert!(first.contains("characters left out"), "{first}");
        assert!(
            all.to_string()
                .ends_with("801 more errors not shown; fix the ones above first")
        );
    }

    #[test]
    fn display_formats() {
        let p = Path::new("p.toml");
        let d = Diagnostic {
            path: p.into(),
            line: Some(3),
            col: Some(7),
            message: "boom".into(),
        };
        assert_eq!(d.to_string(), "p.toml:3:7: error: boom");
        assert_eq!(
            Diagnostic::file(p, "gone").to_string(),
            "p.toml: error: gone"
        );
        let all = Diagnostics(vec![d.clone(), d]);
        assert_eq!(
            all.to_string(),
            "p.toml:3:7: error: boom\np.toml:3:7: error: boom"
        );
    }
}
