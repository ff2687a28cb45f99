//! `stowage completions SHELL` and `stowage man --out DIR`:
//! shell completions (clap_complete) and man pages (clap_mangen) made from
//! the clap definitions the parser uses, so neither can drift from the CLI.
//! `scripts/package` runs both for the `.deb`; no build script repeats the CLI.
//!
//! Pages: `stowage.1`, and one per subcommand at every level
//! (`stowage-plan.1`, `stowage-bundle.1`, `stowage-bundle-create.1`, ...),
//! as git and cargo ship them. Hidden subcommands would get none (clap_complete
//! would still complete them: that is why `man` is not hidden).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use super::{DEFAULT_POLICY, Fatal, emit, finish_output};

/// The whole command line as clap sees it (tests derive the subcommand
/// names from it).
pub fn command() -> clap::Command {
    super::Cli::command()
}

/// The completion script for `shell`, on stdout.
pub(super) fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "stowage", &mut script);
    let written =
        emit(format_args!("{}", String::from_utf8_lossy(&script))).and_then(|()| finish_output());
    exit_code(written)
}

/// Writes every page into `dir` (made if missing), one path a line on stdout.
pub(super) fn man_pages(dir: &Path) -> ExitCode {
    let written = write_pages(dir).and_then(|paths| {
        for p in paths {
            emit(format_args!("{}\n", p.display()))?;
        }
        finish_output()
    });
    exit_code(written)
}

fn exit_code(result: Result<(), Fatal>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            super::errln(format_args!("error: {e}"));
            ExitCode::from(2)
        }
    }
}

fn write_pages(dir: &Path) -> Result<Vec<PathBuf>, Fatal> {
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        Fatal::Message(format!("cannot {what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("create", dir, e))?;
    // Built once: subcommands get their display names (`stowage-plan`) and
    // bin names (`stowage plan`), global options are propagated to them.
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    collect(&cmd, &[], &mut pages);
    let mut paths = Vec::new();
    for (sub, parents) in pages {
        let (name, text) = render_page(sub, &parents)?;
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| fail("write", &path, e))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Every visible command with the chain of commands above it, depth first.
fn collect<'a>(
    cmd: &'a clap::Command,
    parents: &[&'a clap::Command],
    out: &mut Vec<(&'a clap::Command, Vec<&'a clap::Command>)>,
) {
    out.push((cmd, parents.to_vec()));
    let mut chain = parents.to_vec();
    chain.push(cmd);
    for sub in visible_subcommands(cmd) {
        collect(sub, &chain, out);
    }
}

fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn page_name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name())
}

/// The page's file name and roff text: clap_mangen's sections, then EXIT
/// STATUS, FILES and ENVIRONMENT (on `stowage.1`) and SEE ALSO.
fn render_page(
    cmd: &clap::Command,
    parents: &[&clap::Command],
) -> Result<(String, Vec<u8>), Fatal> {
    let version = env!("CARGO_PKG_VERSION");
    // An empty date shifts the .TH fields (groff reads the source as the date).
    let man = Man::new(cmd.clone())
        .date(page_date())
        .source(format!("stowage {version}"))
        .manual("stowage manual");
    let top = parents.is_empty();
    let mut out = Vec::new();
    // Each render_* writes roff's apostrophe preamble; the page keeps one.
    let preamble = Roff::new().render();
    let mut part = |render: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| -> std::io::Result<()> {
        let mut buf = Vec::new();
        render(&mut buf)?;
        let body = if out.is_empty() {
            &buf[..]
        } else {
            buf.strip_prefix(preamble.as_bytes()).unwrap_or(&buf)
        };
        out.write_all(body)
    };
    let io = |e: std::io::Error| Fatal::Message(format!("cannot render a man page: {e}"));
    part(&|w| man.render_title(w)).map_err(io)?;
    part(&|w| man.render_name_section(w)).map_err(io)?;
    part(&|w| man.render_synopsis_section(w)).map_err(io)?;
    part(&|w| man.render_description_section(w)).map_err(io)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        part(&|w| man.render_options_section(w)).map_err(io)?;
    }
    if visible_subcommands(cmd).next().is_some() {
        part(&|w| man.render_subcommands_section(w)).map_err(io)?;
    }
    let extra = if top {
        top_sections(cmd)
    } else {
        sub_sections(cmd, parents)
    };
    part(&|w| w.write_all(extra.render().as_bytes())).map_err(io)?;
    if top {
        part(&|w| man.render_version_section(w)).map_err(io)?;
    }
    Ok((man.get_filename(), out))
}

/// `SOURCE_DATE_EPOCH` (`scripts/package` sets the last commit's time, so
/// the same tree gives the same pages), else today.
fn page_date() -> String {
    let at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_else(chrono::Utc::now);
    at.format("%Y-%m-%d").to_string()
}

fn text(roff: &mut Roff, line: &str) {
    roff.text([roman(line)]);
}

/// An indented paragraph: `tag` in bold, then `body`.
fn item(roff: &mut Roff, tag: &str, body: &str) {
    roff.control("TP", []);
    roff.text([bold(tag)]);
    text(roff, body);
}

/// What only the main page says: exit codes common to every command, the
/// files (from the policy's own defaults) and the environment clap does not
/// already show beside an option.
fn top_sections(cmd: &clap::Command) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    item(&mut roff, "0", "Success.");
    item(
        &mut roff,
        "1",
        "The command ran and says no: plan --exit-code found pending actions; apply, pull or \
         reconcile had actions that failed; scan had a check that failed; bundle verify or \
         import found the bundle damaged or refused it; restore was not possible.",
    );
    item(
        &mut roff,
        "2",
        "The command could not run: invalid policy or arguments, unreachable engine, \
         unreadable file. Nothing was changed.",
    );
    item(
        &mut roff,
        "130, 143",
        "apply was stopped by SIGINT or SIGTERM (cleanly: transfers cancelled, state saved).",
    );

    // The defaults of an empty policy: the paths the daemon actually uses.
    let defaults = crate::policy::parse("version = 1\n", Path::new(DEFAULT_POLICY))
        .map(|p| p.daemon)
        .ok();
    roff.control("SH", ["FILES"]);
    item(
        &mut roff,
        DEFAULT_POLICY,
        "The policy, unless -p or $STOWAGE_POLICY names another. The package installs a safe \
         one (dry_run = true); every key with its default is in \
         /usr/share/doc/stowage/policy.example.toml.",
    );
    if let Some(d) = &defaults {
        item(
            &mut roff,
            &d.state_dir.display().to_string(),
            "State (first-seen and last-used times, backoff, the trash), daemon.state_dir.",
        );
        item(
            &mut roff,
            &d.audit_log.display().to_string(),
            "The audit log, one JSON record per action; read it with stowage history.",
        );
        item(
            &mut roff,
            &d.cache_dir.display().to_string(),
            "The content store of resumable, verified pulls, daemon.cache_dir.",
        );
        item(
            &mut roff,
            &d.control_socket.display().to_string(),
            "The running daemon's control socket (stowage status, reconcile).",
        );
    }
    item(
        &mut roff,
        "/usr/lib/systemd/system/stowage.service",
        "The service: stowage run, Type=notify, reload with SIGHUP. Not enabled by the \
         package: systemctl enable --now stowage.",
    );

    roff.control("SH", ["ENVIRONMENT"]);
    item(
        &mut roff,
        "STOWAGE_LOG",
        "Log filter on stderr (default info; debug for more).",
    );
    item(
        &mut roff,
        "DOCKER_HOST",
        "The engine when --engine is not given; else the local socket.",
    );

    roff.control("SH", ["SEE ALSO"]);
    let pages: Vec<String> = visible_subcommands(cmd)
        .map(|s| format!("{}(1)", page_name(s)))
        .collect();
    roff.text([roman(pages.join(", "))]);
    roff.control("PP", []);
    roff.text([
        roman("The policy reference and the guides: "),
        italic("/usr/share/doc/stowage/"),
        roman(" (README.md, docs/policy.md, docs/daemon.md)."),
    ]);
    roff
}

/// SEE ALSO on a subcommand's page: the pages above it.
fn sub_sections(cmd: &clap::Command, parents: &[&clap::Command]) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SEE ALSO"]);
    let mut pages: Vec<String> = parents
        .iter()
        .rev()
        .map(|p| format!("{}(1)", page_name(p)))
        .collect();
    // Siblings under a group (`bundle create` -> `bundle verify`, ...).
    if parents.len() > 1 {
        let parent = parents[parents.len() - 1];
        pages.extend(
            visible_subcommands(parent)
                .filter(|s| s.get_name() != cmd.get_name())
                .map(|s| format!("{}(1)", page_name(s))),
        );
    }
    roff.text([roman(pages.join(", "))]);
    roff
}
