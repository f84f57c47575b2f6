//! Certificates, key, CA bundle and deny list reloaded by running daemons (SIGHUP and
//! `--watch-certs`): what new connections use, which live ones are closed, and that a
//! broken file changes nothing.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_proto::msg::PeerRole;
use drover_tests::{Cluster, PATIENCE, Proc, bin, eventually, free_tcp, metric_value, scrape};
use nix::sys::signal::Signal;

/// How often `needle` is in the log of `p`.
fn count(p: &Proc, needle: &str) -> usize {
    p.log_text().matches(needle).count()
}

/// Sends SIGHUP and waits for the reload it causes to be logged (done or failed).
fn reload(p: &Proc) -> String {
    let before = count(p, "reloaded certificates (") + count(p, "reload failed (");
    p.signal(Signal::SIGHUP);
    eventually(&format!("{} to reload", p.name), PATIENCE, || {
        let text = p.log_text();
        (text.matches("reloaded certificates (").count() + text.matches("reload failed (").count()
            > before)
            .then_some(text)
    })
}

/// A `drover monitor` running as client `file`, its stderr captured.
fn monitor(c: &Cluster, file: &str, addr: SocketAddr) -> std::process::Child {
    let mut cmd = c.drover_command_as(file, addr);
    cmd.arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    cmd.spawn().expect("spawn drover monitor")
}

#[test]
fn a_revoked_clients_open_monitor_is_closed_on_reload_and_nothing_else() {
    let c = Cluster::new();
    let deny = c.dir.path().join("deny.list");
    std::fs::write(&deny, "# nothing revoked\n").unwrap();
    let metrics = free_tcp();
    let (ctl, addr) = c.start_controller_with(
        "127.0.0.1:0",
        &[
            "--deny-list",
            deny.to_str().unwrap(),
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    let agent = c.start_agent("agent-1", addr);
    c.issue(PeerRole::Client, "viewer");
    eventually("the agent connected", PATIENCE, || {
        (metric_value(&scrape(metrics), "drover_agents_connected") == Some(1.0)).then_some(())
    });
    let mut revoked = monitor(&c, "ops", addr);
    let mut other = monitor(&c, "viewer", addr);
    // Both sessions are open once the controller lists their certificates.
    eventually("both monitors connected", PATIENCE, || {
        let page = scrape(metrics);
        (page.contains("drover_peer_cert_expiry_seconds{peer=\"client/ops\"}")
            && page.contains("drover_peer_cert_expiry_seconds{peer=\"client/viewer\"}")
            && page.contains("drover_peer_cert_expiry_seconds{peer=\"agent/agent-1\"}"))
        .then_some(())
    });

    std::fs::write(&deny, "client/ops\n").unwrap();
    let sent = Instant::now();
    ctl.signal(Signal::SIGHUP);
    let status = eventually("the revoked monitor to end", PATIENCE, || {
        revoked.try_wait().unwrap()
    });
    let closed_after = sent.elapsed();
    eprintln!("SIGHUP to the revoked client's monitor ending: {closed_after:?}");
    assert!(!status.success());
    let mut err = String::new();
    revoked
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("revoked"), "{err}");
    assert!(
        closed_after <= Duration::from_secs(1),
        "closed {closed_after:?} after the reload was asked for"
    );
    ctl.wait_log("closed the connection of client 'ops' from 127.0.0.1:");

    // Nothing else was disturbed: the other monitor, the agent's connection.
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other monitor ended"
    );
    let page = scrape(metrics);
    assert_eq!(
        metric_value(&page, "drover_agent_connections_total"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&page, "drover_cert_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert!(!agent.log_text().contains("lost the controller"));
    // New connections are refused too; the list in force names one entry.
    let out = c.drover(addr, &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("is revoked"), "{}", out.stderr);
    assert_eq!(
        c.drover_as("viewer", addr, &["get-instances"]).code,
        Some(0)
    );
    let _ = other.kill();
    let _ = other.wait();
}

#[test]
fn a_broken_key_or_certificate_keeps_the_material_in_use_and_says_why() {
    let c = Cluster::new();
    let metrics = free_tcp();
    let (ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--metrics-listen", &metrics.to_string()]);
    // An agent whose certificate is close to its end, for the warning in `status`.
    c.issue_with(
        PeerRole::Agent,
        "agent-1",
        "agent-1",
        drover_pki::Validity::days(10),
    );
    let _agent = c.start_agent("agent-1", addr);
    ctl.wait_log("agent 'agent-1' connected");
    let key = c.pki_file("controller.key");
    let cert = c.pki_file("controller.crt");
    let good_key = std::fs::read(&key).unwrap();
    let good_cert = std::fs::read(&cert).unwrap();

    // A key that is not one.
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let log = reload(&ctl);
    assert!(
        log.contains("reload failed (SIGHUP), keeping the certificates, key, CA bundle and deny list in use: unusable private key"),
        "{log}"
    );
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));
    let page = scrape(metrics);
    assert_eq!(metric_value(&page, "drover_cert_reload_failing"), Some(1.0));
    assert_eq!(
        metric_value(&page, "drover_cert_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );

    // A certificate that is not one, with the right key.
    std::fs::write(&key, &good_key).unwrap();
    std::fs::write(&cert, "garbage\n").unwrap();
    let log = reload(&ctl);
    assert!(
        log.contains("the certificate file holds no certificate"),
        "{log}"
    );
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));

    // Another holder's certificate: refused, it would change who this controller is.
    std::fs::write(&cert, &good_cert).unwrap();
    std::fs::copy(c.pki_file("ops.crt"), &cert).unwrap();
    std::fs::copy(c.pki_file("ops.key"), &key).unwrap();
    let log = reload(&ctl);
    assert!(
        log.contains("the new certificate belongs to client 'ops', but this process is controller 'controller'"),
        "{log}"
    );
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));

    // A FIFO in the key's place (nothing ever writes to it), twice: refused at once,
    // and neither the next reload nor `/metrics` waits on it.
    std::fs::write(&cert, &good_cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    nix::unistd::mkfifo(&key, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for _ in 0..2 {
        let log = reload(&ctl);
        assert!(
            log.contains("cannot read private key ")
                && log.contains("controller.key: not a regular file"),
            "{log}"
        );
        assert_eq!(
            metric_value(&scrape(metrics), "drover_cert_reload_failing"),
            Some(1.0)
        );
    }
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));
    std::fs::remove_file(&key).unwrap();

    // Fixed by a renewal: in force at once, for new connections.
    std::fs::write(&cert, &good_cert).unwrap();
    std::fs::write(&key, &good_key).unwrap();
    let before = scrape(metrics);
    let renew = Command::new(bin("drover"))
        .args(["ca", "renew", "--dir"])
        .arg(&c.pki)
        .arg("--cert")
        .arg(&cert)
        .args(["--days", "20"])
        .output()
        .unwrap();
    assert!(
        renew.status.success(),
        "{}",
        String::from_utf8_lossy(&renew.stderr)
    );
    let log = reload(&ctl);
    assert!(log.contains("new certificate serial"), "{log}");
    ctl.wait_log("this controller's certificate expires in ");
    let page = scrape(metrics);
    assert_eq!(metric_value(&page, "drover_cert_reload_failing"), Some(0.0));
    let expiry = |p: &str| {
        p.lines()
            .find(|l| l.starts_with("drover_cert_expiry_seconds{"))
            .map(str::to_owned)
    };
    assert_ne!(expiry(&before), expiry(&page));
    let out = c.drover(addr, &["status"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    for warning in [
        "warning: the certificate of controller 'controller' expires in ",
        "warning: the certificate of agent 'agent-1' expires in ",
    ] {
        assert!(out.stderr.contains(warning), "{}", out.stderr);
    }
    assert!(!out.stdout.contains("warning"), "{}", out.stdout);
    assert!(
        !ctl.log_text().contains("PRIVATE KEY"),
        "no key material in logs"
    );
}

#[test]
fn an_agent_watching_its_files_picks_up_a_renewal_and_moves_to_a_new_connection_without_a_gap() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(PeerRole::Agent, "agent-1");
    let agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string(), "--watch-certs"],
    );
    agent.wait_log("watching the certificate files for changes");
    ctl.wait_log("agent 'agent-1' connected");
    let renew = Command::new(bin("drover"))
        .args(["ca", "renew", "--dir"])
        .arg(&c.pki)
        .arg("--cert")
        .arg(c.pki_file("agent-1.crt"))
        .args(["--days", "12"])
        .output()
        .unwrap();
    assert!(
        renew.status.success(),
        "{}",
        String::from_utf8_lossy(&renew.stderr)
    );
    let log = agent.wait_log("reloaded certificates (");
    assert!(log.contains("agent-1.crt"), "{log}");
    assert!(log.contains("new certificate serial"), "{log}");
    assert!(!log.contains("reload failed"), "{log}");
    // The connection made with the old certificate is replaced, never lost.
    ctl.wait_log("agent 'agent-1' moves from its connection from 127.0.0.1:");
    let log = agent.wait_log("moved to a new connection to the controller");
    assert!(!log.contains("lost the controller"), "{log}");
    assert!(!ctl.log_text().contains("lost:"));
    assert_eq!(count(&ctl, "agent 'agent-1' connected"), 1);
}

#[test]
fn a_peer_whose_ca_leaves_the_bundle_is_closed_at_once_and_cannot_return() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("agent-1", addr);
    ctl.wait_log("agent 'agent-1' connected");
    // The controller moves to a new CA; the agent stays on the old one.
    let next = c.dir.path().join("pki-next");
    let run = |args: &[&str]| {
        let out = Command::new(bin("drover")).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["ca", "init", "--dir", next.to_str().unwrap()]);
    let ctl_ca = c.dir.path().join("controller-ca.crt");
    let old = std::fs::read_to_string(c.pki_file("ca.crt")).unwrap();
    let new = std::fs::read_to_string(next.join("ca.crt")).unwrap();
    std::fs::write(&ctl_ca, format!("{old}{new}")).unwrap();
    drop(ctl);
    let ctl = {
        // The controller again, on its own bundle file, holding both CAs.
        let mut cmd = Command::new(bin("drover-controller"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--state-dir")
            .arg(c.dir.path().join("controller"))
            .arg("--ca")
            .arg(&ctl_ca)
            .arg("--cert")
            .arg(c.pki_file("controller.crt"))
            .arg("--key")
            .arg(c.pki_file("controller.key"));
        let p = Proc::spawn("controller", cmd, c.log_path("controller-2"));
        p.wait_log("controller listening");
        p
    };
    ctl.wait_log("agent 'agent-1' connected");
    // The controller's certificate moves to the new CA with its bundle: a bundle that
    // does not verify the daemon's own certificate is refused.
    run(&[
        "ca",
        "renew",
        "--dir",
        next.to_str().unwrap(),
        "--cert",
        c.pki_file("controller.crt").to_str().unwrap(),
    ]);
    std::fs::write(&ctl_ca, &new).unwrap();
    let sent = Instant::now();
    ctl.signal(Signal::SIGHUP);
    let log = ctl.wait_log("closed the connection of agent 'agent-1'");
    eprintln!(
        "SIGHUP to the untrusted agent's connection closed: {:?}",
        sent.elapsed()
    );
    assert!(
        log.contains("the certificate is no longer trusted"),
        "{log}"
    );
    agent.wait_log("lost the controller");
    // Its next attempts fail in the handshake: neither trusts the other's CA now.
    agent.wait_log("cannot verify controller");
    assert_eq!(count(&ctl, "agent 'agent-1' connected"), 1);
}

#[test]
fn an_agent_reloading_its_deny_list_drops_a_revoked_controller() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let deny = c.dir.path().join("agent-deny.list");
    std::fs::write(&deny, "").unwrap();
    c.issue(PeerRole::Agent, "agent-1");
    let agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &[
            "--controller",
            &addr.to_string(),
            "--deny-list",
            deny.to_str().unwrap(),
        ],
    );
    ctl.wait_log("agent 'agent-1' connected");
    // A broken list first: refused, the connection stays.
    std::fs::write(&deny, "controller\n").unwrap();
    let log = reload(&agent);
    assert!(log.contains("invalid deny list"), "{log}");
    assert!(!log.contains("lost the controller"), "{log}");
    std::fs::write(&deny, "controller/controller\n").unwrap();
    reload(&agent);
    agent.wait_log("closed the connection of controller 'controller'");
    agent.wait_log("lost the controller");
    let log = agent.wait_log(
        "cannot connect to the controller: the certificate of controller 'controller' (serial ",
    );
    assert!(log.contains(") is revoked"), "{log}");
}

#[test]
fn a_certificate_peers_would_refuse_is_not_put_in_force_and_one_not_valid_yet_is_taken_when_it_is()
{
    let c = Cluster::new();
    let metrics = free_tcp();
    let (ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--metrics-listen", &metrics.to_string()]);
    let ok = |why: &str| {
        let out = c.drover(addr, &["get-instances"]);
        assert_eq!(out.code, Some(0), "{why}: {}", out.stderr);
    };

    // Expired: peers would refuse every new connection.
    c.issue_with(
        PeerRole::Controller,
        "controller",
        "controller",
        drover_tests::expired(),
    );
    let log = reload(&ctl);
    assert!(log.contains("controller.crt expired at "), "{log}");
    ok("after an expired certificate");
    assert_eq!(
        metric_value(&scrape(metrics), "drover_cert_reload_failing"),
        Some(1.0)
    );

    // Issued by a CA the bundle does not hold: peers sharing the bundle would refuse it.
    let other = drover_pki::Ca::generate("another CA").unwrap();
    let pem = other
        .issue(&drover_pki::LeafSpec::new(
            PeerRole::Controller,
            "controller",
        ))
        .unwrap();
    c.write_pem("controller", &pem);
    let log = reload(&ctl);
    assert!(
        log.contains("does not verify against its own CA bundle: unknown issuer"),
        "{log}"
    );
    ok("after a certificate of another CA");

    // Not valid yet, as when the issuing machine's clock is ahead: refused, and taken
    // without another signal once it is valid.
    let now = time::OffsetDateTime::now_utc();
    let from = now + time::Duration::seconds(4);
    c.issue_with(
        PeerRole::Controller,
        "controller",
        "controller",
        drover_pki::Validity {
            not_before: from,
            not_after: now + time::Duration::days(90),
        },
    );
    let log = reload(&ctl);
    assert!(log.contains("controller.crt is not valid before "), "{log}");
    ok("after a certificate not valid yet");
    let log = ctl.wait_log(
        "reloaded certificates (trying again: the certificate refused was not valid yet): new",
    );
    assert!(
        time::OffsetDateTime::now_utc() >= from,
        "taken before it was valid: {log}"
    );
    ok("with the certificate now valid");
    assert_eq!(
        metric_value(&scrape(metrics), "drover_cert_reload_failing"),
        Some(0.0)
    );
}

#[test]
fn a_daemon_warns_when_its_certificate_comes_within_30_days_of_its_end_while_it_runs() {
    let c = Cluster::new();
    let end =
        time::OffsetDateTime::now_utc() + time::Duration::days(30) + time::Duration::seconds(12);
    c.issue_with(
        PeerRole::Controller,
        "controller",
        "controller",
        drover_pki::Validity {
            not_before: time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
            not_after: end,
        },
    );
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue_with(
        PeerRole::Agent,
        "agent-1",
        "agent-1",
        drover_pki::Validity {
            not_before: time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
            not_after: end,
        },
    );
    let agent = c.start_agent("agent-1", addr);
    agent.wait_log("connected to controller");
    for p in [&ctl, &agent] {
        assert!(!p.log_text().contains("expires in"), "{}", p.log_text());
    }
    ctl.wait_log("controller.crt expires in 29 days; renew it with `drover ca renew`");
    agent.wait_log("agent-1.crt expires in 29 days; renew it with `drover ca renew`");
}
