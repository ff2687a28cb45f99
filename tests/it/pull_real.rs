//! `stowage pull REF` against the real private engine and registry: a pull
//! outside the policy, by digest, verified, then tagged; audit rule `cli`.

use crate::engine_env::{self, text};
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
