//! The systemd files of `deploy/systemd`: `systemd-analyze verify` accepts both units
//! without a single warning, and `systemd-sysusers` plus `systemd-tmpfiles` create the
//! user and the directories with the modes the units and the daemons expect.
//!
//! These tests need systemd's tools (Debian package `systemd`; `.ci/run` installs it).
//! Without them they fail, saying so, unless `DROVER_SKIP_SYSTEMD_ANALYZE=1` is set.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use drover_tests::bin;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// Whether `tool` runs; `false` only when skipping is allowed, otherwise a failure that
/// says what to install.
fn have(tool: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => true,
        result => {
            if std::env::var("DROVER_SKIP_SYSTEMD_ANALYZE").is_ok_and(|v| v == "1") {
                eprintln!("skipped: {tool} is not available (DROVER_SKIP_SYSTEMD_ANALYZE=1)");
                return false;
            }
            panic!(
                "{tool} is needed to check deploy/systemd ({}): install the `systemd` package \
                 (apt-get install systemd; .ci/run does), or set DROVER_SKIP_SYSTEMD_ANALYZE=1 \
                 to skip this test",
                match result {
                    Ok(o) => format!("`{tool} --version` failed: {}", o.status),
                    Err(e) => e.to_string(),
                }
            );
        }
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("drover-units-")
        .tempdir()
        .expect("temp dir");
    let mut units = Vec::new();
    for daemon in ["drover-controller", "drover-agent"] {
        let name = format!("{daemon}.service");
        let text = std::fs::read_to_string(deploy_dir().join(&name))
            .unwrap_or_else(|e| panic!("deploy/systemd/{name}: {e}"));
        // verify checks that ExecStart's program exists: point it at the build.
        let installed = format!("ExecStart=/usr/bin/{daemon} ");
        assert!(
            text.contains(&installed),
            "{name} should start /usr/bin/{daemon}"
        );
        let built = bin(daemon);
        assert!(
            !built.display().to_string().contains(char::is_whitespace),
            "{} has a space, which ExecStart would split at",
            built.display()
        );
        let text = text.replace(&installed, &format!("ExecStart={} ", built.display()));
        let path = dir.path().join(&name);
        std::fs::write(&path, text).expect("write unit");
        units.push(path);
    }
    verify(dir.path(), &units);
    // Again with the drop-in that runs nodes as users of their own.
    let drop_in = dir.path().join("drover-agent.service.d");
    std::fs::create_dir(&drop_in).expect("mkdir drop-in dir");
    std::fs::copy(
        deploy_dir().join("drover-agent-nodes-as-users.conf"),
        drop_in.join("nodes-as-users.conf"),
    )
    .expect("copy drop-in");
    verify(dir.path(), &units);
    // And the controller's drop-in for a high-availability group.
    let drop_in = dir.path().join("drover-controller.service.d");
    std::fs::create_dir(&drop_in).expect("mkdir drop-in dir");
    std::fs::copy(
        deploy_dir().join("drover-controller-ha.conf"),
        drop_in.join("ha.conf"),
    )
    .expect("copy drop-in");
    verify(dir.path(), &units);
}

/// Runs `systemd-analyze verify` on `units` (in `dir`) and fails on any complaint about
/// them.
fn verify(dir: &Path, units: &[PathBuf]) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about other units on this machine (referenced targets and the like) are
    // not ours to fix; anything naming our units is.
    let ours: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("drover") || l.contains(&*dir.to_string_lossy()))
        .collect();
    for line in stdout.lines().chain(stderr.lines()) {
        if !ours.contains(&line) {
            eprintln!("systemd-analyze (not about our units): {line}");
        }
    }
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify on deploy/systemd ({}):\n{stdout}{stderr}",
        out.status
    );
}

#[test]
fn sysusers_and_tmpfiles_create_user_and_directories() {
    if !have("systemd-sysusers") || !have("systemd-tmpfiles") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        // Both write /etc/passwd and chown in a --root tree: that takes root.
        eprintln!("skipped: creating users and chowning directories needs root");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("drover-sysroot-")
        .tempdir()
        .expect("temp dir");
    std::fs::create_dir(root.path().join("etc")).expect("mkdir etc");
    let run = |tool: &str, args: &[&str]| {
        let out = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(args)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("Creating "))
            .collect();
        assert!(
            out.status.success() && complaints.is_empty(),
            "{tool} {args:?} ({}):\n{stderr}",
            out.status
        );
    };
    let sysusers = deploy_dir().join("drover.sysusers");
    let tmpfiles = deploy_dir().join("drover.tmpfiles");
    run(
        "systemd-sysusers",
        &[sysusers.to_str().expect("utf-8 path")],
    );
    run(
        "systemd-tmpfiles",
        &["--create", tmpfiles.to_str().expect("utf-8 path")],
    );

    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("drover:"))
        .unwrap_or_else(|| panic!("no drover user in:\n{passwd}"))
        .split(':')
        .collect();
    let (uid, gid): (u32, u32) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
    assert_eq!(fields[5], "/var/lib/drover", "home directory");
    let group = std::fs::read_to_string(root.path().join("etc/group")).expect("group");
    assert!(
        group.lines().any(|l| l == format!("drover:x:{gid}:")),
        "{group}"
    );

    // (path, mode, owned by drover, group drover)
    for (path, mode, user) in [
        ("etc/drover", 0o750, false),
        ("etc/drover/pki", 0o700, true),
        ("var/lib/drover", 0o711, true),
        ("var/lib/drover/controller", 0o700, true),
        ("var/lib/drover/agent", 0o711, true),
    ] {
        let meta = std::fs::metadata(root.path().join(path))
            .unwrap_or_else(|e| panic!("/{path} was not created: {e}"));
        assert!(meta.is_dir(), "/{path} is not a directory");
        assert_eq!(meta.mode() & 0o7777, mode, "mode of /{path}");
        assert_eq!(meta.uid(), if user { uid } else { 0 }, "owner of /{path}");
        assert_eq!(meta.gid(), gid, "group of /{path}");
    }
}

/// The last value of each key of `[Service]` in a unit file, as systemd reads it.
fn service_keys(unit: &Path) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(unit).unwrap();
    let mut section = String::new();
    let mut keys = std::collections::BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if section == "Service"
            && let Some((k, v)) = line.split_once('=')
        {
            keys.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    keys
}

/// The agent's unit leaves the nodes to the agent: systemd signals only the agent
/// (`KillMode=process`, so an agent stopped or failed does not take its nodes down with
/// it) and delegates its cgroup subtree to it (`Delegate=yes`, with the cgroup tree
/// writable), so each node gets a cgroup of its own.
#[test]
fn the_agent_unit_leaves_its_nodes_and_their_cgroups_to_the_agent() {
    let keys = service_keys(&deploy_dir().join("drover-agent.service"));
    assert_eq!(keys.get("KillMode").map(String::as_str), Some("process"));
    assert_eq!(keys.get("Delegate").map(String::as_str), Some("yes"));
    let protect = keys.get("ProtectControlGroups").map(String::as_str);
    assert!(
        matches!(protect, None | Some("no" | "false")),
        "ProtectControlGroups={protect:?} makes the delegated tree read-only"
    );
    // Device allow-lists reach the nodes (the whole unit cgroup): none, not even the
    // one ProtectClock= implies before systemd 252.
    for key in [
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
    ] {
        let v = keys.get(key).map(String::as_str);
        assert!(
            matches!(v, None | Some("no" | "false" | "auto")),
            "{key}={v:?} would restrict the nodes' devices"
        );
    }
}
