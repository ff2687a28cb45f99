//! `stowage inventory`: what a host holds, as JSON, for `bundle create
//! --since`: each image with its references and its layers by diff id
//! (chain ids follow from them, as the engine names layers).

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::BundleError;
use crate::engine::{Engine, EngineResult};
use crate::transfer::layers::chain_ids;

/// Largest inventory file read.
const INVENTORY_MAX: u64 = 64 << 20;

/// One image the host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldImage {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// Its layers' diff ids, bottom first.
    pub diff_ids: Vec<String>,
}

/// What a host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Format version: 1.
    pub version: u32,
    /// The host's name (for messages and the delta bundle's annotation).
    pub host: String,
    /// When it was taken (RFC 3339).
    pub created: String,
    pub images: Vec<HeldImage>,
    /// Every diff id the host holds, sorted.
    pub layers: Vec<String>,
}

impl Inventory {
    /// The engine's images and their layers, now.
    pub async fn of<E: Engine>(engine: &E, host: &str, now: i64) -> EngineResult<Inventory> {
        let mut images = Vec::new();
        let mut layers = BTreeSet::new();
        for image in engine.list_images().await? {
            let diff_ids = engine.diff_ids(&image.id).await?;
            layers.extend(diff_ids.iter().cloned());
            images.push(HeldImage {
                id: image.id,
                repo_tags: image.repo_tags,
                repo_digests: image.repo_digests,
                diff_ids,
            });
        }
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Inventory {
            version: 1,
            host: host.to_owned(),
            created: chrono::DateTime::from_timestamp(now, 0)
                .unwrap_or_default()
                .to_rfc3339(),
            images,
            layers: layers.into_iter().collect(),
        })
    }

    /// Chain ids of every layer the host holds (each image's prefixes).
    pub fn chains(&self) -> HashSet<String> {
        self.images
            .iter()
            .flat_map(|i| chain_ids(&i.diff_ids))
            .collect()
    }

    /// Reads an inventory file (bounded), refused when it is not one.
    pub fn load(path: &Path) -> Result<Inventory, BundleError> {
        let bad = |why: String| BundleError::Input(format!("inventory {}: {why}", path.display()));
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(INVENTORY_MAX + 1).read_to_end(&mut bytes))
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() as u64 > INVENTORY_MAX {
            return Err(bad(format!("larger than {INVENTORY_MAX} bytes")));
        }
        let inventory: Inventory =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not an inventory: {e}")))?;
        if inventory.version != 1 {
            return Err(bad(format!(
                "version {} (this stowage reads 1)",
                inventory.version
            )));
        }
        Ok(inventory)
    }
}

/// This host's name, for an inventory.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
