//! The mutual-TLS matrix: every way a peer can be wrong is refused with a one-line error
//! that names the cause, printed by the client (or dialer) and logged by the controller,
//! and never a hang.

use std::net::SocketAddr;
use std::time::Duration;

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, NetError, TlsFiles};
use drover_pki::{Ca, LeafSpec};
use drover_proto::msg::{API_VERSION, Hello, PeerRole};
use drover_tests::{Cluster, expired};
use rustls::pki_types::pem::PemObject;

/// Bound on every refusal: far below the CLI's own timeout, so a hang fails the test.
const LIMIT: Duration = Duration::from_secs(8);

fn creds(c: &Cluster, file: &str) -> Credentials {
    Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file(&format!("{file}.crt")),
        key: c.pki_file(&format!("{file}.key")),
    })
    .expect("load credentials")
}

fn hello(role: PeerRole, name: &str, api_version: u32) -> Hello {
    Hello {
        api_version,
        role,
        name: name.to_owned(),
        software: "drover-tests".into(),
        lost_term: None,
    }
}

/// Dials the controller in-process with an optional odd TLS setup and a Hello; returns
/// the error message.
fn dial_err(
    creds: &Credentials,
    tls: Option<rustls::ClientConfig>,
    addr: SocketAddr,
    hello: Hello,
) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result: Result<(), NetError> = rt.block_on(async {
        let settings = TransportSettings::default();
        let endpoint = conn::client_endpoint(creds, &settings, addr)?;
        let cfg = match tls {
            None => None,
            Some(t) => Some(conn::quic_client_config(t, &settings)?),
        };
        tokio::time::timeout(
            LIMIT,
            conn::dial(
                &endpoint,
                cfg,
                addr,
                "127.0.0.1",
                hello,
                PeerRole::Controller,
                None,
                Duration::from_secs(5),
            ),
        )
        .await
        .expect("dial must not hang")
        .map(|_| ())
    });
    let err = result.expect_err("the controller must refuse this peer");
    let text = err.to_string();
    assert!(!text.contains('\n'), "one-line error expected: {text}");
    text
}

#[test]
fn no_client_certificate() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let ops = creds(&c, "ops");
    let err = dial_err(
        &ops,
        Some(ops.anonymous_client_config().unwrap()),
        addr,
        hello(PeerRole::Client, "ops", API_VERSION),
    );
    assert!(
        err.contains("rejected our certificate: no client certificate presented"),
        "{err}"
    );
    controller.wait_log("refused connection from 127.0.0.1:");
    controller.wait_log("no certificate presented");
}

#[test]
fn certificate_from_another_ca() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let other = Ca::generate("someone else's CA").unwrap();
    let pem = other
        .issue(&LeafSpec::new(PeerRole::Client, "intruder"))
        .unwrap();
    c.write_pem("intruder", &pem);
    // The controller refuses it.
    let err = dial_err(
        &creds(&c, "intruder"),
        None,
        addr,
        hello(PeerRole::Client, "intruder", API_VERSION),
    );
    assert!(
        err.ends_with("rejected our certificate: unknown issuer"),
        "{err}"
    );
    controller.wait_log("unknown issuer");
    // The CLI, whose CA bundle does not verify its own certificate either, says so
    // before dialling.
    let out = c.drover_as("intruder", addr, &["get-instances"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stdout, "");
    let line = out.stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {line}");
    assert_eq!(
        line,
        format!(
            "error: the client certificate {} does not verify against its own CA bundle: \
             unknown issuer; renew it from a CA of --ca ({}), or give the bundle that \
             holds its CA",
            c.pki_file("intruder.crt").display(),
            c.pki_file("ca.crt").display()
        )
    );
}

#[test]
fn expired_certificate() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    c.issue_with(PeerRole::Client, "old-ops", "old-ops", expired());
    // The controller refuses it.
    let err = dial_err(
        &creds(&c, "old-ops"),
        None,
        addr,
        hello(PeerRole::Client, "old-ops", API_VERSION),
    );
    assert!(
        err.ends_with("rejected our certificate: certificate expired or not valid yet"),
        "{err}"
    );
    controller.wait_log("certificate expired");
    // Who it was, as far as the refused certificate says.
    controller.wait_log("refused the certificate of client 'old-ops': ");
    // The CLI says so itself, before dialling: which certificate, and since when.
    let out = c.drover_as("old-ops", addr, &["get-instances"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let line = out.stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {line}");
    let cert = c.pki_file("old-ops.crt");
    assert!(
        line.starts_with(&format!(
            "error: the client certificate {} expired at ",
            cert.display()
        )) && line.contains(" (1d 0h ago); renew it with `drover ca renew --dir CA_DIR --cert "),
        "{line}"
    );
}

#[test]
fn client_certificate_cannot_register_as_an_agent() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let err = dial_err(
        &creds(&c, "ops"),
        None,
        addr,
        hello(PeerRole::Agent, "ops", API_VERSION),
    );
    assert!(
        err.ends_with("a client certificate cannot register as an agent"),
        "{err}"
    );
    controller.wait_log("refused connection: a client certificate cannot register as an agent");

    // The agent binary refuses the mismatch itself, before dialling.
    let mut agent = c.start_agent_with("ops", "ops", addr);
    let status = agent.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(1));
    let log = agent.log_text();
    assert!(
        log.contains("belongs to client 'ops', but this is agent 'ops'"),
        "{log}"
    );
}

#[test]
fn agent_name_must_match_its_certificate() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    c.issue(PeerRole::Agent, "agent-1");
    let err = dial_err(
        &creds(&c, "agent-1"),
        None,
        addr,
        hello(PeerRole::Agent, "agent-9", API_VERSION),
    );
    assert!(
        err.ends_with("agent name 'agent-9' does not match its certificate name 'agent-1'"),
        "{err}"
    );
    controller.wait_log("agent name 'agent-9' does not match its certificate name 'agent-1'");

    let mut agent = c.start_agent_with("agent-9", "agent-1", addr);
    assert_eq!(agent.wait_exit(LIMIT).code(), Some(1));
    let log = agent.log_text();
    assert!(
        log.contains("belongs to agent 'agent-1', but this is agent 'agent-9'"),
        "{log}"
    );
}

#[test]
fn agent_certificate_cannot_make_client_requests() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    c.issue(PeerRole::Agent, "agent-1");
    let err = dial_err(
        &creds(&c, "agent-1"),
        None,
        addr,
        hello(PeerRole::Client, "agent-1", API_VERSION),
    );
    assert!(
        err.ends_with("an agent certificate cannot make client requests"),
        "{err}"
    );
    controller.wait_log("an agent certificate cannot make client requests");

    // The CLI says so before dialling.
    let out = c.drover_as("agent-1", addr, &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("the client needs a client certificate"),
        "{}",
        out.stderr
    );
}

#[test]
fn wrong_alpn() {
    let c = Cluster::new();
    let (_controller, addr) = c.start_controller("127.0.0.1:0");
    let ops = creds(&c, "ops");
    let err = dial_err(
        &ops,
        Some(ops.client_config_with_alpn(b"drover/0").unwrap()),
        addr,
        hello(PeerRole::Client, "ops", API_VERSION),
    );
    assert!(
        err.ends_with("does not speak drover/1 (alpn mismatch)"),
        "{err}"
    );
}

#[test]
fn api_version_mismatch() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let err = dial_err(
        &creds(&c, "ops"),
        None,
        addr,
        hello(PeerRole::Client, "ops", API_VERSION + 1),
    );
    let want = format!(
        "api version mismatch: peer speaks {} (drover-tests), this side speaks {API_VERSION} (drover-controller {})",
        API_VERSION + 1,
        env!("CARGO_PKG_VERSION")
    );
    assert!(err.ends_with(&want), "{err}");
    controller.wait_log(&want);
}

#[test]
fn world_readable_key_is_refused_by_every_binary() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new();
    let key = c.pki_file("ops.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = c.drover_as("ops", "127.0.0.1:9".parse().unwrap(), &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("is accessible by group or others (mode 0644)"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_stopped_controller_is_told_at_once_not_after_the_timeout() {
    let c = Cluster::new();
    let port = closed_port();
    let out = c.drover(([127, 0, 0, 1], port).into(), &["get-instances"]);
    assert_eq!(out.code, Some(1));
    // Not the handshake's timeout: loopback answers a closed port at once.
    assert!(
        out.stderr.contains(&format!(
            "nothing listens at udp 127.0.0.1:{port}: connection refused"
        )) && out.stderr.contains("is the controller running")
            && !out.stderr.contains("timed out"),
        "{}",
        out.stderr
    );
}

/// A port of 127.0.0.1 where nothing listens (bound, then closed).
fn closed_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn several_stopped_controllers_are_told_at_once_and_a_live_one_among_them_answers() {
    let c = Cluster::new();
    let (a, b) = (closed_port(), closed_port());
    let both = format!("127.0.0.1:{a},127.0.0.1:{b}");
    let out = drover_tests::etcd::drover(&c, &both, &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains(&format!(
            "nothing listens at any controller address (udp 127.0.0.1:{a}, udp 127.0.0.1:{b})"
        )) && !out.stderr.contains("timed out"),
        "{}",
        out.stderr
    );
    // One live controller among stopped ones is found, whatever the order.
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    for list in [
        format!("127.0.0.1:{a},{addr}"),
        format!("{addr},127.0.0.1:{b}"),
    ] {
        let out = drover_tests::etcd::drover(&c, &list, &["get-instances"]);
        assert_eq!(out.code, Some(0), "{list}: {}", out.stderr);
    }
}

#[test]
fn a_silent_controller_address_is_a_clear_error_not_a_hang() {
    let c = Cluster::new();
    // Something holds the port and never answers: the handshake's timeout decides.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = c.drover(silent.local_addr().unwrap(), &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("timed out") && out.stderr.contains("is the controller running"),
        "{}",
        out.stderr
    );
}

#[test]
fn revoked_certificates_are_refused_on_their_next_connection() {
    let c = Cluster::new();
    let deny = c.dir.path().join("deny.txt");
    std::fs::write(&deny, "# nothing revoked yet\n").unwrap();
    let (controller, addr) =
        c.start_controller_with("127.0.0.1:0", &["--deny-list", deny.to_str().unwrap()]);
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));

    // The list is read at start and on reload (SIGHUP).
    std::fs::write(&deny, "client/ops\n").unwrap();
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));
    hup(&controller);
    let out = c.drover(addr, &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("refused us: the certificate of client 'ops' (serial ")
            && out.stderr.contains(") is revoked"),
        "{}",
        out.stderr
    );
    controller.wait_log("is revoked");

    // By serial: another client certificate for the same name.
    c.issue_with(
        PeerRole::Client,
        "ops",
        "ops2",
        drover_pki::Validity::days(10),
    );
    std::fs::write(&deny, "").unwrap();
    hup(&controller);
    assert_eq!(c.drover_as("ops2", addr, &["get-instances"]).code, Some(0));
    let pem = std::fs::read(c.pki_file("ops2.crt")).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let serial = drover_net::tls::cert_info(&der).unwrap().serial;
    std::fs::write(&deny, format!("serial:{serial}\n")).unwrap();
    hup(&controller);
    assert_eq!(c.drover_as("ops2", addr, &["get-instances"]).code, Some(1));
    assert_eq!(
        c.drover_as("ops", addr, &["get-instances"]).code,
        Some(0),
        "only that serial"
    );

    // An invalid deny list is not put in force: the one in force stays.
    std::fs::write(&deny, "nonsense\n").unwrap();
    hup(&controller);
    controller.wait_log("invalid deny list");
    assert_eq!(c.drover_as("ops2", addr, &["get-instances"]).code, Some(1));
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));

    // The expiry warning for a peer certificate close to its end.
    let log = controller.log_text();
    assert!(
        log.contains("expires in 9 days") || log.contains("expires in 10 days"),
        "{log}"
    );
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("BEGIN"),
        "no key material in logs"
    );
}

/// Sends SIGHUP to the controller and waits until it logged the reload's outcome.
fn hup(controller: &drover_tests::Proc) {
    let outcomes = |t: &str| {
        t.matches("reloaded certificates (").count() + t.matches("reload failed (").count()
    };
    let before = outcomes(&controller.log_text());
    controller.signal(nix::sys::signal::Signal::SIGHUP);
    drover_tests::eventually("the reload", drover_tests::PATIENCE, || {
        (outcomes(&controller.log_text()) > before).then_some(())
    });
}

#[test]
fn a_daemon_whose_own_ca_bundle_does_not_verify_its_certificate_refuses_to_start() {
    let c = Cluster::new();
    let other = Ca::generate("another CA").unwrap();
    for (role, name) in [
        (PeerRole::Controller, "controller"),
        (PeerRole::Agent, "agent-1"),
    ] {
        c.write_pem(name, &other.issue(&LeafSpec::new(role, name)).unwrap());
    }
    let mut cmd = std::process::Command::new(drover_tests::bin("drover-controller"));
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("this controller's certificate ")
            && err.contains(
                "controller.crt does not verify against its own CA bundle: unknown issuer (ca "
            ),
        "{err}"
    );
    let mut agent = c.start_agent_args("agent-1", "agent-1", &["--controller", "127.0.0.1:9"]);
    let code = agent.wait_exit(drover_tests::PATIENCE).code();
    let log = agent.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("agent-1.crt does not verify against its own CA bundle: unknown issuer"),
        "{log}"
    );
}
