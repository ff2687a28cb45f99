//! `systemd/stowage.service` passes `systemd-analyze verify`, keeps its
//! hardening (offline `systemd-analyze security`), and says what the daemon
//! relies on (`Type=notify`, watchdog, reload by SIGHUP).
//!
//! `verify` needs the ExecStart binary to exist, so the unit is copied with
//! ExecStart pointed at the binary cargo built.

use std::path::Path;
use std::process::Command;

use crate::engine_env::have_tool;

const UNIT: &str = include_str!("../../systemd/stowage.service");

/// The unit with ExecStart at the built binary, in a temp folder.
fn unit_copy(dir: &Path) -> std::path::PathBuf {
    let bin = env!("CARGO_BIN_EXE_stowage");
    let text = UNIT.replace("ExecStart=/usr/bin/stowage ", &format!("ExecStart={bin} "));
    assert_ne!(text, UNIT, "ExecStart=/usr/bin/stowage not found");
    let path = dir.join("stowage.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn unit_declares_what_the_daemon_relies_on() {
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=60s",
        "TimeoutStopSec=15s",
        "RuntimeDirectory=stowage",
        "StateDirectory=stowage",
        "ReadWritePaths=-/var/lib/stowage",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
    ] {
        assert!(UNIT.lines().any(|l| l == line), "{line} missing");
    }
    // A group the host may not have fails the unit (216/GROUP) before
    // stowage starts; root needs none.
    for key in ["SupplementaryGroups=", "Group="] {
        assert!(
            !UNIT.lines().any(|l| l.starts_with(key)),
            "{key} names a group the host may not have"
        );
    }
    // The default control socket lives in the RuntimeDirectory.
    let p = stowage::policy::parse("version = 1\n", Path::new("/etc/stowage/policy.toml")).unwrap();
    assert!(p.daemon.control_socket.starts_with("/run/stowage"));
    assert!(p.daemon.state_dir.starts_with("/var/lib/stowage"));
}

#[test]
fn systemd_analyze_verify_passes() {
    if !have_tool(
        "systemd-analyze",
        "systemd",
        "systemd_analyze_verify_passes",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    // Warnings about the unit itself come on stderr with its name.
    let own: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("stowage.service"))
        .collect();
    assert!(own.is_empty(), "warnings:\n{}", own.join("\n"));
}

#[test]
fn systemd_analyze_security_exposure_stays_low() {
    if !have_tool(
        "systemd-analyze",
        "systemd",
        "systemd_analyze_security_exposure_stays_low",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    // --offline (systemd >= 250) reads the file; no running systemd needed.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let Some(level) = stdout.lines().find_map(|l| {
        l.split("Overall exposure level for stowage.service: ")
            .nth(1)
    }) else {
        panic!("no exposure level:\n{stdout}\n{stderr}");
    };
    let exposure: f64 = level.split_whitespace().next().unwrap().parse().unwrap();
    eprintln!("systemd-analyze security: exposure {level}");
    // Root (for the Docker socket) and network access (tcp engines,
    // metrics) are what remains; the rest is locked down.
    assert!(exposure <= 2.5, "exposure {exposure}:\n{stdout}");
}
