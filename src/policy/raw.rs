//! Stage one: the TOML document, deserialized into raw structs with spans.
//!
//! serde stops at the first error of a `deserialize` call, but an operator
//! wants every problem at once. So the document is parsed into a spanned tree
//! first, and each key of each table is then checked on its own: unknown keys
//! are found by comparing against the struct's own field list, and each known
//! key is deserialized separately, so one bad value does not hide the next.
//! Only the keys that passed are deserialized together into the raw struct.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, forward_to_deserialize_any};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::diag::Sink;

/// An optional key, with the span of its value.
pub(super) type Opt<T> = Option<Spanned<T>>;
/// An optional array of strings, each element with its own span.
pub(super) type List = Opt<Vec<Spanned<String>>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub schedule: Opt<String>,
    pub watch: Opt<bool>,
    pub state_dir: Opt<String>,
    pub audit_log: Opt<String>,
    pub audit_max: Opt<SizeValue>,
    pub cache_dir: Opt<String>,
    pub cache_max: Opt<SizeValue>,
    pub inbox: Opt<String>,
    pub dry_run: Opt<bool>,
    pub min_age: Opt<String>,
    // Counts are read as i64 so a negative number gets our own message
    // ("must be at least 1") instead of a serde type error.
    pub max_removals: Opt<i64>,
    pub concurrency: Opt<i64>,
    pub retry_max: Opt<String>,
    pub allowed_registries: List,
    pub control_socket: Opt<String>,
    pub metrics: Opt<String>,
    pub credentials_file: Opt<String>,
    pub stall_timeout: Opt<String>,
    pub policy_poll: Opt<String>,
    pub trash: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetain {
    pub name: Opt<String>,
    pub images: List,
    pub tags: List,
    pub untagged: Opt<bool>,
    pub keep_last: Opt<i64>,
    // Enum-like keys are strings here so that a bad value gets a
    // "did you mean" suggestion from validation.
    pub order: Opt<String>,
    pub group_by: Opt<String>,
    pub keep_within: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProtect {
    pub name: Opt<String>,
    pub images: List,
    pub tags: List,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTags {
    pub name: Opt<String>,
    pub images: List,
    pub allow: List,
    pub on_violation: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFloat {
    pub name: Opt<String>,
    pub images: List,
    pub tag: Opt<String>,
    pub follow: Opt<String>,
    pub order: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrepull {
    pub image: Opt<String>,
    pub digest: Opt<String>,
    pub platform: Opt<String>,
    pub refresh: Opt<String>,
    pub sources: List,
    pub keep_previous: Opt<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMirror {
    pub name: Opt<String>,
    pub registry: Opt<String>,
    pub images: List,
    pub tags: List,
    pub prefix: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScan {
    pub name: Opt<String>,
    pub images: List,
    pub tags: List,
    pub command: List,
    pub on_fail: Opt<String>,
    pub timeout: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub max_size: Opt<SizeValue>,
    pub high_watermark: Opt<String>,
    pub low_watermark: Opt<String>,
    pub order: Opt<String>,
    pub build_cache_max: Opt<SizeValue>,
}

/// A size as written: `"20GiB"`, or a plain integer number of bytes.
#[derive(Debug, Clone)]
pub(super) enum SizeValue {
    Text(String),
    Bytes(i64),
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size like "500MB" or "20GiB", or an integer number of bytes"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeValue, E> {
                Ok(SizeValue::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeValue, E> {
                i64::try_from(v)
                    .map(SizeValue::Bytes)
                    .map_err(|_| E::custom("size is too large"))
            }
        }
        d.deserialize_any(V)
    }
}

/// One table of the document (`[daemon]`, or one `[[retain]]` entry).
#[derive(Debug)]
pub(super) struct Section<T> {
    /// The table's header (or inline table), for "missing key" messages.
    pub span: Range<usize>,
    /// 1-based position among `[[kind]]` entries; 0 for single tables.
    pub index: usize,
    pub raw: T,
    /// Keys that were present but had a wrong type: already reported, so
    /// validation must not also call them missing.
    pub bad: BTreeSet<String>,
}

impl<T> Section<T> {
    /// The key was written, whether or not its value was usable.
    pub fn written<V>(&self, field: &Option<V>, key: &str) -> bool {
        field.is_some() || self.bad.contains(key)
    }
}

/// The whole document, structurally checked.
#[derive(Debug, Default)]
pub(super) struct RawPolicy {
    /// `None`: the key is missing (or had the wrong type, already reported
    /// when `version_written`).
    pub version: Opt<i64>,
    pub version_written: bool,
    pub daemon: Option<Section<RawDaemon>>,
    pub retain: Vec<Section<RawRetain>>,
    pub protect: Vec<Section<RawProtect>>,
    pub tags: Vec<Section<RawTags>>,
    pub float: Vec<Section<RawFloat>>,
    pub prepull: Vec<Section<RawPrepull>>,
    pub mirror: Vec<Section<RawMirror>>,
    pub scan: Vec<Section<RawScan>>,
    pub storage: Option<Section<RawStorage>>,
}

const TOP_KEYS: &[&str] = &[
    "version", "daemon", "retain", "protect", "tags", "float", "prepull", "mirror", "scan",
    "storage",
];

/// Read the parsed document into raw sections, reporting unknown keys and
/// wrong types (all of them) to `sink`.
pub(super) fn read(doc: &DeTable<'_>, sink: &mut Sink<'_>) -> RawPolicy {
    let mut out = RawPolicy::default();
    for (key, value) in sorted(doc) {
        match key.get_ref().as_ref() {
            "version" => {
                out.version_written = true;
                match value.get_ref() {
                    DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                        Ok(n) => out.version = Some(Spanned::new(value.span(), n)),
                        Err(_) => sink.error(value.span(), "version: integer is out of range"),
                    },
                    other => sink.error(
                        value.span(),
                        format!(
                            "version: expected the integer 1, found {}",
                            other.type_str()
                        ),
                    ),
                }
            }
            "daemon" => out.daemon = single(value, "daemon", sink),
            "storage" => out.storage = single(value, "storage", sink),
            "retain" => out.retain = array(value, "retain", sink),
            "protect" => out.protect = array(value, "protect", sink),
            "tags" => out.tags = array(value, "tags", sink),
            "float" => out.float = array(value, "float", sink),
            "prepull" => out.prepull = array(value, "prepull", sink),
            "mirror" => out.mirror = array(value, "mirror", sink),
            "scan" => out.scan = array(value, "scan", sink),
            other => {
                // A daemon or storage key written before any table header
                // lands at the top level: say where it belongs.
                let home = if fields_of::<RawDaemon>().contains(&other) {
                    Some("[daemon]")
                } else if fields_of::<RawStorage>().contains(&other) {
                    Some("[storage]")
                } else {
                    None
                };
                let msg = match home {
                    Some(table) => format!(
                        "unknown key `{other}` at the top level; it belongs in {table} (below that header)"
                    ),
                    None => unknown_key(other, "the top level", TOP_KEYS),
                };
                sink.error(key.span(), msg);
            }
        }
    }
    out
}

/// Table entries in document order (the map itself is sorted by key).
fn sorted<'a, 'i>(
    table: &'a DeTable<'i>,
) -> Vec<(
    &'a Spanned<toml::de::DeString<'i>>,
    &'a Spanned<DeValue<'i>>,
)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    entries
}

/// `[daemon]` / `[storage]`: exactly one table.
fn single<T: DeserializeOwned + Default>(
    value: &Spanned<DeValue<'_>>,
    key: &str,
    sink: &mut Sink<'_>,
) -> Option<Section<T>> {
    match value.get_ref() {
        DeValue::Table(t) => Some(section(t, value.span(), 0, key, &format!("[{key}]"), sink)),
        DeValue::Array(_) => {
            sink.error(
                value.span(),
                format!("`{key}` must be a single table: write [{key}], not [[{key}]]"),
            );
            None
        }
        other => {
            sink.error(
                value.span(),
                format!(
                    "`{key}` must be a table ([{key}]), found {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// `[[retain]]` and friends: an array of tables, each checked on its own.
fn array<T: DeserializeOwned + Default>(
    value: &Spanned<DeValue<'_>>,
    key: &str,
    sink: &mut Sink<'_>,
) -> Vec<Section<T>> {
    let items = match value.get_ref() {
        DeValue::Array(items) => items,
        DeValue::Table(_) => {
            sink.error(
                value.span(),
                format!("`{key}` must be an array of tables: write [[{key}]], not [{key}]"),
            );
            return Vec::new();
        }
        other => {
            sink.error(
                value.span(),
                format!(
                    "`{key}` must be an array of tables ([[{key}]]), found {}",
                    other.type_str()
                ),
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let index = i + 1;
        match item.get_ref() {
            DeValue::Table(t) => {
                let label = match name_of(t) {
                    Some(name) => format!("[[{key}]] {name:?}"),
                    None => format!("[[{key}]] #{index}"),
                };
                let path = format!("{key}[{index}]");
                out.push(section(t, item.span(), index, &path, &label, sink));
            }
            other => sink.error(
                item.span(),
                format!(
                    "{key}[{index}]: expected a table, found {}",
                    other.type_str()
                ),
            ),
        }
    }
    out
}

fn name_of(t: &DeTable<'_>) -> Option<String> {
    t.iter()
        .find(|(k, _)| k.get_ref() == "name")
        .and_then(|(_, v)| v.get_ref().as_str().map(str::to_owned))
}

/// Check one table key by key, then deserialize the keys that passed.
///
/// `path` prefixes value errors (`retain[2].keep_last`); `label` names the
/// table in unknown-key errors (`[[retain]] "old-builds"`).
fn section<T: DeserializeOwned + Default>(
    table: &DeTable<'_>,
    span: Range<usize>,
    index: usize,
    path: &str,
    label: &str,
    sink: &mut Sink<'_>,
) -> Section<T> {
    let fields = fields_of::<T>();
    let mut good = DeTable::new();
    let mut bad = BTreeSet::new();
    for (key, value) in sorted(table) {
        let name: &str = key.get_ref();
        if !fields.contains(&name) {
            sink.error(key.span(), unknown_key(name, label, fields));
            continue;
        }
        let mut one = DeTable::new();
        one.insert(key.clone(), value.clone());
        match deserialize::<T>(one, span.clone()) {
            Ok(_) => {
                good.insert(key.clone(), value.clone());
            }
            Err(e) => {
                let at = e.span().unwrap_or_else(|| value.span());
                sink.error(at, format!("{path}.{name}: {}", friendly(e.message())));
                bad.insert(name.to_owned());
            }
        }
    }
    let raw = match deserialize::<T>(good, span.clone()) {
        Ok(raw) => raw,
        Err(e) => {
            // Each key passed alone, so this is not expected; report rather
            // than panic.
            sink.error(
                e.span().unwrap_or_else(|| span.clone()),
                format!("{path}: {}", friendly(e.message())),
            );
            T::default()
        }
    };
    Section {
        span,
        index,
        raw,
        bad,
    }
}

fn deserialize<T: DeserializeOwned>(
    table: DeTable<'_>,
    span: Range<usize>,
) -> Result<T, toml::de::Error> {
    T::deserialize(ValueDeserializer::from(Spanned::new(
        span,
        DeValue::Table(table),
    )))
}

/// serde's wording, in the words of a TOML user.
fn friendly(message: &str) -> String {
    message
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table")
        .replace("expected a borrowed string", "expected a string")
}

/// "unknown key `x` in LABEL; did you mean `y`?" or the list of known keys.
pub(super) fn unknown_key(key: &str, label: &str, known: &[&str]) -> String {
    let label = if label == "the top level" {
        "at the top level".to_owned()
    } else {
        format!("in {label}")
    };
    match suggest(key, known) {
        Some(s) => format!("unknown key `{key}` {label}; did you mean `{s}`?"),
        None => {
            let list: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            format!(
                "unknown key `{key}` {label}; expected one of {}",
                list.join(", ")
            )
        }
    }
}

/// The closest known word, when it is close enough to be a typo: at most
/// two edits (a swap counts as one), or a long shared prefix.
pub(super) fn suggest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(word, k),
                strsim::jaro_winkler(word, k),
                *k,
            )
        })
        .filter(|(edits, jw, k)| {
            (*edits <= 2 && *edits < k.len().min(word.len()).max(1)) || *jw >= 0.85
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, k)| k)
}

/// The field names a derived `Deserialize` struct accepts, read from the
/// derive itself (it passes them to `deserialize_struct`), so the list of
/// known keys can never drift from the struct.
pub(super) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The probe always fails on purpose; only the captured list matters.
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

#[derive(Debug)]
struct ProbeDone;

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for ProbeDone {}

impl de::Error for ProbeDone {
    fn custom<M: fmt::Display>(_: M) -> Self {
        ProbeDone
    }
}

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        *self.0 = fields;
        Err(ProbeDone)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_lists_come_from_the_structs() {
        assert!(fields_of::<RawRetain>().contains(&"keep_last"));
        assert!(fields_of::<RawDaemon>().contains(&"credentials_file"));
        assert_eq!(fields_of::<RawProtect>(), &["name", "images", "tags"]);
    }

    #[test]
    fn suggestions_only_for_typos() {
        let known = fields_of::<RawRetain>();
        assert_eq!(suggest("keep_lst", known), Some("keep_last"));
        assert_eq!(suggest("image", known), Some("images"));
        assert_eq!(suggest("zzz", known), None);
        assert_eq!(suggest("lur", &["lru", "created"]), Some("lru"));
        assert_eq!(suggest("x", &["lru", "created"]), None);
    }
}
