//! `stowage bundle create|verify` and `stowage inventory`: bundles for
//! offline hosts (see `docs/bundles.md`). Results on stdout, one line each;
//! errors on stderr; exit codes per the spec: `create` 0 written, 1 some
//! image missing (nothing written), 2 could not run; `verify` 0 valid, 1
//! damaged or not the expected one, 2 unreadable; `inventory` 0.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use super::{ConnectOptions, Fatal, connect, emit, errln, load_policy, stop_on_signals};
use crate::bundle::{self, Archive, BundleError, Inventory, Wanted};
use crate::clock::{Clock, SystemClock};
use crate::credentials::CredentialStore;
use crate::fmt::{human_bytes, short_digest};
use crate::store::Store;

/// A download in `bundle create` fails after this long without a new byte
/// (someone waits for it, as for `stowage pull`); its partial is kept.
const GIVE_UP: Duration = Duration::from_secs(600);

#[derive(Debug, Subcommand)]
pub(super) enum BundleCommand {
    /// Write a bundle of images: the REFs, or every [[prepull]] of the
    /// policy; from their registries (resumable), or from the engine
    Create {
        /// The bundle file (written as FILE.partial, renamed at the end)
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Take the images from the local engine (images built here)
        #[arg(long)]
        from_engine: bool,
        /// Leave out every layer the host of this inventory holds (a delta)
        #[arg(long, value_name = "INVENTORY")]
        since: Option<PathBuf>,
        /// `os/arch[/variant]` of an index [default: this host's]
        #[arg(long)]
        platform: Option<String>,
        /// `repository[:tag][@digest]`; none: every [[prepull]] of the policy
        references: Vec<String>,
    },
    /// Check every blob and image of a bundle (nothing changed)
    Verify {
        file: PathBuf,
        /// The bundle's digest it must have (`sha256:…` of its index.json)
        #[arg(long, value_name = "DIGEST")]
        expect: Option<String>,
    },
    /// Verify a bundle, then bring its images in and tag them, all or
    /// nothing (a killed import leaves the host as before)
    Import {
        file: PathBuf,
        /// The bundle's digest it must have (`sha256:…` of its index.json)
        #[arg(long, value_name = "DIGEST")]
        expect: Option<String>,
    },
}

pub(super) async fn cmd_bundle(
    policy_path: &Path,
    engine: &ConnectOptions,
    command: BundleCommand,
) -> Result<ExitCode, Fatal> {
    match command {
        BundleCommand::Create {
            output,
            from_engine,
            since,
            platform,
            references,
        } => {
            create(
                policy_path,
                engine,
                &output,
                from_engine,
                since.as_deref(),
                platform.as_deref(),
                references,
            )
            .await
        }
        BundleCommand::Verify { file, expect } => verify(&file, expect.as_deref()).await,
        BundleCommand::Import { file, expect } => {
            super::import::cmd_import(policy_path, engine, &file, expect.as_deref()).await
        }
    }
}

async fn create(
    policy_path: &Path,
    engine: &ConnectOptions,
    output: &Path,
    from_engine: bool,
    since: Option<&Path>,
    platform: Option<&str>,
    references: Vec<String>,
) -> Result<ExitCode, Fatal> {
    let since = match since {
        Some(p) => match Inventory::load(p) {
            Ok(i) => Some(i),
            Err(e) => return Ok(failed(&e)),
        },
        None => None,
    };
    let result = if from_engine {
        if platform.is_some() {
            return Err(Fatal::Message(
                "--platform is for registries; the engine exports what it holds".into(),
            ));
        }
        let references = if references.is_empty() {
            load_policy(policy_path)
                .await?
                .prepull
                .iter()
                .map(|p| p.image.clone())
                .collect()
        } else {
            references
        };
        if references.is_empty() {
            return Err(Fatal::Message(
                "no image named and no [[prepull]] in the policy".into(),
            ));
        }
        let engine = connect(engine).await?;
        bundle::create_from_engine(&engine, &references, since.as_ref(), output).await
    } else {
        let policy = load_policy(policy_path).await?;
        let wanted: Result<Vec<Wanted>, BundleError> = if references.is_empty() {
            policy
                .prepull
                .iter()
                .map(|p| {
                    Wanted::parse(
                        &p.image,
                        p.digest.as_deref(),
                        p.platform.as_deref().or(platform),
                        &p.sources,
                    )
                })
                .collect()
        } else {
            references
                .iter()
                .map(|r| Wanted::parse(r, None, platform, &[]))
                .collect()
        };
        let wanted = match wanted {
            Ok(w) if w.is_empty() => {
                return Err(Fatal::Message(
                    "no image named and no [[prepull]] in the policy".into(),
                ));
            }
            Ok(w) => w,
            Err(e) => return Ok(failed(&e)),
        };
        let shutdown = CancellationToken::new();
        stop_on_signals(shutdown.clone())?;
        let credentials = CredentialStore::load(policy.daemon.credentials_file.as_deref())
            .map_err(|e| Fatal::Message(e.to_string()))?;
        let dir = policy.daemon.cache_dir.clone();
        let store = crate::blocking::off_loop(move || Store::open(&dir))
            .await
            .map_err(|e| Fatal::Message(e.to_string()))?;
        let fetching = bundle::Fetching {
            store: &store,
            credentials: &credentials,
            stall: policy.daemon.stall_timeout,
            give_up: GIVE_UP,
            cancel: &shutdown,
        };
        bundle::create_from_registry(&wanted, &fetching, since.as_ref(), output).await
    };
    match result {
        Ok(created) => {
            outln!("bundle {}", created.digest)?;
            for image in &created.images {
                outln!("image {image}")?;
            }
            if !created.left_out.is_empty() {
                outln!(
                    "left out {} layer(s) the inventory's host holds",
                    created.left_out.len()
                )?;
            }
            outln!(
                "wrote {} ({}, {} bytes)",
                created.path.display(),
                human_bytes(created.bytes),
                created.bytes
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failed(&e)),
    }
}

async fn verify(file: &Path, expect: Option<&str>) -> Result<ExitCode, Fatal> {
    let path = file.to_path_buf();
    let expect = expect.map(str::to_owned);
    let result = crate::blocking::off_loop(move || {
        let archive = Archive::open(&path)?;
        bundle::verify(&archive, expect.as_deref())
    })
    .await;
    let verified = match result {
        Ok(v) => v,
        Err(e) => return Ok(failed(&e)),
    };
    outln!(
        "valid {}: bundle {}, {} image(s), {} blob(s), {}",
        file.display(),
        verified.digest,
        verified.images.len(),
        verified.blobs().len(),
        human_bytes(verified.blob_bytes())
    )?;
    for image in &verified.images {
        outln!(
            "image {} manifest {} id {}{}",
            image.name,
            short_digest(&image.top.digest),
            short_digest(image.id()),
            if image.missing.is_empty() {
                String::new()
            } else {
                format!(", {} layer(s) left out (delta)", image.missing.len())
            }
        )?;
        for m in &image.missing {
            outln!(
                "  needs layer {} (diff id {}) on the importing host",
                m.layer.digest,
                m.diff_id
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `stowage inventory [-o FILE]`.
pub(super) async fn cmd_inventory(
    engine: &ConnectOptions,
    output: Option<&Path>,
) -> Result<ExitCode, Fatal> {
    let engine = connect(engine).await?;
    let host = bundle::inventory::host_name();
    let inventory = Inventory::of(&engine, &host, SystemClock.now().timestamp()).await?;
    let mut json = serde_json::to_vec_pretty(&inventory)?;
    json.push(b'\n');
    match output {
        None => emit(format_args!("{}", String::from_utf8_lossy(&json)))?,
        Some(path) => {
            crate::state::write_atomic(path, &json)
                .map_err(|e| Fatal::Message(format!("cannot write {}: {e}", path.display())))?;
            outln!(
                "inventory of {host}: {} image(s), {} layer(s), written to {}",
                inventory.images.len(),
                inventory.layers.len(),
                path.display()
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An error of a bundle command: said on stderr (damage one blob a line),
/// its exit code from the spec's table.
fn failed(e: &BundleError) -> ExitCode {
    match e {
        BundleError::Damaged { path, damage } => {
            errln(format_args!(
                "error: bundle {} is damaged ({} blob(s)); nothing changed:",
                path.display(),
                damage.len()
            ));
            for d in damage {
                errln(format_args!("  {d}"));
            }
        }
        e => errln(format_args!("error: {e}")),
    }
    ExitCode::from(e.exit_code())
}
