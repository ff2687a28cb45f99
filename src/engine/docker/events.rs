//! The engine's event stream, with a ping after each quiet deadline.

use std::collections::HashMap;

use bollard::models::EventMessageTypeEnum;
use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::StreamExt;

use super::{DockerEngine, podman};
use crate::engine::{BoxStream, Engine, EngineKind, EngineResult, Event, EventKind};

pub(super) fn events(engine: &DockerEngine) -> BoxStream<'_, EngineResult<Event>> {
    let filters = HashMap::from([("type", vec!["container", "image"])]);
    let options = EventsOptionsBuilder::new().filters(&filters).build();
    let events = engine.docker.events(Some(options)).map(move |message| {
        let message = message.map_err(|e| engine.error(e, "events"))?;
        let actor = message.actor.unwrap_or_default();
        let kind = match message.typ {
            Some(EventMessageTypeEnum::CONTAINER) => EventKind::Container,
            Some(EventMessageTypeEnum::IMAGE) => EventKind::Image,
            _ => EventKind::Other,
        };
        let attribute = |key: &str| {
            actor
                .attributes
                .as_ref()
                .and_then(|a| a.get(key))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let image = match kind {
            EventKind::Container => attribute("image").map(|i| engine.name_out(i)),
            _ => None,
        };
        let mut id = actor.id.unwrap_or_default();
        if engine.kind == EngineKind::Podman && kind == EventKind::Image {
            // Podman names an image by its bare hex id, and a `pull` only by
            // the reference in its `name` attribute.
            id = match attribute("name") {
                Some(name) if id.is_empty() => engine.name_out(name),
                _ => podman::image_id(&id),
            };
        }
        Ok(Event {
            kind,
            action: message.action.unwrap_or_default(),
            id,
            image,
            time: message.time.unwrap_or_default(),
        })
    });
    // A quiet stream is normal (no events for hours); a quiet engine
    // that no longer answers is not: after a quiet deadline, ping, and
    // end the stream with the ping's error.
    let state = Some(Box::pin(events));
    Box::pin(futures_util::stream::unfold(
        state,
        move |state| async move {
            let mut events = state?;
            loop {
                match tokio::time::timeout(engine.timeout, events.next()).await {
                    Ok(Some(item)) => return Some((item, Some(events))),
                    Ok(None) => return None,
                    Err(_) => {
                        if let Err(e) = engine.ping().await {
                            return Some((Err(e), None));
                        }
                    }
                }
            }
        },
    ))
}
