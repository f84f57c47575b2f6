//! A node's logs stay within `(log_keep + 1) x log_max_bytes` at any write rate: the
//! log keeper is the only writer of the files and rotates before a write would pass the
//! bound, so every sample of a node writing flat out is within it, and nothing is
//! dropped (a node faster than the disk blocks on its full pipe instead).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use drover_tests::disk::{Mounted, fill};
use drover_tests::nodelogs::stdout_bytes;
use drover_tests::{Cluster, PATIENCE, bin, eventually, eventually_or_none};

const MAX_BYTES: u64 = 64 * 1024;
const KEEP: u64 = 2;
/// What the keeper reads from a pipe at once.
const CHUNK: u64 = 64 * 1024;

/// A series' value on the agent's metrics page; `None` also while the page does not
/// answer yet (an agent just started).
fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The stdout files of a node, oldest first.
fn stdout_text(dir: &Path) -> String {
    let mut text = String::new();
    for name in ["stdout.log.2", "stdout.log.1", "stdout.log"] {
        text.push_str(&std::fs::read_to_string(dir.join(name)).unwrap_or_default());
    }
    text
}

/// The sequence numbers of testprog's lines; panics on any other line.
fn seqs(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| {
            l.rsplit_once(" line ")
                .filter(|(head, _)| head.starts_with("testprog "))
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or_else(|| panic!("torn or foreign line {l:?}"))
        })
        .collect()
}

/// Every line once, in order, none missing.
fn assert_contiguous(what: &str, seqs: &[u64]) {
    let bad = seqs.windows(2).position(|w| w[1] != w[0] + 1);
    assert!(
        bad.is_none(),
        "{what}: lost, repeated or out of order at {:?}",
        bad.map(|i| &seqs[i..i + 2])
    );
}

/// Deploys to agent `a1` nodes running testprog writing stdout lines at their rates
/// (a second), once the agent has connected.
fn deploy_writers(c: &Cluster, addr: SocketAddr, nodes: &[(&str, u64)]) {
    let prog = bin("drover-testprog").display().to_string();
    let mut text =
        "[instances.a1]\n[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n"
            .to_owned();
    for (name, rate) in nodes {
        text.push_str(&format!(
            "[nodes.{name}]\ninstance = \"a1\"\ncommand = [\"{prog}\", \"--stdout-rate\", \"{rate}\"]\n"
        ));
    }
    c.deploy_text(addr, "writers.toml", &text);
}

#[test]
fn logs_stay_bounded_at_any_write_rate() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (agent, metrics) = c.start_agent_with_metrics(
        "a1",
        addr,
        &[
            "--log-max-bytes",
            &MAX_BYTES.to_string(),
            "--log-keep",
            &KEEP.to_string(),
        ],
    );
    deploy_writers(&c, addr, &[("fast", 1_000_000_000), ("steady", 2000)]);
    let nodes = c.dir.path().join("agent-a1/nodes");
    let (fast, steady) = (nodes.join("fast"), nodes.join("steady"));
    eventually("the fast writer rotated", PATIENCE, || {
        fast.join("stdout.log.2").exists().then_some(())
    });

    // Every sample of the flat-out writer's files is within the bound: the keeper
    // rotates before a write would pass it, however far behind it falls.
    let bound = (KEEP + 1) * MAX_BYTES + CHUNK;
    let started = Instant::now();
    let (mut samples, mut peak) = (0u64, 0);
    while started.elapsed() < Duration::from_secs(4) {
        let bytes = stdout_bytes(&fast);
        peak = peak.max(bytes);
        samples += 1;
        assert!(
            bytes <= bound,
            "sample {samples}: {bytes} bytes, bound {bound}"
        );
        // A sampling rate, not a wait: a busy sampler would take a core from the keeper.
        std::thread::sleep(Duration::from_micros(500));
    }
    eprintln!("{samples} samples, peak {peak} bytes, bound {bound}");
    let keeper =
        std::fs::read_to_string(c.dir.path().join("agent-a1/log-keeper.log")).unwrap_or_default();
    assert!(keeper.contains("log keeper started"), "{keeper}");

    // Stopped, the files are still: nothing was dropped, no line torn, the kept lines
    // are the newest ones without a gap.
    let out = c.drover(addr, &["stop", "fast", "steady"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let fast_seqs = seqs(&stdout_text(&fast));
    assert!(fast_seqs.len() > 1000, "{} lines kept", fast_seqs.len());
    assert_contiguous("fast", &fast_seqs);
    assert!(stdout_bytes(&fast) <= (KEEP + 1) * MAX_BYTES);
    for node in ["fast", "steady"] {
        assert_eq!(
            metric(
                metrics,
                &format!(
                    "drover_agent_log_dropped_bytes_total{{node=\"{node}\",stream=\"stdout\"}}"
                )
            ),
            Some(0.0)
        );
    }

    // The ordinary writer rotated too, and its kept lines are as whole and complete.
    assert!(steady.join("stdout.log.1").exists(), "steady never rotated");
    let steady_seqs = seqs(&stdout_text(&steady));
    assert!(steady_seqs.len() > 1000);
    assert_contiguous("steady", &steady_seqs);
    assert!(stdout_bytes(&steady) <= (KEEP + 1) * MAX_BYTES);
    drop(agent);
}

/// The pid of `node` if get-nodes shows it RUNNING.
fn running_pid(c: &Cluster, addr: SocketAddr, node: &str) -> Option<i32> {
    let out = c.drover(addr, &["get-nodes"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    v["results"].as_object()?.values().find_map(|nodes| {
        let n = &nodes[node];
        (n["state"] == "RUNNING").then(|| i32::try_from(n["pid"].as_i64()?).ok())?
    })
}

/// A node started by an agent whose log keeper could not start writes its log files
/// itself. The next agent, with a keeper, adopts it: its files are still held to their
/// bound (by the agent's log watcher, which watches only such nodes).
#[test]
fn a_node_adopted_from_an_agent_without_a_keeper_stays_bounded() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "a1");
    let state = c.dir.path().join("agent-a1");
    // A directory where the keeper's log goes: the first agent cannot start a keeper.
    let blocker = state.join("log-keeper.log");
    std::fs::create_dir_all(&blocker).unwrap();
    let limits = [
        "--controller".to_owned(),
        addr.to_string(),
        "--log-max-bytes".to_owned(),
        MAX_BYTES.to_string(),
        "--log-keep".to_owned(),
        KEEP.to_string(),
    ];
    let limits: Vec<&str> = limits.iter().map(String::as_str).collect();
    let mut first = c.start_agent_args("a1", "a1", &limits);
    first.wait_log("cannot start the log keeper");
    deploy_writers(&c, addr, &[("direct", 2000)]);
    let dir = state.join("nodes/direct");
    let rotated = || std::fs::metadata(dir.join("stdout.log.1")).and_then(|m| m.modified());
    eventually("the node's own files rotated", PATIENCE, || rotated().ok());
    let fd1 = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    let pid = eventually("the node running", PATIENCE, || {
        running_pid(&c, addr, "direct")
    });
    assert!(fd1(pid).ends_with("stdout.log"), "{:?}", fd1(pid));

    first.kill();
    std::fs::remove_dir(&blocker).unwrap();
    let second = c.start_agent_args("a1", "a1", &limits);
    second.wait_log("log keeper connected");
    eventually("the node adopted", PATIENCE, || {
        (running_pid(&c, addr, "direct") == Some(pid)).then_some(())
    });
    // Rotated again by the new agent, and within the bound all along.
    let before = rotated().unwrap();
    eventually("rotated by the new agent", PATIENCE, || {
        (rotated().ok()? > before).then_some(())
    });
    let bound = (KEEP + 1) * MAX_BYTES + CHUNK;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let bytes = stdout_bytes(&dir);
        assert!(bytes <= bound, "{bytes} bytes, bound {bound}");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(fd1(pid).ends_with("stdout.log"), "still its own writer");
}

/// A node's log on a full disk: its output is lost, not held (the node runs on), the
/// agent warns and shows it in its metrics, and once there is room again the files say
/// where and how much is missing, on a line of its own, every other line whole.
#[test]
fn output_lost_to_a_full_disk_is_marked_counted_and_warned_of() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let state = c.dir.path().join("agent-a1");
    let _mount = Mounted::tmpfs(&state, "2m");
    let (agent, metrics) =
        c.start_agent_with_metrics("a1", addr, &["--log-max-bytes", "64K", "--log-keep", "2"]);
    deploy_writers(&c, addr, &[("steady", 200), ("brief", 200)]);
    let dir = state.join("nodes/steady");
    eventually("the node wrote lines", PATIENCE, || {
        (stdout_bytes(&dir) > 1000).then_some(())
    });
    let pid = running_pid(&c, addr, "steady").expect("steady runs");

    let filler = fill(&state);
    let failing = "drover_agent_log_write_failing{node=\"steady\",stream=\"stdout\"}";
    let lost = "drover_agent_log_lost_bytes_total{node=\"steady\",stream=\"stdout\"}";
    eventually("the agent shows the writes failing", PATIENCE, || {
        (metric(metrics, failing) == Some(1.0)).then_some(())
    });
    eventually("the agent warned", PATIENCE, || {
        agent
            .log_text()
            .contains("the log keeper cannot write its stdout.log")
            .then_some(())
    });
    assert_eq!(metric(metrics, lost), Some(0.0));

    // A node stopped meanwhile: its loss ends with it, counted, and it is not shown as
    // failing for good. The stop itself works on the full disk.
    let brief_failing = "drover_agent_log_write_failing{node=\"brief\",stream=\"stdout\"}";
    let brief_lost = "drover_agent_log_lost_bytes_total{node=\"brief\",stream=\"stdout\"}";
    eventually("brief's writes fail too", PATIENCE, || {
        (metric(metrics, brief_failing) == Some(1.0)).then_some(())
    });
    let out = c.drover(addr, &["stop", "brief"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    eventually("brief's loss ended with it", PATIENCE, || {
        (metric(metrics, brief_failing) == Some(0.0)).then_some(())
    });
    assert!(metric(metrics, brief_lost).unwrap() > 0.0);
    assert_eq!(metric(metrics, failing), Some(1.0), "steady still fails");
    // The keeper's own log is on the full disk too: its lines are lost, not the keeper.
    assert_eq!(
        metric(metrics, "drover_agent_log_keeper_restarts_total"),
        Some(0.0)
    );
    assert_eq!(metric(metrics, "drover_agent_log_keeper_up"), Some(1.0));

    // An agent killed and started again meanwhile, on the full disk, adopts the node and
    // learns of the loss under way from the keeper.
    drop(agent);
    let (agent, metrics) =
        c.start_agent_with_metrics("a1", addr, &["--log-max-bytes", "64K", "--log-keep", "2"]);
    let shown = eventually_or_none(PATIENCE, || {
        (metric(metrics, failing) == Some(1.0)).then_some(())
    });
    assert!(
        shown.is_some(),
        "the new agent does not show the writes failing ({:?}); its log:\n{}\nthe keeper's:\n{}",
        metric(metrics, failing),
        agent.log_text(),
        std::fs::read_to_string(state.join("log-keeper.log")).unwrap_or_default()
    );
    eventually("the new agent adopted the node", PATIENCE, || {
        (running_pid(&c, addr, "steady") == Some(pid)).then_some(())
    });

    // Room again: the next write says what was lost, and the agent counts it.
    std::fs::remove_file(&filler).unwrap();
    eventually("writes succeed again", PATIENCE, || {
        (metric(metrics, failing) == Some(0.0)).then_some(())
    });
    let lost_bytes = metric(metrics, lost).unwrap();
    assert!(lost_bytes > 0.0, "{lost_bytes} bytes counted lost");
    assert!(
        agent.log_text().contains("stdout.log is written again"),
        "{}",
        agent.log_text()
    );
    let marker = eventually("the marker and lines after it", PATIENCE, || {
        let text = stdout_text(&dir);
        let (before, after) = text.split_once("[drover: ")?;
        let (marker, rest) = after.split_once('\n')?;
        (rest.lines().count() > 10).then(|| (before.to_owned(), marker.to_owned(), rest.to_owned()))
    });
    assert_eq!(
        running_pid(&c, addr, "steady"),
        Some(pid),
        "the node ran on"
    );
    let (before, marker, after) = marker;
    assert!(
        marker.ends_with("bytes of output lost: cannot write the log file: No space left on device (os error 28)]"),
        "{marker}"
    );
    let counted: f64 = marker.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(counted, lost_bytes, "the marker and the metric agree");
    // Every other line is whole (`seqs` panics on a torn one); the numbers go on after
    // a gap.
    let (before, after) = (seqs(&before), seqs(&after));
    assert!(!before.is_empty());
    assert_contiguous("after the loss", &after);
    assert!(
        after[0] > before[before.len() - 1] + 1,
        "a gap at the marker: {} then {}",
        before[before.len() - 1],
        after[0]
    );
    drop(agent);
    drop(ctl);
}
