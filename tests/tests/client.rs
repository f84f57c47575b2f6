//! The `drover` CLI as an operator meets it: settings and their precedence, tables,
//! compact JSON, and errors that say what is wrong without a backtrace.

use std::process::Command;
use std::time::Duration;

use drover_tests::{Cluster, PATIENCE, bin, eventually, run_cli};

fn drover(args: &[&str], envs: &[(&str, &str)]) -> drover_tests::CliOutput {
    let mut cmd = Command::new(bin("drover"));
    cmd.args(args)
        .env_remove("DROVER_CONTROLLER")
        .env("HOME", "/nonexistent");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_cli(cmd, Duration::from_secs(30))
}

#[test]
fn settings_precedence_file_env_set_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client.toml");
    std::fs::write(
        &file,
        "[controller]\nhost = \"ctl.example\"\nport = 1111\n[client]\npretty_json = false\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let port = |out: &drover_tests::CliOutput| -> String {
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.stdout
            .lines()
            .find(|l| l.starts_with("port = "))
            .unwrap()
            .to_owned()
    };
    let out = drover(&["show-settings"], &[]);
    assert_eq!(port(&out), "port = 2150", "built-in default");
    assert!(out.stdout.contains("host = \"127.0.0.1\""));
    assert_eq!(
        port(&drover(&["-c", f, "show-settings"], &[])),
        "port = 1111"
    );
    let env = [(
        "DROVER_CLIENT_SETTINGS",
        "controller.port=2222 client.request_timeout_secs=3",
    )];
    let out = drover(&["-c", f, "show-settings"], &env);
    assert_eq!(port(&out), "port = 2222");
    assert!(
        out.stdout.contains("request_timeout_secs = 3"),
        "{}",
        out.stdout
    );
    let out = drover(
        &["-c", f, "--set", "controller.port=3333", "show-settings"],
        &env,
    );
    assert_eq!(port(&out), "port = 3333");
    let out = drover(
        &[
            "-c",
            f,
            "--set",
            "controller.port=3333",
            "--controller",
            ":4444",
            "show-settings",
        ],
        &env,
    );
    assert_eq!(port(&out), "port = 4444");
    assert!(
        out.stdout.contains("host = \"ctl.example\""),
        "only the port was overridden"
    );
    assert!(out.stdout.contains("pretty_json = false"));

    let out = drover(&["--set", "client.colour=1", "show-settings"], &[]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .starts_with("error: invalid settings: unknown field `colour`"),
        "{}",
        out.stderr
    );
    let out = drover(&["-c", "/nonexistent/drover.toml", "show-settings"], &[]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("cannot read settings file /nonexistent/drover.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn invalid_cluster_file_is_reported_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[instances.a]\n[nodes.n]\ninstance = \"a\"\ncomand = [\"x\"]\n",
    )
    .unwrap();
    // Nothing listens on port 9: the error must come from the file, at once.
    let out = drover(
        &[
            "--controller",
            "127.0.0.1:9",
            "--ca",
            "x",
            "--cert",
            "x",
            "--key",
            "x",
            "stage-config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .starts_with("error: configuration has errors, not sending:"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("bad.toml:2: nodes.n.comand: unknown key 'comand' (did you mean 'command'?)"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("backtrace"));
    let out = drover(
        &[
            "--ca",
            "x",
            "--cert",
            "x",
            "--key",
            "x",
            "stage-config",
            "/nonexistent.toml",
        ],
        &[],
    );
    assert!(
        out.stderr
            .contains("cannot read cluster file /nonexistent.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn tables_and_compact_json() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _a = c.start_agent("agent-1", addr);
    eventually("agent", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        v.get("agent-1").map(|_| ())
    });
    let file = c.dir.path().join("t.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.web]\ninstance = \"agent-1\"\nrole = \"web\"\ncommand = [\"{}\", \"--status\", \"serving\", \"--ready-after\", \"100ms\"]\nreadiness = {{ kind = \"notify\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let out = c.drover(addr, &["status"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let header = out.stdout.lines().next().unwrap();
    for col in [
        "INSTANCE", "NODE", "ROLE", "STATE", "PID", "RESTARTS", "UPTIME", "RSS MIB", "STATUS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let web = out.stdout.lines().find(|l| l.contains(" web ")).unwrap();
    assert!(web.contains("RUNNING") && web.contains("ready"), "{web}");
    assert!(
        !out.stdout.contains('\u{1b}'),
        "no colour when not a terminal"
    );
    assert!(out.stdout.contains("(controller)") && out.stdout.contains("(agent)"));

    let out = c.drover(addr, &["-o", "table", "get-instances"]);
    assert!(
        out.stdout.contains("agent-1") && out.stdout.contains("127.0.0.1"),
        "{}",
        out.stdout
    );

    let out = c.drover(
        addr,
        &["--set", "client.pretty_json=false", "get-instances"],
    );
    assert_eq!(out.stdout, "{\"agent-1\": {\"host\": \"127.0.0.1\"}}\n");
}

#[test]
fn relative_state_dirs_work() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.current_dir(c.dir.path())
        .args([
            "--name",
            "agent-1",
            "--controller",
            &addr.to_string(),
            "--state-dir",
            "rel-state",
        ])
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file("agent-1.crt"))
        .arg("--key")
        .arg(c.pki_file("agent-1.key"));
    let _agent = drover_tests::Proc::spawn("agent-1", cmd, c.dir.path().join("agent-rel.log"));
    let file = c.dir.path().join("n.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--ready-after\", \"0\"]\nreadiness = {{ kind = \"notify\", timeout = \"5s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    let out = eventually("deployed", PATIENCE, || {
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        (out.code == Some(0)).then_some(out)
    });
    assert_eq!(
        out.json()["results"]["nodes"]["n"]["success"],
        true,
        "notify socket path is absolute"
    );
}
