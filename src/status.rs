//! What `stowage status` shows: each reference with its verdict and the rule
//! behind it, and, when a daemon runs, the daemon's own view (policy in force,
//! last and next reconcile, engine, errors, backoffs). The same types travel
//! over the control socket, so they are plain serde values.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::fmt::{human_age, human_bytes, short_id};
use crate::observe::Observed;
use crate::plan::{Decision, Plan};
use crate::refs::split_tag;
use crate::state::State;

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
pub fn render_table(
    rows: &[StatusRow],
    images: usize,
    policy: &Path,
    now: DateTime<Utc>,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<48} {:>9} {:>8} {:>8}  {:<10} {}\n",
        "REFERENCE", "SIZE", "AGE", "ACTIVE", "VERDICT", "RULE: REASON"
    ));
    let ago = |t: Option<DateTime<Utc>>| {
        t.map_or("-".to_string(), |t| human_age((now - t).num_seconds()))
    };
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
    /// The state file could not be read as it is (corrupt, unreadable): the
    /// same warning `plan` and `apply` give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_warning: Option<String>,
}

/// Backoff rows from a state.
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
pub fn render_daemon(d: &DaemonStatus, now: DateTime<Utc>) -> String {
    let local = |t: DateTime<Utc>| {
        t.with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let mut out = format!(
        "daemon: pid {}, stowage {}, up {}\n",
        d.pid,
        d.version,
        human_age((now - d.started).num_seconds())
    );
    out.push_str(&format!(
        "policy: {} (loaded {}): {}\n",
        d.policy.display(),
        local(d.policy_loaded),
        d.policy_summary
    ));
    if let Some(e) = &d.reload_error {
        out.push_str(&format!(
            "reload FAILED at {}; the policy above stays in force:\n",
            local(e.at)
        ));
        for line in e.message.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    match (&d.engine_reachable, &d.engine_error) {
        (true, _) => out.push_str(&format!("engine: {} reachable\n", d.engine)),
        (false, e) => out.push_str(&format!(
            "engine: {} UNREACHABLE{}\n",
            d.engine,
            e.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        )),
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
