//! `cargo xtask dist`: Debian packages of drover, and the shell completions and man page
//! they carry, generated from the CLI's own definition so they never drift from it.
//!
//! Three packages, built with `dpkg-deb` into `target/dist`:
//!
//! - `drover`: the CLI, its man page and completions, and what both daemons share: the
//!   `drover` user (sysusers.d), the directories under `/etc/drover` and
//!   `/var/lib/drover` (tmpfiles.d), example cluster files and the documentation.
//! - `drover-controller` and `drover-agent`: the daemon, its systemd unit and its
//!   commented settings file (`/etc/drover/*.toml`, a conffile), each depending on
//!   `drover` of the same version.
//!
//! Maintainer scripts create the user and directories (`systemd-sysusers`,
//! `systemd-tmpfiles`, honouring `DPKG_ROOT` so that a package installs into a scratch
//! root too), reload systemd, and on upgrade restart the controller (which restarts no
//! node) but never the agent: an agent restart stops its nodes unless its `on_exit` is
//! `keep`, so the operator restarts it (README, "Upgrades"). Nothing is enabled or
//! started on install, since the daemons need certificates first.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::CommandFactory;
use clap_complete::Shell;

/// The maintainer named in the packages.
const MAINTAINER: &str = "drover maintainers <drover@localhost>";

/// What `cargo xtask dist` builds.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Where the packages (and the generated completions and man page) go.
    pub(crate) out: PathBuf,
    /// Binaries to package; a release build of them when `None`.
    pub(crate) bin_dir: Option<PathBuf>,
    /// `dpkg-deb -Z`: xz, gzip, zstd or none.
    pub(crate) compression: String,
}

/// Writes `completions/{drover.bash,_drover,drover.fish}`, `man/drover.1` and a page per
/// subcommand (`man/drover-deploy.1`, `man/drover-ca-issue.1`, ...) under `out`.
pub(crate) fn completions_and_man(out: &Path) -> anyhow::Result<()> {
    let completions = out.join("completions");
    let man = out.join("man");
    fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    let mut cmd = drover_client::Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "drover", &completions)
            .with_context(|| format!("cannot write {shell} completions"))?;
        eprintln!("wrote {}", path.display());
    }
    // Building names each subcommand as its page refers to it: `drover-audit`.
    cmd.build();
    man_pages(&cmd, &man)?;
    Ok(())
}

/// Writes `NAME.1` for `cmd` and, as the page lists them under "SUBCOMMANDS",
/// `NAME-SUB.1` for each of its subcommands, recursively.
fn man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        man_pages(sub, dir)?;
    }
    Ok(())
}

/// Builds the binaries unless given, then the three packages; returns their paths.
pub(crate) fn run(opts: &Options) -> anyhow::Result<Vec<PathBuf>> {
    let root = crate::project_root();
    let bin_dir = match &opts.bin_dir {
        Some(dir) => dir.clone(),
        None => {
            let status = crate::cargo_command()
                .current_dir(&root)
                .args(["build", "--release", "--locked", "--bins"])
                .args([
                    "-p",
                    "drover-client",
                    "-p",
                    "drover-controller",
                    "-p",
                    "drover-agent",
                ])
                .status()
                .context("cannot run cargo build")?;
            if !status.success() {
                bail!("cargo build --release failed ({status})");
            }
            root.join("target/release")
        }
    };
    fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    completions_and_man(&opts.out)?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let mut debs = Vec::new();
    for pkg in packages(&root, &bin_dir, &opts.out)? {
        let stage = opts.out.join("stage").join(pkg.name);
        stage_package(&pkg, &stage, version, &arch)?;
        let deb = opts.out.join(format!("{}_{version}_{arch}.deb", pkg.name));
        let out = Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .arg(format!("-Z{}", opts.compression))
            .arg("--build")
            .arg(&stage)
            .arg(&deb)
            .output()
            .context("cannot run dpkg-deb (Debian's dpkg package provides it)")?;
        if !out.status.success() {
            bail!(
                "dpkg-deb --build {} failed: {}",
                stage.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        fs::remove_dir_all(&stage).with_context(|| format!("cannot remove {}", stage.display()))?;
        eprintln!("wrote {}", deb.display());
        debs.push(deb);
    }
    let _ = fs::remove_dir(opts.out.join("stage"));
    Ok(debs)
}

/// A command's trimmed standard output.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// One file of a package: where it comes from, where it goes (relative to `/`), its mode.
#[derive(Debug)]
struct Entry {
    from: PathBuf,
    to: String,
    mode: u32,
    /// Compressed with `gzip -9n` on the way (man pages).
    gzip: bool,
}

/// One package.
#[derive(Debug)]
struct Package {
    name: &'static str,
    summary: &'static str,
    description: &'static str,
    depends: bool,
    files: Vec<Entry>,
    /// Files under `/etc`, kept across upgrades when the administrator changed them.
    conffiles: Vec<&'static str>,
    postinst: String,
    prerm: String,
}

fn entry(from: PathBuf, to: &str, mode: u32) -> Entry {
    Entry {
        from,
        to: to.to_owned(),
        mode,
        gzip: false,
    }
}

/// Creates the `drover` user and the directories, in `DPKG_ROOT` when dpkg sets it.
const SETUP: &str = r#"if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} drover.conf
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles ${DPKG_ROOT:+--root="$DPKG_ROOT"} --create drover.conf
    fi
fi
"#;

/// `systemctl daemon-reload` when systemd runs this system (not in a scratch root).
const RELOAD: &str = r#"if [ "$1" = configure ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
"#;

fn packages(root: &Path, bin_dir: &Path, generated: &Path) -> anyhow::Result<Vec<Package>> {
    let deploy = root.join("deploy");
    let mut pages = Vec::new();
    let man = generated.join("man");
    for e in fs::read_dir(&man).with_context(|| format!("cannot read {}", man.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".1") {
            pages.push(Entry {
                from: man.join(&name),
                to: format!("usr/share/man/man1/{name}.gz"),
                mode: 0o644,
                gzip: true,
            });
        }
    }
    pages.sort_by(|a, b| a.to.cmp(&b.to));
    let mut cli = vec![
        entry(bin_dir.join("drover"), "usr/bin/drover", 0o755),
        entry(
            generated.join("completions/drover.bash"),
            "usr/share/bash-completion/completions/drover",
            0o644,
        ),
        entry(
            generated.join("completions/_drover"),
            "usr/share/zsh/vendor-completions/_drover",
            0o644,
        ),
        entry(
            generated.join("completions/drover.fish"),
            "usr/share/fish/vendor_completions.d/drover.fish",
            0o644,
        ),
        entry(
            deploy.join("systemd/drover.sysusers"),
            "usr/lib/sysusers.d/drover.conf",
            0o644,
        ),
        entry(
            deploy.join("systemd/drover.tmpfiles"),
            "usr/lib/tmpfiles.d/drover.conf",
            0o644,
        ),
        entry(
            root.join("README.md"),
            "usr/share/doc/drover/README.md",
            0o644,
        ),
        entry(
            deploy.join("README.md"),
            "usr/share/doc/drover/systemd.md",
            0o644,
        ),
    ];
    cli.extend(pages);
    cli.push(entry(
        deploy.join("examples/local.toml"),
        "usr/share/doc/drover/examples/local.toml",
        0o644,
    ));
    let daemon = |name: &'static str,
                  summary: &'static str,
                  description: &'static str,
                  unit: &'static str,
                  bin: &'static str,
                  config: &'static str,
                  upgrade: &str| {
        Package {
            name,
            summary,
            description,
            depends: true,
            files: vec![
                entry(bin_dir.join(name), bin, 0o755),
                entry(
                    deploy.join("systemd").join(format!("{name}.service")),
                    unit,
                    0o644,
                ),
                entry(
                    deploy
                        .join("config")
                        .join(config.rsplit('/').next().unwrap_or(config)),
                    config,
                    0o640,
                ),
            ],
            conffiles: vec![config],
            postinst: format!("{SETUP}{RELOAD}{upgrade}"),
            prerm: format!(
                r#"if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop {name}.service || true
fi
"#
            ),
        }
    };
    Ok(vec![
        Package {
            name: "drover",
            summary: "multi-host process manager: command line and shared files",
            description: "The drover command line (stage and deploy cluster configurations,\n \
                          ask the cluster questions, manage the cluster CA), its man page and\n \
                          shell completions, and what the daemons share: the drover user and\n \
                          the directories under /etc/drover and /var/lib/drover.",
            depends: false,
            files: cli,
            conffiles: Vec::new(),
            postinst: SETUP.to_owned(),
            prerm: String::new(),
        },
        daemon(
            "drover-controller",
            "multi-host process manager: controller",
            "The controller holds the cluster configuration and drives one agent per\n \
             host over QUIC with mutual TLS. Enable it once its certificates are in\n \
             /etc/drover/pki: systemctl enable --now drover-controller.",
            "usr/lib/systemd/system/drover-controller.service",
            "usr/bin/drover-controller",
            "etc/drover/controller.toml",
            // The controller restarts no node: restart it onto the new binary.
            r#"if [ "$1" = configure ] && [ -n "$2" ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl try-restart drover-controller.service || true
fi
"#,
        ),
        daemon(
            "drover-agent",
            "multi-host process manager: agent",
            "The agent starts, watches, restarts and stops its host's processes for\n \
             the controller. Enable it once its certificates are in /etc/drover/pki:\n \
             systemctl enable --now drover-agent.",
            "usr/lib/systemd/system/drover-agent.service",
            "usr/bin/drover-agent",
            "etc/drover/agent.toml",
            // Restarting the agent stops its nodes unless on_exit is "keep": the
            // operator decides when.
            r#"if [ "$1" = configure ] && [ -n "$2" ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ] && systemctl -q is-active drover-agent.service; then
    echo "drover-agent: the running agent is still the old binary; with on_exit = \"keep\" in /etc/drover/agent.toml, systemctl restart drover-agent restarts no node" >&2
fi
"#,
        ),
    ])
}

/// Lays out a package's tree and `DEBIAN/` control files in `stage`.
fn stage_package(pkg: &Package, stage: &Path, version: &str, arch: &str) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(stage);
    let mut size = 0u64;
    for f in &pkg.files {
        let to = stage.join(&f.to);
        let parent = to.parent().expect("entries are below /");
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        if f.gzip {
            let out = Command::new("gzip")
                .args(["-9", "-n", "-c"])
                .arg(&f.from)
                .output()
                .context("cannot run gzip")?;
            if !out.status.success() {
                bail!("gzip {} failed", f.from.display());
            }
            fs::write(&to, out.stdout).with_context(|| format!("cannot write {}", to.display()))?;
        } else {
            fs::copy(&f.from, &to)
                .with_context(|| format!("cannot copy {} to {}", f.from.display(), to.display()))?;
        }
        fs::set_permissions(&to, fs::Permissions::from_mode(f.mode))?;
        size += fs::metadata(&to)?.len();
    }
    // dpkg-deb checks directory modes too.
    set_dir_modes(stage)?;
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let depends = if pkg.depends {
        format!("Depends: drover (= {version})\n")
    } else {
        String::new()
    };
    let control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {kib}\n{depends}Recommends: systemd\nSection: admin\nPriority: optional\n\
         Description: {summary}\n {description}\n",
        name = pkg.name,
        kib = size.div_ceil(1024),
        summary = pkg.summary,
        description = pkg.description,
    );
    write_mode(&debian.join("control"), &control, 0o644)?;
    if !pkg.conffiles.is_empty() {
        let text: String = pkg.conffiles.iter().map(|c| format!("/{c}\n")).collect();
        write_mode(&debian.join("conffiles"), &text, 0o644)?;
    }
    for (script, body) in [("postinst", &pkg.postinst), ("prerm", &pkg.prerm)] {
        if !body.is_empty() {
            write_mode(
                &debian.join(script),
                &format!("#!/bin/sh\nset -e\n{body}exit 0\n"),
                0o755,
            )?;
        }
    }
    Ok(())
}

fn set_dir_modes(dir: &Path) -> anyhow::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_dir_modes(&e.path())?;
        }
    }
    Ok(())
}

fn write_mode(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::Command;

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The numeric id of `name` in a root's passwd or group file.
    fn id_in(file: &Path, name: &str) -> u32 {
        let text = fs::read_to_string(file).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {}:\n{text}", file.display()));
        line.split(':').nth(2).unwrap().parse().unwrap()
    }

    /// The packages, built from the debug binaries the test suite runs, installed with
    /// dpkg (maintainer scripts included) into a scratch root: every file with its mode
    /// and owner, the user and directories, the units accepted by `systemd-analyze
    /// verify`, an edited conffile kept over a reinstall.
    #[test]
    fn packages_install_into_a_scratch_root() {
        if !nix::unistd::geteuid().is_root() {
            // dpkg --root and systemd-sysusers chown files to users of the new root.
            eprintln!("skipped: installing packages into a root with owners needs root");
            return;
        }
        for tool in ["dpkg-deb", "dpkg", "systemd-analyze", "systemd-sysusers"] {
            assert!(
                Command::new(tool).arg("--version").output().is_ok(),
                "{tool} is needed: apt-get install dpkg systemd (.ci/run installs systemd)"
            );
        }
        let tmp = tempfile::Builder::new()
            .prefix("drover-dist-")
            .tempdir()
            .unwrap();
        let debs = super::run(&super::Options {
            out: tmp.path().join("dist"),
            bin_dir: Some(drover_tests::bin_dir()),
            compression: "none".into(),
        })
        .unwrap();
        assert_eq!(debs.len(), 3);
        let root = tmp.path().join("root");
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
        let install = || {
            run(Command::new("dpkg")
                .arg(format!("--root={}", root.display()))
                .args([
                    "--force-script-chrootless",
                    "--force-confold",
                    "--log=/dev/null",
                    "-i",
                ])
                .args(&debs));
        };
        install();
        let status = run(Command::new("dpkg-query")
            .arg(format!("--root={}", root.display()))
            .args(["-W", "-f=${Package} ${Status}\n"]));
        for pkg in ["drover", "drover-agent", "drover-controller"] {
            assert!(
                status.contains(&format!("{pkg} install ok installed")),
                "{status}"
            );
        }

        let uid = id_in(&root.join("etc/passwd"), "drover");
        let gid = id_in(&root.join("etc/group"), "drover");
        // (path, mode, uid, gid, is a directory)
        let expected = [
            ("usr/bin/drover", 0o755, 0, 0, false),
            ("usr/bin/drover-agent", 0o755, 0, 0, false),
            ("usr/bin/drover-controller", 0o755, 0, 0, false),
            (
                "usr/lib/systemd/system/drover-agent.service",
                0o644,
                0,
                0,
                false,
            ),
            (
                "usr/lib/systemd/system/drover-controller.service",
                0o644,
                0,
                0,
                false,
            ),
            ("usr/lib/sysusers.d/drover.conf", 0o644, 0, 0, false),
            ("usr/lib/tmpfiles.d/drover.conf", 0o644, 0, 0, false),
            ("usr/share/man/man1/drover.1.gz", 0o644, 0, 0, false),
            ("usr/share/man/man1/drover-audit.1.gz", 0o644, 0, 0, false),
            (
                "usr/share/man/man1/drover-ca-issue.1.gz",
                0o644,
                0,
                0,
                false,
            ),
            (
                "usr/share/bash-completion/completions/drover",
                0o644,
                0,
                0,
                false,
            ),
            (
                "usr/share/zsh/vendor-completions/_drover",
                0o644,
                0,
                0,
                false,
            ),
            (
                "usr/share/fish/vendor_completions.d/drover.fish",
                0o644,
                0,
                0,
                false,
            ),
            (
                "usr/share/doc/drover/examples/local.toml",
                0o644,
                0,
                0,
                false,
            ),
            ("usr/share/doc/drover/README.md", 0o644, 0, 0, false),
            ("etc/drover/controller.toml", 0o640, 0, gid, false),
            ("etc/drover/agent.toml", 0o640, 0, gid, false),
            ("etc/drover", 0o750, 0, gid, true),
            ("etc/drover/pki", 0o700, uid, gid, true),
            ("var/lib/drover", 0o711, uid, gid, true),
            ("var/lib/drover/controller", 0o700, uid, gid, true),
            ("var/lib/drover/agent", 0o711, uid, gid, true),
        ];
        for (path, mode, owner, group, dir) in expected {
            let meta = fs::metadata(root.join(path))
                .unwrap_or_else(|e| panic!("/{path} not installed: {e}"));
            assert_eq!(meta.is_dir(), dir, "/{path}");
            assert_eq!(meta.mode() & 0o7777, mode, "mode of /{path}");
            assert_eq!((meta.uid(), meta.gid()), (owner, group), "owner of /{path}");
        }
        let man = run(Command::new("gzip")
            .arg("-dc")
            .arg(root.join("usr/share/man/man1/drover.1.gz")));
        assert!(man.contains(".TH drover"), "{}", &man[..200.min(man.len())]);
        let version = run(Command::new(root.join("usr/bin/drover")).arg("--version"));
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

        // The units as installed, against the host's targets (a scratch root has none).
        let units = root.join("lib/systemd/system");
        fs::create_dir_all(&units).unwrap();
        for e in fs::read_dir("/lib/systemd/system").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".target") || name.ends_with(".slice") {
                let _ = fs::copy(e.path(), units.join(&name));
            }
        }
        // The host's kill(1) for ExecReload= (a scratch root has no /bin).
        let bin = root.join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy("/bin/kill", bin.join("kill")).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .args(["drover-controller.service", "drover-agent.service"])
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("drover"),
            "systemd-analyze verify ({}):\n{text}",
            out.status
        );

        // An administrator's edit of a conffile survives a reinstall (an upgrade).
        let agent_toml = root.join("etc/drover/agent.toml");
        let edited = fs::read_to_string(&agent_toml).unwrap() + "on_exit = \"keep\"\n";
        fs::write(&agent_toml, &edited).unwrap();
        install();
        assert_eq!(fs::read_to_string(&agent_toml).unwrap(), edited);
        assert_eq!(fs::metadata(&agent_toml).unwrap().mode() & 0o7777, 0o640);
    }

    #[test]
    fn a_missing_binary_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("bin");
        fs::create_dir(&empty).unwrap();
        let err = super::run(&super::Options {
            out: tmp.path().join("dist"),
            bin_dir: Some(empty.clone()),
            compression: "none".into(),
        })
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("cannot copy {}", empty.join("drover").display())),
            "{text}"
        );
        assert!(text.contains("No such file or directory"), "{text}");
    }

    #[test]
    fn completions_and_man_page_cover_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        super::completions_and_man(dir.path()).unwrap();
        let bash = fs::read_to_string(dir.path().join("completions/drover.bash")).unwrap();
        for cmd in [
            "get-nodes",
            "deploy-config",
            "logs",
            "monitor",
            "show-settings",
            "audit",
        ] {
            assert!(bash.contains(cmd), "bash completion lacks {cmd}");
        }
        assert!(dir.path().join("completions/_drover").exists());
        assert!(dir.path().join("completions/drover.fish").exists());
        let man = fs::read_to_string(dir.path().join("man/drover.1")).unwrap();
        assert!(man.contains(".TH drover"), "{}", &man[..200.min(man.len())]);
        // Every page the top page refers to exists, nested ones included.
        for page in [
            "drover-audit",
            "drover-deploy-config",
            "drover-ca",
            "drover-ca-issue",
        ] {
            // roff escapes the hyphens.
            let listed = format!("{}(1)", page.replace('-', "\\-"));
            assert!(
                man.contains(&listed) || page.starts_with("drover-ca-"),
                "{page}"
            );
            let text = fs::read_to_string(dir.path().join(format!("man/{page}.1")))
                .unwrap_or_else(|e| panic!("{page}.1: {e}"));
            assert!(text.contains(&format!(".TH {page}")), "{page}: {text}");
        }
        let issue = fs::read_to_string(dir.path().join("man/drover-ca-issue.1")).unwrap();
        assert!(issue.contains("scope"), "{issue}");
    }
}
