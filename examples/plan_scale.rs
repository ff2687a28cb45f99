//! Plan once over a large synthetic store and print the time, what the plan
//! holds and the peak memory: the companion of `benches/planner.rs` for
//! memory (`/usr/bin/time -v`) and profiling (`perf record`), where
//! criterion's repetitions would get in the way.
//!
//! Usage: `cargo run --release --example plan_scale -- [REFERENCES] [RUNS]`
//! (default 100000 references, 1 run). Prints one `key=value` line per run
//! after a readable summary; `scripts/bench planner` parses the last line.

use std::time::Instant;

use stowage::fixture::{SYNTHETIC_NOW, synthetic_policy, synthetic_store};
use stowage::plan::{Kind, plan, plan_to_apply};

/// Peak resident set size of this process so far (`VmHWM`), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let references: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let runs: usize = args.next().map_or(Ok(1), |a| a.parse())?;

    let t = Instant::now();
    let store = synthetic_store(references, 42);
    let build = t.elapsed();
    let policy = stowage::policy::parse(
        &synthetic_policy(store.unique_bytes),
        std::path::Path::new("synthetic.toml"),
    )
    .map_err(|d| format!("the synthetic policy is invalid: {d:?}"))?;
    let rss_store = peak_rss_kib();
    println!(
        "store: {} references, {} images, {} containers, {:.1} GB unique; built in {:.0} ms; peak RSS {} MiB",
        store.references,
        store.observed.images.len(),
        store.observed.containers.len(),
        store.unique_bytes as f64 / 1e9,
        build.as_secs_f64() * 1e3,
        rss_store / 1024
    );
    for run in 1..=runs {
        // What a reconcile runs, then the same with a verdict per
        // reference (what `status` runs); each dropped inside its time.
        let t = Instant::now();
        drop(plan_to_apply(
            &policy,
            &store.observed,
            &store.state,
            SYNTHETIC_NOW,
        ));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let p = plan(&policy, &store.observed, &store.state, SYNTHETIC_NOW);
        let count = |k: Kind| p.actions.iter().filter(|a| a.kind == k).count();
        let counts = format!(
            "tag={} untag={} remove={} evict={} deferred={} protected={} warnings={} verdicts={}",
            count(Kind::Tag),
            count(Kind::Untag),
            count(Kind::Remove),
            count(Kind::Evict),
            p.deferred.len(),
            p.protected.len(),
            p.warnings.len(),
            p.verdicts.len(),
        );
        drop(p);
        let explain_ms = t.elapsed().as_secs_f64() * 1e3;
        let rss = peak_rss_kib();
        println!(
            "run={run} references={} images={} plan_ms={ms:.1} explain_ms={explain_ms:.1} {counts} rss_store_kib={rss_store} rss_peak_kib={rss}",
            store.references,
            store.observed.images.len(),
        );
    }
    Ok(())
}
