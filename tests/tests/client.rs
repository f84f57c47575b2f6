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
            .starts_with("error: invalid settings: client.colour: unknown key 'colour'"),
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

/// A file with errors is not sent: they are told on stderr, each where it is, and on
/// stdout as the JSON Zeek's controller answers a stage it refuses, so that scripts
/// written for zeek-client see them where they look.
#[test]
fn invalid_cluster_file_is_reported_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[instances.a]\n[nodes.n]\ninstance = \"a\"\ncomand = [\"x\"]\n",
    )
    .unwrap();
    // Nothing listens on port 9, and there are no certificates: what is told must come
    // from the file, at once.
    let offline = |args: &[&str]| {
        let flags = [
            "--controller",
            "127.0.0.1:9",
            "--ca",
            "x",
            "--cert",
            "x",
            "--key",
            "x",
        ];
        drover(&[&flags[..], args].concat(), &[])
    };
    let out = offline(&["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .starts_with("error: configuration has errors, not sending:"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("bad.toml:4: nodes.n.comand: unknown key 'comand' (did you mean 'command'?)"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("backtrace"));
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "errors": ["unknown key 'comand' (did you mean 'command'?)"],
            "results": {}
        })
    );
    // An INI file with Zeek's own refusal: Zeek's text.
    let ini = dir.path().join("bad.ini");
    std::fs::write(
        &ini,
        "[instances]\nagent-1 =\n\n[manager]\nrole = manager\ninstance = instance-2\n",
    )
    .unwrap();
    let out = offline(&["deploy-config", ini.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        json["errors"],
        serde_json::json!(["node 'manager' has undeclared instance name 'instance-2'"]),
        "{}",
        out.stderr
    );
    // A roles file is for INI files, which name no commands: given for a TOML file,
    // which has its own templates, it is not ignored without a word.
    let roles = dir.path().join("roles.toml");
    std::fs::write(&roles, "[roles.worker]\ncommand = [\"/bin/true\"]\n").unwrap();
    let out = offline(&[
        "stage-config",
        "--roles",
        roles.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("--roles applies to Zeek INI files; ")
            && out.stderr.contains("bad.toml is a TOML cluster file"),
        "{}",
        out.stderr
    );
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
            .contains("cannot read cluster file /nonexistent.toml: no such file or directory\n"),
        "{}",
        out.stderr
    );
}

/// The file is read while the connection is being made: a bad one is still told alone
/// and at once, not after the handshake gives up on a controller that does not answer.
#[test]
fn a_bad_file_is_told_at_once_while_the_controller_does_not_answer() {
    let c = Cluster::new();
    // A UDP socket that never answers: the handshake waits out its timeout (5 s).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let file = c.dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[instances.a]\n[nodes.n]\ninstance = \"a\"\ncomand = [\"x\"]\n",
    )
    .unwrap();
    for command in ["stage-config", "deploy-config"] {
        let mut cmd = c.drover_command(addr);
        cmd.args(["--timeout", "60s", command]).arg(&file);
        let started = std::time::Instant::now();
        let out = run_cli(cmd, Duration::from_secs(30));
        let took = started.elapsed();
        assert_eq!(out.code, Some(1), "{command}: {}", out.stderr);
        assert_eq!(
            out.stderr.lines().next(),
            Some("error: configuration has errors, not sending:"),
            "{command}: {}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("controller"),
            "{command}: only the file is told: {}",
            out.stderr
        );
        assert!(
            took < Duration::from_secs(4),
            "{command}: the file error took {took:?}, as long as the handshake's timeout"
        );
    }
    // A good file goes on to the connection, and its failure is told.
    let good = c.dir.path().join("good.toml");
    std::fs::write(&good, "[instances.a]\n").unwrap();
    let mut cmd = c.drover_command(addr);
    cmd.args(["--timeout", "60s", "stage-config"]).arg(&good);
    let out = run_cli(cmd, Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains(&addr.to_string()), "{}", out.stderr);
}

/// What only the controller can check (a node on its own port) is told on stderr as
/// well as in the JSON: a person reading the terminal is not left with an exit code.
#[test]
fn a_configuration_the_controller_refuses_is_told_on_stderr() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let file = c.dir.path().join("clash.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.a]\n[nodes.n]\ninstance = \"a\"\ncommand = [\"/bin/true\"]\nport = {}\n",
            addr.port()
        ),
    )
    .unwrap();
    let said = format!(
        "node 'n' port {}/tcp conflicts with controller port",
        addr.port()
    );
    for command in ["stage-config", "deploy-config"] {
        let out = c.drover(addr, &[command, file.to_str().unwrap()]);
        assert_eq!(out.code, Some(1), "{command}: {}", out.stderr);
        assert_eq!(
            out.json(),
            serde_json::json!({"errors": [said], "results": {}}),
            "{command}"
        );
        assert_eq!(
            out.stderr.trim_end(),
            format!("error: the controller refused the configuration: {said}"),
            "{command}"
        );
    }
}

#[test]
fn tables_and_compact_json() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _a = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
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
        "INSTANCE", "NODE", "ROLE", "STATE", "PID", "RESTARTS", "UPTIME", "MEM MIB", "CPU S",
        "STATUS",
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
    // Named nodes only; a name that matches none fails the command.
    let out = c.drover(addr, &["status", "w*"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    assert!(
        out.stdout.lines().nth(1).unwrap().contains(" web "),
        "{}",
        out.stdout
    );
    // zeek-client's shape by default; every reported field with --full.
    let plain = c.drover(addr, &["get-nodes"]).json();
    let web = &plain["results"]["agent-1"]["web"];
    assert_eq!(web["state"], "RUNNING", "{plain}");
    assert!(web.get("restarts").is_none(), "{plain}");
    let full = c.drover(addr, &["get-nodes", "--full"]).json();
    let web = &full["results"]["agent-1"]["web"];
    assert_eq!(web["state"], "RUNNING", "zeek-client's form kept: {full}");
    assert_eq!(web["restarts"], 0, "{full}");
    assert_eq!(web["ready"], true, "{full}");
    assert_eq!(web["status_text"], "ready", "{full}");
    assert_eq!(web["generation"], 1, "{full}");
    assert!(
        web["started_at_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 1_700_000_000_000),
        "{full}"
    );
    assert!(web.get("node").is_none(), "{full}");
    let out = c.drover(addr, &["status", "role:web"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    // The table on stdout, what is wrong on stderr.
    let out = c.drover(addr, &["status", "web", "db"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    assert_eq!(out.stderr.trim(), "error: no node matches 'db'");

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

/// Node name -> (instance, role, pid) from get-nodes, once every node runs.
fn running(
    c: &Cluster,
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<(String, String, String, u64)> {
    eventually("every node RUNNING", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        let mut out = Vec::new();
        for (instance, nodes) in v["results"].as_object()? {
            for (node, s) in nodes.as_object()? {
                if s["mgmt_role"].is_string() {
                    continue;
                }
                if s["state"] != "RUNNING" {
                    return None;
                }
                out.push((
                    node.clone(),
                    instance.clone(),
                    s["cluster_role"].as_str().unwrap_or("").to_owned(),
                    s["pid"].as_u64()?,
                ));
            }
        }
        out.sort();
        (out.len() == n).then_some(out)
    })
}

#[test]
fn the_same_cluster_in_toml_and_zeek_ini_deploys_the_same_nodes() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _a1 = c.start_agent("agent-1", addr);
    let _a2 = c.start_agent("agent-2", addr);
    eventually("two agents", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        (v.as_object()?.len() == 2).then_some(())
    });
    let prog = bin("drover-testprog").display().to_string();
    let roles = format!(
        "[defaults]\nrestart = \"always\"\n\n\
         [roles.manager]\ncommand = [\"{prog}\", \"--print\", \"manager\"]\n\n\
         [roles.worker]\ncommand = [\"{prog}\", \"--print\", \"worker\"]\n"
    );
    let toml = format!(
        "[instances.agent-1]\n[instances.agent-2]\n\n\
         [defaults]\nrestart = \"always\"\n\n\
         [roles.manager]\ncommand = [\"{prog}\", \"--print\", \"manager\"]\n\n\
         [roles.worker]\ncommand = [\"{prog}\", \"--print\", \"worker\"]\n\n\
         [nodes.manager]\ninstance = \"agent-1\"\nrole = \"manager\"\nport = 5000\n\n\
         [nodes.worker-01]\ninstance = \"agent-2\"\nrole = \"worker\"\ninterface = \"lo\"\n\
         env = {{ FOO = \"bar baz\" }}\ncpu_affinity = 0\n\n\
         [nodes.worker-02]\ninstance = \"agent-2\"\nrole = \"worker\"\ninterface = \"lo\"\n"
    );
    let ini = "[instances]\nagent-1\nagent-2\n\n\
               [manager]\ninstance = agent-1\nrole = manager\nport = 5000/tcp\n\n\
               [worker-01]\ninstance = agent-2\ntype = WORKER\ninterface = lo\n\
               env = FOO=\"bar baz\"\ncpu_affinity = 0\n\n\
               [worker-02]\ninstance = agent-2\nrole = Supervisor::WORKER\ninterface = lo\n";
    let write = |name: &str, text: &str| {
        let p = c.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (toml, ini, roles) = (
        write("cluster.toml", &toml),
        write("cluster.ini", ini),
        write("roles.toml", &roles),
    );

    // Without templates the INI nodes have no command: the controller says so.
    let out = c.drover(addr, &["stage-config", &ini]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(out.stdout.contains("no command"), "{}", out.stdout);

    let out = c.drover(addr, &["deploy-config", &toml]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let from_toml = running(&c, addr, 3);
    let toml_spec = c.drover(addr, &["get-config", "--deployed", "--as-toml"]);
    assert_eq!(toml_spec.code, Some(0), "{}", toml_spec.stderr);

    // The INI file with the roles file is the same cluster: deploying it restarts nothing.
    let out = c.drover(addr, &["deploy-config", "--roles", &roles, &ini]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(running(&c, addr, 3), from_toml, "same nodes, same pids");
    let ini_spec = c.drover(addr, &["get-config", "--deployed", "--as-toml"]);
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert!(toml_spec.stdout.starts_with("id = "));
    assert_eq!(body(&ini_spec.stdout), body(&toml_spec.stdout));

    // get-config prints Zeek's INI by default, which reads back as the same cluster.
    let out = c.drover(addr, &["get-config", "--deployed"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("[instances]\nagent-1\nagent-2\n\n[manager]\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("role = WORKER\n"), "{}", out.stdout);
    let again = write("again.ini", &out.stdout);
    let out = c.drover(addr, &["deploy-config", "--roles", &roles, &again]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(running(&c, addr, 3), from_toml);

    // --as-toml writes a file that stages as it is; -f writes to a file.
    let saved = c.dir.path().join("saved.toml");
    let out = c.drover(
        addr,
        &[
            "get-config",
            "--deployed",
            "--as-toml",
            "-f",
            saved.to_str().unwrap(),
        ],
    );
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), ""));
    let out = c.drover(addr, &["stage-config", saved.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let out = c.drover(addr, &["get-config", "--as-json", "--as-toml"]);
    assert_eq!(
        out.code,
        Some(2),
        "clap refuses both formats: {}",
        out.stderr
    );
}

/// Runs `cmd` with its stdout a pipe whose reader has gone before it starts, as in
/// `drover status | head -0`: its exit code and stderr.
fn with_stdout_gone(mut cmd: Command) -> (Option<i32>, String) {
    use std::io::Read;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.arg("--timeout")
        .arg("10s")
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let status = eventually("the command ends", PATIENCE, || child.try_wait().unwrap());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

/// Starts `args` with stdout a pipe that the test reads until a line with all of
/// `wanted` appears (calling `poke` until then), then closes: with nothing more to
/// print, the command must see its reader gone and end, quietly and with status 0.
fn ends_when_its_reader_goes(
    c: &Cluster,
    addr: std::net::SocketAddr,
    args: &[&str],
    wanted: &'static [&'static str],
    mut poke: impl FnMut(),
) {
    use std::io::BufRead;
    let mut cmd = c.drover_command_as("ops", addr);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    // Reads until the line, then drops the pipe's only read end.
    std::thread::spawn(move || {
        let line = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| wanted.iter().all(|w| l.contains(w)));
        let _ = seen_tx.send(line);
    });
    let line = eventually(&format!("{args:?} printed {wanted:?}"), PATIENCE, || {
        poke();
        seen.recv_timeout(Duration::from_secs(1)).ok()
    });
    assert!(line.is_some(), "{args:?} ended before printing {wanted:?}");
    let status = eventually(
        &format!("{args:?} ends once its reader went away"),
        PATIENCE,
        || child.try_wait().unwrap(),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
    assert_eq!(stderr, "", "{args:?}");
}

/// `drover status | head` and the like: a reader that goes away is no error. The
/// command neither panics nor complains, ends with the status it would have had, and a
/// stream without end (`monitor`, `logs -f`) ends as soon as its reader goes, even
/// when there is nothing more to print.
#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _a = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    c.deploy_text(
        addr,
        "t.toml",
        &format!(
            "[instances.agent-1]\n[nodes.web]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"web-says-hello\"]\n",
            bin("drover-testprog").display()
        ),
    );
    for args in [
        &["status"][..],
        &["get-nodes"],
        &["get-instances"],
        &["-o", "table", "get-instances"],
        &["-o", "table", "get-nodes"],
        &["get-config", "--deployed"],
        &["get-config", "--deployed", "--as-toml"],
        &["audit"],
        &["logs", "web"],
        &["show-settings"],
        &["restart", "web"],
    ] {
        let mut cmd = c.drover_command_as("ops", addr);
        cmd.args(args);
        let (code, stderr) = with_stdout_gone(cmd);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
    // A command that fails keeps its status; what it tells on stderr still comes.
    let mut cmd = c.drover_command_as("ops", addr);
    cmd.args(["restart", "nosuch"]);
    let (code, stderr) = with_stdout_gone(cmd);
    assert_eq!(
        (code, stderr.as_str()),
        (Some(1), "error: nosuch: unknown cluster node\n")
    );
    let mut cmd = c.drover_command_as("ops", addr);
    cmd.args(["logs", "nosuch"]);
    let (code, stderr) = with_stdout_gone(cmd);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("error: nosuch: "), "{stderr}");

    ends_when_its_reader_goes(&c, addr, &["logs", "-f", "web"], &["web-says-hello"], || {});
    // The restart's last event is the node RUNNING again; the cluster is quiet after it.
    ends_when_its_reader_goes(&c, addr, &["monitor"], &["\"web\"", "RUNNING"], || {
        assert_eq!(c.drover(addr, &["restart", "web"]).code, Some(0));
    });
}

/// `logs` of a node whose agent is gone says which node and which instance, as the
/// other node commands do; and those commands fail too, `restart` included, which
/// exits 0 for a node it restarted that failed to come back, not for one it never
/// reached.
#[test]
fn a_failed_logs_names_the_node_and_its_instance() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    let _other = c.start_agent("agent-2", addr);
    c.wait_for_agent(addr, "agent-1");
    c.wait_for_agent(addr, "agent-2");
    let prog = bin("drover-testprog");
    c.deploy_text(
        addr,
        "t.toml",
        &format!(
            "[instances.agent-1]\n[instances.agent-2]\n\
             [nodes.web]\ninstance = \"agent-1\"\ncommand = [\"{p}\"]\n\
             [nodes.db]\ninstance = \"agent-2\"\ncommand = [\"{p}\"]\n",
            p = prog.display()
        ),
    );
    agent.kill();
    let out = eventually("the agent's departure is noticed", PATIENCE, || {
        let out = c.drover(addr, &["logs", "web"]);
        out.stderr.contains("not connected").then_some(out)
    });
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr,
        "error: web on agent-1: instance 'agent-1' is not connected\n"
    );
    for op in ["restart", "stop", "start"] {
        let out = c.drover(addr, &[op, "web"]);
        assert_eq!(out.code, Some(1), "{op}: {}\n{}", out.stdout, out.stderr);
        assert!(
            out.stderr
                .contains("web on agent-1: instance 'agent-1' is not connected"),
            "{op}: {}\n{}",
            out.stdout,
            out.stderr
        );
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["results"]["web"], false, "{op}: zeek-client's shape: {v}");
    }
}

/// Flags from the environment alone: an agent started with only `DROVER_*` variables
/// joins, and the CLI, given none of its flags, finds the controller and its certificates
/// in `DROVER_CONTROLLER`, `DROVER_CA`, `DROVER_CERT` and `DROVER_KEY`, and its settings
/// in `~/.config/drover/client.toml` (or the file `DROVER_CLIENT_CONFIG` names).
#[test]
fn flags_come_from_the_environment_and_settings_from_the_home_file() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.env("DROVER_NAME", "agent-1")
        .env("DROVER_CONTROLLER", addr.to_string())
        .env("DROVER_STATE_DIR", c.dir.path().join("agent-from-env"))
        .env("DROVER_CA", c.pki_file("ca.crt"))
        .env("DROVER_CERT", c.pki_file("agent-1.crt"))
        .env("DROVER_KEY", c.pki_file("agent-1.key"))
        .env("DROVER_RECONNECT_MAX", "500ms");
    let agent = drover_tests::Proc::spawn("agent-1", cmd, c.log_path("agent-1"));
    agent.wait_log("connected to controller");
    assert!(c.dir.path().join("agent-from-env/agent.lock").exists());

    let home = c.dir.path().join("home");
    std::fs::create_dir_all(home.join(".config/drover")).unwrap();
    std::fs::write(
        home.join(".config/drover/client.toml"),
        "[client]\npretty_json = false\n",
    )
    .unwrap();
    let other = c.dir.path().join("other.toml");
    std::fs::write(&other, "[client]\npretty_json = true\n").unwrap();
    let cli = |env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = Command::new(bin("drover"));
        cmd.env_remove("DROVER_CLIENT_CONFIG")
            .env_remove("DROVER_CLIENT_SETTINGS")
            .env_remove("DROVER_TIMEOUT")
            .env("HOME", &home)
            .env("DROVER_CONTROLLER", addr.to_string())
            .env("DROVER_CA", c.pki_file("ca.crt"))
            .env("DROVER_CERT", c.pki_file("ops.crt"))
            .env("DROVER_KEY", c.pki_file("ops.key"))
            .arg("get-instances");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_cli(cmd, Duration::from_secs(60));
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(out.stdout.contains("\"agent-1\""), "{}", out.stdout);
        out.stdout.trim_end().lines().count()
    };
    assert_eq!(cli(&[]), 1, "compact, as the home file says");
    assert!(
        cli(&[("DROVER_CLIENT_CONFIG", other.as_os_str())]) > 1,
        "DROVER_CLIENT_CONFIG names the file instead"
    );
    assert!(
        cli(&[(
            "DROVER_CLIENT_SETTINGS",
            std::ffi::OsStr::new("client.pretty_json=true")
        )]) > 1,
        "DROVER_CLIENT_SETTINGS over the file"
    );
    // A wrong certificate in the environment is what the CLI uses: refused.
    let mut cmd = Command::new(bin("drover"));
    cmd.env("HOME", &home)
        .env("DROVER_CONTROLLER", addr.to_string())
        .env("DROVER_CA", c.pki_file("ca.crt"))
        .env("DROVER_CERT", c.pki_file("agent-1.crt"))
        .env("DROVER_KEY", c.pki_file("agent-1.key"))
        .arg("get-instances");
    let out = run_cli(cmd, Duration::from_secs(60));
    assert_ne!(out.code, Some(0), "an agent's certificate is no client's");
}
