//! stowage: a declarative image-lifecycle daemon for Docker hosts.
//!
//! A reconcile is a pure function between two kinds of I/O:
//! observe (engine, state, clock) -> `plan` -> execute -> audit log.
//!
//! - [`policy`]: raw TOML -> validated [`policy::Policy`] with diagnostics.
//! - [`engine`]: the [`engine::Engine`] trait; `engine::docker` is the one module
//!   that knows bollard; `engine::fake` (testkit) is an in-memory engine for tests.
//! - [`refs`]: parsing `repository:tag` references.
//! - [`fmt`]: sizes, durations and short ids for people.
//! - [`clock`]: the [`clock::Clock`] trait and the system clock.
//! - [`state`]: crash-safe persistent state (first seen, last used, backoff).
//! - [`audit`]: the JSON-lines audit log.
//! - [`blocking`]: CPU and file work off the daemon's one async thread.
//! - [`httpd`]: the bounded HTTP/1 server loop of the metrics endpoint and the
//!   content store's loopback registry.
//! - [`credentials`]: registry credentials from Docker's `config.json`.
//! - [`registry`]: the registry client (manifests, blobs with `Range`, auth,
//!   redirects): the one module that speaks HTTP to registries.
//! - [`store`]: the content store's seam types (descriptors, blob sources).
//! - `fixture` (testkit): docker-archive fixture images for tests, demos and benchmarks.
//! - [`observe`]: one observation of the engine per reconcile, kept
//!   current from what each action did.
//! - [`plan`]: the pure planner and its rendering.
//! - [`reconcile`]: observe, plan, execute through the audit log.
//! - [`transfer`]: pre-pulls and mirror pushes: pure decisions, then pulls and
//!   pushes with bounded concurrency, stall watchdog and persistent backoff.
//! - [`daemon`]: `stowage run`: triggers, reload, engine events, control
//!   socket, metrics, systemd notifications.
//! - [`status`]: what `stowage status` shows, with or without a daemon.
//! - [`trash`]: what `[daemon] trash` keeps of removed images (references, expiry).
//! - [`storage`]: disk pressure: eviction by last use over unique layer bytes.
//! - [`store`]: the content store: resumable, verified blob downloads into an
//!   OCI layout, served read-only on loopback for the engine to pull.
//! - [`bundle`]: bundles for offline hosts: the safe tar reader, verify,
//!   create (from registries or the engine), inventory.
//! - [`scan`]: admission checks (`[[scan]]`): external commands and
//!   `builtin:secrets`, run on arriving images before their reference moves.
//! - [`cli`]: the command line.
//!
//! The `testkit` feature (off by default; every test, bench and example target
//! turns it on) adds what only tests and demos need: `fixture`, `engine::fake`,
//! `Engine::load`/`Engine::save` and a few test-only constructors. The product
//! is built without it.

pub mod audit;
pub mod blocking;
pub mod bundle;
pub mod cli;
pub mod clock;
pub mod credentials;
pub mod daemon;
pub mod engine;
#[cfg(feature = "testkit")]
pub mod fixture;
pub mod fleet;
pub mod fmt;
pub mod httpd;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod reconcile;
pub mod refs;
pub mod registry;
pub mod scan;
pub mod state;
pub mod status;
pub mod storage;
pub mod store;
mod tls_check;
pub mod transfer;
pub mod trash;
