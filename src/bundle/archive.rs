//! The safe tar reader: one scan of the file builds a table of its entries
//! (name, data offset, size), refusing anything that has no place in a
//! bundle before a byte of it is used: absolute names, `..` or `.` inside a
//! name, links, devices and fifos, a name twice, and any name but
//! `oci-layout`, `index.json`, `manifest.json`, `repositories` and
//! `blobs/sha256/<64 hex>` (plus the folders `blobs/`, `blobs/sha256/`).
//! Nothing is ever extracted: blobs are read from the file by offset
//! ([`Archive::blob`]), JSON documents bounded by [`JSON_MAX`].
//!
//! The tar crate parses headers (ustar, GNU long names, PAX); everything it
//! yields is checked here.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{BundleError, JSON_MAX, blob_name};
use crate::refs::check_digest;

/// The layout files a bundle may hold besides its blobs.
const FILES: [&str; 4] = ["oci-layout", "index.json", "manifest.json", "repositories"];
const DIRS: [&str; 2] = ["blobs", "blobs/sha256"];

/// One regular file of the tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Where its data starts in the file.
    pub offset: u64,
    /// Its size as the tar header says.
    pub size: u64,
    /// Bytes of it the file actually holds (less than `size` when the file
    /// was cut short).
    pub present: u64,
}

impl Member {
    pub fn truncated(&self) -> bool {
        self.present < self.size
    }
}

/// A bundle file opened and scanned: its entry table and its `index.json`.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    file: File,
    members: BTreeMap<String, Member>,
    index: Vec<u8>,
}

impl Archive {
    /// Opens and scans `path`. Refused (nothing read by it): a file that is
    /// not a tar, an unsafe or unknown entry, a bundle without `oci-layout`
    /// 1.0.0 or `index.json`, an `index.json` over [`JSON_MAX`] or cut short.
    pub fn open(path: &Path) -> Result<Archive, BundleError> {
        let unreadable = |source| BundleError::Unreadable {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(unreadable)?;
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.is_file() {
            return Err(BundleError::NotATar {
                path: path.to_path_buf(),
                why: "not a regular file".into(),
            });
        }
        let members = scan(path, &file, meta.len())?;
        let mut archive = Archive {
            path: path.to_path_buf(),
            file,
            members,
            index: Vec::new(),
        };
        let layout = archive
            .json("oci-layout")?
            .ok_or_else(|| archive.layout("no oci-layout file"))?;
        let version = serde_json::from_slice::<serde_json::Value>(&layout)
            .ok()
            .and_then(|v| v["imageLayoutVersion"].as_str().map(str::to_owned));
        if version.as_deref() != Some("1.0.0") {
            return Err(archive.layout("oci-layout does not say imageLayoutVersion 1.0.0"));
        }
        archive.index = archive
            .json("index.json")?
            .ok_or_else(|| archive.layout("no index.json"))?;
        Ok(archive)
    }

    /// The file this archive was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of `index.json`.
    pub fn index_bytes(&self) -> &[u8] {
        &self.index
    }

    /// The bundle's digest: `sha256:` of its `index.json`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.index)))
    }

    /// The tar member named `name`, if the bundle has it.
    pub fn member(&self, name: &str) -> Option<Member> {
        self.members.get(name).copied()
    }

    /// The blob's member (`blobs/sha256/<hex>`); `None` for a digest that
    /// is not `sha256:<64 hex>` or a blob the bundle lacks.
    pub fn blob_member(&self, digest: &str) -> Option<Member> {
        check_digest(digest).ok()?;
        self.member(&blob_name(digest))
    }

    /// Every blob in the bundle: its digest and its size as the tar says.
    pub fn blobs(&self) -> impl Iterator<Item = (String, Member)> + '_ {
        self.members.iter().filter_map(|(name, m)| {
            name.strip_prefix("blobs/sha256/")
                .map(|hex| (format!("sha256:{hex}"), *m))
        })
    }

    /// Reads one blob's bytes from the file, by offset. Unverified: the
    /// caller hashes what it reads (as [`super::verify`] did).
    pub fn blob(&self, digest: &str) -> Result<BlobReader<'_>, BundleError> {
        let m = self
            .blob_member(digest)
            .ok_or_else(|| BundleError::Damaged {
                path: self.path.clone(),
                damage: vec![super::Damage {
                    blob: digest.to_owned(),
                    why: "not in the bundle".into(),
                    images: Vec::new(),
                }],
            })?;
        Ok(self.reader(m))
    }

    /// A reader over a member's bytes that are present.
    pub fn reader(&self, m: Member) -> BlobReader<'_> {
        BlobReader {
            file: &self.file,
            pos: m.offset,
            end: m.offset + m.present,
        }
    }

    /// A whole small member, at most [`JSON_MAX`] bytes; `None` when absent.
    pub(crate) fn json(&self, name: &str) -> Result<Option<Vec<u8>>, BundleError> {
        let Some(m) = self.member(name) else {
            return Ok(None);
        };
        if m.size > JSON_MAX {
            return Err(self.layout(&format!(
                "{name} is {} bytes, more than the {JSON_MAX} read",
                m.size
            )));
        }
        if m.truncated() {
            return Err(self.layout(&format!(
                "{name} is cut short ({} of {} bytes)",
                m.present, m.size
            )));
        }
        let mut out = Vec::with_capacity(m.size as usize);
        self.reader(m)
            .read_to_end(&mut out)
            .map_err(|source| BundleError::Unreadable {
                path: self.path.clone(),
                source,
            })?;
        Ok(Some(out))
    }

    pub(crate) fn layout(&self, why: &str) -> BundleError {
        BundleError::Layout {
            path: self.path.clone(),
            why: why.to_owned(),
        }
    }
}

/// A blob's bytes read from the bundle file by offset (`pread`: readers of
/// several blobs do not disturb each other).
#[derive(Debug)]
pub struct BlobReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// One pass over the tar's headers.
fn scan(path: &Path, file: &File, len: u64) -> Result<BTreeMap<String, Member>, BundleError> {
    let mut tar = tar::Archive::new(file);
    let entries = tar.entries_with_seek().map_err(|e| BundleError::NotATar {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let mut members = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut seen = 0usize;
    for entry in entries {
        let entry = entry.map_err(|e| match seen {
            0 => BundleError::NotATar {
                path: path.to_path_buf(),
                why: e.to_string(),
            },
            _ => BundleError::Layout {
                path: path.to_path_buf(),
                why: format!("the tar is broken after its entry {seen}: {e}"),
            },
        })?;
        seen += 1;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let unsafe_entry = |why: &str| BundleError::Unsafe {
            path: path.to_path_buf(),
            entry: raw.clone(),
            why: why.to_owned(),
        };
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let name = normalise(&raw).map_err(|why| unsafe_entry(&why))?;
        if kind.is_dir() {
            if !DIRS.contains(&name.as_str()) {
                return Err(unsafe_entry("is a folder that has no place in a bundle"));
            }
            if dirs.contains(&name) {
                return Err(unsafe_entry("appears twice"));
            }
            dirs.push(name);
            continue;
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            let what = if kind.is_symlink() {
                "is a symbolic link"
            } else if kind.is_hard_link() {
                "is a hard link"
            } else if kind.is_character_special() || kind.is_block_special() {
                "is a device"
            } else if kind.is_fifo() {
                "is a fifo"
            } else {
                "is not a regular file"
            };
            return Err(unsafe_entry(&format!(
                "{what}: bundles hold regular files only"
            )));
        }
        let allowed = FILES.contains(&name.as_str())
            || name
                .strip_prefix("blobs/sha256/")
                .is_some_and(|hex| check_digest(&format!("sha256:{hex}")).is_ok());
        if !allowed {
            return Err(unsafe_entry(
                "has no place in a bundle (only oci-layout, index.json, manifest.json, repositories and blobs/sha256/<64 hex>)",
            ));
        }
        let size = entry.size();
        let offset = entry.raw_file_position();
        let present = len.saturating_sub(offset).min(size);
        if members
            .insert(
                name,
                Member {
                    offset,
                    size,
                    present,
                },
            )
            .is_some()
        {
            return Err(unsafe_entry("appears twice"));
        }
    }
    if seen == 0 {
        return Err(BundleError::NotATar {
            path: path.to_path_buf(),
            why: "no tar entries".into(),
        });
    }
    Ok(members)
}

/// The entry's name without a leading `./` or a trailing `/`; refused when
/// absolute, empty, or with `.`/`..`/empty components.
fn normalise(raw: &str) -> Result<String, String> {
    if raw.starts_with('/') {
        return Err("is an absolute path".into());
    }
    let trimmed = raw.strip_prefix("./").unwrap_or(raw);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err("has no name".into());
    }
    for part in trimmed.split('/') {
        match part {
            ".." => return Err("climbs out of the bundle (..)".into()),
            "." | "" => return Err("is not a plain path".into()),
            p if p.contains('\\') || p.contains('\0') => {
                return Err("is not a plain path".into());
            }
            _ => {}
        }
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn names_are_plain_relative_paths() {
        assert_eq!(normalise("./index.json").unwrap(), "index.json");
        assert_eq!(normalise("blobs/sha256/").unwrap(), "blobs/sha256");
        for bad in [
            "/etc/passwd",
            "../x",
            "blobs/../../x",
            "a//b",
            "./",
            "a/./b",
        ] {
            assert!(normalise(bad).is_err(), "{bad}");
        }
    }
}
