//! The daemon's `inbox` against the real private engine (one of the test's
//! own: a host that gets its images only from bundles) and the real binary:
//! a bundle copied in slowly is imported once it keeps still, once; the same
//! bundle dropped again under another name is not imported again; a file
//! that is no bundle goes to `failed/` with its reason; a pinned
//! `[[prepull]]` is satisfied by an inbox bundle with its registry unreachable.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stowage::audit::{Action, Outcome};
use stowage::engine::Engine;

use crate::bundle_import_real::{Published, connect, create_bundle, make_bundle};
use crate::engine_env::{self, PrivateEngine};
use crate::transfer_real::{Dir, records};

/// `stowage run` on `dir/policy.toml`, killed on drop.
struct Daemon(Child, PathBuf);

impl Daemon {
    fn start(dir: &Path, engine: &str) -> Daemon {
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["run", "--engine", engine, "-p"])
            .arg(dir.join("policy.toml"))
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .env("STOWAGE_LOG", "info")
            .env("DOCKER_CONFIG", dir.join("docker-config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting stowage run");
        Daemon(child, dir.to_path_buf())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.1.join("daemon.log")).unwrap_or_default()
    }

    fn wait_for(&self, secs: u64, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {secs}s waiting for {what}; daemon log:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The audit log so far (none yet: empty).
fn audit_of(dir: &Dir) -> Vec<stowage::audit::Record> {
    let path = dir.path().join("state/audit.jsonl");
    if path.exists() {
        dir.audit()
    } else {
        Vec::new()
    }
}

/// The policy: never scheduled, the inbox and state in `dir`, `extra` after.
fn policy(dir: &Dir, extra: &str) -> PathBuf {
    let d = dir.path();
    std::fs::create_dir_all(d.join("docker-config")).unwrap();
    dir.policy(&format!(
        "schedule = \"0 0 0 1 1 * 2099\"\ncontrol_socket = \"{c}\"\ninbox = \"{i}\"\n{extra}",
        c = d.join("control.sock").display(),
        i = d.join("inbox").display(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_imports_a_slowly_copied_bundle_once_and_the_same_bundle_again_not() {
    let Some(p) = Published::new("inbox-slow", 2, 1 << 20, 64 << 10).await else {
        return;
    };
    let Some(target) = PrivateEngine::start(None) else {
        return;
    };
    let dir = Dir::new();
    let bundle =
        std::fs::read(create_bundle(&dir.path().join("b.tar"), &p.names(), None).await).unwrap();
    policy(&dir, "");
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let daemon = Daemon::start(dir.path(), &target.addr);
    let imports = || records(audit_of(&dir), Action::Import, Outcome::Ok);

    // Written over about 5 s, in pieces; never touched meanwhile.
    let dropped = inbox.join("b.tar");
    let mut f = std::fs::File::create(&dropped).unwrap();
    let pieces = 10;
    for chunk in bundle.chunks(bundle.len().div_ceil(pieces)) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(imports().is_empty(), "imported while being written");
        assert!(dropped.exists(), "moved while being written");
    }
    drop(f);
    let done = inbox.join("done/b.tar");
    daemon.wait_for(30, "the bundle in done/", || done.is_file());
    assert_eq!(std::fs::read(&done).unwrap(), bundle, "moved whole");
    assert_eq!(imports().len(), 1, "{:?}", imports());
    assert_eq!(imports()[0].rule.as_deref(), Some("inbox"));
    let engine = connect(&target.addr).await;
    for name in p.names() {
        assert!(
            engine.image_id_of(&name).await.unwrap().is_some(),
            "{name} not tagged"
        );
    }

    // The same bundle under another name, as copy tools drop files: a
    // `.partial` renamed at the end.
    let partial = inbox.join("again.tar.partial");
    std::fs::write(&partial, &bundle).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(partial.exists(), "a .partial file was touched");
    std::fs::rename(&partial, inbox.join("again.tar")).unwrap();
    daemon.wait_for(30, "the second copy in done/", || {
        inbox.join("done/again.tar").is_file()
    });
    assert_eq!(imports().len(), 1, "the same bundle imported twice");
    let skips = records(dir.audit(), Action::Skip, Outcome::Ok);
    assert!(
        skips
            .iter()
            .any(|r| r.reason.contains("was imported before (as b.tar)")),
        "{skips:?}"
    );

    // Not a bundle: failed/, with the reason beside it.
    std::fs::write(inbox.join("junk.tar"), b"not a tar file at all").unwrap();
    let reason = inbox.join("failed/junk.tar.reason");
    daemon.wait_for(30, "junk in failed/", || reason.is_file());
    assert!(inbox.join("failed/junk.tar").is_file());
    let why = std::fs::read_to_string(&reason).unwrap();
    println!("failed/junk.tar.reason: {why}");
    assert!(
        why.contains("refused, host unchanged") && why.contains("junk.tar"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_prepull_is_satisfied_by_an_inbox_bundle_with_its_registry_unreachable() {
    let Some(p) = Published::new("inbox-prepull", 1, 256 << 10, 64 << 10).await else {
        return;
    };
    let Some(target) = PrivateEngine::start(None) else {
        return;
    };
    // A registry nobody answers at.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let names = p.names();
    let (_, path) = names[0].split_once('/').unwrap();
    let name = format!("{dead}/{path}");
    let dir = Dir::new();
    let file = make_bundle(
        &dir.path().join("b.tar"),
        &p.names(),
        Some(std::slice::from_ref(&name)),
    );
    let pin = {
        let a = stowage::bundle::Archive::open(&file).unwrap();
        stowage::bundle::verify(&a, None).unwrap().images[0]
            .top
            .digest
            .clone()
    };
    policy(
        &dir,
        &format!("stall_timeout = \"5s\"\n\n[[prepull]]\nimage = \"{name}\"\ndigest = \"{pin}\"\n"),
    );
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let daemon = Daemon::start(dir.path(), &target.addr);
    // The first reconcile cannot pull: the registry is away.
    daemon.wait_for(30, "the failed pre-pull", || {
        !records(audit_of(&dir), Action::Pull, Outcome::Failed).is_empty()
    });
    std::fs::rename(&file, inbox.join("b.tar")).unwrap();
    daemon.wait_for(30, "the import", || inbox.join("done/b.tar").is_file());
    let engine = connect(&target.addr).await;
    let id = p.images[0].id();
    assert_eq!(
        engine.image_id_of(&name).await.unwrap().as_deref(),
        Some(id.as_str())
    );

    // Another reconcile: the pin is met, nothing is pulled or retried.
    let before = audit_of(&dir).len();
    let out = engine_env::stowage(
        &target.addr,
        &dir.path().join("policy.toml"),
        &["reconcile"],
    );
    assert!(out.status.success(), "{}", engine_env::text(&out));
    let after: Vec<_> = audit_of(&dir).into_iter().skip(before).collect();
    assert!(
        !after
            .iter()
            .any(|r| r.action == Action::Pull || r.action == Action::Skip),
        "the pre-pull was not satisfied: {after:?}"
    );
    let img = engine.image(&id).await.unwrap().unwrap();
    assert!(
        img.repo_digests
            .iter()
            .any(|d| d.ends_with(&format!("@{pin}"))),
        "the pinned digest is recorded on the image: {:?}",
        img.repo_digests
    );
    println!(
        "prepull {name}@{pin} satisfied offline; digests {:?}",
        img.repo_digests
    );
}
