//! The tar writer of `bundle create`: `FILE.partial` written through a
//! buffer, fsynced, renamed over `FILE`, the folder fsynced; a failure
//! removes the partial, so `FILE` is the whole bundle or what was there.
//! Entries are plain ustar regular files and folders, owner 0, mtime 0,
//! mode 0644/0755: the same images give the same bytes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::BundleError;

pub(crate) struct TarOut {
    builder: Option<tar::Builder<BufWriter<File>>>,
    partial: PathBuf,
    out: PathBuf,
}

/// `FILE.partial` beside `FILE`.
pub(crate) fn partial_of(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

impl TarOut {
    pub(crate) fn create(out: &Path) -> Result<TarOut, BundleError> {
        let partial = partial_of(out);
        let file = File::create(&partial).map_err(|source| BundleError::Write {
            what: "cannot create",
            path: partial.clone(),
            source,
        })?;
        let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
        builder.mode(tar::HeaderMode::Deterministic);
        let mut t = TarOut {
            builder: Some(builder),
            partial,
            out: out.to_path_buf(),
        };
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            t.append(&mut h, dir, std::io::empty())?;
        }
        Ok(t)
    }

    /// One regular file of `size` bytes read from `data`.
    pub(crate) fn file(
        &mut self,
        name: &str,
        size: u64,
        data: impl Read,
    ) -> Result<(), BundleError> {
        let mut h = header(tar::EntryType::Regular, 0o644, size);
        // A source shorter than it said would shift every entry after it.
        let mut counted = Counted { inner: data, n: 0 };
        self.append(&mut h, name, &mut counted)?;
        if counted.n != size {
            return Err(self.error(
                "short source for",
                std::io::Error::other(format!("{name}: {} of {size} bytes", counted.n)),
            ));
        }
        Ok(())
    }

    fn append(
        &mut self,
        h: &mut tar::Header,
        name: &str,
        data: impl Read,
    ) -> Result<(), BundleError> {
        let builder = self
            .builder
            .as_mut()
            .expect("a TarOut is written until finished");
        match builder.append_data(h, name, data) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.error("cannot write", e)),
        }
    }

    /// Ends the tar, fsyncs, renames `FILE.partial` to `FILE`; its size.
    pub(crate) fn finish(mut self) -> Result<u64, BundleError> {
        let builder = self.builder.take().expect("finished once");
        let file = builder
            .into_inner()
            .and_then(|w| w.into_inner().map_err(std::io::IntoInnerError::into_error))
            .and_then(|mut f| {
                f.flush()?;
                f.sync_all()?;
                Ok(f)
            })
            .map_err(|e| self.error("cannot write", e))?;
        let len = file
            .metadata()
            .map_err(|e| self.error("cannot read", e))?
            .len();
        drop(file);
        std::fs::rename(&self.partial, &self.out).map_err(|e| self.error("cannot rename", e))?;
        let dir = self
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let _ = crate::state::sync_dir(dir);
        Ok(len)
    }

    fn error(&self, what: &'static str, source: std::io::Error) -> BundleError {
        BundleError::Write {
            what,
            path: self.partial.clone(),
            source,
        }
    }
}

impl Drop for TarOut {
    /// Not finished: the partial goes (it was never the bundle).
    fn drop(&mut self) {
        if self.builder.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}
