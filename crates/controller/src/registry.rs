//! The registry of connected agents.
//!
//! One entry per agent name, holding its live connection. A connection that claims a
//! registered name is admitted only if the registered one does not answer
//! (`admit_agent` in the crate root); it then replaces it, and the old connection's
//! task must not remove the new entry, which is why removal compares connections
//! ([`Registry::remove_if_same`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

/// A connected agent, as seen by readers.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Its instance name.
    pub name: String,
    /// Where it connected from.
    pub addr: SocketAddr,
    /// When it connected.
    pub since: SystemTime,
    /// The agent's listening port, when the controller dialled it.
    pub dialled_port: Option<u16>,
}

#[derive(Debug)]
struct Entry {
    conn: quinn::Connection,
    since: SystemTime,
    dialled_port: Option<u16>,
}

/// Connected agents by name.
#[derive(Debug, Default)]
pub struct Registry {
    /// A std mutex: critical sections are short and never await.
    agents: Mutex<BTreeMap<String, Entry>>,
}

impl Registry {
    /// Registers `conn` for `name` if the entry is still what the caller saw: none
    /// (`expected` is `None`) or the connection with the stable id `expected`. False if
    /// another connection got there first.
    pub fn register(
        &self,
        name: &str,
        conn: quinn::Connection,
        dialled_port: Option<u16>,
        expected: Option<usize>,
    ) -> bool {
        let mut agents = self.lock();
        if agents.get(name).map(|e| e.conn.stable_id()) != expected {
            return false;
        }
        let entry = Entry {
            conn,
            since: SystemTime::now(),
            dialled_port,
        };
        agents.insert(name.to_owned(), entry);
        true
    }

    /// Removes `name` if it is still registered with `conn`; true if it was.
    pub fn remove_if_same(&self, name: &str, conn: &quinn::Connection) -> bool {
        let mut agents = self.lock();
        match agents.get(name) {
            Some(e) if e.conn.stable_id() == conn.stable_id() => {
                agents.remove(name);
                true
            }
            _ => false,
        }
    }

    /// The connection of `name`, if connected.
    pub fn get(&self, name: &str) -> Option<quinn::Connection> {
        self.lock().get(name).map(|e| e.conn.clone())
    }

    /// Every connected agent's name and connection, sorted by name.
    pub fn connections(&self) -> Vec<(String, quinn::Connection)> {
        self.lock()
            .iter()
            .map(|(name, e)| (name.clone(), e.conn.clone()))
            .collect()
    }

    /// All connected agents, sorted by name.
    pub fn snapshot(&self) -> Vec<AgentInfo> {
        self.lock()
            .iter()
            .map(|(name, e)| AgentInfo {
                name: name.clone(),
                addr: e.conn.remote_address(),
                since: e.since,
                dialled_port: e.dialled_port,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // operation is a single insert or remove), so poisoning is ignored.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }
}
