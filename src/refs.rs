//! Image references as the engine lists them (`repository:tag`,
//! `repository@sha256:...`), split into their parts.
//!
//! Grammar follows the distribution reference format closely enough to reject
//! what the engine would reject, without normalising names: stowage matches
//! references exactly as `RepoTags` shows them. This is the one copy of that
//! grammar: `Reference::parse` for what the engine and the state hold,
//! `Reference::parse_explicit` and the `check_*` functions for the policy
//! validator, which words their messages.

use std::borrow::Cow;
use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The registry the engine uses for references without a host part.
pub(crate) const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed reference. `repository` keeps its registry host, if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Reference {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RefError {
    #[error("empty reference")]
    Empty,
    #[error("invalid repository name {0:?}")]
    Repository(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest {0:?} (expected sha256:<64 hex digits>)")]
    Digest(String),
}

impl Reference {
    /// Parse `repo[:tag][@digest]`. A reference without tag and digest gets
    /// no implicit `latest`: callers decide.
    pub(crate) fn parse(s: &str) -> Result<Self, RefError> {
        if s.is_empty() {
            return Err(RefError::Empty);
        }
        let (rest, digest) = split_digest(s);
        if let Some(d) = digest
            && check_digest(d).is_err()
        {
            return Err(RefError::Digest(d.to_string()));
        }
        let (repository, tag) = split_tag(rest);
        if let Some(t) = tag
            && check_tag(t).is_err()
        {
            return Err(RefError::Tag(t.to_string()));
        }
        if check_repository(repository).is_err() {
            return Err(RefError::Repository(repository.to_string()));
        }
        Ok(Self {
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
        })
    }

    /// Parse a reference that names exactly one of a tag or a digest, as a
    /// policy writes it (no implicit `latest`, no `repo:tag@digest`), with a
    /// message saying which part is wrong.
    pub(crate) fn parse_explicit(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty".to_owned());
        }
        if text.len() > 512 {
            return Err("too long".to_owned());
        }
        let (name_tag, digest) = split_digest(text);
        if let Some(d) = digest {
            check_digest(d)?;
        }
        let (name, tag) = split_tag(name_tag);
        match (tag, digest) {
            (None, None) => {
                return Err(format!(
                    "needs a tag or a digest, e.g. \"{name}:latest\" or \"{name}@sha256:...\""
                ));
            }
            (Some(_), Some(_)) => {
                return Err(
                    "give a tag or a digest, not both; pin a tag with `digest = ...`".to_owned(),
                );
            }
            (Some(t), None) => check_tag(t).map_err(|e| format!("tag {t:?}: {e}"))?,
            (None, Some(_)) => {}
        }
        check_repository(name)?;
        Ok(Self {
            repository: name.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }

    /// The registry host (`docker.io` when the name has none).
    pub(crate) fn registry(&self) -> &str {
        registry_of(&self.repository)
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

/// Split `name@digest` at the first `@`.
fn split_digest(s: &str) -> (&str, Option<&str>) {
    match s.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (s, None),
    }
}

/// Whether the first path component names a registry host, as the engine decides.
fn host_part(repository: &str) -> Option<&str> {
    let (first, _) = repository.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

/// The registry host of a repository (`docker.io` when it has none).
pub(crate) fn registry_of(repository: &str) -> &str {
    host_part(repository).unwrap_or(DEFAULT_REGISTRY)
}

/// The repository path without its registry host.
pub(crate) fn path_of(repository: &str) -> &str {
    match host_part(repository) {
        Some(h) => &repository[h.len() + 1..],
        None => repository,
    }
}

/// Docker Hub answers to several names; `allowed_registries` and mirror
/// matching treat them as one.
pub(crate) fn canonical_registry(host: &str) -> String {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DEFAULT_REGISTRY.to_owned()
        }
        h => h.to_ascii_lowercase(),
    }
}

/// An optional registry host (see [`check_host`]), then path components;
/// at most 255 bytes in all, as the engine requires.
fn check_repository(repository: &str) -> Result<(), String> {
    if repository.len() > 255 {
        return Err(format!(
            "repository name is {} bytes long; at most 255",
            repository.len()
        ));
    }
    let path = match host_part(repository) {
        Some(h) => {
            check_host(h).map_err(|e| format!("registry {h:?}: {e}"))?;
            &repository[h.len() + 1..]
        }
        None => repository,
    };
    path.split('/').try_for_each(check_path_component)
}

/// A repository path without a host (a mirror's `prefix`): path components
/// joined by `/`.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') || path.ends_with('/') {
        return Err("no leading or trailing `/`".to_owned());
    }
    path.split('/').try_for_each(check_path_component)
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`, Docker's repository path grammar.
fn check_path_component(part: &str) -> Result<(), String> {
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
pub(crate) fn check_tag(tag: &str) -> Result<(), String> {
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

pub(crate) fn check_digest(d: &str) -> Result<(), String> {
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
pub(crate) fn check_host(text: &str) -> Result<(), String> {
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

/// How an engine names the images it holds, as far as a policy's globs care
/// (see "Podman" in `docs/policy.md`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// Docker: an image built or loaded here has no registry host
    /// (`team/app`), the same name as Docker Hub's `team/app`.
    #[default]
    Docker,
    /// Podman: an image built or loaded here is `localhost/team/app`, apart
    /// from Docker Hub's `docker.io/team/app` (which stowage shows as
    /// `team/app`, as Docker does: [`familiar`]).
    Podman,
}

/// The prefix Podman gives images built, loaded or tagged without a registry.
pub(crate) const LOCALHOST: &str = "localhost/";

/// The one other name a repository (as stowage shows it) answers to in a
/// policy's globs: a Docker Hub repository also under its full name
/// (`nginx` as `docker.io/library/nginx`, `team/app` as `docker.io/team/app`,
/// how `podman images` shows them); on Podman, a local image's
/// `localhost/team/app` also as `team/app`, the name it has on Docker. A
/// `localhost/` name on Docker is a registry on port 80 of this host, not a
/// local image, and keeps its one name.
pub(crate) fn glob_alias(repository: &str, naming: Naming) -> Option<Cow<'_, str>> {
    if naming == Naming::Podman
        && let Some(rest) = repository.strip_prefix(LOCALHOST)
    {
        return Some(Cow::Borrowed(rest));
    }
    if host_part(repository).is_some() {
        return None;
    }
    Some(Cow::Owned(match repository.contains('/') {
        true => format!("{DEFAULT_REGISTRY}/{repository}"),
        false => format!("{DEFAULT_REGISTRY}/library/{repository}"),
    }))
}

/// Docker's short form of a Docker Hub name, as dockerd lists it:
/// `docker.io/library/nginx:1.25` is `nginx:1.25`, `docker.io/team/app@sha256:…`
/// is `team/app@sha256:…`. Podman lists full names; stowage shows and
/// matches the short ones on either engine. Other names are unchanged.
pub(crate) fn familiar(name: &str) -> Cow<'_, str> {
    let Some(rest) = name.strip_prefix("docker.io/") else {
        return Cow::Borrowed(name);
    };
    let path = |s: &'_ str| -> usize { s.find(['@', ':']).unwrap_or(s.len()) };
    let short = match rest.strip_prefix("library/") {
        Some(short) if !short[..path(short)].contains('/') => short,
        _ => rest,
    };
    // `docker.io/localhost/app` must not come out as registry `localhost`.
    if host_part(&short[..path(short)]).is_some() {
        return Cow::Borrowed(name);
    }
    Cow::Borrowed(short)
}

/// The inverse of [`familiar`] for an engine that resolves short names its
/// own way (Podman, after its `containers.conf`): a name without a registry
/// host gets `docker.io/` (and `library/` for a one-segment path), so it
/// names exactly what dockerd would. Image ids (`sha256:…`, bare hex) and
/// names with a host are unchanged.
pub(crate) fn qualified(name: &str) -> Cow<'_, str> {
    let is_id = name.starts_with("sha256:")
        || (!name.is_empty() && name.bytes().all(|b| b.is_ascii_hexdigit()));
    if is_id || host_part(name).is_some() {
        return Cow::Borrowed(name);
    }
    let repository_end = name.find(['@', ':']).unwrap_or(name.len());
    Cow::Owned(match name[..repository_end].contains('/') {
        true => format!("{DEFAULT_REGISTRY}/{name}"),
        false => format!("{DEFAULT_REGISTRY}/library/{name}"),
    })
}

/// Whether a registry `host[:port]` is this host's loopback (`127.0.0.0/8`,
/// `[::1]`, `localhost`): registries dockerd talks plain HTTP to unasked.
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(h, _)| h),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    is_loopback_host(host)
}

/// Whether a bare host (an IPv6 one with or without its brackets) is this
/// host's loopback: `localhost`, `127.0.0.0/8`, `::1`, and IPv4-mapped
/// `::ffff:127.x.y.z` (the same address; Go's `net.IP` compares it so too).
/// Any other name counts as another host. The one rule for the engine's
/// address, registries and token realms.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `os/arch[/variant]`, e.g. `linux/arm64` or `linux/arm/v7`.
pub(crate) fn check_platform(p: &str) -> Result<(), String> {
    let parts: Vec<&str> = p.split('/').collect();
    let valid = (2..=3).contains(&parts.len())
        && parts.iter().all(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid platform {p:?}: expected os/arch[/variant], e.g. \"linux/arm64\" or \"linux/arm/v7\""
        ))
    }
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
        assert_eq!(path_of(&r.repository), "team/app");
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:v1.2.0");
    }

    #[test]
    fn docker_hub_names_have_the_default_registry() {
        let r = Reference::parse("nginx:1.25").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(path_of(&r.repository), "nginx");
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

    #[test]
    fn explicit_references() {
        for ok in [
            "nginx:1.25",
            "team/app:v1.2.0",
            "127.0.0.1:5000/team/app:v1.2.0",
            "localhost/app:dev",
            "ghcr.io/org/my-app__x.y:latest",
            "alpine@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(Reference::parse_explicit(ok).is_ok(), "{ok}");
        }
        for bad in [
            "nginx",
            "Nginx:1",
            "nginx:",
            "nginx:-x",
            "a//b:1",
            "/a:1",
            "a-:1",
            "a:1@sha256:00",
            "alpine@sha256:XYZ",
            "my host/app:1",
        ] {
            assert!(Reference::parse_explicit(bad).is_err(), "{bad}");
        }
        let registry = |r: &str| Reference::parse_explicit(r).map(|p| p.registry().to_owned());
        assert_eq!(registry("nginx:1"), Ok("docker.io".into()));
        assert_eq!(registry("10.0.0.5:5000/a:1"), Ok("10.0.0.5:5000".into()));
    }

    /// `transfer` parses a pre-pull's image with [`Reference::parse`] and
    /// skips what it refuses: nothing a policy accepts may be refused there.
    #[test]
    fn what_a_policy_accepts_the_engine_grammar_accepts() {
        let long = format!("{}:1", "a".repeat(256));
        assert!(Reference::parse(&long).is_err());
        assert!(Reference::parse_explicit(&long).is_err());
        let digest = format!("sha256:{}", "0".repeat(64));
        for ok in [
            "nginx:1.25".to_owned(),
            "127.0.0.1:5000/team/app:v1.2.0".to_owned(),
            format!("[::1]:5000/app@{digest}"),
            format!("{}:1", "a".repeat(255)),
        ] {
            assert!(Reference::parse_explicit(&ok).is_ok(), "{ok}");
            assert!(Reference::parse(&ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn docker_hub_names_in_short_and_full_form() {
        let d = format!("sha256:{}", "a".repeat(64));
        for (full, short) in [
            ("docker.io/library/nginx:1.25", "nginx:1.25"),
            ("docker.io/library/nginx", "nginx"),
            ("docker.io/team/app:v1", "team/app:v1"),
            ("docker.io/library/a/b:1", "library/a/b:1"),
            (
                &format!("docker.io/library/nginx@{d}"),
                &format!("nginx@{d}"),
            ),
            (&format!("docker.io/team/app@{d}"), &format!("team/app@{d}")),
        ] {
            assert_eq!(familiar(full), short, "{full}");
            assert_eq!(qualified(short), full, "{short}");
        }
        for same in [
            "localhost/team/app:v1",
            "127.0.0.1:5000/team/app:v1",
            "quay.io/x/y:1",
            "docker.io/localhost/app:1",
        ] {
            assert_eq!(familiar(same), same);
        }
        for id in [
            d.as_str(),
            "d837299d9cfe",
            "localhost/team/app:v1",
            "ghcr.io/a:1",
        ] {
            assert_eq!(qualified(id), id);
        }
    }

    #[test]
    fn glob_aliases() {
        let alias = |r, n| glob_alias(r, n).map(Cow::into_owned);
        assert_eq!(
            alias("nginx", Naming::Docker).as_deref(),
            Some("docker.io/library/nginx")
        );
        assert_eq!(
            alias("team/app", Naming::Podman).as_deref(),
            Some("docker.io/team/app")
        );
        assert_eq!(
            alias("localhost/team/app", Naming::Podman).as_deref(),
            Some("team/app")
        );
        // On Docker `localhost/…` is a registry on this host, not a local image.
        assert_eq!(alias("localhost/team/app", Naming::Docker), None);
        assert_eq!(alias("127.0.0.1:5000/team/app", Naming::Podman), None);
        assert_eq!(alias("localhost:5000/team/app", Naming::Podman), None);
    }

    #[test]
    fn loopback_registries() {
        for yes in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "localhost:5000",
            "localhost",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(is_loopback_registry(yes), "{yes}");
        }
        for no in [
            "10.0.0.5:5000",
            "docker.io",
            "[fd00::1]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_registry(no), "{no}");
        }
    }

    #[test]
    fn hosts() {
        for ok in [
            "registry.local",
            "10.0.0.5:5000",
            "localhost:5000",
            "[::1]:5000",
            "ghcr.io",
        ] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://x.io",
            "x.io/path",
            "x.io:0",
            "x.io:99999",
            "",
            "-x.io",
            "a..b",
            "[::1",
            "x io",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }
}
