//! The last good registry policy, kept under `state_dir` in one file
//! written atomically (`state::write_atomic`): the text with its digest
//! and `created`, so a start with the registry down runs on it and the
//! rollback check has something to compare with.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The file's name under `state_dir`.
const FILE: &str = "policy-remote.json";
/// A policy is at most 4 MiB; its JSON escaping may double that.
const MAX_FILE: u64 = 10 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastGood {
    /// The reference it was read from (`oci://…`).
    pub source: String,
    /// Its manifest digest.
    pub digest: String,
    /// Its `org.opencontainers.image.created`.
    pub created: Option<DateTime<Utc>>,
    /// When this host accepted it.
    pub accepted: DateTime<Utc>,
    /// The policy text.
    pub text: String,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

pub fn save(state_dir: &Path, good: &LastGood) -> Result<(), String> {
    let file = path(state_dir);
    let fail = |e: std::io::Error| format!("cannot keep the policy in {}: {e}", file.display());
    std::fs::create_dir_all(state_dir).map_err(fail)?;
    let bytes = serde_json::to_vec(good).map_err(|e| e.to_string())?;
    crate::state::write_atomic(&file, &bytes).map_err(fail)
}

/// The last good policy, `None` when there is none; an unreadable or
/// damaged file is an error (said, never silently replaced by "none").
pub fn load(state_dir: &Path) -> Result<Option<LastGood>, String> {
    use std::io::Read;
    let file = path(state_dir);
    let unreadable =
        |e: String| format!("the last good policy {} is unusable: {e}", file.display());
    let f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(unreadable("too large".into()));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_and_read_back_and_damage_is_said() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Ok(None));
        let good = LastGood {
            source: "oci://127.0.0.1:5000/p:1".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            created: Some(Utc::now()),
            accepted: Utc::now(),
            text: "version = 1\n".into(),
        };
        save(dir.path(), &good).unwrap();
        assert_eq!(load(dir.path()), Ok(Some(good)));
        std::fs::write(path(dir.path()), b"{").unwrap();
        assert!(load(dir.path()).unwrap_err().contains("unusable"));
    }
}
