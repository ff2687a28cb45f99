//! Registry policies (`-p oci://…`, issue 16) against the real private
//! registry: `stowage policy push` and `check`, updates, refusals (invalid,
//! another state dir, unsigned, wrong key, tampered, rollback), a digest
//! pin, a proxy that strips `Docker-Content-Digest`, a start with the
//! registry down. The daemon's polling is in `fleet_daemon`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use stowage::fleet::{self, PolicyRef, PrivateKey, PublicKey};
use stowage::registry::{Options, Registry};

use crate::engine_env::{self, text};
use crate::net::{Fault, HttpProxy};

// Made with `openssl genpkey -algorithm ed25519` (A, B) and
// `-algorithm EC -pkeyopt ec_paramgen_curve:P-256` (C); `openssl pkey -pubout`.
pub const KEY_A: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIMJN0+UBwX0h7wdAlrGTJyeLMtRcBe4csJIw50yFSPAy\n-----END PRIVATE KEY-----\n";
pub const PUB_A: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGBKFrxhbbFLzyrthxeSkHOF06ZiKgLiHdigRxkUv/HM=\n-----END PUBLIC KEY-----\n";
const KEY_B: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEbZKyLoAf41yMTOgj7dhs56vwssbqWeiGv29lJ1vcOA\n-----END PRIVATE KEY-----\n";
const KEY_C: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgDgjOC8nxF56dkGC2
u0GbWVWwlwl+FyCHXEOqeh0fQ6uhRANCAASg//mdfZs9Zs3HvP1pypVS16oGifcZ
EgPJ/mpgPz0PXPCnoVR1RhNNSHpIP+tMd0gwqlDtZKfUiseI//My63vF
-----END PRIVATE KEY-----
";
const PUB_C: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEoP/5nX2bPWbNx7z9acqVUteqBon3
GRIDyf5qYD89D1zwp6FUdUYTTUh6SD/rTHdIMKpQ7WSn1IrHiP/zMut7xQ==
-----END PUBLIC KEY-----
";

/// A policy keeping `keep` of `app`, for this host's `state_dir`.
pub fn policy_text(keep: u32, extra: &str) -> String {
    format!(
        "version = 1\n[daemon]\npolicy_poll = \"1s\"\n{extra}\n[[retain]]\nname = \"app\"\nimages = [\"app\"]\nkeep_last = {keep}\n"
    )
}

pub fn client(addr: &str) -> Registry {
    Registry::new(addr, None, &Options::default()).unwrap()
}

/// A fresh reference on the private registry, `None` outside CI without one.
pub fn reference(name: &str) -> Option<PolicyRef> {
    let addr = engine_env::registry()?;
    let ns = engine_env::unique_ns(name);
    Some(PolicyRef::parse(&format!("oci://{addr}/{ns}/policy:stable")).unwrap())
}

/// Publishes `text` as it is (no validation: a bad publisher), created `at`.
pub async fn publish(r: &PolicyRef, text: &str, at: DateTime<Utc>, key: Option<&str>) -> String {
    let key = key.map(|k| PrivateKey::parse(k).unwrap());
    let registry = client(&r.host);
    fleet::publish(&registry, r, Bytes::from(text.to_owned()), at, key.as_ref())
        .await
        .unwrap()
}

fn stowage(args: &[&str], state_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("STOWAGE_POLICY")
        .env_remove("STOWAGE_POLICY_KEY")
        .output()
        .expect("running stowage")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_policy_is_read_updated_and_a_pin_never_changes() {
    let Some(r) = reference("oci_push") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let oci = r.to_string();
    let v1 = write(dir.path(), "v1.toml", &policy_text(3, ""));
    let pushed = stowage(&["policy", "push", v1.to_str().unwrap(), &oci], &state);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let d1 = stdout(&pushed);
    assert!(
        d1.starts_with("sha256:") && d1.len() == 71,
        "{}",
        text(&pushed)
    );

    // The artifact as the spec has it: artifactType, one policy layer, created.
    let (_, manifest) = client(&r.host)
        .manifest_bytes(&r.repository, &d1)
        .await
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.stowage.policy.v1");
    assert_eq!(m["layers"][0]["mediaType"], fleet::POLICY_MEDIA_TYPE);
    assert!(m["annotations"]["org.opencontainers.image.created"].is_string());

    let checked = stowage(&["check", "-p", &oci], &state);
    assert!(checked.status.success(), "{}", text(&checked));
    assert!(stdout(&checked).contains(&d1), "{}", text(&checked));
    assert!(stdout(&checked).contains("1 retain"), "{}", text(&checked));

    let v2 = write(dir.path(), "v2.toml", &policy_text(5, "dry_run = true"));
    let pushed = stowage(&["policy", "push", v2.to_str().unwrap(), &oci], &state);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let d2 = stdout(&pushed);
    assert_ne!(d1, d2);
    let checked = stowage(&["check", "-p", &oci], &state);
    assert!(stdout(&checked).contains(&d2), "{}", text(&checked));
    assert!(stdout(&checked).contains("dry_run"), "{}", text(&checked));

    // Pinned to the first digest: still the first policy.
    let pinned = r.at_digest(&d1);
    let checked = stowage(&["check", "-p", &pinned], &state);
    assert!(checked.status.success(), "{}", text(&checked));
    assert!(stdout(&checked).contains(&d1), "{}", text(&checked));
    assert!(!stdout(&checked).contains("dry_run"), "{}", text(&checked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_refused_with_their_positions() {
    let Some(r) = reference("oci_invalid") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let oci = r.to_string();
    // `policy push` validates first: nothing is published.
    let bad = write(
        dir.path(),
        "bad.toml",
        "version = 1\n[daemon]\nmin_age = \"soon\"\n",
    );
    let pushed = stowage(&["policy", "push", bad.to_str().unwrap(), &oci], &state);
    assert_eq!(pushed.status.code(), Some(2), "{}", text(&pushed));
    assert!(
        text(&pushed).contains("bad.toml:3:11: error: daemon.min_age"),
        "{}",
        text(&pushed)
    );
    let head = client(&r.host)
        .manifest_digest(&r.repository, &r.reference)
        .await;
    assert!(head.is_err(), "nothing was published: {head:?}");

    // Published anyway by another tool: refused by every reader, with the
    // reference and position.
    publish(
        &r,
        "version = 1\n[daemon]\nmin_age = \"soon\"\n",
        Utc::now(),
        None,
    )
    .await;
    let checked = stowage(&["check", "-p", &oci], &state);
    assert_eq!(checked.status.code(), Some(2), "{}", text(&checked));
    assert!(
        text(&checked).contains(&format!("{oci}:3:11: error: daemon.min_age")),
        "{}",
        text(&checked)
    );

    // A policy naming another state dir than this host's is refused.
    publish(
        &r,
        &policy_text(1, "state_dir = \"/elsewhere\""),
        Utc::now(),
        None,
    )
    .await;
    let checked = stowage(&["check", "-p", &oci], &state);
    assert_eq!(checked.status.code(), Some(2), "{}", text(&checked));
    assert!(
        text(&checked).contains("this host's state dir is"),
        "{}",
        text(&checked)
    );
    // Naming the same one is fine.
    let same = format!("state_dir = \"{}\"", state.display());
    publish(&r, &policy_text(1, &same), Utc::now(), None).await;
    let checked = stowage(&["check", "-p", &oci], &state);
    assert!(checked.status.success(), "{}", text(&checked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_policies_signed_with_the_key_are_accepted() {
    let Some(r) = reference("oci_signed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let oci = r.to_string();
    let pub_a = write(dir.path(), "a.pub", PUB_A);
    let pub_c = write(dir.path(), "c.pub", PUB_C);
    let key_c = write(dir.path(), "c.pem", KEY_C);
    let check_with = |key: &Path| {
        stowage(
            &["check", "-p", &oci, "--policy-key", key.to_str().unwrap()],
            &state,
        )
    };

    // Unsigned.
    publish(&r, &policy_text(1, ""), Utc::now(), None).await;
    let o = check_with(&pub_a);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("signature refused: unsigned"),
        "{}",
        text(&o)
    );

    // Signed with A (ed25519): accepted with A's key, refused with C's.
    let d_a = publish(&r, &policy_text(2, ""), Utc::now(), Some(KEY_A)).await;
    let o = check_with(&pub_a);
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains(&d_a));
    let o = check_with(&pub_c);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not with the key given by --policy-key"),
        "{}",
        text(&o)
    );

    // Signed with B: not A's.
    publish(&r, &policy_text(3, ""), Utc::now(), Some(KEY_B)).await;
    let o = check_with(&pub_a);
    assert!(text(&o).contains("not with the key"), "{}", text(&o));

    // `policy push --sign` with C (P-256): accepted with C's key.
    let file = write(dir.path(), "p.toml", &policy_text(4, ""));
    let pushed = stowage(
        &[
            "policy",
            "push",
            file.to_str().unwrap(),
            &oci,
            "--sign",
            key_c.to_str().unwrap(),
        ],
        &state,
    );
    assert!(pushed.status.success(), "{}", text(&pushed));
    let d_c = stdout(&pushed);
    let o = check_with(&pub_c);
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains(&d_c), "{}", text(&o));

    // Tampered: another policy under the tag, the old signature copied to
    // its fallback tag.
    let registry = client(&r.host);
    let (_, sig) = registry
        .manifest_bytes(&r.repository, &fleet::signature::fallback_tag(&d_c))
        .await
        .unwrap();
    let d_t = publish(&r, &policy_text(9, ""), Utc::now(), None).await;
    registry
        .put_manifest(
            &r.repository,
            &fleet::signature::fallback_tag(&d_t),
            "application/vnd.oci.image.manifest.v1+json",
            sig,
        )
        .await
        .unwrap();
    let o = check_with(&pub_c);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("tampered: the signature found vouches for {d_c}")),
        "{}",
        text(&o)
    );
    assert!(PublicKey::parse(PUB_A).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_without_the_digest_header_costs_one_get() {
    let Some(r) = reference("oci_nodigest") else {
        return;
    };
    let digest = publish(&r, &policy_text(1, ""), Utc::now(), None).await;
    let proxy = HttpProxy::start(&r.host, |_, _| {
        Fault::StripAnswerHeader("docker-content-digest")
    })
    .await;
    let behind = client(&proxy.addr);
    assert_eq!(
        behind
            .manifest_digest(&r.repository, &r.reference)
            .await
            .unwrap(),
        digest
    );
    let methods: Vec<String> = proxy
        .seen("/manifests/")
        .into_iter()
        .map(|s| s.method)
        .collect();
    assert_eq!(methods, ["HEAD", "GET"], "HEAD, then the manifest hashed");
    // Straight to the registry: the HEAD alone.
    assert_eq!(
        client(&r.host)
            .manifest_digest(&r.repository, &r.reference)
            .await
            .unwrap(),
        digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_policy_is_refused_unless_pinned() {
    let Some(r) = reference("oci_rollback") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let now = Utc::now();
    let new = publish(&r, &policy_text(2, ""), now, None).await;
    // The daemon's start keeps it as the last good one.
    let opened = fleet::poll::open(&r, &state, None, true, true, now)
        .await
        .unwrap();
    assert_eq!(opened.current.digest, new);
    // A replayed older artifact under the tag.
    let old = publish(
        &r,
        &policy_text(1, ""),
        now - chrono::Duration::days(1),
        None,
    )
    .await;
    let e = fleet::poll::open(&r, &state, None, false, false, now)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("older than the policy in force"), "{e}");
    // With the fallback, the last good one stays, and the status says why.
    let kept = fleet::poll::open(&r, &state, None, true, false, now)
        .await
        .unwrap();
    assert_eq!(kept.current.digest, new);
    assert!(kept.status.refused.is_some(), "{:?}", kept.status);
    // Pinned by digest: the operator's choice.
    let pinned = PolicyRef::parse(&r.at_digest(&old)).unwrap();
    let o = fleet::poll::open(&pinned, &dir.path().join("pinned"), None, false, false, now).await;
    assert_eq!(o.unwrap().current.digest, old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_registry_down_at_start_the_last_good_policy_is_used() {
    if engine_env::registry().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut registry = crate::net::TestRegistry::start(&dir.path().join("registry"), None);
    let r = PolicyRef::parse(&format!("oci://{}/fleet/policy:stable", registry.addr)).unwrap();
    let state = dir.path().join("state");
    let digest = publish(&r, &policy_text(2, ""), Utc::now(), None).await;
    fleet::poll::open(&r, &state, None, true, true, Utc::now())
        .await
        .unwrap();
    registry.stop();

    let opened = fleet::poll::open(&r, &state, None, true, true, Utc::now())
        .await
        .unwrap();
    assert_eq!(opened.current.digest, digest);
    assert!(opened.status.from_last_good);
    assert!(
        opened.status.unreachable_since.is_some(),
        "{:?}",
        opened.status
    );
    // Without a fallback (`check`) it is an error, not the old policy.
    let o = stowage(&["check", "-p", &r.to_string()], &state);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // A command that reads the policy runs on the last good one and says so.
    let o = stowage(&["history", "-p", &r.to_string()], &state);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("running on the last good policy"),
        "{}",
        text(&o)
    );
    // Another host's state dir has no last good policy: nothing to run on.
    let o = stowage(
        &["history", "-p", &r.to_string()],
        &dir.path().join("fresh"),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `stowage run -p oci://…` as a user runs it; its log in `dir/run.log`.
fn run_daemon(engine: &str, r: &PolicyRef, state: &Path, dir: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("run.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args([
            "run",
            "--engine",
            engine,
            "-p",
            &r.to_string(),
            "--state-dir",
        ])
        .arg(state)
        .env_remove("DOCKER_HOST")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("STOWAGE_POLICY_KEY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting stowage run")
}

fn stop(daemon: &mut std::process::Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(daemon.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    daemon.wait().unwrap();
}

/// `stowage status --json` of the daemon at `state`'s control socket,
/// until `cond` holds (30 s).
fn daemon_status_until(
    state: &Path,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let o = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["status", "--json", "--control-socket"])
            .arg(state.join("control.sock"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if o.status.success() && !v["daemon"].is_null() && cond(&v["daemon"]["policy_remote"]) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {}", text(&o));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_on_the_last_good_policy_while_the_registry_is_down() {
    let Some(engine) = engine_env::engine_addr() else {
        return;
    };
    let folder = engine_env::short_folder("fr");
    let dir = folder.path();
    let mut registry = crate::net::TestRegistry::start(&dir.join("registry"), None);
    let r = PolicyRef::parse(&format!("oci://{}/fleet/policy:prod", registry.addr)).unwrap();
    let state = dir.join("state");
    // Relative to each host's state dir.
    let extra =
        "dry_run = true\ncontrol_socket = \"control.sock\"\nschedule = \"0 0 0 1 1 * 2099\"";
    let t0 = Utc::now();
    let d1 = publish(&r, &policy_text(1, extra), t0, None).await;
    let mut daemon = run_daemon(&engine, &r, &state, dir);
    daemon_status_until(&state, "on v1", |p| p["digest"] == d1.as_str());
    stop(&mut daemon);

    // Down at start: it runs on the last good policy and says since when.
    registry.stop();
    let mut daemon = run_daemon(&engine, &r, &state, dir);
    let v = daemon_status_until(&state, "on the last good one", |p| {
        p["digest"] == d1.as_str()
            && p["from_last_good"] == true
            && p["unreachable_since"].is_string()
    });
    let human = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["status", "--control-socket"])
        .arg(state.join("control.sock"))
        .output()
        .unwrap();
    assert!(
        text(&human).contains("running on the last good policy"),
        "{}",
        text(&human)
    );
    assert!(
        text(&human).contains("registry UNREACHABLE since"),
        "{}",
        text(&human)
    );
    assert!(
        v["daemon"]["policy_summary"]
            .as_str()
            .unwrap()
            .contains("dry_run")
    );

    // Back, with a new policy: in force within the (capped) backoff.
    registry.restart();
    let d2 = publish(
        &r,
        &policy_text(2, extra),
        t0 + chrono::Duration::seconds(1),
        None,
    )
    .await;
    daemon_status_until(&state, "on v2", |p| {
        p["digest"] == d2.as_str() && p["unreachable_since"].is_null()
    });
    assert!(
        matches!(daemon.try_wait(), Ok(None)),
        "the daemon kept running"
    );
    stop(&mut daemon);
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
    assert!(log.contains("running on the last good policy"), "{log}");
    assert!(log.contains(&format!("new policy {d2} accepted")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_in_oras_shape_is_read_the_same() {
    let Some(r) = reference("oci_oras") else {
        return;
    };
    let registry = client(&r.host);
    let policy = policy_text(4, "");
    let config = registry
        .push_blob(
            &r.repository,
            "application/vnd.oci.empty.v1+json",
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    let layer = registry
        .push_blob(
            &r.repository,
            fleet::POLICY_MEDIA_TYPE,
            Bytes::from(policy.clone()),
        )
        .await
        .unwrap();
    // What `oras push REF policy.toml:application/vnd.stowage.policy.v1+toml` (1.2) writes.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.unknown.artifact.v1",
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": 2, "data": "e30="},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
                    "annotations": {"org.opencontainers.image.title": "policy.toml"}}],
        "annotations": {"org.opencontainers.image.created": "2025-06-01T10:00:00Z"},
    });
    let pushed = registry
        .put_manifest(
            &r.repository,
            &r.reference,
            "application/vnd.oci.image.manifest.v1+json",
            Bytes::from(manifest.to_string()),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = stowage(&["check", "-p", &r.to_string()], &dir.path().join("state"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains(&pushed.digest), "{}", text(&o));
    let fetched = fleet::fetch_current(&registry, &r, None).await.unwrap();
    assert_eq!(fetched.text, policy.as_bytes());
    assert_eq!(
        fetched.created.unwrap().to_rfc3339(),
        "2025-06-01T10:00:00+00:00"
    );
}
