//! drover-proto: the vocabulary every drover component shares.
//!
//! # Layout
//!
//! - [`model`]: the cluster data model, with the names and meaning of Zeek's Management
//!   framework (Instance, Node, NodeStatus, State, Role, Result, NodeOutputs,
//!   Configuration) plus what a generic node needs to be supervised (argv, env, restart
//!   policy, readiness, stop signal and timeout, CPU affinity).
//! - [`msg`]: request, response and event messages of the native protocol, the API version
//!   and the ALPN string, and the frame envelopes that carry request ids.
//! - [`access`]: client scopes (viewer, operator, admin), the scope each request needs,
//!   and the audit trail's records.
//! - [`config`]: cluster files (TOML) and validation, which reports every error at once.
//! - [`error_text`]: an error and its causes as one line, each cause said once.
//! - [`exec`]: a node's user, groups, umask, capabilities and rlimits: names, parsing
//!   and checks.
//! - [`ini`]: Zeek's INI cluster files as zeek-client reads and prints them, the TOML
//!   writer (the lossless form), and format detection for files in either format.
//! - [`name`]: the rules for instance and node names.
//! - `schema`: the keys of a TOML cluster file and the type each takes, checked before
//!   deserializing so that every type error is reported at once.
//! - [`ports`]: Zeek's Broker and metrics port auto-assignment and port checks.
//! - [`resources`]: a node's cgroup resource limits and liveness checks, with their bounds.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and spawns nothing. It
//! turns bytes and strings into values and back; everything else lives in the crates that
//! depend on it. JSON (serde) is the wire encoding.

pub mod access;
pub mod argv;
pub mod config;
pub mod error_text;
pub mod exec;
pub mod ini;
pub mod model;
pub mod msg;
pub mod name;
pub mod ports;
pub mod resources;
mod schema;

pub use model::{
    ClusterRole, Configuration, Instance, MgmtResult, MgmtRole, Node, NodeOutputs, NodeStatus,
    ResultData, State,
};
