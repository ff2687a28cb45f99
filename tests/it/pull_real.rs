//! Pulls through the content store against the real private engine and
//! registry, the link being a proxy that cuts, throttles, stalls or flips
//! bytes: `stowage pull REF` (outside the policy, audit rule `cli`) and
//! `[[prepull]]`.

use std::time::{Duration, Instant};

use crate::engine_env::{self, text};
use crate::net::{Mode, Proxy};
use crate::transfer_real::{Dir, ENGINE_WIDE, has_image, holder, now, publish, records, stowage};
use stowage::audit::{Action, Outcome};

const DAY: i64 = 86_400;
const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stowage_pull_pulls_by_digest_tags_then_is_up_to_date() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("cli-pull");
    let reference = format!("{reg}/{ns}/app:1");
    let image = engine_env::image(&[&reference], now() - DAY, 2 * MIB);
    publish(&engine, &image, None).await;
    assert!(!has_image(&engine, &image.id()).await);

    let dir = Dir::new();
    // Nothing in the policy names the image: `stowage pull` is outside it.
    let policy = dir.policy("");
    let pulled = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(pulled.status.code(), Some(0), "{}", text(&pulled));
    let out = String::from_utf8_lossy(&pulled.stdout);
    assert!(out.starts_with(&format!("pulled {reference} (")), "{out}");
    // Not a terminal: no progress line.
    assert!(!text(&pulled).contains('\r'), "{}", text(&pulled));
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    let pulls = records(dir.audit(), Action::Pull, Outcome::Ok);
    assert_eq!(pulls.len(), 1, "{:#?}", dir.audit());
    let rec = &pulls[0];
    assert_eq!(rec.rule.as_deref(), Some("cli"));
    assert_eq!(rec.reference.as_deref(), Some(reference.as_str()));
    assert_eq!(rec.image.as_deref(), Some(image.id().as_str()));
    // The layer is incompressible: the bytes received are about its size.
    let bytes = rec.bytes.expect("a pull record says what it received");
    assert!(
        (2 * MIB as u64..2 * MIB as u64 + 64 * 1024).contains(&bytes),
        "{bytes} bytes received for a 2 MiB layer"
    );
    assert_eq!(rec.resumed_bytes, Some(0));

    // The registry serves the same digest: nothing moves, nothing recorded.
    let again = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("up to date"),
        "{}",
        text(&again)
    );
    assert_eq!(dir.audit().len(), 1, "{:#?}", dir.audit());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stowage_pull_refuses_bad_input_and_says_why_a_pull_failed() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let addr = engine_env::engine_addr().unwrap();
    let reg = engine_env::registry().unwrap();
    let dir = Dir::new();
    let policy = dir.policy("");

    // Bad input: exit 2, nothing asked, nothing recorded.
    for args in [
        &["pull", "Bad Name:1"][..],
        &["pull", "app@sha256:12"],
        &["pull", "app:1", "--platform", "linux"],
    ] {
        let out = stowage(&addr, &policy, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("nothing done"), "{}", text(&out));
    }
    assert!(dir.audit_file_missing());

    // Nothing answers there: exit 1, host unchanged, the record says why.
    let down = stowage(&addr, &policy, &["pull", "127.0.0.1:1/app:1"]).await;
    assert_eq!(down.status.code(), Some(1), "{}", text(&down));
    assert!(text(&down).contains("host unchanged"), "{}", text(&down));
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    assert_eq!(failed[0].rule.as_deref(), Some("cli"));
    assert!(failed[0].error.as_deref().unwrap().contains("127.0.0.1:1"));

    // allowed_registries holds for `stowage pull` too.
    let fenced = dir.policy("allowed_registries = [\"registry.example.com\"]\n");
    let refused = stowage(&addr, &fenced, &["pull", &format!("{reg}/any/app:1")]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("not in daemon.allowed_registries"),
        "{}",
        text(&refused)
    );
    assert_eq!(holder(&engine, &format!("{reg}/any/app:1")).await, None);
}

// ------------------------------------------------- through the content store
// The private engine is local: every pull goes registry -> content store ->
// loopback -> engine. A proxy between stowage and the registry is the link.

/// The manifest `reference` (`host/repo:tag`) has at its registry, as JSON
/// (a plain HTTP GET: the registry is on loopback).
fn manifest_of(reference: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let (host, rest) = reference.split_once('/').unwrap();
    let (repo, tag) = rest.rsplit_once(':').unwrap();
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    write!(
        conn,
        "GET /v2/{repo}/manifests/{tag} HTTP/1.0\r\nHost: {host}\r\n\
         Accept: application/vnd.docker.distribution.manifest.v2+json\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8(answer).unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

/// Bytes of the image on the wire: manifest, config and layers.
fn wire_size(manifest: &serde_json::Value) -> u64 {
    let size = |v: &serde_json::Value| v["size"].as_u64().unwrap();
    size(&manifest["config"])
        + manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(size)
            .sum::<u64>()
}

/// The references (tags and digests) the engine lists for `id`.
async fn names_of(engine: &stowage::engine::DockerEngine, id: &str) -> (Vec<String>, Vec<String>) {
    use stowage::engine::Engine;
    let img = engine
        .image(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{id} is not on the engine"));
    (img.repo_tags, img.repo_digests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_every_mib_completes_with_wire_bytes_close_to_the_image() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("cli-cut");
    let image = engine_env::image(&[&format!("{reg}/{ns}/app:1")], now() - DAY, 6 * MIB);
    let digest = publish(&engine, &image, None).await;
    let size = wire_size(&manifest_of(&format!("{reg}/{ns}/app:1")));
    let proxy = Proxy::start(&reg).await;
    proxy.set(Mode::CutAfter(MIB as u64));
    let reference = format!("{}/{ns}/app:1", proxy.addr);
    let dir = Dir::new();
    let policy = dir.policy("");
    let out = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    // At least six cuts, each costing only the bytes in flight.
    assert!(
        proxy.connections() >= 6,
        "{} connections",
        proxy.connections()
    );
    let wire = proxy.bytes();
    assert!(
        wire as f64 <= size as f64 * 1.05,
        "{wire} bytes on the wire for an image of {size}"
    );
    // The engine holds it under the upstream's names only: the loopback
    // reference of the hand-off is gone.
    let (tags, digests) = names_of(&engine, &image.id()).await;
    assert_eq!(tags, std::slice::from_ref(&reference));
    assert_eq!(digests, [format!("{}/{ns}/app@{digest}", proxy.addr)]);
    let rec = &records(dir.audit(), Action::Pull, Outcome::Ok)[0];
    let bytes = rec.bytes.unwrap();
    assert!(
        (size..size + 8192).contains(&bytes),
        "{rec:?}, image {size}"
    );
    assert_eq!(rec.resumed_bytes, Some(0));
    // With the default cache_max of 0, the store keeps nothing afterwards.
    let blobs = dir.path().join("state/cache/blobs/sha256");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0);
}

/// `stowage pull REFERENCE` in the background, its output dropped.
fn spawn_pull(addr: &str, dir: &Dir, reference: &str) -> tokio::process::Child {
    let empty = dir.path().join("docker-config");
    std::fs::create_dir_all(&empty).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("--engine")
        .arg(addr)
        .arg("-p")
        .arg(dir.path().join("policy.toml"))
        .args(["pull", reference])
        .env_remove("DOCKER_HOST")
        .env("DOCKER_CONFIG", &empty)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Until the proxy has sent `n` bytes (a minute at most).
async fn wait_for_bytes(proxy: &Proxy, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.bytes() < n {
        assert!(Instant::now() < deadline, "the pull never got {n} bytes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_blob_stops_at_once_keeps_the_partial_and_exits_143() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("cli-term");
    let image = engine_env::image(&[&format!("{reg}/{ns}/app:1")], now() - DAY, 8 * MIB);
    publish(&engine, &image, None).await;
    let proxy = Proxy::start(&reg).await;
    proxy.set(Mode::Throttle(2 * MIB as u64));
    let reference = format!("{}/{ns}/app:1", proxy.addr);
    let dir = Dir::new();
    dir.policy("");
    let mut child = spawn_pull(&addr, &dir, &reference);
    wait_for_bytes(&proxy, 2 * MIB as u64).await;
    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let sent = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stowage pull did not stop")
        .unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert!(!has_image(&engine, &image.id()).await, "host changed");
    // One record: the pull did not complete, nothing changed.
    let audit = dir.audit();
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(
        (audit[0].action, audit[0].outcome),
        (Action::Skip, Outcome::Deferred)
    );
    assert!(audit[0].reason.contains("interrupted"), "{:?}", audit[0]);

    // What arrived before the signal was committed: the next run resumes.
    proxy.set(Mode::Pass);
    let again = stowage(
        &addr,
        &dir.path().join("policy.toml"),
        &["pull", &reference],
    )
    .await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let rec = &records(dir.audit(), Action::Pull, Outcome::Ok)[0];
    assert!(rec.resumed_bytes.unwrap() >= MIB as u64, "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_blob_then_again_resumes_without_fetching_the_partial_again() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("cli-kill");
    let image = engine_env::image(&[&format!("{reg}/{ns}/app:1")], now() - DAY, 12 * MIB);
    publish(&engine, &image, None).await;
    let size = wire_size(&manifest_of(&format!("{reg}/{ns}/app:1")));
    let proxy = Proxy::start(&reg).await;
    proxy.set(Mode::Throttle(4 * MIB as u64));
    let reference = format!("{}/{ns}/app:1", proxy.addr);
    let dir = Dir::new();
    let policy = dir.policy("");
    let mut child = spawn_pull(&addr, &dir, &reference);
    // Past the store's first commit (every 4 MiB), well short of the end.
    wait_for_bytes(&proxy, 7 * MIB as u64).await;
    child.start_kill().unwrap(); // SIGKILL
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let at_kill = proxy.bytes();
    assert!(!has_image(&engine, &image.id()).await, "host changed");
    assert!(dir.audit().is_empty() || dir.audit_file_missing());

    proxy.set(Mode::Pass);
    let again = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
    let rec = &records(dir.audit(), Action::Pull, Outcome::Ok)[0];
    let (bytes, resumed) = (rec.bytes.unwrap(), rec.resumed_bytes.unwrap());
    assert!(resumed >= 4 * MIB as u64, "{rec:?}");
    // What the partial held was not fetched again.
    assert!(bytes + resumed <= size + 8192, "{rec:?}, image {size}");
    let rerun = proxy.bytes() - at_kill;
    assert!(
        rerun <= size - resumed + 64 * 1024,
        "{rerun} bytes on the second run; {rec:?}, image {size}, {at_kill} at the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_detected_never_loaded_and_the_record_names_the_blob() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("cli-flip");
    let image = engine_env::image(&[&format!("{reg}/{ns}/app:1")], now() - DAY, 3 * MIB);
    publish(&engine, &image, None).await;
    let manifest = manifest_of(&format!("{reg}/{ns}/app:1"));
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let proxy = Proxy::start(&reg).await;
    // One byte in every MiB: the layer arrives wrong however it is fetched.
    proxy.set(Mode::FlipEvery(MIB as u64));
    let reference = format!("{}/{ns}/app:1", proxy.addr);
    let dir = Dir::new();
    let policy = dir.policy("");
    let out = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        !has_image(&engine, &image.id()).await,
        "a wrong image was loaded"
    );
    assert_eq!(holder(&engine, &reference).await, None);
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    let error = failed[0].error.clone().unwrap();
    assert!(
        error.contains(&layer) && error.contains("failed verification"),
        "{error}"
    );
    // Nothing of it is kept as complete.
    let hex = layer.trim_start_matches("sha256:");
    assert!(
        !dir.path()
            .join("state/cache/blobs/sha256")
            .join(hex)
            .exists()
    );

    // A good link: it comes, verified.
    proxy.set(Mode::Pass);
    let again = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(holder(&engine, &reference).await, Some(image.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_the_engine_has_are_not_fetched_again() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("cli-shared");
    let base = engine_env::unique_seed();
    let a = engine_env::image(&[&format!("{reg}/{ns}/app:1")], now() - DAY, 64 * 1024)
        .with_base(base, 4 * MIB);
    let b = engine_env::image(&[&format!("{reg}/{ns}/app:2")], now() - DAY, 64 * 1024)
        .with_base(base, 4 * MIB);
    publish(&engine, &a, None).await;
    publish(&engine, &b, None).await;
    let proxy = Proxy::start(&reg).await;
    let dir = Dir::new();
    let policy = dir.policy("");
    let first = stowage(
        &addr,
        &policy,
        &["pull", &format!("{}/{ns}/app:1", proxy.addr)],
    )
    .await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert!(proxy.bytes() > 4 * MIB as u64);
    let before = proxy.bytes();
    let second_ref = format!("{}/{ns}/app:2", proxy.addr);
    let second = stowage(&addr, &policy, &["pull", &second_ref]).await;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert_eq!(holder(&engine, &second_ref).await, Some(b.id()));
    // Only its own layer came: the 4 MiB base is the engine's already.
    let moved = proxy.bytes() - before;
    assert!(moved < 512 * 1024, "{moved} bytes for a 64 KiB layer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepull_on_a_cut_link_completes_and_after_a_dead_link_resumes() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let proxy = Proxy::start(&reg).await;
    let ns = engine_env::unique_ns("cut");
    // Incompressible bytes: the layer download is what gets cut.
    let a = engine_env::image(&[&format!("{reg}/{ns}/app:1")], now() - DAY, 3 << 20);
    let b = engine_env::image(&[&format!("{reg}/{ns}/app:2")], now() - DAY, 4 << 20);
    publish(&engine, &a, None).await;
    publish(&engine, &b, None).await;
    let dir = Dir::new();
    let entry = |tag: &str| format!("[[prepull]]\nimage = \"{}/{ns}/app:{tag}\"\n", proxy.addr);
    let settings = "retry_max = \"1s\"\nstall_timeout = \"3s\"\n";

    // Cut every 256 KiB: each cut costs only the bytes in flight.
    let policy = dir.policy(&format!("{settings}{}", entry("1")));
    proxy.set(Mode::CutAfter(256 * 1024));
    let cut = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(cut.status.code(), Some(0), "{}", text(&cut));
    let reference = format!("{}/{ns}/app:1", proxy.addr);
    assert_eq!(holder(&engine, &reference).await, Some(a.id()));
    let wire = proxy.bytes();
    assert!(
        wire < (3 << 20) + (3 << 20) / 20,
        "{wire} bytes on the wire for 3 MiB"
    );

    // The link dies mid-download: the pull fails, the host is as it was,
    // and the next reconcile continues where the partial stopped.
    let policy = dir.policy(&format!("{settings}{}", entry("2")));
    proxy.set(Mode::Throttle(1 << 20));
    let before = proxy.bytes();
    let apply = tokio::spawn({
        let (addr, policy) = (addr.clone(), policy.clone());
        async move { stowage(&addr, &policy, &["apply"]).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.bytes() - before < 3 << 19 {
        assert!(
            Instant::now() < deadline,
            "1.5 MiB of the second image never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(Mode::Stall);
    let dead = apply.await.unwrap();
    assert_eq!(dead.status.code(), Some(1), "{}", text(&dead));
    assert!(!has_image(&engine, &b.id()).await);
    let failed = records(dir.audit(), Action::Pull, Outcome::Failed);
    assert_eq!(failed.len(), 1, "{:#?}", dir.audit());
    let got = failed[0].bytes.unwrap_or(0);
    assert!(got > 1 << 20, "the failed record says {got} bytes came");

    proxy.set(Mode::Pass);
    // Past the backoff (`retry_max` 1s), `plan` says how far the download got.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plan = stowage(&addr, &policy, &["plan"]).await;
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout);
    let line = shown
        .lines()
        .find(|l| l.contains("app:2 <- "))
        .unwrap_or_else(|| panic!("no pull of app:2 in\n{shown}"));
    assert!(line.contains("/4.2 MB downloaded"), "{line}");
    let healed = stowage(&addr, &policy, &["apply"]).await;
    assert_eq!(healed.status.code(), Some(0), "{}", text(&healed));
    assert_eq!(
        holder(&engine, &format!("{}/{ns}/app:2", proxy.addr)).await,
        Some(b.id())
    );
    let ok = records(dir.audit(), Action::Pull, Outcome::Ok);
    let last = ok.last().unwrap();
    let resumed = last.resumed_bytes.unwrap_or(0);
    assert!(resumed > 1 << 20, "resumed only {resumed} bytes: {last:?}");
    assert!(
        last.bytes.unwrap() + resumed < (4 << 20) + (1 << 18),
        "{last:?}"
    );
}

// ------------------------------------------------- platforms of an index

/// One HTTP/1.0 exchange with the (loopback) registry: `(status, head, body)`.
async fn exchange(
    reg: &str,
    method: &str,
    target: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(reg).await.unwrap();
    let head = format!(
        "{method} {target} HTTP/1.0\r\nHost: {reg}\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, answer[split + 4..].to_vec())
}

fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Uploads `bytes` as a blob of `repo` (POST, then PUT with its digest).
async fn upload(reg: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_of(bytes);
    let (status, head, _) =
        exchange(reg, "POST", &format!("/v2/{repo}/blobs/uploads/"), "", b"").await;
    assert_eq!(status, 202, "{head}");
    let location = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_owned())
        })
        .unwrap();
    let target = location
        .split_once(reg)
        .map_or(location.as_str(), |(_, t)| t);
    let sep = if target.contains('?') { '&' } else { '?' };
    let (status, head, _) = exchange(
        reg,
        "PUT",
        &format!("{target}{sep}digest={digest}"),
        "Content-Type: application/octet-stream\r\n",
        bytes,
    )
    .await;
    assert_eq!(status, 201, "{head}");
    digest
}

/// A tar of one small file: an uncompressed OCI layer.
fn tiny_layer(text: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("platform.txt").unwrap();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    b.append(&h, text.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

/// One tiny image for `os/arch[/variant]` in `repo`: its manifest's
/// `(digest, size)` and its config's digest (the engine's image id).
async fn platform_image(reg: &str, repo: &str, platform: &str) -> ((String, usize), String) {
    let mut parts = platform.split('/');
    let (os, arch, variant) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
    let layer = tiny_layer(platform);
    let diff_id = sha256_of(&layer);
    let layer_digest = upload(reg, repo, &layer).await;
    let variant_field = variant
        .map(|v| format!(r#","variant":"{v}""#))
        .unwrap_or_default();
    let config = format!(
        r#"{{"architecture":"{arch}","os":"{os}"{variant_field},"created":"2020-09-13T12:26:40Z","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let config_digest = upload(reg, repo, config.as_bytes()).await;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let digest = sha256_of(manifest.as_bytes());
    let (status, head, _) = exchange(
        reg,
        "PUT",
        &format!("/v2/{repo}/manifests/{digest}"),
        "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
        manifest.as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{head}");
    ((digest, manifest.len()), config_digest)
}

/// An OCI index of two tiny images pushed by hand through the registry's
/// API: the engine's own platform and another one. `--platform` picks the
/// other; no platform picks the engine's (what `/version` says, not what
/// stowage was built for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stowage_pull_takes_the_platform_asked_from_an_index_else_the_engines() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    use stowage::engine::Engine as _;
    let own = engine.info().await.unwrap().platform;
    let other = if own == "linux/arm64/v8" || own == "linux/arm64" {
        "linux/amd64"
    } else {
        "linux/arm64/v8"
    };
    let repo = format!("{}/multi", engine_env::unique_ns("cli-index"));
    let (own_manifest, own_id) = platform_image(&reg, &repo, &own).await;
    let (other_manifest, other_id) = platform_image(&reg, &repo, other).await;
    let entry = |(digest, size): &(String, usize), platform: &str| {
        let mut p = platform.split('/');
        let (os, arch, variant) = (p.next().unwrap(), p.next().unwrap(), p.next());
        let variant = variant
            .map(|v| format!(r#","variant":"{v}""#))
            .unwrap_or_default();
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"platform":{{"os":"{os}","architecture":"{arch}"{variant}}}}}"#
        )
    };
    // The other platform first: a client that takes the first entry is wrong.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{},{}]}}"#,
        entry(&other_manifest, other),
        entry(&own_manifest, &own)
    );
    let (status, head, _) = exchange(
        &reg,
        "PUT",
        &format!("/v2/{repo}/manifests/1"),
        "Content-Type: application/vnd.oci.image.index.v1+json\r\n",
        index.as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{head}");
    let reference = format!("{reg}/{repo}:1");
    let dir = Dir::new();
    let policy = dir.policy("");

    let asked = stowage(&addr, &policy, &["pull", &reference, "--platform", other]).await;
    assert_eq!(asked.status.code(), Some(0), "{}", text(&asked));
    assert_eq!(holder(&engine, &reference).await, Some(other_id.clone()));
    assert!(!has_image(&engine, &own_id).await);
    // The upstream digest reference is the index's, as the engine's own pull records it.
    let img = engine.image(&other_id).await.unwrap().unwrap();
    let index_ref = format!("{reg}/{repo}@{}", sha256_of(index.as_bytes()));
    assert!(img.repo_digests.contains(&index_ref), "{img:?}");
    assert!(
        img.repo_digests
            .iter()
            .all(|d| !d.starts_with("127.0.0.1:") || d.starts_with(&reg)),
        "the loopback reference is gone: {img:?}"
    );
    // Its last tag gone, the engine drops the image with its digest references.
    engine.remove(&reference).await.unwrap();
    assert!(!has_image(&engine, &other_id).await);

    let default = stowage(&addr, &policy, &["pull", &reference]).await;
    assert_eq!(default.status.code(), Some(0), "{}", text(&default));
    assert_eq!(holder(&engine, &reference).await, Some(own_id.clone()));
    assert!(!has_image(&engine, &other_id).await);
    let pulls = records(dir.audit(), Action::Pull, Outcome::Ok);
    assert_eq!(pulls.len(), 2, "{:#?}", dir.audit());
    assert!(
        pulls.iter().all(|r| r.bytes.is_some_and(|b| b > 0)),
        "{pulls:#?}"
    );
    engine.remove(&reference).await.unwrap();
}
