//! The trash journal (`trash-journal.json` in `state_dir`): each `trash`
//! action's state entry, written durably ([`crate::state::write_atomic`])
//! before its trash reference is put on. A kill between that reference and
//! the state's save (or an engine error halfway through a trash) then loses
//! none of the image's former references: the next reconcile, and `stowage
//! trash`/`restore` before it, merge the entries whose image carries their
//! reference ([`crate::trash::recover`]). The reconcile that saved them in
//! the state removes the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::trash::Entry;

/// The journal's file name in `state_dir`.
pub const FILE: &str = "trash-journal.json";

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The journaled entries by image id. Missing is empty; unreadable is said
/// and empty (the window still holds: the trash reference carries it).
pub fn read(path: &Path) -> BTreeMap<String, Entry> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(
                "{} is unreadable ({e}); the trash entries it names are not recovered",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!("cannot read {} ({e})", path.display());
            BTreeMap::new()
        }
    }
}

/// Adds `entry` for `image`, durably, before the trash reference exists.
/// Trash actions run one at a time (the executor runs them alone).
pub fn add(path: &Path, image: &str, entry: &Entry) -> std::io::Result<()> {
    let mut entries = read(path);
    entries.insert(image.to_owned(), entry.clone());
    let bytes = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::other)?;
    crate::state::write_atomic(path, &bytes)
}

/// After the state was saved: keep only `left` (entries the state does not
/// hold yet), or remove the file when none is left.
pub fn settle(path: &Path, left: &BTreeMap<String, Entry>) {
    let done = if left.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    } else {
        serde_json::to_vec_pretty(left)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::state::write_atomic(path, &b))
    };
    if let Err(e) = done {
        tracing::warn!("cannot update {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_added_durably_and_settled_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        assert!(read(&path).is_empty());
        let entry = Entry {
            reference: "stowage-trash/0123456789ab:1700000000".into(),
            former: vec!["app:v1".into()],
            ..Entry::default()
        };
        add(&path, "sha256:a", &entry).unwrap();
        add(&path, "sha256:b", &entry).unwrap();
        assert_eq!(read(&path).len(), 2);
        let left: BTreeMap<String, Entry> = [("sha256:b".to_owned(), entry)].into();
        settle(&path, &left);
        assert_eq!(read(&path), left);
        settle(&path, &BTreeMap::new());
        assert!(!path.exists());
        std::fs::write(&path, b"{torn").unwrap();
        assert!(read(&path).is_empty(), "unreadable is empty, not fatal");
    }
}
