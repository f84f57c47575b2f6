//! supervisord 4.3.0 under test, set up as in `peer-bench.md`: a scratch directory with
//! `supervisord.conf`, the daemon talking only over a unix socket, status through a warm
//! XML-RPC client (`supervisor.getAllProcessInfo`), `supervisorctl stop all` and
//! `supervisorctl shutdown`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::system::{
    LineHelper, Listing, Pending, PidSource, System, ensure_gone, parse_helper_listing,
    read_pidfile, run,
};

/// The program settings, as printed with the results.
pub(crate) const SETTINGS: &str = "autorestart=true, startsecs=0 (the startsecs0 variant of \
     peer-bench.md; other keys default: startretries=3, stopsignal=TERM); status: XML-RPC \
     supervisor.getAllProcessInfo from a warm python client on the unix socket";

/// The status helper: one `getAllProcessInfo` per input line.
const HELPER: &str = r#""""Status helper of `cargo xtask bench`: answers each input line with one XML-RPC
supervisor.getAllProcessInfo() over supervisord's unix socket, as one JSON line
{"ok": {name: [statename, pid]}} or {"err": message}."""
import json
import socket
import sys
from xmlrpc.client import ServerProxy

from supervisor.xmlrpc import SupervisorTransport

socket.setdefaulttimeout(10)
URL = "unix://" + sys.argv[1]


def proxy():
    return ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, URL))


p = proxy()
print(json.dumps({"ready": True}), flush=True)
for _ in sys.stdin:
    try:
        infos = p.supervisor.getAllProcessInfo()
        out = {"ok": {i["name"]: [i["statename"], i["pid"]] for i in infos}}
    except Exception as e:  # noqa: BLE001 - any failure is reported, then retried
        p = proxy()
        text = str(e).strip() or type(e).__name__
        out = {"err": text.splitlines()[0]}
    print(json.dumps(out), flush=True)
"#;

/// A supervisord set up in `dir` for the named programs.
pub(crate) struct Supervisord {
    dir: PathBuf,
    venv: PathBuf,
    conf: PathBuf,
    helper: Option<LineHelper>,
    pid: Option<u32>,
    down: bool,
}

/// The configuration file for `names`, each running `argv` with `env` added to its
/// environment.
pub(crate) fn config_with_env(
    dir: &Path,
    names: &[String],
    argv: &[&str],
    env: &[(String, String)],
) -> String {
    let d = dir.display();
    let mut text = format!(
        "[unix_http_server]\nfile={d}/supervisor.sock\n\
         [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
         childlogdir={d}/logs\n\
         [rpcinterface:supervisor]\n\
         supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
         [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n"
    );
    let environment = env
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(",");
    for n in names {
        let _ = write!(
            text,
            "[program:{n}]\ncommand={}\nautorestart=true\nstartsecs=0\n",
            argv.join(" ")
        );
        if !environment.is_empty() {
            let _ = writeln!(text, "environment={environment}");
        }
    }
    text
}

impl Supervisord {
    /// Writes the configuration; starts nothing.
    pub(crate) fn new(
        dir: &Path,
        venv: &Path,
        names: &[String],
        argv: &[&str],
    ) -> anyhow::Result<Self> {
        Self::with_env(dir, venv, names, argv, &[])
    }

    /// [`Supervisord::new`] with environment variables for every program.
    pub(crate) fn with_env(
        dir: &Path,
        venv: &Path,
        names: &[String],
        argv: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let conf = dir.join("supervisord.conf");
        fs::write(&conf, config_with_env(dir, names, argv, env))?;
        let script = dir.join("status_helper.py");
        fs::write(&script, HELPER)?;
        // Started before the clock: it connects only when asked.
        let helper = LineHelper::spawn(
            Command::new(venv.join("bin/python"))
                .arg(&script)
                .arg(dir.join("supervisor.sock")),
            &dir.join("helper.err"),
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            venv: venv.to_owned(),
            conf,
            helper: Some(helper),
            pid: None,
            down: false,
        })
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.venv.join("bin/supervisorctl"));
        cmd.arg("-c").arg(&self.conf).args(args);
        cmd
    }
}

impl System for Supervisord {
    fn start(&mut self) -> anyhow::Result<Pending> {
        let mut cmd = Command::new(self.venv.join("bin/supervisord"));
        cmd.arg("-c").arg(&self.conf);
        Pending::spawn(
            &mut cmd,
            &self.dir,
            "start",
            "supervisord -c supervisord.conf",
        )
    }

    fn status(&mut self) -> anyhow::Result<Listing> {
        match self.helper.as_mut() {
            Some(h) => parse_helper_listing(&h.ask()?, "RUNNING"),
            None => anyhow::bail!("supervisord was shut down"),
        }
    }

    fn stop_all(&mut self) -> anyhow::Result<Pending> {
        Pending::spawn(
            &mut self.ctl(&["stop", "all"]),
            &self.dir,
            "stop",
            "supervisorctl stop all",
        )
    }

    fn supervisor_pid(&mut self) -> Option<u32> {
        if self.pid.is_none() {
            self.pid = read_pidfile(&self.dir.join("supervisord.pid"));
        }
        self.pid
    }

    fn supervisor_source(&self) -> PidSource {
        PidSource::File(self.dir.join("supervisord.pid"))
    }

    fn daemon_pids(&mut self) -> Vec<u32> {
        self.supervisor_pid().into_iter().collect()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        self.down = true;
        self.helper = None;
        let Some(pid) = self.supervisor_pid() else {
            return Ok(());
        };
        let result = run(
            &mut self.ctl(&["shutdown"]),
            &self.dir,
            "shutdown",
            "supervisorctl shutdown",
            Duration::from_secs(60),
        );
        ensure_gone(pid, Duration::from_secs(30));
        result.map(drop)
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        if !self.down
            && let Err(e) = self.shutdown()
        {
            eprintln!("supervisord shutdown: {e:#}");
        }
    }
}
