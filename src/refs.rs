//! Image references as the engine lists them (`repository:tag`,
//! `repository@sha256:...`), split into their parts.
//!
//! Grammar follows the distribution reference format closely enough to reject
//! what the engine would reject, without normalising names: stowage matches
//! references exactly as `RepoTags` shows them. The `check_*` functions are the
//! one copy of that grammar; the policy validator uses them for its messages.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The registry the engine uses for references without a host part.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed reference. `repository` keeps its registry host, if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("empty reference")]
    Empty,
    #[error("invalid repository name {0:?}")]
    Repository(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest {0:?} (expected sha256:<64 hex digits>)")]
    Digest(String),
    #[error("invalid registry host {0:?}")]
    Host(String),
}

impl Reference {
    /// Parse `repo[:tag][@digest]`. A reference without tag and digest gets
    /// no implicit `latest`: callers decide.
    pub fn parse(s: &str) -> Result<Self, RefError> {
        if s.is_empty() {
            return Err(RefError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if check_digest(d).is_err() {
                    return Err(RefError::Digest(d.to_string()));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (repository, tag) = split_tag(rest);
        if let Some(t) = tag
            && check_tag(t).is_err()
        {
            return Err(RefError::Tag(t.to_string()));
        }
        validate_repository(repository)?;
        Ok(Self {
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The registry host (`docker.io` when the name has none).
    pub fn registry(&self) -> &str {
        registry_of(&self.repository)
    }

    /// The repository path without its registry host.
    pub fn path(&self) -> &str {
        path_of(&self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Split `repo:tag` at the last `:` after the last `/` (a `:` before it is a port).
pub fn split_tag(s: &str) -> (&str, Option<&str>) {
    let slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[slash..].rfind(':') {
        Some(i) => (&s[..slash + i], Some(&s[slash + i + 1..])),
        None => (s, None),
    }
}

/// Whether the first path component names a registry host, as the engine decides.
fn host_part(repository: &str) -> Option<&str> {
    let (first, _) = repository.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

/// The registry host of a repository (`docker.io` when it has none).
pub fn registry_of(repository: &str) -> &str {
    host_part(repository).unwrap_or(DEFAULT_REGISTRY)
}

/// The repository path without its registry host.
pub fn path_of(repository: &str) -> &str {
    match host_part(repository) {
        Some(h) => &repository[h.len() + 1..],
        None => repository,
    }
}

fn validate_repository(repository: &str) -> Result<(), RefError> {
    let bad = || RefError::Repository(repository.to_string());
    if repository.len() > 255 {
        return Err(bad());
    }
    let path = match host_part(repository) {
        Some(h) => {
            check_host(h).map_err(|_| bad())?;
            &repository[h.len() + 1..]
        }
        None => repository,
    };
    if path.is_empty() || !path.split('/').all(|c| check_path_component(c).is_ok()) {
        return Err(bad());
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`, Docker's repository path grammar.
pub fn check_path_component(part: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err("empty path component (a leading, trailing or doubled `/`)".to_owned());
    }
    if part.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository names must be lowercase, got {part:?}"));
    }
    let bytes = part.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let separator_ok =
        |sep: &[u8]| matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&b| b == b'-');
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &bytes[start..i];
        if start == 0 || i == bytes.len() || !separator_ok(sep) {
            return Err(format!(
                "invalid repository path component {part:?} (lowercase letters and digits, separated by `.`, `_`, `__` or `-`)"
            ));
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || tag.len() > 128 {
        return Err(
            "a tag is 1 to 128 of A-Z a-z 0-9 _ . - and does not start with . or -".to_owned(),
        );
    }
    Ok(())
}

pub fn check_digest(d: &str) -> Result<(), String> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "invalid digest {d:?}: expected \"sha256:\" and 64 lowercase hex digits"
        )),
    }
}

/// `host[:port]`: a DNS name or IPv4 address, or `[IPv6]`, with an optional port.
pub fn check_host(text: &str) -> Result<(), String> {
    if text.contains("://") {
        return Err("write host[:port] without a scheme".to_owned());
    }
    if text.contains('/') {
        return Err("write host[:port] without a path".to_owned());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed `[` in IPv6 address".to_owned())?;
        Ipv6Addr::from_str(addr).map_err(|_| format!("invalid IPv6 address {addr:?}"))?;
        match after {
            "" => ("", None),
            p => (
                "",
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| "expected `:port` after `]`".to_owned())?,
                ),
            ),
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if !text.starts_with('[') {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || !host.split('.').all(label_ok) {
            return Err(
                "expected host[:port], e.g. \"registry.example.com\" or \"10.0.0.5:5000\""
                    .to_owned(),
            );
        }
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err(format!("invalid port {p:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_host_port_repo_and_tag() {
        let r = Reference::parse("127.0.0.1:5000/team/app:v1.2.0").unwrap();
        assert_eq!(r.repository, "127.0.0.1:5000/team/app");
        assert_eq!(r.tag.as_deref(), Some("v1.2.0"));
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.path(), "team/app");
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:v1.2.0");
    }

    #[test]
    fn docker_hub_names_have_the_default_registry() {
        let r = Reference::parse("nginx:1.25").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.path(), "nginx");
        let r = Reference::parse("team/app").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.tag, None);
    }

    #[test]
    fn digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/app@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.registry(), "localhost");
        assert!(matches!(
            Reference::parse("app@sha256:xyz"),
            Err(RefError::Digest(_))
        ));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "App:1", "app:", "a//b", "app:-x", "/app", "app/"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(check_host("127.0.0.1:5000").is_ok());
        assert!(check_host("registry.example.com").is_ok());
        assert!(check_host("http://x").is_err());
    }
}
