//! The store, indexed once per plan so that every later step is a walk over
//! arrays: images in id order, one entry per reference (dangling images
//! first) in reference order, repositories as contiguous runs of entries,
//! and distinct tags, so that a tag pattern or a semver parse runs once per
//! distinct tag rather than once per reference and rule.
//!
//! Sorting compares fixed-size prefixes held in the sorted elements first:
//! comparing the strings themselves chases a pointer per comparison, which at
//! 100k references is most of the planner's time.

use std::cmp::{Ordering, Reverse};

use rustc_hash::FxHashMap as HashMap;

use crate::engine::{Container, Image};
use crate::policy::{Globs, Policy};
use crate::refs::{Naming, split_tag};
use crate::state::{ImageState, State};

use crate::fmt::{human_duration, short_id as short};

use super::parse_semver;

/// One reference (or a dangling image) in the store.
pub(super) struct Entry<'a> {
    /// `None` for a dangling image.
    pub reference: Option<&'a str>,
    pub tag: &'a str,
    /// Index into `Index::images`.
    pub img: usize,
    /// Index into `Index::tags`.
    pub tag_id: usize,
}

/// The repository index of the dangling images' retention group.
pub(super) const DANGLING: usize = usize::MAX;

/// Per-image facts derived once.
pub(super) struct ImageFacts {
    /// Latest of creation, first seen, last used, last pulled.
    pub activity: i64,
    /// Image-level protection: (rule, reason).
    pub protection: Option<(String, String)>,
}

/// The images in id order (string order), sorted on numeric id prefixes.
pub(super) struct Sorted<'a> {
    pub images: Vec<&'a Image>,
    /// Where each image of the input (by its position there) sits in `images`.
    pub positions: Vec<usize>,
    /// Per image: the sort key of its id (see `prefix_key`), and how much
    /// of every id the keys skip (`sha256:`): finding an id compares
    /// numbers in one array, and strings only on a tie.
    keys: Vec<u64>,
    skip: usize,
}

impl<'a> Sorted<'a> {
    pub fn new(all: &'a [Image]) -> Self {
        // Ids are `sha256:` and hex: key on what follows the common prefix.
        let skip = if all.iter().all(|i| i.id.starts_with("sha256:")) {
            7
        } else {
            0
        };
        let mut order: Vec<(u64, usize)> = all
            .iter()
            .enumerate()
            .map(|(k, i)| (prefix_key(&i.id.as_bytes()[skip..]), k))
            .collect();
        order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| all[a.1].id.cmp(&all[b.1].id)));
        let mut positions = vec![0; all.len()];
        for (sorted, &(_, k)) in order.iter().enumerate() {
            positions[k] = sorted;
        }
        Sorted {
            images: order.iter().map(|&(_, k)| &all[k]).collect(),
            positions,
            keys: order.iter().map(|&(key, _)| key).collect(),
            skip,
        }
    }

    fn ids(&self) -> Ids<'_, 'a> {
        Ids {
            images: &self.images,
            keys: &self.keys,
            skip: self.skip,
        }
    }
}

pub(super) struct Index<'a> {
    /// Sorted by id (string order).
    pub images: &'a [&'a Image],
    sorted: &'a Sorted<'a>,
    pub facts: Vec<ImageFacts>,
    /// Per image: creation time, and whether it has references.
    pub created: Vec<i64>,
    pub named: Vec<bool>,
    /// Dangling images first (by id), then references in order.
    pub entries: Vec<Entry<'a>>,
    /// Repositories in reference order.
    pub repos: Vec<&'a str>,
    /// Entries of repository `r` are `entries[starts[r]..starts[r + 1]]`;
    /// dangling images are `entries[..starts[0]]`.
    pub starts: Vec<usize>,
    /// Distinct tags.
    pub tags: Vec<&'a str>,
    /// Per tag: its rank among the semver tags (1 = oldest), 0 when not semver.
    semver_rank: Vec<u32>,
    /// Per entry: the first `[[protect]]` entry (index) that matches it.
    pub protect: Vec<Option<usize>>,
    /// How the engine names images: which other name each repository
    /// answers to in the policy's globs.
    naming: Naming,
}

/// The first eight bytes as a big-endian number, zero-padded: ordering by it
/// agrees with ordering by the bytes, ties aside.
fn prefix_key(b: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    let n = b.len().min(8);
    k[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(k)
}

/// Repositories in the order of their references: `a` before `a-b` exactly
/// when `a:` sorts before `a-b:`.
fn cmp_repo(a: &str, b: &str) -> Ordering {
    a.bytes()
        .chain(std::iter::once(b':'))
        .cmp(b.bytes().chain(std::iter::once(b':')))
}

/// Whether a pattern matches each distinct tag, worked out on first use.
pub(super) struct TagMemo(Vec<u8>);

impl TagMemo {
    pub fn new(tags: usize) -> Self {
        TagMemo(vec![0; tags])
    }
    pub fn get(&mut self, id: usize, tag: &str, test: impl FnOnce(&str) -> bool) -> bool {
        match self.0[id] {
            1 => true,
            2 => false,
            _ => {
                let hit = test(tag);
                self.0[id] = if hit { 1 } else { 2 };
                hit
            }
        }
    }
}

impl<'a> Index<'a> {
    /// `known` gives [`known`] of the same images: it is asked for once the
    /// references are indexed, so that another thread may work it out
    /// meanwhile.
    pub fn build<'k>(
        policy: &Policy,
        naming: Naming,
        all: &'a [Image],
        sorted: &'a Sorted<'a>,
        known: impl FnOnce() -> Known<'k>,
    ) -> Self {
        let images = &sorted.images;
        let positions = &sorted.positions;

        // Intern repositories and tags.
        #[derive(Clone, Copy)]
        struct Raw<'a> {
            repo: usize,
            key: u64,
            tag: &'a str,
            tag_id: usize,
            img: usize,
            reference: &'a str,
        }
        let mut repo_ids: HashMap<&str, usize> = HashMap::default();
        let mut repo_names: Vec<&str> = Vec::new();
        let mut tag_ids: HashMap<&str, usize> = HashMap::default();
        let mut tags: Vec<&str> = vec![""];
        tag_ids.insert("", 0);
        let mut raw: Vec<Raw> = Vec::with_capacity(all.len() * 2);
        let mut created = vec![0; all.len()];
        let mut named = vec![false; all.len()];
        // Images of one repository often come together: the last one found
        // spares a hash lookup.
        let mut last: Option<(&str, usize)> = None;
        for (img, &k) in all.iter().zip(positions) {
            created[k] = img.created;
            named[k] = !img.repo_tags.is_empty();
            for r in &img.repo_tags {
                let (repo, tag) = split_tag(r);
                let tag = tag.unwrap_or("");
                let repo = match last {
                    Some((name, id)) if name == repo => id,
                    _ => {
                        let id = *repo_ids.entry(repo).or_insert_with(|| {
                            repo_names.push(repo);
                            repo_names.len() - 1
                        });
                        last = Some((repo, id));
                        id
                    }
                };
                let tag_id = *tag_ids.entry(tag).or_insert_with(|| {
                    tags.push(tag);
                    tags.len() - 1
                });
                raw.push(Raw {
                    repo,
                    key: prefix_key(tag.as_bytes()),
                    tag,
                    tag_id,
                    img: k,
                    reference: r,
                });
            }
        }
        let dangling: Vec<usize> = (0..images.len()).filter(|&k| !named[k]).collect();
        let mut by_name: Vec<usize> = (0..repo_names.len()).collect();
        by_name.sort_unstable_by(|&a, &b| cmp_repo(repo_names[a], repo_names[b]));
        let mut rank = vec![0; repo_names.len()];
        for (r, &id) in by_name.iter().enumerate() {
            rank[id] = r;
        }
        let repos: Vec<&str> = by_name.iter().map(|&id| repo_names[id]).collect();
        // References by repository (a counting sort), then by tag within
        // each: many small sorts rather than one large one. Same repository
        // and tag: same reference. Equal references on different images
        // stay, in image id order.
        let mut from = vec![0usize; repos.len() + 1];
        for e in &mut raw {
            e.repo = rank[e.repo];
            from[e.repo + 1] += 1;
        }
        for r in 0..repos.len() {
            from[r + 1] += from[r];
        }
        let mut bucketed = raw.clone();
        let mut next = from.clone();
        for e in &raw {
            bucketed[next[e.repo]] = *e;
            next[e.repo] += 1;
        }
        let mut raw = bucketed;
        for r in 0..repos.len() {
            raw[from[r]..from[r + 1]].sort_unstable_by(|a, b| {
                a.key
                    .cmp(&b.key)
                    .then_with(|| a.tag.cmp(b.tag))
                    .then(a.img.cmp(&b.img))
            });
        }
        raw.dedup_by(|a, b| a.repo == b.repo && a.img == b.img && a.tag == b.tag);

        let mut entries: Vec<Entry> = Vec::with_capacity(dangling.len() + raw.len());
        entries.extend(dangling.into_iter().map(|img| Entry {
            reference: None,
            tag: "",
            img,
            tag_id: 0,
        }));
        let mut starts = Vec::with_capacity(repos.len() + 1);
        for e in raw {
            while starts.len() <= e.repo {
                starts.push(entries.len());
            }
            entries.push(Entry {
                reference: Some(e.reference),
                tag: e.tag,
                img: e.img,
                tag_id: e.tag_id,
            });
        }
        while starts.len() <= repos.len() {
            starts.push(entries.len());
        }

        // Semver ranks: one parse per distinct tag, one sort of the versions.
        let mut versions: Vec<(semver::Version, usize)> = tags
            .iter()
            .enumerate()
            .filter_map(|(id, t)| parse_semver(t).map(|v| (v, id)))
            .collect();
        versions.sort_unstable();
        let mut semver_rank = vec![0u32; tags.len()];
        let mut r = 0u32;
        for (k, (v, id)) in versions.iter().enumerate() {
            if k == 0 || versions[k - 1].0 != *v {
                r += 1;
            }
            semver_rank[*id] = r;
        }

        let mut index = Index {
            images,
            sorted,
            facts: Vec::new(),
            created,
            named,
            entries,
            repos,
            starts,
            tags,
            semver_rank,
            protect: Vec::new(),
            naming,
        };
        index.protect = index.protections(policy);
        let min_age = i64::try_from(policy.daemon.min_age.as_secs()).unwrap_or(i64::MAX);
        index.facts = facts(known(), &index.prepulled(policy), min_age);
        index
    }

    /// Entries of repository `r`.
    pub fn repo_entries(&self, r: usize) -> std::ops::Range<usize> {
        self.starts[r]..self.starts[r + 1]
    }

    /// Per repository: whether the globs match it.
    pub fn mask(&self, globs: &Globs) -> Vec<bool> {
        // The trash's references are never in a rule's scope.
        self.repos
            .iter()
            .map(|r| globs.matches_repo(r, self.naming) && !crate::trash::is_trash_repo(r))
            .collect()
    }

    /// The entry of a reference (the first, should two images claim it).
    pub fn find(&self, reference: &str) -> Option<usize> {
        let (repo, tag) = split_tag(reference);
        self.find_in(repo, tag.unwrap_or(""))
    }

    pub fn find_in(&self, repo: &str, tag: &str) -> Option<usize> {
        let r = self
            .repos
            .binary_search_by(|probe| cmp_repo(probe, repo))
            .ok()?;
        let range = self.repo_entries(r);
        let run = &self.entries[range.clone()];
        let i = run.partition_point(|e| e.tag < tag);
        (i < run.len() && run[i].tag == tag).then_some(range.start + i)
    }

    /// The index of an image id.
    pub fn image(&self, id: &str) -> Option<usize> {
        self.sorted.ids().image(id)
    }

    /// Where each image of the input (by its position there) sits in `images`.
    pub fn positions(&self) -> &[usize] {
        &self.sorted.positions
    }

    /// Newest first, as a sort key of entry `i`: by semver when asked
    /// (non-semver tags last), then by creation. Ties are left to the
    /// caller (the entry index: reference order).
    pub fn newest(&self, i: usize, by_semver: bool) -> (Reverse<i64>, Reverse<i64>) {
        let e = &self.entries[i];
        let rank = if by_semver {
            i64::from(self.semver_rank[e.tag_id])
        } else {
            0
        };
        (Reverse(rank), Reverse(self.created[e.img]))
    }

    /// Per image: the first `[[prepull]]` entry naming it, by reference or
    /// by digest: a few lookups, not a comparison per image and entry.
    fn prepulled<'p>(&self, policy: &'p Policy) -> Vec<Option<&'p str>> {
        let mut out = vec![None; self.images.len()];
        for p in &policy.prepull {
            let image = p.image.as_str();
            if image.contains('@') {
                for (k, img) in self.images.iter().enumerate() {
                    if img.repo_digests.iter().any(|d| d == image) {
                        out[k].get_or_insert(image);
                    }
                }
            } else if let Some(i) = self.find(image) {
                // Should two images claim the reference, both are named.
                let same = |x: &Entry| x.reference == self.entries[i].reference;
                for e in self.entries[i..].iter().take_while(|x| same(x)) {
                    out[e.img].get_or_insert(image);
                }
            }
        }
        out
    }

    /// Per entry: the first `[[protect]]` entry matching its reference.
    fn protections(&self, policy: &Policy) -> Vec<Option<usize>> {
        let mut out = vec![None; self.entries.len()];
        for (p, rule) in policy.protect.iter().enumerate() {
            let mask = self.mask(&rule.scope.images);
            let mut memo = TagMemo::new(self.tags.len());
            for r in (0..self.repos.len()).filter(|&r| mask[r]) {
                for i in self.repo_entries(r) {
                    let e = &self.entries[i];
                    if out[i].is_none()
                        && rule
                            .scope
                            .tags
                            .as_ref()
                            .is_none_or(|t| memo.get(e.tag_id, e.tag, |s| t.is_match(s)))
                    {
                        out[i] = Some(p);
                    }
                }
            }
        }
        out
    }
}

/// Images in id order with their keys: finding an id compares numbers in
/// one array, and strings only on a tie.
#[derive(Clone, Copy)]
struct Ids<'i, 'a> {
    images: &'i [&'a Image],
    keys: &'i [u64],
    skip: usize,
}

impl Ids<'_, '_> {
    fn image(&self, id: &str) -> Option<usize> {
        let rest = if self.skip == 0 {
            id
        } else {
            id.strip_prefix("sha256:")?
        };
        let key = prefix_key(rest.as_bytes());
        let from = self.keys.partition_point(|&k| k < key);
        (from..self.keys.len())
            .take_while(|&k| self.keys[k] == key)
            .find(|&k| self.images[k].id == id)
    }

    /// An id against image `k`, in string order.
    fn cmp_id(&self, id: &str, k: usize) -> Ordering {
        let rest = if self.skip == 0 {
            Some(id)
        } else {
            id.strip_prefix("sha256:")
        };
        match rest {
            Some(r) => prefix_key(r.as_bytes())
                .cmp(&self.keys[k])
                .then_with(|| id.cmp(&self.images[k].id)),
            None => id.cmp(&self.images[k].id),
        }
    }
}

/// What the host knows of each image besides its references: when it was
/// first seen and last active, which containers use it, and whether a
/// `[[prepull]]` keeps it as a previous image. Needs only the image order,
/// so it can be worked out beside the rest of the index.
pub(super) struct Known<'a> {
    at: i64,
    first_seen: Vec<i64>,
    activity: Vec<i64>,
    /// The container (smallest id) using it, and how many do.
    users: Vec<(Option<&'a Container>, usize)>,
    previous: Vec<Option<(&'a str, usize)>>,
    /// Restored with `--protect`: held out of retention until then.
    held: Vec<Option<i64>>,
}

pub(super) fn known<'a>(
    sorted: &Sorted,
    policy: &'a Policy,
    containers: &'a [Container],
    state: &State,
    at: i64,
) -> Known<'a> {
    let ids = sorted.ids();
    let n = ids.images.len();
    let mut users: Vec<(Option<&Container>, usize)> = vec![(None, 0); n];
    for c in containers {
        if let Some(k) = ids.image(&c.image_id) {
            let u = &mut users[k];
            u.1 += 1;
            if u.0.is_none_or(|f| c.id < f.id) {
                u.0 = Some(c);
            }
        }
    }
    // Earlier images of a [[prepull]] entry, kept for rollback (newest first).
    let mut previous: Vec<Option<(&str, usize)>> = vec![None; n];
    for p in &policy.prepull {
        if let Some(ps) = state.prepull.get(&p.key()) {
            for id in ps.previous.iter().take(p.keep_previous) {
                if let Some(k) = ids.image(id) {
                    previous[k].get_or_insert((p.image.as_str(), p.keep_previous));
                }
            }
        }
    }
    // Images and the state are both in id order: walk them side by side
    // rather than search the state's tree once per image.
    // One comparison per step: each compares ids in full on a key tie.
    let mut known = state.images.iter();
    let mut next = known.next();
    let mut first_seen = Vec::with_capacity(n);
    let mut activity = Vec::with_capacity(n);
    for (k, img) in ids.images.iter().enumerate() {
        let mut st: Option<&ImageState> = None;
        while let Some((id, s)) = next {
            match ids.cmp_id(id, k) {
                Ordering::Less => next = known.next(),
                Ordering::Equal => {
                    st = Some(s);
                    break;
                }
                Ordering::Greater => break,
            }
        }
        let seen = st.map_or(img.created.min(at), |s| s.first_seen);
        first_seen.push(seen);
        activity.push(
            [
                Some(img.created),
                Some(seen),
                st.and_then(|s| s.last_used),
                st.and_then(|s| s.last_pulled),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(img.created),
        );
    }
    let held = if state.held.is_empty() {
        vec![None; n]
    } else {
        ids.images
            .iter()
            .map(|img| state.held.get(&img.id).copied())
            .collect()
    };
    Known {
        at,
        first_seen,
        activity,
        users,
        previous,
        held,
    }
}

/// Image-level protection, strongest first: in use, the current image of a
/// `[[prepull]]`, a previous one kept for rollback, younger than `min_age`.
fn facts(known: Known, prepulled: &[Option<&str>], min_age: i64) -> Vec<ImageFacts> {
    let Known {
        at,
        first_seen,
        activity,
        users,
        previous,
        held,
    } = known;
    (0..activity.len())
        .map(|k| {
            let protection = if let (Some(c), n) = users[k] {
                let more = if n > 1 {
                    format!(" and {} more", n - 1)
                } else {
                    String::new()
                };
                let name = if c.name.is_empty() {
                    String::new()
                } else {
                    format!(" \"{}\"", c.name)
                };
                Some((
                    "in-use".to_string(),
                    format!(
                        "in use by container {}{name} ({}){more}",
                        short(&c.id),
                        c.state
                    ),
                ))
            } else if let Some(p) = prepulled[k] {
                Some((
                    format!("prepull:{p}"),
                    format!("current image of [[prepull]] {p}"),
                ))
            } else if let Some((p, n)) = previous[k] {
                Some((
                    format!("prepull:{p}"),
                    format!(
                        "previous image of [[prepull]] {p}, kept for rollback (keep_previous={n})"
                    ),
                ))
            } else if at.saturating_sub(first_seen[k]) < min_age {
                Some((
                    "min_age".to_string(),
                    format!(
                        "seen on this host {} ago, younger than min_age={}",
                        human_duration(at - first_seen[k]),
                        human_duration(min_age)
                    ),
                ))
            } else {
                held[k].filter(|&t| t > at).map(|until| {
                    (
                        "restore".to_string(),
                        format!(
                            "restored with --protect: held out of retention for {} more",
                            human_duration(until - at)
                        ),
                    )
                })
            };
            ImageFacts {
                activity: activity[k],
                protection,
            }
        })
        .collect()
}
