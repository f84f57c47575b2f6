//! Log follows whose clients went away are let go: on a quiet node nothing is written
//! that would fail, yet the agent's streams return to their baseline, and requests to
//! that agent still answer (an agent serves at most 256 streams of the controller).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_tests::{Cluster, PATIENCE, bin, eventually};

fn served(metrics: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix("drover_agent_streams_served ")?.parse().ok())
        .expect("the agent reports its served streams")
}

/// Deploys `quiet`, a node on instance `a1` that writes nothing after its start.
fn deploy_quiet(c: &Cluster, addr: SocketAddr) {
    c.deploy_text(addr, "quiet.toml", &format!(
            "[instances.a1]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[nodes.quiet]\ninstance = \"a1\"\ncommand = [\"{}\"]\n",
            bin("drover-testprog").display()
        ));
}

/// A `drover` client that runs until killed.
fn client(c: &Cluster, controller: SocketAddr, args: &[&str]) -> Child {
    let mut cmd = Command::new(bin("drover"));
    drover_tests::dies_with_its_test(&mut cmd)
        .arg("--controller")
        .arg(controller.to_string())
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file("ops.crt"))
        .arg("--key")
        .arg(c.pki_file("ops.key"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A client ended by Ctrl-C, `kill` or its terminal closing closes its connection
/// first: the controller lets go of its follows at once, not after the connection's
/// idle timeout, and the client dies of the signal as a program that handles none does.
#[test]
fn follows_of_clients_ended_by_a_signal_are_released_at_once() {
    use std::os::unix::process::ExitStatusExt as _;

    let mut c = Cluster::new();
    // The controller's is longer than the client's (10 s by default), which is then
    // the connection's: what the controller would wait for without the close.
    c.idle_timeout = Duration::from_secs(30);
    let idle = Duration::from_secs(10);
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (_agent, metrics) = c.start_agent_with_metrics("a1", addr, &[]);
    deploy_quiet(&c, addr);
    let baseline = served(metrics);
    for (sig, args) in [
        (
            nix::sys::signal::Signal::SIGINT,
            &["logs", "-f", "quiet"][..],
        ),
        (
            nix::sys::signal::Signal::SIGTERM,
            &["monitor", "--logs"][..],
        ),
        (
            nix::sys::signal::Signal::SIGHUP,
            &["logs", "-f", "quiet"][..],
        ),
    ] {
        let mut child = client(&c, addr, args);
        eventually(
            &format!("{args:?}: its follow on the agent"),
            PATIENCE,
            || (served(metrics) > baseline).then_some(()),
        );
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, sig).unwrap();
        let sent = Instant::now();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(sig as i32), "{args:?}: {status:?}");
        eventually(
            &format!("{args:?}: the agent's streams back to {baseline}"),
            PATIENCE,
            || (served(metrics) <= baseline).then_some(()),
        );
        eprintln!(
            "{sig}: {args:?} released {:?} after the signal",
            sent.elapsed()
        );
        assert!(
            sent.elapsed() < idle / 2,
            "{args:?}: released {:?} after {sig}, as late as an idle timeout",
            sent.elapsed()
        );
    }
}

#[test]
fn abandoned_follows_on_a_quiet_node_are_released() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (_agent, metrics) = c.start_agent_with_metrics("a1", addr, &[]);
    deploy_quiet(&c, addr);
    let baseline = served(metrics);

    // Three waves of 100 (more than the agent's 256 streams in all): two thirds
    // `logs -f`, one third `monitor --logs`; each wave killed once all its follows are
    // established on the agent.
    for wave in 0..3 {
        let mut clients: Vec<Child> = (0..100)
            .map(|i| {
                if i % 3 == 2 {
                    client(&c, addr, &["monitor", "--logs"])
                } else {
                    client(&c, addr, &["logs", "-f", "quiet"])
                }
            })
            .collect();
        eventually(
            &format!("wave {wave}: 100 follows on the agent"),
            Duration::from_secs(120),
            || (served(metrics) >= baseline + 100).then_some(()),
        );
        for child in &mut clients {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let killed = Instant::now();
        eventually(
            &format!("wave {wave}: the agent's streams back to {baseline}"),
            PATIENCE,
            || (served(metrics) <= baseline).then_some(()),
        );
        // The controller learns of a killed client after its idle timeout; the rest
        // must follow within about a second.
        eprintln!(
            "wave {wave}: released {:?} after the kill (idle timeout {:?})",
            killed.elapsed(),
            c.idle_timeout
        );
        assert!(killed.elapsed() < c.idle_timeout + Duration::from_secs(5));
    }

    // Live follows beyond the controller's share of the agent's streams are refused
    // with a clear error, so that requests to the agent still find a stream.
    let limit = 192;
    let mut live: Vec<Child> = (0..limit + 8)
        .map(|_| client(&c, addr, &["logs", "-f", "quiet"]))
        .collect();
    eventually(
        &format!("{limit} follows served, 8 refused"),
        Duration::from_secs(120),
        || {
            let mut refused = 0;
            for ch in &mut live {
                if ch.try_wait().unwrap().is_some() {
                    refused += 1;
                }
            }
            (served(metrics) == baseline + limit && refused == 8).then_some(())
        },
    );
    let started = Instant::now();
    let out = c.drover(addr, &["get-nodes", "--fresh"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(5));
    let out = c.drover(addr, &["logs", "-f", "quiet"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("already serves 192 log follows"),
        "{}",
        out.stderr
    );
    for child in &mut live {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    eventually("the agent's streams back to baseline", PATIENCE, || {
        (served(metrics) <= baseline).then_some(())
    });

    // Requests to that agent still answer promptly.
    let started = Instant::now();
    let out = c.drover(addr, &["get-nodes", "--fresh"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("quiet"), "{}", out.stdout);
    assert!(started.elapsed() < Duration::from_secs(5));
    let out = c.drover(addr, &["logs", "quiet"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// The numbers of the lines `PREFIX-N` of `text`, in order.
fn numbered(text: &str, prefix: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// A node that writes `out-N` on stdout and `err-N` on stderr twenty times a second,
/// and a quiet one, on instance `a1`.
fn deploy_talking(c: &Cluster, addr: SocketAddr) {
    c.deploy_text(addr, "talk.toml", &format!(
        "[instances.a1]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
         [nodes.talk]\ninstance = \"a1\"\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo out-$i; echo err-$i >&2; sleep 0.05; done\"]\n\
         [nodes.quiet]\ninstance = \"a1\"\ncommand = [\"{}\"]\n",
        bin("drover-testprog").display()
    ));
}

/// `logs -f` and `monitor` go on when their controller stops and starts again (SIGTERM,
/// SIGKILL, and SIGTERM while the agent is stopped, so that the new controller has no
/// agent yet when the follow is taken up): the follow takes up where it stood, each line
/// once and none missing, and the monitor subscribes again; both say so on stderr.
#[test]
fn follows_go_on_through_their_controllers_restart() {
    use drover_tests::Background;
    use nix::sys::signal::Signal;

    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("a1", addr);
    deploy_talking(&c, addr);
    let at = addr.to_string();
    let logs = Background::start(&c, &at, &["logs", "-f", "talk", "-n", "0"], "logs");
    let monitor = Background::start(&c, &at, &["monitor"], "monitor");
    eventually("the follow shows lines", PATIENCE, || {
        (numbered(&logs.stdout(), "out-").len() >= 5).then_some(())
    });
    let node_events = |text: &str| {
        text.lines()
            .filter(|l| l.contains("\"node_state\"") && l.contains("\"quiet\""))
            .count()
    };
    for (round, how) in [(1, Signal::SIGTERM), (2, Signal::SIGKILL)] {
        let before = *numbered(&logs.stdout(), "out-").last().unwrap();
        if how == Signal::SIGKILL {
            ctl.kill();
        } else {
            ctl.signal(how);
            ctl.wait_exit(PATIENCE);
        }
        // Started again on its address and state dir.
        ctl = c.start_controller(&at).0;
        eventually(
            &format!("round {round}: the follow goes on"),
            PATIENCE,
            || {
                let taken_up = logs
                    .stderr()
                    .matches("following again through controller")
                    .count();
                let last = *numbered(&logs.stdout(), "out-").last().unwrap();
                (taken_up == round && last > before + 20).then_some(())
            },
        );
        // The monitor subscribed again: what happens now shows.
        eventually(
            &format!("round {round}: the monitor subscribed again"),
            PATIENCE,
            || {
                (monitor
                    .stderr()
                    .matches("following again through controller")
                    .count()
                    == round)
                    .then_some(())
            },
        );
        let seen = node_events(&monitor.stdout());
        let out = c.drover(addr, &["restart", "quiet"]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        eventually(
            &format!("round {round}: the monitor shows the restart"),
            PATIENCE,
            || (node_events(&monitor.stdout()) > seen).then_some(()),
        );
    }
    // Once more with the agent stopped meanwhile: the new controller has no agent when
    // the follow is taken up, and holds it until the agent is back.
    let before = *numbered(&logs.stdout(), "out-").last().unwrap();
    agent.signal(Signal::SIGSTOP);
    ctl.signal(Signal::SIGTERM);
    ctl.wait_exit(PATIENCE);
    let _ctl = c.start_controller(&at).0;
    eventually("round 3: the follow taken up", PATIENCE, || {
        (logs
            .stderr()
            .matches("following again through controller")
            .count()
            == 3)
            .then_some(())
    });
    agent.signal(Signal::SIGCONT);
    eventually(
        "round 3: the follow goes on once the agent is back",
        PATIENCE,
        || (*numbered(&logs.stdout(), "out-").last().unwrap() > before + 20).then_some(()),
    );

    let (out, err) = (logs.stdout(), logs.stderr());
    for (text, prefix) in [(&out, "out-"), (&err, "err-")] {
        let nums = numbered(text, prefix);
        let broken: Vec<(u64, u64)> = nums
            .windows(2)
            .map(|w| (w[0], w[1]))
            .filter(|(a, b)| *b != a + 1)
            .collect();
        assert!(
            broken.is_empty(),
            "{prefix} lines skipped or repeated at {broken:?}"
        );
    }
    assert!(
        err.contains(
            "went away (controller shutting down); following again once a controller answers]"
        ),
        "{err}"
    );
    assert_eq!(
        err.matches("what the node wrote meanwhile follows]")
            .count(),
        3,
        "{err}"
    );
    // A program reading the events learns of each gap in their own form.
    let resubscribed: Vec<serde_json::Value> = monitor
        .stdout()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"]["type"] == "resubscribed")
        .collect();
    assert_eq!(resubscribed.len(), 3, "{resubscribed:?}");
    assert_eq!(resubscribed[0]["event"]["controller"], at.as_str());
    assert_eq!(
        resubscribed[0]["event"]["reason"], "controller shutting down",
        "{resubscribed:?}"
    );
    let said = monitor.stderr();
    assert_eq!(
        said.matches("events meanwhile are not shown]").count(),
        3,
        "{said}"
    );
    for (what, mut bg) in [("logs -f", logs), ("monitor", monitor)] {
        assert!(bg.ended().is_none(), "{what} ended: {}", bg.stderr());
    }
}

/// A follow of a node that has written nothing to stdout yet (a stream's log file is made
/// by its first line) goes on through its controller's restart like any other: the
/// node's first lines, written while no controller was there, are shown, once, and the
/// gap is said to be filled, not lost, although stdout had no file when it began.
#[test]
fn a_follow_of_a_node_yet_to_write_is_taken_up_from_its_first_line() {
    use drover_tests::Background;
    use nix::sys::signal::Signal;

    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let (_agent, metrics) = c.start_agent_with_metrics("a1", addr, &[]);
    let (hello, go) = (c.dir.path().join("hello"), c.dir.path().join("go"));
    c.deploy_text(addr, "late.toml", &format!(
        "[instances.a1]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
         [nodes.late]\ninstance = \"a1\"\ncommand = [\"/bin/sh\", \"-c\", \"while [ ! -e {hello} ]; do sleep 0.02; done; echo waiting >&2; while [ ! -e {go} ]; do sleep 0.02; done; i=0; while :; do i=$((i+1)); echo late-$i; sleep 0.05; done\"]\n",
        hello = hello.display(),
        go = go.display()
    ));
    let baseline = served(metrics);
    let at = addr.to_string();
    let logs = Background::start(&c, &at, &["logs", "-f", "late", "-n", "0"], "logs");
    eventually("the agent serves the follow", PATIENCE, || {
        (served(metrics) > baseline).then_some(())
    });
    // A line on stderr comes after where stdout's follow began, on the same stream:
    // once the client shows it, the client knows where both streams stand.
    std::fs::write(&hello, "").unwrap();
    eventually("the client shows the stderr line", PATIENCE, || {
        logs.stderr().contains("waiting\n").then_some(())
    });
    assert!(
        !c.dir.path().join("agent-a1/nodes/late/stdout.log").exists(),
        "the node has no stdout file yet"
    );

    ctl.signal(Signal::SIGTERM);
    ctl.wait_exit(PATIENCE);
    std::fs::write(&go, "").unwrap();
    eventually(
        "the node writes while no controller is there",
        PATIENCE,
        || {
            std::fs::read_to_string(c.dir.path().join("agent-a1/nodes/late/stdout.log"))
                .is_ok_and(|t| t.contains("late-3\n"))
                .then_some(())
        },
    );
    let _ctl = c.start_controller(&at).0;
    eventually("the follow goes on", PATIENCE, || {
        (numbered(&logs.stdout(), "late-").len() >= 10).then_some(())
    });
    let nums = numbered(&logs.stdout(), "late-");
    let said = logs.stderr();
    assert_eq!(nums[0], 1, "the first lines are shown: {nums:?}\n{said}");
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "lines skipped or repeated: {nums:?}\n{said}"
    );
    assert!(
        said.contains("what the node wrote meanwhile follows]") && !said.contains("not shown"),
        "{said}"
    );
}

/// A follow whose connection the controller ends for another reason than going away
/// ends with it: here its client's certificate, revoked.
#[test]
fn a_follow_whose_client_is_revoked_ends() {
    use drover_tests::Background;

    let c = Cluster::new();
    let deny = c.dir.path().join("deny.list");
    std::fs::write(&deny, "# nothing revoked\n").unwrap();
    let (ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--deny-list", deny.to_str().unwrap()]);
    let _agent = c.start_agent("a1", addr);
    deploy_talking(&c, addr);
    let mut logs = Background::start(&c, &addr.to_string(), &["logs", "-f", "talk"], "logs");
    eventually("the follow shows lines", PATIENCE, || {
        (numbered(&logs.stdout(), "out-").len() >= 3).then_some(())
    });
    std::fs::write(&deny, "client/ops\n").unwrap();
    ctl.signal(nix::sys::signal::Signal::SIGHUP);
    let status = eventually("the follow ends", PATIENCE, || logs.ended());
    assert_eq!(status.code(), Some(1), "{}", logs.stderr());
    assert!(
        !logs.stderr().contains("following again"),
        "{}",
        logs.stderr()
    );
}

/// `logs -f` of a node whose agent is away waits for it, saying so, then shows the last
/// lines and follows, as a follow under way does when its agent goes.
#[test]
fn a_follow_begun_while_its_agent_is_away_waits_for_it() {
    use drover_tests::Background;

    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("a1", addr);
    deploy_talking(&c, addr);
    agent.kill();
    eventually("the agent's departure is noticed", PATIENCE, || {
        let out = c.drover(addr, &["logs", "talk"]);
        out.stderr.contains("not connected").then_some(())
    });
    let mut logs = Background::start(
        &c,
        &addr.to_string(),
        &["logs", "-f", "talk", "-n", "3"],
        "logs",
    );
    eventually("the follow says it waits", PATIENCE, || {
        logs.stderr()
            .contains("[drover: instance 'a1' is not connected; following once it is]")
            .then_some(())
    });
    assert!(logs.ended().is_none(), "{}", logs.stderr());
    let _agent = c.start_agent("a1", addr);
    eventually("the follow shows the node's lines", PATIENCE, || {
        (numbered(&logs.stdout(), "out-").len() >= 10).then_some(())
    });
    let nums = numbered(&logs.stdout(), "out-");
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "lines skipped or repeated: {nums:?}"
    );
}

/// `logs -f -n N` begun on an agent's connection that is already dead (the agent was
/// SIGKILLed a moment ago, and the controller has not noticed yet) got nothing: once the
/// agent is back it is asked again as it was, so the last lines are shown, not skipped
/// as if they had been.
#[test]
fn a_follow_begun_on_a_connection_already_dead_still_shows_its_last_lines() {
    use drover_tests::Background;

    let mut c = Cluster::new();
    // Long enough for the follow to reach the dead connection before it is given up.
    c.idle_timeout = Duration::from_secs(5);
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("a1", addr);
    deploy_talking(&c, addr);
    eventually("the node has written", PATIENCE, || {
        let out = c.drover(addr, &["logs", "talk", "-n", "3"]);
        (numbered(&out.stdout, "out-").len() == 3).then_some(())
    });
    agent.kill();
    let logs = Background::start(
        &c,
        &addr.to_string(),
        &["logs", "-f", "talk", "-n", "3", "--stream", "stdout"],
        "logs",
    );
    eventually("the follow learns its agent went away", PATIENCE, || {
        logs.stderr()
            .contains("[drover: instance 'a1' went away")
            .then_some(())
    });
    assert_eq!(numbered(&logs.stdout(), "out-"), Vec::<u64>::new());
    let _agent = c.start_agent("a1", addr);
    eventually("the follow shows the node's lines", PATIENCE, || {
        (numbered(&logs.stdout(), "out-").len() >= 10).then_some(())
    });
    let err = logs.stderr();
    assert!(
        err.contains("[drover: instance 'a1' is back]\n") && !err.contains("not shown"),
        "{err}"
    );
    let nums = numbered(&logs.stdout(), "out-");
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "lines skipped or repeated: {nums:?}"
    );
}

/// The serial of client certificate `ops`, as a deny list names it.
fn ops_serial(c: &Cluster) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(c.pki_file("ops.crt")).unwrap();
    drover_net::tls::cert_info(&der).unwrap().serial
}

/// While no controller answers, a follow says so, each reason once, and reads its
/// certificate files again at each attempt: renewed meanwhile, with the old certificate
/// revoked by the controller that comes back, the follow goes on with the new one.
#[test]
fn a_follow_waiting_for_its_controller_says_why_once_and_takes_a_renewed_certificate() {
    use drover_tests::Background;

    let c = Cluster::new();
    let deny = c.dir.path().join("deny.list");
    std::fs::write(&deny, "# nothing revoked\n").unwrap();
    let deny_flag = ["--deny-list", deny.to_str().unwrap()];
    let (mut ctl, addr) = c.start_controller_with("127.0.0.1:0", &deny_flag);
    let _agent = c.start_agent("a1", addr);
    deploy_talking(&c, addr);
    let at = addr.to_string();
    let logs = Background::start(&c, &at, &["logs", "-f", "talk", "-n", "0"], "logs");
    eventually("the follow shows lines", PATIENCE, || {
        (numbered(&logs.stdout(), "out-").len() >= 3).then_some(())
    });

    ctl.kill();
    eventually("the follow says no controller answers", PATIENCE, || {
        logs.stderr()
            .contains("[drover: no controller answers yet (")
            .then_some(())
    });
    let old = ops_serial(&c);
    let out = Command::new(bin("drover"))
        .args(["ca", "renew", "--dir"])
        .arg(c.pki_file("ca.crt").parent().unwrap())
        .arg("--cert")
        .arg(c.pki_file("ops.crt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(ops_serial(&c), old, "renewed");
    std::fs::write(&deny, format!("serial:{old}\n")).unwrap();
    let before = *numbered(&logs.stdout(), "out-").last().unwrap();
    let _ctl = c.start_controller_with(&at, &deny_flag).0;
    eventually("the follow goes on", PATIENCE, || {
        let taken_up = logs
            .stderr()
            .matches("following again through controller")
            .count();
        let last = *numbered(&logs.stdout(), "out-").last().unwrap();
        (taken_up == 1 && last > before + 10).then_some(())
    });
    let stderr = logs.stderr();
    let waits: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("no controller answers yet"))
        .collect();
    assert!(
        waits.windows(2).all(|w| w[0] != w[1]),
        "a reason said twice in a row: {stderr}"
    );
    assert!(!stderr.contains("error:"), "{stderr}");
}
