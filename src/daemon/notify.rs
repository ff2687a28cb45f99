//! systemd's readiness protocol (sd_notify(3)), written by hand: one datagram
//! per message to `$NOTIFY_SOCKET`. Without that variable (not started by
//! systemd, or `Type=simple`) every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends state changes to the service manager.
#[derive(Debug, Default)]
pub struct Notifier {
    /// The unbound datagram socket and the manager's address; `None` when
    /// systemd did not ask for notifications.
    target: Option<(UnixDatagram, SocketAddr)>,
    /// `WATCHDOG_USEC` meant for this process: the manager kills us when no
    /// `WATCHDOG=1` arrives within it.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. A socket
    /// that cannot be used is logged once and notifications are off.
    pub fn from_env() -> Self {
        let watchdog = watchdog_from(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
            return Notifier {
                target: None,
                watchdog,
            };
        };
        let path = path.to_string_lossy().into_owned();
        match Self::open(&path) {
            Ok(target) => Notifier {
                target: Some(target),
                watchdog,
            },
            Err(e) => {
                tracing::warn!(
                    "NOTIFY_SOCKET={path} cannot be used ({e}); no systemd notifications"
                );
                Notifier {
                    target: None,
                    watchdog,
                }
            }
        }
    }

    /// A notifier that sends to the datagram socket at `path` (`@name`:
    /// abstract), with a watchdog of `watchdog`, as `from_env` would with
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC` set (tests of the loop).
    pub fn to_socket(path: &str, watchdog: Option<Duration>) -> std::io::Result<Self> {
        Ok(Notifier {
            target: Some(Self::open(path)?),
            watchdog,
        })
    }

    /// A notifier that sends nothing (tests, `stowage run` by hand).
    pub fn disabled() -> Self {
        Notifier::default()
    }

    fn open(path: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
        // `@name` is a socket in the abstract namespace.
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(path)?,
        };
        Ok((UnixDatagram::unbound()?, addr))
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout, the
    /// margin sd_watchdog_enabled(3) recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one message of `KEY=VALUE` lines. Failures are logged at debug
    /// level: the daemon works the same without a listener.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
        {
            tracing::debug!("sd_notify {message:?}: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` systemd 253+ needs to match it
    /// to the reload request.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the policy",
            monotonic_usec()
        ));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }
}

/// The watchdog timeout if it is meant for `pid` (a forked child must not
/// inherit the parent's duty).
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares against.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000
}

/// A STATUS= value must be one line: a newline would start another key.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_only_for_this_process() {
        assert_eq!(
            watchdog_from(Some("20000000"), None, 7),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            watchdog_from(Some("20000000"), Some("7"), 7),
            Some(Duration::from_secs(20))
        );
        assert_eq!(watchdog_from(Some("20000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some(Notifier::open(path.to_str().unwrap()).unwrap()),
            watchdog: None,
        };
        notifier.ready("policy loaded\nsecond line");
        notifier.reloading();
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "READY=1\nSTATUS=policy loaded second line"
        );
        let n = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }

    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        let name = format!("stowage-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier {
            target: Some(Notifier::open(&format!("@{name}")).unwrap()),
            watchdog: None,
        };
        notifier.watchdog();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
