//! The log keeper survives the agent and the agent survives the keeper: a node writing
//! flat out keeps running and logging, within its bound, when either is SIGKILLed; and
//! a follower sees every line of a node across rotations; a failed process's outputs in
//! a reply are its own; lines of nodes writing at once stay whole and apart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use drover_tests::nodelogs::Sampler;
use drover_tests::{Cluster, PATIENCE, Proc, alive, bin, eventually};

const MAX_BYTES: u64 = 64 * 1024;
const KEEP: u64 = 2;
/// What the keeper reads from a pipe at once.
const CHUNK: u64 = 64 * 1024;
const BOUND: u64 = (KEEP + 1) * MAX_BYTES + CHUNK;

fn agent(c: &Cluster, addr: SocketAddr) -> Proc {
    agent_from(c, addr, std::process::Command::new(bin("drover-agent")))
}

/// Agent `a1` run by `cmd`, with small log files.
fn agent_from(c: &Cluster, addr: SocketAddr, cmd: std::process::Command) -> Proc {
    if !c.pki_file("a1.crt").exists() {
        c.issue(drover_proto::msg::PeerRole::Agent, "a1");
    }
    c.start_agent_cmd(
        cmd,
        "a1",
        "a1",
        &[
            "--controller",
            &addr.to_string(),
            "--log-max-bytes",
            &MAX_BYTES.to_string(),
            "--log-keep",
            &KEEP.to_string(),
        ],
    )
}

/// Deploys one node `name` running testprog writing `rate` lines a second; returns its
/// directory.
fn deploy(c: &Cluster, addr: SocketAddr, name: &str, rate: u64) -> PathBuf {
    let prog = bin("drover-testprog").display().to_string();
    c.deploy_text(addr, "writer.toml", &format!(
            "[instances.a1]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             [nodes.{name}]\ninstance = \"a1\"\ncommand = [\"{prog}\", \"--stdout-rate\", \"{rate}\"]\n"
        ));
    c.dir.path().join("agent-a1/nodes").join(name)
}

/// The last line number in the node's current stdout file.
fn last_seq(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("stdout.log")).ok()?;
    text.lines().last()?.rsplit(' ').next()?.parse().ok()
}

/// Waits until the node wrote past line `after`; returns the line reached.
fn lines_arrive(what: &str, dir: &Path, after: u64) -> u64 {
    eventually(what, PATIENCE, || last_seq(dir).filter(|&s| s > after))
}

fn node_pid(dir: &Path) -> i32 {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("record.json")).unwrap()).unwrap();
    i32::try_from(record["process"]["pid"].as_i64().unwrap()).unwrap()
}

/// The pid of the keeper of `state_dir`.
fn keeper_pid(state_dir: &Path) -> Option<i32> {
    let state_dir = std::fs::canonicalize(state_dir).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        (args.get(1) == Some(&&b"log-keeper"[..])
            && args.get(2) == Some(&state_dir.as_os_str().as_encoded_bytes())
            && alive(pid))
        .then_some(pid)
    })
}

fn kill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// A node writing flat out, its files rotated twice already: its directory, its pid,
/// its keeper's pid, and a sampler of its stdout files.
struct FlatOut {
    dir: PathBuf,
    state: PathBuf,
    pid: i32,
    keeper: i32,
    sampler: Sampler,
}

impl FlatOut {
    fn deploy(c: &Cluster, addr: SocketAddr) -> Self {
        let dir = deploy(c, addr, "fast", 1_000_000_000);
        let state = c.dir.path().join("agent-a1");
        eventually("rotated", PATIENCE, || {
            dir.join("stdout.log.2").exists().then_some(())
        });
        let pid = node_pid(&dir);
        let keeper = keeper_pid(&state).expect("a keeper runs");
        let sampler = Sampler::start(dir.clone());
        Self {
            dir,
            state,
            pid,
            keeper,
            sampler,
        }
    }

    /// SIGKILLs its keeper and waits for `agent` to start another and for lines to
    /// arrive through it, the node alive all along; the new keeper's pid.
    fn keeper_killed_and_replaced(&self, agent: &Proc) -> i32 {
        kill(self.keeper);
        agent.wait_log("log keeper connected again pipes=2");
        let replacement = eventually("another keeper", PATIENCE, || {
            keeper_pid(&self.state).filter(|&k| k != self.keeper)
        });
        let seq = last_seq(&self.dir).unwrap_or(0);
        lines_arrive("lines arrive through the new keeper", &self.dir, seq);
        assert!(alive(self.pid), "the node died with the keeper");
        replacement
    }

    /// Its files stayed within their bound all along.
    fn check_bound(self) {
        let (peak, samples) = self.sampler.finish();
        eprintln!("peak {peak} bytes over {samples} samples, bound {BOUND}");
        assert!(peak <= BOUND, "peak {peak} bytes, bound {BOUND}");
    }
}

#[test]
fn a_node_writing_flat_out_outlives_a_killed_agent_and_keeps_logging() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut first = agent(&c, addr);
    let n = FlatOut::deploy(&c, addr);
    let (dir, state, pid, keeper) = (&n.dir, &n.state, n.pid, n.keeper);

    first.kill();
    let seq = last_seq(dir).unwrap_or(0);
    let seq = lines_arrive("lines arrive with no agent", dir, seq);
    assert!(alive(pid), "the node died with the agent");
    assert_eq!(keeper_pid(state), Some(keeper), "the keeper carries on");

    let second = agent(&c, addr);
    second.wait_log("log keeper connected pipes=2");
    lines_arrive("lines arrive after the restart", dir, seq);
    assert!(alive(pid), "the node died");
    assert_eq!(node_pid(dir), pid, "adopted, not restarted");
    assert_eq!(keeper_pid(state), Some(keeper), "the same keeper");
    n.check_bound();
}

/// A node writing as fast as the keeper can read (`yes`) takes turns with the others:
/// a quiet node beside it keeps logging, and a new agent gets the keeper's answer
/// at once, not after giving up on it. Its lines are 16 bytes, so that every read of
/// the keeper ends at a line's end and no partial line is held.
#[test]
fn a_node_writing_flat_out_does_not_starve_its_neighbours_or_the_agent() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "a1");
    // The smallest files: the keeper works hardest for each byte, and a node writing
    // flat out has always more for it.
    let agent = || {
        let args = [
            "--controller",
            &addr.to_string(),
            "--log-max-bytes",
            "4K",
            "--log-keep",
            "0",
        ];
        c.start_agent_cmd(
            std::process::Command::new(bin("drover-agent")),
            "a1",
            "a1",
            &args,
        )
    };
    let mut first = agent();
    let prog = bin("drover-testprog").display().to_string();
    c.deploy_text(
        addr,
        "two.toml",
        &format!(
            "[instances.a1]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             [nodes.flood]\ninstance = \"a1\"\ncommand = [\"/usr/bin/yes\", \"a line of flood\"]\n\
             [nodes.steady]\ninstance = \"a1\"\ncommand = [\"{prog}\", \"--stdout-rate\", \"100\"]\n"
        ),
    );
    let state = c.dir.path().join("agent-a1");
    let (flood, steady) = (state.join("nodes/flood"), state.join("nodes/steady"));
    eventually("the flood logged", PATIENCE, || {
        std::fs::metadata(flood.join("stdout.log"))
            .is_ok_and(|m| m.len() > 0)
            .then_some(())
    });
    // A second of the steady node's lines, while the flood goes on.
    let seq = lines_arrive("the steady node's lines", &steady, 0);
    lines_arrive("more of the steady node's lines", &steady, seq + 100);

    first.kill();
    let second = agent();
    second.wait_log("log keeper connected pipes=4");
    assert!(
        !second.log_text().contains("did not answer"),
        "{}",
        second.log_text()
    );
    let seq = last_seq(&steady).unwrap_or(0);
    lines_arrive(
        "the steady node's lines after the restart",
        &steady,
        seq + 100,
    );
}

#[test]
fn a_killed_keeper_is_replaced_and_its_nodes_keep_logging() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = agent(&c, addr);
    let n = FlatOut::deploy(&c, addr);
    let replacement = n.keeper_killed_and_replaced(&agent);
    assert_eq!(node_pid(&n.dir), n.pid, "not restarted");
    assert_eq!(keeper_pid(&n.state), Some(replacement));
    n.check_bound();
}

#[test]
fn a_keeper_is_replaced_after_the_agent_binary_was_replaced_on_disk() {
    // As a package upgrade does while the agent runs: the file it runs is unlinked and
    // another put at its path (here: none).
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let copy = c.dir.path().join("drover-agent");
    std::fs::copy(bin("drover-agent"), &copy).unwrap();
    let agent = agent_from(&c, addr, std::process::Command::new(&copy));
    let n = FlatOut::deploy(&c, addr);
    std::fs::remove_file(&copy).unwrap();

    let replacement = n.keeper_killed_and_replaced(&agent);
    // It carries a name of its own, not /proc/self/exe's.
    let comm = std::fs::read_to_string(format!("/proc/{replacement}/comm")).unwrap();
    assert_eq!(comm.trim(), "log-keeper");
    n.check_bound();
}

#[test]
fn a_follower_sees_every_line_across_rotations() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = agent(&c, addr);
    // About 45 bytes a line: a rotation every 0.7 seconds.
    let dir = deploy(&c, addr, "steady", 2000);
    eventually("it writes", PATIENCE, || last_seq(&dir));

    let (mut child, rx) = c.follow_stdout(addr, "steady");
    eventually("a first rotation", PATIENCE, || {
        dir.join("stdout.log.1").exists().then_some(())
    });
    let rotated_before = std::fs::metadata(dir.join("stdout.log.1"))
        .unwrap()
        .ino_of();
    let mut seqs: Vec<u64> = Vec::new();
    let mut rotations = 0;
    let mut last_rotated = rotated_before;
    while rotations < 4 {
        let line = rx
            .recv_timeout(PATIENCE)
            .expect("followed lines keep coming");
        let seq: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("torn line {line:?}"));
        seqs.push(seq);
        if let Ok(m) = std::fs::metadata(dir.join("stdout.log.1"))
            && m.ino_of() != last_rotated
        {
            last_rotated = m.ino_of();
            rotations += 1;
        }
    }
    child.kill().unwrap();
    let _ = child.wait();
    eprintln!("{} lines followed across {rotations} rotations", seqs.len());
    let bad = seqs.windows(2).position(|w| w[1] != w[0] + 1);
    assert!(
        bad.is_none(),
        "lost, repeated or out of order at {:?}",
        bad.map(|i| &seqs[i..i + 2])
    );
}

trait Ino {
    fn ino_of(&self) -> u64;
}

impl Ino for std::fs::Metadata {
    fn ino_of(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(self)
    }
}

/// The outputs of a node that failed, in the deploy's reply, are what its failed
/// process wrote last: all of it (its last lines may still be in its pipes when its
/// exit is seen), and none of what the node's earlier process wrote to the same log
/// files, nor what its next one, started a millisecond later, writes there.
#[test]
fn a_failed_process_outputs_are_its_own_and_not_its_successors() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = agent(&c, addr);
    c.wait_for_agent(addr, "a1");
    let deploy = |script: &str, extra: &str| {
        let text = format!(
            "[instances.a1]\n[nodes.looping]\ninstance = \"a1\"\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\n{extra}"
        );
        let file = c.dir.path().join("looping.toml");
        std::fs::write(&file, text).unwrap();
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
    };
    let out = deploy(
        "echo old-$$; echo old-err-$$ >&2; exec sleep 1000",
        "readiness = { kind = \"start-period\", period = \"0s\" }\n",
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = deploy(
        "echo out-$$; echo err-$$ >&2; exit 1",
        "backoff = { initial = \"1ms\", multiplier = 1.0 }\nmax_failed_starts = 1000\n",
    );
    assert_eq!(out.code, Some(1), "{} {}", out.stdout, out.stderr);
    let v = out.json();
    let n = &v["results"]["nodes"]["looping"];
    assert_eq!(n["success"], false, "{v}");
    let stdout = n["stdout"].as_str().unwrap();
    let stderr = n["stderr"].as_str().unwrap();
    let pid = stdout
        .strip_prefix("out-")
        .filter(|p| p.parse::<u32>().is_ok())
        .unwrap_or_else(|| panic!("one line of one process expected: {n}"));
    assert_eq!(
        stderr,
        format!("err-{pid}"),
        "the same process's stderr: {n}"
    );
    // The log files have the other processes' lines.
    let log = c.dir.path().join("agent-a1/nodes/looping/stdout.log");
    eventually(
        "the earlier and a later process's lines in the log",
        PATIENCE,
        || {
            std::fs::read_to_string(&log).ok().filter(|log| {
                log.lines().any(|l| l.starts_with("old-"))
                    && log.lines().any(|l| l.starts_with("out-") && l != stdout)
            })
        },
    );
}

#[test]
fn an_agent_with_no_keeper_running_starts_exactly_one() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    // Several at once, so that each keeper takes a while to listen.
    let names = ["k1", "k2", "k3", "k4"];
    let agents: Vec<Proc> = names
        .iter()
        .map(|name| {
            c.issue(drover_proto::msg::PeerRole::Agent, name);
            c.start_agent(name, addr)
        })
        .collect();
    for (name, agent) in names.iter().zip(&agents) {
        agent.wait_log("log keeper connected pipes=0");
        let state = c.dir.path().join(format!("agent-{name}"));
        let keeper = eventually("the keeper", PATIENCE, || keeper_pid(&state));
        assert!(alive(keeper));
        // A second keeper would find the lock taken and leave, but only after a spawn
        // that costs as much as the first.
        assert_eq!(
            agent.log_text().matches("started a log keeper").count(),
            1,
            "{name}"
        );
    }
}

/// The keeper reads every pipe into one buffer: lines of nodes writing at once each go
/// whole, in order, to their own node's file only; a line written in two parts is one
/// line; and a last line without its end is written once it has waited.
#[test]
fn lines_of_nodes_writing_at_once_stay_whole_and_apart_and_a_partial_line_is_kept() {
    const WRITERS: usize = 4;
    // Well within one file (64 KiB), whatever the pids: no rotation.
    const LINES: u64 = 1000;
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = agent(&c, addr);
    let prog = bin("drover-testprog").display().to_string();
    let mut text = String::from(
        "[instances.a1]\n[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n",
    );
    for w in 0..WRITERS {
        text.push_str(&format!(
            "[nodes.w{w}]\ninstance = \"a1\"\ncommand = [\"{prog}\", \"--stdout-rate\", \"20000\", \"--lines\", \"{LINES}\"]\n"
        ));
    }
    text.push_str(
        "[nodes.split]\ninstance = \"a1\"\ncommand = [\"/bin/sh\", \"-c\", \
         \"printf 'first '; sleep 0.05; printf 'half\\\\n'; printf unended; exec sleep 1000\"]\n",
    );
    c.deploy_text(addr, "writers.toml", &text);
    let nodes = c.dir.path().join("agent-a1/nodes");
    for w in 0..WRITERS {
        let dir = nodes.join(format!("w{w}"));
        eventually("every line written", PATIENCE, || {
            (last_seq(&dir) == Some(LINES)).then_some(())
        });
        let pid = node_pid(&dir);
        let text = std::fs::read_to_string(dir.join("stdout.log")).unwrap();
        let want: String = (1..=LINES)
            .map(|seq| format!("testprog {pid} stdout line {seq}\n"))
            .collect();
        assert!(
            text == want,
            "w{w}'s file is not its {LINES} lines in order:\n{text}"
        );
    }
    let split = nodes.join("split/stdout.log");
    eventually("the partial line written after its wait", PATIENCE, || {
        std::fs::read_to_string(&split)
            .is_ok_and(|t| t == "first half\nunended")
            .then_some(())
    });
}

/// The files the keeper holds open that were deleted.
fn deleted_files_held(keeper: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{keeper}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .map(|target| target.display().to_string())
                .filter(|t| t.ends_with(" (deleted)"))
                .collect()
        })
        .unwrap_or_default()
}

/// An operator deletes a node's log file (to free a full disk) or moves it away: the
/// keeper lets go of it, so that its space is freed, and writes the node's next lines to
/// a new file, where `logs` finds them.
#[test]
fn a_log_file_deleted_or_moved_away_is_let_go_and_created_anew() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = agent(&c, addr);
    let dir = deploy(&c, addr, "steady", 200);
    let seen = lines_arrive("the node's first lines", &dir, 10);
    let keeper = keeper_pid(&c.dir.path().join("agent-a1")).expect("a keeper runs");
    let follow =
        drover_tests::Background::start(&c, &addr.to_string(), &["logs", "-f", "steady"], "follow");
    eventually("the follow shows lines", PATIENCE, || {
        (follow.stdout().lines().count() > 5).then_some(())
    });

    std::fs::remove_file(dir.join("stdout.log")).unwrap();
    let after = lines_arrive("lines in a new stdout.log", &dir, seen);
    let first = std::fs::read_to_string(dir.join("stdout.log")).unwrap();
    let first: u64 = first
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        first > seen,
        "the new file holds what came after: {first} after {seen}"
    );
    eventually("the keeper let the deleted file go", PATIENCE, || {
        deleted_files_held(keeper).is_empty().then_some(())
    });
    let out = c.drover(addr, &["logs", "steady", "-n", "1"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let shown: u64 = out
        .stdout
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(shown >= after, "logs shows the new file's lines: {shown}");

    // The follow has read the new file (two replacements within one of its polls would
    // leave the first replacement's lines at a path it cannot know).
    eventually("the follow shows the new file's lines", PATIENCE, || {
        follow
            .stdout()
            .lines()
            .any(|l| l.ends_with(&format!(" line {after}")))
            .then_some(())
    });
    let moved = dir.join("saved.log");
    std::fs::rename(dir.join("stdout.log"), &moved).unwrap();
    let later = lines_arrive("lines in a newer stdout.log", &dir, after);
    let kept = std::fs::read_to_string(&moved).unwrap();
    let last_kept: u64 = kept
        .lines()
        .last()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(last_kept < later, "the moved file is left as it was");
    assert_eq!(keeper_pid(&c.dir.path().join("agent-a1")), Some(keeper));

    // The follow went on across both, every line once and in order.
    let seqs = eventually(
        "the follow reached the newer file's lines",
        PATIENCE,
        || {
            let seqs: Vec<u64> = follow
                .stdout()
                .lines()
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect();
            (seqs.last() >= Some(&later)).then_some(seqs)
        },
    );
    let gap = seqs.windows(2).find(|w| w[1] != w[0] + 1);
    assert!(
        gap.is_none(),
        "lost or repeated across the files: {gap:?}\n{}\n{}",
        follow
            .stdout()
            .lines()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n"),
        follow.stderr()
    );
}

/// An operator deletes a running node's whole directory (its logs, its notify socket,
/// its record): its output goes on into a directory made again, and its next process
/// gets a notify socket again, so that a node that says when it is ready can still
/// start.
#[test]
fn a_node_directory_deleted_by_hand_is_made_again() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = agent(&c, addr);
    let prog = bin("drover-testprog").display().to_string();
    c.deploy_text(
        addr,
        "notify.toml",
        &format!(
            "[instances.a1]\n[nodes.steady]\ninstance = \"a1\"\n\
             command = [\"{prog}\", \"--stdout-rate\", \"200\", \"--ready-after\", \"0ms\"]\n\
             readiness = {{ kind = \"notify\", timeout = \"5s\" }}\n"
        ),
    );
    let dir = c.dir.path().join("agent-a1/nodes/steady");
    let seen = lines_arrive("the node's first lines", &dir, 10);
    let pid = node_pid(&dir);

    std::fs::remove_dir_all(&dir).unwrap();
    let after = lines_arrive("lines in a stdout.log made again", &dir, seen);
    assert!(alive(pid), "the node runs on");
    let out = c.drover(addr, &["logs", "steady", "-n", "1"]);
    let shown: Option<u64> = out
        .stdout
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok());
    assert!(shown >= Some(after), "logs shows the new file: {out:?}");

    let out = c.drover(addr, &["restart", "steady"]);
    assert_eq!(out.json()["results"]["steady"], true, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    assert!(
        dir.join("notify.sock").exists(),
        "its notify socket is back"
    );
    assert!(!alive(pid), "the old process was restarted");
    assert!(
        std::fs::read_to_string(&agent.log)
            .unwrap()
            .contains("is gone (its directory deleted?); making it again"),
        "the agent says what it found"
    );
}

/// A keeper that cannot come up (its lock path is taken by a directory) does not leave
/// nodes blocked on pipes nobody reads: once none has answered for a moment, nodes
/// started write their own files, held to their bound as they grow, and run on.
#[test]
fn nodes_write_their_own_files_while_no_keeper_can_come_up() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let state = c.dir.path().join("agent-a1");
    std::fs::create_dir_all(state.join("log-keeper.lock")).unwrap();
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
    c.wait_for_agent(addr, "a1");
    agent.wait_log("cannot start the log keeper");
    let up =
        drover_tests::metric_value(&drover_tests::scrape(metrics), "drover_agent_log_keeper_up");
    assert_eq!(up, Some(0.0));
    let dir = deploy(&c, addr, "writer", 20_000);
    // Through a pipe nobody reads, none would reach the file; and written far past its
    // bound, the file is held to it as it grows (the watcher is told of the node). The
    // watcher truncates after the writes it is told of, so on a loaded machine the file
    // runs ahead of it for a while: the bound checked is generous, and the node writes
    // four times that, all of which an unwatched file would keep.
    const LAGGING: u64 = 8 * MAX_BYTES;
    let mut last = lines_arrive("the node's lines in its own file", &dir, 2_000);
    let line = std::fs::read_to_string(dir.join("stdout.log"))
        .ok()
        .and_then(|t| t.lines().next().map(|l| l.len() as u64 + 1))
        .expect("a line in stdout.log");
    let mut largest = 0;
    while last * line < 4 * LAGGING {
        let len = std::fs::metadata(dir.join("stdout.log")).map_or(0, |m| m.len());
        largest = largest.max(len);
        last = lines_arrive("more lines", &dir, last);
    }
    assert!(
        largest <= LAGGING,
        "stdout.log reached {largest} bytes after {last} lines of {line} bytes or more"
    );
    assert!(alive(node_pid(&dir)));
    agent.wait_log("write their log files themselves");
    assert!(keeper_pid(&state).is_none());
}

/// A keeper that listens but does not answer in time (stopped here; a host too busy
/// for it) is asked again, not given up on: once it answers, the new agent holds its
/// pipes and nodes log through it. And a keeper stopped while its agent dies lives on:
/// its process group is orphaned then, and the kernel sends it SIGHUP (and SIGCONT).
#[test]
fn a_keeper_that_does_not_answer_at_first_is_asked_again() {
    use nix::sys::signal::{Signal, kill as signal};
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut first = agent(&c, addr);
    let dir = deploy(&c, addr, "writer", 100);
    let seq = lines_arrive("the node's lines", &dir, 10);
    let state = c.dir.path().join("agent-a1");
    let keeper = keeper_pid(&state).expect("a keeper runs");
    signal(nix::unistd::Pid::from_raw(keeper), Signal::SIGSTOP).unwrap();
    eventually("the keeper stopped", PATIENCE, || {
        let status = std::fs::read_to_string(format!("/proc/{keeper}/status")).ok()?;
        status
            .lines()
            .any(|l| l.starts_with("State:\tT"))
            .then_some(())
    });
    first.kill();
    // The kernel has sent it SIGHUP and SIGCONT as the agent died (where that orphaned
    // its process group); elsewhere it is still stopped: it goes on all the same.
    signal(nix::unistd::Pid::from_raw(keeper), Signal::SIGCONT).unwrap();
    let seq = lines_arrive("the node's lines with no agent", &dir, seq + 100);
    assert_eq!(
        keeper_pid(&state),
        Some(keeper),
        "the keeper was hung up on"
    );

    signal(nix::unistd::Pid::from_raw(keeper), Signal::SIGSTOP).unwrap();
    let second = agent(&c, addr);
    second.wait_log("the log keeper did not answer");
    signal(nix::unistd::Pid::from_raw(keeper), Signal::SIGCONT).unwrap();
    second.wait_log("log keeper connected pipes=2");
    lines_arrive("the node's lines after", &dir, seq + 100);
    assert_eq!(keeper_pid(&state), Some(keeper), "the same keeper");
    assert!(
        !second
            .log_text()
            .contains("write their log files themselves"),
        "{}",
        second.log_text()
    );
}
