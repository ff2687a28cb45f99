//! `bundle create` against the real private engine and registry: from the
//! registry and from the engine; the file read by `docker load` (20.10) and
//! `skopeo` (`oci-archive:`); a delta against an inventory.

use std::path::Path;
use std::process::{Command, Output};

use crate::engine_env::{self, text};
use crate::transfer_real::{Dir, ENGINE_WIDE, now, publish};
use stowage::engine::Engine;

const DAY: i64 = 86_400;
const MIB: usize = 1 << 20;

fn run(engine: &str, policy: &Path, args: &[&str]) -> Output {
    engine_env::stowage(engine, policy, args)
}

fn digest_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("bundle ").map(str::to_owned))
        .unwrap_or_else(|| panic!("no bundle digest printed: {}", text(o)))
}

fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("running skopeo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_from_registry_is_read_by_docker_load_and_skopeo() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let (addr, reg) = (
        engine_env::engine_addr().unwrap(),
        engine_env::registry().unwrap(),
    );
    let ns = engine_env::unique_ns("bundle-reg");
    let (a, b) = (format!("{reg}/{ns}/a:1"), format!("{reg}/{ns}/b:2"));
    let base = engine_env::unique_seed();
    let ia = engine_env::image(&[&a], now() - DAY, MIB).with_base(base, MIB);
    let ib = engine_env::image(&[&b], now() - DAY, MIB).with_base(base, MIB);
    publish(&engine, &ia, None).await;
    publish(&engine, &ib, None).await;
    let dir = Dir::new();
    let policy = dir.policy(&format!(
        "cache_dir = \"{}\"\n",
        dir.path().join("cache").display()
    ));
    let file = dir.path().join("b.tar");
    let f = file.to_str().unwrap();
    let made = run(&addr, &policy, &["bundle", "create", "-o", f, &a, &b]);
    assert_eq!(made.status.code(), Some(0), "{}", text(&made));
    assert!(!Path::new(&format!("{f}.partial")).exists());
    let digest = digest_line(&made);
    let ok = run(
        &addr,
        &policy,
        &["bundle", "verify", f, "--expect", &digest],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    // The shared base once: two images' blobs, less one layer.
    let names =
        String::from_utf8(Command::new("tar").args(["tf", f]).output().unwrap().stdout).unwrap();
    let blobs = names
        .lines()
        .filter(|l| l.len() > 20 && l.starts_with("blobs/sha256/"))
        .count();
    // a, b: wrapper + manifest + config + 2 layers each, the base shared.
    assert_eq!(blobs, 9, "{names}");

    // skopeo reads it by tag.
    let inspect = skopeo(&["inspect", &format!("oci-archive:{f}:2")]);
    assert_eq!(inspect.status.code(), Some(0), "{}", text(&inspect));
    let copied = dir.path().join("copied");
    let copy = skopeo(&[
        "copy",
        "-q",
        &format!("oci-archive:{f}:1"),
        &format!("dir:{}", copied.display()),
    ]);
    assert_eq!(copy.status.code(), Some(0), "{}", text(&copy));
    assert!(
        copied.join(&ia.id()[7..]).exists(),
        "skopeo copied the config of a"
    );

    // docker load (20.10) reads its manifest.json: same ids and names.
    let loaded = engine_env::docker(&addr, &["load", "-i", f]);
    assert!(loaded.contains(&a) && loaded.contains(&b), "{loaded}");
    assert_eq!(engine.image_id_of(&a).await.unwrap(), Some(ia.id()));
    assert_eq!(engine.image_id_of(&b).await.unwrap(), Some(ib.id()));
    for r in [&a, &b] {
        engine.remove(r).await.unwrap();
    }

    // An image the registry lacks: exit 1, nothing written.
    let none = dir.path().join("none.tar");
    let missing = run(
        &addr,
        &policy,
        &[
            "bundle",
            "create",
            "-o",
            none.to_str().unwrap(),
            &a,
            &format!("{reg}/{ns}/nope:1"),
        ],
    );
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(!none.exists() && !Path::new(&format!("{}.partial", none.display())).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_from_engine_keeps_ids_and_a_delta_names_what_it_left_out() {
    let Some(engine) = engine_env::engine().await else {
        return;
    };
    let _engine_wide = ENGINE_WIDE.read().await;
    let addr = engine_env::engine_addr().unwrap();
    let ns = engine_env::unique_ns("bundle-engine");
    let (a, b) = (format!("{ns}/a:1"), format!("{ns}/b:1"));
    let base = engine_env::unique_seed();
    let ia = engine_env::image(&[&a], now() - DAY, MIB).with_base(base, 2 * MIB);
    let ib = engine_env::image(&[&b], now() - DAY, MIB).with_base(base, 2 * MIB);
    engine_env::load(&engine, std::slice::from_ref(&ia)).await;
    let dir = Dir::new();
    let policy = dir.policy("");
    // The host's inventory while it holds a only.
    let inv = dir.path().join("inv.json");
    let taken = run(&addr, &policy, &["inventory", "-o", inv.to_str().unwrap()]);
    assert_eq!(taken.status.code(), Some(0), "{}", text(&taken));
    let inventory = stowage::bundle::Inventory::load(&inv).unwrap();
    assert!(inventory.images.iter().any(|i| i.id == ia.id()));
    engine_env::load(&engine, std::slice::from_ref(&ib)).await;

    let full = dir.path().join("full.tar");
    let made = run(
        &addr,
        &policy,
        &[
            "bundle",
            "create",
            "--from-engine",
            "-o",
            full.to_str().unwrap(),
            &b,
        ],
    );
    assert_eq!(made.status.code(), Some(0), "{}", text(&made));
    let ok = run(
        &addr,
        &policy,
        &["bundle", "verify", full.to_str().unwrap()],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    // The same image, exported again, gives the same bundle (deterministic gzip).
    let again = dir.path().join("again.tar");
    let made2 = run(
        &addr,
        &policy,
        &[
            "bundle",
            "create",
            "--from-engine",
            "-o",
            again.to_str().unwrap(),
            &b,
        ],
    );
    assert_eq!(digest_line(&made2), digest_line(&made));

    let delta = dir.path().join("delta.tar");
    let d = run(
        &addr,
        &policy,
        &[
            "bundle",
            "create",
            "--from-engine",
            "--since",
            inv.to_str().unwrap(),
            "-o",
            delta.to_str().unwrap(),
            &b,
        ],
    );
    assert_eq!(d.status.code(), Some(0), "{}", text(&d));
    assert!(
        String::from_utf8_lossy(&d.stdout).contains("left out 1 layer"),
        "{}",
        text(&d)
    );
    let (full_len, delta_len) = (
        std::fs::metadata(&full).unwrap().len(),
        std::fs::metadata(&delta).unwrap().len(),
    );
    assert!(
        delta_len + MIB as u64 <= full_len,
        "delta {delta_len} bytes, full {full_len}"
    );
    let v = run(
        &addr,
        &policy,
        &["bundle", "verify", delta.to_str().unwrap()],
    );
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let archive = stowage::bundle::Archive::open(&delta).unwrap();
    let verified = stowage::bundle::verify(&archive, None).unwrap();
    assert!(verified.is_delta());
    let missing = &verified.images[0].missing;
    assert_eq!(missing.len(), 1, "{verified:#?}");
    assert!(inventory.layers.contains(&missing[0].diff_id));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains(&missing[0].diff_id),
        "{}",
        text(&v)
    );

    // docker load of the full one on a host without b: the same id.
    engine.remove(&b).await.unwrap();
    let loaded = engine_env::docker(&addr, &["load", "-i", full.to_str().unwrap()]);
    assert!(loaded.contains(&b), "{loaded}");
    assert_eq!(engine.image_id_of(&b).await.unwrap(), Some(ib.id()));
    // The engine has no such image: exit 1, nothing written.
    let none = dir.path().join("none.tar");
    let refused = run(
        &addr,
        &policy,
        &[
            "bundle",
            "create",
            "--from-engine",
            "-o",
            none.to_str().unwrap(),
            &format!("{ns}/nope:1"),
        ],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(!none.exists());
    for r in [&a, &b] {
        engine.remove(r).await.unwrap();
    }
}
