//! The daemon's `inbox`: bundles dropped into a folder are imported once.
//!
//! - [`watch`] (a task of its own) looks at the folder every second, off the
//!   loop's thread: a regular file is ready once its size and mtime have not
//!   changed for [`STABLE`]; `*.partial` and dot-files are never touched
//!   (what copy tools write before they rename). Ready files go to the loop,
//!   which imports them in the reconcile slot, before the reconcile itself:
//!   never beside a reconcile, and a `[[prepull]]` sees the images at once.
//! - [`process`]: a bundle is known by its digest (`sha256:` of its
//!   `index.json`), never by name or mtime: one imported before (noted in
//!   `inbox.json` in `state_dir`) is moved to `done/` without a second
//!   import. Each import is an audit record `import`; the file then goes to
//!   `inbox/done/` or, with `NAME.reason` beside it, `inbox/failed/`. A
//!   bundle that could not be tried (the engine away, shutdown) stays for
//!   the next look.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditLog, Outcome, Record};
use crate::blocking::off_loop;
use crate::bundle::Archive;
use crate::bundle::import::{self, ImportError, Origin};
use crate::clock::Clock;
use crate::engine::Engine;
use crate::policy::Policy;

/// A file must keep its size (and mtime) this long before it is read.
pub const STABLE: Duration = Duration::from_secs(2);
/// How often the folder is looked at.
const EVERY: Duration = Duration::from_secs(1);
/// A file handed to the loop is handed again after this long if it is
/// still there (it could not be tried then).
const RETRY: Duration = Duration::from_secs(60);
/// In `state_dir`: the digests of the bundles imported from the inbox.
pub const INBOX_FILE: &str = "inbox.json";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";

/// What one look saw of one file: `(size, mtime)`.
type Seen = (u64, Option<SystemTime>);

/// Pure bookkeeping of the looks: which files have kept still long enough.
#[derive(Debug, Default)]
pub(super) struct Settle {
    /// Each file as last seen, and since when it looked like that.
    seen: HashMap<PathBuf, (Seen, Instant)>,
    /// Files handed on, as they were then, and when.
    handed: HashMap<PathBuf, (Seen, Instant)>,
}

impl Settle {
    /// Takes one look's `files`; returns those to import now.
    pub(super) fn look(&mut self, files: Vec<(PathBuf, Seen)>, now: Instant) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        let mut seen = HashMap::new();
        for (path, now_seen) in files {
            let since = match self.seen.get(&path) {
                Some((before, since)) if *before == now_seen => *since,
                _ => now,
            };
            if now.duration_since(since) >= STABLE {
                let again = match self.handed.get(&path) {
                    Some((as_then, at)) => *as_then != now_seen || now.duration_since(*at) >= RETRY,
                    None => true,
                };
                if again {
                    self.handed.insert(path.clone(), (now_seen, now));
                    ready.push(path.clone());
                }
            }
            seen.insert(path, (now_seen, since));
        }
        self.handed.retain(|p, _| seen.contains_key(p));
        self.seen = seen;
        ready.sort();
        ready
    }
}

/// The files of `dir` that may be bundles: regular files (not links), not
/// `*.partial`, not dot-files. Blocking.
fn list(dir: &Path) -> Vec<(PathBuf, Seen)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && !name.ends_with(".partial")
        })
        .filter_map(|e| {
            let meta = e.metadata().ok()?; // does not follow links
            meta.is_file()
                .then(|| (e.path(), (meta.len(), meta.modified().ok())))
        })
        .collect()
}

/// Looks at the inbox of the policy in force (`policy()`, read at each
/// look: a reload may set, move or drop it) every second and sends the
/// files ready to import, until `stop`.
pub(super) async fn watch(
    policy: impl Fn() -> Arc<Policy>,
    tx: mpsc::Sender<Vec<PathBuf>>,
    stop: CancellationToken,
) {
    let mut settle = Settle::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(dir) = policy().daemon.inbox.clone() else {
            settle = Settle::default();
            continue;
        };
        let files = off_loop(move || list(&dir)).await;
        let ready = settle.look(files, Instant::now());
        if !ready.is_empty() && tx.send(ready).await.is_err() {
            return;
        }
    }
}

/// `inbox.json`: the bundles imported from the inbox, by digest.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Imported {
    #[serde(default)]
    imported: BTreeMap<String, Done>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    /// The file's name when it was imported.
    file: String,
    /// Unix seconds.
    at: i64,
}

fn read_imported(state_dir: &Path) -> Imported {
    match std::fs::read(state_dir.join(INBOX_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{INBOX_FILE} is unreadable ({e}); starting it afresh");
            Imported::default()
        }),
        Err(_) => Imported::default(),
    }
}

fn note_imported(state_dir: &Path, digest: &str, file: &str, at: i64) -> std::io::Result<()> {
    let mut all = read_imported(state_dir);
    all.imported.insert(
        digest.to_owned(),
        Done {
            file: file.to_owned(),
            at,
        },
    );
    let bytes = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
    crate::state::write_atomic(&state_dir.join(INBOX_FILE), &bytes)
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Imported,
    /// The same bundle was imported before.
    Again,
    Failed,
    /// Left where it is, tried at a later look.
    Kept,
}

/// Imports the ready `files` of the inbox one by one, each as
/// [`import::import`] does, and moves each out of the inbox.
pub async fn process<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    stop: &CancellationToken,
    files: Vec<PathBuf>,
) -> Vec<(PathBuf, Fate)> {
    let mut out = Vec::new();
    let Some(inbox) = policy.daemon.inbox.clone() else {
        return out;
    };
    let mut audit = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    for file in files {
        if stop.is_cancelled() {
            break;
        }
        // Still there, still a regular file in the inbox in force.
        let here = file.parent() == Some(inbox.as_path())
            && std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file());
        if !here {
            continue;
        }
        let fate = one(engine, policy, clock, stop, &inbox, &file, &mut audit).await;
        out.push((file, fate));
    }
    audit.sync().await;
    out
}

async fn one<E: Engine>(
    engine: &E,
    policy: &Policy,
    clock: &dyn Clock,
    stop: &CancellationToken,
    inbox: &Path,
    file: &Path,
    audit: &mut AuditLog,
) -> Fate {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let run_id = crate::reconcile::run_id(clock.now());
    let path = file.to_path_buf();
    let digest = off_loop(move || Archive::open(&path).map(|a| a.digest())).await;
    if let Ok(digest) = &digest
        && let Some(before) = read_imported(&policy.daemon.state_dir).imported.get(digest)
    {
        tracing::info!(
            "inbox: {name} is bundle {digest}, imported before (as {}): moved to {DONE}/",
            before.file
        );
        audit.append(&Record {
            ts: clock.now(),
            run: run_id,
            action: audit::Action::Skip,
            reference: Some(file.display().to_string()),
            image: None,
            rule: Some("inbox".into()),
            reason: format!("bundle {digest} was imported before (as {})", before.file),
            outcome: Outcome::Ok,
            error: None,
            bytes: None,
            duration_ms: None,
            resumed_bytes: None,
        });
        move_out(inbox, file, DONE, None);
        return Fate::Again;
    }
    let run = import::Run {
        engine,
        policy,
        clock,
        run_id: &run_id,
        origin: Origin::Inbox,
        shutdown: stop,
    };
    match import::import(&run, file, None, audit).await {
        Ok(done) => {
            tracing::info!(
                "inbox: imported {name} ({}): {}",
                done.digest,
                done.summary()
            );
            if let Err(e) = note_imported(
                &policy.daemon.state_dir,
                &done.digest,
                &name,
                clock.now().timestamp(),
            ) {
                tracing::warn!("inbox: cannot note {} in {INBOX_FILE}: {e}", done.digest);
            }
            move_out(inbox, file, DONE, None);
            Fate::Imported
        }
        Err(e) if e.may_pass_later() => {
            tracing::warn!("inbox: {name} not imported yet ({e}); tried again later");
            Fate::Kept
        }
        Err(e) => {
            tracing::warn!("inbox: {name} refused, host unchanged: {e}");
            move_out(inbox, file, FAILED, Some(&reason(&e)));
            Fate::Failed
        }
    }
}

fn reason(e: &ImportError) -> String {
    format!("import refused, host unchanged: {e}\n")
}

/// Moves `file` into `inbox/<to>/` (a free name: `NAME`, `NAME.1`, …), with
/// `NAME.reason` beside it when given. A failure is logged: the file then
/// stays, and its digest decides at the next look.
fn move_out(inbox: &Path, file: &Path, to: &str, why: Option<&str>) {
    let dir = inbox.join(to);
    let name = file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let result = std::fs::create_dir_all(&dir).and_then(|()| {
        let mut target = dir.join(&name);
        let mut n = 0;
        while target.exists() || reason_of(&target).exists() {
            n += 1;
            target = dir.join(format!("{name}.{n}"));
        }
        if let Some(why) = why {
            crate::state::write_atomic(&reason_of(&target), why.as_bytes())?;
        }
        std::fs::rename(file, &target)?;
        crate::state::sync_dir(&dir)?;
        crate::state::sync_dir(inbox)
    });
    if let Err(e) = result {
        tracing::warn!(
            "inbox: cannot move {} to {}: {e}",
            file.display(),
            dir.display()
        );
    }
}

fn reason_of(target: &Path) -> PathBuf {
    let mut r = target.as_os_str().to_owned();
    r.push(".reason");
    PathBuf::from(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_ready_after_two_still_seconds_and_handed_once() {
        let t0 = Instant::now();
        let mut s = Settle::default();
        let p = PathBuf::from("/in/b.tar");
        let at = |secs: u64| t0 + Duration::from_millis(secs);
        assert!(s.look(vec![(p.clone(), (10, None))], at(0)).is_empty());
        // Growing: the clock starts again.
        assert!(s.look(vec![(p.clone(), (20, None))], at(1500)).is_empty());
        assert!(s.look(vec![(p.clone(), (20, None))], at(3000)).is_empty());
        assert_eq!(
            s.look(vec![(p.clone(), (20, None))], at(3500)),
            vec![p.clone()]
        );
        // Not handed again while it stays as it was...
        assert!(s.look(vec![(p.clone(), (20, None))], at(5000)).is_empty());
        // ...unless it is still there a minute later.
        assert_eq!(
            s.look(vec![(p.clone(), (20, None))], at(64_000)),
            vec![p.clone()]
        );
        // Gone, then back: a new file.
        assert!(s.look(vec![], at(65_000)).is_empty());
        assert!(s.look(vec![(p.clone(), (20, None))], at(66_000)).is_empty());
    }

    #[test]
    fn partial_and_dot_files_and_folders_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["a.tar", "b.tar.partial", ".c.tar"] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join(DONE)).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a.tar"), dir.path().join("l.tar")).unwrap();
        let names: Vec<String> = list(dir.path())
            .into_iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.tar"]);
    }

    #[test]
    fn moved_out_with_a_reason_under_a_free_name() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path();
        for _ in 0..2 {
            std::fs::write(inbox.join("b.tar"), b"x").unwrap();
            move_out(inbox, &inbox.join("b.tar"), FAILED, Some("why\n"));
        }
        let failed = inbox.join(FAILED);
        assert!(failed.join("b.tar").is_file() && failed.join("b.tar.1").is_file());
        assert_eq!(
            std::fs::read_to_string(failed.join("b.tar.1.reason")).unwrap(),
            "why\n"
        );
        assert!(!inbox.join("b.tar").exists());
    }
}
