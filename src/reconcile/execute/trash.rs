//! One `trash` action: the image gets its `stowage-trash/` reference first,
//! then loses the references the plan takes off; the image itself is never
//! removed here (its window's expiry is a later `remove`, rule `trash`).

use std::path::Path;

use chrono::{DateTime, Utc};

use crate::engine::{Engine, EngineError, Removed};
use crate::plan::{Action, Trashing};
use crate::reconcile::trash_journal;
use crate::trash::{self, Entry};

/// What a trash did: what the engine untagged, and the state's entry.
pub(super) struct Trashed {
    pub removed: Removed,
    pub entry: Entry,
}

/// Carry out `a` as `t` says, or give why not (a skip). One inspect right
/// before: the image gone, tagged since planning with a reference the plan
/// does not take off, or used by a container created since (an image in use
/// is never untagged) is a skip.
pub(super) async fn trash<E: Engine>(
    engine: &E,
    a: &Action,
    t: Option<&Trashing>,
    started: DateTime<Utc>,
    journal: Option<&Path>,
) -> Result<Result<Trashed, String>, EngineError> {
    let Some(t) = t else {
        return Ok(Err("the plan has no trash target for it".to_string()));
    };
    let Some(img) = engine.image(&a.image).await? else {
        return Ok(Err(format!("{} is already gone", a.image)));
    };
    let mut former: Vec<String> = img
        .repo_tags
        .iter()
        .filter(|r| !trash::is_trash_repo(crate::refs::split_tag(r).0))
        .cloned()
        .collect();
    former.sort();
    if let Some(new) = former.iter().find(|r| t.refs.binary_search(r).is_err()) {
        return Ok(Err(format!(
            "{new} was given to the image since planning; it stays"
        )));
    }
    if let Some(c) = engine.containers_using(&a.image).await?.first() {
        return Ok(Err(format!(
            "image is now used by container {} (created since planning); never untagged",
            crate::fmt::short_id(&c.id)
        )));
    }
    let entry = Entry {
        reference: t.trash_ref.clone(),
        former,
        repo_digests: img.repo_digests.clone(),
        rule: a.rule.clone(),
        reason: a.reason.clone(),
        removed_at: started.timestamp(),
        expires: t.expires,
        size: img.size,
        gone_at: None,
    };
    // Journaled before the trash reference exists: a kill from here to the
    // state's save loses no former reference. A journal that cannot be
    // written (a full disk) does not stop the trash: the audit record still
    // names them.
    if let Some(path) = journal {
        let (path, image, e) = (path.to_path_buf(), a.image.clone(), entry.clone());
        let written =
            crate::blocking::off_loop(move || trash_journal::add(&path, &image, &e)).await;
        if let Err(e) = written {
            tracing::warn!(
                "cannot journal the trash of {} ({e}); a kill before the state's save would lose its former references",
                crate::fmt::short_id(&a.image)
            );
        }
    }
    // The trash reference first: from here on the image always has a name,
    // so taking the others off only untags.
    engine.tag(&a.image, &t.trash_ref).await?;
    let mut removed = Removed::default();
    for r in &entry.former {
        let done = engine.remove(r).await?;
        removed.untagged.extend(done.untagged);
        removed.deleted.extend(done.deleted);
    }
    Ok(Ok(Trashed { removed, entry }))
}
