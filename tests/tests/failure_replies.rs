//! A node that fails says why, to a person running `drover`: the reason of each failed
//! node (how its process ended, or why it could not start) and, for start and restart,
//! its last lines, on stderr; the JSON on stdout keeps zeek-client's shape; `status`
//! says how a crashed or failed node's process ended.

use drover_tests::{Cluster, PATIENCE, eventually};

#[test]
fn failed_nodes_are_explained_on_stderr_and_in_status() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    eventually("the agent", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        (v.as_object().is_some_and(|o| o.len() == 1)).then_some(())
    });
    let file = c.dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        "[instances.agent-1]\n\
         [defaults]\nreadiness = { kind = \"start-period\", period = \"500ms\" }\n\
         max_failed_starts = 1\n\
         [nodes.crash]\ninstance = \"agent-1\"\n\
         command = [\"sh\", \"-c\", \"echo early; echo out-line; echo err-line >&2; exit 3\"]\n\
         [nodes.missing]\ninstance = \"agent-1\"\ncommand = [\"/nonexistent/prog\"]\n\
         [nodes.fine]\ninstance = \"agent-1\"\ncommand = [\"sleep\", \"1000\"]\n\
         [nodes.nowhere]\ninstance = \"agent-1\"\ncommand = [\"sleep\", \"1000\"]\n\
         workdir = \"/proc/no-such-dir\"\n\
         [nodes.silent]\ninstance = \"agent-1\"\ncommand = [\"sleep\", \"1000\"]\n\
         readiness = { kind = \"notify\", timeout = \"1s\" }\n\
         [nodes.deaf]\ninstance = \"agent-1\"\ncommand = [\"sleep\", \"1000\"]\n\
         readiness = { kind = \"tcp\", port = 9, timeout = \"1500ms\" }\n",
    )
    .unwrap();

    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let v = out.json();
    let nodes = &v["results"]["nodes"];
    assert_eq!(nodes["crash"]["success"], false, "{v}");
    assert_eq!(nodes["crash"]["stdout"], "early\nout-line", "{v}");
    assert_eq!(nodes["fine"]["success"], true, "{v}");
    // The zeek-client shape: no room for the reason in the JSON.
    assert!(nodes["crash"].get("error").is_none(), "{v}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        lines.contains(&"error: crash on agent-1: node exited with code 3"),
        "{}",
        out.stderr
    );
    assert!(
        lines.contains(
            &"error: missing on agent-1: node 'missing': cannot execute /nonexistent/prog: no such file or directory"
        ),
        "{}",
        out.stderr
    );
    assert!(
        lines.contains(
            &"error: nowhere on agent-1: node 'nowhere': cannot create its working directory /proc/no-such-dir: no such file or directory"
        ),
        "{}",
        out.stderr
    );
    // Killed for not being ready in time: why, not the signal the agent sent.
    assert!(
        lines.contains(
            &"error: silent on agent-1: not ready within 1s: it sent no READY=1 on its NOTIFY_SOCKET; killed"
        ),
        "{}",
        out.stderr
    );
    assert!(
        lines.contains(
            &"error: deaf on agent-1: not ready within 1.5s: its readiness port accepted no connection; killed"
        ),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("fine"), "{}", out.stderr);
    let nodes = c.drover(addr, &["get-nodes"]).json();
    assert_eq!(
        nodes["results"]["agent-1"]["silent"]["last_error"],
        "not ready within 1s: it sent no READY=1 on its NOTIFY_SOCKET; killed",
        "{nodes}"
    );

    let status = eventually("the failed nodes FAILED", PATIENCE, || {
        let out = c.drover(addr, &["status"]);
        let failed = out.stdout.lines().filter(|l| l.contains("FAILED")).count();
        (failed == 5).then_some(out.stdout)
    });
    let row = |name: &str| {
        status
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{status}"))
            .to_owned()
    };
    assert!(row("crash").contains("exited with code 3"), "{status}");
    assert!(
        row("missing").contains("error: node 'missing': cannot execute"),
        "{status}"
    );
    assert!(!row("fine").contains("exited"), "{status}");
    assert!(row("silent").contains("not ready within 1s"), "{status}");

    // A restart that fails again: the reason and the failed process's last lines.
    let out = c.drover(addr, &["restart", "crash"]);
    assert_eq!(out.json()["results"]["crash"], false, "{out:?}");
    assert!(
        out.stderr.starts_with(
            "error: crash on agent-1: node exited with code 3\n  its last stdout:\n    early\n    out-line\n  its last stderr:\n    err-line\n"
        ),
        "{}",
        out.stderr
    );

    // A signal to a node without a process, and one that succeeds.
    let out = c.drover(addr, &["signal", "HUP", "crash"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        out.stderr,
        "error: crash on agent-1: node crash is not running\n"
    );
    let out = c.drover(addr, &["restart", "fine"]);
    assert_eq!(out.json()["results"]["fine"], true, "{out:?}");
    assert_eq!(out.stderr, "", "a success tells nothing on stderr");
}

/// A node with a watchdog starts through a shell that gives it its pid as
/// `WATCHDOG_PID`; what would stop its program's exec is said as for any other node,
/// not turned into the shell's exit code.
#[test]
fn exec_errors_of_nodes_with_a_watchdog_are_said_as_for_any_node() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let script = c.dir.path().join("orphan.sh");
    std::fs::write(&script, "#!/nonexistent/interp\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plain = c.dir.path().join("plain.txt");
    std::fs::write(&plain, "not a program\n").unwrap();
    let file = c.dir.path().join("cluster.toml");
    let node = |name: &str, program: &str| {
        format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{program}\"]\nwatchdog = \"1s\"\n"
        )
    };
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[defaults]\nmax_failed_starts = 1\n{}{}{}",
            node("gone", "/nonexistent/dogprog"),
            node("script", script.to_str().unwrap()),
            node("plain", plain.to_str().unwrap()),
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let want = [
        (
            "gone",
            "node 'gone': cannot execute /nonexistent/dogprog: no such file or directory"
                .to_owned(),
        ),
        (
            "script",
            format!(
                "node 'script': cannot execute {}: no such file or directory (the file is \
                 there; its interpreter /nonexistent/interp is not)",
                script.display()
            ),
        ),
        (
            "plain",
            format!(
                "node 'plain': cannot execute {}: permission denied",
                plain.display()
            ),
        ),
    ];
    for (name, why) in &want {
        let line = format!("error: {name} on agent-1: {why}");
        assert!(
            out.stderr.lines().any(|l| l == line),
            "{line}\n{}",
            out.stderr
        );
    }
    let nodes = c.drover(addr, &["get-nodes"]).json();
    for (name, why) in &want {
        assert_eq!(
            nodes["results"]["agent-1"][name]["last_error"], *why,
            "{nodes}"
        );
    }
}
