//! Disk pressure, pure: which images eviction takes, in order, to bring the
//! images under `max_size` (unique bytes) or the data root's filesystem under
//! `low_watermark` once it is above `high_watermark`; and whether the build
//! cache needs pruning.
//!
//! Freed bytes come from layers: a layer's bytes are freed when the last image
//! holding it goes, so images sharing a base count it once, and no engine call
//! is needed after each removal to know where we stand.
//!
//! The content store counts too: its complete and partial bytes add to what
//! `max_size` limits (they are on disk because of images), and when it sits
//! on the data root's filesystem they are already in the watermarks' used
//! bytes. Under pressure it shrinks first, before any image goes: its
//! complete blobs are copies of what the engine holds, or downloads not yet
//! handed over, cheaper to lose than an image. Partial downloads and the
//! complete blobs unfinished downloads need are never shrunk.
//!
//! Only decisions come out of here (how far to shrink the content store,
//! what to evict, in which order, whether to prune the build cache, the
//! pressure found): `plan::evict` words them as the plan's actions.

use rustc_hash::FxHashMap as HashMap;
use serde::Serialize;

use crate::engine::{Image, Layer};
use crate::fmt::human_bytes;
use crate::observe::LayerMap;
use crate::policy::{EvictOrder, Storage};

// Re-exported under its old path (tests name it so).
pub use crate::observe::{Cache, Disk};

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
    /// The content store, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheBytes>,
}

/// The content store in the accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheBytes {
    pub complete: u64,
    pub partial: u64,
    /// Complete bytes unfinished downloads need: never shrunk.
    pub pinned: u64,
    /// Bytes of complete blobs the plan takes out, before any eviction.
    pub shrink: u64,
}

impl CacheBytes {
    pub fn total(&self) -> u64 {
        self.complete + self.partial
    }
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
    /// In the trash (or going there in this plan): when its window ends.
    /// Eviction empties the trash first, oldest first.
    pub trash: Option<i64>,
}

/// Everything eviction needs besides the candidates.
pub struct Inputs<'a> {
    pub storage: &'a Storage,
    /// Unique bytes of all images before the plan's retention removals.
    pub image_bytes_before: u64,
    pub disk: Option<&'a Disk>,
    pub disk_error: Option<&'a str>,
    pub build_cache: Option<u64>,
    /// The content store's bytes, and why they are unknown.
    pub cache: Option<&'a Cache>,
    pub cache_error: Option<&'a str>,
    /// The instant planned for (Unix seconds).
    pub at: i64,
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

/// Unique bytes of a set of images: each layer counted once (tests and
/// benchmarks; the planner counts with [`LayerCounts`]).
#[cfg(any(test, feature = "testkit"))]
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

/// Shrink the content store's complete blobs from `complete` to `keep`
/// bytes (least recently used first; what unfinished downloads need stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shrink {
    pub complete: u64,
    pub keep: u64,
}

/// What eviction decided.
pub struct Decided {
    /// A content-store shrink, before the evictions.
    pub shrink: Option<Shrink>,
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
    let after_retention = counts.bytes();
    let before = inputs.image_bytes_before.max(after_retention);
    let freed_by_retention = before - after_retention;
    let mut pressure = Pressure {
        image_bytes: before,
        freed_by_retention,
        disk: inputs.disk.cloned(),
        disk_error: inputs.disk_error.map(str::to_string),
        ..Pressure::default()
    };

    let cache = inputs.cache;
    let cache_bytes = cache.map_or(0, |c| c.complete + c.partial);
    // Said only when there is something to say: a plan without a content
    // store reads as before.
    let cache_words = if cache_bytes > 0 {
        format!(" + content store {}", human_bytes(cache_bytes))
    } else {
        String::new()
    };
    let mut why = Vec::new();
    // What must go for `max_size` (the content store helps) and for the
    // watermarks (it helps only on the data root's filesystem).
    let (mut for_size, mut for_disk) = (0u64, 0u64);
    if let Some(max) = s.max_size {
        let used = after_retention + cache_bytes;
        for_size = used.saturating_sub(max);
        let cmp = if used > max { ">" } else { "of" };
        why.push(format!(
            "images take {}{cache_words} {cmp} max_size {}",
            human_bytes(after_retention),
            human_bytes(max)
        ));
    }
    if let (Some(high), Some(low)) = (s.high_watermark, s.low_watermark) {
        match inputs.disk {
            Some(d) if d.total > 0 => {
                let used_after = d.used().saturating_sub(freed_by_retention);
                let pct = used_after as f64 * 100.0 / d.total as f64;
                // The content store is part of the used bytes when on the
                // same filesystem.
                let of_it = match cache {
                    Some(c) if c.on_data_root && cache_bytes > 0 => {
                        format!(", content store {} of it", human_bytes(cache_bytes))
                    }
                    _ => String::new(),
                };
                if pct > high {
                    let low_bytes = (low / 100.0 * d.total as f64) as u64;
                    for_disk = used_after.saturating_sub(low_bytes);
                    why.push(format!(
                        "{} at {pct:.1}%{of_it} > high_watermark {high}%: down to low_watermark {low}%",
                        d.path
                    ));
                } else {
                    why.push(format!(
                        "{} at {pct:.1}%{of_it} (high_watermark {high}%)",
                        d.path
                    ));
                }
            }
            _ => why.push(format!(
                "watermarks not evaluated: {}",
                inputs.disk_error.unwrap_or("no filesystem information")
            )),
        }
    }
    pressure.to_free = for_size.max(for_disk);
    // The content store shrinks first, as far as it may and as the targets
    // it helps need; images free the rest.
    let on_root = cache.is_some_and(|c| c.on_data_root);
    let reclaimable = cache.map_or(0, |c| c.complete.saturating_sub(c.pinned));
    let shrink = reclaimable.min(for_size.max(if on_root { for_disk } else { 0 }));
    let to_free = for_size
        .saturating_sub(shrink)
        .max(for_disk.saturating_sub(if on_root { shrink } else { 0 }));
    pressure.cache = cache.map(|c| CacheBytes {
        complete: c.complete,
        partial: c.partial,
        pinned: c.pinned.min(c.complete),
        shrink,
    });

    let mut evictions = Vec::new();
    let targets = why.join("; ");
    if to_free > 0 {
        // Candidates come in image id order: their index breaks ties.
        // The trash first (oldest first), then the rest in the policy's order.
        let mut order: Vec<((bool, i64), i64, i64, usize)> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.protection.is_none())
            .map(|(k, c)| {
                let trash = (c.trash.is_none(), c.trash.unwrap_or(0));
                match s.order {
                    EvictOrder::Lru => (trash, c.activity, c.image.created, k),
                    EvictOrder::Created => (trash, c.image.created, 0, k),
                }
            })
            .collect();
        order.sort_unstable();
        let mut freed = 0u64;
        for k in order.into_iter().map(|(_, _, _, k)| k) {
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
    pressure.summary = match inputs.cache_error {
        Some(e) if targets.is_empty() => e.to_string(),
        Some(e) => format!("{targets}; {e}"),
        None => targets.clone(),
    };
    Decided {
        shrink: cache.filter(|_| shrink > 0).map(|c| Shrink {
            complete: c.complete,
            keep: c.complete - shrink,
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn image(id: &str, created: i64, size: u64) -> Image {
        Image {
            id: id.to_owned(),
            repo_tags: vec![format!("{id}:1")],
            repo_digests: vec![],
            created,
            size,
        }
    }

    fn layers(spec: &[(&str, u64)]) -> Vec<Layer> {
        spec.iter()
            .map(|(id, mb)| Layer {
                chain_id: (*id).to_owned(),
                size: mb * MB,
            })
            .collect()
    }

    fn storage(max_size: Option<u64>, order: EvictOrder) -> Storage {
        Storage {
            max_size,
            high_watermark: None,
            low_watermark: None,
            order,
            build_cache_max: None,
        }
    }

    fn inputs(storage: &Storage) -> Inputs<'_> {
        Inputs {
            storage,
            image_bytes_before: 0,
            disk: None,
            disk_error: None,
            build_cache: None,
            cache: None,
            cache_error: None,
            at: 1_000_000,
        }
    }

    /// Three images on one 50 MB base, each with a 10 MB layer of its own.
    fn shared_base() -> (Vec<Image>, LayerMap) {
        let images = vec![
            image("a", 10, 60 * MB),
            image("b", 20, 60 * MB),
            image("c", 30, 60 * MB),
        ];
        let mut map = LayerMap::default();
        for i in &images {
            let own = format!("own-{}", i.id);
            map.insert(i.id.clone(), layers(&[("base", 50), (&own, 10)]));
        }
        (images, map)
    }

    fn candidates<'a>(images: &'a [Image], activity: &[i64]) -> Vec<Evictable<'a>> {
        images
            .iter()
            .zip(activity)
            .enumerate()
            .map(|(k, (image, &activity))| Evictable {
                image,
                counted: k,
                first_tag: image.repo_tags.first().map(String::as_str),
                tags: image.repo_tags.len(),
                activity,
                protection: None,
                trash: None,
            })
            .collect()
    }

    #[test]
    fn a_shared_layer_counts_once_and_is_freed_with_its_last_image() {
        let (images, map) = shared_base();
        assert_eq!(unique_bytes(&map, &images), 80 * MB);
        let mut counts = LayerCounts::count(&images, &map);
        assert_eq!(counts.remove(0), 10 * MB, "only its own layer");
        assert_eq!(counts.remove(1), 10 * MB);
        assert_eq!(counts.remove(2), 60 * MB, "the last one takes the base");
        assert_eq!(counts.bytes(), 0);
    }

    #[test]
    fn an_image_without_known_layers_is_one_layer_of_its_size() {
        let images = vec![image("a", 0, 7 * MB), image("b", 0, 3 * MB)];
        assert_eq!(unique_bytes(&LayerMap::default(), &images), 10 * MB);
    }

    #[test]
    fn under_max_size_nothing_is_evicted() {
        let (images, map) = shared_base();
        let s = storage(Some(80 * MB), EvictOrder::Lru);
        let c = candidates(&images, &[3, 2, 1]);
        let out = decide(&inputs(&s), &c, LayerCounts::count(&images, &map));
        assert!(out.evictions.is_empty());
        assert_eq!(out.pressure.to_free, 0);
        assert_eq!(out.pressure.image_bytes, 80 * MB);
        assert!(out.pressure.shortfall.is_none());
    }

    #[test]
    fn lru_takes_the_least_recently_active_until_under_max_size() {
        let (images, map) = shared_base();
        // 80 MB against 65 MB: two own layers (10 MB each) must go.
        let s = storage(Some(65 * MB), EvictOrder::Lru);
        let c = candidates(&images, &[300, 100, 200]);
        let out = decide(&inputs(&s), &c, LayerCounts::count(&images, &map));
        assert_eq!(out.pressure.to_free, 15 * MB);
        let taken: Vec<(usize, u64)> = out
            .evictions
            .iter()
            .map(|e| (e.candidate, e.bytes))
            .collect();
        assert_eq!(taken, vec![(1, 10 * MB), (2, 10 * MB)]);
    }

    #[test]
    fn created_order_ignores_activity() {
        let (images, map) = shared_base();
        let s = storage(Some(75 * MB), EvictOrder::Created);
        // "a" was active last, but it is the oldest created.
        let c = candidates(&images, &[900, 100, 200]);
        let out = decide(&inputs(&s), &c, LayerCounts::count(&images, &map));
        let taken: Vec<usize> = out.evictions.iter().map(|e| e.candidate).collect();
        assert_eq!(taken, vec![0]);
    }

    #[test]
    fn protected_images_stay_and_the_shortfall_names_their_rule() {
        let (images, map) = shared_base();
        let s = storage(Some(10 * MB), EvictOrder::Lru);
        let mut c = candidates(&images, &[1, 2, 3]);
        c[2].protection = Some("keep-c");
        let out = decide(&inputs(&s), &c, LayerCounts::count(&images, &map));
        let taken: Vec<usize> = out.evictions.iter().map(|e| e.candidate).collect();
        assert_eq!(taken, vec![0, 1], "every unprotected image, never c");
        let short = out.pressure.shortfall.as_ref().expect("60 MB remain");
        // c holds the base alone now: 60 MB against a 10 MB target.
        assert_eq!(short.bytes, 50 * MB);
        assert_eq!(short.protected_bytes, 60 * MB);
        assert_eq!(short.protected_by, vec![("keep-c".to_owned(), 60 * MB)]);
        let message = out.pressure.shortfall_message().unwrap();
        assert!(message.contains("keep-c"), "{message}");
    }

    #[test]
    fn watermarks_free_down_to_the_low_mark_counting_retention() {
        let (images, map) = shared_base();
        let s = Storage {
            high_watermark: Some(90.0),
            low_watermark: Some(80.0),
            ..storage(None, EvictOrder::Lru)
        };
        // 950 of 1000 MB used; retention already frees 20 MB (100 MB of
        // images before it, 80 MB now): 930 MB, above 90%, down to 800 MB.
        let disk = Disk {
            path: "/var/lib/docker".to_owned(),
            total: 1000 * MB,
            available: 50 * MB,
        };
        let i = Inputs {
            disk: Some(&disk),
            image_bytes_before: 100 * MB,
            ..inputs(&s)
        };
        let c = candidates(&images, &[1, 2, 3]);
        let out = decide(&i, &c, LayerCounts::count(&images, &map));
        assert_eq!(out.pressure.freed_by_retention, 20 * MB);
        assert_eq!(out.pressure.to_free, 130 * MB);
        assert!(
            out.pressure.summary.contains("> high_watermark 90%"),
            "{}",
            out.pressure.summary
        );
        // All three together free 80 MB: not enough, and nothing protected.
        assert_eq!(out.evictions.len(), 3);
        assert_eq!(out.pressure.shortfall.as_ref().unwrap().bytes, 50 * MB);
    }

    #[test]
    fn watermarks_without_a_disk_say_why() {
        let (images, map) = shared_base();
        let s = Storage {
            high_watermark: Some(90.0),
            low_watermark: Some(80.0),
            ..storage(None, EvictOrder::Lru)
        };
        let i = Inputs {
            disk_error: Some("the engine is not on this host"),
            ..inputs(&s)
        };
        let c = candidates(&images, &[1, 2, 3]);
        let out = decide(&i, &c, LayerCounts::count(&images, &map));
        assert!(out.evictions.is_empty());
        assert_eq!(
            out.pressure.summary,
            "watermarks not evaluated: the engine is not on this host"
        );
    }

    #[test]
    fn the_build_cache_is_reported_against_its_maximum() {
        let s = Storage {
            build_cache_max: Some(100 * MB),
            ..storage(None, EvictOrder::Lru)
        };
        for (size, due) in [(100 * MB, false), (101 * MB, true)] {
            let i = Inputs {
                build_cache: Some(size),
                ..inputs(&s)
            };
            let out = decide(&i, &[], LayerCounts::count(&[], &LayerMap::default()));
            assert_eq!(out.pressure.build_cache, Some((size, 100 * MB)));
            assert_eq!(out.prune.is_some(), due, "{size}");
        }
    }

    fn cache(complete: u64, partial: u64, pinned: u64, on_data_root: bool) -> Cache {
        Cache {
            complete: complete * MB,
            partial: partial * MB,
            pinned: pinned * MB,
            on_data_root,
        }
    }

    #[test]
    fn the_content_store_counts_toward_max_size_and_shrinks_before_any_eviction() {
        let (images, map) = shared_base();
        // 80 MB of images + 30 MB of store against 100 MB: 10 MB to free,
        // all from the store's complete blobs.
        let s = storage(Some(100 * MB), EvictOrder::Lru);
        let c = cache(25, 5, 0, false);
        let i = Inputs {
            cache: Some(&c),
            ..inputs(&s)
        };
        let cands = candidates(&images, &[1, 2, 3]);
        let out = decide(&i, &cands, LayerCounts::count(&images, &map));
        assert!(out.evictions.is_empty(), "no image goes");
        assert_eq!(
            out.shrink,
            Some(Shrink {
                complete: 25 * MB,
                keep: 15 * MB
            })
        );
        assert_eq!(out.pressure.to_free, 10 * MB);
        assert_eq!(out.pressure.image_bytes, 80 * MB, "images alone");
        assert_eq!(out.pressure.cache.unwrap().shrink, 10 * MB);
        assert_eq!(
            out.targets,
            "images take 80.0 MB + content store 30.0 MB > max_size 100.0 MB"
        );
    }

    #[test]
    fn partials_and_unfinished_downloads_stay_and_images_free_the_rest() {
        let (images, map) = shared_base();
        // 80 MB of images + 40 MB of store (30 complete, 10 of them for an
        // unfinished download; 10 partial) against 85 MB: 35 MB to free.
        // The store gives its 20 MB that may go, images the other 15 MB.
        let s = storage(Some(85 * MB), EvictOrder::Lru);
        let c = cache(30, 10, 10, false);
        let i = Inputs {
            cache: Some(&c),
            ..inputs(&s)
        };
        let cands = candidates(&images, &[300, 100, 200]);
        let out = decide(&i, &cands, LayerCounts::count(&images, &map));
        assert_eq!(
            out.shrink,
            Some(Shrink {
                complete: 30 * MB,
                keep: 10 * MB
            })
        );
        let taken: Vec<usize> = out.evictions.iter().map(|e| e.candidate).collect();
        assert_eq!(taken, vec![1, 2], "two own layers of 10 MB for 15 MB");
        assert!(out.pressure.shortfall.is_none());
    }

    #[test]
    fn a_store_only_of_what_must_stay_is_counted_but_not_shrunk() {
        let (images, map) = shared_base();
        let s = storage(Some(10 * MB), EvictOrder::Lru);
        let mut cands = candidates(&images, &[1, 2, 3]);
        for c in &mut cands {
            c.protection = Some("keep");
        }
        let c = cache(5, 5, 5, false);
        let i = Inputs {
            cache: Some(&c),
            ..inputs(&s)
        };
        let out = decide(&i, &cands, LayerCounts::count(&images, &map));
        assert_eq!(out.shrink, None);
        // 90 MB against 10 MB, nothing may go: the shortfall says all of it.
        assert_eq!(out.pressure.shortfall.unwrap().bytes, 80 * MB);
    }

    #[test]
    fn on_the_data_root_the_store_shrinks_for_the_watermarks_elsewhere_not() {
        let (images, map) = shared_base();
        let s = Storage {
            high_watermark: Some(90.0),
            low_watermark: Some(80.0),
            ..storage(None, EvictOrder::Lru)
        };
        // 950 of 1000 MB used: 150 MB to free down to 80%.
        let disk = Disk {
            path: "/var/lib/docker".to_owned(),
            total: 1000 * MB,
            available: 50 * MB,
        };
        let cands = candidates(&images, &[1, 2, 3]);
        for (on_root, shrunk, evicted) in [(true, 140 * MB, 1), (false, 0, 3)] {
            let c = cache(140, 0, 0, on_root);
            let i = Inputs {
                disk: Some(&disk),
                cache: Some(&c),
                ..inputs(&s)
            };
            let out = decide(&i, &cands, LayerCounts::count(&images, &map));
            assert_eq!(out.pressure.to_free, 150 * MB);
            assert_eq!(out.shrink.map_or(0, |s| s.complete - s.keep), shrunk);
            // The 10 MB left (on the root) or all 150 MB: images.
            assert_eq!(out.evictions.len(), evicted, "on the data root: {on_root}");
            assert_eq!(
                out.targets.contains("content store 140.0 MB of it"),
                on_root,
                "{}",
                out.targets
            );
        }
    }

    #[test]
    fn an_unreadable_store_is_said_in_the_summary_and_counts_nothing() {
        let (images, map) = shared_base();
        let s = storage(Some(80 * MB), EvictOrder::Lru);
        let i = Inputs {
            cache_error: Some("content store not counted: /c is not a content store"),
            ..inputs(&s)
        };
        let cands = candidates(&images, &[1, 2, 3]);
        let out = decide(&i, &cands, LayerCounts::count(&images, &map));
        assert!(out.evictions.is_empty() && out.shrink.is_none());
        assert_eq!(
            out.pressure.summary,
            "images take 80.0 MB of max_size 80.0 MB; content store not counted: /c is not a content store"
        );
        assert_eq!(out.targets, "images take 80.0 MB of max_size 80.0 MB");
    }
}
