//! Nodes run as their own users, with capabilities and limits, through a real agent
//! (root here): a node running as `nobody` has that uid and gid, its one capability
//! (ambient, bounding set cut, and a raw socket opens with it and not without), no new
//! privileges and its rlimits; its exec probe runs as that user too; it cannot read
//! another node's logs; it enters its working directory as its user, not the agent's;
//! an unknown user is a deploy error naming node and user; bad settings are config errors with line;
//! the files the agent writes for a node are written with the node's rights.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use drover_tests::{Cluster, PATIENCE, Proc, bin, eventually};
use serde_json::Value;

fn connect(c: &Cluster, addr: SocketAddr) {
    eventually("agent connected", PATIENCE, || {
        let out = c.drover(addr, &["get-instances"]);
        (out.json().as_object().map(|o| o.len()) == Some(1)).then_some(())
    });
}

/// Deploys `body` (node tables) to agent-1; the exit code, the JSON reply and the
/// CLI's stderr.
fn deploy(c: &Cluster, addr: SocketAddr, body: &str) -> (Option<i32>, Value, String) {
    let text = format!(
        "[defaults]\nbackoff = {{ initial = \"10ms\" }}\nmax_failed_starts = 1\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[instances.agent-1]\n{body}"
    );
    let path = c.dir.path().join(format!("cluster-{}.toml", text.len()));
    std::fs::write(&path, text).unwrap();
    let out = c.drover(addr, &["deploy-config", path.to_str().unwrap()]);
    let json = out.json();
    (out.code, json, out.stderr)
}

fn node_status(c: &Cluster, addr: SocketAddr, node: &str) -> Value {
    c.drover(addr, &["get-nodes", "--fresh"]).json()["results"]["agent-1"][node].clone()
}

/// A field of `/proc/<pid>/status`, trimmed.
fn status(pid: u64, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn hex(pid: u64, field: &str) -> u64 {
    u64::from_str_radix(&status(pid, field), 16).unwrap()
}

/// A controller and agent `agent-1`, connected, in a test dir other users may pass
/// through: the nodes reach their sockets through the state dir, below it.
fn root_cluster() -> (Cluster, Proc, SocketAddr, Proc) {
    let c = Cluster::new();
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("agent-1", addr);
    connect(&c, addr);
    (c, ctl, addr, agent)
}

const CAP_NET_RAW: u64 = 1 << 13;

#[test]
fn nodes_run_as_their_users_with_their_capabilities_and_limits() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: running nodes as other users needs a root agent");
        return;
    }
    let (c, _ctl, addr, _agent) = root_cluster();
    let nodes = c.dir.path().join("agent-agent-1/nodes");
    let other_log = nodes.join("other/stdout.log");
    let prog = bin("drover-testprog");
    // `other` first, on its own: its log file is made by its first line, and `capture`
    // is to find it there, out of reach.
    let other = format!(
        r#"
[nodes.other]
instance = "agent-1"
command = ["{p}", "--print", "secret"]
user = "65533"
group = "65533"
"#,
        p = prog.display(),
    );
    let (code, v, stderr) = deploy(&c, addr, &other);
    assert_eq!(code, Some(0), "{v} {stderr}");
    eventually("other's log file", PATIENCE, || {
        other_log.exists().then_some(())
    });
    let body = format!(
        r#"
[nodes.capture]
instance = "agent-1"
command = ["{p}", "--raw-socket", "--read-file", "{log}", "--ready-after", "0s"]
readiness = {{ kind = "notify", timeout = "10s" }}
user = "nobody"
capabilities = ["CAP_NET_RAW"]
no_new_privileges = true
umask = "0077"
limits = {{ nofile = "1234:2345", core = "unlimited" }}

[nodes.plain]
instance = "agent-1"
command = ["{p}", "--raw-socket"]
user = "nobody"
liveness = {{ kind = "exec", command = ["sh", "-c", "id -u > probe.uid"], interval = "100ms" }}
{other}"#,
        p = prog.display(),
        log = other_log.display(),
    );
    let (code, v, stderr) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v} {stderr}");
    let pid = node_status(&c, addr, "capture")["pid"].as_u64().unwrap();
    assert_eq!(status(pid, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status(pid, "Gid:"), "65534\t65534\t65534\t65534");
    assert_eq!(hex(pid, "CapAmb:"), CAP_NET_RAW);
    assert_eq!(hex(pid, "CapEff:"), CAP_NET_RAW);
    assert_eq!(hex(pid, "CapBnd:"), CAP_NET_RAW, "bounding set cut");
    assert_eq!(status(pid, "NoNewPrivs:"), "1");
    assert_eq!(status(pid, "Umask:"), "0077");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().collect::<Vec<_>>()[3..5],
        ["1234", "2345"],
        "{nofile}"
    );
    let core = limits.lines().find(|l| l.starts_with("Max core")).unwrap();
    assert!(core.contains("unlimited            unlimited"), "{core}");

    let log = |node: &str| {
        std::fs::read_to_string(nodes.join(node).join("stdout.log")).unwrap_or_default()
    };
    let capture = eventually("capture's report", PATIENCE, || {
        let l = log("capture");
        l.contains("read ").then_some(l)
    });
    assert!(capture.contains("raw socket: ok"), "{capture}");
    assert!(
        capture.contains(&format!("read {}: permission denied", other_log.display())),
        "another node's log is out of reach: {capture}"
    );
    let plain = eventually("plain's report", PATIENCE, || {
        let l = log("plain");
        l.contains("raw socket").then_some(l)
    });
    assert!(
        plain.contains("raw socket: operation not permitted"),
        "without the capability: {plain}"
    );
    // Its exec probe runs as the node does.
    let probe_uid = eventually("plain's probe ran", PATIENCE, || {
        std::fs::read_to_string(nodes.join("plain/work/probe.uid"))
            .ok()
            .filter(|t| t.ends_with('\n'))
    });
    assert_eq!(probe_uid.trim(), "65534", "the probe's user");
    // Its query socket is in `run/`, which it owns: value queries reach it.
    let v = eventually("capture answers a value query", PATIENCE, || {
        let v = c.drover(addr, &["get-id-value", "pid", "capture"]).json();
        v["results"]["capture"].as_u64().map(|_| v)
    });
    assert_eq!(v["results"]["capture"].as_u64(), Some(pid), "{v}");
    let other = node_status(&c, addr, "other")["pid"].as_u64().unwrap();
    assert_eq!(status(other, "Uid:"), "65533\t65533\t65533\t65533");
    assert_eq!(
        hex(other, "CapEff:"),
        0,
        "a user switch drops root's capabilities"
    );
    // What the node owns, and what it does not.
    let meta = |p: &str| std::fs::metadata(nodes.join(p)).unwrap();
    use std::os::unix::fs::MetadataExt;
    let dir = meta("other");
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o7777),
        (0, 65533, 0o750)
    );
    let run = meta("other/run");
    assert_eq!(
        (run.uid(), run.gid(), run.mode() & 0o7777),
        (65533, 65533, 0o700)
    );
    let sock = meta("other/notify.sock");
    assert_eq!((sock.uid(), sock.mode() & 0o777), (65533, 0o600));
    assert_eq!(
        meta("other/record.json").uid(),
        0,
        "its record stays the agent's"
    );

    // Back to the agent's user: the agent takes its files back.
    let as_agent = body.replace("user = \"65533\"\ngroup = \"65533\"\n", "");
    assert_ne!(as_agent, body);
    let (code, v, stderr) = deploy(&c, addr, &as_agent);
    assert_eq!(code, Some(0), "{v} {stderr}");
    let again = node_status(&c, addr, "other")["pid"].as_u64().unwrap();
    assert_eq!(status(again, "Uid:"), "0\t0\t0\t0");
    let dir = meta("other");
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (0, 0, 0o700));
    assert_eq!(
        (meta("other/work").uid(), meta("other/notify.sock").uid()),
        (0, 0)
    );

    // An unknown user is a deploy error naming node and user.
    let (code, v, _) = deploy(
        &c,
        addr,
        "[nodes.ghost]\ninstance = \"agent-1\"\ncommand = [\"/bin/true\"]\nuser = \"no-such-user-here\"\n",
    );
    assert_eq!(code, Some(1), "{v}");
    let want = "node 'ghost': unknown user 'no-such-user-here' on this host";
    let reply = v["results"]["nodes"]["ghost"]["stderr"]
        .as_str()
        .unwrap_or_default();
    assert!(reply.contains(want), "{v}");
    let s = node_status(&c, addr, "ghost");
    assert_eq!(s["state"], "FAILED", "{s}");
    assert!(
        s["last_error"].as_str().unwrap_or_default().contains(want),
        "{s}"
    );
}

#[test]
fn a_node_enters_its_working_directory_as_its_own_user() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: running nodes as other users needs a root agent");
        return;
    }
    let c = Cluster::new();
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    // Only root may enter `closed`; `mine` is nobody's own, as a home directory.
    let closed = c.dir.path().join("closed");
    let mine = c.dir.path().join("mine");
    for (dir, owner) in [(&closed, 0), (&mine, 65534)] {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(owner), Some(owner)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    // Missing: made for the node, the last directory its user's.
    let fresh = c.dir.path().join("srv/fresh");
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    connect(&c, addr);
    let body = format!(
        r#"
[nodes.home]
instance = "agent-1"
command = ["/bin/sleep", "1000"]
user = "nobody"
workdir = "{mine}"

[nodes.barred]
instance = "agent-1"
command = ["/bin/sleep", "1000"]
user = "nobody"
workdir = "{closed}"

[nodes.rooted]
instance = "agent-1"
command = ["/bin/sleep", "1000"]
workdir = "{closed}"

[nodes.fresh]
instance = "agent-1"
command = ["/bin/sh", "-c", "echo here > made.txt; exec sleep 1000"]
user = "nobody"
workdir = "{fresh}"
"#,
        mine = mine.display(),
        closed = closed.display(),
        fresh = fresh.display(),
    );
    let (code, v, stderr) = deploy(&c, addr, &body);
    assert_eq!(code, Some(1), "{v} {stderr}");
    let nodes = &v["results"]["nodes"];
    assert_eq!(nodes["home"]["success"], true, "{v}");
    assert_eq!(nodes["rooted"]["success"], true, "{v}");
    assert_eq!(nodes["barred"]["success"], false, "{v}");
    let want = "node 'barred': cannot execute /bin/sleep: cannot enter the working directory: permission denied";
    let reply = nodes["barred"]["stderr"].as_str().unwrap_or_default();
    assert!(reply.contains(want), "{v}");
    let s = node_status(&c, addr, "barred");
    assert!(
        s["pid"].is_null(),
        "nothing runs in a directory its user may not enter: {s}"
    );
    assert!(
        s["last_error"].as_str().unwrap_or_default().contains(want),
        "{s}"
    );
    let cwd = |node: &str| {
        let pid = node_status(&c, addr, node)["pid"].as_u64().unwrap();
        (pid, std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap())
    };
    let (home, at) = cwd("home");
    assert_eq!(at, mine);
    assert_eq!(status(home, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(cwd("rooted").1, closed, "the agent's own user enters it");
    // The directories are left as they were.
    let meta = std::fs::metadata(&closed).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o700));
    // The one made for `fresh` is its user's, who writes there; its parent is not.
    assert_eq!(nodes["fresh"]["success"], true, "{v}");
    assert_eq!(std::fs::metadata(&fresh).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(fresh.parent().unwrap()).unwrap().uid(), 0);
    let made = eventually("fresh wrote its file", PATIENCE, || {
        std::fs::metadata(fresh.join("made.txt")).ok()
    });
    assert_eq!(made.uid(), 65534);
}

#[test]
fn bad_settings_are_config_errors_with_line_and_key() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let path = c.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[instances.agent-1]\n\n[nodes.x]\ninstance = \"agent-1\"\ncommand = [\"/bin/true\"]\nuser = \"a b\"\n\n\ncapabilities = [\"CAP_NET_RAWW\"]\nlimits = { nofile = \"many\" }\n",
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", path.to_str().unwrap()]);
    assert_ne!(out.code, Some(0));
    let stderr = out.stderr;
    assert!(
        stderr.contains(":6: nodes.x.user: user 'a b' is not a valid name"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            ":9: nodes.x.capabilities: unknown capability 'CAP_NET_RAWW' (did you mean 'CAP_NET_RAW'?)"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(":10: nodes.x.limits.nofile: limit nofile: 'many' is not a limit"),
        "{stderr}"
    );
}

/// Starts agent `agent-1` as nobody, made able to read its key, reach it and write its
/// state dir; through `setpriv` with `setpriv` (its bounding set, say) when given.
fn nobody_agent(c: &Cluster, addr: SocketAddr, setpriv: Option<&str>) -> Proc {
    use std::os::unix::process::CommandExt;
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let nobody = Some(65534);
    for p in [c.dir.path(), c.pki.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::os::unix::fs::chown(c.pki_file("agent-1.key"), nobody, nobody).unwrap();
    let state = c.dir.path().join("agent-agent-1");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, nobody, nobody).unwrap();
    let mut cmd = match setpriv {
        Some(arg) => {
            let mut cmd = std::process::Command::new("setpriv");
            cmd.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                arg,
                "--",
            ])
            .arg(bin("drover-agent"));
            cmd
        }
        None => {
            let mut cmd = std::process::Command::new(bin("drover-agent"));
            cmd.uid(65534).gid(65534);
            cmd
        }
    };
    c.agent_args(
        &mut cmd,
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string()],
    );
    let agent = Proc::spawn("agent agent-1", cmd, c.log_path("agent-agent-1"));
    connect(c, addr);
    agent
}

#[test]
fn an_agent_that_is_not_root_refuses_a_node_of_another_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: starting an agent as nobody needs root");
        return;
    }
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = nobody_agent(&c, addr, None);
    let (code, v, _) = deploy(
        &c,
        addr,
        "[nodes.rooted]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nuser = \"root\"\n\n[nodes.own]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nuser = \"nobody\"\nlimits = { nofile = 100 }\n",
    );
    assert_eq!(code, Some(1), "{v}");
    let want = "node 'rooted' asks for user 'root', but the agent runs as uid 65534 without \
                CAP_SETUID and CAP_SETGID: run the agent as root to run nodes as other users";
    let reply = v["results"]["nodes"]["rooted"]["stderr"]
        .as_str()
        .unwrap_or_default();
    assert!(reply.contains(want), "{v}");
    let s = node_status(&c, addr, "rooted");
    assert_eq!(s["state"], "FAILED", "{s}");
    assert!(s["pid"].is_null(), "nothing ran: {s}");
    // Its own user needs no switch: that node runs, with its limit.
    let own = node_status(&c, addr, "own");
    assert_eq!(own["state"], "RUNNING", "{own}");
    let pid = own["pid"].as_u64().unwrap();
    assert_eq!(status(pid, "Uid:"), "65534\t65534\t65534\t65534");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 100 ")),
        "{limits}"
    );
}

/// An agent that is not root and whose bounding set is already what a node lists
/// (here: nothing) runs that node: there is nothing to cut, so no CAP_SETPCAP is needed.
#[test]
fn a_node_listing_the_agents_own_bounding_set_runs_under_an_agent_that_cannot_cut_it() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: starting an agent as nobody needs root");
        return;
    }
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = nobody_agent(&c, addr, Some("--bounding-set=-all"));
    let (code, v, stderr) = deploy(
        &c,
        addr,
        "[nodes.bare]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\ncapabilities = []\n",
    );
    assert_eq!(code, Some(0), "{v} {stderr}");
    let s = node_status(&c, addr, "bare");
    assert_eq!(s["state"], "RUNNING", "{s}");
    let pid = s["pid"].as_u64().unwrap();
    assert_eq!(hex(pid, "CapBnd:"), 0);
    assert_eq!(hex(pid, "CapEff:"), 0);
}

/// A start that fails before its program runs (its user does not exist) answers with
/// the reason, and with no output: the earlier process's lines are not its.
#[test]
fn a_start_that_never_ran_returns_no_earlier_output() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: running nodes as other users needs a root agent");
        return;
    }
    let (c, _ctl, addr, _agent) = root_cluster();
    let node = |user: &str| {
        format!(
            "[nodes.prev]\ninstance = \"agent-1\"\ncommand = [\"/bin/sh\", \"-c\", \
             \"echo OLD-PROCESS-LINE; echo OLD-ERR-LINE >&2; exec sleep 1000\"]\n{user}"
        )
    };
    let (code, v, stderr) = deploy(&c, addr, &node(""));
    assert_eq!(code, Some(0), "{v} {stderr}");
    eventually("prev's lines in its logs", PATIENCE, || {
        let out = c.drover(addr, &["logs", "prev", "-n", "5"]);
        out.stdout.contains("OLD-PROCESS-LINE").then_some(())
    });
    let (code, v, stderr) = deploy(&c, addr, &node("user = \"drvnosuchuser\"\n"));
    assert_eq!(code, Some(1), "{v}");
    let n = &v["results"]["nodes"]["prev"];
    assert_eq!(n["success"], false, "{v}");
    let all = format!("{v} {stderr}");
    assert!(
        !all.contains("OLD-PROCESS-LINE") && !all.contains("OLD-ERR-LINE"),
        "{all}"
    );
    assert!(
        n["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("drvnosuchuser")),
        "{v}"
    );
    // As zeek-client's, restart exits 0 with the node's result false.
    let out = c.drover(addr, &["restart", "prev"]);
    assert_eq!(out.json()["results"]["prev"], false, "{}", out.stdout);
    assert!(out.stderr.contains("drvnosuchuser"), "{}", out.stderr);
    assert!(!out.stderr.contains("OLD-PROCESS-LINE"), "{}", out.stderr);
}

/// Removes the user it names when dropped (`-f`: its processes may still be ending).
struct TempUser(String);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .arg("-f")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Adds system user `name`, trying again while another test holds the user database.
fn add_user(name: &str) {
    eventually(&format!("useradd {name}"), PATIENCE, || {
        std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(name)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
            .then_some(())
    });
}

/// A node that failed for want of its user is looked up again by an operator's
/// restart once the user exists, and by the next deploy after the agent itself was
/// restarted meanwhile (which the node's record tells the new agent process).
#[test]
fn a_node_that_failed_for_want_of_its_user_starts_on_restart_and_after_an_agent_restart() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: adding a user needs root");
        return;
    }
    let pid = std::process::id();
    let (first, second) = (format!("drvre{pid}"), format!("drvdp{pid}"));
    let _users = (TempUser(first.clone()), TempUser(second.clone()));
    let (c, _ctl, addr, mut agent) = root_cluster();
    let body = format!(
        "[nodes.first]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nuser = \"{first}\"\n\
         [nodes.second]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nuser = \"{second}\"\n"
    );
    let (code, v, _) = deploy(&c, addr, &body);
    assert_eq!(code, Some(1), "{v}");
    for node in ["first", "second"] {
        assert_eq!(node_status(&c, addr, node)["state"], "FAILED");
    }
    add_user(&first);
    let out = c.drover(addr, &["restart", "first"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(node_status(&c, addr, "first")["state"], "RUNNING");

    agent.kill();
    add_user(&second);
    let _agent = c.start_agent("agent-1", addr);
    connect(&c, addr);
    eventually("the new agent reports", PATIENCE, || {
        (node_status(&c, addr, "second")["state"] == "FAILED").then_some(())
    });
    let (code, v, stderr) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v} {stderr}");
    let s = node_status(&c, addr, "second");
    assert_eq!(s["state"], "RUNNING", "{s}");
    let uid = nix::unistd::User::from_name(&second).unwrap().unwrap().uid;
    let pid = s["pid"].as_u64().unwrap();
    assert_eq!(status(pid, "Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
}

/// A node that ran as a user of its own, removed and deployed again under its name
/// without a user, runs as the agent: its directory is taken back though it holds no
/// notify socket or working directory yet.
#[test]
fn a_node_deployed_again_without_its_user_runs_as_the_agent() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: running nodes as other users needs a root agent");
        return;
    }
    let (c, _ctl, addr, _agent) = root_cluster();
    let node = |user: &str| {
        format!("[nodes.re]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\n{user}")
    };
    let (code, v, _) = deploy(&c, addr, &node("user = \"nobody\"\n"));
    assert_eq!(code, Some(0), "{v}");
    let (code, v, _) = deploy(&c, addr, "");
    assert_eq!(code, Some(0), "{v}");
    let (code, v, stderr) = deploy(&c, addr, &node(""));
    assert_eq!(code, Some(0), "{v} {stderr}");
    let s = node_status(&c, addr, "re");
    assert_eq!(s["state"], "RUNNING", "{s}");
    assert!(status(s["pid"].as_u64().unwrap(), "Uid:").starts_with("0\t"));
    // Straight from its own user to the agent's with no capability at all (so without
    // CAP_DAC_OVERRIDE): its working directory is taken back, or it could not enter it.
    let (code, v, _) = deploy(&c, addr, &node("user = \"nobody\"\n"));
    assert_eq!(code, Some(0), "{v}");
    let (code, v, stderr) = deploy(&c, addr, &node("capabilities = []\n"));
    assert_eq!(code, Some(0), "{v} {stderr}");
    let s = node_status(&c, addr, "re");
    assert_eq!(s["state"], "RUNNING", "{s}");
    assert!(status(s["pid"].as_u64().unwrap(), "Uid:").starts_with("0\t"));
}

#[test]
fn a_user_created_after_a_failed_deploy_is_found_by_the_next_deploy() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: adding a user needs root");
        return;
    }
    let name = format!("drvtest{}", std::process::id());
    // Declared first, so dropped last: after the agent and its nodes.
    let _user = TempUser(name.clone());
    let (c, _ctl, addr, _agent) = root_cluster();
    let body = format!(
        "[nodes.late]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nuser = \"{name}\"\n"
    );
    let (code, v, _) = deploy(&c, addr, &body);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(node_status(&c, addr, "late")["state"], "FAILED");
    // Deployed again while the user is still missing: the deploy says so.
    let (code, v, _) = deploy(&c, addr, &body);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["results"]["nodes"]["late"]["success"], false, "{v}");
    // One that never gives up is CRASHED between its attempts: the deploy says so too.
    let looping = format!(
        "[nodes.looping]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\n\
         user = \"{name}x\"\nmax_failed_starts = 0\nbackoff = {{ initial = \"1h\" }}\n"
    );
    let (code, v, _) = deploy(&c, addr, &format!("{body}{looping}"));
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(node_status(&c, addr, "looping")["state"], "CRASHED");
    let (code, v, _) = deploy(&c, addr, &format!("{body}{looping}"));
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["results"]["nodes"]["looping"]["success"], false, "{v}");
    let (code, v, _) = deploy(&c, addr, &body);
    assert_eq!(code, Some(1), "{v}");
    add_user(&name);
    // The same configuration again: the node is unchanged, but its user now exists.
    let (code, v, stderr) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v} {stderr}");
    let s = node_status(&c, addr, "late");
    assert_eq!(s["state"], "RUNNING", "{s}");
    let pid = s["pid"].as_u64().unwrap();
    let uid = nix::unistd::User::from_name(&name).unwrap().unwrap().uid;
    assert_eq!(status(pid, "Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
}

/// A node's `files` (a Zeek node's cluster layout) are written with its user's rights:
/// they are its own, and a working directory it may not write gets none, its start
/// failing with the reason, instead of a file of root's.
#[test]
fn a_nodes_files_are_written_with_its_users_rights() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: running nodes as other users needs a root agent");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (c, _ctl, addr, _agent) = root_cluster();
    let open = c.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::os::unix::fs::chown(&open, Some(65534), Some(65534)).unwrap();
    let shut = c.dir.path().join("shut");
    std::fs::create_dir(&shut).unwrap();
    std::fs::set_permissions(&shut, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manager = |workdir: &std::path::Path| {
        format!(
            "[nodes.mgr]\ninstance = \"agent-1\"\nrole = \"manager\"\ncommand = [\"{}\"]\n\
             user = \"65534\"\ngroup = \"65534\"\nworkdir = \"{}\"\n",
            bin("drover-testprog").display(),
            workdir.display()
        )
    };
    let (code, v, stderr) = deploy(&c, addr, &manager(&open));
    assert_eq!(code, Some(0), "{v} {stderr}");
    let layout = std::fs::metadata(open.join("cluster-layout.zeek")).unwrap();
    assert_eq!(
        (layout.uid(), layout.gid()),
        (65534, 65534),
        "the node's file"
    );

    let (code, v, stderr) = deploy(&c, addr, &manager(&shut));
    assert_ne!(code, Some(0), "{v} {stderr}");
    let said = format!("{v} {stderr}");
    assert!(
        said.contains(&format!(
            "cannot write {}: permission denied",
            shut.join("cluster-layout.zeek").display()
        )),
        "{said}"
    );
    assert!(
        !shut.join("cluster-layout.zeek").exists()
            && !shut.join(".cluster-layout.zeek.drover-tmp").exists(),
        "nothing of root's in a directory the node may not write"
    );
    let last_error = node_status(&c, addr, "mgr")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(last_error.contains("permission denied"), "{last_error}");
}

/// A hard limit above the agent's own is refused by the deploy, naming both, where the
/// agent cannot raise it (root without `CAP_SYS_RESOURCE`, as in many containers):
/// not left to fail every start at exec.
#[test]
fn a_hard_limit_the_agent_cannot_raise_is_refused_by_the_deploy() {
    let eff = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        .unwrap()
        .1;
    if eff & (1 << 24) != 0 || hard == nix::sys::resource::RLIM_INFINITY {
        eprintln!("skipped: this agent may raise its memlock limit");
        return;
    }
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    connect(&c, addr);
    let (code, v, stderr) = deploy(
        &c,
        addr,
        &format!(
            "[nodes.locked]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nlimits = {{ memlock = \"unlimited\" }}\n",
            bin("drover-testprog").display()
        ),
    );
    assert_ne!(code, Some(0), "{v}");
    let said = format!("{v} {stderr}");
    assert!(
        said.contains(&format!(
            "node 'locked' asks for limit memlock up to unlimited, above the agent's own hard limit {hard}"
        )),
        "{said}"
    );
    assert!(
        node_status(&c, addr, "locked")["pid"].is_null(),
        "nothing ran"
    );
}
