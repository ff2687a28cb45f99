//! The real private engine, Podman service and registry that `scripts/test`
//! starts (see `scripts/lib.sh`): their addresses, fixture images loaded into
//! them, the docker, podman and buildah CLIs and the stowage binary against
//! them, and engines of a test's own.
//!
//! Outside CI a missing engine skips the test loudly; in CI it fails, so a
//! broken harness can never pass as green.

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use stowage::engine::{DockerEngine, Engine};
use stowage::fixture::{self, FixtureImage};

/// `unix:///.../docker.sock` of the private engine.
pub const ENGINE_VAR: &str = "STOWAGE_TEST_ENGINE";
/// `127.0.0.1:PORT` of the private registry.
pub const REGISTRY_VAR: &str = "STOWAGE_TEST_REGISTRY";
/// A scratch folder tests may write into.
pub const DIR_VAR: &str = "STOWAGE_TEST_DIR";
/// `tcp://127.0.0.1:PORT`: the private engine's TLS listener (`--tlsverify`:
/// client certificates required).
pub const TLS_ENGINE_VAR: &str = "STOWAGE_TEST_TLS_ENGINE";
/// The folder of that listener's test PKI (`stowage_make_certs` in
/// `scripts/lib.sh`): `ca.pem`; `client/` with `ca.pem`, `cert.pem` and
/// `key.pem`; `other/`, a CA and a client certificate the engine does not trust.
pub const TLS_CERTS_VAR: &str = "STOWAGE_TEST_TLS_CERTS";
/// `unix:///.../podman.sock` of the private Podman service.
pub const PODMAN_VAR: &str = "STOWAGE_TEST_PODMAN";
/// A `buildah` wrapper on the private Podman service's storage.
pub const BUILDAH_VAR: &str = "STOWAGE_TEST_BUILDAH";

/// Whether this runs in CI, where a missing engine or tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `true` when `tool --version` runs; a loud SKIP (a failure in CI) when not.
/// `package` is the Debian package `stowage_install_deps` installs it from.
pub fn have_tool(tool: &str, package: &str, test: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !in_ci(),
            "{tool} is missing: scripts/lib.sh installs the `{package}` package"
        );
        eprintln!("SKIP {test}: {tool} not installed (apt-get install {package})");
    }
    found
}

/// The value of `var`, or `None` after a loud SKIP line (a panic in CI).
fn required(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if in_ci() => panic!("{var} is not set: run scripts/test"),
        _ => {
            // Straight to stderr: libtest captures `eprintln!` of passing tests,
            // and a skip must be seen.
            // libtest names each test's thread after the test.
            let name = std::thread::current().name().unwrap_or(what).to_owned();
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {name}: {var} is not set (run scripts/test for real-engine tests)"
            );
            None
        }
    }
}

/// Address of the private engine, if the harness started one.
pub fn engine_addr() -> Option<String> {
    let addr = required(ENGINE_VAR, "real-engine test")?;
    // Tests remove images: never let them near the machine-wide engine.
    assert!(
        !addr.contains("/var/run/docker.sock") && !addr.contains("/run/docker.sock"),
        "{ENGINE_VAR}={addr} is the machine-wide engine; tests need a private one"
    );
    Some(addr)
}

/// A connection to the private engine, or `None` (after a SKIP line) outside CI.
pub async fn engine() -> Option<DockerEngine> {
    let addr = engine_addr()?;
    match DockerEngine::connect(Some(&addr)).await {
        Ok(engine) => Some(engine),
        Err(e) => panic!("{ENGINE_VAR} is set but the engine does not answer: {e}"),
    }
}

/// The private engine's TLS address and its PKI folder, or `None` (after a
/// SKIP line) outside CI.
pub fn tls_engine() -> Option<(String, std::path::PathBuf)> {
    let addr = required(TLS_ENGINE_VAR, "TLS engine test")?;
    let certs = required(TLS_CERTS_VAR, "TLS engine test")?;
    Some((addr, certs.into()))
}

/// Address of the private Podman service, if the harness started one.
pub fn podman_addr() -> Option<String> {
    let addr = required(PODMAN_VAR, "real-Podman test")?;
    // Tests remove images: never let them near a machine-wide Podman.
    assert!(
        !addr.contains("/run/podman/podman.sock") && !addr.contains("/run/user/"),
        "{PODMAN_VAR}={addr} is a machine-wide Podman; tests need a private one"
    );
    Some(addr)
}

/// A connection to the private Podman service, or `None` (after a SKIP
/// line) outside CI.
pub async fn podman() -> Option<DockerEngine> {
    let addr = podman_addr()?;
    match DockerEngine::connect(Some(&addr)).await {
        Ok(engine) => {
            assert_eq!(
                engine.kind(),
                stowage::engine::EngineKind::Podman,
                "{PODMAN_VAR}={addr} is not a Podman service"
            );
            Some(engine)
        }
        Err(e) => panic!("{PODMAN_VAR} is set but the Podman service does not answer: {e}"),
    }
}

/// Runs the podman CLI against the PRIVATE service at `addr` (`--remote`).
pub fn podman_cli(addr: &str, args: &[&str]) -> String {
    let output = Command::new("podman")
        .args(["--remote", "--url", addr])
        .args(args)
        .output()
        .expect("running the podman CLI");
    assert!(
        output.status.success(),
        "podman {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs buildah on the private Podman service's storage.
pub fn buildah(args: &[&str]) -> String {
    let wrapper = std::env::var(BUILDAH_VAR)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{BUILDAH_VAR} is not set: run scripts/test"));
    let output = Command::new(&wrapper)
        .args(args)
        .output()
        .expect("running buildah");
    assert!(
        output.status.success(),
        "buildah {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `127.0.0.1:PORT` of the private registry, or `None` (after a SKIP line) outside CI.
pub fn registry() -> Option<String> {
    required(REGISTRY_VAR, "real-registry test")
}

/// A scratch folder for this run.
pub fn scratch_dir() -> std::path::PathBuf {
    std::env::var_os(DIR_VAR).map_or_else(std::env::temp_dir, Into::into)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A repository namespace no other test (or earlier run) uses, e.g.
/// `stowage-test/list-images-4711-3-1a2b3c`: parallel tests share one engine.
pub fn unique_ns(test_name: &str) -> String {
    let name: String = test_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!(
        "stowage-test/{name}-{}-{}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos() & 0xff_ffff
    )
}

/// A fixture seed no other test uses, so image ids never collide across tests.
pub fn unique_seed() -> u64 {
    nanos()
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(std::process::id()) << 32)
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A fixture image with a unique seed.
pub fn image(tags: &[&str], created: i64, size: usize) -> FixtureImage {
    let mut image = FixtureImage::new(unique_seed(), created, size);
    image.tags = tags.iter().map(|t| (*t).to_owned()).collect();
    image
}

/// Loads `images` with one `Engine::load`; returns what the engine reported.
pub async fn load(engine: &DockerEngine, images: &[FixtureImage]) -> Vec<String> {
    engine
        .load(Bytes::from(fixture::archive(images)))
        .await
        .expect("loading fixture images")
}

/// Runs the docker CLI against the PRIVATE engine at `engine_addr`.
pub fn docker(engine_addr: &str, args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .env("DOCKER_HOST", engine_addr)
        .output()
        .expect("running the docker CLI");
    assert!(
        output.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Creates (does not start) a container from `image`; returns its id.
pub fn create_container(engine_addr: &str, image: &str) -> String {
    docker(engine_addr, &["create", "--network", "none", image])
}

/// Removes a container created by [`create_container`].
pub fn remove_container(engine_addr: &str, id: &str) {
    docker(engine_addr, &["rm", "--force", id]);
}

/// A throwaway dockerd of a test's own, apart from the harness engine: for
/// tests that must own the whole engine (disk pressure on a small data root,
/// stopping the engine under the daemon). Stopped, unmounted and removed on
/// drop. Needs root and `dockerd`, like the harness.
pub struct PrivateEngine {
    pub dir: std::path::PathBuf,
    /// `unix://DIR/docker.sock`.
    pub addr: String,
    /// The data root; a tmpfs of the requested size when one was asked for.
    pub data_root: std::path::PathBuf,
    child: Option<std::process::Child>,
    mounted: bool,
}

impl PrivateEngine {
    /// Start a dockerd; with `data_root_mib`, its data root is a tmpfs of that
    /// size. `None` (after a SKIP line) outside CI when the harness is absent.
    pub fn start(data_root_mib: Option<u64>) -> Option<Self> {
        // The harness variables say the machine can run engines at all.
        engine_addr()?;
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = std::path::PathBuf::from(format!("/tmp/se-{:x}", unique_seed() & 0xff_ffff_ffff));
        let data_root = dir.join("data");
        std::fs::create_dir_all(&data_root).expect("creating the engine folder");
        let mut engine = PrivateEngine {
            addr: format!("unix://{}/docker.sock", dir.display()),
            data_root: data_root.clone(),
            dir: dir.clone(),
            child: None,
            mounted: false,
        };
        if let Some(mib) = data_root_mib {
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&data_root)
                .status()
                .expect("running mount");
            assert!(
                status.success(),
                "mounting a {mib} MiB tmpfs failed (needs root)"
            );
            engine.mounted = true;
        }
        engine.spawn();
        Some(engine)
    }

    /// Start dockerd on the existing folders and wait until it answers.
    pub fn spawn(&mut self) {
        let dir = &self.dir;
        let ns = format!("stowage-{}", dir.file_name().unwrap().to_string_lossy());
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(&self.data_root)
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["-H", &self.addr, "--bridge=none", "--iptables=false"])
            .args(["--containerd-namespace", &ns])
            .args(["--containerd-plugins-namespace", &format!("{ns}-plugins")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        self.child = Some(child);
        for _ in 0..300 {
            let ok = Command::new("docker")
                .arg("version")
                .env("DOCKER_HOST", &self.addr)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
        panic!("the test's own dockerd did not answer within 30 s:\n{log}");
    }

    /// Stop dockerd (SIGTERM, then wait); the folders stay for `spawn`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// (total, available) bytes of the data root's filesystem.
    pub fn disk(&self) -> (u64, u64) {
        let st = rustix::fs::statvfs(&self.data_root).expect("statvfs of the data root");
        (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        self.stop();
        if self.mounted {
            // Lazy: overlay mounts dockerd left below must not keep it busy.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.data_root)
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The stowage binary against `engine` with `policy`, as a user runs it
/// (`DOCKER_HOST` removed so only `--engine` counts).
pub fn stowage_cmd(engine: &str, policy: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
    cmd.arg("--engine")
        .arg(engine)
        .arg("-p")
        .arg(policy)
        .args(args)
        .env_remove("DOCKER_HOST");
    cmd
}

/// Run [`stowage_cmd`] to completion.
pub fn stowage(engine: &str, policy: &std::path::Path, args: &[&str]) -> std::process::Output {
    stowage_cmd(engine, policy, args)
        .output()
        .expect("running stowage")
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A short private folder under the scratch dir (unix socket paths are
/// limited to 108 bytes).
pub fn short_folder(prefix: &str) -> tempfile::TempDir {
    let base = scratch_dir();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap()
}

/// Polls `cond` every 50 ms for up to `secs`; panics with `what` otherwise.
pub fn wait(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out after {secs}s waiting for {what}");
}
