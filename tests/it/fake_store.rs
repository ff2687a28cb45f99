//! Made-up stores for the planner, the executor on the fake engine and the
//! daemon loop: images, containers and policies in a few words, at a fixed
//! time (`stowage::fixture::FixedClock(NOW)` is its clock).

use std::path::Path;

use stowage::engine::{Container, Image};
use stowage::policy::{self, Policy};

/// The fixed "now" of planner tests.
pub const NOW: i64 = 1_800_000_000;
pub const DAY: i64 = 86_400;

/// An image id that starts with the hex of `name` (unique per name), so
/// rendered short ids stay recognisable.
pub fn id(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex:0<64}")
}

/// An image created `days` ago with the given references (none: dangling).
pub fn img(name: &str, days: f64, tags: &[&str]) -> Image {
    Image {
        id: id(name),
        repo_tags: tags.iter().map(|t| t.to_string()).collect(),
        repo_digests: vec![],
        created: NOW - (days * DAY as f64) as i64,
        size: 1_000_000,
    }
}

/// A stopped container using image `name`.
pub fn container(cid: &str, name: &str) -> Container {
    Container {
        id: format!("{cid:0<64}"),
        name: cid.to_string(),
        image_id: id(name),
        image: name.to_string(),
        state: "exited".into(),
    }
}

/// Parse a policy body; `version = 1` and a short `min_age` are added unless given.
pub fn policy(body: &str) -> Policy {
    let mut text = String::from("version = 1\n");
    if !body.contains("[daemon]") {
        text.push_str("[daemon]\nmin_age = \"1h\"\nstate_dir = \"/tmp/stowage-test-state\"\n");
    }
    text.push_str(body);
    match policy::parse(&text, Path::new("test.toml")) {
        Ok(p) => p,
        Err(d) => panic!("test policy invalid:\n{d}\n{text}"),
    }
}
