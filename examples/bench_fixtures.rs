//! Write the fixture images of a `scripts/bench` section as a docker-archive
//! file, for `docker load -i`: the same file loads identical images (same
//! ids) into every engine a section compares, so each tool meets the same
//! store.
//!
//! Usage: `bench_fixtures SECTION OUT.tar`, SECTION one of:
//! - `evict`: 60 images `bench/evict-NN:v1` of 2 MiB each, created one day
//!   apart (NN = 00 is the oldest); two thirds of them on one of two shared
//!   3 MiB base layers;
//! - `remove`: 500 images `bench/rm-NNN:v1` created in 2023 (what the
//!   section removes) and 20 images `bench/keep-NN:v1` created three hours
//!   ago (what stays), 32 KiB each;
//! - `noop`: 500 images with four tags each (`bench/noop-R:vN`, `:build-N`,
//!   `:git-HEX`, `:pr-N`, 20 repositories): 2,000 references, 4 KiB each
//!   (loading takes minutes per 1,000 images on dockerd 20.10).
//!
//! Old creation times are fixed, so the images are the same on every run.

use stowage::fixture::{FixtureImage, archive};

const DAY: i64 = 86_400;
const KIB: usize = 1024;
/// 2023-11-14T22:13:20Z: fixed, so ids do not depend on the day of the run.
const EPOCH: i64 = 1_700_000_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_fixtures evict|remove|noop OUT.tar";
    let section = args.next().ok_or(usage)?;
    let out = args.next().ok_or(usage)?;
    let images: Vec<FixtureImage> = match section.as_str() {
        "evict" => (0..60u64)
            .map(|i| {
                let img = FixtureImage::new(10_000 + i, EPOCH + i as i64 * DAY, 2048 * KIB)
                    .tag(format!("bench/evict-{i:02}:v1"));
                match i % 3 {
                    0 => img.with_base(1, 3072 * KIB),
                    1 => img.with_base(2, 3072 * KIB),
                    _ => img,
                }
            })
            .collect(),
        "remove" => {
            let recent = chrono::Utc::now().timestamp() - 3 * 3600;
            (0..500u64)
                .map(|i| {
                    FixtureImage::new(20_000 + i, EPOCH + i as i64 * 60, 32 * KIB)
                        .tag(format!("bench/rm-{i:03}:v1"))
                })
                .chain((0..20u64).map(|i| {
                    FixtureImage::new(30_000 + i, recent + i as i64, 32 * KIB)
                        .tag(format!("bench/keep-{i:02}:v1"))
                }))
                .collect()
        }
        "noop" => (0..500u64)
            .map(|i| {
                let repo = format!("bench/noop-{}", i % 20);
                FixtureImage::new(40_000 + i, EPOCH + i as i64 * 60, 4 * KIB)
                    .tag(format!("{repo}:v{i}"))
                    .tag(format!("{repo}:build-{i}"))
                    .tag(format!("{repo}:git-{:07x}", i * 7919))
                    .tag(format!("{repo}:pr-{i}"))
            })
            .collect(),
        other => return Err(format!("unknown section {other:?}; {usage}").into()),
    };
    std::fs::write(&out, archive(&images))?;
    let references: usize = images.iter().map(|i| i.tags.len()).sum();
    println!(
        "{section}: {} images, {references} references -> {out}",
        images.len()
    );
    Ok(())
}
