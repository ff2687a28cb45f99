//! Planner time against store size: one plan over synthetic stores of 1k,
//! 10k and 100k references (`fixture::synthetic_store`) with a policy of
//! about twenty rules and a `[storage] max_size` (`fixture::synthetic_policy`).
//!
//! Two functions: `apply`, the plan a reconcile executes
//! (`plan::plan_to_apply`), and `status`, the same plan with a verdict per
//! reference (`plan::plan`, what `stowage status` and `plan --json` run).
//! Each plan is dropped inside the timed loop.
//!
//! The store and the policy are built outside the timed loop: only planning
//! is measured. Goal: 100k references under 250 ms on 2 cores, and growth no
//! worse than n log n (x10 references: at most about x13 time).
//!
//! `cargo bench --bench planner`; `scripts/bench planner` runs it and prints
//! the table with growth ratios from criterion's estimates.

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use stowage::fixture::{SYNTHETIC_NOW, synthetic_policy, synthetic_store};
use stowage::plan::{Observed, Plan, plan, plan_to_apply};
use stowage::policy::Policy;
use stowage::state::State;

fn planner(c: &mut Criterion) {
    let mut group = c.benchmark_group("planner");
    for n in [1_000usize, 10_000, 100_000] {
        let store = synthetic_store(n, 42);
        let policy = stowage::policy::parse(
            &synthetic_policy(store.unique_bytes),
            std::path::Path::new("synthetic.toml"),
        )
        .expect("the synthetic policy is valid");
        group.throughput(Throughput::Elements(n as u64));
        // Large stores take long per plan: fewer samples of one iteration
        // each (flat sampling) keep the run within minutes on a shared
        // 2-core machine.
        if n >= 100_000 {
            group
                .sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .measurement_time(Duration::from_secs(20));
        } else {
            group
                .sample_size(20)
                .sampling_mode(SamplingMode::Auto)
                .measurement_time(Duration::from_secs(5));
        }
        type Planner = fn(&Policy, &Observed, &State, i64) -> Plan;
        let planners: [(&str, Planner); 2] = [("apply", plan_to_apply), ("status", plan)];
        for (name, planner) in planners {
            group.bench_with_input(BenchmarkId::new(name, n), &store, |b, store| {
                b.iter(|| {
                    planner(
                        black_box(&policy),
                        black_box(&store.observed),
                        &store.state,
                        SYNTHETIC_NOW,
                    )
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
