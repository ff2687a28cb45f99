//! Reading the policy file: the one way `check`, every command, the daemon's
//! start and its reloads get the policy's text, so that none of them accepts
//! what another rejects.
//!
//! A policy is a small hand-written file. Anything that is not a regular file
//! (a FIFO would block the reader forever, `/dev/zero` never ends) or is larger
//! than [`MAX_POLICY_BYTES`] is refused before it is read; text that is not
//! UTF-8 is refused with its position, never repaired.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::diag::{Diagnostic, Diagnostics, LineIndex};

/// Far above any real policy (rules, not image lists); a file this large is
/// a mistake, and reading it whole would cost the daemon its memory.
const MAX_POLICY_BYTES: u64 = 4 * 1024 * 1024;

fn refuse(path: &Path, message: String) -> Diagnostics {
    Diagnostics(vec![Diagnostic::file(path, message)])
}

/// The bytes of the policy at `path`, checked to be a regular file of at most
/// [`MAX_POLICY_BYTES`].
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Diagnostics> {
    let cannot = |e: std::io::Error| refuse(path, format!("cannot read policy: {e}"));
    // Non-blocking open: opening a FIFO for reading otherwise waits for a
    // writer, before there is any descriptor to check.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        let kind = crate::fmt::file_kind(meta.file_type());
        return Err(refuse(
            path,
            format!("cannot read policy: it is {kind}, not a regular file"),
        ));
    }
    let too_large = || {
        refuse(
            path,
            format!(
                "cannot read policy: larger than {} MiB; a policy holds rules, not data",
                MAX_POLICY_BYTES / (1024 * 1024)
            ),
        )
    };
    if meta.len() > MAX_POLICY_BYTES {
        return Err(too_large());
    }
    // The size can change between the check and the read (a file being
    // written): the read itself is bounded too.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// `bytes` as text, or a diagnostic at the first byte that is not UTF-8.
pub(crate) fn decode<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, Diagnostics> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = e.valid_up_to();
        // The prefix is valid UTF-8, so positions in it are exact.
        let prefix = std::str::from_utf8(&bytes[..valid]).unwrap_or_default();
        let (line, col) = LineIndex::new(prefix).position(valid);
        Diagnostics(vec![Diagnostic {
            path: path.to_path_buf(),
            line: Some(line),
            col: Some(col),
            message: format!(
                "the policy is not UTF-8 text (byte 0x{:02x} at offset {valid}); save it as UTF-8",
                bytes[valid]
            ),
        }])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_and_folders_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("policy.toml");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .unwrap();
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let err = read(path).unwrap_err().to_string();
            assert!(err.contains(kind), "{path:?}: {err}");
        }
    }

    #[test]
    fn refuses_a_policy_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_POLICY_BYTES + 1).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("larger than 4 MiB"), "{err}");
    }

    #[test]
    fn invalid_utf8_is_refused_with_its_position() {
        let bytes = b"version = 1\n# caf\xe9\n";
        let err = decode(bytes, Path::new("p.toml")).unwrap_err().to_string();
        assert!(
            err.starts_with("p.toml:2:6: error: the policy is not UTF-8"),
            "{err}"
        );
        assert!(err.contains("0xe9"), "{err}");
    }
}
