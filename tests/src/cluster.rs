//! The local Redis Cluster (`scripts/stack up --redis-cluster`: 3 masters +
//! 3 replicas on 127.0.0.1:7101–7106, `VIDPULSE_REDIS_CLUSTER_PORT` the
//! first port) for tests: the environment that points every binary at it,
//! reads that follow the keys' slots, scans of every master, and killing a
//! master (restarted when the guard drops, so later tests find a full
//! cluster).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Env, repo_root, wait_for};

/// Port of node `i` (1..=6).
pub fn node_port(i: u16) -> u16 {
    let first: u16 = std::env::var("VIDPULSE_REDIS_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7101);
    first + i - 1
}

/// Every node as a seed (any one that answers is enough to find the rest,
/// also while one is killed).
pub fn seeds() -> String {
    (1..=6)
        .map(|i| format!("redis://127.0.0.1:{}", node_port(i)))
        .collect::<Vec<_>>()
        .join(",")
}

fn node(port: u16) -> Option<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    c.get_connection_with_timeout(Duration::from_secs(2)).ok()
}

fn cluster_info(port: u16, field: &str) -> Option<String> {
    let mut c = node(port)?;
    let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?;
    info.lines().find_map(|l| {
        l.trim()
            .strip_prefix(&format!("{field}:"))
            .map(str::to_owned)
    })
}

/// Panics, saying how to start it, unless the cluster is up with all six
/// nodes and every slot served.
pub fn require() {
    let ok = (1..=6).all(|i| cluster_info(node_port(i), "cluster_state").as_deref() == Some("ok"));
    assert!(
        ok,
        "this test needs the local Redis Cluster (6 nodes on 127.0.0.1:{}-{}, cluster_state ok): start it with `scripts/stack up --redis-cluster` (set VIDPULSE_REDIS_CLUSTER_PORT for other ports)",
        node_port(1),
        node_port(6)
    );
    // A node killed by an earlier test rejoins as a replica; it counts
    // once its master sees it online (the stages' --redis-wait-replicas
    // check asks the same).
    wait_for(
        "every master to have a replica online",
        Duration::from_secs(90),
        || {
            masters()
                .iter()
                .all(|(port, _)| replicas_online(*port) >= 1)
                .then_some(())
        },
    );
}

/// Replicas online on the master at `port` (`INFO replication`).
fn replicas_online(port: u16) -> usize {
    let Some(mut c) = node(port) else { return 0 };
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut c)
        .unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
        .count()
}

/// `env` with every binary pointed at the cluster (`--redis-cluster`).
pub fn env(env: Env) -> Env {
    env.with_var("VIDPULSE_REDIS_URL", &seeds())
        .with_var("VIDPULSE_REDIS_CLUSTER", "true")
}

/// A cluster connection (follows slots and redirects).
pub fn conn() -> redis::cluster::ClusterConnection {
    let nodes: Vec<String> = seeds().split(',').map(str::to_owned).collect();
    redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_connection()
        .unwrap()
}

/// The masters serving slots now, as (port, number of slots), from a live
/// node's `CLUSTER NODES`.
pub fn masters() -> Vec<(u16, usize)> {
    let text = (1..=6)
        .find_map(|i| {
            let mut c = node(node_port(i))?;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query::<String>(&mut c)
                .ok()
        })
        .expect("no cluster node answers CLUSTER NODES");
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let port: u16 = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        let slots: usize = f[8..]
            .iter()
            .filter(|r| !r.starts_with('['))
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum();
        if slots > 0 {
            out.push((port, slots));
        }
    }
    out.sort();
    out
}

/// The port of the master serving `key`'s slot.
pub fn master_of(key: &str) -> u16 {
    let slot = vidpulse_core::redis::slot(key.as_bytes());
    let mut c = node(masters()[0].0).unwrap();
    let slots: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
    let redis::Value::Array(ranges) = slots else {
        panic!("CLUSTER SLOTS: {slots:?}")
    };
    for r in ranges {
        let redis::Value::Array(items) = r else {
            continue;
        };
        let int = |v: &redis::Value| match v {
            redis::Value::Int(n) => *n,
            _ => -1,
        };
        let (lo, hi) = (int(&items[0]), int(&items[1]));
        if (lo..=hi).contains(&i64::from(slot)) {
            let redis::Value::Array(n) = &items[2] else {
                panic!()
            };
            return u16::try_from(int(&n[1])).unwrap();
        }
    }
    panic!("slot {slot} of {key} not served")
}

/// Keys matching `pattern` on each master: (master port, keys).
pub fn scan_each(pattern: &str) -> Vec<(u16, Vec<String>)> {
    masters()
        .into_iter()
        .map(|(port, _)| {
            let mut c = node(port).unwrap();
            let keys: Vec<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter(&mut c)
                .unwrap()
                .collect();
            (port, keys)
        })
        .collect()
}

/// Keys matching `pattern` on every master.
pub fn scan_all(pattern: &str) -> Vec<String> {
    scan_each(pattern)
        .into_iter()
        .flat_map(|(_, k)| k)
        .collect()
}

/// Deletes every key of a test (its prefix, its checkpoints and lineage) on
/// every master, when dropped.
pub struct CleanKeys(pub String);

impl Drop for CleanKeys {
    fn drop(&mut self) {
        let p = &self.0;
        let mut c = conn();
        for pattern in [
            format!("{p}*"),
            format!("vp:ckpt:{{{p}*"),
            format!("vp:lineage:{{{p}*"),
        ] {
            for k in scan_all(&pattern) {
                let _: Result<i64, _> = redis::cmd("DEL").arg(&k).query(&mut c);
            }
        }
    }
}

fn stack(cmd: &str, node: &str) -> bool {
    Command::new(repo_root().join("scripts/stack"))
        .args([cmd, node])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A master killed with `scripts/stack kill` (SIGKILL); started again with
/// `scripts/stack start` when dropped, also when the test fails, and then
/// back in the cluster (as a replica of the node that took over).
pub struct KilledMaster {
    pub port: u16,
    name: String,
}

impl KilledMaster {
    /// Kills the master on `port` and waits until its replica took over
    /// (every slot served again).
    pub fn kill(port: u16) -> KilledMaster {
        let i = port - node_port(1) + 1;
        let name = format!("redis-cluster-{i}");
        assert!(
            stack("kill", &name),
            "scripts/stack kill {name} failed: is VIDPULSE_STACK_DIR the directory of the stack that started the cluster?"
        );
        let k = KilledMaster { port, name };
        wait_for(
            "a replica to take over the killed master's slots",
            Duration::from_secs(60),
            || {
                let m = masters();
                let served: usize = m.iter().map(|(_, n)| n).sum();
                (served == 16384 && !m.iter().any(|(p, _)| *p == port)).then_some(())
            },
        );
        wait_for("cluster_state ok", Duration::from_secs(60), || {
            (1..=6)
                .filter(|i| node_port(*i) != port)
                .all(|i| cluster_info(node_port(i), "cluster_state").as_deref() == Some("ok"))
                .then_some(())
        });
        k
    }
}

impl Drop for KilledMaster {
    fn drop(&mut self) {
        if !stack("start", &self.name) {
            eprintln!(
                "scripts/stack start {} failed: restart it by hand",
                self.name
            );
            return;
        }
        let port = self.port;
        let back = (0..240).any(|_| {
            let ok = cluster_info(port, "cluster_state").as_deref() == Some("ok")
                && cluster_info(port, "cluster_known_nodes").as_deref() == Some("6");
            if !ok {
                std::thread::sleep(Duration::from_millis(250));
            }
            ok
        });
        if !back {
            eprintln!("{} did not rejoin the cluster within 60 s", self.name);
        }
    }
}
