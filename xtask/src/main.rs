//! `cargo xtask`: development tasks for drover, written in Rust so they need nothing but
//! cargo.
//!
//! - `cargo xtask test`: the whole test suite, as CI runs it (format, lints, every test).
//! - `cargo xtask chaos [--minutes N] [--seed S]`: random faults against a cluster on
//!   separate hosts, with the desired-state invariant checked after every heal; with
//!   `--ha [--lease 2s]`, deploys across leader failovers checked as a history.
//! - `cargo xtask cluster up [--agents N]`: a local cluster on this machine.
//! - `cargo xtask bench supervise [--nodes 100,500] [--peers supervisord,pm2] [--kills 10]
//!   [--runs 3] [--quick]`: drover against peer supervisors on this machine.
//! - `cargo xtask bench control-plane [--agents 100,1000,5000]`: one controller against
//!   hollow agents.
//! - `cargo xtask bench failover [--agents 1000] [--kills 20] [--lease 2s]`: leader
//!   SIGKILLs in a high-availability group with hollow agents.
//! - `cargo xtask bench deploy [--runs 3] [--readiness start-period|notify]`: a real
//!   deploy of 4 agents × 50 nodes against bare spawns and supervisord; with
//!   `--store etcd`, a deploy's cost with the etcd store against the state dir.
//! - `cargo xtask bench spawn [--spawns 200] [--ballast-mib 512]`: the cost of one spawn
//!   by posix_spawn, fork, and posix_spawn with the spawning thread pinned.

mod bench;
mod chaos;
mod cluster;
mod dist;
mod test;
#[cfg(test)]
mod tidy;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "drover's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the whole test suite: cargo fmt --check, clippy -D warnings, every test.
    Test {
        /// Skip the format and lint checks.
        #[arg(long)]
        no_lint: bool,
    },
    /// Local clusters for development and demos.
    #[command(subcommand)]
    Cluster(ClusterTask),
    /// Debian packages (drover, drover-controller, drover-agent) of a release build, with
    /// the units, settings, completions and man page, in target/dist.
    Dist {
        /// Output directory [default: target/dist].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Package the binaries in this directory instead of a release build.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Compression of the packages (dpkg-deb -Z): xz, gzip, zstd or none.
        #[arg(long, default_value = "xz")]
        compression: String,
    },
    /// Benchmarks (release builds) against peer tools.
    #[command(subcommand)]
    Bench(BenchTask),
    /// Random SIGKILLs of agents, the controller and nodes, deploys cut short and network
    /// partitions against a cluster on separate hosts (network namespaces; needs root),
    /// checking after every heal that each host runs exactly its share of a deploy in
    /// effect.
    Chaos {
        /// How long to inject faults.
        #[arg(long, default_value_t = 5)]
        minutes: u64,
        /// Seed for a repeatable run [default: the time].
        #[arg(long)]
        seed: Option<u64>,
        /// The failover history check instead: three etcd members and three
        /// controllers, leaders SIGKILLed and paused past their lease while clients
        /// deploy; acknowledged deploys must never be lost, generations never go back,
        /// no node restarts, a deposed leader never writes (needs etcd on PATH).
        #[arg(long)]
        ha: bool,
        /// With --ha: the controllers' --leader-lease [default: 2s].
        #[arg(long, requires = "ha")]
        lease: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchTask {
    /// The cost of one spawn by how it is made: posix_spawn, fork (a pre_exec hook), and
    /// posix_spawn with the spawning thread pinned, at this process's size and with a
    /// ballast of memory.
    Spawn {
        /// Spawns per figure.
        #[arg(long, default_value_t = 200)]
        spawns: u32,
        /// Memory added for the second round, in MiB.
        #[arg(long, default_value_t = 512)]
        ballast_mib: usize,
    },
    /// Start, kill -9 -> replacement, idle cost and stop-all of N programs: drover against
    /// supervisord and pm2 (installed under target/bench if missing), one after another.
    Supervise {
        /// Numbers of programs [default: 100,500; --quick: 20].
        #[arg(long, value_delimiter = ',')]
        nodes: Option<Vec<usize>>,
        /// Peers to measure after drover.
        #[arg(long, value_delimiter = ',', default_value = "supervisord,pm2")]
        peers: Vec<bench::Peer>,
        /// Kills in the first run of each N [default: 10; --quick: 3].
        #[arg(long)]
        kills: Option<usize>,
        /// Cold runs per N and system [default: 3; --quick: 1].
        #[arg(long)]
        runs: Option<usize>,
        /// Smoke test: N=20, 3 kills, one run, a 2 s idle window.
        #[arg(long)]
        quick: bool,
        /// Use the release binaries already built instead of running cargo build.
        #[arg(long)]
        no_build: bool,
    },
    /// One controller against N hollow agents (simulated agents over real QUIC
    /// connections): connect time, get-nodes latency, deploy, event fan-out, memory and
    /// idle CPU per agent.
    ControlPlane {
        /// Agent counts.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        agents: Vec<usize>,
        /// Simulated nodes per agent.
        #[arg(long, default_value_t = 10)]
        nodes_per_agent: usize,
        /// Idle window for the CPU figure, in seconds.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        /// Use the release binaries already built.
        #[arg(long)]
        no_build: bool,
        /// Hollow agents per UDP socket in the swarm (its default when not given).
        #[arg(long)]
        agents_per_socket: Option<usize>,
    },
    /// Leader SIGKILLs in a high-availability group (three etcd members, three
    /// controllers) with N hollow agents: time to a new leader answering, to every agent
    /// reconnected and to a complete get-nodes (p50, p99), and the new leader's CPU and
    /// peak memory; needs etcd on PATH.
    Failover {
        /// Hollow agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Simulated nodes per agent.
        #[arg(long, default_value_t = 10)]
        nodes_per_agent: usize,
        /// Leader kills.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// The controllers' --leader-lease [default: theirs, 2s].
        #[arg(long)]
        lease: Option<String>,
        /// The hollow agents' idle timeout in milliseconds: how soon they notice a
        /// leader that died without a word (as real agents' --idle-timeout).
        #[arg(long, default_value_t = 2000)]
        agent_idle_timeout_ms: u64,
        /// Seconds the group runs undisturbed before each kill, as a fleet does between
        /// failures (connections made in a reconnect storm carry inflated round-trip
        /// estimates for a while, and QUIC's idle timeout is at least three probe
        /// timeouts, so a kill right after a storm is noticed late); 0 kills as soon as
        /// the group is whole again.
        #[arg(long, default_value_t = 15)]
        settle_secs: u64,
        /// Use the release binaries already built.
        #[arg(long)]
        no_build: bool,
    },
    /// A real deploy on loopback (a controller, 4 agents, 4 x 50 `drover-testprog` nodes)
    /// to all RUNNING, against spawning the same 200 programs from one process and
    /// against supervisord starting them.
    Deploy {
        /// Real agents.
        #[arg(long, default_value_t = 4)]
        agents: usize,
        /// Nodes per agent.
        #[arg(long, default_value_t = 50)]
        nodes_per_agent: usize,
        /// Cold runs per system.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// When a node counts as running: at spawn (start period 0 s) or at READY=1.
        #[arg(long, value_enum, default_value = "start-period")]
        readiness: bench::deploy::Readiness,
        /// Leave supervisord out.
        #[arg(long)]
        no_supervisord: bool,
        /// Where the runs' directories go (state dirs, logs, sockets: the same for every
        /// system); the default is `target/bench`. Inode allocation on the filesystem
        /// there is part of what a deploy costs.
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// `etcd`: instead, time a deploy of an unchanged configuration with the state
        /// dir and with three controllers on a three-member etcd cluster, and print both
        /// and the difference (needs etcd on PATH).
        #[arg(long, value_parser = ["file", "etcd"])]
        store: Option<String>,
        /// With --store etcd: deploys timed per store.
        #[arg(long, default_value_t = bench::store::RUNS)]
        store_runs: usize,
        /// Use the release binaries already built.
        #[arg(long)]
        no_build: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterTask {
    /// Build, generate a PKI, start a controller and N agents, show them; stop on Ctrl-C.
    Up {
        /// Number of agents.
        #[arg(long, default_value_t = 2)]
        agents: u32,
        /// Show the cluster, then stop it at once instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Directory for the PKI, state and logs [default: target/cluster].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Controller port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 2150)]
        port: u16,
        /// Cluster file to deploy [default: deploy/examples/local.toml for two agents].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Leave the cluster running in the background.
        #[arg(long)]
        detach: bool,
        /// Run each agent in a network namespace of its own with its own address, like
        /// separate hosts (needs root).
        #[arg(long)]
        netns: bool,
        /// High availability: three controllers (ports PORT, PORT+1, PORT+2) on a
        /// three-member etcd cluster; needs etcd on PATH (Debian: etcd-server).
        #[arg(long)]
        ha: bool,
    },
    /// Show a detached cluster's nodes.
    Status {
        /// The cluster's directory [default: target/cluster].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Stop a detached cluster, its nodes included.
    Down {
        /// The cluster's directory [default: target/cluster].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test { no_lint } => test::run(!no_lint),
        Task::Chaos {
            minutes,
            seed,
            ha,
            lease,
        } => chaos::run(minutes, seed, ha, lease),
        Task::Dist {
            out,
            bin_dir,
            compression,
        } => dist::run(&dist::Options {
            out: out.unwrap_or_else(|| project_root().join("target/dist")),
            bin_dir,
            compression,
        })
        .map(|_| ()),
        Task::Cluster(ClusterTask::Status { dir }) => {
            let root = project_root();
            cluster::status(
                &dir.unwrap_or_else(|| root.join("target/cluster")),
                &root.join("target/debug"),
            )
        }
        Task::Cluster(ClusterTask::Down { dir }) => {
            cluster::down(&dir.unwrap_or_else(|| project_root().join("target/cluster")))
        }
        Task::Cluster(ClusterTask::Up {
            agents,
            once,
            dir,
            port,
            config,
            detach,
            netns,
            ha,
        }) => {
            let root = project_root();
            let opts = cluster::Options {
                agents,
                once,
                // A cluster of namespaces needs a controller certificate for the bridge
                // address, hence a PKI of its own.
                dir: dir.unwrap_or_else(|| {
                    root.join(if netns {
                        "target/cluster-netns"
                    } else {
                        "target/cluster"
                    })
                }),
                bin_dir: root.join("target/debug"),
                build: true,
                port,
                config,
                detach,
                netns,
                ha,
            };
            cluster::up(&opts)
        }
        Task::Bench(BenchTask::Spawn {
            spawns,
            ballast_mib,
        }) => bench::spawn::run(&bench::spawn::Options {
            spawns,
            ballast_mib,
        }),
        Task::Bench(BenchTask::ControlPlane {
            agents,
            nodes_per_agent,
            idle_secs,
            no_build,
            agents_per_socket,
        }) => bench::control_plane::run(&bench::control_plane::Options {
            agents,
            nodes_per_agent,
            idle: std::time::Duration::from_secs(idle_secs),
            build: !no_build,
            agents_per_socket,
        }),
        Task::Bench(BenchTask::Failover {
            agents,
            nodes_per_agent,
            kills,
            lease,
            agent_idle_timeout_ms,
            settle_secs,
            no_build,
        }) => bench::failover::run(&bench::failover::Options {
            agents,
            nodes_per_agent,
            kills: kills.max(1),
            lease,
            agent_idle_timeout: std::time::Duration::from_millis(agent_idle_timeout_ms),
            settle: std::time::Duration::from_secs(settle_secs),
            build: !no_build,
        }),
        Task::Bench(BenchTask::Deploy {
            store: Some(store),
            store_runs,
            no_build,
            ..
        }) if store == "etcd" => {
            let built = if no_build {
                Ok(())
            } else {
                cluster::build_binaries(true, None)
            };
            built.and_then(|()| {
                bench::store::run(&project_root().join("target/release"), store_runs.max(1))
            })
        }
        Task::Bench(BenchTask::Deploy {
            agents,
            nodes_per_agent,
            runs,
            readiness,
            no_supervisord,
            no_build,
            scratch,
            ..
        }) => bench::deploy::run(&bench::deploy::Options {
            agents,
            nodes_per_agent,
            runs: runs.max(1),
            readiness,
            supervisord: !no_supervisord,
            build: !no_build,
            scratch,
        }),
        Task::Bench(BenchTask::Supervise {
            nodes,
            peers,
            kills,
            runs,
            quick,
            no_build,
        }) => {
            let mut opts = bench::Options::new(nodes, peers, kills, runs, quick);
            opts.build = !no_build;
            bench::supervise(&opts)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A `cargo` command (the cargo that runs this xtask) without the variables `cargo run`
/// set for this package. Build scripts such as ring's ask to rerun when
/// `CARGO_MANIFEST_DIR` or a `CARGO_PKG_*` variable changes, and cargo compares them
/// against its own environment: inherited from xtask, they made every inner build
/// rebuild ring and everything above it.
pub(crate) fn cargo_command() -> std::process::Command {
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_var) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `name` is one of the variables cargo sets for the package it builds or runs
/// (as opposed to `CARGO`, `CARGO_HOME`, `CARGO_TARGET_DIR` and the configuration
/// variables a user sets, which the inner cargo must see).
fn is_package_var(name: &str) -> bool {
    const EXACT: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
}

/// The workspace root (the parent of this crate's directory).
fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}
