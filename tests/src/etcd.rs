//! Real etcd processes for the high-availability tests, and controllers that keep their
//! state in them.
//!
//! etcd comes from `PATH` (Debian's `etcd-server` package; `.ci/run` installs it). Without
//! it the tests fail saying how to get it, unless `DROVER_SKIP_ETCD_TESTS=1` is set.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::{CliOutput, Cluster, Proc, addr_in_log, bin, free_tcp_ports, run_cli};

/// Whether the etcd tests can run: `false` only when etcd is missing and skipping was
/// asked for; a missing etcd is otherwise a failure that says how to install it.
pub fn available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var("DROVER_SKIP_ETCD_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: etcd is not on PATH (DROVER_SKIP_ETCD_TESTS=1)");
        return false;
    }
    panic!(
        "etcd is not on PATH: install it (Debian: apt-get install etcd-server; .ci/run does), \
         or set DROVER_SKIP_ETCD_TESTS=1 to skip the high-availability tests"
    );
}

/// One etcd member.
#[derive(Debug)]
pub struct Member {
    /// The process (`None` once killed).
    pub proc: Option<Proc>,
    /// Its client URL.
    pub client_url: String,
    args: Vec<String>,
    log: std::path::PathBuf,
}

/// An etcd cluster of real processes in the test's directory.
#[derive(Debug)]
pub struct Etcd {
    /// The members.
    pub members: Vec<Member>,
    /// With TLS: the CA, and the client certificate and key controllers use.
    pub tls: Option<drover_controller::etcd::EtcdTls>,
}

impl Etcd {
    /// Starts `n` members and waits until each serves clients.
    pub fn start(c: &Cluster, n: usize) -> Self {
        Self::start_with(c, n, false, "127.0.0.1")
    }

    /// As [`Etcd::start`], serving clients on `ip` (a network lab's bridge address).
    pub fn start_on(c: &Cluster, n: usize, ip: &str) -> Self {
        Self::start_with(c, n, false, ip)
    }

    /// As [`Etcd::start`], serving clients over TLS only, with client certificates
    /// required (all from the cluster's CA: a server certificate `etcd` for 127.0.0.1,
    /// a client certificate `etcd-client`).
    pub fn start_tls(c: &Cluster, n: usize) -> Self {
        Self::start_with(c, n, true, "127.0.0.1")
    }

    fn start_with(c: &Cluster, n: usize, tls: bool, ip: &str) -> Self {
        let tls = tls.then(|| {
            let mut spec =
                drover_pki::LeafSpec::new(drover_proto::msg::PeerRole::Controller, "etcd");
            spec.sans = vec!["127.0.0.1".into()];
            drover_pki::issue_in_dir(&c.pki, &spec).expect("issue etcd's certificate");
            c.issue(drover_proto::msg::PeerRole::Client, "etcd-client");
            drover_controller::etcd::EtcdTls {
                ca: Some(c.pki_file("ca.crt")),
                cert: Some(c.pki_file("etcd-client.crt")),
                key: Some(c.pki_file("etcd-client.key")),
            }
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = free_tcp_ports(2 * n)
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client_url = format!("{scheme}://{ip}:{client}");
            let mut args = vec![
                format!("--name=m{i}"),
                format!(
                    "--data-dir={}",
                    c.dir.path().join(format!("etcd-m{i}")).display()
                ),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-token=drover-test".into(),
                "--initial-cluster-state=new".into(),
            ];
            if tls.is_some() {
                args.extend([
                    format!("--cert-file={}", c.pki_file("etcd.crt").display()),
                    format!("--key-file={}", c.pki_file("etcd.key").display()),
                    format!("--trusted-ca-file={}", c.pki_file("ca.crt").display()),
                    "--client-cert-auth".into(),
                ]);
            }
            members.push(Member {
                proc: None,
                client_url,
                args,
                log: c.log_path(&format!("etcd-m{i}")),
            });
        }
        let mut etcd = Self { members, tls };
        for i in 0..n {
            etcd.spawn(i);
        }
        for m in &etcd.members {
            m.proc
                .as_ref()
                .expect("started")
                .wait_log("ready to serve client requests");
        }
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let mut cmd = Command::new("etcd");
        cmd.args(&m.args);
        // A restarted member appends to the same log.
        let log = m.log.clone();
        m.proc = Some(Proc::spawn(&format!("etcd-m{i}"), cmd, log));
    }

    /// Kills member `i` (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Starts member `i` again on its data dir and waits until it serves.
    pub fn restart(&mut self, i: usize) {
        let before = std::fs::read_to_string(&self.members[i].log)
            .unwrap_or_default()
            .matches("ready to serve client requests")
            .count();
        self.spawn(i);
        let log = self.members[i].log.clone();
        crate::eventually("the etcd member serves again", crate::PATIENCE, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.matches("ready to serve client requests").count() > before).then_some(())
        });
    }

    /// The member that is etcd's Raft leader now, if a live one says so (plain HTTP
    /// members only).
    pub fn raft_leader(&self) -> Option<usize> {
        use std::io::{Read as _, Write as _};
        let status = |url: &str| -> Option<serde_json::Value> {
            let host = url.strip_prefix("http://")?.trim_end_matches('/');
            let mut s = std::net::TcpStream::connect(host).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            let body = "{}";
            write!(
                s,
                "POST /v3/maintenance/status HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            serde_json::from_str(answer.split_once("\r\n\r\n")?.1).ok()
        };
        self.members.iter().position(|m| {
            m.proc.is_some()
                && status(&m.client_url).is_some_and(|v| {
                    v["leader"].as_str().is_some() && v["leader"] == v["header"]["member_id"]
                })
        })
    }

    /// Every member's client URL, comma-separated (`--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        let urls: Vec<&str> = self.members.iter().map(|m| m.client_url.as_str()).collect();
        urls.join(",")
    }

    /// A client of this cluster, for tests that look at the keys.
    pub fn client(&self) -> drover_controller::etcd::Etcd {
        let urls: Vec<String> = self.members.iter().map(|m| m.client_url.clone()).collect();
        drover_controller::etcd::Etcd::new(
            &urls,
            &self.tls.clone().unwrap_or_default(),
            Duration::from_secs(5),
        )
        .expect("etcd client")
    }
}

/// Starts controller `name` of a high-availability group on etcd, with its own log; returns it and its address once it listens.
pub fn start_controller(
    c: &Cluster,
    name: &str,
    etcd: &Etcd,
    prefix: &str,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    let cmd = Command::new(bin("drover-controller"));
    start_controller_cmd(c, cmd, name, etcd, prefix, "127.0.0.1:0", extra)
}

/// As [`start_controller`], from `cmd` (the controller binary, perhaps run in a network
/// namespace), listening on `listen`.
pub fn start_controller_cmd(
    c: &Cluster,
    mut cmd: Command,
    name: &str,
    etcd: &Etcd,
    prefix: &str,
    listen: &str,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    c.controller_args(&mut cmd, listen);
    cmd.args(["--store", "etcd", "--etcd-prefix", prefix]);
    // Endpoints the test gives in `extra` (a subset of the members) are left to it.
    if !extra.contains(&"--etcd-endpoints") {
        cmd.args(["--etcd-endpoints", &etcd.endpoints()]);
    }
    if let Some(tls) = &etcd.tls {
        for (flag, file) in [
            ("--etcd-ca", &tls.ca),
            ("--etcd-cert", &tls.cert),
            ("--etcd-key", &tls.key),
        ] {
            // A flag the test gives in `extra` is left to it.
            if !extra.contains(&flag) {
                cmd.arg(flag).arg(file.as_ref().expect("tls file"));
            }
        }
    }
    cmd.args(extra);
    let p = Proc::spawn(name, cmd, c.log_path(name));
    let log = p.wait_log("controller listening");
    (p, addr_in_log(&log, "controller listening"))
}

/// `--controller` for the CLI and agents: every address, comma-separated.
pub fn addrs(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    list.join(",")
}

/// Runs the `drover` CLI as client `ops` against the controllers `controllers`
/// (comma-separated).
pub fn drover(c: &Cluster, controllers: &str, args: &[&str]) -> CliOutput {
    drover_in(&c.pki, controllers, args)
}

/// As [`drover`], with the PKI directory `pki` (for threads, which cannot share a
/// [`Cluster`]).
pub fn drover_in(pki: &std::path::Path, controllers: &str, args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(bin("drover"));
    cmd.arg("--controller")
        .arg(controllers)
        .arg("--ca")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("ops.crt"))
        .arg("--key")
        .arg(pki.join("ops.key"))
        .arg("--timeout")
        .arg("10s")
        .args(args);
    run_cli(cmd, Duration::from_secs(30))
}

impl Etcd {
    /// Whether etcd's history before `revision` is compacted away: a read at it is
    /// refused as compacted, by the first member that answers.
    pub fn compacted_past(&self, revision: i64) -> bool {
        assert!(self.tls.is_none(), "reads plain-HTTP members only");
        let body =
            serde_json::json!({ "key": "AA==", "revision": revision.to_string() }).to_string();
        self.members
            .iter()
            .filter(|m| m.proc.is_some())
            .find_map(|m| http_answer(m.client_url.strip_prefix("http://")?, "/v3/kv/range", &body))
            .is_some_and(|(_, answer)| answer.contains("required revision has been compacted"))
    }

    /// Every version of `key` still in etcd's history (the history checks run their
    /// controllers with compaction off), oldest first: its mod revision and value. Read from the first member that
    /// answers, revision by revision (the controllers' client reads only the newest).
    pub fn versions(&self, key: &[u8]) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut revision = 0;
        while let Some((mod_revision, value)) = self.range_at(key, revision) {
            out.push((mod_revision, value));
            revision = mod_revision - 1;
            if revision < 1 {
                break;
            }
        }
        out.reverse();
        out
    }

    /// `key` as it was at `revision` (0: now), from the first member that answers.
    fn range_at(&self, key: &[u8], revision: i64) -> Option<(i64, Vec<u8>)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        assert!(self.tls.is_none(), "versions reads plain-HTTP members only");
        let body = serde_json::json!({ "key": b64.encode(key), "revision": revision.to_string() })
            .to_string();
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let Some(hostport) = m.client_url.strip_prefix("http://") else {
                continue;
            };
            let Some(answer) = http_post(hostport, "/v3/kv/range", &body) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&answer).ok()?;
            let kv = v["kvs"].as_array()?.first()?;
            let number = |f: &serde_json::Value| {
                f.as_str()
                    .and_then(|s| s.parse().ok())
                    .or_else(|| f.as_i64())
            };
            let value = b64.decode(kv["value"].as_str().unwrap_or("")).ok()?;
            return Some((number(&kv["mod_revision"])?, value));
        }
        None
    }
}

/// The body of an HTTP/1.0 POST of `body` to `hostport` (HTTP/1.0, so that the answer is
/// neither chunked nor kept alive); `None` on any error.
fn http_post(hostport: &str, path: &str, body: &str) -> Option<String> {
    let (ok, body) = http_answer(hostport, path, body)?;
    ok.then_some(body)
}

/// As [`http_post`], whatever the status: whether it was 200, and the body.
fn http_answer(hostport: &str, path: &str, body: &str) -> Option<(bool, String)> {
    use std::io::{Read, Write};
    let addr: SocketAddr = hostport.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200");
    Some((ok, body.to_owned()))
}
