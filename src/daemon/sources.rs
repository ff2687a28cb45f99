//! Trigger sources outside the daemon loop: signals and the policy folder
//! watcher. Each only enqueues a [`Trigger`]; the loop decides what runs.

use std::future::Future;
use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::Trigger;

/// Installs the daemon's signal handlers: SIGHUP -> reload, SIGUSR1 ->
/// reconcile now. Returns the shutdown future (SIGTERM or SIGINT).
///
/// Handlers are installed before this returns, so a SIGHUP that arrives
/// right after start reloads instead of killing the process.
pub fn signals(
    triggers: mpsc::Sender<Trigger>,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let trigger = tokio::select! {
                Some(()) = hup.recv() => Trigger::Reload,
                Some(()) = usr1.recv() => Trigger::Reconcile,
                else => return,
            };
            if triggers.send(trigger).await.is_err() {
                return;
            }
        }
    });
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing the action in flight, then exiting"),
            _ = int.recv() => tracing::info!("SIGINT: finishing the action in flight, then exiting"),
        }
    })
}

/// The folder watched for policy changes: editors often write a new file and
/// rename it over the old one, which a watch on the file itself would miss.
pub fn policy_folder(policy: &Path) -> PathBuf {
    match policy.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Watches the policy's folder; every change in it enqueues
/// [`Trigger::PolicyTouched`]. The loop debounces and compares the file's
/// content, so unrelated files in the folder cost one read at most.
///
/// Keep the returned watcher alive as long as watching should go on.
pub fn watch_policy(
    policy: &Path,
    triggers: mpsc::Sender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // Reads (ours included) change nothing; a close after writing does.
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            },
            // Lost events (queue overflow): check the file anyway.
            Err(_) => true,
        };
        // A full queue already holds a pending trigger: nothing is lost.
        if relevant {
            let _ = triggers.try_send(Trigger::PolicyTouched);
        }
    })?;
    watcher.watch(&policy_folder(policy), RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_of_a_bare_file_name_is_the_current_one() {
        assert_eq!(policy_folder(Path::new("policy.toml")), PathBuf::from("."));
        assert_eq!(
            policy_folder(Path::new("/etc/stowage/policy.toml")),
            PathBuf::from("/etc/stowage")
        );
    }

    #[tokio::test]
    async fn a_rename_over_the_policy_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "version = 1\n").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _watcher = watch_policy(&policy, tx).unwrap();
        let tmp = dir.path().join(".policy.toml.tmp");
        std::fs::write(&tmp, "version = 1\n# edited\n").unwrap();
        std::fs::rename(&tmp, &policy).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("a trigger within 5 s");
        assert!(matches!(got, Some(Trigger::PolicyTouched)));
    }
}
