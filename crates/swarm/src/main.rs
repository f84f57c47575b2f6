//! `drover-swarm`: hollow agents for control-plane benchmarks, as Kubernetes' hollow
//! nodes. Each simulated agent has its own certificate (issued in memory by the cluster
//! CA) and its own QUIC connection to a real controller, and speaks the real protocol:
//! Hello, status reports, GetNodes, Apply, Restart/Stop/Start. Its nodes are simulated:
//! applying a configuration marks them RUNNING at once, no process is started.
//!
//! It then measures, as a client, what the controller does with that many agents and
//! prints one JSON object: connect time, get-nodes latency, deploy time, event fan-out
//! to monitor subscribers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use drover_net::Credentials;
use drover_net::conn::{self, TransportSettings};
use drover_pki::{Ca, LeafSpec};
use drover_proto::model::{Configuration, Instance, MgmtResult, MgmtRole, Node, NodeStatus, State};
use drover_proto::msg::{
    API_VERSION, AgentRequest, AgentResponse, ClientRequest, ClientResponse, ControllerRequest,
    Event, Hello, PeerRole, Request, WireError,
};

/// Hollow agents against a real controller.
#[derive(Debug, Parser)]
struct Args {
    /// The controller, or every controller of a high-availability group
    /// (comma-separated): hollow agents and clients follow a follower's answer to the
    /// leader, as real ones do.
    #[arg(long, value_delimiter = ',', required = true)]
    controller: Vec<SocketAddr>,
    /// PKI directory with ca.crt and ca.key (agent and client certificates are issued
    /// in memory).
    #[arg(long)]
    pki: PathBuf,
    /// Simulated agents.
    #[arg(long)]
    agents: usize,
    /// Simulated nodes per agent.
    #[arg(long, default_value_t = 10)]
    nodes_per_agent: usize,
    /// get-nodes calls to time.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// monitor subscribers for the fan-out measurement.
    #[arg(long, default_value_t = 10)]
    monitors: usize,
    /// Seconds to stay idle (keep-alives only) after the measurements, for the caller
    /// to measure idle cost; the swarm keeps its connections open meanwhile.
    #[arg(long, default_value_t = 0)]
    idle_secs: u64,
    /// Hollow agents that share one UDP socket (quinn endpoint). Real agents each have
    /// their own; sharing one socket among many makes the swarm's single endpoint driver
    /// and socket buffer the bottleneck instead of the controller.
    #[arg(long, default_value_t = 8)]
    agents_per_socket: usize,
    /// Milliseconds to pause once every agent is connected (after printing `connected`
    /// on stderr), for the caller to measure the controller with idle agents.
    #[arg(long, default_value_t = 0)]
    settle_ms: u64,
    /// Milliseconds between keep-alives of every connection (real agents' default:
    /// 2000).
    #[arg(long, default_value_t = 2000)]
    keep_alive_ms: u64,
    /// Milliseconds of silence after which a connection is lost (real agents' default:
    /// 10000): how soon a hollow agent notices a controller that died without a word.
    #[arg(long, default_value_t = 10_000)]
    idle_timeout_ms: u64,
}

/// Hollow agents that needed more than one attempt to connect.
static RETRIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn creds(ca: &Ca, role: PeerRole, name: &str) -> anyhow::Result<Credentials> {
    let leaf = ca.issue(&LeafSpec::new(role, name))?;
    Ok(Credentials::from_pem(
        ca.pem().cert.as_bytes(),
        leaf.cert.as_bytes(),
        leaf.key.as_bytes(),
    )?)
}

/// One hollow agent's simulated nodes.
#[derive(Debug, Default)]
struct Hollow {
    nodes: BTreeMap<String, NodeStatus>,
    config_id: Option<String>,
    /// The deploy generation applied last, as real agents report it in their own entry.
    generation: u64,
}

/// The simulated nodes and the agent's own entry, which carries the generation it
/// applied.
fn statuses(h: &Mutex<Hollow>, instance: &str) -> Vec<NodeStatus> {
    let g = h.lock().expect("lock");
    let mut all: Vec<NodeStatus> = g.nodes.values().cloned().collect();
    let mut me = NodeStatus::new(instance, State::Running, MgmtRole::Agent);
    me.generation = Some(g.generation).filter(|g| *g > 0);
    all.push(me);
    all
}

async fn run_agent(
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    controllers: Arc<[String]>,
    name: String,
    conns: Arc<Mutex<Vec<quinn::Connection>>>,
    settings: TransportSettings,
) -> anyhow::Result<()> {
    let hollow = Arc::new(Mutex::new(Hollow::default()));
    let mut hello = Hello {
        api_version: API_VERSION,
        role: PeerRole::Agent,
        name: name.clone(),
        software: "drover-swarm".into(),
        lost_term: None,
    };
    let mut memory = conn::LeaderMemory::default();
    // As real agents do: dial again with a growing, jittered pause when the
    // controller is too busy to finish the handshake and Hello in time, and again
    // whenever the connection is lost (a leader that died or stepped down): the
    // simulated nodes and the applied generation are kept, as a real agent's are.
    let mut first = true;
    loop {
        hello.lost_term = memory.lost_term();
        let est = dial_with_backoff(
            &endpoint,
            &cfg,
            &controllers,
            &name,
            &hello,
            first,
            &mut memory,
        )
        .await?;
        first = false;
        let reason = serve_one(est.conn, &hollow, &name, &conns, settings).await;
        say_lost(&name, &reason);
        memory.lost();
    }
}

/// Says on stderr, for the first few, that a hollow agent lost its controller.
fn say_lost(name: &str, reason: &str) {
    let n = LOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n < 3 {
        eprintln!("agent {name} lost its controller ({reason}); reconnecting");
    }
}

/// Hollow agents that lost their controller so far (and dialled again).
static LOST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Dials the leader, again and again with a growing, jittered pause; after a lost
/// connection (`first` false) forever, with a first pause of up to half a second so
/// that a fleet does not come back all at once, and, as a real agent of a group, with
/// the first pauses at most 0.8 s (a failover's successor serves within about a lease).
async fn dial_with_backoff(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    controllers: &[String],
    name: &str,
    hello: &Hello,
    first: bool,
    memory: &mut conn::LeaderMemory,
) -> anyhow::Result<conn::Established> {
    let jitter = |attempts: u32, range: u64| {
        use std::hash::{BuildHasher, RandomState};
        Duration::from_millis(RandomState::new().hash_one((name, attempts)) % range)
    };
    if !first {
        tokio::time::sleep(jitter(0, 500)).await;
    }
    // A reconnection waits for a handshake as long as a real agent does (its default
    // Hello timeout); the first connections of a fleet, all at once, longer.
    let timeout = if first {
        Duration::from_secs(10)
    } else {
        TransportSettings::default().hello_timeout
    };
    let mut pause = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let dialled = conn::dial_leader_with(controllers, memory, |target| {
            let (endpoint, cfg, hello) = (endpoint, cfg.clone(), hello.clone());
            async move {
                let addr: SocketAddr = target.parse().map_err(|_| {
                    drover_net::NetError::Connection(format!("bad controller address {target}"))
                })?;
                conn::dial(
                    endpoint,
                    Some(cfg),
                    addr,
                    "127.0.0.1",
                    hello,
                    PeerRole::Controller,
                    None,
                    timeout,
                )
                .await
            }
        })
        .await;
        match dialled {
            Ok(est) => {
                if attempts > 1 && first {
                    RETRIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Ok(est);
            }
            Err(_) if attempts < 30 || !first => {
                let mut wait = pause + jitter(attempts, 100);
                if !first && attempts <= 5 && controllers.len() > 1 {
                    wait = wait.min(Duration::from_millis(400) + jitter(attempts, 400));
                }
                tokio::time::sleep(wait).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Serves one connection to the controller until it is lost; the reason.
async fn serve_one(
    conn: quinn::Connection,
    hollow: &Arc<Mutex<Hollow>>,
    name: &str,
    conns: &Mutex<Vec<quinn::Connection>>,
    settings: TransportSettings,
) -> String {
    conns.lock().expect("lock").push(conn.clone());
    let h = hollow.clone();
    let instance = name.to_owned();
    let reporter_conn = conn.clone();
    let handler = move |req: Request<ControllerRequest>| {
        let h = h.clone();
        let instance = instance.clone();
        let reporter = reporter_conn.clone();
        async move {
            let reply = match req.body {
                ControllerRequest::Ping | ControllerRequest::Reconnect => AgentResponse::Ack,
                ControllerRequest::GetNodes => AgentResponse::Nodes(statuses(&h, &instance)),
                ControllerRequest::Apply {
                    config, generation, ..
                } => {
                    let mut results = Vec::new();
                    {
                        let mut g = h.lock().expect("lock");
                        // A newer generation replaces the nodes; a repeat or an older one
                        // changes nothing. Controllers without generations send 0 and
                        // are told apart by the config id.
                        let new = if generation == 0 {
                            g.config_id.as_deref() != Some(config.id.as_str())
                        } else {
                            generation > g.generation
                        };
                        if new {
                            g.config_id = Some(config.id.clone());
                            g.generation = g.generation.max(generation);
                            g.nodes.clear();
                            for n in config.nodes_on(&instance) {
                                let mut s =
                                    NodeStatus::new(&n.name, State::Running, MgmtRole::None);
                                s.pid = Some(1);
                                s.ready = true;
                                s.generation = Some(generation).filter(|g| *g > 0);
                                g.nodes.insert(n.name.clone(), s);
                                results.push(MgmtResult::ok(&req.id, None).on_node(&n.name));
                            }
                        }
                    }
                    let report = AgentRequest::Status {
                        statuses: statuses(&h, &instance),
                        full: true,
                    };
                    tokio::spawn(async move {
                        let _ = conn::call::<_, AgentResponse>(
                            &reporter,
                            &report,
                            Duration::from_secs(30),
                        )
                        .await;
                    });
                    AgentResponse::Results(results)
                }
                ControllerRequest::Restart { nodes }
                | ControllerRequest::Stop { nodes }
                | ControllerRequest::Start { nodes } => AgentResponse::Results(
                    nodes
                        .iter()
                        .map(|n| MgmtResult::ok(&req.id, None).on_node(n))
                        .collect(),
                ),
                ControllerRequest::Signal { .. }
                | ControllerRequest::GetIdValue { .. }
                | ControllerRequest::Logs { .. } => AgentResponse::Results(Vec::new()),
            };
            Ok::<_, WireError>(reply)
        }
    };
    // As a real agent does: a silent controller is given up after the idle timeout.
    let silence = tokio::spawn(drover_net::silence::close_when_silent(
        conn.clone(),
        settings.idle_timeout,
    ));
    let reason = conn::serve(conn, settings, handler).await.to_string();
    silence.abort();
    reason
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn client(
    ca: &Ca,
    controllers: &[SocketAddr],
    name: &str,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let c = creds(ca, PeerRole::Client, name)?;
    let settings = TransportSettings::default();
    let endpoint = conn::client_endpoint(&c, &settings, controllers[0])?;
    let hello = Hello {
        api_version: API_VERSION,
        role: PeerRole::Client,
        name: name.into(),
        software: "drover-swarm".into(),
        lost_term: None,
    };
    let targets: Vec<String> = controllers.iter().map(ToString::to_string).collect();
    let est = conn::dial_leader(&targets, |target| {
        let (endpoint, hello) = (&endpoint, hello.clone());
        async move {
            let addr: SocketAddr = target.parse().map_err(|_| {
                drover_net::NetError::Connection(format!("bad controller address {target}"))
            })?;
            conn::dial(
                endpoint,
                None,
                addr,
                "127.0.0.1",
                hello,
                PeerRole::Controller,
                None,
                Duration::from_secs(30),
            )
            .await
        }
    })
    .await?;
    Ok((endpoint, est.conn))
}

/// Packets quinn declared lost on every agent connection and the client's, so far.
fn lost_packets(agents: &Mutex<Vec<quinn::Connection>>, client: &quinn::Connection) -> u64 {
    let agents = agents.lock().expect("lock");
    agents
        .iter()
        .chain(std::iter::once(client))
        .map(|c| c.stats().path.lost_packets)
        .sum()
}

/// CPU time this process used so far (user and system), in seconds.
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    let ca = Ca::load(&args.pki).context("cannot load the CA")?;
    let settings = TransportSettings {
        keep_alive: Duration::from_millis(args.keep_alive_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
        ..TransportSettings::default()
    };
    // UDP sockets, each carrying a few agents' connections.
    let per_socket = args.agents_per_socket.max(1);
    let endpoints: Vec<quinn::Endpoint> = (0..args.agents.div_ceil(per_socket).max(1))
        .map(|_| {
            let any = creds(&ca, PeerRole::Agent, "any")?;
            Ok(conn::client_endpoint(&any, &settings, args.controller[0])?)
        })
        .collect::<anyhow::Result<_>>()?;
    let names: Vec<String> = (0..args.agents).map(|i| format!("hollow-{i:05}")).collect();
    let mut configs = Vec::new();
    for n in &names {
        let c = creds(&ca, PeerRole::Agent, n)?;
        configs.push(conn::client_config(&c, &settings)?);
    }
    let (monitor_endpoint, monitor_conns) = {
        let mut conns = Vec::new();
        let mut ep = None;
        for i in 0..args.monitors {
            let (e, c) = client(&ca, &args.controller, &format!("monitor-{i}")).await?;
            ep.get_or_insert(e);
            conns.push(c);
        }
        (ep, conns)
    };
    let (_client_ep, cl) = client(&ca, &args.controller, "bench").await?;

    // Connect everyone.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let agent_conns = Arc::new(Mutex::new(Vec::new()));
    let targets: Arc<[String]> = args.controller.iter().map(ToString::to_string).collect();
    for (i, (name, cfg)) in names.iter().cloned().zip(configs).enumerate() {
        let ep = endpoints[i / per_socket].clone();
        tasks.spawn(run_agent(
            ep,
            cfg,
            targets.clone(),
            name,
            agent_conns.clone(),
            settings,
        ));
    }
    let connected = loop {
        let reply: ClientResponse =
            conn::call(&cl, &ClientRequest::GetInstances, Duration::from_secs(30)).await?;
        let n = match reply {
            ClientResponse::Result(r) => match r.data {
                Some(drover_proto::ResultData::Instances(v)) => v.len(),
                _ => 0,
            },
            _ => 0,
        };
        if n >= args.agents {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "only {n} of {} agents connected",
            args.agents
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if args.settle_ms > 0 {
        // Tell the caller every agent is connected, then stay idle for a moment.
        eprintln!("connected");
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    }
    let lost_before = lost_packets(&agent_conns, &cl);
    let cpu_before = cpu_seconds();

    // Monitors subscribe.
    let mut monitor_streams = Vec::new();
    for c in &monitor_conns {
        monitor_streams.push(
            conn::call_stream(
                c,
                &ClientRequest::Monitor { logs: false },
                Duration::from_secs(60),
            )
            .await?,
        );
    }

    // Deploy N x M simulated nodes.
    let mut config = Configuration::empty();
    for n in &names {
        config.instances.push(Instance {
            name: n.clone(),
            host: None,
            port: None,
        });
        for j in 0..args.nodes_per_agent {
            let mut node = Node::new(format!("{n}-n{j:02}"), n.clone());
            node.command = vec!["/bin/true".into()];
            config.nodes.push(node);
        }
    }
    let config_id = config.id.clone();
    let _: ClientResponse = conn::call(
        &cl,
        &ClientRequest::StageConfig {
            config: Box::new(config),
        },
        Duration::from_secs(120),
    )
    .await?;
    let fanout_start = Instant::now();
    let deploy_start = Instant::now();
    let reply: ClientResponse = conn::call(
        &cl,
        &ClientRequest::Deploy {
            restart_all: false,
            expect_id: Some(config_id.clone()),
            expect_stage: None,
            progress: false,
        },
        Duration::from_secs(300),
    )
    .await?;
    let deploy = deploy_start.elapsed();
    let failed = match &reply {
        ClientResponse::Results(rs) => rs.iter().filter(|r| !r.success).count(),
        _ => 0,
    };
    // Event fan-out: every monitor sees the deploy finish.
    let mut fanout = Vec::new();
    for s in &mut monitor_streams {
        loop {
            let Some(ClientResponse::Event(e)) = s.next::<ClientResponse>().await? else {
                continue;
            };
            if let Event::DeployFinished { config_id: id, .. } = e.event
                && id == config_id
            {
                fanout.push(fanout_start.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
    }

    // get-nodes latency: as clients ask by default (answered from the statuses agents
    // reported, each agent asked once after the deploy), then asking every agent.
    let mut lat = Vec::new();
    let mut lat_fresh = Vec::new();
    let mut nodes_seen = 0;
    let mut lagging = 0;
    let samples = std::iter::repeat_n(false, args.samples);
    for fresh in samples.clone().chain(samples.map(|_| true)) {
        let lat = if fresh { &mut lat_fresh } else { &mut lat };
        let t = Instant::now();
        let reply: ClientResponse = conn::call(
            &cl,
            &ClientRequest::GetNodes { fresh },
            Duration::from_secs(60),
        )
        .await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        if let ClientResponse::Results(rs) = reply {
            // Agents whose applied generation (own entry) is below the controller's
            // desired one (its own entry).
            let entries = || {
                rs.iter().filter_map(|r| match &r.data {
                    Some(drover_proto::ResultData::NodeStatuses(v)) => Some(v.iter()),
                    _ => None,
                })
            };
            let desired = entries()
                .flatten()
                .find(|s| s.mgmt_role == MgmtRole::Controller)
                .and_then(|s| s.generation);
            lagging = entries()
                .flatten()
                .filter(|s| s.mgmt_role == MgmtRole::Agent && s.generation < desired)
                .count();
            nodes_seen = rs
                .iter()
                .filter_map(|r| match &r.data {
                    Some(drover_proto::ResultData::NodeStatuses(v)) => Some(
                        v.iter()
                            .filter(|s| s.mgmt_role == MgmtRole::None && s.state == State::Running)
                            .count(),
                    ),
                    _ => None,
                })
                .sum();
        }
    }
    lat.sort_by(f64::total_cmp);
    lat_fresh.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "swarm_cpu_s": cpu_seconds() - cpu_before,
        "lost_packets": lost_packets(&agent_conns, &cl) - lost_before,
        "agents": args.agents,
        "nodes_per_agent": args.nodes_per_agent,
        "connect_all_ms": connected.as_secs_f64() * 1000.0,
        "agents_that_retried": RETRIED.load(std::sync::atomic::Ordering::Relaxed),
        "deploy_ms": deploy.as_secs_f64() * 1000.0,
        "deploy_failed_results": failed,
        "get_nodes_p50_ms": percentile(&lat, 0.5),
        "get_nodes_p99_ms": percentile(&lat, 0.99),
        "get_nodes_fresh_p50_ms": percentile(&lat_fresh, 0.5),
        "get_nodes_fresh_p99_ms": percentile(&lat_fresh, 0.99),
        "get_nodes_running_nodes": nodes_seen,
        "get_nodes_lagging_agents": lagging,
        "monitors": args.monitors,
        "event_fanout_max_ms": fanout.iter().copied().fold(0.0, f64::max),
    });
    println!("{report}");
    if args.idle_secs > 0 {
        // Tell the caller the measurements are done, then idle with every connection open.
        eprintln!("idle");
        tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    }
    tasks.abort_all();
    drop(monitor_streams);
    drop(monitor_endpoint);
    Ok(())
}
