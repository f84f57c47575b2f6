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
