//! The engine's event stream, with a ping after each quiet deadline.

use std::collections::HashMap;

use bollard::models::EventMessageTypeEnum;
use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::StreamExt;

use super::DockerEngine;
use crate::engine::{BoxStream, Engine, EngineResult, Event, EventKind};

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
        let image = if kind == EventKind::Container {
            actor
                .attributes
                .as_ref()
                .and_then(|a| a.get("image").cloned())
        } else {
            None
        };
        Ok(Event {
            kind,
            action: message.action.unwrap_or_default(),
            id: actor.id.unwrap_or_default(),
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
