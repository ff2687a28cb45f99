//! The integration tests: one binary (one link of the crate) with a module
//! per topic, as ripgrep does. `cargo test --test it MODULE::` runs one topic.
//!
//! Helpers, named for what they hold:
//! - [`engine_env`]: the real private engine and registry of `scripts/test`
//!   (a missing one skips loudly, and fails in CI), fixture images, the docker
//!   CLI and the stowage binary against them, engines of a test's own;
//! - [`net`]: registries a test starts itself, fault-injecting TCP and HTTP
//!   proxies;
//! - [`fake_store`]: made-up images, containers and policies at a fixed time
//!   (`NOW`; the clock is `stowage::fixture::FixedClock(NOW)`), for the planner
//!   and the fake engine.
//!
//! proptest keeps its regression seeds in `tests/proptest-regressions/`
//! (`MODULE.txt`): with a `main.rs` here, that is where it looks.
//!
//! A new test file `tests/it/NAME.rs` gets its `mod NAME;` line below, in its
//! group, and reaches the helpers as `crate::engine_env` and so on (no
//! `mod common;` of its own).

mod engine_env;
mod fake_store;
mod net;

// Pure: the policy, the planner, the systemd unit, the package, bundle files.
mod bundle_verify;
mod package;
mod plan_props;
mod plan_table;
mod policy_check;
mod systemd_unit;

// On the fake engine.
mod daemon_loop;
mod execute_fake;
mod storage_cache;

// Against the real private engine and registry.
mod apply_real;
mod bundle_import_real;
mod bundle_real;
mod daemon_real;
mod engine_real;
mod engine_tls;
mod fleet_daemon;
mod inbox_real;
mod podman_real;
mod policy_oci;
mod pull_real;
mod registry_real;
mod scan_gate;
mod scan_secrets;
mod storage_real;
mod store_real;
mod transfer_real;
mod trash_real;

// Faults injected into the real engine, registry, disk, state and inputs.
mod faults_disk;
mod faults_engine;
mod faults_inputs;
mod faults_pull;
mod faults_pull_cli;
mod faults_pull_kill;
mod faults_servers;
mod faults_state;
mod faults_transfer;
mod trash_faults;

// The registry client against tiny servers playing what the real registry cannot.
mod registry_servers;
