//! Disk pressure, pure: which images eviction takes, in order, to bring the
//! images under `max_size` (unique bytes) or the data root's filesystem under
//! `low_watermark` once it is above `high_watermark`; and whether the build
//! cache needs pruning.
//!
//! Freed bytes come from layers: a layer's bytes are freed when the last image
//! holding it goes, so images sharing a base count it once, and no engine call
//! is needed after each removal to know where we stand.
//!
//! Only decisions come out of here (what to evict, in which order, whether
//! to prune the build cache, the pressure found): `plan::evict` words them
//! as the plan's actions.

use rustc_hash::FxHashMap as HashMap;
use serde::Serialize;

use crate::engine::{Image, Layer};
use crate::fmt::human_bytes;
use crate::observe::LayerMap;
use crate::policy::{EvictOrder, Storage};

// Re-exported under its old path (tests name it so).
pub use crate::observe::Disk;

/// What the planner found about disk pressure: for `plan`, `status` and logs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Pressure {
    /// Unique bytes of all images before the plan.
    pub image_bytes: u64,
    /// Bytes the retention actions of the same plan free.
    pub freed_by_retention: u64,
    pub disk: Option<Disk>,
    /// Why watermarks could not be evaluated (data root not on this host...).
    pub disk_error: Option<String>,
    /// Bytes that must go to meet the targets, after retention.
    pub to_free: u64,
    /// Human description of the targets and why eviction runs (or not).
    pub summary: String,
    /// Bytes still missing when every unprotected image is taken, and the
    /// protected bytes by rule: reported once per reconcile.
    pub shortfall: Option<Shortfall>,
    /// Build cache size and the configured maximum.
    pub build_cache: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    pub bytes: u64,
    pub protected_bytes: u64,
    /// (rule, unique bytes it protects), largest first.
    pub protected_by: Vec<(String, u64)>,
}

/// One image as eviction sees it.
pub struct Evictable<'a> {
    pub image: &'a Image,
    /// Its position in the [`LayerCounts`].
    pub counted: usize,
    /// Its first reference as the plan leaves it, and how many it keeps.
    pub first_tag: Option<&'a str>,
    pub tags: usize,
    /// Latest activity on this host (Unix seconds).
    pub activity: i64,
    /// The rule that protects it from eviction, if any.
    pub protection: Option<&'a str>,
}

/// Everything eviction needs besides the candidates.
pub struct Inputs<'a> {
    pub storage: &'a Storage,
    /// Unique bytes of all images before the plan's retention removals.
    pub image_bytes_before: u64,
    pub disk: Option<&'a Disk>,
    pub disk_error: Option<&'a str>,
    pub build_cache: Option<u64>,
    pub now: i64,
}

/// Each image's layers, and how many images hold each layer: the
/// bookkeeping that makes "bytes freed" exact with shared layers. Layers are
/// numbered once, when counted, so taking images out later (thousands of
/// them under pressure) is array arithmetic rather than hashing chain ids.
pub struct LayerCounts {
    /// Per image, in the order counted: its layers are `layers[start..end]`.
    spans: Vec<(usize, usize)>,
    /// The layer numbers of all images, image after image.
    layers: Vec<usize>,
    /// Per layer number: images still holding it, and its size.
    held: Vec<(usize, u64)>,
    /// Bytes of the layers some image still holds.
    bytes: u64,
}

impl LayerCounts {
    pub fn count(images: &[Image], known: &LayerMap) -> Self {
        let mut numbers: HashMap<&str, usize> = HashMap::default();
        numbers.reserve(images.len() * 2);
        let mut spans = Vec::with_capacity(images.len());
        let mut layers = Vec::with_capacity(images.len() * 4);
        let mut held: Vec<(usize, u64)> = Vec::new();
        let mut bytes = 0;
        for img in images {
            let start = layers.len();
            for (id, size) in layer_list(known.get(&img.id).map(Vec::as_slice), img) {
                let l = *numbers.entry(id).or_insert_with(|| {
                    held.push((0, size));
                    held.len() - 1
                });
                if held[l].0 == 0 {
                    bytes += held[l].1;
                }
                held[l].0 += 1;
                layers.push(l);
            }
            spans.push((start, layers.len()));
        }
        LayerCounts {
            spans,
            layers,
            held,
            bytes,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn layers_of(&self, image: usize) -> &[usize] {
        let (start, end) = self.spans[image];
        &self.layers[start..end]
    }

    /// Take out the image counted at position `image`; returns the bytes
    /// that only it held.
    pub fn remove(&mut self, image: usize) -> u64 {
        let (start, end) = self.spans[image];
        let mut freed = 0;
        for &l in &self.layers[start..end] {
            let (n, size) = &mut self.held[l];
            if *n > 0 {
                *n -= 1;
                if *n == 0 {
                    freed += *size;
                }
            }
        }
        self.bytes -= freed;
        freed
    }

    /// Bytes of the layers that no other remaining image holds.
    fn own_bytes(&self, image: usize) -> u64 {
        self.layers_of(image)
            .iter()
            .map(|&l| self.held[l])
            .filter(|&(n, _)| n <= 1)
            .map(|(_, size)| size)
            .sum()
    }
}

/// Unique bytes of a set of images: each layer counted once.
pub fn unique_bytes(layers: &LayerMap, images: &[Image]) -> u64 {
    LayerCounts::count(images, layers).bytes()
}

/// An image's layers as (chain id, size); one pseudo-layer of its whole
/// size when its layers are unknown.
fn layer_list<'a>(
    known: Option<&'a [Layer]>,
    img: &'a Image,
) -> impl Iterator<Item = (&'a str, u64)> + 'a {
    let pseudo = known.is_none().then_some((img.id.as_str(), img.size));
    known
        .into_iter()
        .flatten()
        .map(|l| (l.chain_id.as_str(), l.size))
        .chain(pseudo)
}

/// One image eviction takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// The candidate.
    pub candidate: usize,
    /// The bytes it frees, taken after those before it.
    pub bytes: u64,
}

/// The build cache is over `build_cache_max`: prune it down to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    /// Bytes the build cache takes now.
    pub size: u64,
    /// Bytes it may keep.
    pub max: u64,
}

/// What eviction decided.
pub struct Decided {
    /// In order; a plan words as actions only those it shows.
    pub evictions: Vec<Eviction>,
    /// A build-cache prune, if due.
    pub prune: Option<Prune>,
    pub pressure: Pressure,
    /// Why eviction runs, for the reasons.
    pub targets: String,
}

/// Plan evictions over the store as retention leaves it, in full: the
/// caller holds back what exceeds `max_removals`. `counts` cover exactly
/// the candidates.
pub fn decide(inputs: &Inputs, candidates: &[Evictable], mut counts: LayerCounts) -> Decided {
    let s = inputs.storage;
    let now_bytes = counts.bytes();
    let before = inputs.image_bytes_before.max(now_bytes);
    let freed_by_retention = before - now_bytes;
    let mut pressure = Pressure {
        image_bytes: before,
        freed_by_retention,
        disk: inputs.disk.cloned(),
        disk_error: inputs.disk_error.map(str::to_string),
        ..Pressure::default()
    };

    let mut why = Vec::new();
    let mut to_free = 0u64;
    if let Some(max) = s.max_size {
        if now_bytes > max {
            to_free = to_free.max(now_bytes - max);
            why.push(format!(
                "images take {} > max_size {}",
                human_bytes(now_bytes),
                human_bytes(max)
            ));
        } else {
            why.push(format!(
                "images take {} of max_size {}",
                human_bytes(now_bytes),
                human_bytes(max)
            ));
        }
    }
    if let (Some(high), Some(low)) = (s.high_watermark, s.low_watermark) {
        match inputs.disk {
            Some(d) if d.total > 0 => {
                let used_after = d.used().saturating_sub(freed_by_retention);
                let pct = used_after as f64 * 100.0 / d.total as f64;
                if pct > high {
                    let low_bytes = (low / 100.0 * d.total as f64) as u64;
                    to_free = to_free.max(used_after.saturating_sub(low_bytes));
                    why.push(format!(
                        "{} at {pct:.1}% > high_watermark {high}%: down to low_watermark {low}%",
                        d.path
                    ));
                } else {
                    why.push(format!("{} at {pct:.1}% (high_watermark {high}%)", d.path));
                }
            }
            _ => why.push(format!(
                "watermarks not evaluated: {}",
                inputs.disk_error.unwrap_or("no filesystem information")
            )),
        }
    }
    pressure.to_free = to_free;

    let mut evictions = Vec::new();
    let targets = why.join("; ");
    if to_free > 0 {
        // Candidates come in image id order: their index breaks ties.
        let mut order: Vec<(i64, i64, usize)> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.protection.is_none())
            .map(|(k, c)| match s.order {
                EvictOrder::Lru => (c.activity, c.image.created, k),
                EvictOrder::Created => (c.image.created, 0, k),
            })
            .collect();
        order.sort_unstable();
        let mut freed = 0u64;
        for k in order.into_iter().map(|(_, _, k)| k) {
            if freed >= to_free {
                break;
            }
            let c = &candidates[k];
            let bytes = counts.remove(c.counted);
            freed += bytes;
            evictions.push(Eviction {
                candidate: k,
                bytes,
            });
        }
        if freed < to_free {
            let mut by_rule: HashMap<String, u64> = HashMap::default();
            let mut protected_bytes = 0;
            for c in candidates {
                if let Some(rule) = c.protection {
                    // Bytes only this image holds among the remaining ones.
                    let own = counts.own_bytes(c.counted);
                    *by_rule.entry(rule.to_string()).or_default() += own;
                    protected_bytes += own;
                }
            }
            let mut protected_by: Vec<(String, u64)> = by_rule.into_iter().collect();
            protected_by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            pressure.shortfall = Some(Shortfall {
                bytes: to_free - freed,
                protected_bytes,
                protected_by,
            });
        }
    }
    let mut prune = None;
    if let Some(max) = s.build_cache_max
        && let Some(size) = inputs.build_cache
    {
        pressure.build_cache = Some((size, max));
        if size > max {
            prune = Some(Prune { size, max });
        }
    }
    pressure.summary = targets.clone();
    Decided {
        evictions,
        prune,
        pressure,
        targets,
    }
}

impl Pressure {
    /// One line for logs and the audit log when the target is out of reach.
    pub fn shortfall_message(&self) -> Option<String> {
        let s = self.shortfall.as_ref()?;
        let by: Vec<String> = s
            .protected_by
            .iter()
            .map(|(rule, b)| format!("{rule}: {}", human_bytes(*b)))
            .collect();
        Some(format!(
            "storage target out of reach: {} still to free after evicting every unprotected image; {} protected ({})",
            human_bytes(s.bytes),
            human_bytes(s.protected_bytes),
            if by.is_empty() {
                "none".to_string()
            } else {
                by.join(", ")
            }
        ))
    }
}
