//! The real, unmodified zeek-client 1.5.0 (from PyPI) drives a drover cluster through
//! the controller's Zeek WebSocket front (`--zeek-websocket`): every command, Zeek's
//! system-test scenarios that make sense without Zeek binaries, bad WebSocket clients
//! that must not disturb anyone, `wss://` with client certificates
//! (`--zeek-websocket-tls`), and what each node of a Zeek cluster is given in place of
//! Zeek's Supervisor (`CLUSTER_NODE`, `cluster-layout.zeek`).
//!
//! zeek-client is installed into a virtualenv at `<workspace>/target/zeek-venv` (or
//! `$DROVER_ZEEK_VENV`) on first use and reused after; `$DROVER_ZEEK_CLIENT` points at
//! another zeek-client instead. Error answers are compared with Zeek's own texts,
//! written down from Zeek's sources in `tests/zeek/zeek-error-texts.txt`; other outputs
//! with the transcripts in `tests/zeek/*.txt`, with pids, ids and ports replaced by
//! placeholders, as Zeek's own system tests (zeek-testing-cluster) canonicalise theirs;
//! each transcript's leading `#` lines name the upstream scenarios it follows and are
//! not compared. Regenerate them with `DROVER_UPDATE_GOLDEN=1` (the `#` lines are kept).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_tests::{
    CliOutput, Cluster, MuteAgent, PATIENCE, Proc, addr_in_log, bin, canon_pids_and_ids,
    eventually, run_cli,
};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// The zeek-client executable, installed into a shared virtualenv if needed.
fn zeek_client() -> PathBuf {
    if let Some(exe) = std::env::var_os("DROVER_ZEEK_CLIENT") {
        return PathBuf::from(exe);
    }
    let venv = std::env::var_os("DROVER_ZEEK_VENV").map_or_else(
        || workspace().join("target").join("zeek-venv"),
        PathBuf::from,
    );
    let exe = venv.join("bin").join("zeek-client");
    let works = |exe: &Path| {
        Command::new(exe).arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "1.5.0"
        })
    };
    if works(&exe) {
        return exe;
    }
    // Tests run in parallel processes: one installs, the others wait on the lock.
    std::fs::create_dir_all(venv.parent().expect("venv has a parent")).expect("mkdir");
    let lock = std::fs::File::create(venv.with_extension("lock")).expect("lock file");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the venv");
    if works(&exe) {
        return exe;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
    run(Command::new(venv.join("bin").join("pip"))
        .args(["install", "--disable-pip-version-check", "--quiet"])
        .arg("zeek-client==1.5.0"));
    assert!(
        works(&exe),
        "zeek-client 1.5.0 did not install into {}",
        venv.display()
    );
    exe
}

/// The role templates every test uses: testprog in place of zeek. Proxies crash at
/// start unless `proxies_run`.
fn roles_file(c: &Cluster, proxies_run: bool) -> PathBuf {
    let p = bin("drover-testprog").display().to_string();
    let crash = if proxies_run {
        ""
    } else {
        ", \"--crash-at-start\""
    };
    let text = format!(
        r#"[defaults]
readiness = {{ kind = "start-period", period = "300ms" }}
backoff = {{ initial = "10ms" }}
max_failed_starts = 2

[roles.manager]
command = ["{p}", "--value", "bits_per_uid=96", "--value", "role=\"{{role}}\""]

[roles.logger]
command = ["{p}", "--value", "bits_per_uid=96"]

[roles.worker]
command = ["{p}", "--value", "bits_per_uid=96", "--value", "iface=\"{{interface}}\""]

[roles.proxy]
command = ["{p}", "--print", "proxy {{name}} starting", "--value", "bits_per_uid=96"{crash}]
"#
    );
    let path = c.dir.path().join("zeek-roles.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A controller with the Zeek front on an ephemeral port (or `ws` when given).
struct Zeek {
    /// The test cluster's list of successful changes, which its drop checks against the
    /// audit trail.
    audited: drover_tests::Audited,
    ctl: Proc,
    addr: SocketAddr,
    ws: SocketAddr,
    exe: PathBuf,
    config: PathBuf,
    /// Extra `--set SECTION.KEY=VALUE` settings for every run (TLS).
    settings: Vec<String>,
}

impl Zeek {
    fn start(c: &Cluster, listen: &str, ws: &str, extra: &[&str]) -> Self {
        Self::start_roles(c, listen, ws, extra, false)
    }

    /// A controller on ephemeral ports whose proxies run.
    fn start_running(c: &Cluster, extra: &[&str]) -> Self {
        Self::start_roles(c, "127.0.0.1:0", "127.0.0.1:0", extra, true)
    }

    fn start_roles(c: &Cluster, listen: &str, ws: &str, extra: &[&str], proxies_run: bool) -> Self {
        let exe = zeek_client();
        let roles = roles_file(c, proxies_run);
        let mut args = vec![
            "--zeek-websocket",
            ws,
            "--zeek-roles",
            roles.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ctl, addr) = c.start_controller_with(listen, &args);
        let log = ctl.wait_log("serving zeek-client");
        let ws = addr_in_log(&log, "serving zeek-client");
        Self {
            audited: c.audited(),
            ctl,
            addr,
            ws,
            exe,
            config: c.dir.path().join("no-zeek-client.cfg"),
            settings: Vec::new(),
        }
    }

    /// Runs zeek-client with a request timeout.
    fn run_with(&self, timeout_secs: u32, args: &[&str]) -> CliOutput {
        self.run_set(timeout_secs, &self.settings, args)
    }

    /// Runs zeek-client with a request timeout and these `--set` settings.
    fn run_set(&self, timeout_secs: u32, settings: &[String], args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(&self.exe);
        cmd.env("ZEEK_CLIENT_CONFIG_FILE", &self.config)
            .env_remove("ZEEK_CLIENT_CONFIG_SETTINGS")
            .arg("--controller")
            .arg(self.ws.to_string())
            .arg("--set")
            .arg(format!("client.request_timeout_secs={timeout_secs}"));
        for s in settings {
            cmd.arg("--set").arg(s);
        }
        cmd.args(args);
        let out = run_cli(cmd, Duration::from_secs(60));
        if out.code == Some(0) {
            self.audited.expect(match args.first().copied() {
                Some("deploy-config") => &["stage_config", "deploy"],
                Some("stage-config") => &["stage_config"],
                Some("deploy") => &["deploy"],
                Some("restart") => &["restart"],
                _ => &[],
            });
        }
        out
    }

    fn run(&self, args: &[&str]) -> CliOutput {
        self.run_with(20, args)
    }

    fn json(&self, args: &[&str]) -> Value {
        self.run(args).json()
    }
}

/// A transcript of zeek-client runs, compared at the end with `tests/zeek/NAME.txt`.
struct Transcript {
    name: &'static str,
    text: String,
    replace: Vec<(String, String)>,
}

impl Transcript {
    fn new(name: &'static str, z: &Zeek, c: &Cluster) -> Self {
        Self {
            name,
            text: String::new(),
            replace: vec![
                (c.dir.path().display().to_string(), "<dir>".into()),
                (z.ws.to_string(), "<controller>".into()),
            ],
        }
    }

    /// Also writes `to` for `from` in what is recorded (ports chosen at run time).
    fn replace(&mut self, from: impl ToString, to: &str) {
        self.replace.push((from.to_string(), to.to_owned()));
    }

    /// Runs a command, records it, and returns its output.
    fn run(&mut self, z: &Zeek, args: &[&str]) -> CliOutput {
        let out = z.run(args);
        self.record(args, &out);
        out
    }

    fn record(&mut self, args: &[&str], out: &CliOutput) {
        let mut s = format!(
            "$ zeek-client {}\nexit {}\n",
            args.iter()
                .map(|a| a.rsplit('/').next().unwrap_or(a))
                .collect::<Vec<_>>()
                .join(" "),
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
        s.push('\n');
        for (from, to) in &self.replace {
            s = s.replace(from, to);
        }
        self.text.push_str(&canon_pids_and_ids(&s));
    }

    fn check(self) {
        let path = workspace()
            .join("tests")
            .join("zeek")
            .join(format!("{}.txt", self.name));
        // Leading `#` lines say where a transcript comes from; they are kept on update
        // and not compared.
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let header_len: usize = old
            .split_inclusive('\n')
            .take_while(|l| l.starts_with('#'))
            .map(str::len)
            .sum();
        let (header, want) = old.split_at(header_len);
        if std::env::var_os("DROVER_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, format!("{header}{}", self.text)).unwrap();
            return;
        }
        assert!(
            !want.is_empty(),
            "{}: missing (DROVER_UPDATE_GOLDEN=1 writes it); got:\n{}",
            path.display(),
            self.text
        );
        if want != self.text {
            panic!(
                "zeek-client output differs from {} (DROVER_UPDATE_GOLDEN=1 rewrites it)\n--- want\n{want}\n--- got\n{}",
                path.display(),
                self.text
            );
        }
    }
}

/// Writes a test INI file from `tests/zeek/`.
fn ini(c: &Cluster, name: &str) -> String {
    let text = std::fs::read_to_string(workspace().join("tests").join("zeek").join(name))
        .unwrap_or_else(|e| panic!("tests/zeek/{name}: {e}"));
    let path = c.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// node -> (state, pid) from zeek-client get-nodes, cluster nodes only.
fn node_pids(z: &Zeek) -> BTreeMap<String, (String, Option<u64>)> {
    let v = z.json(&["get-nodes"]);
    let mut out = BTreeMap::new();
    for nodes in v["results"].as_object().expect("results").values() {
        for (name, n) in nodes.as_object().expect("nodes") {
            if n["mgmt_role"].is_null() {
                out.insert(
                    name.clone(),
                    (
                        n["state"].as_str().unwrap_or("?").to_owned(),
                        n["pid"].as_u64(),
                    ),
                );
            }
        }
    }
    out
}

fn all_running(z: &Zeek, count: usize) -> Option<BTreeMap<String, u64>> {
    let n = node_pids(z);
    (n.len() == count && n.values().all(|(s, p)| s == "RUNNING" && p.is_some())).then(|| {
        n.into_iter()
            .map(|(k, (_, p))| (k, p.unwrap_or(0)))
            .collect()
    })
}

fn wait_instances(z: &Zeek, n: usize) {
    eventually(&format!("{n} instances"), PATIENCE, || {
        let v = z.json(&["get-instances"]);
        (v.as_object().map(serde_json::Map::len) == Some(n)).then_some(())
    });
}

#[test]
fn zeek_client_stages_deploys_and_queries_a_cluster() {
    let c = Cluster::new();
    let z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let mut t = Transcript::new("cluster", &z, &c);
    t.replace(
        format!("\"port\": {}", z.addr.port()),
        "\"port\": <controller-port>",
    );
    t.run(&z, &["get-instances"]);
    let _a1 = c.start_agent("agent-1", z.addr);
    let _a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    t.run(&z, &["get-instances"]);
    t.run(&z, &["get-config"]);
    t.run(&z, &["get-config", "--deployed"]);
    let cfg = ini(&c, "cluster.ini");
    let out = t.run(&z, &["stage-config", &cfg]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let staged_id = out.json()["results"]["id"].as_str().unwrap().to_owned();
    t.run(&z, &["get-config"]);
    t.run(&z, &["get-config", "--as-json"]);
    t.run(&z, &["get-config", "--deployed"]);
    let out = t.run(&z, &["deploy"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.json()["results"]["id"], staged_id.as_str());
    let before = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    t.run(&z, &["get-nodes"]);
    t.run(&z, &["get-config", "--deployed"]);
    t.run(&z, &["get-config", "--deployed", "--as-json"]);
    t.run(&z, &["get-id-value", "bits_per_uid"]);
    t.run(&z, &["get-id-value", "iface", "worker-1", "worker-2"]);
    t.run(&z, &["get-id-value", "bits_per_uid", "worker-1", "nope"]);
    t.run(&z, &["get-id-value", "no_such_id", "manager"]);

    // Restart one node: only its pid changes.
    t.run(&z, &["restart", "worker-1"]);
    let after = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    for (name, pid) in &before {
        assert_eq!(
            after[name] != *pid,
            name == "worker-1",
            "{name}: {pid} -> {}",
            after[name]
        );
    }
    t.run(&z, &["restart", "logger", "nope"]);
    t.run(&z, &["restart"]);
    let restarted = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    assert!(
        restarted.iter().all(|(n, p)| after[n] != *p),
        "all restarted"
    );

    // As in Zeek, deploy-config (a new configuration id) restarts every node and lists
    // each; deploying the configuration that runs already restarts nothing.
    let out = t.run(&z, &["deploy-config", &ini(&c, "cluster-changed.ini")]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(
        out.json()["results"]["nodes"]
            .as_object()
            .map(serde_json::Map::len),
        Some(4),
        "{}",
        out.stdout
    );
    let changed = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    for (name, pid) in &restarted {
        assert_ne!(changed[name], *pid, "{name} restarted");
    }
    let out = t.run(&z, &["deploy"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.json()["results"].get("nodes"), None, "{}", out.stdout);
    assert_eq!(
        eventually("4 nodes running", PATIENCE, || all_running(&z, 4)),
        changed,
        "a second deploy of one configuration restarts nothing"
    );
    // get-config output deploys again as it is.
    let exported = c.dir.path().join("exported.ini");
    let out = z.run(&["get-config", "--deployed", "-f", exported.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = t.run(&z, &["deploy-config", exported.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    t.check();
}

/// One case of `tests/zeek/zeek-error-texts.txt`: a command and what Zeek answers.
#[derive(Debug, Default)]
struct ZeekCase {
    args: Vec<String>,
    exit: Option<i32>,
    errors: Vec<Value>,
    stderr: Vec<String>,
    results_id: bool,
}

/// Reads Zeek's error texts (the format is described atop the file).
fn zeek_error_texts() -> Vec<ZeekCase> {
    let path = workspace().join("tests/zeek/zeek-error-texts.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut cases: Vec<ZeekCase> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || panic!("{}:{}: cannot read {line:?}", path.display(), n + 1);
        if line.is_empty() || line.starts_with('#') || line.starts_with("from ") {
            continue;
        }
        if let Some(args) = line.strip_prefix("$ zeek-client ") {
            cases.push(ZeekCase {
                args: args.split(' ').map(str::to_owned).collect(),
                ..ZeekCase::default()
            });
            continue;
        }
        let Some(case) = cases.last_mut() else { bad() };
        if let Some(code) = line.strip_prefix("exit ") {
            case.exit = Some(code.parse().unwrap_or_else(|_| bad()));
        } else if let Some(rest) = line.strip_prefix("error@") {
            let Some((source, error)) = rest.split_once(' ') else {
                bad()
            };
            let source = if source == "null" {
                Value::Null
            } else {
                Value::from(source)
            };
            case.errors
                .push(serde_json::json!({"error": error, "source": source}));
        } else if let Some(error) = line.strip_prefix("error ") {
            case.errors.push(Value::from(error));
        } else if let Some(err) = line.strip_prefix("stderr ") {
            case.stderr.push(err.to_owned());
        } else if line == "results-id" {
            case.results_id = true;
        } else {
            bad();
        }
    }
    cases
}

/// Runs zeek-client with `args` (file names resolved by `ini`) and checks its output
/// against Zeek's texts in `case`.
fn check_zeek_case(z: &Zeek, c: &Cluster, case: &ZeekCase) {
    let args: Vec<String> = case
        .args
        .iter()
        .map(|a| {
            if Path::new(a).extension().is_some_and(|e| e == "ini") {
                ini(c, a)
            } else {
                a.clone()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = z.run(&args);
    let what = format!("zeek-client {}", case.args.join(" "));
    assert_eq!(out.code, case.exit, "{what}: {}{}", out.stdout, out.stderr);
    if !case.stderr.is_empty() {
        let got: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(got, case.stderr, "{what}: stderr");
        assert_eq!(out.stdout, "", "{what}: stdout");
        return;
    }
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {}", out.stdout));
    assert_eq!(v["errors"], Value::from(case.errors.clone()), "{what}");
    if case.results_id {
        let results = v["results"].as_object().expect("results");
        assert_eq!(results.len(), 1, "{what}: {v}");
        assert!(
            results["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{what}: {v}"
        );
    } else {
        assert_eq!(v["results"], serde_json::json!({}), "{what}");
    }
}

#[test]
fn zeek_client_errors_match_zeeks() {
    let c = Cluster::new();
    let z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let cases = zeek_error_texts();
    let mut next = cases.iter();
    let mut check = |args: &str| {
        let case = next
            .next()
            .unwrap_or_else(|| panic!("no Zeek text for zeek-client {args}"));
        assert_eq!(
            case.args.join(" "),
            args,
            "the cases run in the file's order"
        );
        check_zeek_case(&z, &c, case);
    };
    // Nothing connected, nothing staged or deployed.
    check("get-nodes");
    check("restart");
    check("get-id-value bits_per_uid");
    check("deploy");
    // Validation: every error at once, sorted; nothing is stored.
    check("stage-config invalid-instances.ini");
    check("stage-config invalid-names.ini");
    check("stage-config invalid-ports.ini");
    check("stage-config invalid-agent-port.ini");
    check("deploy-config invalid-ports.ini");
    check("get-config");
    // An agent but no deployment.
    let _a = c.start_agent("agent-1", z.addr);
    wait_instances(&z, 1);
    check("restart worker-1");
    // An empty configuration deploys (and runs nothing).
    check("deploy-config empty.ini");
    assert!(next.next().is_none(), "a case of the file was not run");

    // drover's own checks (Zeek has no CPU affinity) answer in Zeek's shape.
    let out = z.run(&["stage-config", &ini(&c, "invalid-cpu.ini")]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        serde_json::json!({"errors": ["cpu 4096 is out of range (0..1024)"], "results": {}})
    );
    // A CPU Zeek's record can hold but no machine has: refused in an answer, not left
    // for zeek-client to time out on.
    let file = c.dir.path().join("negative-cpu.ini");
    std::fs::write(
        &file,
        "[instances]\nagent-1\n\n[w1]\ninstance = agent-1\nrole = worker\ncpu_affinity = -1\n",
    )
    .unwrap();
    let out = z.run_with(5, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.json(),
        serde_json::json!({"errors": ["node 'w1': its cpu_affinity -1 is not a CPU"], "results": {}})
    );
    // The empty configuration deployed above manages no cluster.
    let out = z.run(&["get-id-value", "bits_per_uid"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(
        out.json(),
        serde_json::json!({"errors": [{"error": "no cluster deployed", "source": null}], "results": {}})
    );
}

/// What Zeek's controller answers when an agent is away or goes under a request, and
/// that node names are literal: zeek-client never sees drover's own texts or selectors.
#[test]
fn zeek_client_away_agents_and_literal_node_names() {
    let mut c = Cluster::new();
    // A frozen agent is dropped well within the request timeout.
    c.idle_timeout = Duration::from_secs(2);
    c.keep_alive = Duration::from_millis(500);
    let z = Zeek::start_roles(
        &c,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--request-timeout", "8s"],
        true,
    );
    let mut a1 = c.start_agent("agent-1", z.addr);
    let mut a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    let out = z.run(&["deploy-config", &ini(&c, "cluster.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    let pids = all_running(&z, 4).unwrap();

    // A pattern or a selector is a name no node has.
    let out = z.run(&["restart", "w*"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.json(),
        serde_json::json!({"errors": [{"error": "unknown cluster node", "source": "w*"}], "results": {}})
    );
    let out = z.run(&["restart", "role:worker", "logger"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.json(),
        serde_json::json!({
            "errors": [{"error": "unknown cluster node", "source": "role:worker"}],
            "results": {"logger": true}
        })
    );
    eventually("logger restarted", PATIENCE, || {
        let now = all_running(&z, 4)?;
        (now["logger"] != pids["logger"] && now["worker-1"] == pids["worker-1"]).then_some(())
    });

    // agent-2 freezes under a restart: its connection is lost, and zeek-client hears
    // Zeek's controller-side timeout, not a result it cannot read.
    a2.signal(nix::sys::signal::Signal::SIGSTOP);
    let out = z.run(&["restart", "logger", "worker-2"]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.json(),
        serde_json::json!({
            "errors": [{"error": "request timed out", "source": null}],
            "results": {"logger": true}
        })
    );
    // Away, it is left out of get-nodes, as Zeek's controller asks only the agents it has.
    wait_instances(&z, 1);
    let out = z.run(&["get-nodes"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let instances: Vec<&String> = v["results"].as_object().unwrap().keys().collect();
    assert_eq!(instances, ["agent-1"], "{v}");
    // With no agent at all, Zeek's text.
    a2.kill();
    a1.kill();
    wait_instances(&z, 0);
    let out = z.run(&["get-nodes"]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.json(),
        serde_json::json!({"errors": [{"error": "no instances connected", "source": null}], "results": {}})
    );
}

#[test]
fn zeek_client_sees_the_output_of_nodes_that_fail_to_start() {
    let c = Cluster::new();
    let z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let _a = c.start_agent("agent-1", z.addr);
    wait_instances(&z, 1);
    let mut t = Transcript::new("deploy-error", &z, &c);
    let out = t.run(&z, &["deploy-config", &ini(&c, "deploy-error.ini")]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let v = out.json();
    assert_eq!(v["results"]["nodes"]["proxy-1"]["success"], false);
    assert!(
        v["results"]["nodes"]["proxy-1"]["stderr"]
            .as_str()
            .unwrap()
            .contains("crashing at start"),
        "{v}"
    );
    assert_eq!(v["results"]["nodes"]["manager"]["success"], true);
    eventually("proxy FAILED", PATIENCE, || {
        let n = node_pids(&z);
        (n.get("proxy-1").map(|(s, _)| s.as_str()) == Some("FAILED")).then_some(())
    });
    t.check();
}

#[test]
fn zeek_client_request_timeouts() {
    let c = Cluster::new();
    let z = Zeek::start(
        &c,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--request-timeout", "1s"],
    );
    let mut t = Transcript::new("timeouts", &z, &c);
    t.replace(
        format!("\"port\": {}", z.addr.port()),
        "\"port\": <controller-port>",
    );
    // Zeek's request-timeout-controller-state: the controller answers with a timeout.
    let out = z.run_with(5, &["test-timeout", "--with-state"]);
    t.record(&["test-timeout", "--with-state"], &out);
    assert_eq!(out.code, Some(0));
    // request-timeout-controller: no answer at all, the client gives up.
    let out = z.run_with(2, &["test-timeout"]);
    t.record(&["test-timeout"], &out);
    assert_eq!(out.code, Some(1));
    // An agent that never answers: a per-instance timeout, the other agent's nodes.
    let _a = c.start_agent("agent-1", z.addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mute = MuteAgent::connect(&c, z.addr, &rt);
    wait_instances(&z, 2);
    t.run(&z, &["get-nodes"]);
    t.check();
}

#[test]
fn zeek_client_deployment_survives_a_controller_restart() {
    let c = Cluster::new();
    let mut z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let _a1 = c.start_agent("agent-1", z.addr);
    let _a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    let out = z.run(&["deploy-config", &ini(&c, "cluster.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    let staged = z.run(&["get-config"]).stdout;
    let deployed = z.json(&["get-config", "--deployed", "--as-json"]);

    z.ctl.kill();
    let (addr, ws) = (z.addr.to_string(), z.ws.to_string());
    z = Zeek::start(&c, &addr, &ws, &[]);
    wait_instances(&z, 2);
    let after = eventually("4 nodes running again", PATIENCE, || all_running(&z, 4));
    assert_eq!(after, before, "no node restarted");
    assert_eq!(z.run(&["get-config"]).stdout, staged);
    assert_eq!(z.json(&["get-config", "--deployed", "--as-json"]), deployed);
}

type WsClient = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn ws_connect(ws: SocketAddr, path: &str) -> WsClient {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = tokio::net::TcpStream::connect(ws).await.unwrap();
    let req = format!("ws://{ws}{path}").into_client_request().unwrap();
    tokio_tungstenite::client_async(req, stream)
        .await
        .unwrap()
        .0
}

/// The next text message, or a description of what came instead.
async fn ws_text(c: &mut WsClient) -> String {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), c.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => return format!("{other:?}"),
        }
    }
}

#[test]
fn bad_websocket_clients_do_not_disturb_the_controller() {
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;

    let c = Cluster::new();
    let z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let _a = c.start_agent("agent-1", z.addr);
    wait_instances(&z, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ws = z.ws;
    let connect = |path: &'static str| ws_connect(ws, path);

    // Garbage instead of HTTP, and a client that never subscribes, stay connected
    // while others are served.
    let (mut garbage, mut silent) = rt.block_on(async {
        let mut g = tokio::net::TcpStream::connect(ws).await.unwrap();
        g.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
            .await
            .unwrap();
        (g, connect("/v1/messages/json").await)
    });
    assert_eq!(z.run(&["get-instances"]).code, Some(0));

    rt.block_on(async {
        let mut c = connect("/v1/messages/json").await;
        c.send(Message::text(r#"["zeek/management/controller"]"#)).await.unwrap();
        assert!(ws_text(&mut c).await.contains(r#""type":"ack""#));
        for bad in [
            "{{{{",
            r#"{"type":"data-message","topic":"zeek/management/controller","@data-type":"vector","data":[{"@data-type":"count","data":1}]}"#,
            r#"{"type":"data-message","topic":"zeek/management/controller","@data-type":"vector","data":[{"@data-type":"count","data":1},{"@data-type":"count","data":1},{"@data-type":"vector","data":[{"@data-type":"string","data":"Management::Controller::API::deploy_request"},{"@data-type":"vector","data":[{"@data-type":"count","data":7}]}]}]}"#,
            r#"{"type":"data-message","topic":"zeek/management/controller","@data-type":"vector","data":[{"@data-type":"count","data":1},{"@data-type":"count","data":1},{"@data-type":"vector","data":[{"@data-type":"string","data":"Evil::event"},{"@data-type":"vector","data":[]}]}]}"#,
        ] {
            c.send(Message::text(bad)).await.unwrap();
            let reply = ws_text(&mut c).await;
            assert!(
                reply.starts_with(r#"{"type":"error","code":"deserialization_failed""#),
                "{bad} -> {reply}"
            );
        }
        // A message over the size limit ends this connection only.
        let mut big = connect("/v1/messages/json").await;
        big.send(Message::text(r#"["zeek/management/controller"]"#)).await.unwrap();
        assert!(ws_text(&mut big).await.contains("ack"));
        let _ = big.send(Message::text("x".repeat(17 << 20))).await;
        let end = ws_text(&mut big).await;
        assert!(!end.contains("data-message"), "{end}");
        // The first bad client still works.
        c.send(Message::text(r#"{"type":"data-message","topic":"zeek/management/controller","@data-type":"vector","data":[{"@data-type":"count","data":1},{"@data-type":"count","data":1},{"@data-type":"vector","data":[{"@data-type":"string","data":"Management::Controller::API::get_instances_request"},{"@data-type":"vector","data":[{"@data-type":"string","data":"raw-1"}]}]}]}"#)).await.unwrap();
        let reply = ws_text(&mut c).await;
        assert!(reply.contains("get_instances_response") && reply.contains("agent-1"), "{reply}");
    });

    // The real client still gets its answers, and so does the native API.
    let v = z.json(&["get-instances"]);
    assert_eq!(v["agent-1"]["host"], "127.0.0.1");
    assert_eq!(c.drover(z.addr, &["get-instances"]).code, Some(0));

    // The silent client is dropped after the handshake timeout (10 s).
    rt.block_on(async {
        let end = ws_text(&mut silent).await;
        assert!(end.contains("no subscription"), "{end}");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::io::AsyncReadExt::read(&mut garbage, &mut buf),
        )
        .await
        .expect("garbage connection closed")
        .unwrap_or(0);
        assert!(n == 0 || buf.starts_with(b"HTTP/1.1 4"), "{:?}", &buf[..n]);
    });
    assert!(z.ctl.log_text().contains("serving zeek-client"));
}

#[test]
fn bad_roles_files_stop_the_controller_and_open_listeners_are_warned_about() {
    let c = Cluster::new();
    let bad = c.dir.path().join("bad-roles.toml");
    std::fs::write(&bad, "[roles.worker]\ncommand = []\n").unwrap();
    let mut cmd = Command::new(bin("drover-controller"));
    cmd.arg("--zeek-websocket")
        .arg("127.0.0.1:0")
        .arg("--zeek-roles")
        .arg(&bad);
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let mut p = Proc::spawn("controller", cmd, c.dir.path().join("bad.log"));
    assert!(!p.wait_exit(PATIENCE).success());
    let log = p.log_text();
    assert!(
        log.contains(&format!(
            "zeek roles file {}: 1 problem(s):\n{}:2: roles.worker.command: a role template needs a non-empty command",
            bad.display(),
            bad.display()
        )),
        "{log}"
    );
    // Given without the websocket it serves, it is still read, and refused when bad.
    let mut cmd = Command::new(bin("drover-controller"));
    cmd.arg("--zeek-roles").arg(&bad);
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let mut p = Proc::spawn("controller", cmd, c.dir.path().join("bad-unused.log"));
    assert!(!p.wait_exit(PATIENCE).success());
    assert!(
        p.log_text().contains("roles.worker.command"),
        "{}",
        p.log_text()
    );
    // A good one without the websocket: the controller runs, and says it is unused,
    // as it says of --zeek-websocket-tls.
    let good = c.dir.path().join("good-roles.toml");
    std::fs::write(&good, "[roles.worker]\ncommand = [\"zeek\"]\n").unwrap();
    let (ctl, _) = c.start_controller_with(
        "127.0.0.1:0",
        &[
            "--zeek-roles",
            good.to_str().unwrap(),
            "--zeek-websocket-tls",
        ],
    );
    ctl.wait_log("is not used: it serves zeek-client");
    ctl.wait_log("--zeek-websocket-tls is not used");
    drop(ctl);

    // Bad zeek settings stop it too, naming the setting.
    for (flags, want) in [
        (
            vec!["--zeek-deploy", "all"],
            "unknown zeek deploy mode 'all': expected restart-all or changed",
        ),
        (
            vec!["--auto-assign-broker-start-port", "0"],
            "an auto-assignment start port must not be 0",
        ),
        (
            vec!["--auto-assign-metrics-ports", "maybe"],
            "invalid value 'maybe' for '--auto-assign-metrics-ports",
        ),
        (
            vec!["--zeek-scope", "root"],
            "unknown scope 'root': expected viewer, operator or admin",
        ),
    ] {
        let mut cmd = Command::new(bin("drover-controller"));
        cmd.args(&flags);
        c.controller_args(&mut cmd, "127.0.0.1:0");
        let mut p = Proc::spawn("controller", cmd, c.dir.path().join("bad-flag.log"));
        assert!(!p.wait_exit(PATIENCE).success(), "{flags:?}");
        let log = p.log_text();
        assert!(log.contains(want), "{flags:?}: {log}");
    }

    let z = Zeek::start(&c, "127.0.0.1:0", "0.0.0.0:0", &[]);
    z.ctl.wait_log(
        "plain WebSocket without TLS or authentication; anyone who can reach it can deploy and restart nodes (scope admin)",
    );
    drop(z);
    let z = Zeek::start(&c, "127.0.0.1:0", "0.0.0.0:0", &["--zeek-scope", "viewer"]);
    z.ctl
        .wait_log("anyone who can reach it can look at the cluster (scope viewer)");
}

#[test]
fn zeek_client_deploys_to_an_agent_the_controller_dials() {
    // Zeek's deploy-c2a: `[instances] name = host:port`.
    let c = Cluster::new();
    let z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let port = drover_tests::free_udp_port();
    let agent = c.start_listening_agent("agent-l", ([127, 0, 0, 1], port).into());
    agent.wait_log("listening for the controller");
    assert_eq!(z.json(&["get-instances"]), serde_json::json!({}));
    let file = c.dir.path().join("c2a.ini");
    std::fs::write(
        &file,
        format!("[instances]\nagent-l = 127.0.0.1:{port}\n\n[worker-1]\ninstance = agent-l\nrole = worker\n"),
    )
    .unwrap();
    let out = z.run(&["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    let instance = eventually("controller dialled the agent", PATIENCE, || {
        z.json(&["get-instances"]).get("agent-l").cloned()
    });
    assert_eq!(
        instance,
        serde_json::json!({"host": "127.0.0.1", "port": port})
    );
    let out = z.run(&["deploy"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.json()["results"]["nodes"]["worker-1"]["success"], true);
    let ini = z.run(&["get-config", "--deployed"]).stdout;
    assert!(
        ini.starts_with(&format!("[instances]\nagent-l = 127.0.0.1:{port}\n")),
        "{ini}"
    );
    let v = z.json(&["get-config", "--deployed", "--as-json"]);
    assert_eq!(
        v["instances"],
        serde_json::json!([{"host": "127.0.0.1", "name": "agent-l", "port": port}])
    );
}

/// zeek-client's settings for `wss://` with a client certificate `NAME.crt` from the
/// cluster CA.
fn tls_settings(c: &Cluster, name: &str) -> Vec<String> {
    let file = |f: String| c.pki_file(&f).display().to_string();
    vec![
        "ssl.enable=true".to_owned(),
        format!("ssl.certificate={}", file(format!("{name}.crt"))),
        format!("ssl.keyfile={}", file(format!("{name}.key"))),
        format!("ssl.cafile={}", file("ca.crt".to_owned())),
    ]
}

#[test]
fn zeek_client_over_wss_needs_a_client_certificate_from_the_cluster_ca() {
    use drover_proto::msg::PeerRole;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let c = Cluster::new();
    c.issue(PeerRole::Client, "revoked");
    let deny = c.dir.path().join("deny-list");
    std::fs::write(&deny, "client/revoked\n").unwrap();
    let mut z = Zeek::start(
        &c,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--zeek-websocket-tls",
            "--deny-list",
            deny.to_str().unwrap(),
        ],
    );
    z.ctl
        .wait_log(&format!("serving zeek-client on wss://{}", z.ws));
    let _a = c.start_agent("agent-1", z.addr);

    // The real client with the operator's certificate: every command works over wss.
    z.settings = tls_settings(&c, "ops");
    wait_instances(&z, 1);
    assert_eq!(z.json(&["get-instances"])["agent-1"]["host"], "127.0.0.1");
    let out = z.run(&["deploy-config", &ini(&c, "deploy-error.ini")]);
    assert_eq!(
        out.json()["results"]["nodes"]["manager"]["success"],
        true,
        "{}",
        out.stdout
    );
    let nodes = z.json(&["get-nodes"]);
    assert_eq!(
        nodes["results"]["agent-1"]["manager"]["cluster_role"], "MANAGER",
        "{nodes}"
    );

    // Refused: no TLS at all, TLS without a certificate (Zeek's anonymous mode), a
    // certificate that is not a client's, and a revoked one.
    for (settings, why) in [
        (Vec::new(), "plain ws://"),
        (vec!["ssl.enable=true".to_owned()], "anonymous tls"),
        (tls_settings(&c, "agent-1"), "an agent's certificate"),
        (tls_settings(&c, "revoked"), "a revoked certificate"),
    ] {
        let out = z.run_set(20, &settings, &["get-instances"]);
        assert_eq!(out.code, Some(1), "{why}: {}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.is_empty(), "{why}: {}", out.stdout);
    }
    let log = z.ctl.log_text();
    assert!(
        log.contains("zeek websocket: refused connection: tls handshake failed"),
        "{log}"
    );
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(
        log.contains("agent 'agent-1' is not a client: zeek-client needs a client certificate"),
        "{log}"
    );
    assert!(
        log.contains("(serial") && log.contains("is revoked"),
        "{log}"
    );

    // A plain WebSocket client gets no upgrade on the TLS port.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ws = z.ws;
    let upgrade = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(ws).await.unwrap();
        let req = format!("ws://{ws}/v1/messages/json")
            .into_client_request()
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(15),
            tokio_tungstenite::client_async(req, stream),
        )
        .await
        .expect("refused in time")
    });
    assert!(upgrade.is_err(), "plain ws upgraded on the tls port");

    // And the real client still works afterwards.
    assert_eq!(z.run(&["get-instances"]).code, Some(0));
}

#[test]
fn zeek_nodes_see_cluster_node_and_the_cluster_layout() {
    let c = Cluster::new();
    let z = Zeek::start(&c, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let _a1 = c.start_agent("agent-1", z.addr);
    let _a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    let out = z.run(&["deploy-config", &ini(&c, "cluster.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("4 nodes running", PATIENCE, || all_running(&z, 4));

    // Every node is told its name, as Zeek's Supervisor does.
    let v = z.json(&["get-id-value", "env.CLUSTER_NODE"]);
    assert_eq!(
        v,
        serde_json::json!({"errors": [], "results": {
            "logger": "logger", "manager": "manager",
            "worker-1": "worker-1", "worker-2": "worker-2",
        }})
    );
    // And finds the whole cluster in cluster-layout.zeek in its working directory,
    // with every node's role, address (where its agent connected from) and port, the
    // manager, and the metrics port (given, or assigned as Zeek's controller does).
    let want = "# The layout of this Zeek cluster, written by drover into the working directory of\n\
                # each of its nodes before every start, as Zeek's Supervisor would give it. Do not edit.\n\
                redef Cluster::manager_is_logger = F;\n\
                \n\
                redef Cluster::nodes = {\n\
                \t[\"logger\"] = [$node_type=Cluster::LOGGER, $ip=127.0.0.1, $p=5001/tcp, $manager=\"manager\", $metrics_port=9001/tcp],\n\
                \t[\"manager\"] = [$node_type=Cluster::MANAGER, $ip=127.0.0.1, $p=5000/tcp, $metrics_port=9000/tcp],\n\
                \t[\"worker-1\"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, $manager=\"manager\", $metrics_port=9002/tcp],\n\
                \t[\"worker-2\"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, $manager=\"manager\", $metrics_port=9100/tcp],\n\
                };\n";
    let v = z.json(&["get-id-value", "file.cluster-layout.zeek"]);
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let results = v["results"].as_object().expect("results");
    assert_eq!(results.len(), 4, "{v}");
    for (node, text) in results {
        assert_eq!(text.as_str(), Some(want), "{node}");
    }

    // A node leaving the cluster changes the layout of the others, and they restart
    // with the new one; the node that left is stopped.
    let before = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    let smaller = c.dir.path().join("smaller.ini");
    let text = std::fs::read_to_string(workspace().join("tests/zeek/cluster.ini")).unwrap();
    let cut = text.find("[worker-2]").expect("worker-2 in cluster.ini");
    std::fs::write(&smaller, &text[..cut]).unwrap();
    let out = z.run(&["deploy-config", smaller.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let after = eventually("3 nodes running", PATIENCE, || all_running(&z, 3));
    for (name, pid) in &after {
        assert_ne!(before[name], *pid, "{name} restarted with the new layout");
    }
    let v = z.json(&["get-id-value", "file.cluster-layout.zeek", "manager"]);
    let text = v["results"]["manager"].as_str().expect("a layout");
    assert!(
        text.contains("[\"worker-1\"]") && !text.contains("worker-2"),
        "{text}"
    );
}

/// Zeek's stage-config-auto-assign, stage-config-auto-assign-multi-instance,
/// stage-config-conflict-node-controller-port and get-nodes: the controller runs, as
/// Zeek's test controller does, without metrics port assignment.
#[test]
fn zeek_broker_ports_are_assigned_as_zeeks_controller_assigns_them() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &["--auto-assign-metrics-ports=false"]);
    let mut t = Transcript::new("ports", &z, &c);
    let ctl_port = z.addr.port();
    t.replace(
        format!("\"port\": {ctl_port}"),
        "\"port\": <controller-port>",
    );
    t.replace(format!("{ctl_port}/tcp"), "<controller-port>/tcp");
    let _a1 = c.start_agent("instance-1", z.addr);
    let _a2 = c.start_agent("instance-2", z.addr);
    wait_instances(&z, 2);

    // Staged as given, deployed with ports.
    let out = t.run(&z, &["deploy-config", &ini(&c, "auto-assign.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    t.run(&z, &["get-config", "--as-json"]);
    let v = t.run(&z, &["get-config", "--as-json", "--deployed"]).json();
    let port = |v: &Value, name: &str| {
        v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == name))
            .map(|n| n["port"].clone())
    };
    assert_eq!(port(&v, "manager"), Some(2200.into()));
    assert_eq!(port(&v, "logger-01"), Some(2201.into()));
    assert_eq!(port(&v, "proxy-01"), Some(1234.into()));
    assert_eq!(port(&v, "worker-01"), Some(Value::Null));

    // Numbered across instances; the nodes run with them.
    let out = t.run(&z, &["deploy-config", &ini(&c, "auto-assign-multi.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("8 nodes running", PATIENCE, || all_running(&z, 8));
    let v = t.run(&z, &["get-nodes"]).json();
    let expect = [
        ("instance-1", "manager", 2200),
        ("instance-1", "logger-01", 2201),
        ("instance-1", "proxy-01", 2202),
        ("instance-1", "proxy-02", 2203),
        ("instance-2", "logger-02", 2204),
        ("instance-2", "proxy-03", 2205),
        ("instance-2", "proxy-04", 2206),
    ];
    for (inst, node, p) in expect {
        assert_eq!(v["results"][inst][node]["port"], p, "{node}: {v}");
    }
    assert_eq!(v["results"]["instance-2"]["worker-01"].get("port"), None);
    // The controller is listed under the instance on its host, as in Zeek.
    assert_eq!(
        v["results"]["instance-1"]["controller"]["mgmt_role"], "CONTROLLER",
        "{v}"
    );

    // A node may not take the controller's port.
    let file = c.dir.path().join("controller-port.ini");
    std::fs::write(
        &file,
        format!(
            "[instances]\ninstance-1\n\n[manager]\ninstance = instance-1\nport = {ctl_port}\n\
             role = manager\n\n[worker]\ninstance = instance-1\nrole = worker\ninterface = eth0\n"
        ),
    )
    .unwrap();
    let out = t.run(&z, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    t.check();
}

/// Zeek's stage-config-auto-assign-disabled and stage-config-auto-assign-new-range,
/// with drover's flags for Zeek's auto_assign_* options.
#[test]
fn zeek_port_assignment_can_be_turned_off_or_moved() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &["--auto-assign-broker-ports=false"]);
    let mut t = Transcript::new("ports-settings", &z, &c);
    let out = t.run(&z, &["stage-config", &ini(&c, "auto-assign-disabled.ini")]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    t.run(&z, &["get-config"]);
    // With every port given, the same cluster stages.
    let out = t.run(&z, &["stage-config", &ini(&c, "cluster.ini")]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    drop(z);

    let c2 = Cluster::new();
    let z = Zeek::start_running(
        &c2,
        &[
            "--auto-assign-broker-start-port",
            "3000",
            "--auto-assign-metrics-start-port",
            "3001",
        ],
    );
    t.replace(c2.dir.path().display(), "<dir>");
    t.replace(z.ws, "<controller>");
    let _a = c2.start_agent("instance-1", z.addr);
    wait_instances(&z, 1);
    let out = t.run(&z, &["deploy-config", &ini(&c2, "auto-assign.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v = t.run(&z, &["get-config", "--as-json", "--deployed"]).json();
    let ports: Vec<(String, Value, Value)> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("?").to_owned(),
                n["port"].clone(),
                n["metrics_port"].clone(),
            )
        })
        .collect();
    // Broker ports first, from 3000; metrics ports skip them.
    assert_eq!(
        ports,
        vec![
            ("logger-01".to_owned(), 3001.into(), 3003.into()),
            ("manager".to_owned(), 3000.into(), 3002.into()),
            ("proxy-01".to_owned(), 1234.into(), 3004.into()),
            ("worker-01".to_owned(), Value::Null, 3005.into()),
        ]
    );
    t.check();
}

/// Zeek's prometheus-defaults, prometheus-singlehost-multi-instance and
/// prometheus-multihost, and get-instances-c2a: metrics ports are numbered per host
/// address, and a deploy-config right after the controller learned of an agent it
/// must dial waits for it.
#[test]
fn zeek_metrics_ports_are_numbered_per_host_and_dialled_agents_are_waited_for() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &[]);
    let mut t = Transcript::new("metrics", &z, &c);
    let _a1 = c.start_agent("instance-1", z.addr);
    let _a2 = c.start_agent("instance-2", z.addr);
    wait_instances(&z, 2);
    // A third agent on another address, which the controller dials.
    let port = drover_tests::free_udp_port();
    t.replace(format!("127.0.0.2:{port}"), "127.0.0.2:<agent-port>");
    t.replace(format!("\"port\": {port}"), "\"port\": <agent-port>");
    let agent = c.start_listening_agent("instance-3", ([127, 0, 0, 2], port).into());
    agent.wait_log("listening for the controller");
    // Not staged yet: the controller has not dialled it.
    t.run(&z, &["get-instances"]);
    let file = c.dir.path().join("metrics.ini");
    std::fs::write(
        &file,
        format!(
            "[instances]\ninstance-1\ninstance-2\ninstance-3 = 127.0.0.2:{port}\n\n\
             [manager]\ninstance = instance-1\nrole = manager\n\n\
             [logger]\ninstance = instance-1\nrole = logger\n\n\
             [worker-01]\ninstance = instance-1\nrole = worker\ninterface = eth0\n\n\
             [worker-02]\ninstance = instance-2\nrole = worker\ninterface = eth0\n\n\
             [worker-03]\ninstance = instance-3\nrole = worker\ninterface = eth0\n"
        ),
    )
    .unwrap();
    let out = t.run(&z, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    t.run(&z, &["get-instances"]);
    let v = t.run(&z, &["get-config", "--as-json", "--deployed"]).json();
    let metrics: BTreeMap<String, Value> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("?").to_owned(),
                n["metrics_port"].clone(),
            )
        })
        .collect();
    let want: BTreeMap<String, Value> = [
        ("manager", 9000),
        ("logger", 9001),
        ("worker-01", 9002),
        ("worker-02", 9003),
        ("worker-03", 9000),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_owned(), p.into()))
    .collect();
    assert_eq!(metrics, want, "{v}");
    // The agent the controller dials lists its port, as Zeek's does; the others none.
    let v = z.run(&["get-nodes"]).json();
    assert_eq!(
        v["results"]["instance-3"]["instance-3"]["port"], port,
        "{v}"
    );
    assert!(
        v["results"]["instance-2"]["instance-2"]
            .get("port")
            .is_none(),
        "{v}"
    );
    t.check();
}

/// The worked example of docs/zeek.md: Zeek's documented kind of cluster without a
/// single port, and the `cluster-layout.zeek` every node gets, with the ports Zeek's
/// controller would assign.
#[test]
fn zeek_docs_example_gets_the_ports_zeeks_controller_assigns() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &[]);
    let _a1 = c.start_agent("agent-1", z.addr);
    let _a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    let out = z.run(&["deploy-config", &ini(&c, "docs-example.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("8 nodes running", PATIENCE, || all_running(&z, 8));
    let want = std::fs::read_to_string(workspace().join("tests/zeek/docs-example-layout.zeek"))
        .expect("tests/zeek/docs-example-layout.zeek");
    let v = z.json(&["get-id-value", "file.cluster-layout.zeek"]);
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let results = v["results"].as_object().expect("results");
    assert_eq!(results.len(), 8, "{v}");
    for (node, text) in results {
        assert_eq!(text.as_str(), Some(want.as_str()), "{node}");
    }
    // Every manager, logger and proxy has a distinct port.
    let ports: BTreeSet<&str> = want
        .lines()
        .filter_map(|l| l.split("$p=").nth(1))
        .filter_map(|p| p.split(',').next())
        .collect();
    assert_eq!(ports.len(), 4, "{want}");
}

/// `--zeek-deploy changed`: a zeek-client deploy restarts only nodes whose spec
/// changed, as drover's own CLI does.
#[test]
fn zeek_deploy_mode_changed_restarts_only_what_changed() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &["--zeek-deploy", "changed"]);
    let _a1 = c.start_agent("agent-1", z.addr);
    let _a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    let out = z.run(&["deploy-config", &ini(&c, "cluster.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    let out = z.run(&["deploy-config", &ini(&c, "cluster-changed.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let nodes = out.json()["results"]["nodes"].clone();
    assert_eq!(
        nodes
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["worker-2".to_owned()]),
        "{nodes}"
    );
    let after = eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    for (name, pid) in &before {
        assert_eq!(after[name] != *pid, name == "worker-2", "{name}");
    }
}

/// An agent that does not answer a deploy or a restart: as on Zeek's controller, one
/// `request timed out` of the controller's (not a result without a node), and a
/// deploy that timed out does not become the deployed configuration.
#[test]
fn zeek_client_deploy_and_restart_time_out_as_in_zeek() {
    let mut c = Cluster::new();
    // The frozen agent stays connected for the whole test.
    c.idle_timeout = Duration::from_secs(60);
    c.keep_alive = Duration::from_secs(5);
    let z = Zeek::start_roles(
        &c,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--request-timeout", "4s"],
        true,
    );
    let mut t = Transcript::new("timeouts-agent", &z, &c);
    let _a1 = c.start_agent("agent-1", z.addr);
    let a2 = c.start_agent("agent-2", z.addr);
    wait_instances(&z, 2);
    let out = z.run(&["deploy-config", &ini(&c, "cluster.ini")]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    let deployed = z.json(&["get-config", "--deployed", "--as-json"]);

    a2.signal(nix::sys::signal::Signal::SIGSTOP);
    let out = t.run(&z, &["restart", "logger", "worker-2"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let out = t.run(&z, &["deploy-config", &ini(&c, "cluster-changed.ini")]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert_eq!(out.json()["results"].get("id"), None, "{}", out.stdout);
    assert_eq!(
        z.json(&["get-config", "--deployed", "--as-json"]),
        deployed,
        "a deploy that timed out is not the deployed configuration"
    );
    a2.signal(nix::sys::signal::Signal::SIGCONT);
    t.check();
}

/// zeek-client's monitor prints what the controller publishes to clients, as with
/// Zeek's controller: every response, other clients' included, and nothing it cannot
/// read (a notification event it does not know would be skipped, so none is sent).
#[test]
fn zeek_client_monitor_sees_every_clients_responses() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &[]);
    let _a = c.start_agent("agent-1", z.addr);
    wait_instances(&z, 1);
    let mut cmd = Command::new(&z.exe);
    cmd.env("ZEEK_CLIENT_CONFIG_FILE", &z.config)
        .env_remove("ZEEK_CLIENT_CONFIG_SETTINGS")
        // Print each line as it comes, not when a buffer fills.
        .env("PYTHONUNBUFFERED", "1")
        .arg("--controller")
        .arg(z.ws.to_string())
        .arg("-vv")
        .arg("monitor");
    let monitor = Proc::spawn("monitor", cmd, c.dir.path().join("monitor.log"));
    monitor.wait_log("info: peered with controller");
    let file = c.dir.path().join("one.ini");
    std::fs::write(
        &file,
        "[instances]\nagent-1\n\n[manager]\ninstance = agent-1\nrole = manager\n",
    )
    .unwrap();
    let out = z.run(&["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    // zeek-client prints each event's name and argument types.
    let log = monitor.wait_log("received \"Management::Controller::API::deploy_response(");
    assert!(
        log.contains("received \"Management::Controller::API::stage_configuration_response("),
        "{log}"
    );
    assert_eq!(z.run(&["get-nodes"]).code, Some(0));
    let log = monitor.wait_log("Management::Controller::API::get_nodes_response(");
    assert!(!log.contains("unexpected event"), "{log}");
    assert!(!log.contains("error"), "{log}");
}

/// Zeek's deploy-minimal: a configuration that names no instance runs on the agent
/// `agent-<hostname>` of the client's host, and its manager and logger get Broker ports
/// (the controller runs, as Zeek's test controller does, without metrics ports).
#[test]
fn zeek_minimal_configuration_gets_ports() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &["--auto-assign-metrics-ports=false"]);
    // What zeek-client's socket.gethostname() returns.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("the host name")
        .trim()
        .to_owned();
    let agent = format!("agent-{host}");
    let mut t = Transcript::new("minimal", &z, &c);
    t.replace(&agent, "agent-<hostname>");
    let _a = c.start_agent(&agent, z.addr);
    wait_instances(&z, 1);
    let file = c.dir.path().join("minimal.ini");
    std::fs::write(
        &file,
        "[manager]\nrole = manager\n\n[logger]\nrole = logger\n\n\
         [worker-01]\nrole = worker\ninterface = lo\n\n[worker-02]\nrole = worker\ninterface = eth0\n",
    )
    .unwrap();
    let out = t.run(&z, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("4 nodes running", PATIENCE, || all_running(&z, 4));
    let v = t.run(&z, &["get-config", "--as-json", "--deployed"]).json();
    assert_eq!(v["instances"][0]["name"], agent.as_str(), "{v}");
    t.check();
}

/// Zeek's controller sends a deploy to no agent until every instance of the configuration
/// has checked in (agents that connect in as well as those it dials), and answers a
/// controller-side timeout when one never does (zeek-testing-cluster: deploy-error's
/// timeout case; the "no race here" comment of the c2a tests).
#[test]
fn zeek_deploy_waits_for_every_instance_and_times_out_without_one() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &["--request-timeout", "3s"]);
    let _a1 = c.start_agent("agent-1", z.addr);
    wait_instances(&z, 1);
    let file = c.dir.path().join("late.ini");
    std::fs::write(
        &file,
        "[instances]\nagent-1\nagent-2\n\n\
         [manager]\ninstance = agent-1\nrole = manager\n\n\
         [worker-01]\ninstance = agent-2\nrole = worker\ninterface = eth0\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    // agent-2 never comes: a controller-side timeout, and nothing runs anywhere.
    let out = z.run(&["deploy-config", file]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["errors"], serde_json::json!(["request timed out"]), "{v}");
    assert!(node_pids(&z).is_empty(), "no partial deployment");
    // The failed deploy is in the audit trail, as the caller the ws:// front knows.
    let out = c.drover(z.addr, &["audit", "--who", "zeek-client"]);
    let last: Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["what"], &last["outcome"]),
        (&"deploy".into(), &"failed".into())
    );
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("request timed out"),
        "{last}"
    );
    // agent-2 comes while the deploy waits: the deploy goes through.
    std::thread::scope(|s| {
        let deploying = s.spawn(|| z.run(&["deploy-config", file]));
        eventually("the deploy is waiting", PATIENCE, || {
            (z.ctl.log_text().matches("request=\"deploy\"").count() >= 2).then_some(())
        });
        // One deploy at a time, also while the first waits for its agents: Zeek's
        // controller answers a second at once.
        let out = z.run(&["deploy"]);
        assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
        let errors = out.json()["errors"].clone();
        assert!(
            errors[0].as_str().is_some_and(
                |e| e.starts_with("earlier deployment ") && e.ends_with(" still pending")
            ),
            "{errors}"
        );
        let _a2 = c.start_agent("agent-2", z.addr);
        let out = deploying.join().unwrap();
        assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
        let v = out.json();
        assert_eq!(
            v["results"]["nodes"]["worker-01"]["instance"], "agent-2",
            "{v}"
        );
        eventually("both nodes running", PATIENCE, || all_running(&z, 2));
    });
}

/// Runs `drover audit --who WHO` as ops against the controller of `z`.
fn audit_of(c: &Cluster, z: &Zeek, who: &str) -> Vec<Value> {
    let out = c.drover(z.addr, &["audit", "--who", who]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn zeek_client_over_wss_acts_with_its_certificates_scope() {
    use drover_proto::access::Scope;
    let c = Cluster::new();
    c.issue_scoped("dash", Scope::Viewer);
    c.issue_scoped("oper", Scope::Operator);
    let mut z = Zeek::start_running(&c, &["--zeek-websocket-tls"]);
    let _a = c.start_agent("agent-1", z.addr);
    z.settings = tls_settings(&c, "ops");
    wait_instances(&z, 1);
    let cluster = ini(&c, "deploy-error.ini");
    let out = z.run(&["deploy-config", &cluster]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);

    let attempts: [(&[&str], &str, Scope); 4] = [
        (&["stage-config", &cluster], "stage-config", Scope::Admin),
        (&["deploy"], "deploy", Scope::Admin),
        (&["deploy-config", &cluster], "stage-config", Scope::Admin),
        (&["restart", "manager"], "restart", Scope::Operator),
    ];
    for (name, have) in [("dash", Scope::Viewer), ("oper", Scope::Operator)] {
        let settings = tls_settings(&c, name);
        for (args, what, need) in attempts {
            let out = z.run_set(20, &settings, args);
            let text = format!("{}{}", out.stdout, out.stderr);
            if have >= need {
                assert_eq!(out.code, Some(0), "{name} {args:?}: {text}");
                continue;
            }
            assert_eq!(out.code, Some(1), "{name} {args:?}: {text}");
            let want = format!(
                "{what} needs scope {need}; this zeek-client connection has scope {have} (its certificate's scope, at most the front's --zeek-scope)"
            );
            assert!(text.contains(&want), "{name} {args:?}: {text}");
        }
        // Looking is always allowed.
        for args in [&["get-instances"][..], &["get-nodes"], &["get-config"]] {
            let out = z.run_set(20, &settings, args);
            assert_eq!(out.code, Some(0), "{name} {args:?}: {}", out.stderr);
        }
    }
    let dash = audit_of(&c, &z, "dash");
    assert_eq!(dash.len(), 4, "{dash:#?}");
    // What was asked is recorded as for a request carried out.
    assert_eq!(dash[3]["what"], "restart", "{dash:#?}");
    assert_eq!(dash[3]["args"], "manager", "{dash:#?}");
    assert!(
        dash[0]["args"].as_str().unwrap().starts_with("config "),
        "{dash:#?}"
    );
    for r in &dash {
        assert_eq!(r["outcome"], "refused", "{r}");
        assert_eq!(r["front"], "zeek", "{r}");
        assert_eq!(r["scope"], "viewer", "{r}");
        assert!(!r["serial"].as_str().unwrap().is_empty(), "{r}");
    }
    let oper: Vec<(String, String)> = audit_of(&c, &z, "oper")
        .iter()
        .map(|r| (r["what"].to_string(), r["outcome"].to_string()))
        .collect();
    assert_eq!(oper.len(), 4, "{oper:?}");
    assert_eq!(oper[3], ("\"restart\"".into(), "\"ok\"".into()));
    // The admin's own deploy through zeek-client is in the trail too.
    let ops = audit_of(&c, &z, "ops");
    let kinds: Vec<&str> = ops.iter().map(|r| r["what"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["stage_config", "deploy"], "{ops:#?}");
    assert!(ops.iter().all(|r| r["outcome"] == "ok"), "{ops:#?}");
}

#[test]
fn zeek_client_over_plain_ws_acts_with_the_fronts_scope() {
    let c = Cluster::new();
    let z = Zeek::start_running(&c, &["--zeek-scope", "viewer"]);
    let _a = c.start_agent("agent-1", z.addr);
    wait_instances(&z, 1);
    let cluster = ini(&c, "deploy-error.ini");
    let out = z.run(&["deploy-config", &cluster]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("stage-config needs scope admin; this zeek-client connection has scope viewer (the front's --zeek-scope)"),
        "{text}"
    );
    assert_eq!(z.run(&["get-nodes"]).code, Some(0));
    let records = audit_of(&c, &z, "zeek-client");
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["serial"], "");
    assert_eq!(records[0]["front"], "zeek");
    assert_eq!(records[0]["outcome"], "refused");
    // The native CLI is not bound by the zeek front's scope.
    let roles = c.dir.path().join("zeek-roles.toml");
    let roles = roles.to_str().unwrap();
    let out = c.drover(z.addr, &["deploy-config", "--roles", roles, &cluster]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // A viewer is shown environment names, not their values.
    let secret = c.dir.path().join("secret.ini");
    std::fs::write(
        &secret,
        "[instances]\nagent-1\n\n[manager]\ninstance = agent-1\nrole = manager\nenv = TOKEN=s3cret\n",
    )
    .unwrap();
    let secret = secret.to_str().unwrap();
    let out = c.drover(z.addr, &["deploy-config", "--roles", roles, secret]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let shown = z.run(&["get-config", "--deployed"]);
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    assert!(
        shown.stdout.contains("env = TOKEN=<hidden>") && !shown.stdout.contains("s3cret"),
        "{}",
        shown.stdout
    );
}
