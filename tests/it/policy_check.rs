//! Policy parsing and validation: broken policies with exact positions, a full
//! valid policy with its defaults, the shipped examples, property tests that
//! nothing panics, and `stowage check` end to end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use proptest::prelude::*;
use stowage::policy::{
    self, Diagnostics, EvictOrder, FloatOrder, OnViolation, Order, Policy, Refresh, RetainScope,
};
use stowage::refs::Naming::{Docker, Podman};

const HEX: &str = "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";

fn parse(text: &str) -> Result<Policy, Diagnostics> {
    policy::parse(text, Path::new("/etc/stowage/policy.toml"))
}

fn errors(text: &str) -> Diagnostics {
    match parse(text) {
        Ok(_) => panic!("expected errors, policy parsed:\n{text}"),
        Err(d) => d,
    }
}

/// Exactly one diagnostic, at `pos` ("LINE:COL"), whose message contains `needle`.
#[track_caller]
fn one_error(text: &str, pos: &str, needle: &str) {
    let d = errors(text);
    assert_eq!(
        d.len(),
        1,
        "expected one diagnostic, got:\n{d}\n---\n{text}"
    );
    assert_has(&d, pos, needle);
}

#[track_caller]
fn assert_has(d: &Diagnostics, pos: &str, needle: &str) {
    let found = d.iter().any(|x| {
        format!("{}:{}", x.line.unwrap_or(0), x.col.unwrap_or(0)) == pos
            && x.message.contains(needle)
    });
    assert!(
        found,
        "no diagnostic at {pos} containing {needle:?} in:\n{d}"
    );
}

// ---------------------------------------------------------------- broken ----

#[test]
fn syntax_error() {
    one_error(
        "version = 1\n[daemon\nwatch = true\n",
        "2:8",
        "invalid TOML",
    );
}

#[test]
fn syntax_error_duplicate_key() {
    one_error("version = 1\nversion = 1\n", "2:1", "duplicate key");
}

#[test]
fn version_missing() {
    one_error(
        "[daemon]\nwatch = true\n",
        "1:1",
        "missing required key `version`",
    );
}

#[test]
fn version_not_one() {
    one_error("version = 2\n", "1:11", "unsupported policy version 2");
}

#[test]
fn version_wrong_type() {
    one_error(
        "version = \"1\"\n",
        "1:11",
        "version: expected the integer 1",
    );
}

#[test]
fn unknown_top_level_key() {
    one_error(
        "version = 1\nretian = []\n",
        "2:1",
        "did you mean `retain`?",
    );
}

#[test]
fn daemon_key_at_top_level() {
    one_error(
        "version = 1\nmin_age = \"1h\"\n",
        "2:1",
        "unknown key `min_age` at the top level; it belongs in [daemon]",
    );
}

#[test]
fn unknown_key_in_retain_suggests() {
    one_error(
        "version = 1\n[[retain]]\nname = \"old-builds\"\nimages = [\"a\"]\nkeep_lst = 3\n",
        "5:1",
        "unknown key `keep_lst` in [[retain]] \"old-builds\"; did you mean `keep_last`?",
    );
}

#[test]
fn unknown_key_in_every_table() {
    let text = r#"version = 1
[daemon]
bogus1 = 1
[[retain]]
name = "r"
untagged = true
bogus2 = 1
[[protect]]
images = ["a"]
bogus3 = 1
[[tags]]
name = "t"
images = ["a"]
allow = ["x"]
bogus4 = 1
[[float]]
name = "f"
images = ["a"]
tag = "stable"
follow = 'v\d+'
bogus5 = 1
[[prepull]]
image = "nginx:1.25"
bogus6 = 1
[[mirror]]
name = "m"
registry = "10.0.0.5:5000"
images = ["a"]
bogus7 = 1
[storage]
max_size = "1GB"
bogus8 = 1
"#;
    let d = errors(text);
    assert_eq!(d.len(), 8, "{d}");
    for (i, line) in [3, 7, 10, 15, 21, 24, 29, 32].into_iter().enumerate() {
        assert_has(
            &d,
            &format!("{line}:1"),
            &format!("unknown key `bogus{}`", i + 1),
        );
    }
    assert_has(&d, "10:1", "in [[protect]] #1");
    assert_has(&d, "32:1", "in [storage]");
}

#[test]
fn wrong_type() {
    one_error(
        "version = 1\n[daemon]\nwatch = \"yes\"\n",
        "3:9",
        "daemon.watch: invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn wrong_type_in_array_points_at_the_element() {
    one_error(
        "version = 1\n[[protect]]\nimages = [\"a\", 3]\n",
        "3:16",
        "protect[1].images: invalid type: integer `3`, expected a string",
    );
}

#[test]
fn wrong_type_is_not_also_missing() {
    // `name = 7` is reported as a type error, not also as a missing name.
    one_error(
        "version = 1\n[[retain]]\nname = 7\nuntagged = true\n",
        "3:8",
        "retain[1].name: invalid type",
    );
}

#[test]
fn mistyped_untagged_is_not_also_missing_images() {
    one_error(
        "version = 1\n[[retain]]\nname = \"d\"\nuntagged = \"yes\"\n",
        "4:12",
        "retain[1].untagged: invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn daemon_as_array_of_tables() {
    one_error(
        "version = 1\n[[daemon]]\nwatch = true\n",
        "2:1",
        "`daemon` must be a single table",
    );
}

#[test]
fn retain_as_single_table() {
    one_error(
        "version = 1\n[retain]\nname = \"x\"\n",
        "2:1",
        "write [[retain]], not [retain]",
    );
}

#[test]
fn bad_regex() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nimages = [\"a\"]\ntags = [\"ok\", \"v[0-9\"]\n",
        "5:15",
        "retain[1].tags[2]: invalid regex \"v[0-9\": unclosed character class",
    );
}

#[test]
fn bad_glob() {
    one_error(
        "version = 1\n[[protect]]\nimages = [\"team/{a,b\"]\n",
        "3:11",
        "protect[1].images[1]: invalid glob \"team/{a,b\": unclosed alternate group",
    );
}

#[test]
fn glob_with_tag() {
    one_error(
        "version = 1\n[[protect]]\nimages = [\"nginx:1.25\"]\n",
        "3:11",
        "includes a tag or digest",
    );
}

#[test]
fn empty_images() {
    one_error(
        "version = 1\n[[protect]]\nimages = []\n",
        "3:10",
        "protect[1].images: must not be empty",
    );
}

#[test]
fn bad_cron_five_fields() {
    one_error(
        "version = 1\n[daemon]\nschedule = \"*/10 * * * *\"\n",
        "3:12",
        "daemon.schedule: invalid cron expression \"*/10 * * * *\": expected 6 fields with seconds first",
    );
}

#[test]
fn bad_cron_field_value() {
    one_error(
        "version = 1\n[daemon]\nschedule = \"0 */61 * * * *\"\n",
        "3:12",
        "Minutes must be between",
    );
}

#[test]
fn bad_duration() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nuntagged = true\nkeep_within = \"3 parsecs\"\n",
        "5:15",
        "retain[1].keep_within: invalid duration \"3 parsecs\"",
    );
}

#[test]
fn bad_size() {
    one_error(
        "version = 1\n[storage]\nmax_size = \"20 GB GB\"\n",
        "3:12",
        "storage.max_size: invalid size \"20 GB GB\"",
    );
}

#[test]
fn audit_max_is_a_size_of_at_least_64kib() {
    let p = parse("version = 1\n[daemon]\naudit_max = \"2MiB\"\n").unwrap();
    assert_eq!(p.daemon.audit_max, 2 << 20);
    one_error(
        "version = 1\n[daemon]\naudit_max = \"lots\"\n",
        "3:13",
        "daemon.audit_max: invalid size \"lots\"",
    );
    one_error(
        "version = 1\n[daemon]\naudit_max = 100\n",
        "3:13",
        "daemon.audit_max: 100 bytes is too small; at least 64KiB",
    );
}

#[test]
fn cache_dir_follows_state_dir_and_cache_max_is_a_size() {
    let p = parse("version = 1\n").unwrap();
    assert_eq!(p.daemon.cache_dir, PathBuf::from("/var/lib/stowage/cache"));
    assert_eq!(p.daemon.cache_max, 0);
    let p = policy::parse(
        "version = 1\n[daemon]\nstate_dir = \"st\"\ncache_max = \"2GiB\"\n",
        Path::new("/srv/fleet/policy.toml"),
    )
    .unwrap();
    assert_eq!(p.daemon.cache_dir, PathBuf::from("/srv/fleet/st/cache"));
    assert_eq!(p.daemon.cache_max, 2 << 30);
    // Its own path wins wherever the keys are written, relative to the policy.
    let p = policy::parse(
        "version = 1\n[daemon]\ncache_dir = \"blobs\"\nstate_dir = \"/st\"\ncache_max = 0\n",
        Path::new("/srv/fleet/policy.toml"),
    )
    .unwrap();
    assert_eq!(p.daemon.cache_dir, PathBuf::from("/srv/fleet/blobs"));
    assert_eq!(p.daemon.cache_max, 0);
    one_error(
        "version = 1\n[daemon]\ncache_max = \"lots\"\n",
        "3:13",
        "daemon.cache_max: invalid size \"lots\"",
    );
    one_error(
        "version = 1\n[daemon]\ncache_max = -1\n",
        "3:13",
        "daemon.cache_max: invalid size -1: must not be negative",
    );
    one_error(
        "version = 1\n[daemon]\ncache_dir = \"\"\n",
        "3:13",
        "daemon.cache_dir: must not be empty",
    );
}

#[test]
fn negative_size() {
    one_error(
        "version = 1\n[storage]\nbuild_cache_max = -5\n",
        "3:19",
        "storage.build_cache_max: invalid size -5: must not be negative",
    );
}

#[test]
fn bad_percentage() {
    one_error(
        "version = 1\n[storage]\nhigh_watermark = \"185%\"\nlow_watermark = \"70%\"\n",
        "3:18",
        "storage.high_watermark: invalid percentage \"185%\": must be between 0% and 100%",
    );
}

#[test]
fn percentage_needs_percent_sign() {
    one_error(
        "version = 1\n[storage]\nhigh_watermark = \"85\"\nlow_watermark = \"70%\"\n",
        "3:18",
        "expected a percentage like \"85%\"",
    );
}

#[test]
fn low_watermark_not_below_high() {
    one_error(
        "version = 1\n[storage]\nhigh_watermark = \"80%\"\nlow_watermark = \"80%\"\n",
        "4:17",
        "storage.low_watermark: 80% must be below high_watermark (80%)",
    );
}

#[test]
fn only_one_watermark() {
    one_error(
        "version = 1\n[storage]\nhigh_watermark = \"80%\"\n",
        "3:18",
        "set together with `low_watermark`",
    );
}

#[test]
fn storage_without_target() {
    one_error(
        "version = 1\n[storage]\norder = \"lru\"\n",
        "2:1",
        "[storage]: sets no target",
    );
}

#[test]
fn duplicate_names_across_kinds() {
    one_error(
        "version = 1\n[[retain]]\nname = \"x\"\nuntagged = true\n[[mirror]]\nname = \"x\"\nregistry = \"r.example.com\"\nimages = [\"a\"]\n",
        "6:8",
        "mirror[1].name: duplicate rule name \"x\", already used by [[retain]] at line 3",
    );
}

#[test]
fn explicit_name_collides_with_default_protect_name() {
    one_error(
        "version = 1\n[[protect]]\nimages = [\"a\"]\n[[protect]]\nname = \"protect[1]\"\nimages = [\"b\"]\n",
        "5:8",
        "duplicate rule name \"protect[1]\"",
    );
}

#[test]
fn untagged_with_images() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nuntagged = true\nimages = [\"a\"]\n",
        "5:10",
        "retain[1].images: not allowed with `untagged = true`",
    );
}

#[test]
fn untagged_with_tags() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nuntagged = true\ntags = [\"a\"]\n",
        "5:8",
        "retain[1].tags: not allowed with `untagged = true`",
    );
}

#[test]
fn retain_without_images_or_untagged() {
    one_error(
        "version = 1\n\n[[retain]]\nname = \"r\"\nkeep_last = 3\n",
        "3:1",
        "retain[1]: missing `images`",
    );
}

#[test]
fn missing_name() {
    one_error(
        "version = 1\n[[tags]]\nimages = [\"a\"]\nallow = [\"x\"]\n",
        "2:1",
        "tags[1]: missing required key `name`",
    );
}

#[test]
fn group_by_needs_one_capture_group() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nimages = [\"a\"]\nkeep_last = 2\ngroup_by = '(\\w+)-(\\d+)'\n",
        "6:12",
        "retain[1].group_by: needs exactly one capture group, found 2",
    );
}

#[test]
fn group_by_without_keep_last() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nimages = [\"a\"]\ngroup_by = '(.+)-\\d+'\n",
        "5:12",
        "retain[1].group_by: only affects `keep_last`",
    );
}

#[test]
fn bad_order() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nimages = [\"a\"]\nkeep_last = 2\norder = \"newest\"\n",
        "6:9",
        "retain[1].order: \"newest\" is not one of \"created\", \"semver\", \"last_used\"",
    );
}

#[test]
fn bad_order_suggests() {
    one_error(
        "version = 1\n[storage]\nmax_size = 1000\norder = \"lur\"\n",
        "4:9",
        "did you mean \"lru\"?",
    );
}

#[test]
fn bad_on_violation() {
    one_error(
        "version = 1\n[[tags]]\nname = \"t\"\nimages = [\"a\"]\nallow = [\"x\"]\non_violation = \"delete\"\n",
        "6:16",
        "tags[1].on_violation: \"delete\" is not one of \"warn\", \"untag\"",
    );
}

#[test]
fn keep_last_zero() {
    one_error(
        "version = 1\n[[retain]]\nname = \"r\"\nimages = [\"a\"]\nkeep_last = 0\n",
        "5:13",
        "retain[1].keep_last: must be at least 1, got 0",
    );
}

#[test]
fn negative_keep_previous() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\nkeep_previous = -1\n",
        "4:17",
        "prepull[1].keep_previous: must not be negative, got -1",
    );
}

#[test]
fn concurrency_zero() {
    one_error(
        "version = 1\n[daemon]\nconcurrency = 0\n",
        "3:15",
        "daemon.concurrency: must be at least 1, got 0",
    );
}

#[test]
fn prepull_image_not_a_reference() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"Team/App:1\"\n",
        "3:9",
        "prepull[1].image: invalid reference \"Team/App:1\": repository names must be lowercase",
    );
}

#[test]
fn prepull_image_without_tag() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx\"\n",
        "3:9",
        "needs a tag or a digest",
    );
}

#[test]
fn prepull_bad_digest() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\ndigest = \"sha256:abc\"\n",
        "4:10",
        "prepull[1].digest: invalid digest \"sha256:abc\"",
    );
}

#[test]
fn prepull_bad_refresh() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\nrefresh = \"daily\"\n",
        "4:11",
        "prepull[1].refresh: expected a cron expression or \"never\"",
    );
}

#[test]
fn prepull_bad_source() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\nsources = [\"ok.example.com\", \"https://mirror.local\"]\n",
        "4:30",
        "prepull[1].sources[2]: invalid registry \"https://mirror.local\": write host[:port] without a scheme",
    );
}

#[test]
fn prepull_bad_platform() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\nplatform = \"arm64\"\n",
        "4:12",
        "prepull[1].platform: invalid platform \"arm64\": expected os/arch[/variant]",
    );
}

#[test]
fn prepull_listed_twice() {
    one_error(
        "version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\n[[prepull]]\nimage = \"nginx:1.25\"\n",
        "5:9",
        "prepull[2].image: \"nginx:1.25\" is already listed in prepull[1]",
    );
}

#[test]
fn mirror_bad_registry() {
    one_error(
        "version = 1\n[[mirror]]\nname = \"m\"\nregistry = \"host:99999\"\nimages = [\"a\"]\n",
        "4:12",
        "mirror[1].registry: invalid registry \"host:99999\": invalid port",
    );
}

#[test]
fn registry_not_allowed() {
    one_error(
        "version = 1\n[daemon]\nallowed_registries = [\"docker.io\"]\n[[mirror]]\nname = \"m\"\nregistry = \"10.0.0.5:5000\"\nimages = [\"a\"]\n",
        "6:12",
        "mirror[1].registry: \"10.0.0.5:5000\" is not in daemon.allowed_registries",
    );
}

#[test]
fn float_bad_tag() {
    one_error(
        "version = 1\n[[float]]\nname = \"f\"\nimages = [\"a\"]\ntag = \"-stable\"\nfollow = 'v\\d+'\n",
        "5:7",
        "float[1].tag: invalid tag \"-stable\"",
    );
}

#[test]
fn float_follow_matches_own_tag() {
    one_error(
        "version = 1\n[[float]]\nname = \"f\"\nimages = [\"a\"]\ntag = \"stable\"\nfollow = '.*'\n",
        "6:10",
        "matches the floating tag \"stable\" itself",
    );
}

#[test]
fn metrics_not_host_port() {
    one_error(
        "version = 1\n[daemon]\nmetrics = \"9184\"\n",
        "3:11",
        "daemon.metrics: expected host:port",
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    // "é" is two bytes in UTF-8; the column must still be the 13th character.
    one_error(
        "version = 1\n[[retain]]\nname = \"é\"\nimages = [\"a\"]\nkeep_last = 0 # é\n",
        "5:13",
        "keep_last",
    );
    one_error(
        "version = 1\n[[protect]]\nname = \"é\" ; images = [\"a\"]\n",
        "3:12",
        "invalid TOML",
    );
}

#[test]
fn every_error_is_reported_across_the_file() {
    let text = r#"version = 1

[daemon]
schedule = "every minute"
concurrency = 0
colour = "blue"

[[retain]]
name = "builds"
images = ["team/*"]
tags = ["v[0-9"]
keep_lst = 3

[[retain]]
name = "builds"
untagged = true
keep_within = "3 parsecs"

[[prepull]]
image = "nginx"
digest = "md5:abc"

[storage]
high_watermark = "90%"
low_watermark = "95%"
max_size = "lots"
"#;
    let d = errors(text);
    let expected = [
        ("4:12", "daemon.schedule: invalid cron expression"),
        ("5:15", "daemon.concurrency: must be at least 1"),
        ("6:1", "unknown key `colour` in [daemon]"),
        ("11:9", "retain[1].tags[1]: invalid regex"),
        ("12:1", "did you mean `keep_last`?"),
        ("15:8", "retain[2].name: duplicate rule name \"builds\""),
        ("17:15", "retain[2].keep_within: invalid duration"),
        ("20:9", "prepull[1].image: invalid reference"),
        ("21:10", "prepull[1].digest: invalid digest"),
        ("25:17", "storage.low_watermark: 95% must be below"),
        ("26:12", "storage.max_size: invalid size"),
    ];
    for (pos, needle) in expected {
        assert_has(&d, pos, needle);
    }
    assert_eq!(d.len(), expected.len(), "{d}");
    // Sorted by position, each line in the FILE:LINE:COL: error: format.
    let lines: Vec<String> = d.to_string().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), expected.len());
    for (line, (pos, _)) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(&format!("/etc/stowage/policy.toml:{pos}: error: ")),
            "{line}"
        );
    }
}

#[test]
fn unreadable_file_is_one_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let d = policy::load(&path).unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!(d.0[0].line, None);
    let shown = d.to_string();
    assert!(
        shown.starts_with(&format!("{}: error: cannot read policy: ", path.display())),
        "{shown}"
    );
    // A directory is unreadable as a policy too.
    assert!(
        policy::load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("cannot read policy")
    );
}

// ----------------------------------------------------------------- valid ----

#[test]
fn minimal_policy_gets_every_default() {
    let p = parse("version = 1\n").unwrap();
    let d = &p.daemon;
    assert_eq!(d.schedule.source, "0 */10 * * * *");
    assert!(d.watch);
    assert_eq!(d.state_dir, PathBuf::from("/var/lib/stowage"));
    assert_eq!(d.audit_log, PathBuf::from("/var/lib/stowage/audit.jsonl"));
    assert!(!d.dry_run);
    assert_eq!(d.min_age, Duration::from_secs(3600));
    assert_eq!(d.max_removals, 100);
    assert_eq!(d.concurrency, 2);
    assert_eq!(d.retry_max, Duration::from_secs(900));
    assert_eq!(d.stall_timeout, Duration::from_secs(120));
    assert_eq!(d.audit_max, 50_000_000);
    assert_eq!(d.allowed_registries, None);
    assert_eq!(d.control_socket, PathBuf::from("/run/stowage/control.sock"));
    assert_eq!(d.metrics, None);
    assert_eq!(d.credentials_file, None);
    assert!(p.retain.is_empty() && p.storage.is_none());
    assert_eq!(p.source, PathBuf::from("/etc/stowage/policy.toml"));
    assert_eq!(
        p.summary(),
        "policy OK: 0 retain, 0 protect, 0 tags, 0 float, 0 prepull, 0 mirror rules; storage off; schedule \"0 */10 * * * *\""
    );
}

const FULL: &str = r#"
version = 1

[daemon]
schedule = "0 0 * * * *"
watch = false
state_dir = "state"
dry_run = true
min_age = "30m"
max_removals = 0
concurrency = 4
retry_max = "1h"
allowed_registries = ["index.docker.io", "10.0.0.5:5000"]
metrics = ":9184"
credentials_file = "creds/config.json"

[[retain]]
name = "releases"
images = ["team/*", "127.0.0.1:5000/**"]
tags = ['v\d+\.\d+\.\d+']
keep_last = 3
order = "semver"

[[retain]]
name = "branches"
images = ["team/*"]
keep_last = 2
group_by = '(.+)-\d+'
keep_within = "2w"

[[retain]]
name = "dangling"
untagged = true

[[protect]]
images = ["debian"]

[[tags]]
name = "style"
images = ["team/*"]
allow = ['v\d+\.\d+\.\d+', "stable"]
on_violation = "untag"

[[float]]
name = "stable"
images = ["team/*"]
tag = "stable"
follow = 'v\d+\.\d+\.\d+'
order = "created"

[[prepull]]
image = "nginx:1.25"
sources = ["10.0.0.5:5000"]

[[prepull]]
image = "10.0.0.5:5000/team/app:v1.0.0"
digest = "sha256:HEX"
platform = "linux/arm/v7"
refresh = "never"
keep_previous = 2

[[mirror]]
name = "site"
registry = "10.0.0.5:5000"
images = ["team/*"]
prefix = "edge/cache"

[storage]
max_size = "1.5GB"
high_watermark = "90%"
low_watermark = "75.5%"
build_cache_max = 1024
"#;

#[test]
fn full_policy_parses_with_values_and_defaults() {
    let text = FULL.replace("HEX", HEX);
    let p = policy::parse(&text, Path::new("/srv/fleet/policy.toml")).unwrap();
    let d = &p.daemon;
    assert!(!d.watch && d.dry_run);
    // Relative paths resolve against the policy file's folder.
    assert_eq!(d.state_dir, PathBuf::from("/srv/fleet/state"));
    assert_eq!(d.audit_log, PathBuf::from("/srv/fleet/state/audit.jsonl"));
    assert_eq!(
        d.credentials_file,
        Some(PathBuf::from("/srv/fleet/creds/config.json"))
    );
    assert_eq!(d.min_age, Duration::from_secs(1800));
    assert_eq!((d.max_removals, d.concurrency), (0, 4));
    // Docker Hub aliases are normalised.
    assert_eq!(
        d.allowed_registries,
        Some(vec!["docker.io".to_owned(), "10.0.0.5:5000".to_owned()])
    );
    assert_eq!(d.metrics.as_deref(), Some("127.0.0.1:9184"));

    assert_eq!(p.retain.len(), 3);
    let r = &p.retain[0];
    assert_eq!((r.keep_last, r.order), (Some(3), Order::Semver));
    let RetainScope::Tagged(scope) = &r.scope else {
        panic!("tagged")
    };
    // `*` stays in one segment, `**` crosses; tags are anchored.
    assert!(scope.matches("team/app", "v1.2.3", Docker));
    assert!(!scope.matches("team/app/sub", "v1.2.3", Docker));
    assert!(scope.matches("127.0.0.1:5000/team/app", "v1.2.3", Docker));
    assert!(!scope.matches("team/app", "v1.2.3-rc1", Docker));
    assert!(!scope.matches("team/app", "xv1.2.3", Docker));
    // On Podman a local image is `localhost/team/app`: the same glob takes
    // it; on Docker `localhost/` is a registry on this host, and stays out.
    assert!(scope.matches("localhost/team/app", "v1.2.3", Podman));
    assert!(!scope.matches("localhost/team/app/sub", "v1.2.3", Podman));
    assert!(!scope.matches("localhost/team/app", "v1.2.3", Docker));
    // A Docker Hub repository answers to its full name too.
    assert!(scope.matches("team/app", "v1.2.3", Podman));
    let b = &p.retain[1];
    assert_eq!(b.order, Order::Created);
    assert_eq!(b.keep_within, Some(Duration::from_secs(14 * 86400)));
    let g = b.group_by.as_ref().unwrap();
    assert_eq!(&g.captures("main-12").unwrap()[1], "main");
    assert!(matches!(p.retain[2].scope, RetainScope::Untagged));
    assert_eq!(p.retain[2].keep_last, None);

    assert_eq!(p.protect[0].name, "protect[1]");
    assert!(p.protect[0].scope.matches("debian", "anything", Docker));
    assert_eq!(p.tags[0].on_violation, OnViolation::Untag);
    assert!(p.tags[0].allow.is_match("stable") && !p.tags[0].allow.is_match("stable2"));
    assert_eq!(p.float[0].order, FloatOrder::Created);
    assert!(p.float[0].follow.is_match("v1.0.0") && !p.float[0].follow.is_match("v1.0.0x"));

    assert!(matches!(p.prepull[0].refresh, Refresh::Daemon));
    assert_eq!(p.prepull[0].keep_previous, 0);
    assert_eq!(p.prepull[0].sources, vec!["10.0.0.5:5000".to_owned()]);
    assert!(matches!(p.prepull[1].refresh, Refresh::Never));
    assert_eq!(
        p.prepull[1].digest.as_deref(),
        Some(&*format!("sha256:{HEX}"))
    );
    assert_eq!(p.prepull[1].platform.as_deref(), Some("linux/arm/v7"));
    assert_eq!(p.prepull[1].keep_previous, 2);
    assert_eq!(p.mirror[0].prefix.as_deref(), Some("edge/cache"));

    let s = p.storage.as_ref().unwrap();
    assert_eq!(s.max_size, Some(1_500_000_000));
    assert_eq!(
        (s.high_watermark, s.low_watermark),
        (Some(90.0), Some(75.5))
    );
    assert_eq!(s.order, EvictOrder::Lru);
    assert_eq!(s.build_cache_max, Some(1024));
    assert_eq!(
        p.summary(),
        "policy OK: 3 retain, 1 protect, 1 tags, 1 float, 2 prepull, 1 mirror rules; storage on; schedule \"0 0 * * * *\"; dry_run"
    );
}

#[test]
fn prepull_refresh_cron() {
    let p = parse("version = 1\n[[prepull]]\nimage = \"nginx:1.25\"\nrefresh = \"0 0 3 * * *\"\n")
        .unwrap();
    assert!(matches!(&p.prepull[0].refresh, Refresh::Cron(c) if c.source == "0 0 3 * * *"));
}

#[test]
fn shipped_examples_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("policy.example.toml")];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 3, "{examples:?}");
    files.extend(examples);
    for f in files {
        if let Err(d) = policy::load(&f) {
            panic!("{} does not pass check:\n{d}", f.display());
        }
    }
}

// ------------------------------------------------------------ properties ----

/// Every diagnostic from `parse` has a position inside the file.
fn check_outcome(text: &str) -> Result<(), TestCaseError> {
    if let Err(d) = parse(text) {
        prop_assert!(!d.is_empty());
        let lines = text.split('\n').count();
        for x in d.iter() {
            let line = x
                .line
                .ok_or_else(|| TestCaseError::fail(format!("no line: {x}")))?;
            prop_assert!(
                line >= 1 && line <= lines,
                "line {} of {}: {}",
                line,
                lines,
                x
            );
            prop_assert!(x.col.is_some_and(|c| c >= 1));
            prop_assert!(!x.message.contains('\n'), "multi-line message: {}", x);
        }
    }
    Ok(())
}

const HEADERS: &[&str] = &[
    "",
    "[daemon]",
    "[storage]",
    "[[retain]]",
    "[[protect]]",
    "[[tags]]",
    "[[float]]",
    "[[prepull]]",
    "[[mirror]]",
    "[retain]",
    "[[daemon]]",
];

const KEYS: &[&str] = &[
    "version",
    "schedule",
    "watch",
    "state_dir",
    "audit_log",
    "audit_max",
    "dry_run",
    "min_age",
    "max_removals",
    "concurrency",
    "retry_max",
    "allowed_registries",
    "control_socket",
    "metrics",
    "credentials_file",
    "stall_timeout",
    "name",
    "images",
    "tags",
    "untagged",
    "keep_last",
    "order",
    "group_by",
    "keep_within",
    "allow",
    "on_violation",
    "tag",
    "follow",
    "image",
    "digest",
    "platform",
    "refresh",
    "sources",
    "keep_previous",
    "registry",
    "prefix",
    "max_size",
    "high_watermark",
    "low_watermark",
    "build_cache_max",
    "keep_lst",
    "imagez",
];

const STRINGS: &[&str] = &[
    "1h",
    "0s",
    "3 parsecs",
    "85%",
    "101%",
    "20GiB",
    "1.5GB",
    "0 */10 * * * *",
    "*/5 * * * *",
    "never",
    "team/*",
    "**",
    "[a",
    "v\\d+",
    "(a)(b)",
    "(.+)-\\d+",
    "nginx:1.25",
    "nginx",
    "10.0.0.5:5000",
    "https://x",
    "linux/arm64",
    "semver",
    "created",
    "lru",
    "last_used",
    "warn",
    "untag",
    "stable",
    "",
    "é",
    "sha256:abc",
];

fn value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        (-3i64..300).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        proptest::sample::select(STRINGS).prop_map(|s| format!("'{s}'")),
        "[ -&(-~]{0,12}".prop_map(|s| format!("'{s}'")),
        Just("1.5".to_owned()),
        Just("{ a = 1 }".to_owned()),
    ];
    prop_oneof![
        3 => scalar.clone(),
        1 => proptest::collection::vec(scalar, 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
    ]
}

fn document() -> impl Strategy<Value = String> {
    let line = (proptest::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}"));
    let section = (
        proptest::sample::select(HEADERS),
        proptest::collection::vec(line, 0..6),
    )
        .prop_map(|(h, lines)| format!("{h}\n{}\n", lines.join("\n")));
    (any::<bool>(), proptest::collection::vec(section, 0..6)).prop_map(|(v, sections)| {
        let head = if v { "version = 1\n" } else { "" };
        format!("{head}{}", sections.concat())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_outcome(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn toml_like_documents_never_panic(doc in document()) {
        check_outcome(&doc)?;
    }

    #[test]
    fn arbitrary_values_for_checked_keys_never_panic(s in "\\PC{0,24}") {
        // Odd strings straight into the cron, duration, size, percentage,
        // reference and registry checks.
        let quoted = toml::Value::String(s).to_string();
        let text = format!(
            "version = 1\n[daemon]\nschedule = {quoted}\nmin_age = {quoted}\nmetrics = {quoted}\n\
             [[prepull]]\nimage = {quoted}\nrefresh = {quoted}\nsources = [{quoted}]\nplatform = {quoted}\n\
             [storage]\nmax_size = {quoted}\nhigh_watermark = {quoted}\nlow_watermark = {quoted}\n"
        );
        check_outcome(&text)?;
    }
}

// ---------------------------------------------------------------- binary ----

fn stowage_check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["check", "-p"])
        .arg(path)
        .env_remove("STOWAGE_POLICY")
        .output()
        .expect("run stowage")
}

#[test]
fn check_binary_accepts_a_good_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/good.toml");
    let out = stowage_check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "policy OK: 2 retain, 1 protect, 0 tags, 0 float, 1 prepull, 0 mirror rules; storage on; schedule \"0 */10 * * * *\""
        ),
        "{stdout}"
    );
}

#[test]
fn check_binary_rejects_a_broken_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/broken.toml");
    let out = stowage_check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let shown = path.display();
    for line in [
        format!(
            "{shown}:5:1: error: unknown key `keep_lst` in [[retain]] \"builds\"; did you mean `keep_last`?"
        ),
        format!(
            "{shown}:9:17: error: storage.low_watermark: 90% must be below high_watermark (85%)"
        ),
    ] {
        assert!(stderr.contains(&line), "missing {line:?} in:\n{stderr}");
    }
}

#[test]
fn check_binary_reports_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let out = stowage_check(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: cannot read policy"));
}

// ----------------------------------------------------------------- scan ----

#[test]
fn scan_defaults_and_scope() {
    let p = parse(
        "version = 1\n\
         [[scan]]\nname = \"secrets\"\ncommand = [\"builtin:secrets\"]\n\
         [[scan]]\nname = \"trivy\"\nimages = [\"app/**\"]\ntags = [\"v.*\"]\non_fail = \"warn\"\ntimeout = \"30s\"\n\
         command = [\"trivy\", \"image\", \"--input\", \"{archive}\", \"--exit-code\", \"1\"]\n",
    )
    .unwrap();
    assert_eq!(p.scan.len(), 2);
    let s = &p.scan[0];
    assert!(s.is_builtin_secrets());
    assert_eq!(s.on_fail, policy::OnFail::Block);
    assert_eq!(s.timeout, Duration::from_secs(600));
    assert!(s.scope.matches("anything/at/all", "1", Docker));
    let t = &p.scan[1];
    assert_eq!(t.on_fail, policy::OnFail::Warn);
    assert_eq!(t.timeout, Duration::from_secs(30));
    assert!(t.scope.matches("app/web", "v1", Docker));
    assert!(!t.scope.matches("app/web", "latest", Docker));
    assert!(!t.scope.matches("other", "v1", Docker));
    assert!(p.summary().contains("2 scan rules"), "{}", p.summary());
}

#[test]
fn scan_missing_command() {
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\n",
        "2:1",
        "scan[1]: missing required key `command`",
    );
}

#[test]
fn scan_empty_command() {
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = []\n",
        "4:11",
        "scan[1].command: must not be empty",
    );
}

#[test]
fn scan_unknown_placeholder() {
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = [\"t\", \"{img}\"]\n",
        "4:17",
        "scan[1].command[2]: unknown placeholder {img}",
    );
}

#[test]
fn scan_unknown_builtin_and_builtin_with_arguments() {
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = [\"builtin:cves\"]\n",
        "4:12",
        "is not a built-in scan",
    );
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = [\"builtin:secrets\", \"-v\"]\n",
        "4:31",
        "takes no arguments",
    );
}

#[test]
fn scan_bad_on_fail_suggests_and_bad_timeout() {
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = [\"t\"]\non_fail = \"blok\"\n",
        "5:11",
        "did you mean \"block\"?",
    );
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = [\"t\"]\ntimeout = \"0s\"\n",
        "5:11",
        "scan[1].timeout: must be longer than zero",
    );
}

#[test]
fn scan_names_are_unique_across_rules() {
    one_error(
        "version = 1\n[[protect]]\nname = \"x\"\nimages = [\"a\"]\n[[scan]]\nname = \"x\"\ncommand = [\"t\"]\n",
        "6:8",
        "duplicate rule name \"x\"",
    );
}

#[test]
fn scan_unknown_key_suggests() {
    one_error(
        "version = 1\n[[scan]]\nname = \"x\"\ncommand = [\"t\"]\ncomand = [\"t\"]\n",
        "5:1",
        "did you mean `command`?",
    );
}
