//! drover under test: a local cluster (a controller and one agent, `agent-1`, from
//! [`crate::cluster::Cluster`]) in a scratch directory, driven with the `drover` CLI:
//! `deploy-config FILE` starts the nodes, `get-nodes` is the status call (a new CLI
//! process per call, as `supervisorctl status` would be), `stop` stops every node.
//! The supervisor whose children the nodes are is the `drover-agent` process.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use super::system::{Finished, Listing, Pending, PidSource, Prog, System, first_line};
use crate::cluster::Cluster;

/// The node settings, as printed with the results.
pub(crate) const SETTINGS: &str = "restart = \"always\", backoff = { initial = \"0s\" }, \
     readiness = { kind = \"start-period\", period = \"0s\" }; status: `drover get-nodes`, a new \
     CLI process per call (process start and QUIC/mTLS handshake included), like \
     `supervisorctl status`";

/// The instance that runs every node.
const AGENT: &str = "agent-1";

/// The cluster file for `names`, each running `argv`, all on `agent-1`.
pub(crate) fn cluster_file(names: &[String], argv: &[&str]) -> String {
    let command = format!(
        "[{}]",
        argv.iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut text = format!("[instances.{AGENT}]\n");
    for n in names {
        let _ = write!(
            text,
            "\n[nodes.{n}]\ninstance = \"{AGENT}\"\ncommand = {command}\nrestart = \"always\"\n\
             backoff = {{ initial = \"0s\" }}\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
        );
    }
    text
}

/// Fails with the first error of a zeek-client style reply `{"errors": [...], ...}`.
fn check_errors(v: &Value, what: &str) -> anyhow::Result<()> {
    match v.get("errors") {
        Some(Value::Array(errors)) if !errors.is_empty() => {
            let first = match &errors[0] {
                Value::String(s) => s.clone(),
                Value::Object(o) if o.contains_key("error") => {
                    let error = o.get("error").and_then(Value::as_str).unwrap_or("?");
                    match o.get("source").and_then(Value::as_str) {
                        Some(source) => format!("{source}: {error}"),
                        None => error.to_owned(),
                    }
                }
                other => other.to_string(),
            };
            bail!("`{what}` reported an error: {}", first_line(&first));
        }
        Some(Value::Array(_)) => Ok(()),
        _ => bail!("`{what}` printed no \"errors\" list"),
    }
}

/// Parses `drover get-nodes`: `results` maps instance to node name to an entry with
/// `state` and `pid`; entries whose `mgmt_role` is not null (the agent itself) are not
/// nodes.
pub(crate) fn parse_get_nodes(v: &Value) -> anyhow::Result<Listing> {
    check_errors(v, "drover get-nodes")?;
    let Some(results) = v.get("results").and_then(Value::as_object) else {
        bail!("`drover get-nodes` printed no \"results\" object");
    };
    let mut out = Listing::new();
    for nodes in results.values() {
        let Some(nodes) = nodes.as_object() else {
            continue;
        };
        for (name, entry) in nodes {
            if entry.get("mgmt_role").is_some_and(|r| !r.is_null()) {
                continue;
            }
            let pid = entry
                .get("pid")
                .and_then(Value::as_u64)
                .and_then(|p| u32::try_from(p).ok());
            out.insert(
                name.clone(),
                Prog {
                    running: entry.get("state").and_then(Value::as_str) == Some("RUNNING"),
                    pid,
                },
            );
        }
    }
    Ok(out)
}

/// Checks a finished `deploy-config` or `stop`: no errors, no failed node, exit 0.
pub(crate) fn check_reply(done: &Finished) -> anyhow::Result<()> {
    // The JSON names the problem best; the exit status and stderr when there is none.
    if let Ok(v) = serde_json::from_str::<Value>(&done.stdout) {
        check_errors(&v, &done.label)?;
        let results = v.get("results");
        // deploy-config: {"results": {"nodes": {name: {"success": bool, ...}}}}
        let failed_node = results
            .and_then(|r| r.get("nodes"))
            .and_then(Value::as_object)
            .and_then(|nodes| {
                nodes
                    .iter()
                    .find(|(_, n)| n.get("success").and_then(Value::as_bool) == Some(false))
            });
        if let Some((name, node)) = failed_node {
            let why = node.get("stderr").and_then(Value::as_str).unwrap_or("");
            bail!(
                "`{}` failed for node {name}: {}",
                done.label,
                first_line(why)
            );
        }
        // stop: {"results": {name: bool}}
        let failed_stop = results
            .and_then(Value::as_object)
            .and_then(|r| r.iter().find(|(_, ok)| ok.as_bool() == Some(false)));
        if let Some((name, _)) = failed_stop {
            bail!("`{}` reported {name}: false", done.label);
        }
    } else if done.status.success() {
        bail!("`{}` printed no JSON object", done.label);
    }
    done.check_status()
}

/// A drover cluster set up in `dir` for the named nodes.
pub(crate) struct Drover {
    dir: PathBuf,
    cluster: Option<Cluster>,
    file: PathBuf,
}

impl Drover {
    /// Starts the controller and the agent (untimed) and writes the cluster file.
    pub(crate) fn new(
        dir: &Path,
        bin_dir: &Path,
        names: &[String],
        argv: &[&str],
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = dir.join("cluster.toml");
        fs::write(&file, cluster_file(names, argv))?;
        let cluster = Cluster::start(&dir.join("cluster"), bin_dir, 1, 0)?;
        Ok(Self {
            dir: dir.to_owned(),
            cluster: Some(cluster),
            file,
        })
    }

    fn cluster(&mut self) -> anyhow::Result<&mut Cluster> {
        let cluster = self.cluster.as_mut().context("the cluster was shut down")?;
        cluster.check_alive()?;
        Ok(cluster)
    }
}

impl System for Drover {
    fn start(&mut self) -> anyhow::Result<Pending> {
        let file = self.file.clone();
        let mut cmd = self.cluster()?.client();
        cmd.arg("deploy-config").arg(&file);
        Pending::spawn(&mut cmd, &self.dir, "start", "drover deploy-config")
    }

    fn status(&mut self) -> anyhow::Result<Listing> {
        let out = self
            .cluster()?
            .client()
            .arg("get-nodes")
            .output()
            .context("cannot run `drover get-nodes`")?;
        // The JSON names the problem best; stderr when there is none.
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
            let listing = parse_get_nodes(&v)?;
            if out.status.success() {
                return Ok(listing);
            }
        }
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`drover get-nodes` failed ({}): {}",
            out.status,
            first_line(&err)
        );
    }

    fn stop_all(&mut self) -> anyhow::Result<Pending> {
        let mut cmd = self.cluster()?.client();
        cmd.arg("stop");
        Pending::spawn(&mut cmd, &self.dir, "stop", "drover stop")
    }

    fn supervisor_pid(&mut self) -> Option<u32> {
        self.cluster.as_ref()?.pid(AGENT)
    }

    fn supervisor_source(&self) -> PidSource {
        match self.cluster.as_ref().and_then(|c| c.pid(AGENT)) {
            Some(pid) => PidSource::Pid(pid),
            None => PidSource::File(self.dir.join("no-agent")),
        }
    }

    fn daemon_pids(&mut self) -> Vec<u32> {
        let Some(c) = self.cluster.as_ref() else {
            return Vec::new();
        };
        [AGENT, "controller"]
            .iter()
            .filter_map(|n| c.pid(n))
            .collect()
    }

    fn check(&self, done: &Finished) -> anyhow::Result<()> {
        check_reply(done)
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        // Dropping the cluster SIGTERMs the agent and the controller; nodes outlive an
        // agent by design, and the scenario's leftover guard kills any that remain.
        drop(self.cluster.take());
        Ok(())
    }
}
