//! The `drover-agent` daemon: flags, config file, logging, signals and systemd
//! notifications around [`drover_agent::Agent`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use drover_agent::backoff::Backoff;
use drover_agent::cgroup::CgroupSetting;
use drover_agent::logs::LogConfig;
use drover_agent::{Agent, Config};
use drover_daemon::{check_liveness, humantime_opt, missing, notify};
use drover_net::{TlsFiles, TransportSettings};
use serde::Deserialize;

/// drover's agent: runs and watches the node processes of this host for the controller.
///
/// Every flag can also be given as the environment variable shown, or as a key of the
/// `--config` file (`_` for `-`); flags and environment win over the file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML file with any of the settings below.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
    /// This instance's name; must match the name in the agent's certificate.
    #[arg(long, env = "DROVER_NAME")]
    name: Option<String>,
    /// The controller to connect to, as HOST:PORT.
    #[arg(long, env = "DROVER_CONTROLLER")]
    controller: Option<String>,
    /// Listen for the controller to connect to this agent instead (or as well), on
    /// ADDR:PORT (Zeek's controller-to-agent mode; the default agent port is 2151).
    #[arg(long, env = "DROVER_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Directory for node records, logs and working directories
    /// [default: /var/lib/drover-agent].
    #[arg(long, env = "DROVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "DROVER_CA")]
    ca: Option<PathBuf>,
    /// This agent's certificate (PEM).
    #[arg(long, env = "DROVER_CERT")]
    cert: Option<PathBuf>,
    /// This agent's private key (PEM, mode 0600).
    #[arg(long, env = "DROVER_KEY")]
    key: Option<PathBuf>,
    /// Keep-alive interval of the connection [default: 2s; with several controllers, a
    /// quarter of the idle timeout, at most 2s].
    #[arg(long, env = "DROVER_KEEP_ALIVE", value_parser = drover_daemon::parse_duration)]
    keep_alive: Option<Duration>,
    /// The controller is lost after this long without hearing from it [default: 10s;
    /// with several controllers 2s, or four keep-alives if that is longer].
    #[arg(long, env = "DROVER_IDLE_TIMEOUT", value_parser = drover_daemon::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Longest delay between reconnection attempts [default: 5s].
    #[arg(long, env = "DROVER_RECONNECT_MAX", value_parser = drover_daemon::parse_duration)]
    reconnect_max: Option<Duration>,
    /// Longest time an operation on nodes may take before it answers with a timeout
    /// [default: 5s].
    #[arg(long, env = "DROVER_REQUEST_TIMEOUT", value_parser = drover_daemon::parse_duration)]
    request_timeout: Option<Duration>,
    /// What SIGTERM does to the nodes: `stop` them, or `keep` them running for the next
    /// agent process to adopt (for upgrades) [default: stop].
    #[arg(long, env = "DROVER_ON_EXIT")]
    on_exit: Option<OnExit>,
    /// Size at which a node's stdout or stderr file is rotated: bytes, or with K, M, G
    /// or T (powers of 1024) [default: 10M].
    #[arg(long, env = "DROVER_LOG_MAX_BYTES", value_parser = drover_daemon::parse_byte_size)]
    log_max_bytes: Option<u64>,
    /// Rotated files kept per stream [default: 5].
    #[arg(long, env = "DROVER_LOG_KEEP")]
    log_keep: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics [default: off].
    #[arg(long, env = "DROVER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The cgroup v2 directory the agent puts its nodes' cgroups in (it creates it), or
    /// `auto` (a subtree of the agent's own cgroup, if writable) or `none` (process
    /// groups only) [default: auto].
    #[arg(long, env = "DROVER_CGROUP_ROOT")]
    cgroup_root: Option<CgroupSetting>,
    /// Exit (non-zero, leaving the nodes to the next agent process) when the supervisor
    /// has not answered for this long: a stuck agent is worse than a restarted one;
    /// `0` never [default: 30s].
    #[arg(long, env = "DROVER_STALL_TIMEOUT", value_parser = drover_daemon::parse_duration)]
    stall_timeout: Option<Duration>,
    /// The least time between two reports of node states to the controller; the answer
    /// to a deploy, start, stop or restart is followed by a report at once all the same.
    /// Longer spares a controller whose agents' nodes change often; 10ms to 10min
    /// [default: 50ms].
    #[arg(long, env = "DROVER_REPORT_INTERVAL", value_parser = drover_daemon::parse_duration)]
    report_interval: Option<Duration>,
    /// Delete the directory of a node removed by a deploy (its logs, its working
    /// directory) once it has been removed this long; 1s or more [default: keep it].
    #[arg(long, env = "DROVER_REMOVED_NODE_RETENTION", value_parser = drover_daemon::parse_duration)]
    removed_node_retention: Option<Duration>,
    /// File of revoked certificates (lines `ROLE/NAME` or `serial:HEX`) the controller's
    /// is checked against; read at start and on reload (SIGHUP, or --watch-certs).
    #[arg(long, env = "DROVER_DENY_LIST")]
    deny_list: Option<PathBuf>,
    /// Reload the CA bundle, certificate, key and deny list when their files change, as
    /// on SIGHUP.
    #[arg(long, env = "DROVER_WATCH_CERTS")]
    watch_certs: bool,
}

/// What happens to nodes when the agent exits on SIGTERM or SIGINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnExit {
    /// Stop every node, then exit.
    Stop,
    /// Exit and leave the nodes running.
    Keep,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    controller: Option<String>,
    listen: Option<std::net::SocketAddr>,
    state_dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default, with = "humantime_opt")]
    keep_alive: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    reconnect_max: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    request_timeout: Option<Duration>,
    on_exit: Option<OnExit>,
    log_max_bytes: Option<drover_proto::resources::ByteSize>,
    log_keep: Option<u32>,
    metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default, deserialize_with = "cgroup_setting")]
    cgroup_root: Option<CgroupSetting>,
    #[serde(default, with = "humantime_opt")]
    stall_timeout: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    report_interval: Option<Duration>,
    #[serde(default, with = "humantime_opt")]
    removed_node_retention: Option<Duration>,
    deny_list: Option<PathBuf>,
    #[serde(default)]
    watch_certs: bool,
}

fn cgroup_setting<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<CgroupSetting>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// How soon an agent of a high-availability group (several `--controller` addresses)
/// gives up on a silent controller, unless told otherwise: about the controllers'
/// default leader lease, so that an agent whose leader died without a word (SIGKILL,
/// power loss) dials the others while the successor is being elected, and its handshake
/// is done by the time the successor serves. A single controller has no successor to
/// find, and keeps the longer default.
///
/// The price: a controller (or a path to it) silent for 2 s costs each agent its
/// connection and a reconnect (one handshake, a re-apply that changes nothing, a full
/// report; no node is touched), and the agent sends a keep-alive every half second
/// (four per timeout, so that one or two lost ones do not end the connection) where a
/// single controller's agents send one every 2 s.
const GROUP_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds of `--report-interval`: reports more often than every 10 ms would only cost
/// CPU, and a controller ten minutes behind is of no use.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(10);
const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(600);

/// The keep-alive interval and idle timeout: those given, and for the others the
/// defaults, which depend on whether the agent has several controllers (`group`).
fn liveness(
    keep_alive: Option<Duration>,
    idle_timeout: Option<Duration>,
    group: bool,
) -> (Duration, Duration) {
    let defaults = TransportSettings::default();
    if !group {
        return (
            keep_alive.unwrap_or(defaults.keep_alive),
            idle_timeout.unwrap_or(defaults.idle_timeout),
        );
    }
    let idle = idle_timeout.unwrap_or_else(|| match keep_alive {
        Some(k) => GROUP_IDLE_TIMEOUT.max(k * 4),
        None => GROUP_IDLE_TIMEOUT,
    });
    let keep_alive = keep_alive.unwrap_or_else(|| (idle / 4).min(defaults.keep_alive));
    (keep_alive, idle)
}

fn check_retention(r: Duration) -> Result<(), String> {
    if r < Duration::from_secs(1) {
        return Err(format!(
            "removed_node_retention {} is too short: allowed 1s or more",
            humantime::format_duration(r)
        ));
    }
    Ok(())
}

fn check_report_interval(d: Duration) -> Result<(), String> {
    if !(MIN_REPORT_INTERVAL..=MAX_REPORT_INTERVAL).contains(&d) {
        return Err(format!(
            "report_interval {} is out of range: allowed 10ms to 10min",
            humantime::format_duration(d)
        ));
    }
    Ok(())
}

/// What is wrong with a settings file's key whose value has the right type, for the
/// error naming its line (the same checks run on the flags after loading).
fn check_file_key(key: &str, v: &toml::Value) -> Option<String> {
    let dur = drover_daemon::duration_value(v);
    let defaults = LogConfig::default();
    let err = |r: anyhow::Result<()>| r.err().map(|e| e.to_string());
    match key {
        "keep_alive" => drover_daemon::check_keep_alive(dur?).err(),
        "removed_node_retention" => check_retention(dur?).err(),
        "report_interval" => check_report_interval(dur?).err(),
        "log_max_bytes" => {
            let b: drover_proto::resources::ByteSize = v.clone().try_into().ok()?;
            err(drover_daemon::check_log_limits(b.0, defaults.keep))
        }
        "log_keep" => {
            let keep = u32::try_from(v.as_integer()?).ok()?;
            err(drover_daemon::check_log_limits(defaults.max_bytes, keep))
        }
        "controller" => v.as_str()?.split(',').map(str::trim).find_map(|c| {
            drover_proto::name::host_of(c).is_none().then(|| {
                format!("'{c}' is not HOST:PORT (an IPv6 address in brackets, [ADDRESS]:PORT)")
            })
        }),
        _ => None,
    }
}

/// The agent's settings, and whether to watch the certificate files.
fn config(args: Args) -> anyhow::Result<(Config, bool)> {
    let file: FileConfig = match &args.config {
        Some(p) => drover_daemon::load_config_file_checked(p, check_file_key)?,
        None => FileConfig::default(),
    };
    let defaults = TransportSettings::default();
    let group = args
        .controller
        .as_deref()
        .or(file.controller.as_deref())
        .is_some_and(|c| c.contains(','));
    let (keep_alive, idle_timeout) = liveness(
        args.keep_alive.or(file.keep_alive),
        args.idle_timeout.or(file.idle_timeout),
        group,
    );
    let transport = TransportSettings {
        keep_alive,
        idle_timeout,
        ..defaults
    };
    check_liveness(transport.keep_alive, transport.idle_timeout)?;
    let defaults_log = LogConfig::default();
    let logs = LogConfig {
        max_bytes: args
            .log_max_bytes
            .or(file.log_max_bytes.map(|b| b.0))
            .unwrap_or(defaults_log.max_bytes),
        keep: args.log_keep.or(file.log_keep).unwrap_or(defaults_log.keep),
    };
    drover_daemon::check_log_limits(logs.max_bytes, logs.keep)?;
    let reconnect_max = args
        .reconnect_max
        .or(file.reconnect_max)
        .unwrap_or(Duration::from_secs(5));
    let watch_certs = args.watch_certs || file.watch_certs;
    let removed_node_retention = args.removed_node_retention.or(file.removed_node_retention);
    if let Some(r) = removed_node_retention {
        check_retention(r).map_err(anyhow::Error::msg)?;
    }
    let report_interval = args
        .report_interval
        .or(file.report_interval)
        .unwrap_or(drover_agent::DEFAULT_REPORT_INTERVAL);
    check_report_interval(report_interval).map_err(anyhow::Error::msg)?;
    let config = Config {
        name: args.name.or(file.name).ok_or_else(|| missing("name"))?,
        controller: args.controller.or(file.controller),
        listen: args.listen.or(file.listen),
        state_dir: args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/drover-agent")),
        tls: TlsFiles {
            ca: args.ca.or(file.ca).ok_or_else(|| missing("ca"))?,
            cert: args.cert.or(file.cert).ok_or_else(|| missing("cert"))?,
            key: args.key.or(file.key).ok_or_else(|| missing("key"))?,
        },
        transport,
        reconnect: Backoff::new(Duration::from_millis(200), reconnect_max, 0.2),
        request_timeout: args
            .request_timeout
            .or(file.request_timeout)
            .unwrap_or(Duration::from_secs(5)),
        stop_nodes_on_exit: args.on_exit.or(file.on_exit).unwrap_or(OnExit::Stop) == OnExit::Stop,
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        cgroup: args.cgroup_root.or(file.cgroup_root).unwrap_or_default(),
        stall_timeout: Some(
            args.stall_timeout
                .or(file.stall_timeout)
                .unwrap_or(Duration::from_secs(30)),
        )
        .filter(|d| !d.is_zero()),
        deny_list: args.deny_list.or(file.deny_list),
        report_interval,
        removed_node_retention,
        logs,
    };
    Ok((config, watch_certs))
}

fn main() -> std::process::ExitCode {
    if let Some(code) = drover_agent::keeper::run_if_keeper() {
        return code;
    }
    let args = Args::parse();
    drover_daemon::main_with_own_watchdog(|shutdown| async move {
        let (config, watch_certs) = config(args)?;
        let status = match (&config.controller, &config.listen) {
            (Some(c), Some(l)) => format!("dialling the controller at {c}, listening on {l}"),
            (Some(c), None) => format!("dialling the controller at {c}"),
            (None, Some(l)) => format!("listening for the controller on {l}"),
            (None, None) => String::new(),
        };
        let agent = Agent::new(config)?;
        let reloader = agent.reloader();
        drover_daemon::reload::spawn(
            reloader.files(),
            watch_certs,
            shutdown.clone(),
            move |cause| {
                // The outcome is logged and counted.
                let _ = reloader.reload(cause);
                reloader.retry_after()
            },
        )?;
        agent
            .run_with_ready(shutdown, || {
                notify::status(&status);
                notify::ready();
            })
            .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_agent_of_one_controller_keeps_the_transport_defaults() {
        let d = TransportSettings::default();
        assert_eq!(liveness(None, None, false), (d.keep_alive, d.idle_timeout));
        assert_eq!(
            liveness(Some(ms(700)), None, false),
            (ms(700), d.idle_timeout)
        );
    }

    #[test]
    fn an_agent_of_a_group_notices_a_silent_controller_within_about_a_lease() {
        assert_eq!(liveness(None, None, true), (ms(500), ms(2000)));
        // What is given stands; the other follows it.
        assert_eq!(
            liveness(None, Some(ms(10_000)), true),
            (ms(2000), ms(10_000))
        );
        assert_eq!(liveness(None, Some(ms(1000)), true), (ms(250), ms(1000)));
        assert_eq!(liveness(Some(ms(1500)), None, true), (ms(1500), ms(6000)));
        assert_eq!(liveness(Some(ms(300)), None, true), (ms(300), ms(2000)));
        assert_eq!(
            liveness(Some(ms(100)), Some(ms(900)), true),
            (ms(100), ms(900))
        );
    }
}
