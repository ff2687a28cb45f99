//! One partial download on disk: `partial/sha256/<hex>` (append-only bytes)
//! and `<hex>.offset` (the committed length and the kernel's boot id,
//! replaced atomically only after the bytes below it were fsynced).
//!
//! When the partial is next opened in the same boot (the download was
//! killed, the kernel was not), every byte in the file is kept: what a
//! process wrote is in the page cache whether it fsynced or not, so a
//! kill -9 costs nothing. After a reboot (a power cut, a kernel crash: a
//! new boot id) whatever lies past the committed offset is cut off, since
//! it may be torn. Either way the blob's sha256 is checked before it is
//! stored. Blocking I/O: the download loop runs these through `off_loop`.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

use crate::state::{sync_dir, write_atomic};

const OFFSET_SUFFIX: &str = ".offset";

/// A partial download, locked (`flock`) by this handle while it lives.
pub(super) struct Partial {
    file: File,
    pub data: PathBuf,
    sidecar: PathBuf,
    /// The sha256 state of the first `len` bytes.
    hasher: Sha256,
    /// Bytes in the file (and in `hasher`).
    pub len: u64,
    /// What the sidecar says.
    pub committed: u64,
    /// The sidecar was written in this boot: the bytes past `committed`
    /// are as written (see the module's comment).
    this_boot: bool,
    /// When the offset was last committed (or the partial opened).
    pub last_commit: std::time::Instant,
}

impl Partial {
    /// Opens and locks the partial of `hex` in `dir`, creating it when
    /// `create`. `Ok(None)`: another download holds it (or, without
    /// `create`, there is none).
    pub fn try_open(dir: &Path, hex: &str, create: bool) -> std::io::Result<Option<Partial>> {
        let data = dir.join(hex);
        let file = match File::options()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&data)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        // The holder before us may have renamed it into blobs/ or removed it:
        // then the locked file is no longer the partial.
        let same =
            fs::metadata(&data).is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino()));
        if !same {
            return Ok(None);
        }
        let sidecar = sidecar_of(&data);
        let (committed, this_boot) = read_sidecar(&data);
        Ok(Some(Partial {
            committed,
            this_boot,
            len: file.metadata()?.len(),
            file,
            data,
            sidecar,
            hasher: Sha256::new(),
            last_commit: std::time::Instant::now(),
        }))
    }

    /// Keeps what can be trusted (see the module's comment): in the boot
    /// that wrote it the whole file, else up to the committed offset; to
    /// nothing when that is more than `size`. What is kept is committed
    /// with this boot's id.
    pub fn settle(&mut self, size: Option<u64>) -> std::io::Result<()> {
        let mut keep = trusted(self.len, self.committed, self.this_boot);
        if size.is_some_and(|s| keep > s) {
            keep = 0;
        }
        if keep != self.len {
            self.file.set_len(keep)?;
            self.len = keep;
        }
        // Kept bytes of an earlier boot are committed again in this one (a
        // fresh partial has nothing to commit: no fsync for it).
        if keep != self.committed || (keep > 0 && !self.this_boot) {
            self.commit_now()?;
        }
        Ok(())
    }

    /// [`settle`](Self::settle), then the sha256 state of what is kept, read
    /// back from disk (a resume in a new process starts from the bytes).
    pub fn resume(&mut self, size: u64) -> std::io::Result<()> {
        self.settle(Some(size))?;
        self.hasher = Sha256::new();
        self.file.seek(SeekFrom::Start(0))?;
        let mut left = self.len;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.file.read(&mut buf[..want])?;
            if n == 0 {
                // Shorter than its metadata said: keep what was read.
                self.file.set_len(self.len - left)?;
                self.len -= left;
                self.commit()?;
                break;
            }
            self.hasher.update(&buf[..n]);
            left -= n as u64;
        }
        self.file.seek(SeekFrom::Start(self.len))?;
        Ok(())
    }

    /// Appends and hashes `bytes`. On an error the file is cut back to what
    /// it had, so `len` stays true.
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if let Err(e) = self.file.write_all(bytes) {
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Makes `len` durable: fsync of the bytes, then the sidecar.
    pub fn commit(&mut self) -> std::io::Result<()> {
        if self.committed == self.len && self.sidecar.exists() {
            return Ok(());
        }
        self.commit_now()
    }

    fn commit_now(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let line = match boot_id() {
            Some(boot) => format!("{} {boot}\n", self.len),
            None => format!("{}\n", self.len),
        };
        write_atomic(&self.sidecar, line.as_bytes())?;
        self.committed = self.len;
        self.this_boot = boot_id().is_some();
        self.last_commit = std::time::Instant::now();
        Ok(())
    }

    /// Discards every byte (they failed verification).
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.len = 0;
        self.hasher = Sha256::new();
        self.commit()
    }

    /// `sha256:<hex>` of the bytes so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Moves the verified bytes into `blob` (in `blobs/sha256`) and drops
    /// the sidecar, at once; making that durable (the fsyncs of the data and
    /// both folders) is the returned [`Durable`]'s job, off the way of the
    /// hand-off. Until it ran a power cut may leave the blob short or wrong:
    /// the loopback endpoint hashes every body it serves and removes such a
    /// blob, so it is fetched again, never handed on.
    pub fn complete(&mut self, blob: &Path) -> std::io::Result<Durable> {
        let file = self.file.try_clone()?;
        fs::rename(&self.data, blob)?;
        // Stored now: this is its first use.
        let _ = self.file.set_modified(std::time::SystemTime::now());
        remove_if_there(&self.sidecar)?;
        Ok(Durable {
            file,
            blob: blob.to_path_buf(),
            partial_dir: self.data.parent().map(Path::to_path_buf),
        })
    }

    /// Removes the partial (data and sidecar) while holding its lock.
    pub fn remove(self) -> std::io::Result<u64> {
        remove_if_there(&self.data)?;
        remove_if_there(&self.sidecar)?;
        Ok(self.len)
    }
}

/// The fsyncs a completed blob still needs (see [`Partial::complete`]).
#[derive(Debug)]
pub(super) struct Durable {
    file: File,
    blob: PathBuf,
    partial_dir: Option<PathBuf>,
}

impl Durable {
    /// The blob's bytes, then its folder and the partial's. On an error the
    /// blob goes: it cannot be vouched for after a power cut.
    pub fn run(self) -> std::io::Result<()> {
        let synced = (|| {
            self.file.sync_all()?;
            if let Some(dir) = self.blob.parent() {
                sync_dir(dir)?;
            }
            if let Some(dir) = &self.partial_dir {
                sync_dir(dir)?;
            }
            Ok(())
        })();
        if synced.is_err() {
            let _ = fs::remove_file(&self.blob);
        }
        synced
    }
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sidecar_of(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(OFFSET_SUFFIX);
    PathBuf::from(name)
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), read once;
/// `None` where there is none (then only committed bytes are trusted).
fn boot_id() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
    })
    .as_deref()
}

/// The committed offset of the partial at `data` (0 without a readable
/// sidecar: nothing was committed, so nothing is trusted), and whether the
/// sidecar was written in this boot. `N` alone (no boot id) is of an
/// earlier stowage: committed bytes only.
fn read_sidecar(data: &Path) -> (u64, bool) {
    let text = fs::read_to_string(sidecar_of(data)).unwrap_or_default();
    let mut words = text.split_whitespace();
    let Some(committed) = words.next().and_then(|n| n.parse().ok()) else {
        return (0, false);
    };
    let this_boot = words.next().is_some_and(|b| Some(b) == boot_id()) && words.next().is_none();
    (committed, this_boot)
}

/// The bytes of the partial at `data` that a download would resume from
/// (see [`Partial::settle`]).
pub(super) fn kept(data: &Path) -> u64 {
    let (committed, this_boot) = read_sidecar(data);
    trusted(
        fs::metadata(data).map_or(0, |m| m.len()),
        committed,
        this_boot,
    )
}

/// Of `len` bytes on disk, those to keep: all of them when the sidecar
/// (`committed`) was written in this boot, else only the committed ones.
fn trusted(len: u64, committed: u64, this_boot: bool) -> u64 {
    if this_boot { len } else { committed.min(len) }
}

/// Whether `name` is a 64-hex blob name.
pub(super) fn is_hex_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The partial downloads in `dir`: `(hex, bytes on disk)`.
pub(super) fn sizes(dir: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok().filter(fs::Metadata::is_file)?.len();
            is_hex_name(&name).then_some((name, len))
        })
        .collect()
}

/// At open: each partial that no download holds is cut back to its committed
/// offset; one whose blob is complete is removed, and so is a sidecar
/// without its data (a crash between the rename and its removal).
pub(super) fn recover(dir: &Path, blobs: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(hex) = name.strip_suffix(OFFSET_SUFFIX) {
            if is_hex_name(hex) && !dir.join(hex).exists() {
                let _ = fs::remove_file(e.path());
            }
            continue;
        }
        if !is_hex_name(&name) {
            continue;
        }
        match Partial::try_open(dir, &name, false) {
            Ok(Some(p)) if blobs.join(&name).is_file() => {
                let _ = p.remove();
            }
            Ok(Some(mut p)) => {
                if let Err(err) = p.settle(None) {
                    tracing::warn!("cannot recover partial blob {}: {err}", p.data.display());
                }
            }
            // Held by a download in flight, or gone meanwhile.
            Ok(None) => {}
            Err(err) => tracing::warn!("cannot open partial blob {}: {err}", e.path().display()),
        }
    }
}
