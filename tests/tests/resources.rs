//! Resource limits and liveness with real agents and real processes: a node over its
//! memory limit is OOM-killed and reported as such; a node at its pids limit cannot
//! fork further; a node that stops sending `WATCHDOG=1` is restarted within the
//! watchdog period plus one second; http, tcp and exec probes each detect a hung node;
//! a notify message from a process outside the node is ignored; a limit the host cannot
//! enforce is refused at deploy.
//!
//! Limits go through cgroup v2 where the agent's subtree has the controller, else the
//! cgroup v1 hierarchies (this machine's memory, cpu and pids). Where a test's limit
//! cannot be enforced on a host at all, the deploy says so, and the test is skipped
//! with that message.

use drover_tests::{Cluster, PATIENCE, Proc, bin, eventually, free_tcp, metric_value, scrape};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Fields drop in order: the agent before the cluster, whose drop kills what is left in
/// the agent's cgroups (an agent still running would start its nodes again).
struct Setup {
    addr: SocketAddr,
    _ctl: Proc,
    agent: Proc,
    metrics: SocketAddr,
    c: Cluster,
}

fn setup() -> Setup {
    setup_with(&[])
}

/// As [`setup`], the agent started with `extra` flags.
fn setup_with(extra: &[&str]) -> Setup {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let (agent, metrics) = c.start_agent_with_metrics("agent-1", addr, extra);
    c.wait_for_agent(addr, "agent-1");
    Setup {
        c,
        addr,
        _ctl: ctl,
        agent,
        metrics,
    }
}

impl Setup {
    /// Deploys `body` after common defaults; the exit code and the JSON reply.
    fn deploy(&self, body: &str) -> (Option<i32>, Value, String) {
        let text = format!(
            "[defaults]\nbackoff = {{ initial = \"10ms\" }}\nmax_failed_starts = 0\nstop_timeout = \"1s\"\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[instances.agent-1]\n{body}"
        );
        let path = self
            .c
            .dir
            .path()
            .join(format!("cluster-{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        let out = self
            .c
            .drover(self.addr, &["deploy-config", path.to_str().unwrap()]);
        (out.code, out.json(), out.stderr)
    }

    /// Deploys `body`; `false` (with a message) when the host cannot enforce a limit.
    fn deploy_or_skip(&self, body: &str) -> bool {
        let (code, v, err) = self.deploy(body);
        let text = format!("{v}{err}");
        if text.contains("cannot be enforced on this host") {
            eprintln!("skipped: {text}");
            return false;
        }
        assert_eq!(code, Some(0), "{text}");
        true
    }

    fn node(&self, node: &str) -> Value {
        self.c.drover(self.addr, &["get-nodes", "--fresh"]).json()["results"]["agent-1"][node]
            .clone()
    }

    fn stdout_of(&self, node: &str) -> String {
        std::fs::read_to_string(
            self.c
                .dir
                .path()
                .join("agent-agent-1/nodes")
                .join(node)
                .join("stdout.log"),
        )
        .unwrap_or_default()
    }

    fn restarts(&self, node: &str) -> Option<f64> {
        self.metric(&format!("drover_agent_node_restarts{{node=\"{node}\"}}"))
    }

    /// When the agent logged that it started `node`, in milliseconds of the day, each
    /// start in order.
    fn starts(&self, node: &str) -> Vec<u64> {
        let needle = format!("started node={node} ");
        self.agent
            .log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| {
                let time = l.split_once('T')?.1.split_once('Z')?.0;
                let mut f = time.split(':');
                let (h, m, sec) = (f.next()?, f.next()?, f.next()?);
                let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
                let sec: f64 = sec.parse().ok()?;
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "milliseconds of a day"
                )]
                let ms = (sec * 1000.0) as u64;
                Some((h * 60 + m) * 60_000 + ms)
            })
            .collect()
    }

    /// The agent's cgroup v2 subtree, as its log names it.
    fn v2_root(&self) -> Option<String> {
        self.agent
            .wait_log("nodes are contained in cgroups")
            .lines()
            .find_map(|l| l.split("cgroup=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
    }

    fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&scrape(self.metrics), series)
    }
}

fn testprog(args: &[&str]) -> String {
    let mut argv = vec![Value::String(bin("drover-testprog").display().to_string())];
    argv.extend(args.iter().map(|a| Value::String((*a).to_owned())));
    Value::Array(argv).to_string()
}

/// The line of `/proc/PID/cgroup` for v1 controller `ctl` (`4:memory:/x` gives `/x`).
fn v1_cgroup(pid: u64, ctl: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
            ctls.split(',').any(|c| c == ctl).then(|| path.to_owned())
        })
}

#[test]
fn a_node_over_its_memory_limit_is_oom_killed_and_reported_as_such() {
    let s = setup();
    let body = format!(
        "[nodes.hog]\ninstance = \"agent-1\"\ncommand = {}\nmemory = {{ max = \"48M\" }}\n[nodes.steady]\ninstance = \"agent-1\"\ncommand = {}\nmemory = {{ max = \"64M\", high = \"32M\" }}\ncpus = 0.5\ncpu_weight = 50\npids_max = 64\n",
        testprog(&["--alloc-mib", "256"]),
        testprog(&["--alloc-mib", "8"]),
    );
    if !s.deploy_or_skip(&body) {
        return;
    }
    let hog = eventually("hog oom-killed and restarted", PATIENCE, || {
        let n = s.node("hog");
        (n["last_failure"] == "oom-killed"
            && n["oom_kills"].as_u64()? >= 1
            && s.restarts("hog")? >= 1.0)
            .then_some(n)
    });
    assert!(!s.stdout_of("hog").contains("allocated 256 MiB"), "{hog}");
    let oom = eventually("the oom metric", PATIENCE, || {
        s.metric("drover_agent_node_oom_kills_total{node=\"hog\"}")
            .filter(|v| *v >= 1.0)
    });
    assert!(oom >= 1.0);
    // The steady node's process is in its own limited memory cgroup, from its exec.
    eventually(
        "steady's memory, children included, from its cgroup",
        PATIENCE,
        || {
            let m = s.metric("drover_agent_node_memory_bytes{node=\"steady\"}")?;
            (m >= f64::from(8u32 << 20)).then_some(())
        },
    );
    let steady = s.node("steady");
    assert_eq!(steady["oom_kills"], Value::Null, "{steady}");
    let pid = steady["pid"].as_u64().unwrap();
    let v2_root = s.v2_root();
    let v1 = v1_cgroup(pid, "memory").filter(|p| p.ends_with("/nodes/steady"));
    if v1.is_none() {
        // Then cgroup v2 holds the limit.
        let root = v2_root.expect("a memory cgroup, v1 or v2");
        let max = std::fs::read_to_string(format!("{root}/nodes/steady/memory.max")).unwrap();
        assert_eq!(max.trim(), (64u64 << 20).to_string());
    }
    if let Some(path) = v1 {
        let dir = format!("/sys/fs/cgroup/memory{path}");
        let limit = std::fs::read_to_string(format!("{dir}/memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), (64u64 << 20).to_string());
        let soft = std::fs::read_to_string(format!("{dir}/memory.soft_limit_in_bytes")).unwrap();
        assert_eq!(soft.trim(), (32u64 << 20).to_string());
        let tasks = std::fs::read_to_string(format!("{dir}/tasks")).unwrap();
        assert!(
            !tasks.lines().any(|t| t == s.agent.pid().to_string()),
            "the spawning thread went back"
        );
    }
    // CPU and pids limits, where v1 holds them (the CPU quota written once the node
    // runs, pids.max before).
    let read = |ctl: &str, file: &str| {
        let path = v1_cgroup(pid, ctl).filter(|p| p.ends_with("/nodes/steady"))?;
        std::fs::read_to_string(format!("/sys/fs/cgroup/{ctl}{path}/{file}"))
            .ok()
            .map(|t| t.trim().to_owned())
    };
    if let Some(quota) = read("cpu", "cpu.cfs_quota_us") {
        assert_eq!(quota, "50000");
        assert_eq!(read("cpu", "cpu.cfs_period_us").unwrap(), "100000");
        assert_eq!(read("cpu", "cpu.shares").unwrap(), "512");
    }
    if let Some(max) = read("pids", "pids.max") {
        assert_eq!(max, "64");
    }
    // Removed from the configuration, its cgroups go.
    let (code, v, _) = s.deploy("");
    assert_eq!(code, Some(0), "{v}");
    let subtree = s
        .v2_root()
        .and_then(|r| r.rsplit('/').next().map(str::to_owned));
    if let (Some(own), Some(subtree)) = (v1_cgroup(u64::from(s.agent.pid()), "memory"), subtree) {
        let nodes = format!("/sys/fs/cgroup/memory{own}/{subtree}/nodes");
        assert!(std::path::Path::new(&nodes).is_dir(), "{nodes}");
        eventually("v1 node cgroups removed", PATIENCE, || {
            let left = std::fs::read_dir(&nodes)
                .ok()?
                .flatten()
                .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
                .count();
            (left == 0).then_some(())
        });
    }
}

/// A redeploy that drops a limit runs the node without it: the cgroups the node keeps
/// from one spec to the next hold no value of the old one.
#[test]
fn limits_dropped_by_a_redeploy_are_lifted() {
    let s = setup();
    let node = |limits: &str| {
        format!(
            "[nodes.steady]\ninstance = \"agent-1\"\ncommand = {}\n{limits}",
            testprog(&["--sleep-forever"]),
        )
    };
    let all =
        "memory = { max = \"64M\", high = \"32M\" }\ncpus = 0.5\ncpu_weight = 50\npids_max = 64\n";
    if !s.deploy_or_skip(&node(all)) {
        return;
    }
    let first = eventually("steady running", PATIENCE, || {
        s.node("steady")["pid"].as_u64()
    });
    let (code, v, _) = s.deploy(&node("memory = { high = \"512M\" }\ncpu_weight = 50\n"));
    assert_eq!(code, Some(0), "{v}");
    let pid = eventually("steady running again", PATIENCE, || {
        s.node("steady")["pid"].as_u64().filter(|p| *p != first)
    });
    let v2_root = s.v2_root();
    // Each file where the node's cgroup holds it: v1 if the node is in one, else v2.
    let read = |ctl: &str, v1: &str, v2: &str| {
        let at = match v1_cgroup(pid, ctl).filter(|p| p.ends_with("/nodes/steady")) {
            Some(path) => format!("/sys/fs/cgroup/{ctl}{path}/{v1}"),
            None => format!("{}/nodes/steady/{v2}", v2_root.as_deref()?),
        };
        std::fs::read_to_string(at)
            .ok()
            .map(|t| t.trim().to_owned())
    };
    let unlimited = |v: Option<String>| {
        v.is_none_or(|v| v == "max" || v == "-1" || v.starts_with("max ") || v.len() >= 18)
    };
    let max = read("memory", "memory.limit_in_bytes", "memory.max");
    assert!(
        max.is_some(),
        "the node's memory cgroup holds its memory.max"
    );
    assert!(unlimited(max.clone()), "memory max still {max:?}");
    let quota = read("cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(unlimited(quota.clone()), "cpu quota still {quota:?}");
    let pids = read("pids", "pids.max", "pids.max");
    assert!(unlimited(pids.clone()), "pids max still {pids:?}");
    // What the new spec keeps is still in force.
    if let Some(shares) = read("cpu", "cpu.shares", "cpu.weight") {
        assert!(shares == "512" || shares == "50", "{shares}");
    }
}

#[test]
fn an_oom_kill_is_kept_in_the_node_record_for_the_next_agent() {
    let mut s = setup();
    let body = format!(
        "[nodes.once]\ninstance = \"agent-1\"\nrestart = \"never\"\ncommand = {}\nmemory = {{ max = \"48M\" }}\n",
        testprog(&["--alloc-mib", "256"]),
    );
    if !s.deploy_or_skip(&body) {
        return;
    }
    eventually("once oom-killed", PATIENCE, || {
        let n = s.node("once");
        (n["last_failure"] == "oom-killed" && n["oom_kills"] == 1).then_some(())
    });
    // What the next agent reads.
    let record = s.c.dir.path().join("agent-agent-1/nodes/once/record.json");
    let r: Value = eventually("the oom kill recorded", PATIENCE, || {
        let r: Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
        (r["oom_kills"] == 1).then_some(r)
    });
    assert_eq!(r["last_failure"], "oom-killed", "{r}");
    s.agent.kill();
    let _agent =
        s.c.start_agent_args("agent-1", "agent-1", &["--controller", &s.addr.to_string()]);
    eventually("the next agent reports it", PATIENCE, || {
        let n = s.node("once");
        (n["last_failure"] == "oom-killed" && n["oom_kills"].as_u64()? >= 1).then_some(())
    });
}

#[test]
fn v1_cgroups_of_a_node_the_agent_no_longer_knows_are_removed_when_it_starts() {
    let mut s = setup();
    let body = format!(
        "[nodes.lost]\ninstance = \"agent-1\"\ncommand = {}\nmemory = {{ max = \"64M\" }}\n",
        testprog(&[]),
    );
    if !s.deploy_or_skip(&body) {
        return;
    }
    let pid = s.node("lost")["pid"].as_u64().unwrap();
    let Some(path) = v1_cgroup(pid, "memory").filter(|p| p.ends_with("/nodes/lost")) else {
        eprintln!("skipped: the memory limit is on cgroup v2 here");
        return;
    };
    let dir = std::path::PathBuf::from(format!("/sys/fs/cgroup/memory{path}"));
    assert!(dir.is_dir());
    // The agent dies, the node with it, and the node's state is lost meanwhile.
    s.agent.kill();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the node gone", PATIENCE, || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let state = s.c.dir.path().join("agent-agent-1");
    std::fs::remove_dir_all(state.join("nodes/lost")).unwrap();
    std::fs::remove_file(state.join("desired.json")).unwrap();
    // No controller tells it of the node again: the node is unknown to the agent.
    let _agent =
        s.c.start_agent_args("agent-1", "agent-1", &["--listen", "127.0.0.1:0"]);
    eventually("the lost node's v1 cgroup removed", PATIENCE, || {
        (!dir.exists()).then_some(())
    });
}

/// CPU time a process has used so far (user and system), from `/proc/PID/stat`.
fn cpu_time(pid: u64) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // Clock ticks of 10 ms.
    Duration::from_millis((f[0] + f[1]) * 10)
}

#[test]
fn a_node_over_its_cpu_quota_is_throttled() {
    let s = setup();
    let body = "[nodes.spin]\ninstance = \"agent-1\"\ncommand = [\"/bin/sh\", \"-c\", \"while :; do :; done\"]\ncpus = 0.2\n";
    if !s.deploy_or_skip(body) {
        return;
    }
    let pid = s.node("spin")["pid"].as_u64().unwrap();
    // A window to measure over, not a wait for anything: unthrottled, the loop would
    // take a whole CPU of it (unless the machine is saturated, which only makes the
    // check easier to pass, never harder).
    let (before, began) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (used, window) = (cpu_time(pid) - before, began.elapsed());
    assert!(
        used <= window.mul_f64(0.2) + Duration::from_millis(200),
        "a fifth of a CPU allowed, {used:?} used in {window:?}"
    );
}

#[test]
fn a_node_at_its_pids_limit_cannot_fork_further() {
    let s = setup();
    let body = format!(
        "[nodes.forker]\ninstance = \"agent-1\"\nrestart = \"never\"\ncommand = {}\npids_max = 6\n",
        testprog(&["--fork-until-fail"]),
    );
    if !s.deploy_or_skip(&body) {
        return;
    }
    let line = eventually("the forker gave up", PATIENCE, || {
        s.stdout_of("forker")
            .lines()
            .find(|l| l.starts_with("testprog: forked"))
            .map(str::to_owned)
    });
    let n: u32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    // The node itself (and the threads it runs) count: fewer than 6 children.
    assert!((1..6).contains(&n), "{line}");
    assert!(line.contains("Resource temporarily unavailable"), "{line}");
    let node = s.node("forker");
    assert_eq!(node["state"], "RUNNING", "{node}");
}

#[test]
fn a_node_that_stops_pinging_its_watchdog_is_restarted_within_the_period_and_a_second() {
    let s = setup();
    let body = format!(
        "[nodes.dog]\ninstance = \"agent-1\"\ncommand = {}\nwatchdog = \"2s\"\n[nodes.good]\ninstance = \"agent-1\"\ncommand = {}\nwatchdog = \"1s\"\n",
        testprog(&["--watchdog", "--hang-after", "3s"]),
        testprog(&["--watchdog"]),
    );
    let (code, v, err) = s.deploy(&body);
    assert_eq!(code, Some(0), "{v}{err}");
    let starts = eventually("dog restarted", PATIENCE, || {
        let starts = s.starts("dog");
        (starts.len() >= 2 && s.restarts("dog")? >= 1.0).then_some(starts)
    });
    let second = s.node("dog");
    // It hangs 3 s after its start (a little later, counting its own start-up); its
    // last ping came at most a quarter of the period before that.
    let hang = starts[0] + 3_000;
    let restarted = starts[1];
    assert!(
        restarted <= hang + 2_000 + 1_000,
        "hung at {hang}, restarted {} ms later",
        restarted.saturating_sub(hang)
    );
    assert!(
        restarted >= hang + 1_400,
        "not before the period ran out: {starts:?}"
    );
    eprintln!("restarted {} ms after the hang", restarted - hang);
    let why = second["last_failure"].as_str().unwrap();
    assert!(
        why.starts_with("watchdog timeout: no WATCHDOG=1 within 2s"),
        "{why}"
    );
    assert_eq!(second["liveness_failures"], 1, "{second}");
    assert!(
        s.stdout_of("dog")
            .contains("testprog: WATCHDOG_PID matches")
    );
    // The node that keeps pinging a shorter watchdog ran all along.
    let good = s.node("good");
    assert_eq!(s.restarts("good"), Some(0.0), "{good}");
    assert_eq!(good["state"], "RUNNING", "{good}");
    assert!(s.metric("drover_agent_node_liveness_failures_total{node=\"dog\"}") >= Some(1.0));
}

#[test]
fn http_tcp_and_exec_probes_each_detect_a_hung_node() {
    let s = setup();
    let (h, t, e, ok) = (free_tcp(), free_tcp(), free_tcp(), free_tcp());
    let probe = "interval = \"300ms\", timeout = \"300ms\", failures = 2";
    let exec = Value::Array(vec![
        Value::String(bin("drover-testprog").display().to_string()),
        Value::String("--check-http".into()),
        Value::String(e.to_string()),
    ]);
    let body = format!(
        "[nodes.h]\ninstance = \"agent-1\"\ncommand = {}\nliveness = {{ kind = \"http\", port = {}, path = \"/health\", {probe} }}\n\
         [nodes.t]\ninstance = \"agent-1\"\ncommand = {}\nliveness = {{ kind = \"tcp\", port = {}, {probe} }}\n\
         [nodes.e]\ninstance = \"agent-1\"\ncommand = {}\nliveness = {{ kind = \"exec\", command = {exec}, {probe} }}\n\
         [nodes.ok]\ninstance = \"agent-1\"\ncommand = {}\nliveness = {{ kind = \"http\", port = {}, {probe} }}\n",
        testprog(&["--http", &h.to_string(), "--hang-after", "1s"]),
        h.port(),
        testprog(&["--listen", &t.to_string(), "--hang-after", "1s"]),
        t.port(),
        testprog(&["--http", &e.to_string(), "--hang-after", "1s"]),
        testprog(&["--http", &ok.to_string()]),
        ok.port(),
    );
    let (code, v, err) = s.deploy(&body);
    assert_eq!(code, Some(0), "{v}{err}");
    for (node, kind) in [("h", "http"), ("t", "tcp"), ("e", "exec")] {
        let n = eventually(&format!("{node} restarted by its probe"), PATIENCE, || {
            let n = s.node(node);
            (s.restarts(node)? >= 1.0 && n["liveness_failures"].as_u64()? >= 1).then_some(n)
        });
        let why = n["last_failure"].as_str().unwrap_or_default();
        assert!(
            why.starts_with(&format!("liveness probe ({kind}) failed 2 times in a row")),
            "{node}: {n}"
        );
    }
    assert_eq!(s.restarts("ok"), Some(0.0));
    // The status table shows why.
    let table = s.c.drover(s.addr, &["status"]);
    assert!(table.stdout.contains("liveness probe"), "{}", table.stdout);
}

/// Pids of live processes whose command line is `sleep <arg>`.
fn sleeping(arg: &str) -> Vec<u32> {
    let want = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want.as_bytes())
                && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                    !st.rsplit_once(") ")
                        .is_some_and(|(_, r)| r.starts_with('Z'))
                })
        })
        .collect()
}

/// The agent's cgroup v2 subtree, where it has one.
fn agent_subtree(agent: u32) -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{agent}/cgroup")).ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = rel.strip_suffix("/agent")?.trim_start_matches('/');
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")?[1]
        .to_owned();
    Some(std::path::Path::new(&mount).join(rel))
}

#[test]
fn exec_probes_run_as_their_node_and_leave_nothing_running() {
    exec_probes_leave_nothing(&[]);
}

/// Without cgroups a probe leads a process group of its own, and that is killed.
#[test]
fn exec_probes_leave_nothing_running_without_cgroups() {
    exec_probes_leave_nothing(&["--cgroup-root", "none"]);
}

fn exec_probes_leave_nothing(extra: &[&str]) {
    let mut s = setup_with(extra);
    let nodes = s.c.dir.path().join("agent-agent-1/nodes");
    let work = |node: &str| nodes.join(node).join("work");
    let runs = |node: &str| {
        std::fs::read_to_string(work(node).join("runs")).map_or(0, |t| t.lines().count())
    };
    // Each probe notes its run in the node's working directory and leaves a process
    // behind: `hung`'s by timing out with a child, `quick`'s by exiting with one in
    // the background.
    // Sleeps of this test process's own (tests run side by side).
    let (hung_arg, quick_arg) = (
        format!("{}.25", std::process::id()),
        format!("{}.75", std::process::id()),
    );
    let body = r#"
[nodes.hung]
instance = "agent-1"
command = ["sleep", "10000"]
env = { PROBE_MARK = "from-the-node" }
liveness = { kind = "exec", command = ["sh", "-c", "echo run >> runs; env > probe.env; sleep HUNG & sleep HUNG"], interval = "100ms", timeout = "200ms", failures = 100 }

[nodes.quick]
instance = "agent-1"
command = ["sleep", "10000"]
liveness = { kind = "exec", command = ["sh", "-c", "echo run >> runs; sleep QUICK & exit 0"], interval = "100ms", timeout = "5s" }

[nodes.says]
instance = "agent-1"
command = ["sleep", "10000"]
liveness = { kind = "exec", command = ["sh", "-c", "echo checking; echo 'not healthy: disk full' >&2; exit 1"], interval = "300ms", failures = 1 }
"#
    .replace("HUNG", &hung_arg)
    .replace("QUICK", &quick_arg);
    let (code, v, err) = s.deploy(&body);
    assert_eq!(code, Some(0), "{v}{err}");
    eventually("four runs of each probe", PATIENCE, || {
        (runs("hung") >= 4 && runs("quick") >= 4).then_some(())
    });
    // One run at a time: what is left is the current run's, two sleeps at most.
    let hung = sleeping(&hung_arg);
    assert!(hung.len() <= 2, "timed-out probes left {hung:?}");
    eventually("the quick probe's leftovers killed", PATIENCE, || {
        sleeping(&quick_arg).is_empty().then_some(())
    });
    assert_eq!(
        s.restarts("quick"),
        Some(0.0),
        "a probe that exits 0 passes"
    );
    // A failed check says why in the last line it wrote.
    let says = eventually("says failed its check", PATIENCE, || {
        let n = s.node("says");
        n["last_failure"].as_str().map(str::to_owned)
    });
    assert_eq!(
        says,
        "liveness probe (exec) failed once: sh ended with exit status 1: not healthy: disk full"
    );

    // The probe has the node's environment, not the agent's.
    let env = std::fs::read_to_string(work("hung").join("probe.env")).unwrap();
    let pid = s.node("hung")["pid"].as_u64().unwrap();
    for line in [
        "PROBE_MARK=from-the-node".to_owned(),
        "DROVER_NODE=hung".to_owned(),
        format!("DROVER_NODE_PID={pid}"),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in {env}");
    }
    assert!(!env.contains("RUST_LOG="), "the agent's environment: {env}");

    // An agent SIGKILLed mid-run leaves its run behind; the next agent kills it.
    let before = runs("hung");
    eventually("a hung probe under way", PATIENCE, || {
        (!sleeping(&hung_arg).is_empty()).then_some(())
    });
    s.agent.kill();
    let orphans = sleeping(&hung_arg);
    (s.agent, s.metrics) = s.c.start_agent_with_metrics("agent-1", s.addr, extra);
    eventually("the dead agent's probe run killed", PATIENCE, || {
        orphans
            .iter()
            .all(|p| !sleeping(&hung_arg).contains(p))
            .then_some(())
    });
    eventually("the probe running again", PATIENCE, || {
        (runs("hung") > before).then_some(())
    });

    // Nodes removed: nothing of their probes is left, their cgroups neither.
    let (code, v, err) = s.deploy("");
    assert_eq!(code, Some(0), "{v}{err}");
    eventually("no probe process left", PATIENCE, || {
        (sleeping(&hung_arg).is_empty() && sleeping(&quick_arg).is_empty()).then_some(())
    });
    if let Some(subtree) = agent_subtree(s.agent.pid()) {
        eventually("the probe cgroups removed", PATIENCE, || {
            (!subtree.join("probes/hung").exists() && !subtree.join("probes/quick").exists())
                .then_some(())
        });
    }
}

#[test]
fn notify_messages_from_a_process_outside_the_node_are_ignored() {
    let s = setup();
    let c = &s.c;
    let file = c.dir.path().join("n.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\ncommand = {}\nreadiness = {{ kind = \"notify\", timeout = \"1h\" }}\n",
            testprog(&["--sleep-forever"]),
        ),
    )
    .unwrap();
    // The deploy waits for readiness: it runs meanwhile.
    let mut deploy = c.drover_command(s.addr);
    deploy.args(["--timeout", "60s", "deploy-config", file.to_str().unwrap()]);
    let deploy = std::thread::spawn(move || drover_tests::run_cli(deploy, PATIENCE * 3));
    let pid = eventually("n spawned", PATIENCE, || s.node("n")["pid"].as_u64());
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let socket = env
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap();
    let foreign = std::os::unix::net::UnixDatagram::unbound().unwrap();
    foreign.send_to(b"READY=1\nSTATUS=forged", &socket).unwrap();
    s.agent
        .wait_log("ignoring a notify message from a process that is not the node's");
    let n = s.node("n");
    assert_eq!(n["state"], "PENDING", "{n}");
    let table = s.c.drover(s.addr, &["status"]).stdout;
    assert!(!table.contains("forged"), "{table}");
    // A process of the node that is not its main process is heard: one that enters
    // the node's cgroup, then sends READY=1.
    let log = s.agent.wait_log("nodes are contained in cgroups");
    let Some(root) = log
        .lines()
        .find_map(|l| l.split("cgroup=").nth(1))
        .and_then(|r| r.split_whitespace().next())
    else {
        eprintln!("skipped the second half: no cgroup v2 subtree");
        return;
    };
    let script = format!(
        "echo $$ > {root}/nodes/n/cgroup.procs && exec {} --ready-after 0 --status mine --exit-after 2s",
        bin("drover-testprog").display()
    );
    let st = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .env("NOTIFY_SOCKET", &socket)
        .status()
        .unwrap();
    assert!(st.success());
    let n = eventually("ready from inside the node's cgroup", PATIENCE, || {
        let n = s.node("n");
        (n["state"] == "RUNNING").then_some(n)
    });
    assert_eq!(
        n["pid"].as_u64(),
        Some(pid),
        "the main process still runs: {n}"
    );
    let table = s.c.drover(s.addr, &["status"]).stdout;
    assert!(table.contains("ready"), "{table}");
    let out = deploy.join().unwrap();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}

#[test]
fn limits_the_host_cannot_enforce_are_refused_at_deploy() {
    let s = setup();
    let body = format!(
        "[nodes.io]\ninstance = \"agent-1\"\ncommand = {}\nio_weight = 200\n",
        testprog(&[]),
    );
    let (code, v, err) = s.deploy(&body);
    let text = format!("{v}{err}");
    if code == Some(0) {
        eprintln!("skipped: this host enforces io_weight");
        return;
    }
    assert!(
        text.contains("node 'io': io_weight cannot be enforced on this host"),
        "{text}"
    );
    // Refused by the controller, from what the agent said of its host, before the
    // generation was recorded; by the agent itself when its first report had not come
    // in yet.
    assert!(
        text.contains("nothing was deployed") || text.contains("nothing changed"),
        "{text}"
    );
    let nodes = s.c.drover(s.addr, &["get-nodes", "--fresh"]).json();
    assert_eq!(nodes["results"]["agent-1"].get("io"), None, "{nodes}");
}

/// A worker the node forked is OOM-killed while the node runs on: counted within
/// seconds (not when the node's main process ends), and an operator's stop afterwards
/// is not blamed on it.
#[test]
fn an_oom_kill_of_a_nodes_child_is_counted_while_it_runs() {
    let s = setup();
    let prog = bin("drover-testprog").display().to_string();
    let command = Value::Array(
        [
            "/bin/sh",
            "-c",
            &format!("\"{prog}\" --alloc-mib 256; echo child ended $?; exec sleep 100000"),
        ]
        .iter()
        .map(|a| Value::String((*a).to_owned()))
        .collect(),
    );
    let body = format!(
        "[nodes.parent]\ninstance = \"agent-1\"\ncommand = {command}\nmemory = {{ max = \"48M\" }}\n"
    );
    if !s.deploy_or_skip(&body) {
        return;
    }
    let n = eventually("the child's oom kill counted", PATIENCE, || {
        let n = s.node("parent");
        (n["oom_kills"] == 1).then_some(n)
    });
    assert_eq!(n["state"], "RUNNING", "{n}");
    assert_eq!(
        n["last_failure"], "oom-killed: a process of the node",
        "{n}"
    );
    assert!(n["last_error"].is_null(), "{n}");
    let out = s.c.drover(s.addr, &["stop", "parent"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let n = s.node("parent");
    assert_eq!(n["state"], "STOPPED", "{n}");
    assert_eq!(n["oom_kills"], 1, "{n}");
    assert!(n["last_error"].is_null(), "{n}");
}
