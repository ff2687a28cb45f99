//! Faults around transfers and removals, against the real private engine and
//! registry (issue 12): a dangling image tagged between planning and its
//! removal; SIGTERM (and `kill -9`) in the middle of a mirror push.

use crate::engine_env;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::net::{Mode, Proxy, TestRegistry};
use bytes::Bytes;
use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;
use stowage::audit::{self, Action as AuditAction, AuditLog, Outcome};
use stowage::engine::{
    BoxStream, Container, Credentials, DiskUsage, DockerEngine, Engine, EngineInfo, EngineResult,
    Event, Image, Layer, Progress, Removed,
};
use stowage::plan::{self, Kind, Observed};
use stowage::reconcile::{self, SystemClock};
use stowage::state::State;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const DAY: i64 = 86_400;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The real engine, with one hook: the first time the executor asks about
/// `image` right before its removal (its inspect, or which containers use
/// it), `tag` is given to that image first, as `docker tag <id> app:keep`
/// by someone else would.
struct TagsDuringRemoval {
    inner: DockerEngine,
    image: String,
    tag: String,
    fired: Mutex<bool>,
}

impl TagsDuringRemoval {
    async fn hook(&self, asked: &str) -> EngineResult<()> {
        let fire =
            asked == self.image && !std::mem::replace(&mut *self.fired.lock().unwrap(), true);
        if fire {
            self.inner.tag(&self.image, &self.tag).await?;
        }
        Ok(())
    }
}

impl Engine for TagsDuringRemoval {
    async fn list_images(&self) -> EngineResult<Vec<Image>> {
        self.inner.list_images().await
    }
    async fn list_containers(&self) -> EngineResult<Vec<Container>> {
        self.inner.list_containers().await
    }
    async fn containers_using(&self, image_id: &str) -> EngineResult<Vec<Container>> {
        self.hook(image_id).await?;
        self.inner.containers_using(image_id).await
    }
    async fn image(&self, reference: &str) -> EngineResult<Option<Image>> {
        self.hook(reference).await?;
        self.inner.image(reference).await
    }
    async fn image_id_of(&self, reference: &str) -> EngineResult<Option<String>> {
        self.inner.image_id_of(reference).await
    }
    async fn remove(&self, reference: &str) -> EngineResult<Removed> {
        self.inner.remove(reference).await
    }
    async fn tag(&self, source: &str, target: &str) -> EngineResult<()> {
        self.inner.tag(source, target).await
    }
    async fn pull(
        &self,
        reference: &str,
        platform: Option<&str>,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        self.inner
            .pull(reference, platform, credentials, on_progress)
            .await
    }
    async fn push(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
        on_progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> EngineResult<()> {
        self.inner.push(reference, credentials, on_progress).await
    }
    async fn remote_digest(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> EngineResult<String> {
        self.inner.remote_digest(reference, credentials).await
    }
    async fn load(&self, archive: Bytes) -> EngineResult<Vec<String>> {
        self.inner.load(archive).await
    }
    async fn save(&self, references: &[String]) -> EngineResult<Bytes> {
        self.inner.save(references).await
    }
    fn events(&self) -> BoxStream<'_, EngineResult<Event>> {
        self.inner.events()
    }
    async fn image_layers(&self, id: &str) -> EngineResult<Vec<Layer>> {
        self.inner.image_layers(id).await
    }
    async fn info(&self) -> EngineResult<EngineInfo> {
        self.inner.info().await
    }
    async fn disk_usage(&self) -> EngineResult<DiskUsage> {
        self.inner.disk_usage().await
    }
    async fn prune_build_cache(&self, keep_bytes: u64) -> EngineResult<u64> {
        self.inner.prune_build_cache(keep_bytes).await
    }
}

/// Regression (issue 12, item 11): a dangling image was removed by id after
/// only a container re-check, so a tag given to it meanwhile went with it.
#[tokio::test]
async fn dangling_image_tagged_after_planning_keeps_its_new_tag() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let ns = engine_env::unique_ns("dangling-race");
    let dangling = engine_env::image(&[], now() - 30 * DAY, 4096);
    let other = engine_env::image(&[], now() - 30 * DAY, 4096);
    engine_env::load(&engine, &[dangling.clone(), other.clone()]).await;
    let keep = format!("{ns}/app:keep");

    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(
        &policy_path,
        "version = 1\n[[retain]]\nname = \"dangling\"\nuntagged = true\n",
    )
    .unwrap();
    let policy = stowage::policy::load(&policy_path).unwrap();
    // Plan on this test's two images only: the engine is shared, and other
    // tests' dangling images are none of this test's business.
    let listed = engine.list_images().await.unwrap();
    let observed = Observed {
        images: listed
            .into_iter()
            .filter(|i| i.id == dangling.id() || i.id == other.id())
            .collect(),
        ..Observed::default()
    };
    assert_eq!(observed.images.len(), 2, "both fixtures are loaded");
    let planned = plan::plan(&policy, &observed, &State::default(), now());
    let removals: Vec<&str> = planned
        .actions
        .iter()
        .filter(|a| a.kind == Kind::Remove && a.reference.is_none())
        .map(|a| a.image.as_str())
        .collect();
    assert_eq!(removals.len(), 2, "{}", plan::render(&planned));

    let hooked = TagsDuringRemoval {
        inner: engine,
        image: dangling.id(),
        tag: keep.clone(),
        fired: Mutex::new(false),
    };
    let mut log = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
    let report = reconcile::execute(
        &hooked,
        &planned,
        &mut log,
        "run-race",
        false,
        &SystemClock,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    drop(log);
    let engine = hooked.inner;

    // The image tagged meanwhile is still there, and still named app:keep.
    assert_eq!(
        engine.image_id_of(&keep).await.unwrap(),
        Some(dangling.id()),
        "app:keep was removed with the image that was dangling when planned"
    );
    // The other one, still dangling, went as planned.
    let left = engine.list_images().await.unwrap();
    assert!(!left.iter().any(|i| i.id == other.id()));
    assert_eq!((report.removed, report.skipped), (1, 1), "{report:?}");
    let records = audit::read(&dir.path().join("audit.jsonl"))
        .unwrap()
        .records;
    let skip = records
        .iter()
        .find(|r| r.action == AuditAction::Skip)
        .unwrap_or_else(|| panic!("no skip record: {records:#?}"));
    assert_eq!(skip.image.as_deref(), Some(dangling.id().as_str()));
    assert_eq!(skip.outcome, Outcome::Ok);
    assert!(skip.reason.contains(&keep), "{}", skip.reason);

    engine.remove(&keep).await.unwrap();
}

// ------------------------------------------------- SIGTERM mid-transfer

/// A mirror push held in flight: a `[[prepull]]` that moves `app:1` from an
/// old image to a new one (so `previous` has something to save), then a
/// mirror push of `local:1` to a registry behind a proxy that the test stalls
/// once the push has begun.
struct MidPush {
    dir: tempfile::TempDir,
    engine: DockerEngine,
    addr: String,
    proxy: Proxy,
    _mirror: TestRegistry,
    /// The local reference mirrored, and its image.
    local: String,
    local_id: String,
    /// The push's target (its temporary tag on the host).
    target: String,
    prepull: String,
    old_id: String,
    new_id: String,
}

impl MidPush {
    async fn new(name: &str) -> Option<MidPush> {
        let engine = engine_env::engine().await?;
        let (addr, reg) = (engine_env::engine_addr()?, engine_env::registry()?);
        let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
        let mirror = TestRegistry::start(&dir.path().join("mirror"), None);
        let proxy = Proxy::start(&mirror.addr).await;
        let ns = engine_env::unique_ns(name);
        let prepull = format!("{reg}/{ns}/app:1");
        // The registry serves `new`; the host has `old` under the same name.
        let new = engine_env::image(&[&prepull], now() - DAY, 4096);
        engine_env::load(&engine, std::slice::from_ref(&new)).await;
        engine.push(&prepull, None, &mut |_| {}).await.unwrap();
        engine.remove(&prepull).await.unwrap();
        let old = engine_env::image(&[&prepull], now() - 2 * DAY, 4096);
        let local = format!("{ns}/local:1");
        // Incompressible bytes: a push that takes a while through the proxy.
        let pushed = engine_env::image(&[&local], now() - DAY, 2 << 20);
        engine_env::load(&engine, &[old.clone(), pushed.clone()]).await;
        std::fs::create_dir_all(dir.path().join("docker-config")).unwrap();
        std::fs::write(
            dir.path().join("policy.toml"),
            format!(
                "version = 1\n[daemon]\nstate_dir = \"{d}/state\"\ncontrol_socket = \"{d}/control.sock\"\n\
                 stall_timeout = \"60s\"\n\
                 [[prepull]]\nimage = \"{prepull}\"\nkeep_previous = 1\n\
                 [[mirror]]\nname = \"edge\"\nregistry = \"{p}\"\nimages = [\"{ns}/local\"]\n",
                d = dir.path().display(),
                p = proxy.addr,
            ),
        )
        .unwrap();
        Some(MidPush {
            target: format!("{}/{ns}/local:1", proxy.addr),
            dir,
            engine,
            addr,
            proxy,
            _mirror: mirror,
            local,
            local_id: pushed.id(),
            prepull,
            old_id: old.id(),
            new_id: new.id(),
        })
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// `stowage ARGS` as a child; `DOCKER_CONFIG` points at an empty folder
    /// so the machine's own credentials never take part.
    fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stowage.log"))
            .unwrap();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(args)
            .arg("--engine")
            .arg(&self.addr)
            .arg("-p")
            .arg(self.policy())
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .env("DOCKER_CONFIG", self.dir.path().join("docker-config"))
            .env("STOWAGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting stowage")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stowage.log")).unwrap_or_default()
    }

    /// The tags of the mirrored image now.
    async fn local_tags(&self) -> Vec<String> {
        let mut tags = self
            .engine
            .list_images()
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.id == self.local_id)
            .map(|i| i.repo_tags)
            .unwrap_or_default();
        tags.sort();
        tags
    }

    /// Throttles the mirror, starts `stowage ARGS`, waits until the push has
    /// tagged the image with its target (the push is starting), then slows
    /// the mirror's answers to a trickle (10 bytes/s): the push hangs in
    /// flight until the process is stopped. Not `Mode::Stall`: a connection
    /// the engine opens then would never answer, even once the test lets
    /// traffic pass again, and the engine keeps idle connections for reuse.
    async fn start_and_hold_push(&self, args: &[&str]) -> tokio::process::Child {
        self.proxy.set(Mode::Throttle(4096));
        let child = self.spawn(args);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.local_tags().await.contains(&self.target) {
            assert!(
                Instant::now() < deadline,
                "the push never started:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.proxy.set(Mode::Throttle(10));
        // Well inside the push (each answer now takes half a minute), before
        // any stall timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        child
    }

    fn state(&self) -> Value {
        let bytes = std::fs::read(self.dir.path().join("state/state.json"))
            .unwrap_or_else(|e| panic!("no state.json ({e}):\n{}", self.log()));
        serde_json::from_slice(&bytes).expect("state.json is whole")
    }

    fn audit(&self) -> Vec<audit::Record> {
        audit::read(&self.dir.path().join("state/audit.jsonl"))
            .unwrap()
            .records
    }

    /// What must hold after a clean stop mid-push: the temporary tag is
    /// gone, the finished pull moved `app:1` and its `previous` was saved.
    async fn assert_stopped_cleanly(&self) {
        assert_eq!(
            self.local_tags().await,
            std::slice::from_ref(&self.local),
            "the push's temporary tag {} was left:\n{}",
            self.target,
            self.log()
        );
        assert_eq!(
            self.engine.image_id_of(&self.prepull).await.unwrap(),
            Some(self.new_id.clone())
        );
        let state = self.state();
        assert_eq!(
            state["prepull"][&self.prepull]["previous"],
            serde_json::json!([self.old_id]),
            "the finished pull's previous image was not saved: {state:#}\n{}",
            self.log()
        );
        assert!(
            !self.dir.path().join("state/temp-tags.json").exists(),
            "the temporary-tag journal still names a tag"
        );
        let interrupted = self
            .audit()
            .into_iter()
            .find(|r| r.reference.as_deref() == Some(self.target.as_str()))
            .unwrap_or_else(|| panic!("no record for the push: {:#?}", self.audit()));
        assert_eq!(
            (interrupted.action, interrupted.outcome),
            (AuditAction::Skip, Outcome::Deferred),
            "{interrupted:?}"
        );
        assert!(
            interrupted.reason.contains("interrupted by shutdown"),
            "{}",
            interrupted.reason
        );
    }
}

fn signal(child: &tokio::process::Child, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    kill_process(pid, sig).unwrap();
}

/// Waits for `child` to exit, at most `secs`.
async fn exit_within(child: &mut tokio::process::Child, secs: u64, log: &str) -> ExitStatus {
    tokio::time::timeout(Duration::from_secs(secs), child.wait())
        .await
        .unwrap_or_else(|_| panic!("still running {secs}s after the signal:\n{log}"))
        .unwrap()
}

/// Regression (issue 12, item 10): the daemon gave a reconcile 8 s to finish
/// at SIGTERM, then aborted it in the middle of the push: its temporary tag
/// stayed (and counted as the user's from then on) and the `previous` of the
/// pull that had finished was never saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_push_stops_the_daemon_cleanly() {
    let Some(t) = MidPush::new("sigterm-daemon").await else {
        return;
    };
    let mut daemon = t.start_and_hold_push(&["run"]).await;
    let sent = Instant::now();
    signal(&daemon, Signal::TERM);
    let status = exit_within(&mut daemon, 20, &t.log()).await;
    assert_eq!(status.code(), Some(0), "{}", t.log());
    // Cancelled, not waited out.
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?} to stop:\n{}",
        sent.elapsed(),
        t.log()
    );
    t.assert_stopped_cleanly().await;
}

/// Regression (issue 12, item 10): `stowage apply` knew only SIGINT; SIGTERM
/// killed it mid-push, temporary tag and all, without saving the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_push_stops_apply_cleanly_with_143() {
    let Some(t) = MidPush::new("sigterm-apply").await else {
        return;
    };
    let mut apply = t.start_and_hold_push(&["apply"]).await;
    signal(&apply, Signal::TERM);
    let status = exit_within(&mut apply, 20, &t.log()).await;
    let mut stdout = String::new();
    apply
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(143), "{stdout}\n{}", t.log());
    assert!(
        stdout.contains("(interrupted by shutdown)"),
        "{stdout}\n{}",
        t.log()
    );
    t.assert_stopped_cleanly().await;
}

/// Regression (issue 12, item 10): a push killed outright (`kill -9`, power
/// loss) leaves its temporary tag; the next run took it for the user's
/// reference and kept it for ever. Now it is recognised and removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tag_of_a_killed_push_is_removed_at_the_next_start() {
    let Some(t) = MidPush::new("killed-push").await else {
        return;
    };
    let mut apply = t.start_and_hold_push(&["apply"]).await;
    signal(&apply, Signal::KILL);
    exit_within(&mut apply, 20, &t.log()).await;
    let mut left = vec![t.local.clone(), t.target.clone()];
    left.sort();
    assert_eq!(
        t.local_tags().await,
        left,
        "the kill left the temporary tag"
    );

    // The next run, with the mirror reachable: the leftover goes first, the
    // push then runs as usual and removes its own temporary tag again.
    t.proxy.set(Mode::Pass);
    let mut again = t.spawn(&["apply"]);
    let status = exit_within(&mut again, 60, &t.log()).await;
    assert_eq!(status.code(), Some(0), "{}", t.log());
    assert_eq!(
        t.local_tags().await,
        std::slice::from_ref(&t.local),
        "the leftover temporary tag was taken for a user's:\n{}",
        t.log()
    );
    let records = t.audit();
    assert!(
        records.iter().any(|r| r.action == AuditAction::Push
            && r.outcome == Outcome::Ok
            && r.reference.as_deref() == Some(t.target.as_str())),
        "{records:#?}"
    );
    assert!(
        !t.dir.path().join("state/temp-tags.json").exists(),
        "the temporary-tag journal still names a tag"
    );
}
