//! Engine events -> activity marks in the state.
//!
//! A container create/start marks its image used; an image pull/load marks it
//! pulled; a tag/import marks it seen. Marks are collected in memory
//! ([`Marks`]) and written by the daemon loop in batches between reconciles
//! (one state write per batch, not one fsync per event), and always before it
//! exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use crate::clock::Clock;
use crate::engine::{Engine, Event, EventKind, Image};
use crate::state::State;

/// Events arriving within this window after the first are resolved with one
/// image listing.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// At most this many events share one listing.
const MAX_BATCH: usize = 256;

/// Activity seen in events, not yet written to the state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Marks {
    /// Image id -> latest use (Unix seconds).
    pub used: HashMap<String, i64>,
    /// Image id -> latest pull or load.
    pub pulled: HashMap<String, i64>,
    /// Image id -> (creation time, when seen): tagged or imported.
    pub seen: HashMap<String, (i64, i64)>,
    /// Image id -> held out of retention until (`restore --protect`).
    pub held: HashMap<String, i64>,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
            && self.pulled.is_empty()
            && self.seen.is_empty()
            && self.held.is_empty()
    }

    pub fn len(&self) -> usize {
        self.used.len() + self.pulled.len() + self.seen.len() + self.held.len()
    }

    /// Folds `other` in, keeping the latest time of each kind.
    pub fn merge(&mut self, other: Marks) {
        for (id, t) in other.used {
            let e = self.used.entry(id).or_insert(t);
            *e = (*e).max(t);
        }
        for (id, t) in other.pulled {
            let e = self.pulled.entry(id).or_insert(t);
            *e = (*e).max(t);
        }
        for (id, t) in other.held {
            let e = self.held.entry(id).or_insert(t);
            *e = (*e).max(t);
        }
        for (id, v) in other.seen {
            self.seen.entry(id).or_insert(v);
        }
    }

    /// Writes the marks into `state`.
    pub fn apply(&self, state: &mut State) {
        for (id, (created, at)) in &self.seen {
            state.observe(id, *created, *at);
        }
        for (id, t) in &self.pulled {
            state.mark_pulled(id, *t);
        }
        for (id, t) in &self.used {
            state.mark_used(id, *t);
        }
        for (id, t) in &self.held {
            let e = state.held.entry(id.clone()).or_insert(*t);
            *e = (*e).max(*t);
        }
    }
}

/// Marks shared between the event watcher (adds) and the daemon loop (takes).
pub type SharedMarks = Arc<Mutex<Marks>>;

/// Takes every pending mark, leaving none.
pub fn take(marks: &SharedMarks) -> Marks {
    std::mem::take(&mut *marks.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Puts marks back (after a failed write), so they are written next time.
pub fn put_back(marks: &SharedMarks, back: Marks) {
    marks.lock().unwrap_or_else(|e| e.into_inner()).merge(back);
}

/// What an event means for the state, before its image is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    /// The image `reference` (as the event names it) was used by `container`.
    Used {
        container: String,
        reference: Option<String>,
    },
    Pulled(String),
    Seen(String),
}

fn wanted(event: &Event) -> Option<Wanted> {
    match (event.kind, event.action.as_str()) {
        (EventKind::Container, "create" | "start") => Some(Wanted::Used {
            container: event.id.clone(),
            reference: event.image.clone(),
        }),
        (EventKind::Image, "pull" | "load") => Some(Wanted::Pulled(event.id.clone())),
        (EventKind::Image, "tag" | "import") => Some(Wanted::Seen(event.id.clone())),
        _ => None,
    }
}

/// The image an event's reference names: a full id, a short id, `repo:tag`
/// (a bare `repo` means `:latest`) or `repo@sha256:...`. Pure.
pub fn resolve_image<'a>(images: &'a [Image], reference: &str) -> Option<&'a Image> {
    if reference.starts_with("sha256:") {
        return images.iter().find(|i| i.id == reference);
    }
    if reference.contains('@') {
        return images
            .iter()
            .find(|i| i.repo_digests.iter().any(|d| d == reference));
    }
    if let Some(i) = images
        .iter()
        .find(|i| i.repo_tags.iter().any(|t| t == reference))
    {
        return Some(i);
    }
    // A colon after the last `/` is a tag; before it, a registry port.
    let has_tag = reference
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'));
    if !has_tag {
        let latest = format!("{reference}:latest");
        if let Some(i) = images.iter().find(|i| i.repo_tags.contains(&latest)) {
            return Some(i);
        }
    }
    // A short id: unique hex prefix of at least 12 digits, as the CLI prints.
    if reference.len() >= 12 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut found = images
            .iter()
            .filter(|i| i.id.trim_start_matches("sha256:").starts_with(reference));
        let first = found.next()?;
        return found.next().is_none().then_some(first);
    }
    None
}

/// Resolves a batch of events to marks with one image listing (and one
/// container listing when a container's image cannot be found by name).
async fn resolve<E: Engine>(engine: &E, batch: &[Wanted], at: i64) -> Marks {
    let mut marks = Marks::default();
    let images = match engine.list_images().await {
        Ok(images) => images,
        Err(e) => {
            tracing::debug!(
                "events: cannot list images to resolve {} event(s): {e}",
                batch.len()
            );
            return marks;
        }
    };
    let mut containers = None;
    for w in batch {
        match w {
            Wanted::Used {
                container,
                reference,
            } => {
                let by_name = reference
                    .as_deref()
                    .and_then(|r| resolve_image(&images, r))
                    .map(|i| i.id.clone());
                let id = match by_name {
                    Some(id) => Some(id),
                    None => {
                        // The event's `image` may be missing or name a tag that
                        // moved since; the container itself knows its image id.
                        if containers.is_none() {
                            containers = engine.list_containers().await.ok();
                        }
                        containers.as_ref().and_then(|cs| {
                            cs.iter()
                                .find(|c| c.id == *container)
                                .map(|c| c.image_id.clone())
                        })
                    }
                };
                match id {
                    Some(id) => {
                        marks.used.insert(id, at);
                    }
                    None => tracing::debug!(
                        "events: image of container {container} ({reference:?}) not found"
                    ),
                }
            }
            Wanted::Pulled(r) => {
                if let Some(i) = resolve_image(&images, r) {
                    marks.pulled.insert(i.id.clone(), at);
                }
            }
            Wanted::Seen(r) => {
                if let Some(i) = resolve_image(&images, r) {
                    marks.seen.entry(i.id.clone()).or_insert((i.created, at));
                }
            }
        }
    }
    marks
}

/// Follows the engine's event stream until it ends or fails, adding marks.
/// Returns why it ended (`None`: the engine closed the stream).
/// `on_pulled` runs after a batch holding image pulls or loads: disk
/// pressure is checked then, not only on the schedule.
pub async fn watch<E: Engine>(
    engine: Arc<E>,
    marks: SharedMarks,
    clock: Arc<dyn Clock>,
    on_pulled: Arc<dyn Fn() + Send + Sync>,
) -> Option<String> {
    let mut stream = engine.events();
    loop {
        let mut batch = Vec::new();
        let mut ended = None;
        match stream.next().await {
            Some(Ok(ev)) => batch.extend(wanted(&ev)),
            Some(Err(e)) => return Some(e.to_string()),
            None => return None,
        }
        if batch.is_empty() {
            continue;
        }
        // Gather a burst (e.g. a compose project starting) for one listing.
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(ev))) => batch.extend(wanted(&ev)),
                Ok(Some(Err(e))) => {
                    ended = Some(Some(e.to_string()));
                    break;
                }
                Ok(None) => {
                    ended = Some(None);
                    break;
                }
                Err(_) => break,
            }
        }
        let found = resolve(&*engine, &batch, clock.now().timestamp()).await;
        tracing::debug!(
            "events: {} event(s) -> {} mark(s)",
            batch.len(),
            found.len()
        );
        let pulled = !found.pulled.is_empty();
        put_back(&marks, found);
        if pulled {
            on_pulled();
        }
        if let Some(why) = ended {
            return why;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, tags: &[&str], digests: &[&str]) -> Image {
        Image {
            id: format!("sha256:{id:0<64}"),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            created: 10,
            size: 1,
        }
    }

    #[test]
    fn resolves_every_form_an_event_uses() {
        let images = vec![
            image(
                "aa11",
                &["nginx:latest", "nginx:1.25"],
                &["nginx@sha256:dd"],
            ),
            image("bb22", &["127.0.0.1:5000/team/app:v1"], &[]),
            image("bb23", &["127.0.0.1:5000/team/app:latest"], &[]),
        ];
        let id = |r: &str| resolve_image(&images, r).map(|i| &i.id[7..11]);
        assert_eq!(id("nginx"), Some("aa11"));
        assert_eq!(id("nginx:1.25"), Some("aa11"));
        assert_eq!(id("nginx@sha256:dd"), Some("aa11"));
        assert_eq!(id(&images[0].id), Some("aa11"));
        assert_eq!(id("aa1100000000"), Some("aa11"));
        assert_eq!(id("127.0.0.1:5000/team/app:v1"), Some("bb22"));
        assert_eq!(id("127.0.0.1:5000/team/app"), Some("bb23"));
        // Ambiguous or too short prefixes and unknown names resolve to nothing.
        assert_eq!(id("bb2"), None);
        assert_eq!(id("redis"), None);
        assert_eq!(id("sha256:ffff"), None);
    }

    #[test]
    fn marks_keep_the_latest_time_and_apply_to_state() {
        let mut a = Marks::default();
        a.used.insert("x".into(), 100);
        let mut b = Marks::default();
        b.used.insert("x".into(), 90);
        b.pulled.insert("y".into(), 80);
        b.seen.insert("z".into(), (5, 70));
        a.merge(b);
        assert_eq!(a.used["x"], 100);
        assert_eq!(a.len(), 3);
        let mut state = State {
            initialized: true,
            ..State::default()
        };
        a.apply(&mut state);
        assert_eq!(state.images["x"].last_used, Some(100));
        assert_eq!(state.images["y"].last_pulled, Some(80));
        assert_eq!(state.images["z"].first_seen, 70);
    }

    #[test]
    fn only_activity_events_count() {
        let ev = |kind: EventKind, action: &str| Event {
            kind,
            action: action.into(),
            id: "c1".into(),
            image: Some("nginx".into()),
            time: 0,
        };
        assert!(matches!(
            wanted(&ev(EventKind::Container, "start")),
            Some(Wanted::Used { .. })
        ));
        assert!(matches!(
            wanted(&ev(EventKind::Container, "create")),
            Some(Wanted::Used { .. })
        ));
        assert_eq!(wanted(&ev(EventKind::Container, "die")), None);
        assert_eq!(
            wanted(&ev(EventKind::Image, "pull")),
            Some(Wanted::Pulled("c1".into()))
        );
        assert_eq!(
            wanted(&ev(EventKind::Image, "tag")),
            Some(Wanted::Seen("c1".into()))
        );
        assert_eq!(wanted(&ev(EventKind::Image, "delete")), None);
    }
}
