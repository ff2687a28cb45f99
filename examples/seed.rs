//! Seed an engine with demo fixture images for `scripts/try`: a release
//! repository with semver tags, CI builds per branch, a base image, a tag that
//! breaks the naming convention and a few dangling images, all with chosen
//! creation times.
//!
//! Usage: `cargo run --example seed -- unix:///path/to/private/docker.sock`
//! (refuses the machine-wide socket: demos never touch the user's engine).

use bytes::Bytes;
use stowage::engine::{DockerEngine, Engine};
use stowage::fixture::{self, FixtureImage};

const DAY: i64 = 86_400;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .ok_or("usage: seed ENGINE_ADDRESS (e.g. unix:///tmp/x/docker.sock)")?;
    if addr.contains("/var/run/docker.sock") || addr == "unix:///run/docker.sock" {
        return Err("refusing to seed the machine-wide engine; start a private one".into());
    }
    let engine = DockerEngine::connect(Some(&addr)).await?;
    let now = chrono::Utc::now().timestamp();
    let mut seed = 1_000u64;
    let mut next = |tags: &[String], days: i64, size: usize| {
        seed += 1;
        let mut img = FixtureImage::new(seed, now - days * DAY, size).with_base(7, 64 * 1024);
        img.tags = tags.to_vec();
        img
    };
    let mut images = Vec::new();
    for (i, minor) in (0..8).enumerate() {
        let mut tags = vec![format!("demo/app:v1.{minor}.0")];
        if minor == 5 {
            tags.push("demo/app:quick-fix".into());
        }
        images.push(next(&tags, 80 - 10 * i as i64, 300_000));
    }
    images.push(next(&["demo/app:nightly".into()], 2, 300_000));
    for (branch, builds) in [("main", 6), ("feat-login", 3)] {
        for b in 1..=builds {
            images.push(next(
                &[format!("demo/api:{branch}-{b}")],
                40 - 5 * b,
                200_000,
            ));
        }
    }
    images.push(next(&["debian:12".into()], 300, 500_000));
    for d in 0..3 {
        images.push(next(&[], 20 + 10 * d, 100_000));
    }
    let loaded = engine.load(Bytes::from(fixture::archive(&images))).await?;
    println!(
        "seeded {} images ({} references/ids loaded)",
        images.len(),
        loaded.len()
    );
    Ok(())
}
