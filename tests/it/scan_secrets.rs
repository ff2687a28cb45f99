//! `builtin:secrets` on fixture images in the real private engine: planted
//! secrets found (one deleted by a later layer, one in a gzip'd layer, one
//! deep in a very long line), none on a clean base of real files and
//! binaries, and the secret itself never in stdout, logs, audit or state.

use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use stowage::engine::Engine;

use crate::engine_env::{self, text};
use crate::transfer_real::Dir;

/// One layer: files (path, bytes), whether it is gzip'd in the archive.
pub(crate) struct Layer {
    pub files: Vec<(String, Vec<u8>)>,
    pub gzip: bool,
}

/// A docker-archive of one image with `layers`, tagged `reference`.
pub(crate) fn archive(reference: &str, layers: &[Layer]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut diff_ids = Vec::new();
    let mut paths = Vec::new();
    for layer in layers {
        let mut t = tar::Builder::new(Vec::new());
        for (path, data) in &layer.files {
            put(&mut t, path, data);
        }
        let tar = t.into_inner().unwrap();
        let hex = hex::encode(Sha256::digest(&tar));
        diff_ids.push(format!("sha256:{hex}"));
        let stored = if layer.gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        } else {
            tar
        };
        let path = format!("{hex}/layer.tar");
        put(&mut out, &path, &stored);
        paths.push(path);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": { "Cmd": ["/bin/true"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": diff_ids.iter().map(|_| json!({"created_by": "scan fixture"})).collect::<Vec<_>>(),
    }))
    .unwrap();
    let config_path = format!("{}.json", hex::encode(Sha256::digest(&config)));
    put(&mut out, &config_path, &config);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_path, "RepoTags": [reference], "Layers": paths,
    }]))
    .unwrap();
    put(&mut out, "manifest.json", &manifest);
    out.into_inner().unwrap()
}

fn put(t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, path, data).unwrap();
}

/// Secrets made at run time, so this file holds none.
pub(crate) struct Planted {
    pub key_block: String,
    pub aws: String,
    pub github: String,
    pub gitlab: String,
    pub npm: String,
}

pub(crate) fn planted() -> Planted {
    let seed = engine_env::unique_seed();
    let tail = |n: usize| -> String {
        let mut s = String::new();
        let mut x = seed;
        while s.len() < n {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let c = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[(x >> 59) as usize];
            s.push(c as char);
        }
        s
    };
    Planted {
        key_block: format!(
            "-----BEGIN RSA {}-----\nMIIE{}\n-----END RSA {}-----\n",
            "PRIVATE KEY",
            tail(60),
            "PRIVATE KEY"
        ),
        aws: format!("{}IA{}", "AK", tail(16)),
        github: format!("{}_{}", "ghp", tail(36)),
        gitlab: format!("{}-{}", "glpat", tail(20)),
        npm: format!("npm_{}", tail(30)),
    }
}

/// A clean base: real text files and binaries of this host.
fn base_files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (inside, host) in [
        ("bin/busybox", "/bin/busybox"),
        ("etc/passwd", "/etc/passwd"),
        ("etc/group", "/etc/group"),
        (
            "etc/ssl/certs/ca-certificates.crt",
            "/etc/ssl/certs/ca-certificates.crt",
        ),
        ("usr/bin/stowage", env!("CARGO_BIN_EXE_stowage")),
    ] {
        if let Ok(data) = std::fs::read(host) {
            files.push((inside.to_owned(), data));
        }
    }
    assert!(
        files.len() >= 3,
        "host files for the clean base are missing"
    );
    files
}

fn scan_policy(dir: &Dir) -> std::path::PathBuf {
    dir.policy("[[scan]]\nname = \"secrets\"\ncommand = [\"builtin:secrets\"]\n")
}

fn assert_nowhere(secret: &str, out: &std::process::Output, state: &Path) {
    let shown = text(out);
    assert!(!shown.contains(secret), "secret in output:\n{shown}");
    for entry in walk(state) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret in {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_secrets_finds_each_planted_secret_and_never_shows_it() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("scan-secrets");
    let reference = format!("{ns}/leaky:1");
    let p = planted();
    let mut long = vec![b'x'; 300_000];
    long.extend_from_slice(format!(" aws_key={} ", p.aws).as_bytes());
    long.extend_from_slice(&[b'y'; 200_000]);
    let layers = vec![
        Layer {
            files: {
                let mut f = base_files();
                f.push(("root/.ssh/id_rsa".into(), p.key_block.clone().into_bytes()));
                f
            },
            gzip: false,
        },
        // The key is deleted again: still in the image.
        Layer {
            files: vec![
                ("root/.ssh/.wh.id_rsa".into(), Vec::new()),
                (
                    "srv/app/.npmrc".into(),
                    format!("//r.example/:_authToken={}\n", p.npm).into_bytes(),
                ),
                ("srv/app/long.txt".into(), long),
            ],
            gzip: false,
        },
        Layer {
            files: vec![(
                "srv/app/config.yml".into(),
                format!("a: 1\ngithub: {}\ngitlab: {}\n", p.github, p.gitlab).into_bytes(),
            )],
            gzip: true,
        },
    ];
    let tarball = archive(&reference, &layers);

    // The archive as built (one layer gzip'd) read directly by the scanner.
    let dir = Dir::new();
    let file = dir.path().join("fixture.tar");
    std::fs::write(&file, &tarball).unwrap();
    let report = stowage::scan::secrets::scan_archive(&file, &Default::default()).unwrap();
    let rules: Vec<&str> = report.findings.iter().map(|f| f.rule.as_str()).collect();
    for want in [
        "private-key",
        "aws-access-key-id",
        "npmrc-auth",
        "github-pat",
        "gitlab-pat",
    ] {
        assert!(
            rules.contains(&want),
            "{want} not found: {:#?}",
            report.findings
        );
    }
    let gh = report
        .findings
        .iter()
        .find(|f| f.rule == "github-pat")
        .unwrap();
    assert_eq!((gh.file.as_str(), gh.line), ("srv/app/config.yml", 2));
    assert_eq!(gh.masked, "ghp_…");
    let aws = report
        .findings
        .iter()
        .find(|f| f.rule == "aws-access-key-id")
        .unwrap();
    assert_eq!((aws.file.as_str(), aws.line), ("srv/app/long.txt", 1));
    assert_eq!(report.total, 5, "{:#?}", report.findings);
    std::fs::remove_file(&file).unwrap();

    // Through the engine: loaded, exported by `stowage scan`.
    engine.load(Bytes::from(tarball)).await.unwrap();
    let policy = scan_policy(&dir);
    let out = engine_env::stowage(&addr, &policy, &["scan", &reference]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL \"secrets\""), "{stdout}");
    assert!(stdout.contains("5 secrets found"), "{stdout}");
    assert!(stdout.contains("root/.ssh/id_rsa:1"), "{stdout}");
    let state = dir.path().join("state");
    for secret in [&p.aws, &p.github, &p.gitlab, &p.npm] {
        assert_nowhere(secret, &out, &state);
    }
    assert_nowhere(p.key_block.lines().nth(1).unwrap(), &out, &state);
    // The export is gone.
    let left: Vec<_> = walk(&state.join("scan"));
    assert!(left.is_empty(), "exports left: {left:?}");
    let audit = dir.audit();
    let scans: Vec<_> = audit
        .iter()
        .filter(|r| r.action == stowage::audit::Action::Scan)
        .collect();
    assert_eq!(scans.len(), 1, "{audit:#?}");
    assert_eq!(scans[0].outcome, stowage::audit::Outcome::Failed);
    engine.remove(&reference).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_secrets_passes_a_clean_base_of_real_files_and_binaries() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("scan-clean");
    let reference = format!("{ns}/clean:1");
    let layers = vec![Layer {
        files: base_files(),
        gzip: false,
    }];
    engine
        .load(Bytes::from(archive(&reference, &layers)))
        .await
        .unwrap();
    let dir = Dir::new();
    let policy = scan_policy(&dir);
    let out = engine_env::stowage(&addr, &policy, &["scan", &reference]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pass \"secrets\""),
        "{}",
        text(&out)
    );
    engine.remove(&reference).await.unwrap();
}
