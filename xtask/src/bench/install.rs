//! Installs the peers where `peer-bench.md` got them, under `target/bench`: supervisord
//! from PyPI into a virtualenv (`venv/`), pm2 from npm into a local prefix (`npm/`).
//! An install that is already there at the right version is kept.
//!
//! pm2's version is read from its `package.json`, never with `pm2 --version`: any pm2
//! command starts a daemon (in `~/.pm2` without `PM2_HOME`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::pm2::Install;
use super::system::{first_line, run};

/// The supervisord version measured in `peer-bench.md`.
pub(crate) const SUPERVISOR_VERSION: &str = "4.3.0";
/// The pm2 version measured in `peer-bench.md`.
pub(crate) const PM2_VERSION: &str = "7.0.4";

fn version_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Makes sure `<bench>/venv` has supervisor 4.3.0; returns the venv.
pub(crate) fn supervisord(bench: &Path) -> anyhow::Result<PathBuf> {
    let venv = bench.join("venv");
    let supervisord = venv.join("bin/supervisord");
    let have = || version_of(Command::new(&supervisord).arg("--version"));
    if have().as_deref() == Some(SUPERVISOR_VERSION) {
        return Ok(venv);
    }
    let logs = bench.join("install");
    fs::create_dir_all(&logs)?;
    if !venv.join("bin/pip").exists() {
        eprintln!("creating a virtualenv in {}", venv.display());
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            &logs,
            "venv",
            "python3 -m venv",
            Duration::from_secs(300),
        )?;
    }
    eprintln!(
        "installing supervisor=={SUPERVISOR_VERSION} into {}",
        venv.display()
    );
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--disable-pip-version-check",
            "--quiet",
            &format!("supervisor=={SUPERVISOR_VERSION}"),
        ]),
        &logs,
        "pip",
        "pip install supervisor",
        Duration::from_secs(600),
    )
    .map_err(|e| {
        let tail = fs::read_to_string(logs.join("pip.err")).unwrap_or_default();
        match tail.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(last) => anyhow::anyhow!("{e}; {}", last.trim()),
            None => e,
        }
    })?;
    match have() {
        Some(v) if v == SUPERVISOR_VERSION => Ok(venv),
        Some(v) => bail!("supervisord --version says {v}, not {SUPERVISOR_VERSION}"),
        None => bail!("{} does not run after the install", supervisord.display()),
    }
}

fn pm2_version(package: &Path) -> Option<String> {
    let text = fs::read_to_string(package.join("package.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("version")?.as_str().map(str::to_owned)
}

/// Makes sure `<bench>/npm` has pm2 7.0.4 and that node runs.
pub(crate) fn pm2(bench: &Path) -> anyhow::Result<(Install, String)> {
    let node = version_of(Command::new("node").arg("--version"))
        .context("node is not installed (apt-get install nodejs npm)")?;
    let prefix = bench.join("npm");
    let install = Install {
        bin: prefix.join("node_modules/.bin/pm2"),
        package: prefix.join("node_modules/pm2"),
    };
    if pm2_version(&install.package).as_deref() != Some(PM2_VERSION) || !install.bin.exists() {
        let logs = bench.join("install");
        fs::create_dir_all(&logs)?;
        eprintln!("installing pm2@{PM2_VERSION} into {}", prefix.display());
        run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&prefix)
                .arg(format!("pm2@{PM2_VERSION}")),
            &logs,
            "npm",
            "npm install pm2",
            Duration::from_secs(600),
        )
        .map_err(|e| {
            let err = fs::read_to_string(logs.join("npm.err")).unwrap_or_default();
            let line = err
                .lines()
                .find(|l| l.contains("ERR!"))
                .map_or_else(|| first_line(&err), str::to_owned);
            anyhow::anyhow!("{e}; {line}")
        })?;
    }
    match pm2_version(&install.package) {
        Some(v) if v == PM2_VERSION => Ok((install, node)),
        Some(v) => bail!("npm installed pm2 {v}, not {PM2_VERSION}"),
        None => bail!("no pm2 in {} after the install", prefix.display()),
    }
}
