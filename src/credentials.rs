//! Registry credentials from a Docker `config.json` (`auths`).
//!
//! Read from `[daemon].credentials_file` when set, else `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`, where `~` is `$HOME` or, when `HOME` is unset
//! (a systemd service without `User=`), the home of the running user's
//! `/etc/passwd` entry, as Docker's own tools find it. Each `auths` entry holds either a base64
//! `auth` (`user:password`) or `username`/`password`, or an `identitytoken`.
//! Credential helpers (`credsStore`, `credHelpers`) are not run: a daemon must
//! not shell out to programs that may prompt; their presence is reported.
//!
//! Secrets never appear in errors, logs or `Debug` output: errors name the
//! file and the entry, never a value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::engine::Credentials;
use crate::refs::DEFAULT_REGISTRY;

/// The server address Docker uses for Docker Hub credentials.
const DOCKER_HUB_AUTH: &str = "https://index.docker.io/v1/";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The JSON error's text is left out on purpose: serde quotes the
    /// offending input, which may be a secret.
    #[error("credentials file {path} is not a Docker config.json (line {line}, column {column})")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("credentials file {path}: entry {server:?}: {what}")]
    Entry {
        path: PathBuf,
        server: String,
        what: &'static str,
    },
}

/// Deliberately not `Debug`: it holds secrets.
#[derive(Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Credentials per registry host (`127.0.0.1:5000`, `docker.io`, ...).
#[derive(Clone, Default)]
pub struct CredentialStore {
    /// Keyed by normalised registry host.
    by_host: BTreeMap<String, Credentials>,
    /// Where they came from, for messages.
    source: Option<PathBuf>,
    /// Hosts that are configured only through a credential helper.
    helpers: Vec<String>,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("hosts", &self.by_host.keys().collect::<Vec<_>>())
            .field("source", &self.source)
            .finish()
    }
}

impl CredentialStore {
    /// Load from `explicit` (`credentials_file`), else the engine user's
    /// Docker config. A missing default config means no credentials; a
    /// missing explicit file is an error.
    pub fn load(explicit: Option<&Path>) -> Result<Self, CredentialsError> {
        if let Some(path) = explicit {
            return Self::from_file(path);
        }
        let Some(path) = default_config_path() else {
            return Ok(Self::default());
        };
        match Self::from_file(&path) {
            Err(CredentialsError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Self::default())
            }
            other => other,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse a `config.json` text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CredentialsError> {
        let config: ConfigFile =
            serde_json::from_str(text).map_err(|e| CredentialsError::Parse {
                path: path.to_path_buf(),
                line: e.line(),
                column: e.column(),
            })?;
        let mut store = CredentialStore {
            source: Some(path.to_path_buf()),
            ..Self::default()
        };
        for (server, entry) in config.auths {
            let host = normalise_host(&server);
            let bad = |what| CredentialsError::Entry {
                path: path.to_path_buf(),
                server: server.clone(),
                what,
            };
            let (mut username, mut password) = (entry.username, entry.password);
            if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad("`auth` is not valid base64"))?;
                let decoded =
                    String::from_utf8(decoded).map_err(|_| bad("`auth` is not UTF-8 text"))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| bad("`auth` must encode \"user:password\""))?;
                username = Some(u.to_owned());
                password = Some(p.to_owned());
            }
            let identity_token = entry.identitytoken.filter(|t| !t.is_empty());
            if username.is_none() && identity_token.is_none() {
                // An empty entry is what `docker login` leaves behind when a
                // credential helper holds the secret.
                if config.creds_store.is_some() {
                    store.helpers.push(host);
                }
                continue;
            }
            let server = if host == DEFAULT_REGISTRY {
                DOCKER_HUB_AUTH.to_owned()
            } else {
                host.clone()
            };
            store.by_host.insert(
                host,
                Credentials {
                    username,
                    password,
                    identity_token,
                    server,
                },
            );
        }
        store
            .helpers
            .extend(config.cred_helpers.keys().map(|h| normalise_host(h)));
        Ok(store)
    }

    /// Credentials for a registry host, if any.
    pub fn for_registry(&self, host: &str) -> Option<&Credentials> {
        self.by_host.get(&normalise_host(host))
    }

    /// Registries configured only through credential helpers, which stowage
    /// does not run; callers report them once.
    pub fn helper_only(&self) -> &[String] {
        &self.helpers
    }

    /// Every secret held, so that callers can scrub any text before it is
    /// written anywhere.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.by_host
            .values()
            .flat_map(|c| [c.password.as_deref(), c.identity_token.as_deref()])
            .flatten()
            .filter(|s| !s.is_empty())
    }

    /// `text` with every secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.secrets() {
            out = out.replace(secret, "***");
        }
        out
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn default_config_path() -> Option<PathBuf> {
    docker_config_dir().map(|dir| dir.join("config.json"))
}

/// The docker CLI's config folder: `$DOCKER_CONFIG`, else `~/.docker`. It
/// is also where the engine's TLS certificates are looked for when
/// `DOCKER_CERT_PATH` is not set.
pub fn docker_config_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    home_dir().map(|home| home.join(".docker"))
}

/// `$HOME`, else the home of the running user's passwd entry: systemd sets
/// no `HOME` for a system service without `User=`, and `docker login` as
/// root wrote `/root/.docker/config.json`.
fn home_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(home.into());
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd_home(&passwd, rustix::process::getuid().as_raw())
}

/// The home field of `uid`'s entry in a passwd file's text.
fn passwd_home(passwd: &str, uid: u32) -> Option<PathBuf> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields[..] {
            [_, _, id, _, _, home, ..] if id.parse() == Ok(uid) && !home.is_empty() => {
                Some(PathBuf::from(home))
            }
            _ => None,
        }
    })
}

/// One line for the log at start: which credentials file is used, or that
/// none was found and where stowage looked. Never a secret.
pub fn describe(explicit: Option<&Path>) -> String {
    let path = explicit.map(Path::to_path_buf).or_else(default_config_path);
    let Some(path) = path else {
        return "registry credentials: none (no credentials_file, DOCKER_CONFIG or home folder)"
            .to_owned();
    };
    match CredentialStore::load(explicit) {
        Ok(store) if store.source.is_some() => format!(
            "registry credentials: {} ({} registr{})",
            path.display(),
            store.by_host.len(),
            if store.by_host.len() == 1 { "y" } else { "ies" }
        ),
        Ok(_) => format!(
            "registry credentials: none found ({} does not exist); pulls and pushes go without",
            path.display()
        ),
        Err(e) => format!("registry credentials: {e}"),
    }
}

/// `https://index.docker.io/v1/`, `http://r:5000/v2/`, `R:5000` -> `docker.io`,
/// `r:5000`, `r:5000`: the keys people and `docker login` write vary.
fn normalise_host(server: &str) -> String {
    let s = server.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    crate::refs::canonical_registry(&host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CredentialStore, CredentialsError> {
        CredentialStore::parse(text, Path::new("/x/config.json"))
    }

    #[test]
    fn reads_auth_and_plain_fields() {
        // "alice:s3cret:with:colons"
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:with:colons");
        let store = parse(&format!(
            r#"{{"auths": {{
                "127.0.0.1:5000": {{"auth": "{auth}"}},
                "https://index.docker.io/v1/": {{"username": "bob", "password": "pw"}},
                "http://Reg.Example:443/v2/": {{"identitytoken": "tok"}}
            }}}}"#
        ))
        .unwrap();
        let c = store.for_registry("127.0.0.1:5000").unwrap();
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some("s3cret:with:colons"));
        assert_eq!(c.server, "127.0.0.1:5000");
        let hub = store.for_registry("docker.io").unwrap();
        assert_eq!(hub.server, DOCKER_HUB_AUTH);
        assert_eq!(store.for_registry("index.docker.io"), Some(hub));
        let tok = store.for_registry("reg.example:443").unwrap();
        assert_eq!(tok.identity_token.as_deref(), Some("tok"));
        assert!(store.for_registry("other:1").is_none());
        assert_eq!(
            store.scrub("bad s3cret:with:colons and tok"),
            "bad *** and ***"
        );
    }

    #[test]
    fn errors_never_quote_secrets() {
        let err = parse(r#"{"auths": {"r:1": {"auth": "!!notbase64-hunter2"}}}"#).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = parse(r#"{"auths": {"r:1": {"password": hunter2}}}"#).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let debug = format!(
            "{:?}",
            parse(r#"{"auths": {"r:1": {"username": "u", "password": "hunter2"}}}"#).unwrap()
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn home_comes_from_the_passwd_entry_of_the_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      broken line\n\
                      nohome:x:7:7::::/bin/sh\n\
                      svc:x:998:998:Service:/var/lib/svc:/usr/sbin/nologin\n";
        assert_eq!(passwd_home(passwd, 0), Some(PathBuf::from("/root")));
        assert_eq!(
            passwd_home(passwd, 998),
            Some(PathBuf::from("/var/lib/svc"))
        );
        assert_eq!(passwd_home(passwd, 7), None);
        assert_eq!(passwd_home(passwd, 1000), None);
    }

    #[test]
    fn helper_entries_are_reported() {
        let store = parse(
            r#"{"auths": {"r:1": {}}, "credsStore": "pass", "credHelpers": {"gcr.io": "gcloud"}}"#,
        )
        .unwrap();
        assert!(store.for_registry("r:1").is_none());
        assert_eq!(store.helper_only(), ["r:1", "gcr.io"]);
    }
}
