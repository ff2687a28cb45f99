//! One external scan command: spawned in a process group of its own, its
//! stdout and stderr read together and kept bounded, the whole group killed
//! at the timeout or at shutdown.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Output kept per command (the rest is read and counted, not kept): a tool
/// that prints 100 MB neither fills memory nor blocks on a full pipe.
pub const OUTPUT_MAX: usize = 64 * 1024;
/// The longest reason (first line of output) kept for the audit record.
pub const REASON_MAX: usize = 300;

/// What one command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    /// `None`: killed (timeout, shutdown) or ended by a signal.
    pub code: Option<i32>,
    /// The first `OUTPUT_MAX` bytes of stdout and stderr, as they came.
    pub output: Vec<u8>,
    /// Every byte printed, kept or not.
    pub printed: u64,
    pub timed_out: bool,
    pub interrupted: bool,
}

impl Ran {
    /// The first non-empty line of output, cut to `REASON_MAX`.
    pub fn first_line(&self) -> String {
        let text = String::from_utf8_lossy(&self.output);
        let line = text.lines().map(str::trim).find(|l| !l.is_empty());
        cut(line.unwrap_or(""), REASON_MAX)
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…`.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Runs `argv` (already substituted) with no stdin; waits at most `timeout`.
pub async fn run(
    argv: &[String],
    timeout: Duration,
    shutdown: &CancellationToken,
) -> std::io::Result<Ran> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::other("empty command"));
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so a timeout kills what the tool started too
        // (a shell's children keep the pipes open otherwise).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut sink = Bounded::default();
    let ended = async {
        let mut out = Bounded::default();
        let mut err = Bounded::default();
        let (o, e) = tokio::join!(out.drain(stdout), err.drain(stderr));
        // A read error only ends the capture; the exit status decides.
        let _ = (o, e);
        let status = child.wait().await;
        (status, out, err)
    };
    let mut timed_out = false;
    let mut interrupted = false;
    let code = tokio::select! {
        (status, out, err) = ended => {
            sink.take(out);
            sink.take(err);
            status?.code()
        }
        () = tokio::time::sleep(timeout) => { timed_out = true; None }
        () = shutdown.cancelled() => { interrupted = true; None }
    };
    if timed_out || interrupted {
        kill_group(group);
    }
    Ok(Ran {
        code,
        output: sink.kept,
        printed: sink.printed,
        timed_out,
        interrupted,
    })
}

/// SIGKILL to the whole group: the tool and everything it started.
fn kill_group(group: Option<i32>) {
    if let Some(pid) = group.and_then(rustix::process::Pid::from_raw) {
        // Already gone is fine.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Output kept up to `OUTPUT_MAX`, and counted beyond.
#[derive(Debug, Default)]
struct Bounded {
    kept: Vec<u8>,
    printed: u64,
}

impl Bounded {
    async fn drain<R: AsyncRead + Unpin>(&mut self, from: Option<R>) -> std::io::Result<()> {
        let Some(mut from) = from else { return Ok(()) };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            self.printed += n as u64;
            let room = OUTPUT_MAX.saturating_sub(self.kept.len());
            self.kept.extend_from_slice(&buf[..n.min(room)]);
        }
    }

    fn take(&mut self, other: Bounded) {
        self.printed += other.printed;
        let room = OUTPUT_MAX.saturating_sub(self.kept.len());
        self.kept
            .extend_from_slice(&other.kept[..other.kept.len().min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn exit_code_and_first_line() {
        let t = CancellationToken::new();
        let r = run(
            &sh("echo; echo '  CVE-1 found '; exit 3"),
            Duration::from_secs(20),
            &t,
        )
        .await
        .unwrap();
        assert_eq!(r.code, Some(3));
        assert_eq!(r.first_line(), "CVE-1 found");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let t = CancellationToken::new();
        let argv = vec!["/nonexistent/scanner".to_owned()];
        assert!(run(&argv, Duration::from_secs(5), &t).await.is_err());
    }

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("ééé", 3), "é…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
