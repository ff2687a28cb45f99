//! Hostile inputs and surroundings (issue 12, items 1, 12, 13 and 15): no
//! `HOME` under systemd, a FIFO or `/dev/zero` as the policy, a closed
//! stdout, megabyte values in a policy.

use crate::engine_env;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::net::TestRegistry;

fn stowage() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
    cmd.env_remove("DOCKER_HOST").env_remove("STOWAGE_POLICY");
    cmd
}

/// Runs `cmd`, killing it after `limit`: a hang is a failure, not a stuck suite.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting stowage");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("stowage did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_fifo_a_device_or_a_folder_as_policy_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for (policy, kind) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
        (dir.path(), "a directory"),
    ] {
        for args in [&["check"][..], &["plan"], &["history"]] {
            let mut cmd = stowage();
            cmd.arg("-p").arg(policy).args(args);
            let out = run_bounded(cmd, Duration::from_secs(20));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {policy:?}: {stderr}");
            assert!(
                stderr.contains(&format!("it is {kind}, not a regular file")),
                "{args:?} {policy:?}: {stderr}"
            );
        }
    }
}

#[test]
fn an_oversized_policy_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "version = 1\n").unwrap();
    std::fs::File::options()
        .append(true)
        .open(&path)
        .unwrap()
        .set_len(64 * 1024 * 1024)
        .unwrap();
    let mut cmd = stowage();
    cmd.arg("-p").arg(&path).arg("check");
    let out = run_bounded(cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("larger than 4 MiB"), "{stderr}");
}

#[test]
fn a_megabyte_value_is_not_echoed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let tag = "t".repeat(3_000_000);
    std::fs::write(
        &path,
        format!(
            "version = 1\n[[float]]\nname = \"f\"\nimages = [\"app\"]\ntag = \"{tag}\"\nfollow = \"^v\"\n"
        ),
    )
    .unwrap();
    let mut cmd = stowage();
    cmd.arg("-p").arg(&path).arg("check");
    let out = run_bounded(cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        &stderr[..stderr.len().min(2000)]
    );
    assert!(stderr.len() < 2000, "{} bytes of errors", stderr.len());
    assert!(stderr.contains("float[1].tag"), "{stderr}");
    assert!(stderr.contains("characters left out"), "{stderr}");
}

/// stdout is a pipe whose reader is gone, as in `stowage check | true`.
fn with_closed_stdout(mut cmd: Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(cmd);
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_output_with_exit_0_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\n",
            state.display()
        ),
    )
    .unwrap();
    // Enough history that output goes on well past the first failed write.
    let mut log = String::new();
    for i in 0..20_000 {
        log.push_str(&format!(
            r#"{{"ts":"2026-11-01T00:00:00Z","run":"r-{i}","action":"remove","ref":"app:{i}","reason":"keep_last","outcome":"ok"}}"#
        ));
        log.push('\n');
    }
    std::fs::write(state.join("audit.jsonl"), log).unwrap();
    for args in [&["check"][..], &["history"], &["history", "--json"]] {
        let mut cmd = stowage();
        cmd.arg("-p").arg(&policy).args(args);
        let out = with_closed_stdout(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// `--mount` namespaces need root; CI runs as root.
fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// Under systemd without `User=` there is no `HOME`: the credentials of the
/// user's passwd home must still be found. The passwd file is swapped in a
/// private mount namespace, so the test never reads or writes the real
/// `~/.docker`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_found_without_home_as_under_systemd() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root (a private mount namespace)"
        );
        eprintln!("SKIP credentials_are_found_without_home_as_under_systemd: needs root");
        return;
    }
    let addr = engine_env::engine_addr().unwrap();
    let dir = tempfile::tempdir_in(engine_env::scratch_dir()).unwrap();
    let secret = format!("s3cret-{:x}", engine_env::unique_seed());
    let hash = Command::new("htpasswd")
        .args(["-Bbn", "stowage", &secret])
        .output()
        .expect("htpasswd (apt-get install apache2-utils)");
    assert!(hash.status.success());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &hash.stdout).unwrap();
    let registry = TestRegistry::start(&dir.path().join("registry"), Some(&htpasswd));

    let ns = engine_env::unique_ns("nohome");
    let pulled = format!("{}/{ns}/app:1", registry.addr);
    let image = engine_env::image(&[&pulled], 1_700_000_000, 4096);
    engine_env::load(&engine, std::slice::from_ref(&image)).await;
    let creds = stowage::engine::Credentials {
        username: Some("stowage".into()),
        password: Some(secret.clone()),
        identity_token: None,
        server: registry.addr.clone(),
    };
    use stowage::engine::Engine as _;
    engine
        .push(&pulled, Some(&creds), &mut |_| {})
        .await
        .unwrap();
    engine.remove(&pulled).await.unwrap();

    // The home that `docker login` wrote to, and a passwd naming it.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    let config = home.join(".docker/config.json");
    {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("stowage:{secret}"));
        std::fs::write(
            &config,
            format!(
                r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
                registry.addr
            ),
        )
        .unwrap();
    }
    let passwd = dir.path().join("passwd");
    std::fs::write(
        &passwd,
        format!("root:x:0:0:root:{}:/bin/sh\n", home.display()),
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\nretry_max = \"1s\"\n\
             [[prepull]]\nimage = \"{pulled}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();

    let script = format!(
        "mount --bind '{}' /etc/passwd && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin '{}' --engine '{addr}' -p '{}' apply",
        passwd.display(),
        env!("CARGO_BIN_EXE_stowage"),
        policy.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = run_bounded(cmd, Duration::from_secs(120));
    let text = engine_env::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "registry credentials: {} (1 registry)",
            config.display()
        )),
        "{text}"
    );
    assert!(!text.contains(&secret), "the secret leaked: {text}");
    let present = engine
        .list_images()
        .await
        .unwrap()
        .iter()
        .any(|i| i.repo_tags.contains(&pulled));
    assert!(present, "{pulled} was not pulled: {text}");
    engine.remove(&pulled).await.unwrap();
}
