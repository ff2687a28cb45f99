//! `stowage bundle import` against the real private engine and registry:
//! images published from the harness engine (the source host), a bundle
//! of them made with skopeo (an OCI layout as the registry served it, named
//! by the `io.containerd.image.name` annotation), imported into an engine of
//! the test's own (a wiped host) by the real binary.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stowage::audit::{Action, Outcome};
use stowage::engine::{DockerEngine, Engine};
use stowage::fixture::FixtureImage;

use crate::engine_env::{self, PrivateEngine, text};
use crate::transfer_real::{Dir, records, stowage};

const CREATED: i64 = 1_700_000_000;

/// Images published to the harness registry, still tagged on the harness
/// engine (the host the bundle comes from).
pub(crate) struct Published {
    pub registry: String,
    pub images: Vec<FixtureImage>,
}

impl Published {
    /// `n` images of `own` bytes each over one base of `base` bytes, tagged
    /// `<registry>/<ns>/app<i>:1`. `None` (after a SKIP line) without a harness.
    pub(crate) async fn new(test: &str, n: usize, base: usize, own: usize) -> Option<Published> {
        let engine = engine_env::engine().await?;
        let registry = engine_env::registry()?;
        let ns = engine_env::unique_ns(test);
        let seed = engine_env::unique_seed();
        let images: Vec<FixtureImage> = (0..n)
            .map(|i| {
                engine_env::image(&[&format!("{registry}/{ns}/app{i}:1")], CREATED, own)
                    .with_base(seed, base)
            })
            .collect();
        engine_env::load(&engine, &images).await;
        for img in &images {
            engine
                .push(&img.tags[0], None, &mut |_| {})
                .await
                .unwrap_or_else(|e| panic!("pushing {}: {e}", img.tags[0]));
        }
        Some(Published { registry, images })
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.images.iter().map(|i| i.tags[0].clone()).collect()
    }
}

/// `stowage bundle create -o out [--since inventory] names…` from the
/// registry (its own state folder beside `out`).
pub(crate) async fn create_bundle(out: &Path, names: &[String], since: Option<&Path>) -> PathBuf {
    let dir = out.with_extension("create");
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[daemon]\nstate_dir = \"{}\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let mut args = vec!["bundle", "create", "-o", out.to_str().unwrap()];
    if let Some(inv) = since {
        args.extend(["--since", inv.to_str().unwrap()]);
    }
    args.extend(names.iter().map(String::as_str));
    let engine = engine_env::engine_addr().unwrap();
    let made = stowage(&engine, &policy, &args).await;
    assert_eq!(
        made.status.code(),
        Some(0),
        "bundle create: {}",
        text(&made)
    );
    out.to_path_buf()
}

/// A bundle of `names` (each `registry/repo:tag`, as the registry serves
/// it) at `out`, made with skopeo: blobs once, `index.json` entries named
/// `as_names` (the same names unless given).
pub(crate) fn make_bundle(out: &Path, names: &[String], as_names: Option<&[String]>) -> PathBuf {
    let layout = out.with_extension("layout");
    let _ = std::fs::remove_dir_all(&layout);
    for (i, name) in names.iter().enumerate() {
        let st = std::process::Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--preserve-digests",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{name}"))
            .arg(format!("oci:{}:ref{i}", layout.display()))
            .output()
            .expect("running skopeo");
        assert!(
            st.status.success(),
            "skopeo copy {name}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let index_path = layout.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    for entry in index["manifests"].as_array_mut().unwrap() {
        let r = entry["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap()
            .to_owned();
        let i: usize = r.trim_start_matches("ref").parse().unwrap();
        let name = as_names.map_or(&names[i], |n| &n[i]).clone();
        let tag = name.rsplit_once(':').unwrap().1.to_owned();
        entry["annotations"] = json!({
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": tag,
        });
    }
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    tar_layout(&layout, out);
    std::fs::remove_dir_all(&layout).unwrap();
    out.to_path_buf()
}

/// `layout` as one tar at `out`: `oci-layout`, `index.json`, the blobs.
pub(crate) fn tar_layout(layout: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.mode(tar::HeaderMode::Deterministic);
    b.append_path_with_name(layout.join("oci-layout"), "oci-layout")
        .unwrap();
    b.append_path_with_name(layout.join("index.json"), "index.json")
        .unwrap();
    let mut blobs: Vec<PathBuf> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    blobs.sort();
    for p in blobs {
        let name = format!("blobs/sha256/{}", p.file_name().unwrap().to_string_lossy());
        b.append_path_with_name(&p, name).unwrap();
    }
    b.finish().unwrap();
}

/// Image id -> sorted tags, of the images holding any of `ids`.
pub(crate) async fn tags_of(
    engine: &DockerEngine,
    ids: &[String],
) -> BTreeMap<String, Vec<String>> {
    engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| ids.contains(&i.id))
        .map(|i| {
            let mut t = i.repo_tags.clone();
            t.sort();
            (i.id, t)
        })
        .collect()
}

/// Every image and every reference of an engine (`id tag…`), sorted.
pub(crate) async fn everything(engine: &DockerEngine) -> Vec<String> {
    let mut all: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| {
            let mut refs = i.repo_tags.clone();
            refs.sort();
            format!("{} {}", i.id, refs.join(" "))
        })
        .collect();
    all.sort();
    all
}

pub(crate) async fn connect(addr: &str) -> DockerEngine {
    DockerEngine::connect(Some(addr)).await.unwrap()
}

/// A policy with the state (and content store) in `dir`.
fn policy(dir: &Dir) -> PathBuf {
    dir.policy("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_on_a_wiped_engine_gives_the_same_ids_and_references_and_a_rerun_skips() {
    let Some(p) = Published::new("bundle-wiped", 3, 512 << 10, 64 << 10).await else {
        return;
    };
    let Some(target) = PrivateEngine::start(None) else {
        return;
    };
    let dir = Dir::new();
    let file = create_bundle(&dir.path().join("b.tar"), &p.names(), None).await;
    let ids: Vec<String> = p.images.iter().map(FixtureImage::id).collect();
    let source = tags_of(&engine_env::engine().await.unwrap(), &ids).await;
    let engine = connect(&target.addr).await;
    assert!(tags_of(&engine, &ids).await.is_empty());

    let policy = policy(&dir);
    let out = stowage(
        &target.addr,
        &policy,
        &["bundle", "import", file.to_str().unwrap()],
    )
    .await;
    println!("{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("3 brought in, 0 tagged, 0 already present"),
        "{}",
        text(&out)
    );
    assert_eq!(
        tags_of(&engine, &ids).await,
        source,
        "same ids and tags as the source host"
    );
    let imports = records(dir.audit(), Action::Import, Outcome::Ok);
    assert_eq!(imports.len(), 1, "{imports:?}");
    assert_eq!(imports[0].rule.as_deref(), Some("cli"));
    // The containers' layers are usable: the engine can create one.
    let c = engine_env::create_container(&target.addr, &p.names()[0]);
    engine_env::remove_container(&target.addr, &c);

    let again = stowage(
        &target.addr,
        &policy,
        &["bundle", "import", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        text(&again).contains("0 brought in, 0 tagged, 3 already present"),
        "{}",
        text(&again)
    );
    assert_eq!(tags_of(&engine, &ids).await, source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_bundle_is_refused_naming_the_blob_and_the_engine_is_unchanged() {
    let Some(p) = Published::new("bundle-damaged", 2, 256 << 10, 64 << 10).await else {
        return;
    };
    let Some(target) = PrivateEngine::start(None) else {
        return;
    };
    let engine = connect(&target.addr).await;
    // The host holds something already: an older image under the same name.
    let old = engine_env::image(&[&p.names()[0]], CREATED, 1024);
    engine_env::load(&engine, std::slice::from_ref(&old)).await;
    let dir = Dir::new();
    let good = make_bundle(&dir.path().join("good.tar"), &p.names(), None);
    let policy = policy(&dir);
    let before = everything(&engine).await;

    // One flipped byte in a layer.
    let layer = {
        let a = stowage::bundle::Archive::open(&good).unwrap();
        let v = stowage::bundle::verify(&a, None).unwrap();
        let l = v.images[0].layers[0].clone();
        (l.digest.clone(), a.blob_member(&l.digest).unwrap())
    };
    let mut bytes = std::fs::read(&good).unwrap();
    let flipped = dir.path().join("flipped.tar");
    let at = (layer.1.offset + layer.1.size / 2) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();
    // Cut short in the middle of that layer.
    let truncated = dir.path().join("truncated.tar");
    std::fs::write(&truncated, &std::fs::read(&good).unwrap()[..at]).unwrap();

    for (file, says) in [
        (
            &flipped,
            vec!["damaged".to_owned(), layer.0.clone(), p.names()[0].clone()],
        ),
        (&truncated, vec![layer.0.clone()]),
    ] {
        let out = stowage(
            &target.addr,
            &policy,
            &["bundle", "import", file.to_str().unwrap()],
        )
        .await;
        println!("{}", text(&out));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let said = text(&out);
        assert!(said.contains("import refused, host unchanged"), "{said}");
        for s in says {
            assert!(said.contains(&s), "{s} in {said}");
        }
        assert_eq!(everything(&engine).await, before, "the engine changed");
    }
    // Not the expected bundle.
    let out = stowage(
        &target.addr,
        &policy,
        &[
            "bundle",
            "import",
            good.to_str().unwrap(),
            "--expect",
            &format!("sha256:{}", "0".repeat(64)),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not the expected one"),
        "{}",
        text(&out)
    );
    assert_eq!(everything(&engine).await, before);
    let failed = records(dir.audit(), Action::Import, Outcome::Failed);
    assert_eq!(failed.len(), 3, "{failed:?}");
    // Not a file at all: could not run.
    let out = stowage(
        &target.addr,
        &policy,
        &["bundle", "import", "/nonexistent/b.tar"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_import_the_references_stay_and_a_rerun_completes_from_the_store() {
    // Large enough that the copy and the hand-off each take a while.
    let Some(p) = Published::new("bundle-kill", 2, 48 << 20, 16 << 20).await else {
        return;
    };
    let Some(target) = PrivateEngine::start(None) else {
        return;
    };
    let engine = connect(&target.addr).await;
    let old = engine_env::image(&[&p.names()[0]], CREATED, 1024);
    engine_env::load(&engine, std::slice::from_ref(&old)).await;
    let dir = Dir::new();
    let file = create_bundle(&dir.path().join("b.tar"), &p.names(), None).await;
    let policy = policy(&dir);
    let before = everything(&engine).await;
    let ids: Vec<String> = p.images.iter().map(FixtureImage::id).collect();
    let state = dir.path().join("state");
    let partial = state.join("cache/partial/sha256");
    let journal = state.join("downloads.json");

    // Killed while copying blobs into the store, then while the engine pulls.
    let copying = |_: &Path| std::fs::read_dir(&partial).is_ok_and(|d| d.count() > 0);
    // Loopback references journaled: the engine's pulls begin.
    let handing = |j: &Path| {
        std::fs::read_to_string(j)
            .is_ok_and(|s| s.contains("\"imports\"") && s.contains("127.0.0.1:"))
    };
    for (what, at) in [
        ("copying", &copying as &dyn Fn(&Path) -> bool),
        ("handing over", &handing),
    ] {
        let mut child = engine_env::stowage_cmd(
            &target.addr,
            &policy,
            &["bundle", "import", file.to_str().unwrap()],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !at(&journal) && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if what == "handing over" {
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it was {what}"
        );
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        let now: Vec<String> = everything(&engine)
            .await
            .into_iter()
            .filter(|l| l.contains(' ') && !l.ends_with(' '))
            .collect();
        let tagged_before: Vec<String> = before
            .iter()
            .filter(|l| !l.ends_with(' '))
            .cloned()
            .collect();
        assert_eq!(
            now, tagged_before,
            "references changed by an import killed while {what}"
        );
        println!("killed while {what}: references as before");
    }

    let out = stowage(
        &target.addr,
        &policy,
        &["bundle", "import", file.to_str().unwrap()],
    )
    .await;
    println!("{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let source = tags_of(&engine_env::engine().await.unwrap(), &ids).await;
    assert_eq!(tags_of(&engine, &ids).await, source);
    // The old image lost its tag to the bundle's, and nothing was left behind.
    let loopback: Vec<String> = engine
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_digests)
        .filter(|d| d.starts_with("127.0.0.1:") && !d.starts_with(&p.registry))
        .collect();
    assert_eq!(
        loopback.len(),
        2,
        "one digest record per imported image: {loopback:?}"
    );
    let ok = records(dir.audit(), Action::Import, Outcome::Ok);
    let total: u64 = std::fs::metadata(&file).unwrap().len();
    let copied = ok[0].bytes.unwrap();
    println!("re-run copied {copied} of the bundle's {total} bytes");
    assert!(
        copied < total / 2,
        "the re-run copied {copied} of {total}: not from the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_imports_where_its_base_is_and_is_refused_naming_the_layers_elsewhere() {
    let Some(p) = Published::new("bundle-delta", 2, 256 << 10, 64 << 10).await else {
        return;
    };
    let Some(host) = PrivateEngine::start(None) else {
        return;
    };
    let Some(wiped) = PrivateEngine::start(None) else {
        return;
    };
    let dir = Dir::new();
    let names = p.names();
    // The host has the first image (from a full bundle).
    let first = create_bundle(&dir.path().join("first.tar"), &names[..1], None).await;
    let policy = policy(&dir);
    let out = stowage(
        &host.addr,
        &policy,
        &["bundle", "import", first.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Cleared, as the host's own cache would be after `cache_max = 0`.
    std::fs::remove_dir_all(dir.path().join("state/cache")).unwrap();

    // What the host holds, then the second image without what it has.
    let inventory = dir.path().join("inventory.json");
    let inv = stowage(
        &host.addr,
        &policy,
        &["inventory", "-o", inventory.to_str().unwrap()],
    )
    .await;
    assert_eq!(inv.status.code(), Some(0), "{}", text(&inv));
    let delta_file =
        create_bundle(&dir.path().join("delta.tar"), &names[1..], Some(&inventory)).await;
    let full = create_bundle(&dir.path().join("full.tar"), &names[1..], None).await;
    let (delta_len, full_len) = (
        std::fs::metadata(&delta_file).unwrap().len(),
        std::fs::metadata(&full).unwrap().len(),
    );
    println!("delta {delta_len} bytes, full {full_len} bytes");
    assert!(delta_len < full_len / 2, "delta {delta_len} of {full_len}");
    let base = {
        let a = stowage::bundle::Archive::open(&delta_file).unwrap();
        let v = stowage::bundle::verify(&a, None).unwrap();
        v.images[0].missing[0].layer.digest.clone()
    };
    let delta = (delta_file, base);
    let other = Dir::new();
    let refused = stowage(
        &wiped.addr,
        &other.policy(""),
        &["bundle", "import", delta.0.to_str().unwrap()],
    )
    .await;
    println!("{}", text(&refused));
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("lacks the layers it leaves out") && said.contains(&delta.1),
        "{said}"
    );
    assert!(
        everything(&connect(&wiped.addr).await).await.is_empty(),
        "the wiped engine changed"
    );
    assert!(
        !other
            .path()
            .join("state/cache/blobs/sha256")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "blobs copied before the refusal"
    );

    let out = stowage(
        &host.addr,
        &policy,
        &["bundle", "import", delta.0.to_str().unwrap()],
    )
    .await;
    println!("{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ids: Vec<String> = p.images.iter().map(FixtureImage::id).collect();
    let source = tags_of(&engine_env::engine().await.unwrap(), &ids).await;
    assert_eq!(tags_of(&connect(&host.addr).await, &ids).await, source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_a_scan_blocks_tags_nothing_and_one_it_passes_goes_in() {
    let Some(p) = Published::new("bundle-scan", 2, 256 << 10, 64 << 10).await else {
        return;
    };
    let Some(target) = PrivateEngine::start(None) else {
        return;
    };
    let dir = Dir::new();
    let file = create_bundle(&dir.path().join("b.tar"), &p.names(), None).await;
    let ids: Vec<String> = p.images.iter().map(FixtureImage::id).collect();
    let engine = connect(&target.addr).await;
    let before = everything(&engine).await;

    // Blocked: the second image fails; neither reference is tagged and the
    // images the import brought are gone again.
    let bad = &ids[1];
    let gate = format!(
        "[[scan]]\nname = \"gate\"\ncommand = [\"/bin/sh\", \"-c\", \"if [ {{image}} = {bad} ]; then echo 'CVE-2099-0001 in {{ref}}'; exit 1; fi; echo clean\"]\n"
    );
    let policy = dir.policy(&gate);
    let out = stowage(
        &target.addr,
        &policy,
        &["bundle", "import", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("blocked by scan \"gate\": CVE-2099-0001"),
        "{}",
        text(&out)
    );
    assert_eq!(everything(&engine).await, before, "the engine is unchanged");
    let failed = records(dir.audit(), Action::Import, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{failed:?}");

    // Passing: both go in, each with its `scan` record.
    let policy = dir.policy(
        "[[scan]]\nname = \"gate\"\ncommand = [\"/bin/sh\", \"-c\", \"echo clean {ref}\"]\n",
    );
    let out = stowage(
        &target.addr,
        &policy,
        &["bundle", "import", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(tags_of(&engine, &ids).await.len(), 2);
    let scans = records(dir.audit(), Action::Scan, Outcome::Ok);
    assert_eq!(scans.len(), 2, "{scans:?}");
}
