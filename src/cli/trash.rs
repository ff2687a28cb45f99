//! `stowage trash [--json]` and `stowage restore REF|ID [--protect]`.
//!
//! `restore` puts a trashed image's former references back (all of them;
//! a floating tag that has moved since is left where it is), then takes its
//! `stowage-trash/` reference off. A former reference that now names another
//! image stops it before anything changes. After the window it pulls the
//! image back by a recorded `RepoDigest` (through the content store, as
//! `stowage pull` does). With the state's lock free it owns the state for
//! its run (the entry goes, `--protect` is written); beside the daemon it
//! changes only the engine, the daemon's next reconcile drops the entry
//! (its image holds no trash reference any more), and `--protect` is asked
//! of the daemon, which owns the state.

use std::path::Path;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{ConnectOptions, Fatal, connect, emit, errln, load_policy};
use crate::audit::{self, AuditLog, Outcome, Record};
use crate::clock::{Clock, SystemClock};
use crate::engine::{Engine, Image};
use crate::fmt::{Human, human_bytes, short_id};
use crate::observe::{self, Observed};
use crate::plan::{self, Kind};
use crate::policy::Policy;
use crate::refs::split_tag;
use crate::state::{State, StateError, StateStore};
use crate::transfer::{self, PullOutcome};
use crate::trash::{self, Entry, Row};

pub(super) async fn cmd_trash(
    path: &Path,
    engine: &ConnectOptions,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let policy = load_policy(path).await?;
    let engine = connect(engine).await?;
    let now = SystemClock.now();
    let images = engine.list_images().await?;
    let mut state = StateStore::new(&policy.daemon.state_dir)
        .load_readonly(now.timestamp())
        .state;
    with_journal(&policy, &mut state, &images);
    let rows = trash::rows(&state, &images);
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        outln!("the trash is empty")?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<12}  {:<10}  {:<16}  {:<22}  {:>9}  former references",
        "image",
        "rule",
        "removed",
        "expires",
        "size"
    )?;
    for r in &rows {
        outln!("{}", row_line(r, now.timestamp()))?;
    }
    let t = trash::totals(&images);
    outln!(
        "{} image(s) in the trash, {}",
        t.images,
        human_bytes(t.bytes)
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The entries a run stopped before its state's save journaled, as the
/// next reconcile will take them (in memory only).
fn with_journal(policy: &Policy, state: &mut State, images: &[Image]) {
    let path = crate::reconcile::trash_journal::path_in(&policy.daemon.state_dir);
    trash::recover(state, crate::reconcile::trash_journal::read(&path), images);
}

fn row_line(r: &Row, at: i64) -> String {
    let when = |t: i64| {
        DateTime::<Utc>::from_timestamp(t, 0)
            .map_or_else(|| t.to_string(), |d| d.format("%Y-%m-%d %H:%M").to_string())
    };
    let expires = if !r.present {
        format!("{} (gone)", when(r.expires))
    } else if r.expires <= at {
        format!("{} (due)", when(r.expires))
    } else {
        format!("{} ({})", when(r.expires), Human(r.expires - at))
    };
    let former = match &r.former {
        Some(f) if f.is_empty() => "(none: it was dangling)".to_string(),
        Some(f) => f.join(", "),
        None => "(unknown: its entry was lost from the state)".to_string(),
    };
    format!(
        "{:<12}  {:<10}  {:<16}  {:<22}  {:>9}  {former}",
        short_id(&r.image),
        r.rule.as_deref().unwrap_or("?"),
        r.removed_at.map_or_else(|| "?".to_string(), when),
        expires,
        human_bytes(r.size),
    )
}

/// Why a restore changed nothing (exit 1).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("nothing in the trash matches {0} (`stowage trash` lists what is there)")]
    NotFound(String),
    #[error(
        "{reference} now names another image ({other}); nothing restored: remove or re-tag {reference} first, then restore again"
    )]
    Conflict { reference: String, other: String },
    #[error(
        "the former references of {image} are not known (its entry was lost from the state): `docker tag {image} NAME` names it, then `docker rmi {trash_ref}`"
    )]
    Unknown { image: String, trash_ref: String },
    #[error(
        "{0} had no references (it was dangling): `docker tag` it to keep it; its trash reference stays until the window ends"
    )]
    Nameless(String),
    #[error("{0}")]
    Gone(String),
}

pub(super) async fn cmd_restore(
    path: &Path,
    engine: &ConnectOptions,
    target: &str,
    protect: bool,
) -> Result<ExitCode, Fatal> {
    let policy = load_policy(path).await?;
    let engine = connect(engine).await?;
    let store = StateStore::new(&policy.daemon.state_dir);
    let clock = SystemClock;
    let now = clock.now();
    // One owner of the state: this run when the lock is free; else the
    // holder (the daemon) keeps it and is asked for what only it may write.
    let lock = match store.try_lock("stowage restore") {
        Ok(l) => Some(l),
        Err(StateError::Held { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let mut state = if lock.is_some() {
        store.load(now.timestamp()).state
    } else {
        store.load_readonly(now.timestamp()).state
    };
    with_journal(&policy, &mut state, &engine.list_images().await?);
    let mut audit = AuditLog::open_lenient(&policy.daemon.audit_log, policy.daemon.audit_max);
    let result = restore(&engine, &policy, &state, target, &mut audit).await;
    audit.sync().await;
    let (id, entry, notes) = match result {
        Ok(done) => done,
        Err(Fatal::Message(m)) => {
            errln(format_args!("restore: {m}"));
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    let window = i64::try_from(policy.daemon.trash.as_secs()).unwrap_or(i64::MAX);
    let until = now.timestamp().saturating_add(window.max(0));
    let mut held_note = None;
    if lock.is_some() {
        state.trash.remove(&id);
        if protect {
            state.held.insert(id.clone(), until);
        }
        store.save(&state)?;
    } else if protect {
        let request = crate::daemon::control::Request::Hold {
            image: id.clone(),
            until,
        };
        match crate::daemon::ask(
            &policy.daemon.control_socket,
            &request,
            request.default_timeout(),
        )
        .await
        {
            Ok(Some(crate::daemon::control::Response::Held)) => {
                state.held.insert(id.clone(), until)
            }
            _ => {
                held_note = Some(
                    "--protect was not recorded: the state is held by another process that did not take it; run `stowage restore --protect` again once it is free".to_string(),
                );
                None
            }
        };
    }
    for n in &notes {
        outln!("{n}")?;
    }
    outln!("restored {}: {}", short_id(&id), entry.former.join(", "))?;
    if let Some(n) = held_note {
        errln(format_args!("{n}"));
    }
    // Would a rule take it again? Plan as the next reconcile would.
    let observed = Observed {
        images: engine.list_images().await?,
        containers: engine.list_containers().await?,
        ..Observed::default()
    };
    let again = plan::plan(&policy, &observed, &state, now.timestamp());
    let rules: Vec<String> = again
        .actions
        .iter()
        .chain(&again.deferred)
        .filter(|a| a.image == id && a.kind != Kind::Tag)
        .map(|a| {
            format!(
                "{} ({} {})",
                a.rule,
                a.kind.as_str(),
                a.reference.as_deref().unwrap_or("")
            )
        })
        .collect();
    if state.held.get(&id).is_some_and(|&t| t > now.timestamp()) {
        outln!(
            "held out of retention for {} (--protect); the policy is unchanged",
            Human(window)
        )?;
    } else if !rules.is_empty() {
        outln!(
            "warning: the next reconcile would remove it again: {}; change the rule first, or restore with --protect",
            rules.join(", ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The entry `target` names: a former reference, the trash reference, or
/// the image id (12 hex or more). Present entries first, newest first.
fn find<'a>(
    state: &'a State,
    images: &[Image],
    target: &str,
) -> Option<(String, Option<&'a Entry>)> {
    let hex = target.strip_prefix("sha256:").unwrap_or(target);
    let by_id =
        |id: &str| hex.len() >= 12 && id.strip_prefix("sha256:").unwrap_or(id).starts_with(hex);
    let mut found: Vec<(bool, i64, &String, &Entry)> = state
        .trash
        .iter()
        .filter(|(id, e)| {
            by_id(id) || e.reference == target || e.former.iter().any(|r| r == target)
        })
        .map(|(id, e)| (e.gone_at.is_none(), e.removed_at, id, e))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse((f.0, f.1)));
    if let Some((_, _, id, e)) = found.first() {
        return Some(((*id).clone(), Some(*e)));
    }
    // A trash reference on the host whose entry was lost.
    images
        .iter()
        .find(|i| trash::held_by(i).is_some_and(|(r, _)| r == target || by_id(&i.id)))
        .map(|i| (i.id.clone(), None))
}

/// Restore what `target` names; gives the image, its entry and notes for
/// the user. `Fatal::Message` when it is refused (nothing changed).
async fn restore<E: Engine>(
    engine: &E,
    policy: &Policy,
    state: &State,
    target: &str,
    audit: &mut AuditLog,
) -> Result<(String, Entry, Vec<String>), Fatal> {
    let refused = |r: Refused| Fatal::Message(r.to_string());
    let images = engine.list_images().await?;
    let (id, entry) =
        find(state, &images, target).ok_or_else(|| refused(Refused::NotFound(target.into())))?;
    let on_host = images.iter().find(|i| i.id == id);
    let Some(entry) = entry.cloned() else {
        let trash_ref = on_host
            .and_then(trash::held_by)
            .map(|(r, _)| r.to_string())
            .unwrap_or_default();
        return Err(refused(Refused::Unknown {
            image: id,
            trash_ref,
        }));
    };
    if entry.former.is_empty() {
        return Err(refused(Refused::Nameless(id)));
    }
    // Every former reference is checked before anything changes.
    let mut notes = Vec::new();
    let mut to_tag = Vec::new();
    for r in &entry.former {
        match engine.image(r).await? {
            Some(img) if img.id == id => {}
            Some(img) if floating(policy, r, engine.kind().naming()) => notes.push(format!(
                "{r} is a floating tag and has moved since (now {}): left where it is",
                short_id(&img.id)
            )),
            Some(img) => {
                return Err(refused(Refused::Conflict {
                    reference: r.clone(),
                    other: img.id,
                }));
            }
            None => to_tag.push(r.clone()),
        }
    }
    let started = SystemClock.now();
    let held = on_host.is_some_and(|i| i.repo_tags.contains(&entry.reference));
    if !held && on_host.is_none() {
        let image = pull_back(engine, policy, &entry, &id, audit).await?;
        notes.push(format!("pulled back by digest: {}", short_id(&image)));
    }
    for r in &to_tag {
        engine.tag(&id, r).await?;
    }
    if held {
        engine.remove(&entry.reference).await?;
        // The engine dropped its `RepoDigests` with the references and has
        // no call to add one: a pull by digest (the layers are here, so the
        // manifest only) records them again, when the registry answers.
        let has = engine.image(&id).await?.map(|i| i.repo_digests);
        if !entry.repo_digests.is_empty()
            && has.is_some_and(|h| entry.repo_digests.iter().any(|d| !h.contains(d)))
        {
            notes.push(match pull_by_digest(engine, policy, &entry, &id, audit).await? {
                Ok(_) => "its registry digest reference is back (pulled by digest)".to_string(),
                Err(errors) => format!(
                    "its registry digest references are not back (the registry did not give them: {}); its tags are",
                    errors.join("; ")
                ),
            });
        }
    }
    audit.append(&Record {
        ts: started,
        run: crate::reconcile::run_id(started),
        action: audit::Action::Restore,
        reference: entry.former.first().cloned(),
        image: Some(id.clone()),
        rule: Some("cli".to_string()),
        reason: format!(
            "restored from the trash (removed by {}): {}",
            entry.rule,
            entry.former.join(", ")
        ),
        outcome: Outcome::Ok,
        error: None,
        bytes: None,
        duration_ms: None,
        resumed_bytes: None,
    });
    Ok((id, entry, notes))
}

/// Whether `reference` is a `[[float]]` rule's tag.
fn floating(policy: &Policy, reference: &str, naming: crate::refs::Naming) -> bool {
    let (repo, tag) = split_tag(reference);
    policy
        .float
        .iter()
        .any(|f| Some(f.tag.as_str()) == tag && f.images.matches_repo(repo, naming))
}

/// After the window: the image back from a registry by a recorded digest
/// ([`pull_by_digest`]), or why not.
async fn pull_back<E: Engine>(
    engine: &E,
    policy: &Policy,
    entry: &Entry,
    id: &str,
    audit: &mut AuditLog,
) -> Result<String, Fatal> {
    if entry.repo_digests.is_empty() {
        return Err(Fatal::Message(
            Refused::Gone(format!(
                "{} left the trash and no registry digest of it is known (built here?): it cannot be restored",
                short_id(id)
            ))
            .to_string(),
        ));
    }
    pull_by_digest(engine, policy, entry, id, audit)
        .await?
        .map_err(|errors| {
            Fatal::Message(
                Refused::Gone(format!(
                    "{} left the trash and could not be pulled back: {}",
                    short_id(id),
                    errors.join("; ")
                ))
                .to_string(),
            )
        })
}

/// The image pulled by one of its recorded `RepoDigests` (the first that
/// gives it), through the content store as `stowage pull` does; else why
/// each failed.
async fn pull_by_digest<E: Engine>(
    engine: &E,
    policy: &Policy,
    entry: &Entry,
    id: &str,
    audit: &mut AuditLog,
) -> Result<Result<String, Vec<String>>, Fatal> {
    let clock = SystemClock;
    let shutdown = CancellationToken::new();
    let run_id = crate::reconcile::run_id(clock.now());
    let phase = transfer::Phase {
        engine,
        policy,
        run_id: &run_id,
        options: transfer::RunOptions {
            dry_run: false,
            force_refresh: true,
        },
        clock: &clock,
        shutdown: &shutdown,
    };
    let observed = observe::observe(engine).await?;
    let mut errors = Vec::new();
    for digest in &entry.repo_digests {
        let intent = match transfer::cli_intent(policy, &observed, digest, None) {
            Ok(i) => i,
            Err(e) => {
                errors.push(format!("{digest}: {e}"));
                continue;
            }
        };
        match transfer::pull_one(&phase, &intent, &observed, audit, None)
            .await
            .0
        {
            PullOutcome::Pulled { image } | PullOutcome::Tagged { image } if image == id => {
                return Ok(Ok(image));
            }
            // The image that digest names is here already: the same content.
            PullOutcome::UpToDate { .. } => return Ok(Ok(id.to_string())),
            PullOutcome::Pulled { image } | PullOutcome::Tagged { image } => {
                errors.push(format!("{digest} gave another image {image}"));
            }
            PullOutcome::Failed { error } => errors.push(format!("{digest}: {error}")),
            other => errors.push(format!("{digest}: {other:?}")),
        }
    }
    Ok(Err(errors))
}
