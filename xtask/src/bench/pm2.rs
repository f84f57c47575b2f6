//! pm2 7.0.4 under test, set up as in `peer-bench.md`: a scratch `PM2_HOME` (any pm2
//! command starts a daemon in it, so none runs without one), an `ecosystem.config.js`,
//! status through a warm node client calling the God daemon's `getMonitorData` RPC on
//! `rpc.sock` (what `pm2 jlist` uses), `pm2 stop all` and `pm2 kill`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::system::{
    LineHelper, Listing, Pending, PidSource, System, ensure_gone, parse_helper_listing,
    read_pidfile, run,
};

/// The app settings, as printed with the results.
pub(crate) const SETTINGS: &str = "interpreter=\"none\", autorestart=true, restart_delay=0 \
     (other keys default: min_uptime=1000, max_restarts=16); status: RPC getMonitorData from a \
     warm node client on $PM2_HOME/rpc.sock";

/// The status helper: one `getMonitorData` per input line. It answers at once with an
/// error while the daemon is not up, and retries connecting every 10 ms.
const HELPER: &str = r#"// Status helper of `cargo xtask bench`: answers each input line with one pm2
// getMonitorData RPC on $PM2_HOME/rpc.sock, as one JSON line
// {"ok": {name: [status, pid]}} or {"err": message}.
'use strict';
const path = require('path');
const readline = require('readline');

const [pm2dir, sock] = process.argv.slice(2);
const axon = require(path.join(pm2dir, 'modules/pm2-axon'));
const rpc = require(path.join(pm2dir, 'modules/pm2-axon-rpc'));

const out = (v) => process.stdout.write(JSON.stringify(v) + '\n');
const req = axon.socket('req');
req.set('retry timeout', 10);
req.set('retry max timeout', 10);
const client = new rpc.Client(req);
let connected = false;
req.on('connect', () => { connected = true; });
req.on('disconnect', () => { connected = false; });
req.on('error', (e) => { process.stderr.write('rpc error: ' + e.message + '\n'); });
req.connect(sock);

out({ready: true});
const rl = readline.createInterface({input: process.stdin});
rl.on('line', () => {
  if (!connected) {
    out({err: 'not connected to ' + sock});
    return;
  }
  let done = false;
  const timer = setTimeout(() => {
    done = true;
    out({err: 'getMonitorData timed out'});
  }, 10000);
  client.call('getMonitorData', {}, (err, list) => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    if (err) {
      out({err: String(err.message || err)});
      return;
    }
    const ok = {};
    for (const p of list) ok[p.name] = [p.pm2_env ? p.pm2_env.status : '', p.pid || 0];
    out({ok});
  });
});
rl.on('close', () => process.exit(0));
"#;

/// Where pm2 is installed.
#[derive(Debug, Clone)]
pub(crate) struct Install {
    /// The `pm2` command (`node_modules/.bin/pm2`).
    pub(crate) bin: PathBuf,
    /// The package directory (`node_modules/pm2`), for the RPC modules it ships.
    pub(crate) package: PathBuf,
}

/// A pm2 set up in `dir` for the named programs.
pub(crate) struct Pm2 {
    dir: PathBuf,
    home: PathBuf,
    install: Install,
    ecosystem: PathBuf,
    helper: Option<LineHelper>,
    pid: Option<u32>,
    down: bool,
}

/// `ecosystem.config.js` for `names`, each running `argv`.
pub(crate) fn ecosystem(names: &[String], argv: &[&str]) -> String {
    let apps: Vec<_> = names
        .iter()
        .map(|n| {
            json!({
                "name": n,
                "script": argv[0],
                "args": &argv[1..],
                "interpreter": "none",
                "autorestart": true,
                "restart_delay": 0,
            })
        })
        .collect();
    format!("module.exports = {};\n", json!({ "apps": apps }))
}

impl Pm2 {
    /// Writes the ecosystem file and starts the status helper; starts no daemon.
    pub(crate) fn new(
        dir: &Path,
        install: &Install,
        names: &[String],
        argv: &[&str],
    ) -> anyhow::Result<Self> {
        let home = dir.join("home");
        fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
        let ecosystem_file = dir.join("ecosystem.config.js");
        fs::write(&ecosystem_file, ecosystem(names, argv))?;
        let script = dir.join("status_helper.js");
        fs::write(&script, HELPER)?;
        let helper = LineHelper::spawn(
            Command::new("node")
                .arg(&script)
                .arg(&install.package)
                .arg(home.join("rpc.sock")),
            &dir.join("helper.err"),
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            home,
            install: install.clone(),
            ecosystem: ecosystem_file,
            helper: Some(helper),
            pid: None,
            down: false,
        })
    }

    fn pm2(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.install.bin);
        cmd.env("PM2_HOME", &self.home).args(args);
        cmd
    }
}

impl System for Pm2 {
    fn start(&mut self) -> anyhow::Result<Pending> {
        let mut cmd = self.pm2(&["start"]);
        cmd.arg(&self.ecosystem);
        Pending::spawn(
            &mut cmd,
            &self.dir,
            "start",
            "pm2 start ecosystem.config.js",
        )
    }

    fn status(&mut self) -> anyhow::Result<Listing> {
        match self.helper.as_mut() {
            Some(h) => parse_helper_listing(&h.ask()?, "online"),
            None => anyhow::bail!("pm2 was shut down"),
        }
    }

    fn stop_all(&mut self) -> anyhow::Result<Pending> {
        Pending::spawn(
            &mut self.pm2(&["stop", "all"]),
            &self.dir,
            "stop",
            "pm2 stop all",
        )
    }

    fn supervisor_pid(&mut self) -> Option<u32> {
        if self.pid.is_none() {
            self.pid = read_pidfile(&self.home.join("pm2.pid"));
        }
        self.pid
    }

    fn supervisor_source(&self) -> PidSource {
        PidSource::File(self.home.join("pm2.pid"))
    }

    fn daemon_pids(&mut self) -> Vec<u32> {
        self.supervisor_pid().into_iter().collect()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        self.down = true;
        self.helper = None;
        // `pm2 kill` with no daemon would start one first: only call it on a live God.
        let Some(pid) = self.supervisor_pid() else {
            return Ok(());
        };
        let result = run(
            &mut self.pm2(&["kill"]),
            &self.dir,
            "kill",
            "pm2 kill",
            Duration::from_secs(120),
        );
        ensure_gone(pid, Duration::from_secs(30));
        result.map(drop)
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        if !self.down
            && let Err(e) = self.shutdown()
        {
            eprintln!("pm2 kill: {e:#}");
        }
    }
}
