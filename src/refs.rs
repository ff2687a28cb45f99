//! Image references as the engine lists them (`repository:tag`,
//! `repository@sha256:...`), split into their parts.
//!
//! Grammar follows the distribution reference format closely enough to reject
//! what the engine would reject, without normalising names: stowage matches
//! references exactly as `RepoTags` shows them.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// The registry the engine uses for references without a host part.
pub const DEFAULT_REGISTRY: &str = "docker.io";

static COMPONENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$").expect("static regex"));
static TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$").expect("static regex"));
static DIGEST: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^sha256:[a-f0-9]{64}$").expect("static regex"));
static HOST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$")
        .expect("static regex")
});

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
                if !DIGEST.is_match(d) {
                    return Err(RefError::Digest(d.to_string()));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (repository, tag) = split_tag(rest);
        if let Some(t) = tag
            && !TAG.is_match(t)
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

/// Validate `host[:port]` as used in `sources`, `registry` and `allowed_registries`.
pub fn validate_host(s: &str) -> Result<(), RefError> {
    if HOST.is_match(s) {
        Ok(())
    } else {
        Err(RefError::Host(s.to_string()))
    }
}

fn validate_repository(repository: &str) -> Result<(), RefError> {
    let bad = || RefError::Repository(repository.to_string());
    if repository.len() > 255 {
        return Err(bad());
    }
    let path = match host_part(repository) {
        Some(h) => {
            validate_host(h).map_err(|_| bad())?;
            &repository[h.len() + 1..]
        }
        None => repository,
    };
    if path.is_empty() || !path.split('/').all(|c| COMPONENT.is_match(c)) {
        return Err(bad());
    }
    Ok(())
}

/// Whether `s` is a valid tag.
pub fn is_valid_tag(s: &str) -> bool {
    TAG.is_match(s)
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
        assert!(validate_host("127.0.0.1:5000").is_ok());
        assert!(validate_host("registry.example.com").is_ok());
        assert!(validate_host("http://x").is_err());
    }
}
