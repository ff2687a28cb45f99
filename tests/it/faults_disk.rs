//! Faults of the disk stowage writes to: a full filesystem under the data
//! root and `state_dir` (eviction must still run and free it; audit records
//! are held until they can be written), and the audit log's growth (rotation
//! at `audit_max`, records that do not repeat, a streaming `history`).

use crate::engine_env;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::engine_env::{stowage, text};
use stowage::audit::{self, Action, Outcome};
use stowage::engine::{DockerEngine, Engine};

const DAY: i64 = 86_400;
const MIB: usize = 1024 * 1024;

/// Takes every byte still free on the filesystem of `dir` with one
/// `fallocate`d file, as a host at 100 % looks.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let st = rustix::fs::statvfs(dir).unwrap();
    let mut len = st.f_bavail * st.f_frsize;
    while len > 0 {
        let ok = Command::new("fallocate")
            .arg("-l")
            .arg(len.to_string())
            .arg(&filler)
            .status()
            .expect("running fallocate")
            .success();
        if ok {
            break;
        }
        len = len.saturating_sub(st.f_frsize);
    }
    let st = rustix::fs::statvfs(dir).unwrap();
    assert_eq!(
        st.f_bavail,
        0,
        "the filesystem of {} is not full",
        dir.display()
    );
    filler
}

/// Gives the engine's image metadata (`<data root>/image`: the reference
/// store it rewrites on every untag) a small tmpfs of its own, so that the
/// engine can still record a removal on a full disk: on a real host it writes
/// those few KiB into the root-reserved blocks a full filesystem keeps.
/// Restarts the engine around the mount.
struct MetadataMount {
    path: PathBuf,
}

impl MetadataMount {
    fn new(engine: &mut engine_env::PrivateEngine) -> MetadataMount {
        engine.stop();
        let path = engine.data_root.join("image");
        let saved = engine.dir.join("image-saved");
        let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
        run(Command::new("cp").arg("-a").arg(&path).arg(&saved));
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&path));
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(&path));
        engine.spawn();
        MetadataMount { path }
    }
}

impl Drop for MetadataMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect()
}

#[tokio::test]
async fn a_full_disk_still_evicts_and_the_held_audit_records_are_written_after() {
    let Some(registry) = engine_env::registry() else {
        return;
    };
    let Some(mut small) = engine_env::PrivateEngine::start(Some(96)) else {
        return;
    };
    // Dropped before the engine (declared after it).
    let _metadata = MetadataMount::new(&mut small);
    let engine = DockerEngine::connect(Some(&small.addr)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    // Three old images nothing protects, 8 MiB each.
    let old: Vec<_> = (0..3)
        .map(|i| {
            engine_env::image(
                &[&format!("full/old{i}:v1")],
                now - (30 - i as i64) * DAY,
                8 * MIB,
            )
        })
        .collect();
    engine_env::load(&engine, &old).await;
    // The pre-pull wants a 16 MiB image from the registry: it cannot fit.
    let want_ref = format!("{registry}/{}:v1", engine_env::unique_ns("full-want"));
    let want = engine_env::image(&[&want_ref], now, 16 * MIB);
    engine_env::load(&engine, std::slice::from_ref(&want)).await;
    engine.push(&want_ref, None, &mut |_| {}).await.unwrap();
    engine.remove(&want_ref).await.unwrap();

    // State and audit log on the same filesystem as the data root.
    let state_dir = small.data_root.join("stowage");
    std::fs::create_dir_all(&state_dir).unwrap();
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\nmin_age = \"0s\"\n\n\
             [[prepull]]\nimage = \"{want_ref}\"\n\n\
             [storage]\nhigh_watermark = \"90%\"\nlow_watermark = \"50%\"\n",
            state_dir.display()
        ),
    )
    .unwrap();
    fill(&small.data_root);

    let apply = stowage(&small.addr, &policy, &["apply"]);
    let out = text(&apply);
    eprintln!("{out}");
    // The pull failed (exit 1), but the reconcile ran to its end.
    assert_eq!(apply.status.code(), Some(1), "{out}");
    let (_, avail) = small.disk();
    assert!(
        avail >= (20 * MIB) as u64,
        "eviction did not free the disk: {avail} bytes available\n{out}"
    );
    let left: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    for o in &old {
        assert!(!left.contains(&o.id()), "{} was not evicted", o.id());
    }

    // The pull's record, held while the disk was full, was written once
    // eviction made room, before the evictions' own records.
    let records = audit::read(&state_dir.join("audit.jsonl")).unwrap().records;
    let kinds: Vec<(Action, Outcome)> = records.iter().map(|r| (r.action, r.outcome)).collect();
    let pull = kinds
        .iter()
        .position(|k| *k == (Action::Pull, Outcome::Failed))
        .unwrap_or_else(|| panic!("no failed pull record: {kinds:?}"));
    let evicts: Vec<usize> = (0..kinds.len())
        .filter(|&i| kinds[i] == (Action::Evict, Outcome::Ok))
        .collect();
    assert_eq!(evicts.len(), 3, "{kinds:?}");
    assert!(pull < evicts[0], "{kinds:?}");
    assert!(
        !String::from_utf8_lossy(&apply.stderr).contains("unwritten audit record"),
        "{out}"
    );
    // The final save succeeded, and no failed save left its temp file.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("state.json")).unwrap()).unwrap();
    assert!(
        state["backoff"].as_object().is_some_and(|b| !b.is_empty()),
        "{state}"
    );
    assert_eq!(leftovers(&state_dir), Vec::<String>::new());
}

/// A policy in `dir` with its state (and audit log) there too.
fn policy_in(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(
        &p,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\n{body}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    p
}

fn warns(records: &[audit::Record]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.action == Action::Warn)
        .map(|r| r.reference.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn the_same_bad_tags_are_warned_once_not_at_every_reconcile() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("warn-once");
    let now = chrono::Utc::now().timestamp();
    let bad = [format!("{ns}/app:latest"), format!("{ns}/app:wip")];
    let image = engine_env::image(
        &[&format!("{ns}/app:v1"), &bad[0], &bad[1]],
        now - DAY,
        1024,
    );
    engine_env::load(&engine, std::slice::from_ref(&image)).await;
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let rule = |extra: &str| {
        format!("[[tags]]\nname = \"names\"\nimages = [\"{ns}/app\"]\nallow = ['v\\d+'{extra}]\n")
    };
    let policy = policy_in(dir.path(), &rule(""));
    for _ in 0..3 {
        let apply = stowage(&addr, &policy, &["apply"]);
        assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    }
    let log = dir.path().join("state/audit.jsonl");
    let mut said = warns(&audit::read(&log).unwrap().records);
    said.sort();
    assert_eq!(said, bad, "each bad tag once over three reconciles");

    // What the warnings say changes (`wip` is allowed now): the one left is
    // said again, because its message names the new rule.
    policy_in(dir.path(), &rule(", 'wip'"));
    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let said = warns(&audit::read(&log).unwrap().records);
    assert_eq!(said.len(), 3, "{said:?}");
    assert_eq!(said[2], bad[0]);
    engine.remove(&image.id()).await.ok();
}

#[tokio::test]
async fn the_audit_log_rotates_at_audit_max_and_history_reads_both() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("rotate");
    let image = engine_env::image(&[&format!("{ns}/app:bad")], 0, 1024);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let policy = policy_in(
        dir.path(),
        &format!(
            "audit_max = \"64KiB\"\n\n[[tags]]\nname = \"names\"\nimages = [\"{ns}/app\"]\nallow = ['v\\d+']\n"
        ),
    );
    // An earlier log just past the cap.
    let log = dir.path().join("state/audit.jsonl");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let mut earlier = Vec::new();
    let mut n = 0u64;
    while earlier.len() <= 64 * 1024 {
        let r = audit::Record {
            ts: chrono::DateTime::from_timestamp(1_700_000_000 + n as i64, 0).unwrap(),
            run: format!("old-{n}"),
            action: Action::Remove,
            reference: Some(format!("old/app:{n}")),
            image: None,
            rule: Some("old".into()),
            reason: "earlier".into(),
            outcome: Outcome::Ok,
            error: None,
            bytes: Some(n),
            duration_ms: None,
            resumed_bytes: None,
        };
        earlier.extend(serde_json::to_vec(&r).unwrap());
        earlier.push(b'\n');
        n += 1;
    }
    std::fs::write(&log, &earlier).unwrap();

    let apply = stowage(&addr, &policy, &["apply"]);
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    // The next record would have passed the cap: the full log moved whole.
    let rotated = dir.path().join("state/audit.jsonl.1");
    assert_eq!(std::fs::read(&rotated).unwrap(), earlier);
    assert!(std::fs::metadata(&log).unwrap().len() < 64 * 1024);
    // Readers take both generations, the older first.
    let all = audit::read(&log).unwrap().records;
    let n = n as usize;
    assert_eq!(all[n - 1].run, format!("old-{}", n - 1));
    assert_eq!(warns(&all[n..]), [format!("{ns}/app:bad")]);

    // So does `history`.
    let history = stowage(&addr, &policy, &["history", "--json"]);
    assert_eq!(history.status.code(), Some(0), "{}", text(&history));
    let shown: Vec<audit::Record> = String::from_utf8_lossy(&history.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(shown, all);
    engine.remove(&image.id()).await.ok();
}

#[test]
fn history_since_beyond_any_representable_time_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_in(dir.path(), "");
    let history = engine_env::stowage_cmd(
        "unix:///nonexistent.sock",
        &policy,
        &["history", "--since", "300000y"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&history.stderr);
    assert_eq!(history.status.code(), Some(2), "{}", text(&history));
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--since 300000years"), "{err}");
    // A long but representable window still works.
    let history = engine_env::stowage_cmd(
        "unix:///nonexistent.sock",
        &policy,
        &["history", "--since", "1000y"],
    )
    .output()
    .unwrap();
    assert_eq!(history.status.code(), Some(0), "{}", text(&history));
}
