//! A tail larger than a frame reaches the client whole: the agent splits log replies
//! under the frame limit, and the controller relays them one by one.

use drover_proto::msg::PeerRole;
use drover_tests::{Cluster, PATIENCE, eventually};

#[test]
fn a_tail_larger_than_a_frame_arrives_whole() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(PeerRole::Agent, "a1");
    let _agent = c.start_agent_args(
        "a1",
        "a1",
        &[
            "--controller",
            &addr.to_string(),
            "--log-max-bytes",
            "100000000",
        ],
    );
    // 20 MB in lines of 60 000 bytes: more than the 16 MiB frame limit in one tail.
    c.deploy_text(addr, "big.toml", "[instances.a1]\n[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n\
         [nodes.big]\ninstance = \"a1\"\n\
         command = [\"sh\", \"-c\", \"head -c 20000000 /dev/zero | tr '\\\\0' x | fold -w 60000; echo; echo done; exec sleep 1000\"]\n");
    let dir = c.dir.path().join("agent-a1/nodes/big");
    eventually("the node wrote everything", PATIENCE, || {
        std::fs::read_to_string(dir.join("stdout.log"))
            .is_ok_and(|t| t.ends_with("done\n"))
            .then_some(())
    });

    let out = c.drover(addr, &["logs", "-n", "1000", "--stream", "stdout", "big"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let full = 20_000_000 / 60_000;
    assert_eq!(lines.len(), full + 2, "{}", out.stderr);
    assert!(
        lines[..full]
            .iter()
            .all(|l| l.len() == 60_000 && l.bytes().all(|b| b == b'x'))
    );
    assert_eq!(lines[full].len(), 20_000_000 % 60_000);
    assert_eq!(lines[full + 1], "done");
}

/// The agent's peak resident memory (`VmHWM`), in KiB.
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A tail of a million lines, across eight rotated files, arrives whole and in order,
/// and the agent never holds it in memory: it reads and sends it batch by batch.
#[test]
fn a_tail_of_a_million_lines_arrives_in_order_without_the_agent_holding_it() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(PeerRole::Agent, "a1");
    let agent = c.start_agent_args(
        "a1",
        "a1",
        &[
            "--controller",
            &addr.to_string(),
            "--log-max-bytes",
            "1M",
            "--log-keep",
            "20",
        ],
    );
    c.deploy_text(
        addr,
        "seq.toml",
        "[instances.a1]\n[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n\
         [nodes.seq]\ninstance = \"a1\"\n\
         command = [\"sh\", \"-c\", \"seq 1 1000000; exec sleep 1000\"]\n",
    );
    let dir = c.dir.path().join("agent-a1/nodes/seq");
    eventually("the node wrote everything", PATIENCE, || {
        std::fs::read_to_string(dir.join("stdout.log"))
            .is_ok_and(|t| t.ends_with("1000000\n"))
            .then_some(())
    });
    let rotated = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("stdout.log.")
        })
        .count();
    assert!(rotated >= 6, "{rotated} rotated files");

    let before = peak_kib(agent.pid());
    let out = c.drover(
        addr,
        &["logs", "-n", "5000000", "--stream", "stdout", "seq"],
    );
    let grew = peak_kib(agent.pid()).saturating_sub(before);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut want = 1u64;
    for line in out.stdout.lines() {
        assert_eq!(
            line.parse::<u64>().ok(),
            Some(want),
            "after line {}",
            want - 1
        );
        want += 1;
    }
    assert_eq!(want, 1_000_001);
    // The lines as strings would take about 60 MiB; a few batches in flight take a few.
    eprintln!("the agent's peak resident memory grew by {grew} KiB");
    assert!(
        grew < 24 * 1024,
        "the agent's peak memory grew by {grew} KiB"
    );
}
