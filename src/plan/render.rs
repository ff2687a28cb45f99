//! A plan for people: stable text, so tests can compare it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::fmt::{human_bytes, short_id as short};
use crate::refs::split_tag;

use super::{Action, Kind, Plan};

/// Render a plan for people: actions grouped by repository, then what is
/// protected and why, then warnings. Stable, so tests can compare text.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    // Dangling images and the build cache sort after every repository
    // ("~" > any name character).
    let group_of = |a: &Action| -> String {
        match (&a.reference, a.kind) {
            (_, Kind::PruneBuild) => "~~".to_string(),
            (_, Kind::PruneCache) => "~~~".to_string(),
            (Some(r), _) => split_tag(r).0.to_string(),
            (None, _) => "~".to_string(),
        }
    };
    let fmt_ref = |r: &Option<String>, img: &str| -> String {
        r.clone()
            .unwrap_or_else(|| format!("<none> {}", short(img)))
    };
    if plan.is_empty() {
        out.push_str("nothing to do\n");
    } else {
        let mut groups: BTreeMap<String, Vec<(&Action, bool)>> = BTreeMap::new();
        for a in &plan.actions {
            groups.entry(group_of(a)).or_default().push((a, false));
        }
        for a in &plan.deferred {
            groups.entry(group_of(a)).or_default().push((a, true));
        }
        for (repo, actions) in groups {
            let heading = match repo.as_str() {
                "~" => "<dangling>",
                "~~" => "<build cache>",
                "~~~" => "<content store>",
                r => r,
            };
            let _ = writeln!(out, "{heading}");
            for (a, deferred) in actions {
                let what = if deferred {
                    format!("{} (deferred)", a.kind.as_str())
                } else {
                    a.kind.as_str().to_string()
                };
                let bytes = a
                    .bytes
                    .map(|b| format!(" [{}]", human_bytes(b)))
                    .unwrap_or_default();
                let target = if a.kind == Kind::Tag {
                    format!(" -> {}", short(&a.image))
                } else {
                    String::new()
                };
                let name = match a.kind {
                    Kind::PruneBuild => "build cache".to_string(),
                    Kind::PruneCache => "content store".to_string(),
                    _ => fmt_ref(&a.reference, &a.image),
                };
                let _ = writeln!(
                    out,
                    "  {what:<8} {name}{target}{bytes}  ({}: {})",
                    a.rule, a.reason
                );
            }
        }
    }
    if let Some(p) = &plan.pressure {
        let _ = writeln!(
            out,
            "storage: images {} (unique bytes); {}",
            human_bytes(p.image_bytes),
            p.summary
        );
        if p.to_free > 0 {
            let evicted: u64 = plan
                .actions
                .iter()
                .filter(|a| a.kind == Kind::Evict)
                .filter_map(|a| a.bytes)
                .sum();
            let shrunk = match p.cache {
                Some(c) if c.shrink > 0 => format!(", content store {}", human_bytes(c.shrink)),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  to free {}: retention frees {}{shrunk}, eviction {}",
                human_bytes(p.to_free + p.freed_by_retention),
                human_bytes(p.freed_by_retention),
                human_bytes(evicted)
            );
        }
        if let Some(c) = p.cache.filter(|c| c.total() > 0) {
            let pinned = if c.pinned > 0 {
                format!(", {} of it for unfinished downloads", human_bytes(c.pinned))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  content store {}: complete blobs {}{pinned}, partial downloads {}",
                human_bytes(c.total()),
                human_bytes(c.complete),
                human_bytes(c.partial)
            );
        }
        if let Some(msg) = p.shortfall_message() {
            let _ = writeln!(out, "  {msg}");
        }
        if let Some((size, max)) = p.build_cache {
            let _ = writeln!(
                out,
                "  build cache {} (build_cache_max {})",
                human_bytes(size),
                human_bytes(max)
            );
        }
    }
    if !plan.protected.is_empty() {
        out.push_str("protected\n");
        for p in &plan.protected {
            let prevented = p
                .prevented
                .as_ref()
                .map(|x| format!(" (would otherwise go: {x})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}  ({}: {}){prevented}",
                fmt_ref(&p.reference, &p.image),
                p.rule,
                p.reason
            );
        }
    }
    if !plan.warnings.is_empty() {
        out.push_str("warnings\n");
        for w in &plan.warnings {
            let _ = writeln!(
                out,
                "  {}  ({}: {})",
                fmt_ref(&w.reference, &w.image),
                w.rule,
                w.reason
            );
        }
    }
    let removed: u64 = plan.actions.iter().filter_map(|a| a.bytes).sum();
    let count = |k: Kind| plan.actions.iter().filter(|a| a.kind == k).count();
    let mut evict = if plan.pressure.is_some() {
        format!(", {} evict", count(Kind::Evict))
    } else {
        String::new()
    };
    if count(Kind::Trash) > 0 {
        evict.push_str(&format!(", {} to the trash", count(Kind::Trash)));
    }
    let _ = writeln!(
        out,
        "summary: {} tag, {} untag, {} remove{evict} ({} freed), {} deferred, {} protected, {} warnings",
        count(Kind::Tag),
        count(Kind::Untag),
        count(Kind::Remove),
        human_bytes(removed),
        plan.deferred_count(),
        plan.protected.len(),
        plan.warnings.len()
    );
    out
}
