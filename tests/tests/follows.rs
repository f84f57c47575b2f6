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
    Command::new(bin("drover"))
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
