//! Client scopes and the audit trail with a real controller, agent and CLI: a viewer is
//! refused every request that changes something and may do everything else, an operator
//! may act on nodes but not deploy, a certificate without a scope is admin; every
//! mutating request, carried out or refused, is in `<state dir>/audit.jsonl` (mode
//! 0600) with who, from where, what, generation and outcome before it is answered, is
//! published to `monitor`, and `drover audit --since/--who` reads it back; a change the
//! trail cannot record is answered with an error naming it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

use drover_proto::access::Scope;
use drover_tests::{Cluster, PATIENCE, Proc, bin, eventually};
use serde_json::Value;

/// A cluster file with testprog nodes `w1` and `w2` on agent-1.
fn cluster_file(c: &Cluster) -> PathBuf {
    let prog = bin("drover-testprog");
    let mut text = "[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n[instances.agent-1]\n".to_owned();
    for n in ["w1", "w2"] {
        text.push_str(&format!(
            "[nodes.{n}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--sleep-forever\"]\n",
            prog.display()
        ));
    }
    let path = c.dir.path().join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(c: &Cluster) -> (Proc, SocketAddr, Proc) {
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    (ctl, addr, agent)
}

/// The audit entries `drover audit ARGS` prints, as ops.
fn audit(c: &Cluster, addr: SocketAddr, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    let out = c.drover(addr, &all);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The serial of certificate `NAME.crt`, as the audit trail writes it.
fn serial(c: &Cluster, name: &str) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(c.pki_file(&format!("{name}.crt"))).unwrap();
    drover_net::tls::cert_info(&der).unwrap().serial
}

/// Every `drover` command that changes something, with the scope it needs.
fn mutating(file: &str) -> Vec<(Vec<String>, Scope)> {
    let v = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        (v(&["stage-config", file]), Scope::Admin),
        (v(&["deploy"]), Scope::Admin),
        (v(&["deploy-config", file]), Scope::Admin),
        (v(&["restart", "w1"]), Scope::Operator),
        (v(&["restart", "--batch", "1"]), Scope::Operator),
        (v(&["stop", "w1"]), Scope::Operator),
        (v(&["start", "w1"]), Scope::Operator),
        (v(&["signal", "CONT", "w2"]), Scope::Operator),
    ]
}

#[test]
fn each_scope_is_refused_exactly_what_it_lacks_and_every_refusal_is_audited() {
    let c = Cluster::new();
    c.issue_scoped("dash", Scope::Viewer);
    c.issue_scoped("oper", Scope::Operator);
    c.issue_scoped("root", Scope::Admin);
    let (ctl, addr, _agent) = start(&c);
    let file = cluster_file(&c);
    let file = file.to_str().unwrap();
    // ops has no scope in its certificate: admin, as before scopes existed.
    let out = c.drover(addr, &["deploy-config", file]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let mut refusals = 0;
    for (name, have) in [("dash", Scope::Viewer), ("oper", Scope::Operator)] {
        for (args, need) in mutating(file) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = c.drover_as(name, addr, &args);
            if have >= need {
                assert_eq!(out.code, Some(0), "{name} {args:?}: {}", out.stderr);
                continue;
            }
            refusals += 1;
            assert_eq!(out.code, Some(1), "{name} {args:?}: {}", out.stdout);
            let what = if args[0] == "deploy-config" {
                "stage-config"
            } else {
                args[0]
            };
            let want = format!(
                "error: {what} needs scope {need}; this client's certificate has scope {have}"
            );
            assert!(
                out.stderr.contains(&want),
                "{name} {args:?}: {}",
                out.stderr
            );
        }
    }
    // A viewer may look at everything.
    for args in [
        &["get-instances"][..],
        &["get-nodes"],
        &["get-nodes", "--fresh"],
        &["get-config", "--deployed"],
        &["get-config"],
        &["status"],
        &["logs", "w1"],
        &["audit"],
        &["get-id-value", "x", "w1"],
    ] {
        let out = c.drover_as("dash", addr, args);
        assert!(
            !out.stderr.contains("needs scope"),
            "viewer {args:?}: {}",
            out.stderr
        );
        if args[0] != "get-id-value" {
            assert_eq!(out.code, Some(0), "viewer {args:?}: {}", out.stderr);
        }
    }
    // An admin certificate deploys.
    let out = c.drover_as("root", addr, &["deploy-config", file]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let refused: Vec<Value> = audit(&c, addr, &[])
        .into_iter()
        .filter(|r| r["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), refusals, "{refused:#?}");
    let dash = audit(&c, addr, &["--who", "dash"]);
    assert_eq!(dash.len(), 8, "{dash:#?}");
    for r in &dash {
        assert_eq!(r["outcome"], "refused", "{r}");
        assert_eq!(r["scope"], "viewer", "{r}");
        assert_eq!(r["role"], "client", "{r}");
        assert_eq!(r["serial"], serial(&c, "dash"), "{r}");
        assert_eq!(r["front"], "native", "{r}");
        assert!(r["from"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
        assert!(
            r["message"].as_str().unwrap().contains("needs scope"),
            "{r}"
        );
    }
    let oper = audit(
        &c,
        addr,
        &["--who", &format!("serial:{}", serial(&c, "oper"))],
    );
    let kinds: Vec<(&str, &str)> = oper
        .iter()
        .map(|r| (r["what"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("stage_config", "refused"),
            ("deploy", "refused"),
            ("stage_config", "refused"),
            ("restart", "ok"),
            ("restart", "ok"),
            ("stop", "ok"),
            ("start", "ok"),
            ("signal", "ok"),
        ]
    );
    ctl.wait_log("refused: deploy needs scope admin");
    // The serial as `openssl x509 -text` prints it (upper case, colons between bytes)
    // names the same records.
    let hex = serial(&c, "oper");
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    let colons: Vec<String> = hex
        .as_bytes()
        .chunks(2)
        .map(|b| String::from_utf8_lossy(b).to_ascii_uppercase())
        .collect();
    let by_colons = audit(
        &c,
        addr,
        &["--who", &format!("serial:{}", colons.join(":"))],
    );
    assert_eq!(by_colons, oper);

    let trail = c.dir.path().join("controller").join("audit.jsonl");
    let mode = std::fs::metadata(&trail).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Node environments hold secrets: a viewer sees their names, not their values, in
/// either configuration and in every form; an operator and an admin see them.
#[test]
fn a_viewer_is_not_shown_environment_values() {
    let c = Cluster::new();
    c.issue_scoped("dash", Scope::Viewer);
    c.issue_scoped("oper", Scope::Operator);
    let (_ctl, addr, _agent) = start(&c);
    let file = c.dir.path().join("secret.toml");
    std::fs::write(
        &file,
        "[instances.agent-1]\n[roles.svc]\ncommand = [\"/bin/sleep\", \"infinity\"]\n\
         env = { ROLE_TOKEN = \"role-s3cret\" }\n\
         [nodes.w1]\ninstance = \"agent-1\"\nrole = \"svc\"\nenv = { API_TOKEN = \"node-s3cret\" }\n\
         readiness = { kind = \"start-period\", period = \"0s\" }\n",
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for args in [
        &["get-config"][..],
        &["get-config", "--deployed"],
        &["get-config", "--deployed", "--as-toml"],
        &["get-config", "--deployed", "--as-json"],
    ] {
        let viewer = c.drover_as("dash", addr, args);
        assert_eq!(viewer.code, Some(0), "{args:?}: {}", viewer.stderr);
        assert!(
            !viewer.stdout.contains("s3cret"),
            "{args:?}: {}",
            viewer.stdout
        );
        // Zeek's forms (INI, JSON) have no role templates.
        let ini = !args.contains(&"--as-toml");
        let names: &[&str] = if ini {
            &["API_TOKEN"]
        } else {
            &["API_TOKEN", "ROLE_TOKEN"]
        };
        for name in names {
            assert!(viewer.stdout.contains(name), "{args:?}: {}", viewer.stdout);
        }
        assert!(
            viewer.stdout.contains("<hidden>"),
            "{args:?}: {}",
            viewer.stdout
        );
        for who in ["oper", "ops"] {
            let out = c.drover_as(who, addr, args);
            assert_eq!(out.code, Some(0), "{who} {args:?}: {}", out.stderr);
            assert!(
                out.stdout.contains("node-s3cret") && (ini || out.stdout.contains("role-s3cret")),
                "{who} {args:?}: {}",
                out.stdout
            );
        }
    }
}

#[test]
fn every_change_is_audited_before_it_is_answered_and_published_to_monitor() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c);
    let file = cluster_file(&c);
    let file = file.to_str().unwrap();

    let mut monitor = c.drover_command(addr);
    monitor
        .arg("monitor")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut monitor = monitor.spawn().unwrap();
    let lines = BufReader::new(monitor.stdout.take().unwrap()).lines();
    // The monitor subscribes before its first event; an agent event tells it has.
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    // Until the monitor shows an event, an agent comes and goes.
    let mut extra = c.start_agent("agent-2", addr);
    let mut started = std::time::Instant::now();
    eventually("monitor subscribed", PATIENCE, || {
        if rx.try_iter().any(|v| v["event"]["type"] == "agent_joined") {
            return Some(());
        }
        if started.elapsed() > std::time::Duration::from_secs(2) {
            extra.kill();
            extra = c.start_agent("agent-2", addr);
            started = std::time::Instant::now();
        }
        None
    });

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let commands: [&[&str]; 6] = [
        &["stage-config", file],
        &["deploy"],
        &["restart", "w1"],
        &["stop", "w2"],
        &["start", "w2"],
        &["signal", "CONT", "w1"],
    ];
    for args in commands {
        let out = c.drover(addr, args);
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        // Written before the answer: the trail has it the moment the command returns.
        let trail = std::fs::read_to_string(c.dir.path().join("controller/audit.jsonl")).unwrap();
        let last: Value = serde_json::from_str(trail.lines().last().unwrap()).unwrap();
        assert_eq!(last["what"], args[0].replace('-', "_"), "{last}");
    }
    // A failure is recorded as one, naming the cause.
    let out = c.drover(addr, &["stop", "nosuch"]);
    assert_eq!(out.code, Some(1));

    let records = audit(&c, addr, &["--since", "1h"]);
    let what: Vec<&str> = records
        .iter()
        .map(|r| r["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        what,
        [
            "stage_config",
            "deploy",
            "restart",
            "stop",
            "start",
            "signal",
            "stop"
        ]
    );
    for r in &records[..6] {
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["name"], "ops", "{r}");
        assert_eq!(r["scope"], "admin", "{r}");
        assert_eq!(r["serial"], serial(&c, "ops"), "{r}");
        assert!(r["at_ms"].as_u64().unwrap() >= before, "{r}");
        assert!(r["time"].as_str().unwrap().ends_with('Z'), "{r}");
    }
    assert!(records[0]["generation"].is_null(), "{}", records[0]);
    assert_eq!(records[1]["generation"], 1, "{}", records[1]);
    assert_eq!(records[2]["generation"], 1, "{}", records[2]);
    assert_eq!(records[2]["args"], "w1");
    assert_eq!(records[2]["nodes"], serde_json::json!(["w1"]));
    assert_eq!(records[5]["args"], "CONT w1");
    assert_eq!(records[5]["nodes"], serde_json::json!(["w1"]));
    assert!(records[1]["nodes"].is_null(), "a deploy lists none");
    assert_eq!(records[6]["outcome"], "failed");
    assert!(
        records[6]["message"].as_str().unwrap().contains("nosuch"),
        "{}",
        records[6]
    );
    // --since excludes what came before, --who someone else.
    let future = (std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let later =
        humantime::format_rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(future))
            .to_string();
    assert!(audit(&c, addr, &["--since", &later]).is_empty());
    assert!(audit(&c, addr, &["--who", "someone-else"]).is_empty());
    assert_eq!(audit(&c, addr, &["--limit", "2"]).len(), 2);
    let out = c.drover(addr, &["audit", "--since", "yesterday-ish"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("neither a duration"), "{}", out.stderr);

    // Each record also went to monitor, in order.
    let mut seen = Vec::new();
    eventually("audit events on monitor", PATIENCE, || {
        seen.extend(
            rx.try_iter()
                .filter(|v| v["event"]["type"] == "audit")
                .map(|v| v["event"]["record"]["what"].as_str().unwrap().to_owned()),
        );
        (seen.len() >= 7).then_some(())
    });
    assert_eq!(seen, what);
    let _ = monitor.kill();
    let _ = monitor.wait();

    // A wildcard is recorded as given, with the nodes it picked.
    let out = c.drover(addr, &["restart", "w*"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let last = audit(&c, addr, &["--limit", "1"]);
    assert_eq!(last[0]["args"], "w*", "{}", last[0]);
    assert_eq!(
        last[0]["nodes"],
        serde_json::json!(["w1", "w2"]),
        "{}",
        last[0]
    );
}

#[test]
fn the_trail_stays_within_its_bound_on_a_running_controller() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller_with(
        "127.0.0.1:0",
        &["--audit-max-bytes", "4096", "--audit-keep", "1"],
    );
    c.audit_trail_drops_records();
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = cluster_file(&c);
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let dir = c.dir.path().join("controller");
    let size = || -> u64 {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    for i in 0..40 {
        let out = c.drover(addr, &["signal", "CONT", "w1"]);
        assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
        assert!(size() <= 2 * 4096, "after {i} signals: {} bytes", size());
    }
    assert!(dir.join("audit.jsonl.1").exists());
    assert!(!dir.join("audit.jsonl.2").exists());
    for f in ["audit.jsonl", "audit.jsonl.1"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let records = audit(&c, addr, &["--limit", "1000"]);
    assert!(
        !records.is_empty() && records.len() < 42,
        "{}",
        records.len()
    );
    assert_eq!(records.last().unwrap()["what"], "signal");

    // Out-of-range bounds stop the controller at start with the key named.
    let mut cmd = std::process::Command::new(bin("drover-controller"));
    cmd.args(["--audit-max-bytes", "10"]);
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let out = drover_tests::run_cli(cmd, std::time::Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("audit_max_bytes 10 is out of range"),
        "{}",
        out.stderr
    );
    let mut cmd = std::process::Command::new(bin("drover-controller"));
    cmd.args(["--audit-keep", "1001"]);
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let out = drover_tests::run_cli(cmd, std::time::Duration::from_secs(20));
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("audit_keep 1001 is out of range: 0 to 1000"),
        "{}",
        out.stderr
    );
}

/// A client's refused requests in a loop are recorded up to its budget and counted
/// past it, so that the least of clients cannot rotate everyone else's records out of
/// the trail (the record that says how many were not, which comes a refill later, is
/// the budget's unit tests').
#[test]
fn a_flood_of_refused_requests_is_recorded_within_the_clients_budget() {
    use drover_controller::refused::{BURST, REFILL_MS};
    let c = Cluster::new();
    c.issue_scoped("dash", Scope::Viewer);
    let metrics = drover_tests::free_tcp();
    let (_ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--metrics-listen", &metrics.to_string()]);
    const SENT: u64 = 64;
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let cmds: Vec<std::process::Command> = (0..SENT / 8)
                .map(|_| {
                    let mut cmd = c.drover_command_as("dash", addr);
                    cmd.args(["restart", "w1"]);
                    cmd
                })
                .collect();
            s.spawn(move || {
                for cmd in cmds {
                    let out = drover_tests::run_cli(cmd, PATIENCE);
                    assert_eq!(out.code, Some(1), "{}", out.stdout);
                    let text = format!("{}{}", out.stdout, out.stderr);
                    assert!(text.contains("restart needs scope operator"), "{text}");
                }
            });
        }
    });
    let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap();
    // Summaries of the unrecorded come only with a refusal recorded after a refill.
    let dash = audit(&c, addr, &["--who", "dash"]);
    let one_by_one = dash.len() as u64;
    assert!(one_by_one >= u64::from(BURST), "{one_by_one}");
    assert!(
        one_by_one <= u64::from(BURST) + elapsed / REFILL_MS + 1,
        "{one_by_one} recorded in {elapsed} ms"
    );
    let page = drover_tests::scrape(metrics);
    let unrecorded =
        drover_tests::metric_value(&page, "drover_audit_refusals_unrecorded_total").unwrap();
    assert_eq!(one_by_one + unrecorded as u64, SENT, "{page}");
    // The budget is each client's own: another viewer's refusal is recorded.
    c.issue_scoped("dash2", Scope::Viewer);
    let out = c.drover_as("dash2", addr, &["stop", "w2"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert_eq!(audit(&c, addr, &["--who", "dash2"]).len(), 1);
}

#[test]
fn a_change_the_trail_cannot_record_is_answered_with_an_error_naming_the_trail() {
    let c = Cluster::new();
    c.audit_trail_drops_records();
    // A full disk under the trail alone: the trail is a link to /dev/full. A rotated
    // file is a link to a loose file of ours, which must keep its mode.
    let state = c.dir.path().join("controller");
    std::fs::create_dir_all(&state).unwrap();
    let _restore = RestoreMode::of("/dev/full");
    std::os::unix::fs::symlink("/dev/full", state.join("audit.jsonl")).unwrap();
    let loose = c.dir.path().join("loose");
    std::fs::write(&loose, "").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&loose, state.join("audit.jsonl.1")).unwrap();
    let metrics = drover_tests::free_tcp();
    let (ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--metrics-listen", &metrics.to_string()]);
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = cluster_file(&c);
    let trail = state.join("audit.jsonl").display().to_string();
    let want = format!(
        "the request was carried out, but the audit trail {trail} could not be written: No space left on device"
    );
    for args in [&["stage-config", file.to_str().unwrap()][..], &["deploy"]] {
        let out = c.drover(addr, args);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stdout);
        assert!(out.stdout.contains(&want), "{args:?}: {}", out.stdout);
    }
    // One that failed keeps its own error, and is not said to be carried out.
    let out = c.drover(addr, &["deploy", "--expect-id", "not-staged"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let errors = out.json()["errors"].to_string();
    assert!(errors.contains("'not-staged'"), "{errors}");
    assert!(errors.contains("could not be written"), "{errors}");
    assert!(!errors.contains("was carried out"), "{errors}");
    // Both were carried out.
    eventually("the deployed nodes running", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        let nodes = v["results"]["agent-1"].as_object()?.clone();
        (["w1", "w2"]
            .iter()
            .all(|n| nodes.get(*n).is_some_and(|n| n["state"] == "RUNNING")))
        .then_some(())
    });
    ctl.wait_log("could not be written: No space left on device");
    // Counted as failures, not as records the trail holds.
    let page = drover_tests::scrape(metrics);
    assert_eq!(
        drover_tests::metric_value(&page, "drover_audit_write_failures_total"),
        Some(3.0),
        "{page}"
    );
    assert_eq!(
        drover_tests::metric_value(&page, "drover_audit_records_total{outcome=\"ok\"}"),
        Some(0.0),
        "{page}"
    );
    // The controller tightens its own files only, never what a link points to.
    let mode = std::fs::metadata(&loose).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
}

/// Puts a file's mode back when dropped, should the code under test change it.
struct RestoreMode(&'static str, u32);

impl RestoreMode {
    fn of(path: &'static str) -> Self {
        Self(path, std::fs::metadata(path).unwrap().permissions().mode())
    }
}

impl Drop for RestoreMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(self.0, std::fs::Permissions::from_mode(self.1));
    }
}

#[test]
fn a_certificate_with_an_unknown_scope_is_refused_at_hello() {
    use rcgen_like::issue_with_uri;
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    issue_with_uri(&c, "odd", "urn:drover:scope:superuser");
    let out = c.drover_as("odd", addr, &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("unknown scope 'superuser'"),
        "{}",
        out.stderr
    );
    ctl.wait_log("unknown scope 'superuser'");
}

/// Certificates the `drover ca` command would never issue.
mod rcgen_like {
    use drover_tests::Cluster;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

    /// A client certificate `NAME` from the cluster CA with an extra URI SAN.
    pub(super) fn issue_with_uri(c: &Cluster, name: &str, uri: &str) {
        let ca_cert = std::fs::read_to_string(c.pki_file("ca.crt")).unwrap();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(c.pki_file("ca.key")).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.subject_alt_names = vec![
            SanType::URI(format!("spiffe://drover/client/{name}").try_into().unwrap()),
            SanType::URI(uri.to_owned().try_into().unwrap()),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        c.write_pem(
            name,
            &drover_pki::Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            },
        );
    }
}

#[test]
fn the_suite_wide_check_notices_a_change_missing_from_the_trail() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c);
    let file = cluster_file(&c);
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    c.check_audited();
    // Without its records the same history fails the check that runs at drop.
    let trail = c.dir.path().join("controller/audit.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let without_deploys: String = text
        .lines()
        .filter(|l| !l.contains("\"what\":\"deploy\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&trail, without_deploys).unwrap();
    let missed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.check_audited()));
    let message = missed.expect_err("a missing deploy record must fail the check");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("1 successful deploy requests, but 0 carried-out deploy records"),
        "{message}"
    );
    std::fs::write(&trail, text).unwrap();
}

#[test]
fn scopes_are_for_client_certificates_only() {
    let c = Cluster::new();
    let pki = c.pki.to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("drover"));
        cmd.args(["ca", "issue", "--dir", &pki]).args(args);
        drover_tests::run_cli(cmd, std::time::Duration::from_secs(20))
    };
    let out = run(&["--role", "agent", "--name", "a1", "--scope", "viewer"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("error: --scope is for client certificates (--role client)"),
        "{}",
        out.stderr
    );
    assert!(!c.pki_file("a1.crt").exists());
    let out = run(&["--role", "client", "--name", "c1", "--scope", "root"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .contains("invalid value 'root' for '--scope <SCOPE>'")
            && out.stderr.contains("viewer, operator, admin"),
        "{}",
        out.stderr
    );
    let out = run(&["--role", "client", "--name", "c1", "--scope", "operator"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mode = std::fs::metadata(c.pki_file("c1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A trail larger than a frame is read whole: the controller answers in batches.
#[test]
fn a_trail_larger_than_a_frame_is_read_whole() {
    let c = Cluster::new();
    let bound = ["--audit-max-bytes", "64M"];
    let (mut ctl, addr) = c.start_controller_with("127.0.0.1:0", &bound);
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = cluster_file(&c);
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    ctl.signal(nix::sys::signal::Signal::SIGTERM);
    ctl.wait_exit(PATIENCE);

    // 60,000 more records of about 350 bytes: 20 MB, more than the 16 MiB frame limit.
    let trail = c.dir.path().join("controller/audit.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let mut record: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let first_ms = record["at_ms"].as_u64().unwrap();
    let mut more = String::new();
    for i in 1..=60_000u64 {
        record["at_ms"] = (first_ms + i).into();
        record["args"] = format!("{}{i}", "x".repeat(200)).into();
        more.push_str(&serde_json::to_string(&record).unwrap());
        more.push('\n');
    }
    assert!(more.len() > 16 << 20);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&trail)
        .unwrap();
    std::io::Write::write_all(&mut f, more.as_bytes()).unwrap();
    drop(f);

    let (_ctl, addr) = c.start_controller_with(&addr.to_string(), &bound);
    let records = audit(&c, addr, &["--limit", "100000"]);
    let total = text.lines().count() + 60_000;
    assert_eq!(records.len(), total);
    assert!(
        records
            .windows(2)
            .all(|w| w[0]["at_ms"].as_u64() <= w[1]["at_ms"].as_u64()),
        "out of order"
    );
    assert_eq!(
        records.last().unwrap()["args"],
        format!("{}60000", "x".repeat(200))
    );
    let newest = audit(&c, addr, &["--limit", "3"]);
    assert_eq!(newest, records[total - 3..]);
}
