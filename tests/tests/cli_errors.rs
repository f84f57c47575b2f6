//! Bad input to the `drover` CLI: each mistake is one clear line on stderr and exit
//! status 1, never a panic, and nothing is sent that the controller would refuse.

use std::process::Command;
use std::time::Duration;

use drover_tests::{CliOutput, bin, run_cli};

fn drover(args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(bin("drover"));
    cmd.args(args)
        .env_remove("DROVER_CONTROLLER")
        .env_remove("DROVER_CLIENT_SETTINGS")
        .env_remove("DROVER_CLIENT_CONFIG")
        .env("HOME", "/nonexistent");
    run_cli(cmd, Duration::from_secs(60))
}

/// Asserts a failure whose stderr is exactly one `error: ` line containing `needle`.
fn assert_one_line_error(out: &CliOutput, needle: &str) {
    assert_eq!(
        out.code,
        Some(1),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let err = out.stderr.trim_end();
    assert!(
        err.starts_with("error: ") && !err.contains('\n'),
        "not one error line: {err}"
    );
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Days from now to the expiry of the certificate in a PEM file.
fn days_left(path: &std::path::Path) -> f64 {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(path).unwrap();
    let not_after = drover_net::tls::cert_info(&der).unwrap().not_after;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (not_after - now) as f64 / 86_400.0
}

#[test]
fn ca_certificates_last_as_documented_by_default_and_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    assert_eq!(drover(&["ca", "init", "--dir", p]).code, Some(0));
    let issue = |name: &str, extra: &[&str]| {
        let mut args = vec!["ca", "issue", "--dir", p, "--role", "agent", "--name", name];
        args.extend_from_slice(extra);
        let out = drover(&args);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    };
    issue("a1", &[]);
    issue("a2", &["--days", "7"]);
    let near = |got: f64, want: f64| (got - want).abs() < 1.5;
    let ca = days_left(&pki.join("ca.crt"));
    assert!(near(ca, 3650.0), "the CA lasts 3650 days, not {ca}");
    let a1 = days_left(&pki.join("a1.crt"));
    assert!(near(a1, 365.0), "a certificate lasts 365 days, not {a1}");
    let a2 = days_left(&pki.join("a2.crt"));
    assert!(near(a2, 7.0), "--days 7 gave {a2}");
    let out = drover(&[
        "ca",
        "renew",
        "--dir",
        p,
        "--cert",
        pki.join("a2.crt").to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let renewed = days_left(&pki.join("a2.crt"));
    assert!(
        near(renewed, 365.0),
        "a renewal lasts 365 days, not {renewed}"
    );
}

#[test]
fn ca_days_out_of_range_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki = pki.to_str().unwrap();
    for days in ["0", "-1", "36501", "100000000", "9223372036854775807"] {
        let out = drover(&["ca", "init", "--dir", pki, "--days", days]);
        assert_one_line_error(&out, &format!("--days {days} is out of range"));
        assert!(out.stderr.contains("1 to 36500 days"), "{}", out.stderr);
        assert!(
            !dir.path().join("pki/ca.key").exists(),
            "a refused init writes nothing"
        );
    }
    let out = drover(&["ca", "init", "--dir", pki, "--days", "36500"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    for days in ["0", "-7", "36501", "100000000", "-9223372036854775808"] {
        let out = drover(&[
            "ca", "issue", "--dir", pki, "--role", "client", "--name", "ops", "--days", days,
        ]);
        assert_one_line_error(&out, &format!("--days {days} is out of range"));
        assert!(!dir.path().join("pki/ops.key").exists());
    }
    let out = drover(&[
        "ca", "issue", "--dir", pki, "--role", "client", "--name", "ops", "--days", "36500",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(dir.path().join("pki/ops.crt").exists());

    // Not a number at all is clap's usage error, still without a panic.
    let out = drover(&[
        "ca", "issue", "--dir", pki, "--role", "client", "--name", "x", "--days", "lots",
    ]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("invalid value 'lots'"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// `stage-config FILE` against a port where nothing listens, with certificate paths that
/// do not exist: whatever fails first shows how far the command got.
#[test]
fn ca_renew_refuses_what_it_cannot_renew_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    assert_eq!(drover(&["ca", "init", "--dir", p]).code, Some(0));
    let out = drover(&["ca", "issue", "--dir", p, "--role", "agent", "--name", "a1"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let cert = pki.join("a1.crt");
    let c = cert.to_str().unwrap();
    let before = std::fs::read(&cert).unwrap();
    let missing = pki.join("nope.crt");
    let out = drover(&[
        "ca",
        "renew",
        "--dir",
        p,
        "--cert",
        missing.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "nope.crt");
    let ca_cert = pki.join("ca.crt");
    let out = drover(&[
        "ca",
        "renew",
        "--dir",
        p,
        "--cert",
        ca_cert.to_str().unwrap(),
        "--key",
        pki.join("ca.key").to_str().unwrap(),
    ]);
    assert_one_line_error(
        &out,
        "cannot renew: the certificate carries no drover identity",
    );
    let out = drover(&["ca", "renew", "--dir", p, "--cert", c, "--days", "0"]);
    assert_one_line_error(&out, "--days 0 is out of range");
    let out = drover(&[
        "ca",
        "renew",
        "--dir",
        p,
        "--cert",
        c,
        "--key",
        "/nonexistent/a1.key",
    ]);
    assert_one_line_error(&out, "/nonexistent/a1.key");
    let other = dir.path().join("empty");
    let out = drover(&["ca", "renew", "--dir", other.to_str().unwrap(), "--cert", c]);
    assert_one_line_error(&out, "ca.crt");
    assert_eq!(std::fs::read(&cert).unwrap(), before, "nothing changed");
    assert!(!pki.join("a1.crt.prev").exists());
    assert!(!pki.join("a1.key.new").exists());
}

fn stage(file: &std::path::Path) -> CliOutput {
    drover(&[
        "--controller",
        "127.0.0.1:9",
        "--ca",
        "/nonexistent/ca.crt",
        "--cert",
        "/nonexistent/c.crt",
        "--key",
        "/nonexistent/c.key",
        "stage-config",
        file.to_str().unwrap(),
    ])
}

/// A node name with a bidirectional override or an escape sequence is refused, and the
/// error does not carry the raw character to the terminal, in its key path either.
#[test]
fn characters_that_would_rewrite_the_terminal_are_written_out_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("odd.toml");
    std::fs::write(
        &file,
        "[instances.a]\n[nodes.\"w\u{202e}1\"]\ninstance = \"a\"\ncommand = [\"/bin/true\"]\n\
         [nodes.\"x\\u001b[2J\"]\ninstance = \"a\"\ncommand = [\"/bin/true\"]\n",
    )
    .unwrap();
    let out = stage(&file);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("nodes.w\\u{202e}1: "), "{}", out.stderr);
    assert!(out.stderr.contains("nodes.x\\x1b[2J: "), "{}", out.stderr);
    assert!(
        !out.stderr.contains('\u{202e}') && !out.stderr.contains('\u{1b}'),
        "{}",
        out.stderr
    );
}

#[test]
fn a_configuration_over_the_frame_limit_is_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let limit = drover_proto::msg::MAX_FRAME_LEN;
    // Arguments of `len` bytes in all, each short enough for an exec to take.
    let node = |len: usize| {
        let args: Vec<String> = (0..len.div_ceil(100_000))
            .map(|i| format!("\"{}\"", "a".repeat((len - i * 100_000).min(100_000))))
            .collect();
        format!(
            "[instances.a]\n[nodes.n]\ninstance = \"a\"\ncommand = [\"/bin/x\", {}]\n",
            args.join(", ")
        )
    };
    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, node(limit)).unwrap();
    let out = stage(&huge);
    assert_one_line_error(
        &out,
        "configuration is too large to send: its request is 16.0 MiB (",
    );
    assert!(
        out.stderr
            .contains("over the limit of 16.0 MiB (16777216 bytes)"),
        "{}",
        out.stderr
    );
    let size: usize = out
        .stderr
        .split(" MiB (")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(size > limit && size < limit + 2048, "{size}");

    // Many small nodes add up the same way.
    let mut many = String::from("[instances.a]\n");
    for i in 0..60_000 {
        many.push_str(&format!(
            "[nodes.n{i}]\ninstance = \"a\"\ncommand = [\"/usr/bin/sleep\", \"infinity\"]\n"
        ));
    }
    let file = dir.path().join("many.toml");
    std::fs::write(&file, many).unwrap();
    assert_one_line_error(&stage(&file), "configuration is too large to send");

    // Just under the limit passes the check: what fails is the (missing) certificate.
    let fits = dir.path().join("fits.toml");
    std::fs::write(&fits, node(limit - 2048)).unwrap();
    let out = stage(&fits);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(!out.stderr.contains("too large"), "{}", out.stderr);
    assert!(out.stderr.contains("/nonexistent/"), "{}", out.stderr);
}

#[test]
fn bad_settings_are_errors_naming_the_setting_not_panics() {
    let show = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("show-settings");
        drover(&all)
    };
    // Each of these once reached a panic or an error without the key's name.
    assert_one_line_error(
        &show(&["--set", "controller.port=abc"]),
        "controller.port: expected an integer 1-65535, found string \"abc\"",
    );
    assert_one_line_error(
        &show(&["--set", "controller.port=0"]),
        "controller.port: expected an integer 1-65535, found integer 0",
    );
    for t in ["1e300", "inf", "0", "-1", "86401"] {
        assert_one_line_error(
            &show(&["--set", &format!("client.request_timeout_secs={t}")]),
            "client.request_timeout_secs must be a positive number of seconds up to 86400",
        );
    }
    assert_one_line_error(
        &show(&["--timeout", "1000000000days"]),
        "error: --timeout 2737850years 9months 13days 12h 57m 36s is out of range: allowed more \
         than 0s, up to 1day",
    );
    assert_one_line_error(&show(&["--timeout", "0s"]), "--timeout 0s is out of range");
    let mut cmd = Command::new(bin("drover"));
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"/tmp/\xff.crt");
        cmd.args(["--ca".as_ref(), bad, "show-settings".as_ref()])
            .env_remove("DROVER_CLIENT_SETTINGS")
            .env("HOME", "/nonexistent");
        assert_one_line_error(
            &run_cli(cmd, Duration::from_secs(30)),
            "cannot print the settings: path contains invalid UTF-8",
        );
        let mut cmd = Command::new(bin("drover"));
        cmd.arg("show-settings")
            .env(
                "DROVER_CLIENT_SETTINGS",
                std::ffi::OsStr::from_bytes(b"client.x=\xff"),
            )
            .env("HOME", "/nonexistent");
        assert_one_line_error(
            &run_cli(cmd, Duration::from_secs(30)),
            "DROVER_CLIENT_SETTINGS is not valid UTF-8",
        );
    }
    // A day is allowed.
    let out = show(&["--set", "client.request_timeout_secs=86400"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let out = drover(&["restart", "--batch", "0", "w1"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("must be at least 1"), "{}", out.stderr);

    // A mistyped serial would find nobody and look like an empty trail.
    let out = drover(&["audit", "--who", "serial:zz"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("'zz' is not a hex serial"),
        "{}",
        out.stderr
    );
    // A node name no node can have is told by the CLI, not sent.
    let out = drover(&["logs", ""]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("invalid value '' for '<NODE>': name is empty"),
        "{}",
        out.stderr
    );
    // So would anything that is no certificate's name, ROLE/NAME or serial.
    for who in ["bogus:x", "nobody/ops", "client/", "a b", ":", "::"] {
        let out = drover(&["audit", "--who", who]);
        assert_eq!(out.code, Some(2), "{who}: {}", out.stderr);
        assert!(
            out.stderr
                .contains(&format!("'{who}' names no certificate")),
            "{who}: {}",
            out.stderr
        );
    }
}

#[test]
fn agent_limits_out_of_range_stop_it_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    for (flag, value, needle) in [
        (
            "--log-max-bytes",
            "0",
            "log_max_bytes 0 is out of range: allowed 4096",
        ),
        (
            "--log-max-bytes",
            "4095",
            "log_max_bytes 4095 is out of range",
        ),
        (
            "--log-max-bytes",
            "10Q",
            "'10Q' is not a size: bytes, or a number with K, M, G or T",
        ),
        (
            "--log-max-bytes",
            "2T",
            "log_max_bytes 2199023255552 is out of range",
        ),
        (
            "--log-keep",
            "1001",
            "log_keep 1001 is out of range: allowed 0 to 1000",
        ),
        (
            "--report-interval",
            "0s",
            "report_interval 0s is out of range: allowed 10ms to 10min",
        ),
        (
            "--report-interval",
            "11min",
            "report_interval 11m is out of range: allowed 10ms to 10min",
        ),
        (
            "--removed-node-retention",
            "500ms",
            "removed_node_retention 500ms is too short: allowed 1s or more",
        ),
    ] {
        let mut cmd = Command::new(bin("drover-agent"));
        cmd.args([
            "--name",
            "a",
            "--ca",
            "x",
            "--cert",
            "x",
            "--key",
            "x",
            "--state-dir",
            state,
            "--listen",
            "127.0.0.1:0",
            flag,
            value,
        ]);
        let out = run_cli(cmd, Duration::from_secs(30));
        assert_ne!(out.code, Some(0), "{}", out.stderr);
        assert!(out.stderr.contains(needle), "{}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    // A settings file takes a size with a suffix too: 3K is read, and is too small.
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "log_max_bytes = \"3K\"\n").unwrap();
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.args(["--name", "a", "--ca", "x", "--cert", "x", "--key", "x"])
        .args(["--state-dir", state, "--listen", "127.0.0.1:0", "--config"])
        .arg(&file);
    let out = run_cli(cmd, Duration::from_secs(30));
    assert!(
        out.stderr.contains("log_max_bytes 3072 is out of range"),
        "{}",
        out.stderr
    );
}

/// Errors that name their cause and also carry it as their source: the cause is said
/// once, by the CLI and by a daemon that cannot start alike.
#[test]
fn a_cause_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = drover(&[
        "ca",
        "issue",
        "--dir",
        missing.to_str().unwrap(),
        "--role",
        "agent",
        "--name",
        "x",
    ]);
    assert_one_line_error(&out, &missing.display().to_string());
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        out.stderr
    );
    // No CA there: what makes one is said.
    assert!(
        out.stderr.contains(&format!(
            "`drover ca init --dir {}` makes one",
            missing.display()
        )),
        "{}",
        out.stderr
    );

    let c = drover_tests::Cluster::new();
    // Held until the end, so that the controller finds its port taken.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let state = dir.path().join("state");
    for (listen, state_dir, cause) in [
        (taken.to_string(), state.clone(), "Address already in use"),
        (
            "127.0.0.1:0".to_owned(),
            std::path::PathBuf::from("/proc/no/such/dir"),
            "No such file or directory",
        ),
    ] {
        let mut cmd = Command::new(bin("drover-controller"));
        c.controller_args_in(&mut cmd, &listen, &state_dir);
        let out = run_cli(cmd, Duration::from_secs(30));
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        let error = out
            .stderr
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_else(|| panic!("no error logged: {}", out.stderr));
        assert_eq!(error.matches(cause).count(), 1, "{error}");
    }
}

/// A daemon's settings file with several mistakes: each is named at its line with its
/// key, all in one go, and the daemon does not start.
#[test]
fn a_daemons_settings_file_names_every_bad_key_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for (daemon, text, want) in [
        (
            "drover-agent",
            "name = \"a\"\nlog_keep = \"five\"\ncolour = 1\nidle_timeout = \"soon\"\n\
             report_interval = \"1h\"\nlog_max_bytes = \"1K\"\nkeep_alive = \"0s\"\n\
             controller = \"::1\"\n",
            vec![
                "agent.toml:2: log_keep: invalid type: string \"five\", expected u32",
                "agent.toml:3: colour: unknown field `colour`",
                "agent.toml:4: idle_timeout: 'soon' is not a duration",
                "agent.toml:5: report_interval: report_interval 1h is out of range",
                "agent.toml:6: log_max_bytes: log_max_bytes 1024 is out of range",
                "agent.toml:7: keep_alive: keep-alive (0s) must be at least 100ms",
                "agent.toml:8: controller: '::1' is not HOST:PORT",
            ],
        ),
        (
            "drover-controller",
            "audit_keep = -1\n\nzeek_websocket = \"nowhere\"\nzeek_deploy = \"sometimes\"\n\
             audit_max_bytes = 10\nauto_assign_broker_start_port = 0\nstore = \"disk\"\n",
            vec![
                "controller.toml:1: audit_keep: invalid value: integer `-1`",
                "controller.toml:3: zeek_websocket: invalid socket address syntax",
                "controller.toml:4: zeek_deploy: ",
                "controller.toml:5: audit_max_bytes: 10 is out of range: 4096 to 1099511627776",
                "controller.toml:6: auto_assign_broker_start_port: an auto-assignment start port \
                 must not be 0",
                "controller.toml:7: store: 'disk' is not a store (file or etcd)",
            ],
        ),
    ] {
        let file = dir
            .path()
            .join(format!("{}.toml", daemon.trim_start_matches("drover-")));
        std::fs::write(&file, text).unwrap();
        let mut cmd = Command::new(bin(daemon));
        cmd.arg("--config").arg(&file);
        let out = run_cli(cmd, Duration::from_secs(30));
        assert_ne!(out.code, Some(0), "{daemon}: {}", out.stderr);
        for line in want {
            assert!(
                out.stderr.contains(line),
                "{daemon}: {line}\n{}",
                out.stderr
            );
        }
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

/// Durations a daemon cannot live with: a keep-alive of nothing (it would do nothing
/// else) and one so long that clock arithmetic would overflow, on the command line and
/// in a settings file. Each is refused at start naming the setting; no panic.
#[test]
fn daemons_refuse_a_zero_keep_alive_and_durations_beyond_ten_years() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "name = \"a\"\nremoved_node_retention = \"20000days\"\n",
    )
    .unwrap();
    for (daemon, args, want) in [
        (
            "drover-agent",
            vec![
                "--name",
                "a",
                "--controller",
                "127.0.0.1:9",
                "--keep-alive",
                "0s",
            ],
            "keep-alive (0s) must be at least 100ms",
        ),
        (
            "drover-agent",
            vec!["--keep-alive", "5000000000000000000s"],
            "'5000000000000000000s' is longer than the longest duration a setting takes (3650 days)",
        ),
        (
            "drover-controller",
            vec!["--request-timeout", "10000000000000000000s"],
            "is longer than the longest duration a setting takes",
        ),
        (
            "drover-agent",
            vec!["--config", file.to_str().unwrap()],
            "agent.toml:2: removed_node_retention: '20000days' is longer than the longest",
        ),
    ] {
        let mut cmd = Command::new(bin(daemon));
        cmd.args(&args)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--ca", "ca.crt", "--cert", "x.crt", "--key", "x.key"]);
        let out = run_cli(cmd, Duration::from_secs(30));
        assert_ne!(out.code, Some(0), "{daemon} {args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(want),
            "{daemon} {args:?}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

/// `status` prints a table: a script that asks it for JSON is told so, not handed a
/// table.
#[test]
fn status_asked_for_json_says_it_prints_a_table() {
    for args in [
        &["-o", "json", "status"][..],
        &["status", "--output", "json"][..],
    ] {
        let out = drover(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr,
            "error: status prints a table; `drover get-nodes` prints zeek-client's JSON\n"
        );
        assert_eq!(out.stdout, "");
    }
}

/// An empty cluster file, as a generator that failed leaves on a pipe, would stop and
/// remove every node: refused unless asked for, and nothing is staged meanwhile.
#[test]
fn an_empty_cluster_file_is_refused_unless_allowed() {
    let c = drover_tests::Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let file = c.dir.path().join("c.toml");
    std::fs::write(&file, "[instances.a1]\n").unwrap();
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(0),
        "instances alone say what they mean: {}",
        out.stderr
    );
    let staged = c.drover(addr, &["get-config", "--as-toml"]).stdout;
    for args in [&["deploy-config", "-"][..], &["stage-config", "-"][..]] {
        let out = c
            .drover_command_as("ops", addr)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err,
            "error: standard input has no instances and no nodes: deployed, it would stop \
             and remove every node of the cluster; give --allow-empty if that is what you \
             want\n"
        );
    }
    let empty = c.dir.path().join("empty.toml");
    std::fs::write(&empty, "# generated\n").unwrap();
    let out = c.drover(addr, &["deploy-config", empty.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("empty.toml has no instances and no nodes"),
        "{}",
        out.stderr
    );
    assert_eq!(c.drover(addr, &["get-config", "--as-toml"]).stdout, staged);
    let out = c.drover(
        addr,
        &["stage-config", "--allow-empty", empty.to_str().unwrap()],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_ne!(c.drover(addr, &["get-config", "--as-toml"]).stdout, staged);
}

/// Files read whole are read up to a bound: a device or a runaway file named by mistake
/// is an error naming it, not a process growing until the machine runs out of memory.
#[test]
fn a_cluster_or_settings_file_without_end_is_refused_not_read_forever() {
    let dir = tempfile::tempdir().unwrap();
    let c = drover_tests::Cluster::new();
    let nowhere: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let out = c.drover(nowhere, &["stage-config", "/dev/zero"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr,
        "error: cluster file /dev/zero is larger than 64.0 MiB (67108864 bytes): no \
         configuration that large can be sent\n"
    );
    let mut cmd = c.drover_command_as("ops", nowhere);
    let out = cmd
        .args(["stage-config", "-"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: standard input is larger than 64.0 MiB"),
        "{err}"
    );
    for daemon in ["drover-agent", "drover-controller"] {
        let mut cmd = Command::new(bin(daemon));
        cmd.args(["--config", "/dev/zero", "--state-dir"])
            .arg(dir.path().join("state"));
        let out = run_cli(cmd, Duration::from_secs(60));
        assert_ne!(out.code, Some(0), "{daemon}: {}", out.stderr);
        assert!(
            out.stderr
                .contains("config file /dev/zero is larger than 1048576 bytes"),
            "{daemon}: {}",
            out.stderr
        );
    }
}

/// Credential files that cannot serve: a missing one is named with the cause as the
/// other messages say causes (lower case, no "os error"), and a certificate that is no
/// drover identity (the CA's own) is said to be ours, not the controller's.
#[test]
fn unusable_credential_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = drover(&["ca", "init", "--dir", pki.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let (ca, key) = (pki.join("ca.crt"), pki.join("ca.key"));
    let (ca, key) = (ca.to_str().unwrap(), key.to_str().unwrap());
    let missing = dir.path().join("missing.crt");
    let out = drover(&[
        "--controller",
        "127.0.0.1:9",
        "--ca",
        missing.to_str().unwrap(),
        "--cert",
        ca,
        "--key",
        key,
        "get-instances",
    ]);
    assert_one_line_error(
        &out,
        &format!(
            "cannot read CA {}: no such file or directory",
            missing.display()
        ),
    );
    assert!(!out.stderr.contains("os error"), "{}", out.stderr);
    let out = drover(&[
        "--controller",
        "127.0.0.1:9",
        "--ca",
        ca,
        "--cert",
        ca,
        "--key",
        key,
        "get-instances",
    ]);
    assert_one_line_error(
        &out,
        "the certificate is not a drover certificate of a role and name: ",
    );
    assert!(!out.stderr.contains("peer"), "{}", out.stderr);
}
