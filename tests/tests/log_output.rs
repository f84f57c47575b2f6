//! The daemons' own log output: a reader of their stderr that goes away (the `ssh`
//! session they were started from closed, a `| logger` that ended, journald stopped)
//! takes neither daemon down; what they log meanwhile is lost, and they go on serving.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Stdio};

use drover_tests::{Cluster, PATIENCE, addr_in_log, bin, eventually};

/// A daemon whose stderr is a pipe the test reads, then closes.
struct Piped(Child);

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Piped {
    fn spawn(mut cmd: Command) -> (Self, BufReader<ChildStderr>) {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        (Self(child), err)
    }

    fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

/// Reads `err` up to the first line containing `needle`, and returns that line.
fn line_with(err: &mut BufReader<ChildStderr>, needle: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "no line with {needle}"
        );
        if line.contains(needle) {
            return line;
        }
    }
}

#[test]
fn a_closed_stderr_takes_no_daemon_down() {
    let c = Cluster::new();
    let mut cmd = Command::new(bin("drover-controller"));
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let (mut controller, mut ctl_err) = Piped::spawn(cmd);
    let addr = addr_in_log(
        &line_with(&mut ctl_err, "controller listening"),
        "controller listening",
    );
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let mut cmd = Command::new(bin("drover-agent"));
    c.agent_args(
        &mut cmd,
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string()],
    );
    let (mut agent, mut agent_err) = Piped::spawn(cmd);
    line_with(&mut agent_err, "connected to controller");
    // Their readers go away; whatever the daemons log next meets a broken pipe.
    drop(ctl_err);
    drop(agent_err);

    let prog = bin("drover-testprog").display().to_string();
    c.deploy_text(
        addr,
        "one.toml",
        &format!(
            "[instances.agent-1]\n[nodes.n1]\ninstance = \"agent-1\"\ncommand = [\"{prog}\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
        ),
    );
    for _ in 0..3 {
        let out = c.drover(addr, &["restart", "n1"]);
        assert_eq!(out.json()["results"]["n1"], true, "{out:?}");
    }
    eventually("n1 running", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        (v["results"]["agent-1"]["n1"]["state"] == "RUNNING").then_some(())
    });
    assert!(controller.running(), "the controller ended");
    assert!(agent.running(), "the agent ended");
}
