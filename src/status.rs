//! What `stowage status` shows: each reference with its verdict and the rule
//! behind it, and, when a daemon runs, the daemon's own view (policy in force,
//! last and next reconcile, engine, errors, backoffs). The same types travel
//! over the control socket, so they are plain serde values.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::engine::{EngineInfo, EngineKind};
use crate::fmt::{human_age, human_bytes, short_id};
use crate::observe::Observed;
use crate::plan::{Decision, Plan};
use crate::policy::Policy;
use crate::refs::split_tag;
use crate::state::State;
use crate::transfer::PullCounters;

/// One reference (or dangling image) with its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub image: String,
    pub size: u64,
    pub created: DateTime<Utc>,
    pub last_activity: Option<DateTime<Utc>>,
    pub last_used: Option<DateTime<Utc>>,
    pub verdict: Decision,
    pub rule: Option<String>,
    pub reason: String,
}

/// The rows of a plan's verdicts, sorted by reference.
pub fn rows(observed: &Observed, plan: &Plan, state: &State) -> Vec<StatusRow> {
    let ts = |t: i64| DateTime::from_timestamp(t, 0);
    // One lookup per verdict: a scan per verdict is quadratic on big hosts.
    let by_id: rustc_hash::FxHashMap<&str, &crate::engine::Image> =
        observed.images.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut rows: Vec<StatusRow> = plan
        .verdicts
        .iter()
        .filter_map(|v| {
            let img = *by_id.get(v.image.as_str())?;
            let st = state.images.get(&img.id);
            let activity = [
                Some(img.created),
                st.map(|s| s.first_seen),
                st.and_then(|s| s.last_used),
                st.and_then(|s| s.last_pulled),
            ]
            .into_iter()
            .flatten()
            .max();
            Some(StatusRow {
                reference: v.reference.clone(),
                image: v.image.clone(),
                size: img.size,
                created: ts(img.created).unwrap_or_default(),
                last_activity: activity.and_then(ts),
                last_used: st.and_then(|s| s.last_used).and_then(ts),
                verdict: v.decision,
                rule: v.rule.clone(),
                reason: v.reason.clone(),
            })
        })
        .collect();
    rows.sort_by(|a, b| a.reference.cmp(&b.reference).then(a.image.cmp(&b.image)));
    rows
}

/// The human table of `rows`, with a closing count line.
pub fn render_table(rows: &[StatusRow], images: usize, policy: &Path, at: DateTime<Utc>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<48} {:>9} {:>8} {:>8}  {:<10} {}\n",
        "REFERENCE", "SIZE", "AGE", "ACTIVE", "VERDICT", "RULE: REASON"
    ));
    let ago =
        |t: Option<DateTime<Utc>>| t.map_or("-".to_string(), |t| human_age((at - t).num_seconds()));
    for r in rows {
        let name = r
            .reference
            .clone()
            .unwrap_or_else(|| format!("<none> {}", short_id(&r.image)));
        out.push_str(&format!(
            "{:<48} {:>9} {:>8} {:>8}  {:<10} {}{}\n",
            name,
            human_bytes(r.size),
            ago(Some(r.created)),
            ago(r.last_activity),
            r.verdict.as_str(),
            r.rule
                .as_deref()
                .map(|x| format!("{x}: "))
                .unwrap_or_default(),
            r.reason
        ));
    }
    let repos: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.reference.as_deref().map(|x| split_tag(x).0))
        .collect();
    out.push_str(&format!(
        "{} references in {} repositories, {} images; policy {}\n",
        rows.iter().filter(|r| r.reference.is_some()).count(),
        repos.len(),
        images,
        policy.display()
    ));
    out
}

/// The line about the trash under the table: none while it is empty.
pub fn render_trash(t: &crate::trash::Totals) -> String {
    if t.images == 0 {
        return String::new();
    }
    format!(
        "trash: {} image(s), {} (`stowage trash` lists them)\n",
        t.images,
        human_bytes(t.bytes)
    )
}

/// The outcome of one reconcile run by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileResult {
    /// Reconcile id, as in the audit log (empty when it could not start).
    pub run: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub duration_ms: u64,
    /// Actions that failed.
    pub failed: usize,
    /// `Report::summary()`, or the error.
    pub summary: String,
    /// Set when the reconcile could not run at all (engine, audit log, state).
    pub error: Option<String>,
}

impl ReconcileResult {
    /// Exit code of `stowage reconcile`, as `apply`'s: 0 done, 1 some actions
    /// failed, 2 could not run.
    pub fn exit_code(&self) -> u8 {
        match (&self.error, self.failed) {
            (Some(_), _) => 2,
            (None, 0) => 0,
            (None, _) => 1,
        }
    }
}

/// A dated message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dated {
    pub at: DateTime<Utc>,
    pub message: String,
}

/// A failing pull/push waiting for its next attempt (from the state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffRow {
    /// `action reference`, e.g. `pull nginx:1.25`.
    pub key: String,
    pub failures: u32,
    pub next_attempt: DateTime<Utc>,
    pub last_error: String,
}

/// The daemon's own view, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub started: DateTime<Utc>,
    /// The policy file.
    pub policy: PathBuf,
    /// When the policy in force was loaded.
    pub policy_loaded: DateTime<Utc>,
    /// One line about the policy in force.
    pub policy_summary: String,
    /// The last reload attempt failed: the old policy is still in force.
    pub reload_error: Option<Dated>,
    /// The engine's address.
    pub engine: String,
    /// Docker or Podman, once connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_kind: Option<EngineKind>,
    /// What differs on this engine for the policy ([`engine_notes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_notes: Vec<String>,
    pub engine_reachable: bool,
    /// Why the engine is unreachable.
    pub engine_error: Option<String>,
    pub reconciling: bool,
    /// A reconcile is waiting to start (after the running one, or for the engine).
    pub reconcile_pending: bool,
    /// Reconciles finished since start.
    pub reconciles: u64,
    pub last_reconcile: Option<ReconcileResult>,
    pub next_scheduled: Option<DateTime<Utc>>,
    /// Recent errors, oldest first.
    pub errors: Vec<Dated>,
    pub backoffs: Vec<BackoffRow>,
    /// What pulls moved since the daemon started: bytes received, bytes
    /// resumed from partial downloads, verification failures.
    #[serde(default)]
    pub pulls: PullCounters,
    /// The state file could not be read as it is (corrupt, unreadable): the
    /// same warning `plan` and `apply` give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_warning: Option<String>,
    /// A registry policy (`-p oci://…`): its digest, checks, refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_remote: Option<crate::fleet::poll::RemoteStatus>,
}

/// Backoff rows from a state.
/// Cached `[[scan]]` verdicts: `(all, failed)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanCounts {
    pub verdicts: usize,
    pub failed: usize,
}

pub fn scan_counts(state: &State) -> ScanCounts {
    ScanCounts {
        verdicts: state.scans.len(),
        failed: state.scans.values().filter(|v| !v.passed).count(),
    }
}

/// `scans: 12 verdicts, 1 failed`, when any were reached.
pub fn scan_line(state: &State) -> Option<String> {
    render_scans(scan_counts(state))
}

/// [`scan_line`] from the counts (the daemon's answer carries those).
pub fn render_scans(c: ScanCounts) -> Option<String> {
    (c.verdicts > 0).then(|| format!("scans: {} verdicts, {} failed", c.verdicts, c.failed))
}

pub fn backoffs(state: &State) -> Vec<BackoffRow> {
    state
        .backoff
        .iter()
        .map(|(key, b)| BackoffRow {
            key: key.clone(),
            failures: b.failures,
            next_attempt: DateTime::from_timestamp(b.next_attempt, 0).unwrap_or_default(),
            last_error: b.last_error.clone(),
        })
        .collect()
}

/// The daemon part of `stowage status`, human readable.
/// What differs on this engine from Docker and matters for `policy`, one
/// line each; nothing on Docker. Said once: in the daemon's log when it
/// connects, under `status` and `plan`, and by `check --engine`. Podman's
/// events logger (`None` when not asked) tells whether it sends events.
pub fn engine_notes(
    kind: EngineKind,
    local: bool,
    policy: &Policy,
    event_logger: Option<&str>,
) -> Vec<String> {
    if kind != EngineKind::Podman {
        return Vec::new();
    }
    let mut notes = vec![
        "Podman names images built or loaded here localhost/…: a glob without a registry \
         matches them too (team/* matches localhost/team/app), the plan names them as Podman does"
            .to_owned(),
    ];
    if policy
        .storage
        .as_ref()
        .is_some_and(|s| s.build_cache_max.is_some())
    {
        notes.push(
            "[storage] build_cache_max does nothing on Podman: it keeps no build cache apart from \
             its images (build layers are images, which retention and eviction cover)"
                .to_owned(),
        );
    }
    if !local && !policy.prepull.is_empty() {
        notes.push(format!(
            "a remote Podman reports a pull per layer, not per byte: a layer that takes longer \
             than stall_timeout ({}) to arrive is abandoned",
            humantime::format_duration(policy.daemon.stall_timeout)
        ));
    }
    if event_logger == Some("none") {
        notes.push(
            "Podman's events_logger is \"none\": it sends no events, so container use and pulls \
             are noted only at each reconcile"
                .to_owned(),
        );
    }
    notes
}

/// `engine: Podman 4.3.1 (API 1.41) at ADDRESS`, then a `note:` line per note.
pub fn render_engine(info: &EngineInfo, address: &str, notes: &[String]) -> String {
    let mut out = format!(
        "engine: {} {} (API {}) at {address}\n",
        info.kind, info.server_version, info.api_version
    );
    for n in notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}

pub fn render_daemon(d: &DaemonStatus, at: DateTime<Utc>) -> String {
    let local = |t: DateTime<Utc>| {
        t.with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let mut out = format!(
        "daemon: pid {}, stowage {}, up {}\n",
        d.pid,
        d.version,
        human_age((at - d.started).num_seconds())
    );
    out.push_str(&format!(
        "policy: {} (loaded {}): {}\n",
        d.policy.display(),
        local(d.policy_loaded),
        d.policy_summary
    ));
    if let Some(remote) = &d.policy_remote {
        out.push_str(&crate::fleet::render_status(remote, at));
    }
    if let Some(e) = &d.reload_error {
        out.push_str(&format!(
            "reload FAILED at {}; the policy above stays in force:\n",
            local(e.at)
        ));
        for line in e.message.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    let kind = d.engine_kind.map(|k| format!(" ({k})")).unwrap_or_default();
    match (&d.engine_reachable, &d.engine_error) {
        (true, _) => out.push_str(&format!("engine: {}{kind} reachable\n", d.engine)),
        (false, e) => out.push_str(&format!(
            "engine: {} UNREACHABLE{}\n",
            d.engine,
            e.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        )),
    }
    for n in &d.engine_notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    match &d.last_reconcile {
        Some(r) => out.push_str(&format!(
            "last reconcile: {} ({} ms, run {}): {}\n",
            local(r.finished),
            r.duration_ms,
            if r.run.is_empty() { "-" } else { &r.run },
            r.error
                .as_deref()
                .map_or_else(|| r.summary.clone(), |e| format!("could not run: {e}"))
        )),
        None => out.push_str("last reconcile: none yet\n"),
    }
    if d.reconciling {
        out.push_str("reconciling now\n");
    }
    if d.reconcile_pending {
        out.push_str("a reconcile is pending\n");
    }
    if let Some(next) = d.next_scheduled {
        out.push_str(&format!("next scheduled: {}\n", local(next)));
    }
    if !d.pulls.is_zero() {
        out.push_str(&format!(
            "pulls since start: received {}, resumed {}, verification failures {}\n",
            human_bytes(d.pulls.bytes_received),
            human_bytes(d.pulls.resumed_bytes),
            d.pulls.verify_failures
        ));
    }
    for b in &d.backoffs {
        out.push_str(&format!(
            "backoff: {} ({} failures, next attempt {}): {}\n",
            b.key,
            b.failures,
            local(b.next_attempt),
            b.last_error
        ));
    }
    for e in &d.errors {
        out.push_str(&format!("error at {}: {}\n", local(e.at), e.message));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Image;
    use crate::plan::{Decision, Verdict};
    use crate::state::{Backoff, ImageState};

    #[test]
    fn podman_notes_say_what_differs_for_the_policy() {
        let parse = |body: &str| {
            crate::policy::parse(&format!("version = 1\n{body}"), Path::new("/p.toml")).unwrap()
        };
        let plain = parse("");
        assert!(engine_notes(EngineKind::Docker, true, &plain, None).is_empty());
        let notes = engine_notes(EngineKind::Podman, true, &plain, Some("file"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("localhost/"), "{notes:?}");
        let busy =
            parse("[[prepull]]\nimage = \"nginx:1.25\"\n[storage]\nbuild_cache_max = \"1GB\"\n");
        let notes = engine_notes(EngineKind::Podman, false, &busy, Some("none"));
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(notes[1].contains("build_cache_max"), "{notes:?}");
        assert!(
            notes[2].contains("per layer") && notes[2].contains("2m"),
            "{notes:?}"
        );
        assert!(notes[3].contains("events_logger"), "{notes:?}");
        // A local Podman pulls through the content store: no progress note.
        assert_eq!(engine_notes(EngineKind::Podman, true, &busy, None).len(), 2);
    }

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn at(t: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(t, 0).unwrap()
    }

    fn image(hex: &str, created: i64, tags: &[&str]) -> Image {
        Image {
            id: format!("sha256:{hex:0<64}"),
            repo_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            repo_digests: vec![],
            created,
            size: 2_500_000,
        }
    }

    fn verdict(reference: Option<&str>, image: &Image, decision: Decision) -> Verdict {
        Verdict {
            reference: reference.map(str::to_owned),
            image: image.id.clone(),
            decision,
            rule: Some("app".to_owned()),
            reason: "because".to_owned(),
        }
    }

    /// `app:2`, `app:1` (used a day ago), a dangling image, and a verdict
    /// for an image no longer observed.
    fn store() -> (Observed, Plan, State) {
        let new = image("aa", NOW - 3 * DAY, &["app:2"]);
        let old = image("bb", NOW - 30 * DAY, &["app:1", "web:1"]);
        let dangling = image("cc", NOW - 10 * DAY, &[]);
        let gone = image("dd", NOW - DAY, &["gone:1"]);
        let mut plan = Plan::default();
        plan.verdicts = vec![
            verdict(Some("web:1"), &old, Decision::Keep),
            verdict(Some("app:2"), &new, Decision::Keep),
            verdict(None, &dangling, Decision::Remove),
            verdict(Some("app:1"), &old, Decision::Keep),
            verdict(Some("gone:1"), &gone, Decision::Remove),
        ];
        let mut state = State::default();
        state.images.insert(
            old.id.clone(),
            ImageState {
                first_seen: NOW - 20 * DAY,
                last_used: Some(NOW - DAY),
                ..ImageState::default()
            },
        );
        let observed = Observed {
            images: vec![new, old, dangling],
            ..Observed::default()
        };
        (observed, plan, state)
    }

    #[test]
    fn rows_are_sorted_dated_and_only_of_observed_images() {
        let (observed, plan, state) = store();
        let rows = rows(&observed, &plan, &state);
        let refs: Vec<Option<&str>> = rows.iter().map(|r| r.reference.as_deref()).collect();
        assert_eq!(
            refs,
            vec![None, Some("app:1"), Some("app:2"), Some("web:1")]
        );
        let app1 = &rows[1];
        assert_eq!(app1.created, at(NOW - 30 * DAY));
        // The latest of created, first seen and last used.
        assert_eq!(app1.last_activity, Some(at(NOW - DAY)));
        assert_eq!(app1.last_used, Some(at(NOW - DAY)));
        // Nothing in the state: activity is the creation.
        assert_eq!(rows[2].last_activity, Some(at(NOW - 3 * DAY)));
        assert_eq!(rows[2].last_used, None);
    }

    #[test]
    fn the_table_shows_ages_verdicts_and_a_closing_count() {
        let (observed, plan, state) = store();
        let rows = rows(&observed, &plan, &state);
        let table = render_table(
            &rows,
            observed.images.len(),
            Path::new("/etc/p.toml"),
            at(NOW),
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(lines[0].starts_with("REFERENCE"), "{table}");
        let dangling: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            dangling,
            [
                "<none>",
                "cc0000000000",
                "2.5",
                "MB",
                "10d",
                "10d",
                "remove",
                "app:",
                "because"
            ]
        );
        let app1: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(app1[..6], ["app:1", "2.5", "MB", "30d", "24h", "keep"]);
        assert_eq!(
            lines[5],
            "3 references in 2 repositories, 3 images; policy /etc/p.toml"
        );
    }

    #[test]
    fn the_scan_line_comes_through_the_daemons_answer_and_is_absent_when_none_ran() {
        let none = ScanCounts {
            verdicts: 0,
            failed: 0,
        };
        assert_eq!(render_scans(none), None);
        let some = ScanCounts {
            verdicts: 3,
            failed: 1,
        };
        let wire: ScanCounts =
            serde_json::from_str(&serde_json::to_string(&some).unwrap()).unwrap();
        assert_eq!(
            render_scans(wire).as_deref(),
            Some("scans: 3 verdicts, 1 failed")
        );
    }

    #[test]
    fn the_trash_line_says_count_and_bytes_and_nothing_when_empty() {
        use crate::trash::Totals;
        assert_eq!(render_trash(&Totals::default()), "");
        assert_eq!(
            render_trash(&Totals {
                images: 2,
                bytes: 5_000_000
            }),
            "trash: 2 image(s), 5.0 MB (`stowage trash` lists them)\n"
        );
    }

    #[test]
    fn ages_switch_units_at_a_minute_an_hour_and_two_days() {
        for (secs, shown) in [
            (-5, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3_599, "59m"),
            (3_600, "1h"),
            (2 * DAY - 1, "47h"),
            (2 * DAY, "2d"),
        ] {
            assert_eq!(human_age(secs), shown, "{secs} s");
        }
    }

    #[test]
    fn exit_codes_follow_apply() {
        let result = |failed, error: Option<&str>| ReconcileResult {
            run: "r".to_owned(),
            started: at(NOW),
            finished: at(NOW),
            duration_ms: 1,
            failed,
            summary: String::new(),
            error: error.map(str::to_owned),
        };
        assert_eq!(result(0, None).exit_code(), 0);
        assert_eq!(result(2, None).exit_code(), 1);
        assert_eq!(result(0, Some("engine down")).exit_code(), 2);
    }

    fn daemon() -> DaemonStatus {
        DaemonStatus {
            pid: 42,
            version: "0.1.0".to_owned(),
            started: at(NOW - 3 * 3_600),
            policy: PathBuf::from("/etc/stowage/policy.toml"),
            policy_loaded: at(NOW - 3_600),
            policy_summary: "2 rules".to_owned(),
            reload_error: None,
            engine: "unix:///run/docker.sock".to_owned(),
            engine_kind: None,
            engine_notes: Vec::new(),
            engine_reachable: true,
            engine_error: None,
            reconciling: false,
            reconcile_pending: false,
            reconciles: 0,
            last_reconcile: None,
            next_scheduled: None,
            errors: vec![],
            backoffs: vec![],
            pulls: PullCounters::default(),
            state_warning: None,
            policy_remote: None,
        }
    }

    #[test]
    fn the_daemon_view_of_a_healthy_daemon() {
        let text = render_daemon(&daemon(), at(NOW));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "daemon: pid 42, stowage 0.1.0, up 3h");
        assert!(lines[1].starts_with("policy: /etc/stowage/policy.toml (loaded "));
        assert!(lines[1].ends_with("): 2 rules"), "{text}");
        assert_eq!(lines[2], "engine: unix:///run/docker.sock reachable");
        assert_eq!(lines[3], "last reconcile: none yet");
        assert_eq!(lines.len(), 4, "{text}");
    }

    #[test]
    fn the_daemon_view_says_what_is_wrong() {
        let mut d = daemon();
        d.reload_error = Some(Dated {
            at: at(NOW),
            message: "p.toml:3:1: error: unknown key\nsecond line".to_owned(),
        });
        d.engine_reachable = false;
        d.engine_error = Some("connection refused".to_owned());
        d.last_reconcile = Some(ReconcileResult {
            run: String::new(),
            started: at(NOW),
            finished: at(NOW),
            duration_ms: 7,
            failed: 0,
            summary: "never shown".to_owned(),
            error: Some("engine unreachable".to_owned()),
        });
        d.reconcile_pending = true;
        d.pulls = PullCounters {
            bytes_received: 48_000_000,
            resumed_bytes: 12_000_000,
            verify_failures: 1,
        };
        let text = render_daemon(&d, at(NOW));
        for want in [
            "pulls since start: received 48.0 MB, resumed 12.0 MB, verification failures 1\n",
            "; the policy above stays in force:\n  p.toml:3:1: error: unknown key\n  second line\n",
            "engine: unix:///run/docker.sock UNREACHABLE: connection refused\n",
            "(7 ms, run -): could not run: engine unreachable\n",
            "a reconcile is pending\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("never shown"), "{text}");
    }

    #[test]
    fn backoffs_come_from_the_state() {
        let mut state = State::default();
        state.backoff.insert(
            "pull nginx:1.25".to_owned(),
            Backoff {
                failures: 3,
                next_attempt: NOW + 600,
                last_error: "registry down".to_owned(),
            },
        );
        assert_eq!(
            backoffs(&state),
            vec![BackoffRow {
                key: "pull nginx:1.25".to_owned(),
                failures: 3,
                next_attempt: at(NOW + 600),
                last_error: "registry down".to_owned(),
            }]
        );
    }
}
