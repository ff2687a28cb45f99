//! Pure: what each `[[prepull]]` entry and each reference in a `[[mirror]]`
//! scope needs this reconcile ([`pull_intents`], [`push_intents`]), and, once
//! a registry answered a digest, which step remains ([`decide_pull`],
//! [`push_needed`]). No I/O, no clock: `now` is passed in.

use serde::Serialize;

use super::backoff::{Waiting, backing_off, refresh_due};
use crate::engine::Image;
use crate::observe::Observed;
use crate::policy::{Policy, Prepull, Refresh};
use crate::refs::{self, DEFAULT_REGISTRY, canonical_registry, split_tag};
use crate::state::State;

/// One registry to try for a pre-pull, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// `host[:port]`.
    pub registry: String,
    /// The repository as named at that registry, e.g. `mirror:5000/library/nginx`.
    pub repository: String,
    /// Why this registry may not be used (`allowed_registries`), if so.
    pub refused: Option<String>,
}

/// What one `[[prepull]]` entry needs this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullIntent {
    /// State key ([`Prepull::key`]).
    pub key: String,
    /// Backoff key ([`pull_key`]).
    pub backoff_key: String,
    /// The canonical reference as written in the policy.
    pub reference: String,
    /// `repo:tag` to point at the result; `None` for an image given by digest.
    pub tag_ref: Option<String>,
    /// Only this manifest digest is accepted (the `digest` pin, or the
    /// digest the image is written with).
    pub pin: Option<String>,
    pub platform: Option<String>,
    pub candidates: Vec<Candidate>,
    /// The image currently holding the reference, if any.
    pub current: Option<String>,
    /// Manifest digests (`sha256:…`) known for the current image.
    pub current_digests: Vec<String>,
    pub keep_previous: usize,
    /// The `rule` field of audit records: `prepull:<image>`.
    pub rule: String,
    /// Why a transfer may be needed, for people.
    pub reason: String,
}

/// What one local reference in a `[[mirror]]` scope needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushIntent {
    /// Backoff key: `push <target>`.
    pub key: String,
    /// The local reference replicated.
    pub source: String,
    /// Its image id.
    pub image: String,
    /// Manifest digests (`sha256:…`) known for the image.
    pub digests: Vec<String>,
    /// `<registry>/[<prefix>/]<path>:<tag>`.
    pub target: String,
    pub registry: String,
    /// Whether `target` already names this image locally (then it is no
    /// temporary tag and stays after the push).
    pub target_tagged: bool,
    pub refused: Option<String>,
    /// The mirror's name.
    pub rule: String,
}

/// The pre-pulls needed now, and those held back by backoff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullIntents {
    pub due: Vec<PullIntent>,
    pub waiting: Vec<Waiting>,
    /// Keys whose refresh check is due (their `last_checked` moves to now).
    pub checked: Vec<String>,
}

/// The mirror pushes to check now, and those held back by backoff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushIntents {
    pub due: Vec<PushIntent>,
    pub waiting: Vec<Waiting>,
}

/// The digest part of `repo@sha256:…` entries.
fn digests_of(image: &Image) -> Vec<String> {
    let mut v: Vec<String> = image
        .repo_digests
        .iter()
        .filter_map(|d| d.split_once('@').map(|(_, d)| d.to_owned()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether `registry` may be used; `Some(reason)` when it may not.
pub fn refusal(policy: &Policy, registry: &str) -> Option<String> {
    let allowed = policy.daemon.allowed_registries.as_ref()?;
    let canonical = canonical_registry(registry);
    (!allowed.contains(&canonical)).then(|| {
        format!(
            "registry {registry} is not in daemon.allowed_registries [{}]",
            allowed.join(", ")
        )
    })
}

/// The repository as a source registry names it: Docker Hub's official
/// images live under `library/` at any registry that mirrors them.
fn at_registry(source: &str, repository: &str) -> String {
    let path = refs::path_of(repository);
    if refs::registry_of(repository) == DEFAULT_REGISTRY && !path.contains('/') {
        format!("{source}/library/{path}")
    } else {
        format!("{source}/{path}")
    }
}

/// The backoff key of a pre-pull. The pin is part of it: changing the pin
/// is a new request, and its first attempt does not wait for the old one's
/// backoff.
pub fn pull_key(p: &Prepull) -> String {
    match &p.digest {
        Some(pin) => format!("pull {} {pin}", p.key()),
        None => format!("pull {}", p.key()),
    }
}

/// What each `[[prepull]]` entry needs. `force_refresh`: treat every refresh
/// as due (a one-shot `stowage apply`).
pub fn pull_intents(
    policy: &Policy,
    observed: &Observed,
    state: &State,
    now: i64,
    force_refresh: bool,
) -> PullIntents {
    let mut out = PullIntents::default();
    for p in &policy.prepull {
        let parsed = match refs::Reference::parse(&p.image) {
            Ok(r) => r,
            // Validation accepted it; a mismatch between the two parsers
            // must not take the reconcile down.
            Err(_) => continue,
        };
        let by_digest = parsed.digest.clone();
        let tag_ref = parsed
            .tag
            .as_ref()
            .map(|t| format!("{}:{t}", parsed.repository));
        let pin = p.digest.clone().or_else(|| by_digest.clone());
        let current = observed.images.iter().find(|i| match &tag_ref {
            Some(t) => i.repo_tags.contains(t),
            None => i.repo_digests.contains(&p.image),
        });
        let current_digests = current.map(digests_of).unwrap_or_default();
        let st = state.prepull.get(&p.key());
        let reason = match (current, &pin) {
            (None, _) => "missing on this host".to_owned(),
            (Some(_), Some(pin)) if !current_digests.contains(pin) => {
                format!("the image under the tag is not the pinned digest {pin}")
            }
            (Some(_), Some(_)) => continue,
            (Some(_), None) => {
                let due = !matches!(p.refresh, Refresh::Never)
                    && (force_refresh
                        || refresh_due(policy, p, st.and_then(|s| s.last_checked), now));
                if !due {
                    continue;
                }
                out.checked.push(p.key());
                "refresh: checking the registry for a newer digest".to_owned()
            }
        };
        let rule = format!("prepull:{}", p.image);
        let key = pull_key(p);
        if let Some(w) = backing_off(state, &key, "pull", &p.image, &rule, now) {
            out.waiting.push(w);
            continue;
        }
        let candidates = candidates(policy, &p.sources, &parsed.repository);
        out.due.push(PullIntent {
            backoff_key: key,
            key: p.key(),
            reference: p.image.clone(),
            tag_ref,
            pin,
            platform: p.platform.clone(),
            candidates,
            current: current.map(|i| i.id.clone()),
            current_digests,
            keep_previous: p.keep_previous,
            rule,
            reason,
        });
    }
    out
}

/// The registries to try for `repository`: the `sources` in order, then its own.
fn candidates(policy: &Policy, sources: &[String], repository: &str) -> Vec<Candidate> {
    let own = refs::registry_of(repository).to_owned();
    let mut out: Vec<Candidate> = sources
        .iter()
        .map(|s| Candidate {
            registry: s.clone(),
            repository: at_registry(s, repository),
            refused: refusal(policy, s),
        })
        .collect();
    out.push(Candidate {
        refused: refusal(policy, &own),
        registry: own,
        repository: repository.to_owned(),
    });
    out
}

/// The `rule` of the audit records `stowage pull` writes.
const CLI_RULE: &str = "cli";

/// What `stowage pull REFERENCE [--platform P]` asks for, outside the policy:
/// `repo[:tag][@digest]` (no tag and no digest means `:latest`, as with
/// `docker pull`; a tag with a digest pulls that digest and only then tags
/// it). A `[[prepull]]` entry for the same repository lends its `sources`;
/// `allowed_registries` holds as for any pull. `Err` says what is wrong
/// with the reference or platform.
pub fn cli_intent(
    policy: &Policy,
    observed: &Observed,
    reference: &str,
    platform: Option<&str>,
) -> Result<PullIntent, String> {
    let mut parsed = refs::Reference::parse(reference).map_err(|e| e.to_string())?;
    if parsed.tag.is_none() && parsed.digest.is_none() {
        parsed.tag = Some("latest".to_owned());
    }
    if let Some(p) = platform {
        refs::check_platform(p)?;
    }
    let tag_ref = parsed
        .tag
        .as_ref()
        .map(|t| format!("{}:{t}", parsed.repository));
    let by_digest = parsed
        .digest
        .as_ref()
        .map(|d| format!("{}@{d}", parsed.repository));
    let current = observed
        .images
        .iter()
        .find(|i| match (&tag_ref, &by_digest) {
            (Some(t), _) => i.repo_tags.contains(t),
            (None, Some(d)) => i.repo_digests.contains(d),
            (None, None) => false,
        });
    let sources = policy
        .prepull
        .iter()
        .find(|p| refs::Reference::parse(&p.image).is_ok_and(|r| r.repository == parsed.repository))
        .map(|p| p.sources.clone())
        .unwrap_or_default();
    let reference = parsed.to_string();
    Ok(PullIntent {
        key: format!("cli {reference}"),
        backoff_key: format!("pull cli {reference}"),
        tag_ref,
        pin: parsed.digest.clone(),
        platform: platform.map(str::to_owned),
        candidates: candidates(policy, &sources, &parsed.repository),
        current: current.map(|i| i.id.clone()),
        current_digests: current.map(digests_of).unwrap_or_default(),
        keep_previous: 0,
        rule: CLI_RULE.to_owned(),
        reason: match current {
            None => "stowage pull: missing on this host".to_owned(),
            Some(_) => "stowage pull: checking the registry for a newer digest".to_owned(),
        },
        reference,
    })
}

/// The target of a local reference in a mirror: `<registry>/[<prefix>/]<path>:<tag>`.
pub fn mirror_target(registry: &str, prefix: Option<&str>, repository: &str, tag: &str) -> String {
    let path = refs::path_of(repository);
    match prefix {
        Some(pre) => format!("{registry}/{pre}/{path}:{tag}"),
        None => format!("{registry}/{path}:{tag}"),
    }
}

/// Every local reference in a `[[mirror]]` scope with its target. A
/// reference already at the mirror registry is not replicated onto itself.
pub fn push_intents(policy: &Policy, observed: &Observed, state: &State, now: i64) -> PushIntents {
    let mut out = PushIntents::default();
    let mut seen = std::collections::HashSet::new();
    let mut images: Vec<&Image> = observed.images.iter().collect();
    images.sort_by(|a, b| a.id.cmp(&b.id));
    for m in &policy.mirror {
        let mut refs_in_scope: Vec<(&str, &Image)> = images
            .iter()
            .flat_map(|i| i.repo_tags.iter().map(move |t| (t.as_str(), *i)))
            .collect();
        refs_in_scope.sort_by(|a, b| a.0.cmp(b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        for (reference, image) in refs_in_scope {
            let (repository, Some(tag)) = split_tag(reference) else {
                continue;
            };
            if !m.scope.matches(repository, tag, observed.engine.naming())
                || canonical_registry(refs::registry_of(repository))
                    == canonical_registry(&m.registry)
            {
                continue;
            }
            let target = mirror_target(&m.registry, m.prefix.as_deref(), repository, tag);
            // Two mirrors (or two references) mapping to one target: the first wins.
            if !seen.insert(target.clone()) {
                continue;
            }
            let key = format!("push {target}");
            if let Some(w) = backing_off(state, &key, "push", &target, &m.name, now) {
                out.waiting.push(w);
                continue;
            }
            // The engine drops the target's digest with the temporary tag;
            // the state remembers what was pushed.
            let mut digests = digests_of(image);
            if let Some(m) = state.mirrored.get(&target).filter(|m| m.image == image.id) {
                digests.push(m.digest.clone());
            }
            out.due.push(PushIntent {
                key,
                source: reference.to_owned(),
                image: image.id.clone(),
                digests,
                target_tagged: image.repo_tags.contains(&target),
                target,
                registry: m.registry.clone(),
                refused: refusal(policy, &m.registry),
                rule: m.name.clone(),
            });
        }
    }
    out
}

/// What remains for a pre-pull once a registry answered `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullStep {
    /// The current image already is that digest.
    UpToDate,
    /// Another local image already is that digest: point the tag at it.
    Retag { image: String },
    /// Pull `from` (`repo@sha256:…`), then point the tag at the result.
    Pull { from: String },
}

/// Pure: the step for `intent` when `candidate` serves `digest`.
pub fn decide_pull(
    intent: &PullIntent,
    candidate: &Candidate,
    digest: &str,
    observed: &Observed,
) -> PullStep {
    if intent.current_digests.iter().any(|d| d == digest) {
        return PullStep::UpToDate;
    }
    // Only for a tag: a digest-only reference is satisfied by the digest alone.
    if intent.tag_ref.is_some()
        && let Some(img) = observed
            .images
            .iter()
            .find(|i| digests_of(i).iter().any(|d| d == digest))
    {
        return PullStep::Retag {
            image: img.id.clone(),
        };
    }
    PullStep::Pull {
        from: format!("{}@{digest}", candidate.repository),
    }
}

/// Pure: whether a push is needed when the target answered `remote`.
pub fn push_needed(intent: &PushIntent, remote: Option<&str>) -> bool {
    remote.is_none_or(|r| !intent.digests.iter().any(|d| d == r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PrepullState;
    use crate::transfer::fixtures::{D1, D2, NOW, image, observed, policy};

    #[test]
    fn missing_image_is_due_with_sources_first_and_library_paths() {
        let p = policy(
            r#"[[prepull]]
image = "nginx:1.25"
sources = ["mirror.local:5000", "127.0.0.1:6000"]
"#,
        );
        let i = pull_intents(&p, &observed(vec![]), &State::default(), NOW, false);
        assert_eq!(i.due.len(), 1);
        let due = &i.due[0];
        assert_eq!(due.reason, "missing on this host");
        let repos: Vec<&str> = due
            .candidates
            .iter()
            .map(|c| c.repository.as_str())
            .collect();
        assert_eq!(
            repos,
            [
                "mirror.local:5000/library/nginx",
                "127.0.0.1:6000/library/nginx",
                "nginx"
            ]
        );
        assert_eq!(due.tag_ref.as_deref(), Some("nginx:1.25"));
    }

    #[test]
    fn present_image_refreshes_on_schedule_or_when_forced_never_with_never() {
        let p = policy(
            r#"[[prepull]]
image = "r.local/app:1"
refresh = "0 0 * * * *"

[[prepull]]
image = "r.local/app:2"
refresh = "never"
"#,
        );
        let obs = observed(vec![
            image(
                "sha256:a",
                &["r.local/app:1"],
                &[&format!("r.local/app@{D1}")],
            ),
            image("sha256:b", &["r.local/app:2"], &[]),
        ]);
        let mut st = State::default();
        // Checked 10 minutes ago; the hourly schedule has not fired since.
        st.prepull.insert(
            "r.local/app:1".into(),
            PrepullState {
                previous: vec![],
                last_checked: Some(NOW - (NOW % 3600) + 1),
            },
        );
        let later = NOW - (NOW % 3600) + 1800;
        assert!(pull_intents(&p, &obs, &st, later, false).due.is_empty());
        let forced = pull_intents(&p, &obs, &st, later, true);
        assert_eq!(forced.due.len(), 1);
        assert_eq!(forced.checked, ["r.local/app:1"]);
        // Past the next full hour, the schedule has fired.
        let next_hour = NOW - (NOW % 3600) + 3600 + 5;
        assert_eq!(pull_intents(&p, &obs, &st, next_hour, false).due.len(), 1);
    }

    #[test]
    fn pin_is_checked_without_refresh() {
        let p = policy(&format!(
            "[[prepull]]\nimage = \"r.local/app:1\"\ndigest = \"{D2}\"\nrefresh = \"never\"\n"
        ));
        let obs = observed(vec![image(
            "sha256:a",
            &["r.local/app:1"],
            &[&format!("r.local/app@{D1}")],
        )]);
        let i = pull_intents(&p, &obs, &State::default(), NOW, false);
        assert_eq!(i.due.len(), 1);
        assert_eq!(i.due[0].pin.as_deref(), Some(D2));
        assert_eq!(
            decide_pull(&i.due[0], &i.due[0].candidates[0], D2, &obs),
            PullStep::Pull {
                from: format!("r.local/app@{D2}")
            }
        );
        // Pin met: nothing to do.
        let obs = observed(vec![image(
            "sha256:a",
            &["r.local/app:1"],
            &[&format!("r.local/app@{D2}")],
        )]);
        assert!(
            pull_intents(&p, &obs, &State::default(), NOW, true)
                .due
                .is_empty()
        );
    }

    #[test]
    fn decide_pull_up_to_date_retag_or_pull() {
        let p = policy("[[prepull]]\nimage = \"r.local/app:1\"\n");
        let obs = observed(vec![
            image(
                "sha256:a",
                &["r.local/app:1"],
                &[&format!("r.local/app@{D1}")],
            ),
            // A previous image, now dangling, that the registry serves again.
            image("sha256:b", &[], &[&format!("r.local/app@{D2}")]),
        ]);
        let i = &pull_intents(&p, &obs, &State::default(), NOW, true).due[0];
        let c = &i.candidates[0];
        assert_eq!(decide_pull(i, c, D1, &obs), PullStep::UpToDate);
        assert_eq!(
            decide_pull(i, c, D2, &obs),
            PullStep::Retag {
                image: "sha256:b".into()
            }
        );
        let d3 = format!("sha256:{}", "3".repeat(64));
        assert_eq!(
            decide_pull(i, c, &d3, &obs),
            PullStep::Pull {
                from: format!("r.local/app@{d3}")
            }
        );
    }

    #[test]
    fn allowed_registries_refuse_the_fallback_at_run_time() {
        let p = policy(
            r#"[daemon]
allowed_registries = ["mirror.local:5000"]
[[prepull]]
image = "r.local/app:1"
sources = ["mirror.local:5000"]
"#,
        );
        let i = pull_intents(&p, &observed(vec![]), &State::default(), NOW, false);
        let c = &i.due[0].candidates;
        assert_eq!(c[0].refused, None);
        assert!(
            c[1].refused
                .as_deref()
                .unwrap()
                .contains("registry r.local is not in daemon.allowed_registries"),
            "{c:?}"
        );
    }

    #[test]
    fn cli_intent_defaults_to_latest_borrows_sources_and_checks_input() {
        let p = policy(
            r#"[daemon]
allowed_registries = ["mirror.local:5000", "docker.io"]
[[prepull]]
image = "nginx:1.25"
sources = ["mirror.local:5000"]
"#,
        );
        let obs = observed(vec![image("sha256:a", &["nginx:latest"], &[])]);
        let i = cli_intent(&p, &obs, "nginx", None).unwrap();
        assert_eq!(i.reference, "nginx:latest");
        assert_eq!(i.tag_ref.as_deref(), Some("nginx:latest"));
        assert_eq!(i.current.as_deref(), Some("sha256:a"));
        assert_eq!(i.rule, "cli");
        assert_eq!(i.pin, None);
        let repos: Vec<&str> = i.candidates.iter().map(|c| c.repository.as_str()).collect();
        assert_eq!(repos, ["mirror.local:5000/library/nginx", "nginx"]);
        // A tag with a digest: that digest, then the tag.
        let pinned = cli_intent(
            &p,
            &obs,
            &format!("r.local/app:1@{D1}"),
            Some("linux/arm64"),
        )
        .unwrap();
        assert_eq!(pinned.pin.as_deref(), Some(D1));
        assert_eq!(pinned.tag_ref.as_deref(), Some("r.local/app:1"));
        assert_eq!(pinned.current, None);
        assert!(pinned.candidates[0].refused.is_some(), "{pinned:?}");
        assert!(cli_intent(&p, &obs, "Bad Name", None).is_err());
        assert!(cli_intent(&p, &obs, "app:1", Some("linux")).is_err());
        assert!(cli_intent(&p, &obs, "app@sha256:12", None).is_err());
    }

    #[test]
    fn mirror_targets_and_skips() {
        let p = policy(
            r#"[[mirror]]
name = "edge"
registry = "127.0.0.1:7000"
prefix = "cache"
images = ["**"]
"#,
        );
        let obs = observed(vec![
            image(
                "sha256:a",
                &["r.local/team/app:1", "127.0.0.1:7000/cache/team/app:1"],
                &[&format!("r.local/team/app@{D1}")],
            ),
            image("sha256:b", &["nginx:1.25"], &[]),
        ]);
        let i = push_intents(&p, &obs, &State::default(), NOW);
        let targets: Vec<(&str, bool)> = i
            .due
            .iter()
            .map(|d| (d.target.as_str(), d.target_tagged))
            .collect();
        assert_eq!(
            targets,
            [
                ("127.0.0.1:7000/cache/nginx:1.25", false),
                ("127.0.0.1:7000/cache/team/app:1", true)
            ]
        );
        let app = &i.due[1];
        assert!(!push_needed(app, Some(D1)));
        assert!(push_needed(app, Some(D2)));
        assert!(push_needed(app, None));
    }
}
