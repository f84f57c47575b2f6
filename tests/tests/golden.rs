//! Golden tests: the exact output of every command against a real two-agent cluster,
//! with pids, ids, ports, paths and times replaced by placeholders. Scripts parse this
//! output; a change to it must be deliberate (review with `cargo insta review`, or
//! regenerate with `INSTA_UPDATE=always`).

use std::net::SocketAddr;

use drover_tests::{Cluster, PATIENCE, bin, canon_pids_and_ids, eventually};

/// Replaces what changes from run to run.
fn canon(c: &Cluster, text: &str) -> String {
    let out = text
        .replace(&c.dir.path().display().to_string(), "<dir>")
        .replace(&bin("drover-testprog").display().to_string(), "<testprog>");
    canon_pids_and_ids(&out)
}

fn run(c: &Cluster, addr: SocketAddr, args: &[&str]) -> String {
    let out = c.drover(addr, args);
    let mut s = format!(
        "$ drover {}\nexit {}\n",
        args.join(" "),
        out.code.unwrap_or(-1)
    );
    if !out.stdout.is_empty() {
        s.push_str("--- stdout\n");
        s.push_str(&out.stdout);
    }
    if !out.stderr.is_empty() {
        s.push_str("--- stderr\n");
        s.push_str(&out.stderr);
    }
    canon(c, &s)
}

#[test]
fn every_command_against_a_two_agent_cluster() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _a1 = c.start_agent("agent-1", addr);
    let _a2 = c.start_agent("agent-2", addr);
    eventually("both agents", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        (v.as_object().unwrap().len() == 2).then_some(())
    });
    let p = bin("drover-testprog").display().to_string();
    let file = c.dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        format!(
            "id = \"golden\"\n\
             [defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             [instances.agent-1]\n[instances.agent-2]\n\
             [nodes.manager]\ninstance = \"agent-1\"\nrole = \"manager\"\nport = 2200\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\n\
             [nodes.worker-1]\ninstance = \"agent-1\"\nrole = \"worker\"\ninterface = \"eth0\"\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\n\
             [nodes.worker-2]\ninstance = \"agent-2\"\nrole = \"worker\"\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\nenv = {{ FOO = \"bar\" }}\n"
        ),
    )
    .unwrap();
    let bad = c.dir.path().join("bad.toml");
    std::fs::write(&bad, "[instances.a]\n[nodes.x]\ninstance = \"b\"\ncommand = [\"x\"]\n[nodes.y]\ninstance = \"c\"\ncommand = [\"x\"]\n").unwrap();
    let f = file.to_str().unwrap();

    let ini = c.dir.path().join("cluster.ini");
    std::fs::write(
        &ini,
        "[instances]\nagent-1\nagent-2\n\n[manager]\ninstance = agent-1\nrole = manager\nport = 2200\n\n\
         [worker-1]\ninstance = agent-1\nrole = worker\ninterface = eth0\n\n\
         [worker-2]\ninstance = agent-2\nrole = worker\nenv = FOO=bar\n",
    )
    .unwrap();
    let roles = c.dir.path().join("roles.toml");
    std::fs::write(
        &roles,
        format!(
            "[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             [roles.manager]\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\n\
             [roles.worker]\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\n"
        ),
    )
    .unwrap();
    let (ini, roles) = (ini.to_str().unwrap(), roles.to_str().unwrap());
    let bad = bad.to_str().unwrap();
    let commands: [&[&str]; 20] = [
        &["get-instances"],
        &["get-config"],
        &["stage-config", bad],
        &["stage-config", f],
        &["get-config", "--as-json"],
        &["deploy"],
        &["deploy-config", f],
        &["get-nodes"],
        &["get-id-value", "bits_per_uid"],
        &["get-id-value", "bits_per_uid", "worker-1", "worker-3"],
        &["restart", "worker-1", "nope"],
        &["stop", "role:worker"],
        &["start"],
        &["restart", "--batch", "2"],
        &["test-timeout", "--with-state", "--timeout", "2s"],
        &["get-config", "--deployed", "--as-json"],
        &["get-config", "--deployed"],
        &["get-config", "--deployed", "--as-toml"],
        &["stage-config", ini],
        &["stage-config", "--roles", roles, ini],
    ];
    let transcript: Vec<String> = commands.iter().map(|args| run(&c, addr, args)).collect();
    insta::assert_snapshot!("every_command", transcript.join("\n"));
}
