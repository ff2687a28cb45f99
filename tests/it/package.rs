//! What the `.deb` ships, checked without building it: completions and man
//! pages name every subcommand of the clap definitions (derived from
//! `stowage::cli::command()`, so a new subcommand without them fails here),
//! the pages are clean roff, the installed policy changes nothing, and
//! Cargo.toml's `[package.metadata.deb]` agrees with the unit and the CLI.
//! `scripts/test` builds, installs and purges the real package afterwards.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::engine_env::have_tool;
use crate::fake_store::{NOW, img};
use stowage::engine::fake::FakeEngine;
use stowage::fixture::FixedClock;
use stowage::reconcile::{self, Options};
use tokio_util::sync::CancellationToken;

const UNIT: &str = include_str!("../../systemd/stowage.service");
const CARGO_TOML: &str = include_str!("../../Cargo.toml");
const PACKAGED_POLICY: &str = include_str!("../../packaging/policy.toml");
const PACKAGE_SCRIPT: &str = include_str!("../../scripts/package");

/// Every visible command below the top, as its path of names
/// (`["bundle", "create"]`), with clap's own `help` left out.
fn subcommand_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, above: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            let mut path = above.to_vec();
            path.push(sub.get_name().to_owned());
            out.push(path.clone());
            walk(sub, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(&stowage::cli::command(), &[], &mut out);
    assert!(
        out.len() > 15,
        "the CLI has its subcommands: {out:?} (clap definitions not found?)"
    );
    out
}

fn stowage(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stowage {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn completion_script(shell: &str) -> String {
    String::from_utf8(stowage(&["completions", shell]).stdout).unwrap()
}

/// What bash's completion offers after `stowage WORDS… <TAB>`, by running
/// the generated script in a real bash.
fn bash_candidates(script: &Path, words: &[String]) -> BTreeSet<String> {
    let mut line = vec!["stowage".to_owned()];
    line.extend(words.iter().cloned());
    let quoted: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{}'\nCOMP_WORDS=({} '')\nCOMP_CWORD={}\nCOMP_LINE='{} '\nCOMP_POINT=${{#COMP_LINE}}\n\
         _stowage stowage '' '{}' 2>/dev/null\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        line.len(),
        line.join(" "),
        line.last().unwrap(),
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Children of `parent` (the top when empty) among `paths`.
fn children<'a>(paths: &'a [Vec<String>], parent: &[String]) -> Vec<&'a str> {
    paths
        .iter()
        .filter(|p| p.len() == parent.len() + 1 && p.starts_with(parent))
        .map(|p| p.last().unwrap().as_str())
        .collect()
}

#[test]
fn bash_completion_offers_every_subcommand() {
    let paths = subcommand_paths();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("stowage.bash");
    std::fs::write(&script, completion_script("bash")).unwrap();
    // The top and every command that has subcommands of its own.
    let mut parents = vec![vec![]];
    parents.extend(
        paths
            .iter()
            .filter(|p| !children(&paths, p).is_empty())
            .cloned(),
    );
    assert!(parents.len() >= 3, "bundle and policy have subcommands");
    for parent in parents {
        let offered = bash_candidates(&script, &parent);
        for name in children(&paths, &parent) {
            assert!(
                offered.contains(name),
                "bash: `stowage {} <TAB>` does not offer {name}: {offered:?}",
                parent.join(" ")
            );
        }
    }
}

#[test]
fn zsh_and_fish_completions_name_every_subcommand() {
    let paths = subcommand_paths();
    let zsh = completion_script("zsh");
    let fish = completion_script("fish");
    for path in &paths {
        let name = path.last().unwrap();
        // zsh: `'NAME:about' \` in the parent's `_describe` list.
        assert!(
            zsh.lines().any(|l| l.starts_with(&format!("'{name}:"))),
            "zsh: no entry for {}",
            path.join(" ")
        );
        // fish: `complete -c stowage -n "<under the parent>" -f -a "NAME"`.
        let condition = match &path[..path.len() - 1] {
            [] => "__fish_stowage_needs_command".to_owned(),
            parents => format!("__fish_stowage_using_subcommand {}", parents.join(" ")),
        };
        assert!(
            fish.lines().any(|l| l.starts_with("complete -c stowage ")
                && l.contains(&condition)
                && l.contains(&format!("-a \"{name}\""))),
            "fish: no completion for {} ({condition})",
            path.join(" ")
        );
    }
    // The scripts parse, when the shells are here (not installed for CI).
    let dir = tempfile::tempdir().unwrap();
    for (shell, text) in [("zsh", &zsh), ("fish", &fish)] {
        if Command::new(shell).arg("--version").output().is_err() {
            eprintln!("note: {shell} not installed; syntax of its completion not checked");
            continue;
        }
        let file = dir.path().join(shell);
        std::fs::write(&file, text).unwrap();
        let out = Command::new(shell).arg("-n").arg(&file).output().unwrap();
        assert!(
            out.status.success(),
            "{shell} -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn completions_refuse_an_unknown_shell() {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bash") && stderr.contains("zsh") && stderr.contains("fish"));
}

#[test]
fn man_pages_one_per_subcommand_and_clean_roff() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let listed =
        String::from_utf8(stowage(&["man", "--out", out_dir.to_str().unwrap()]).stdout).unwrap();
    let mut expected: BTreeSet<String> = subcommand_paths()
        .iter()
        .map(|p| format!("stowage-{}.1", p.join("-")))
        .collect();
    expected.insert("stowage.1".into());
    let written: BTreeSet<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(written, expected, "one page per command");
    let printed: BTreeSet<String> = listed
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(printed, expected, "stdout lists every page written");

    // The main page links every subcommand page and has the sections a
    // user looks for.
    let top = std::fs::read_to_string(out_dir.join("stowage.1")).unwrap();
    for section in [
        "NAME",
        "SYNOPSIS",
        "OPTIONS",
        "EXIT STATUS",
        "FILES",
        "SEE ALSO",
    ] {
        assert!(
            top.contains(&format!(".SH \"{section}\"")) || top.contains(&format!(".SH {section}")),
            "stowage.1 has no {section}"
        );
    }
    for name in children(&subcommand_paths(), &[]) {
        assert!(
            top.contains(&format!("stowage\\-{name}(1)")),
            "stowage.1 does not link stowage-{name}(1)"
        );
    }
    assert!(top.contains("/etc/stowage/policy.toml"));

    if !have_tool(
        "groff",
        "groff-base",
        "man_pages_one_per_subcommand_and_clean_roff",
    ) {
        return;
    }
    for page in &expected {
        let path = out_dir.join(page);
        // -k: UTF-8 input through preconv, as man(1) reads it; -ww: all warnings.
        let out = Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{page}:\n{stderr}"
        );
        // Rendered, the NAME line is the command and its summary.
        let out = Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-P-cbou"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let name = page.trim_end_matches(".1");
        assert!(
            text.lines().any(|l| l
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .starts_with(&format!("{name} - "))),
            "{page}: no NAME line `{name} - …`:\n{text}"
        );
    }
}

/// The policy the package installs as /etc/stowage/policy.toml passes
/// `check`, is a dry run, and a reconcile with it on a store it would
/// clean changes nothing.
#[tokio::test]
async fn packaged_policy_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, PACKAGED_POLICY).unwrap();
    let out = stowage(&["check", "-p", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dry_run"));

    let mut policy =
        stowage::policy::parse(PACKAGED_POLICY, Path::new("/etc/stowage/policy.toml")).unwrap();
    assert!(
        policy.daemon.dry_run,
        "the packaged policy must be a dry run"
    );
    assert_eq!(policy.daemon.state_dir, Path::new("/var/lib/stowage"));
    assert!(
        policy.prepull.is_empty() && policy.mirror.is_empty(),
        "nothing to pull or push"
    );
    // Its files into the temp folder; the rules as shipped.
    let state = dir.path().join("state");
    policy.daemon.audit_log = state.join("audit.jsonl");
    policy.daemon.cache_dir = state.join("cache");
    policy.daemon.state_dir = state;
    let images = vec![
        img("old-dangling", 40.0, &[]),
        img("other-dangling", 30.0, &[]),
        img("app", 90.0, &["team/app:v1"]),
    ];
    let engine = FakeEngine::new(images.clone(), vec![]);
    let (plan, report) = reconcile::reconcile_with(
        &engine,
        &policy,
        &FixedClock(NOW),
        Options::default(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    // The rules are live: acting, they would clean the old dangling images...
    assert!(
        plan.actions.len() >= 2,
        "the packaged rules plan nothing on this store: {:?}",
        plan.actions
    );
    assert!(report.dry_run >= 2, "{}", report.summary());
    // ...but nothing reached the engine.
    let changes: Vec<String> = engine
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("remove ") || c.starts_with("tag "))
        .collect();
    assert!(
        changes.is_empty(),
        "a dry run changed the engine: {changes:?}"
    );
    assert_eq!(engine.images(), images);
}

fn deb_metadata() -> toml::Table {
    let cargo: toml::Table = CARGO_TOML.parse().unwrap();
    cargo["package"]["metadata"]["deb"]
        .as_table()
        .unwrap()
        .clone()
}

/// `[[source, dest, mode]]` of the package.
fn deb_assets() -> Vec<(String, String, String)> {
    deb_metadata()["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            let s = |i: usize| a[i].as_str().unwrap().to_owned();
            (s(0), s(1), s(2))
        })
        .collect()
}

fn asset_dest(source: &str) -> String {
    deb_assets()
        .into_iter()
        .find(|(s, _, _)| s == source)
        .unwrap_or_else(|| panic!("no asset {source}"))
        .1
}

#[test]
fn package_metadata_agrees_with_the_unit_and_the_cli() {
    // The unit runs the packaged binary on the packaged policy, which is
    // also the CLI's default.
    assert_eq!(asset_dest("target/release/stowage"), "usr/bin/");
    assert_eq!(
        asset_dest("packaging/policy.toml"),
        "etc/stowage/policy.toml"
    );
    assert!(
        UNIT.lines()
            .any(|l| l == "ExecStart=/usr/bin/stowage run --policy /etc/stowage/policy.toml"),
        "ExecStart does not match the package"
    );
    let help = String::from_utf8(stowage(&["--help"]).stdout).unwrap();
    assert!(help.contains("then /etc/stowage/policy.toml"), "{help}");
    // The state folder the postinst makes is the unit's StateDirectory.
    let postinst = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/debian/postinst"),
    )
    .unwrap();
    assert!(postinst.contains("install -d -m 0700 -o root -g root /var/lib/stowage"));
    assert!(UNIT.lines().any(|l| l == "StateDirectory=stowage"));
    assert!(UNIT.lines().any(|l| l == "StateDirectoryMode=0700"));
    assert!(postinst.contains("#DEBHELPER#"));

    // Installing must not start removing images.
    let deb = deb_metadata();
    let units = deb["systemd-units"].as_table().unwrap();
    assert_eq!(
        units["enable"].as_bool(),
        Some(false),
        "the unit is enabled on install"
    );
    assert_eq!(
        units["start"].as_bool(),
        Some(false),
        "the unit is started on install"
    );
    assert_eq!(units["unit-scripts"].as_str(), Some("systemd/"));

    // Man pages and completions where the shells look, from what
    // scripts/package makes.
    let dests: BTreeSet<String> = deb_assets().into_iter().map(|(_, d, _)| d).collect();
    for dest in [
        "usr/share/man/man1/",
        "usr/share/bash-completion/completions/stowage",
        "usr/share/zsh/vendor-completions/_stowage",
        "usr/share/fish/vendor_completions.d/stowage.fish",
    ] {
        assert!(dests.contains(dest), "no asset installed at {dest}");
    }
    for (source, _, _) in deb_assets() {
        if let Some(generated) = source.strip_prefix("target/package-assets/") {
            let file = generated.rsplit('/').next().unwrap();
            let made = if file == "*.1" {
                PACKAGE_SCRIPT.contains("man --out \"$ASSETS/man\"")
            } else {
                PACKAGE_SCRIPT.contains(&format!("\"$ASSETS/{generated}\""))
            };
            assert!(made, "scripts/package does not make {source}");
        } else if !source.starts_with("target/release/") {
            let matched = glob_sources(&source);
            assert!(matched > 0, "asset {source} matches no file");
        }
    }
}

/// How many files a `dir/*.ext` or plain asset source names.
fn glob_sources(source: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match source.split_once("/*") {
        None => usize::from(root.join(source).is_file()),
        Some((dir, ext)) => std::fs::read_dir(root.join(dir))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(ext))
            })
            .count(),
    }
}
