//! The `drover-controller` daemon: flags, config file, logging, signals and systemd
//! notifications around [`drover_controller::Controller`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use drover_controller::audit;
use drover_controller::etcd::{Etcd, EtcdTls};
use drover_controller::ha::HaSettings;
use drover_controller::zeek::DeployMode;
use drover_controller::{Config, Controller, DEFAULT_PORT};
use drover_daemon::{check_liveness, humantime_opt, missing, notify};
use drover_net::{TlsFiles, TransportSettings};
use drover_proto::access::Scope;
use drover_proto::ports::PortPolicy;
use serde::Deserialize;

/// drover's controller: holds the cluster configuration and talks to every agent.
///
/// Every flag can also be given as the environment variable shown, or as a key of the
/// `--config` file (`_` for `-`); flags and environment win over the file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML file with any of the settings below.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
    /// Address and port to listen on [default: 0.0.0.0:2150].
    #[arg(long, env = "DROVER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for persistent state [default: /var/lib/drover-controller].
    #[arg(long, env = "DROVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "DROVER_CA")]
    ca: Option<PathBuf>,
    /// This controller's certificate (PEM).
    #[arg(long, env = "DROVER_CERT")]
    cert: Option<PathBuf>,
    /// This controller's private key (PEM, mode 0600).
    #[arg(long, env = "DROVER_KEY")]
    key: Option<PathBuf>,
    /// Keep-alive interval of connections [default: 2s].
    #[arg(long, env = "DROVER_KEEP_ALIVE", value_parser = drover_daemon::parse_duration)]
    keep_alive: Option<Duration>,
    /// A peer silent for this long is lost [default: 10s].
    #[arg(long, env = "DROVER_IDLE_TIMEOUT", value_parser = drover_daemon::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Longest wait for agents' answers before a request answers with a timeout
    /// [default: 10s].
    #[arg(long, env = "DROVER_REQUEST_TIMEOUT", value_parser = drover_daemon::parse_duration)]
    request_timeout: Option<Duration>,
    /// File of revoked certificates (lines `ROLE/NAME` or `serial:HEX`), checked on every
    /// new connection; read at start and on reload (SIGHUP, or --watch-certs).
    #[arg(long, env = "DROVER_DENY_LIST")]
    deny_list: Option<PathBuf>,
    /// Reload the CA bundle, certificate, key and deny list when their files change, as
    /// on SIGHUP.
    #[arg(long, env = "DROVER_WATCH_CERTS")]
    watch_certs: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics [default: off].
    #[arg(long, env = "DROVER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve zeek-client at ws://ADDR:PORT/v1/messages/json (Zeek's port is 2149; plain
    /// WebSocket unless --zeek-websocket-tls) [default: off].
    #[arg(long, env = "DROVER_ZEEK_WEBSOCKET")]
    zeek_websocket: Option<SocketAddr>,
    /// Serve zeek-client over wss:// instead, with this controller's certificate, and
    /// require a client certificate from the cluster CA (zeek-client's ssl.certificate,
    /// ssl.keyfile and ssl.cafile settings).
    #[arg(long, env = "DROVER_ZEEK_WEBSOCKET_TLS")]
    zeek_websocket_tls: bool,
    /// TOML file of `[roles.NAME] command = [...]` templates (and `[defaults]`) for the
    /// nodes of configurations staged with zeek-client.
    #[arg(long, env = "DROVER_ZEEK_ROLES")]
    zeek_roles: Option<PathBuf>,
    /// What a deploy through zeek-client restarts: `restart-all` (as Zeek: every node of
    /// a new configuration) or `changed` (as drover's CLI: nodes whose spec changed)
    /// [default: restart-all].
    #[arg(long, env = "DROVER_ZEEK_DEPLOY", value_parser = parse_deploy_mode)]
    zeek_deploy: Option<DeployMode>,
    /// The most a zeek-client may do: viewer, operator or admin. Every client of a ws://
    /// front, which has no client certificates, acts with this scope; a wss:// client
    /// with its certificate's scope, at most this one [default: admin].
    #[arg(long, env = "DROVER_ZEEK_SCOPE", value_parser = parse_scope)]
    zeek_scope: Option<Scope>,
    /// Size at which the audit trail (<state dir>/audit.jsonl) is rotated: bytes, or
    /// with K, M, G or T (powers of 1024), 4K to 1T [default: 10M].
    #[arg(long, env = "DROVER_AUDIT_MAX_BYTES", value_parser = drover_daemon::parse_byte_size)]
    audit_max_bytes: Option<u64>,
    /// Rotated audit files kept (0 to 1000) [default: 5].
    #[arg(long, env = "DROVER_AUDIT_KEEP")]
    audit_keep: Option<u32>,
    /// Give managers, loggers and proxies of Zeek clusters that lack a port one (Zeek's
    /// auto_assign_broker_ports); when false, staging such a cluster fails
    /// [default: true].
    #[arg(long, env = "DROVER_AUTO_ASSIGN_BROKER_PORTS", action = clap::ArgAction::Set)]
    auto_assign_broker_ports: Option<bool>,
    /// First auto-assigned Broker port [default: 2200].
    #[arg(long, env = "DROVER_AUTO_ASSIGN_BROKER_START_PORT")]
    auto_assign_broker_start_port: Option<u16>,
    /// Give every node of a Zeek cluster that lacks a metrics_port one, numbered per
    /// host (Zeek's auto_assign_metrics_ports) [default: true].
    #[arg(long, env = "DROVER_AUTO_ASSIGN_METRICS_PORTS", action = clap::ArgAction::Set)]
    auto_assign_metrics_ports: Option<bool>,
    /// First auto-assigned metrics port [default: 9000].
    #[arg(long, env = "DROVER_AUTO_ASSIGN_METRICS_START_PORT")]
    auto_assign_metrics_start_port: Option<u16>,
    /// Where the state lives: `file` (the state dir) or `etcd` (shared by the
    /// controllers of a high-availability group, which elect a leader) [default: file].
    #[arg(long, env = "DROVER_STORE", value_parser = ["file", "etcd"])]
    store: Option<String>,
    /// etcd endpoints, comma-separated (`http://HOST:2379` or `https://...`).
    #[arg(long, env = "DROVER_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Prefix of every etcd key this group uses [default: /drover/].
    #[arg(long, env = "DROVER_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// CA of etcd's server certificates (PEM), for https:// endpoints.
    #[arg(long, env = "DROVER_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd (PEM), when etcd requires one.
    #[arg(long, env = "DROVER_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// Key of the etcd client certificate (PEM).
    #[arg(long, env = "DROVER_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// The leader's lease in etcd: a dead leader is replaced after at most this long; a
    /// leader that cannot renew refuses changes after two thirds of it (still answering
    /// reads, marked stale) and lets its agents go after twice it [default: 2s].
    #[arg(long, env = "DROVER_LEADER_LEASE", value_parser = drover_daemon::parse_duration)]
    leader_lease: Option<Duration>,
    /// How often the leader compacts etcd's history, keeping one interval of it: etcd
    /// keeps every version of every key until compacted, so without it (or etcd's own
    /// `--auto-compaction-retention`) each deploy grows etcd's database until its
    /// quota stops every write. `0s` leaves compaction to etcd [default: 5m].
    #[arg(long, env = "DROVER_ETCD_COMPACT_EVERY", value_parser = drover_daemon::parse_duration)]
    etcd_compact_every: Option<Duration>,
    /// The address agents and clients dial to reach this controller, told to them by the
    /// followers [default: the --listen address, unless it is a wildcard].
    #[arg(long, env = "DROVER_ADVERTISE")]
    advertise: Option<String>,
}

fn parse_deploy_mode(s: &str) -> Result<DeployMode, String> {
    s.parse()
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default, with = "humantime_opt")]
    keep_alive: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    request_timeout: Option<Duration>,
    deny_list: Option<PathBuf>,
    #[serde(default)]
    watch_certs: bool,
    metrics_listen: Option<SocketAddr>,
    zeek_websocket: Option<SocketAddr>,
    #[serde(default)]
    zeek_websocket_tls: bool,
    zeek_roles: Option<PathBuf>,
    zeek_deploy: Option<String>,
    zeek_scope: Option<String>,
    audit_max_bytes: Option<drover_proto::resources::ByteSize>,
    audit_keep: Option<u32>,
    auto_assign_broker_ports: Option<bool>,
    auto_assign_broker_start_port: Option<u16>,
    auto_assign_metrics_ports: Option<bool>,
    auto_assign_metrics_start_port: Option<u16>,
    store: Option<String>,
    #[serde(default)]
    etcd_endpoints: Vec<String>,
    etcd_prefix: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    #[serde(default, with = "humantime_opt")]
    leader_lease: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    etcd_compact_every: Option<Duration>,
    advertise: Option<String>,
}

/// The HA settings, when the store is etcd.
fn ha(
    args: &mut Args,
    file: &mut FileConfig,
    listen: SocketAddr,
) -> anyhow::Result<Option<HaSettings>> {
    let store = args.store.take().or(file.store.take());
    match store.as_deref() {
        None | Some("file") => {
            anyhow::ensure!(
                args.etcd_endpoints.is_empty() && file.etcd_endpoints.is_empty(),
                "etcd endpoints are given but the store is the state dir: add --store etcd"
            );
            return Ok(None);
        }
        Some("etcd") => {}
        Some(other) => anyhow::bail!("store: '{other}' is not a store (file or etcd)"),
    }
    let endpoints = if args.etcd_endpoints.is_empty() {
        std::mem::take(&mut file.etcd_endpoints)
    } else {
        std::mem::take(&mut args.etcd_endpoints)
    };
    anyhow::ensure!(
        !endpoints.is_empty(),
        "--store etcd needs --etcd-endpoints (for example http://127.0.0.1:2379)"
    );
    let tls = EtcdTls {
        ca: args.etcd_ca.take().or(file.etcd_ca.take()),
        cert: args.etcd_cert.take().or(file.etcd_cert.take()),
        key: args.etcd_key.take().or(file.etcd_key.take()),
    };
    let lease = args
        .leader_lease
        .or(file.leader_lease)
        .unwrap_or(Duration::from_secs(2));
    check_lease(lease).map_err(|e| anyhow::anyhow!("leader_lease: {e}"))?;
    let mut prefix = args
        .etcd_prefix
        .take()
        .or(file.etcd_prefix.take())
        .unwrap_or_else(|| "/drover/".into());
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let advertise = match args.advertise.take().or(file.advertise.take()) {
        Some(a) => {
            check_advertise(&a).map_err(|e| anyhow::anyhow!("--advertise {e}"))?;
            a
        }
        // Filled in with the address bound (the port may be 0 here).
        None if !listen.ip().is_unspecified() => String::new(),
        None => anyhow::bail!(
            "--store etcd needs --advertise HOST:PORT (the address agents and clients dial to reach this controller) when --listen is a wildcard address"
        ),
    };
    let compact_every = args
        .etcd_compact_every
        .or(file.etcd_compact_every)
        .unwrap_or(Duration::from_secs(300));
    check_compact_every(compact_every).map_err(|e| anyhow::anyhow!("etcd_compact_every: {e}"))?;
    let etcd = Etcd::new(&endpoints, &tls, Duration::from_secs(2))?;
    Ok(Some(HaSettings {
        etcd,
        prefix,
        lease,
        advertise,
        compact_every: (!compact_every.is_zero()).then_some(compact_every),
    }))
}

fn check_lease(lease: Duration) -> Result<(), String> {
    if lease < Duration::from_secs(2) || lease.subsec_nanos() != 0 {
        return Err(format!(
            "{} is not a whole number of seconds of at least 2s (etcd leases count seconds)",
            humantime::format_duration(lease)
        ));
    }
    Ok(())
}

fn check_compact_every(every: Duration) -> Result<(), String> {
    if !every.is_zero() && every < Duration::from_secs(1) {
        return Err(format!(
            "{} is neither 0s (off) nor at least 1s",
            humantime::format_duration(every)
        ));
    }
    Ok(())
}

fn check_advertise(a: &str) -> Result<(), String> {
    let Some(host) = drover_proto::name::host_of(a) else {
        return Err(format!(
            "'{a}' is not HOST:PORT (an IPv6 address in brackets, [ADDRESS]:PORT): agents \
             and clients dial it"
        ));
    };
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "'{a}' is a wildcard address, which agents and clients cannot dial: give this \
             controller's own address or name"
        ));
    }
    Ok(())
}

/// What is wrong with a settings file's key whose value has the right type, for the
/// error naming its line (the same checks run on the flags after loading).
fn check_file_key(key: &str, v: &toml::Value) -> Option<String> {
    let dur = drover_daemon::duration_value(v);
    match key {
        "keep_alive" => drover_daemon::check_keep_alive(dur?).err(),
        "leader_lease" => check_lease(dur?).err(),
        "etcd_compact_every" => check_compact_every(dur?).err(),
        "advertise" => check_advertise(v.as_str()?).err(),
        "zeek_deploy" => parse_deploy_mode(v.as_str()?).err(),
        "zeek_scope" => parse_scope(v.as_str()?).err(),
        "store" => (!matches!(v.as_str()?, "file" | "etcd")).then(|| {
            format!(
                "'{}' is not a store (file or etcd)",
                v.as_str().unwrap_or("")
            )
        }),
        "audit_max_bytes" => {
            let b: drover_proto::resources::ByteSize = v.clone().try_into().ok()?;
            (!audit::MAX_BYTES_RANGE.contains(&b.0))
                .then(|| format!("{} is out of range: 4096 to 1099511627776", b.0))
        }
        "audit_keep" => {
            let keep = v.as_integer()?;
            (keep > i64::from(audit::MAX_KEEP))
                .then(|| format!("{keep} is out of range: 0 to {}", audit::MAX_KEEP))
        }
        "auto_assign_broker_start_port" | "auto_assign_metrics_start_port" => {
            (v.as_integer()? == 0).then(|| "an auto-assignment start port must not be 0".to_owned())
        }
        _ => None,
    }
}

/// A start port when assignment is on.
fn start(on: Option<bool>, port: Option<u16>, default: u16) -> anyhow::Result<Option<u16>> {
    let port = port.unwrap_or(default);
    anyhow::ensure!(port != 0, "an auto-assignment start port must not be 0");
    Ok(on.unwrap_or(true).then_some(port))
}

/// The controller's settings, and whether to watch the certificate files.
fn config(mut args: Args) -> anyhow::Result<(Config, bool)> {
    let mut file: FileConfig = match &args.config {
        Some(p) => drover_daemon::load_config_file_checked(p, check_file_key)?,
        None => FileConfig::default(),
    };
    let defaults = TransportSettings::default();
    let transport = TransportSettings {
        keep_alive: args
            .keep_alive
            .or(file.keep_alive)
            .unwrap_or(defaults.keep_alive),
        idle_timeout: args
            .idle_timeout
            .or(file.idle_timeout)
            .unwrap_or(defaults.idle_timeout),
        ..defaults
    };
    check_liveness(transport.keep_alive, transport.idle_timeout)?;
    let watch_certs = args.watch_certs || file.watch_certs;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)));
    let ha = ha(&mut args, &mut file, listen)?;
    let config = Config {
        listen,
        ha,
        state_dir: args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/drover-controller")),
        tls: TlsFiles {
            ca: args.ca.or(file.ca).ok_or_else(|| missing("ca"))?,
            cert: args.cert.or(file.cert).ok_or_else(|| missing("cert"))?,
            key: args.key.or(file.key).ok_or_else(|| missing("key"))?,
        },
        transport,
        request_timeout: args
            .request_timeout
            .or(file.request_timeout)
            .unwrap_or(Duration::from_secs(10)),
        deny_list: args.deny_list.or(file.deny_list),
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        zeek_websocket: args.zeek_websocket.or(file.zeek_websocket),
        zeek_websocket_tls: args.zeek_websocket_tls || file.zeek_websocket_tls,
        zeek_roles: args.zeek_roles.or(file.zeek_roles),
        zeek_deploy: match args.zeek_deploy {
            Some(m) => m,
            None => match file.zeek_deploy {
                Some(s) => s
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("zeek_deploy: {e}"))?,
                None => DeployMode::default(),
            },
        },
        zeek_scope: match args.zeek_scope {
            Some(s) => s,
            None => match file.zeek_scope {
                Some(s) => s
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("zeek_scope: {e}"))?,
                None => Scope::Admin,
            },
        },
        audit_max_bytes: {
            let bytes = args
                .audit_max_bytes
                .or(file.audit_max_bytes.map(|b| b.0))
                .unwrap_or(audit::DEFAULT_MAX_BYTES);
            anyhow::ensure!(
                audit::MAX_BYTES_RANGE.contains(&bytes),
                "audit_max_bytes {bytes} is out of range: 4096 to 1099511627776"
            );
            bytes
        },
        audit_keep: {
            let keep = args
                .audit_keep
                .or(file.audit_keep)
                .unwrap_or(audit::DEFAULT_KEEP);
            anyhow::ensure!(
                keep <= audit::MAX_KEEP,
                "audit_keep {keep} is out of range: 0 to {}",
                audit::MAX_KEEP
            );
            keep
        },
        ports: PortPolicy {
            broker_start: start(
                args.auto_assign_broker_ports
                    .or(file.auto_assign_broker_ports),
                args.auto_assign_broker_start_port
                    .or(file.auto_assign_broker_start_port),
                drover_proto::ports::BROKER_START,
            )?,
            metrics_start: start(
                args.auto_assign_metrics_ports
                    .or(file.auto_assign_metrics_ports),
                args.auto_assign_metrics_start_port
                    .or(file.auto_assign_metrics_start_port),
                drover_proto::ports::METRICS_START,
            )?,
            controller_port: None,
        },
    };
    Ok((config, watch_certs))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    drover_daemon::main(|shutdown| async move {
        let (config, watch_certs) = config(args)?;
        let controller = Controller::bind(config)?;
        let reloader = controller.reloader();
        drover_daemon::reload::spawn(
            reloader.files(),
            watch_certs,
            shutdown.clone(),
            move |cause| {
                // The outcome is logged, counted and published as an event.
                let _ = reloader.reload(cause);
                reloader.retry_after()
            },
        )?;
        let addr = controller.local_addr();
        controller
            .run_with_ready(shutdown, || {
                notify::status(&format!("listening on {addr}"));
                notify::ready();
            })
            .await?;
        Ok(())
    })
}
