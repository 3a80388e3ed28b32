//! Redis as the scale-out tests (SPEC §12) need it, beside the single
//! `RedisServer` of `helpers.rs`: a real Redis Cluster of `redis-server`
//! processes on loopback (created with `redis-cli --cluster create`, so the
//! slots, replicas and failovers are Redis's own), one cluster shared by the
//! tests of a module that run at the same time, and a `redis-server` that
//! speaks only TLS, with a certificate from a CA made at test time.
//!
//! Like every server in the helpers, each process here is killed when its
//! handle is dropped, a panicking test's included. The shared cluster is held
//! through a `Weak`: it lives while some test holds it, and the last one to
//! drop it kills it, so nothing outlives the tests of the binary.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::helpers::{answers_ping, free_port, sorted_keys};

/// How long a node may take to answer its first PING, and a cluster to agree
/// on its slots after `--cluster create`.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Between two looks at a node that is starting or failing over.
const POLL: Duration = Duration::from_millis(20);

/// `redis-cli args…` (over TLS, trusting the CA in `pki`, when given): its
/// trimmed output, or `None` when redis-cli failed.
fn try_redis_cli(pki: Option<&Path>, args: &[String]) -> Option<String> {
    redis_cli_with(pki, None, args)
}

/// [`try_redis_cli`] with `password` (through the environment, where `ps`
/// does not show it).
fn redis_cli_with(pki: Option<&Path>, password: Option<&str>, args: &[String]) -> Option<String> {
    let mut command = Command::new("redis-cli");
    if let Some(pki) = pki {
        command.arg("--tls").arg("--cacert").arg(pki.join(CA_FILE));
    }
    if let Some(password) = password {
        command.env("REDISCLI_AUTH", password);
    }
    let output = command
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("redis-cli is installed");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// [`try_redis_cli`] that panics when redis-cli fails.
fn redis_cli(pki: Option<&Path>, args: &[String]) -> String {
    try_redis_cli(pki, args).unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|&arg| arg.to_owned()).collect()
}

/// Kills `child` (SIGKILL: no goodbye, no save) and reaps it.
fn kill(mut child: Child) {
    // A stopped process ignores SIGKILL until continued on some systems.
    let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Locks `mutex` even if a test panicked while holding it: what it guards
/// (a child process handle, a `Weak`) is never left half-changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// What a node says about the cluster
// ---------------------------------------------------------------------------

/// One line of `CLUSTER NODES`, as one node sees another (or itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Flagged `fail`/`fail?`, without an address, or still in the handshake.
    pub failed: bool,
    /// The master this replica follows (its id).
    pub master_id: Option<String>,
    /// Slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl NodeView {
    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(first, last)| (first..=last).contains(&slot))
    }
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <master>
/// <ping> <pong> <epoch> <link> <slot>…`; slots being migrated (`[…]`) are
/// left out.
fn parse_cluster_nodes(text: &str) -> Vec<NodeView> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 8, "unexpected CLUSTER NODES line: {line:?}");
            let address = fields[1].split('@').next().unwrap();
            let port = address.rsplit(':').next().unwrap().parse().unwrap_or(0);
            let flags: Vec<&str> = fields[2].split(',').collect();
            let slots = fields[8..]
                .iter()
                .filter(|slot| !slot.starts_with('['))
                .map(|slot| match slot.split_once('-') {
                    Some((first, last)) => (first.parse().unwrap(), last.parse().unwrap()),
                    None => (slot.parse().unwrap(), slot.parse().unwrap()),
                })
                .collect();
            NodeView {
                id: fields[0].to_owned(),
                port,
                master: flags.contains(&"master"),
                failed: flags
                    .iter()
                    .any(|flag| matches!(*flag, "fail" | "fail?" | "noaddr" | "handshake")),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A Redis Cluster
// ---------------------------------------------------------------------------

/// One `redis-server --cluster-enabled yes` with a folder of its own (its
/// `nodes.conf`); `None` once killed.
struct ClusterNode {
    port: u16,
    child: Mutex<Option<Child>>,
    /// SIGSTOPped: its sockets accept, nothing answers (a lost host).
    frozen: std::sync::atomic::AtomicBool,
    _dir: tempfile::TempDir,
}

impl ClusterNode {
    /// Starts on a free port whose cluster bus port (port + 10000) is free
    /// too, and waits until it answers PING; tries other ports when one was
    /// taken in between. With `pki`, clients, replicas and the cluster bus
    /// all speak TLS only, with the certificate in `pki`.
    fn start(pki: Option<&Path>) -> Self {
        for _ in 0..10 {
            let port = free_port();
            // The bus port must be a port, and free.
            if port > 55_535 || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let mut command = Command::new("redis-server");
            match pki {
                None => command.args(["--port", &port.to_string()]),
                Some(pki) => command
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(tls_server_args(pki)),
            };
            let mut child = command
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "1000"])
                // A replica takes over however long its link was down: a
                // test's failover never waits on replication history.
                .args(["--cluster-replica-validity-factor", "0"])
                // A failed master stops its own slots only, not the cluster's.
                .args(["--cluster-require-full-coverage", "no"])
                // A replica's first sync starts at once rather than after
                // the 5 s that diskless replication waits for more replicas.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let deadline = Instant::now() + START_LIMIT;
            let ping = strings(&["-p", &port.to_string(), "ping"]);
            loop {
                let answers = match pki {
                    None => answers_ping(port),
                    Some(_) => try_redis_cli(pki, &ping).as_deref() == Some("PONG"),
                };
                if answers {
                    return Self {
                        port,
                        child: Mutex::new(Some(child)),
                        frozen: Default::default(),
                        _dir: dir,
                    };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    kill(child);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("no cluster node started on a free port");
    }

    /// Running and answering.
    fn alive(&self) -> bool {
        lock(&self.child).is_some() && !self.frozen.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn freeze(&self) {
        if let Some(child) = lock(&self.child).as_ref() {
            let status = Command::new("kill").arg("-STOP").arg(child.id().to_string()).status();
            assert!(status.is_ok_and(|status| status.success()), "kill -STOP redis-server");
            self.frozen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn kill(&self) {
        if let Some(child) = lock(&self.child).take() {
            kill(child);
        }
    }
}

/// A Redis Cluster on loopback: `masters` masters (three at least, as
/// `redis-cli --cluster create` wants), each with `replicas_per_master`
/// replicas; a node that stops answering is failed over after one second
/// (`cluster-node-timeout 1000`). Every node is killed when it is dropped.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    /// The certificates of a cluster that speaks TLS.
    pki: Option<tempfile::TempDir>,
}

/// The cluster the tests running at the same time share; see [`RedisCluster::shared`].
static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());

impl RedisCluster {
    /// Starts the nodes, creates the cluster, and waits until every node
    /// reports `cluster_state:ok`, every replica is in sync with its master,
    /// and all nodes agree on who serves which slots.
    pub fn start(masters: usize, replicas_per_master: usize) -> Self {
        Self::start_with(masters, replicas_per_master, None)
    }

    /// A cluster of `masters` masters that speaks only TLS (`rediss://`),
    /// clients, replication and cluster bus alike, with a certificate for
    /// `127.0.0.1` from a CA made for it ([`Self::ca_pem_path`]).
    pub fn start_tls(masters: usize) -> Self {
        Self::start_with(masters, 0, Some(new_test_pki()))
    }

    fn start_with(masters: usize, replicas_per_master: usize, pki: Option<tempfile::TempDir>) -> Self {
        assert!(masters >= 3, "a Redis Cluster needs three masters at least");
        let nodes = (0..masters * (1 + replicas_per_master))
            .map(|_| ClusterNode::start(pki.as_ref().map(|pki| pki.path())))
            .collect();
        let cluster = Self { nodes, pki };
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(cluster.nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)));
        create.extend(strings(&["--cluster-replicas"]));
        create.push(replicas_per_master.to_string());
        create.push("--cluster-yes".to_owned());
        let created = cluster.redis_cli(&create);
        assert!(
            created.contains("All 16384 slots covered"),
            "redis-cli --cluster create: {created}"
        );
        let settled = cluster.poll_until(START_LIMIT, || cluster.settled(masters, replicas_per_master));
        assert!(
            settled,
            "the cluster did not settle within {START_LIMIT:?}: {:#?}",
            cluster.view()
        );
        cluster
    }

    /// A three-master cluster without replicas, shared by the tests that
    /// hold it at the same time; started by the first of them, killed when
    /// the last one drops it.
    pub fn shared() -> Arc<Self> {
        let mut shared = lock(&SHARED);
        if let Some(cluster) = shared.upgrade() {
            return cluster;
        }
        let cluster = Arc::new(Self::start(3, 0));
        *shared = Arc::downgrade(&cluster);
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node (`rediss://` over TLS),
    /// for `rate_limit.redis_cluster`.
    pub fn seed_urls(&self) -> Vec<String> {
        let scheme = if self.pki.is_some() { "rediss" } else { "redis" };
        self.nodes
            .iter()
            .map(|node| format!("{scheme}://127.0.0.1:{}", node.port))
            .collect()
    }

    /// The PEM file of the CA that signed a TLS cluster's certificate.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.pki.as_ref().expect("a TLS cluster").path().join(CA_FILE)
    }

    fn redis_cli(&self, args: &[String]) -> String {
        redis_cli(self.pki.as_ref().map(|pki| pki.path()), args)
    }

    /// [`Self::seed_urls`] as a TOML array.
    pub fn seeds_toml(&self) -> String {
        let urls: Vec<String> = self.seed_urls().iter().map(|url| format!("{url:?}")).collect();
        format!("[{}]", urls.join(", "))
    }

    /// The ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.alive())
            .map(|node| node.port)
            .collect()
    }

    /// `redis-cli -p <port> args…`, its output trimmed.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let mut all = vec!["-p".to_owned(), port.to_string()];
        all.extend(strings(args));
        self.redis_cli(&all)
    }

    /// `CLUSTER NODES` as the live node `port` sees it.
    pub fn view_from(&self, port: u16) -> Vec<NodeView> {
        parse_cluster_nodes(&self.cli(port, &["cluster", "nodes"]))
    }

    /// What the first live node says (for failure messages).
    fn view(&self) -> Vec<NodeView> {
        self.live_ports()
            .first()
            .map(|&port| self.view_from(port))
            .unwrap_or_default()
    }

    /// The ports of the masters serving slots, as the first live node sees them.
    pub fn masters(&self) -> Vec<u16> {
        self.view()
            .iter()
            .filter(|node| node.master && !node.failed && !node.slots.is_empty())
            .map(|node| node.port)
            .collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`: the hash tag's, when it has one).
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = *self.live_ports().first().expect("a node runs");
        self.cli(port, &["cluster", "keyslot", key]).parse().unwrap()
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_for_key(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        self.view()
            .iter()
            .find(|node| node.master && !node.failed && node.owns(slot))
            .unwrap_or_else(|| panic!("no live master serves slot {slot}: {:#?}", self.view()))
            .port
    }

    /// SIGKILLs the master serving `key`'s slot; its port.
    pub fn kill_master_of(&self, key: &str) -> u16 {
        let port = self.master_for_key(key);
        self.nodes.iter().find(|node| node.port == port).unwrap().kill();
        port
    }

    /// Moves `key`'s slot, with its keys, from its master to the master on
    /// `to`, as `redis-cli --cluster reshard` does for each slot (IMPORTING,
    /// MIGRATING, MIGRATE, then SETSLOT NODE on every master): a client with
    /// the old slot map is answered `MOVED` from then on. `midway` runs once
    /// the keys have moved and before the slot has: meanwhile the old master
    /// answers `ASK` for them.
    pub fn move_slot_of(&self, key: &str, to: u16, midway: impl FnOnce()) {
        let slot = self.slot_of(key).to_string();
        let from = self.master_for_key(key);
        assert_ne!(from, to, "{key} is already served by {to}");
        let view = self.view();
        let id_of = |port: u16| view.iter().find(|node| node.port == port).unwrap().id.clone();
        let (from_id, to_id) = (id_of(from), id_of(to));
        self.cli(to, &["cluster", "setslot", &slot, "importing", &from_id]);
        self.cli(from, &["cluster", "setslot", &slot, "migrating", &to_id]);
        let keys = self.cli(from, &["--raw", "cluster", "getkeysinslot", &slot, "1000"]);
        for moving in keys.lines().filter(|line| !line.is_empty()) {
            let to_port = to.to_string();
            self.cli(from, &["migrate", "127.0.0.1", &to_port, moving, "0", "5000"]);
        }
        midway();
        for master in self.masters() {
            self.cli(master, &["cluster", "setslot", &slot, "node", &to_id]);
        }
        let moved = self.poll_until(START_LIMIT, || self.agreed_owner(slot.parse().unwrap()) == Some(to));
        assert!(moved, "slot {slot} did not move to {to}: {:#?}", self.view());
    }

    /// SIGSTOPs the master serving `key`'s slot, as when its host is lost:
    /// connections to it stay open and new ones are accepted by the kernel,
    /// but nothing answers. Its port. (Killed, and so thawed, on drop.)
    pub fn freeze_master_of(&self, key: &str) -> u16 {
        let port = self.master_for_key(key);
        self.nodes.iter().find(|node| node.port == port).unwrap().freeze();
        port
    }

    /// Once the master of `key`'s slot was killed or frozen: true when the live node
    /// `port` has taken the slot over (it says so of itself: `myself,master`
    /// and the slot). Until then no node can answer for the slot.
    pub fn promoted(&self, port: u16, key: &str) -> bool {
        let slot = self.slot_of(key);
        self.cli(port, &["cluster", "nodes"])
            .lines()
            .filter(|line| line.contains("myself"))
            .flat_map(parse_cluster_nodes)
            .any(|node| node.master && node.owns(slot))
    }

    /// The replicas (ports) of the master serving `key`'s slot.
    pub fn replicas_of_master_of(&self, key: &str) -> Vec<u16> {
        let master = self.master_for_key(key);
        let view = self.view();
        let id = &view.iter().find(|node| node.port == master).unwrap().id;
        view.iter()
            .filter(|node| node.master_id.as_ref() == Some(id))
            .map(|node| node.port)
            .collect()
    }

    /// Waits, `limit` at most, until a replica has taken over `key`'s slot
    /// after its master was killed: every live node says the same live node
    /// serves it, and reports `cluster_state:ok`. The new master's port.
    pub fn wait_for_failover(&self, key: &str, limit: Duration) -> u16 {
        let slot = self.slot_of(key);
        let mut owner = None;
        let done = self.poll_until(limit, || {
            owner = self.agreed_owner(slot);
            owner.is_some() && self.live_ports().iter().all(|&port| self.state_ok(port))
        });
        assert!(
            done,
            "no replica took over slot {slot} within {limit:?}: {:#?}",
            self.view()
        );
        owner.unwrap()
    }

    /// The live node every live node names as the master of `slot`, if they agree.
    fn agreed_owner(&self, slot: u16) -> Option<u16> {
        let live = self.live_ports();
        let owners: BTreeSet<Option<u16>> = live
            .iter()
            .map(|&port| {
                self.view_from(port)
                    .into_iter()
                    .find(|node| node.master && !node.failed && node.owns(slot))
                    .map(|node| node.port)
            })
            .collect();
        match owners.into_iter().collect::<Vec<_>>()[..] {
            [Some(owner)] if live.contains(&owner) => Some(owner),
            _ => None,
        }
    }

    fn state_ok(&self, port: u16) -> bool {
        self.cli(port, &["cluster", "info"])
            .lines()
            .any(|line| line.trim() == "cluster_state:ok")
    }

    /// Every node up, in the state `--cluster create` asked for, and every
    /// node's view of the cluster the same.
    fn settled(&self, masters: usize, replicas_per_master: usize) -> bool {
        let mut views = BTreeSet::new();
        for node in &self.nodes {
            if !self.state_ok(node.port) {
                return false;
            }
            let view = self.view_from(node.port);
            let healthy = view.len() == self.nodes.len() && view.iter().all(|node| !node.failed);
            let serving = view.iter().filter(|node| node.master && !node.slots.is_empty()).count();
            let following = view.iter().filter(|node| node.master_id.is_some()).count();
            if !healthy || serving != masters || following != masters * replicas_per_master {
                return false;
            }
            let replica = view
                .iter()
                .any(|seen| seen.port == node.port && seen.master_id.is_some());
            if replica
                && !self
                    .cli(node.port, &["info", "replication"])
                    .contains("master_link_status:up")
            {
                return false;
            }
            // Who is there, who is a master, which slots each serves.
            let mut summary: Vec<String> = view
                .into_iter()
                .map(|node| format!("{} {} {:?}", node.port, node.master, node.slots))
                .collect();
            summary.sort();
            views.insert(summary);
        }
        views.len() == 1
    }

    fn poll_until(&self, limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if condition() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// `SCRIPT FLUSH` on every live node: the next EVALSHA anywhere is a NOSCRIPT.
    pub fn script_flush_all(&self) {
        for port in self.live_ports() {
            assert_eq!(self.cli(port, &["script", "flush"]), "OK", "SCRIPT FLUSH on {port}");
        }
    }

    /// The keys under `prefix` (`<prefix>:*`) on every serving master, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let listed: Vec<String> = self
            .masters()
            .into_iter()
            .map(|port| self.cli(port, &["--raw", "keys", &format!("{prefix}:*")]))
            .collect();
        sorted_keys(&listed.join("\n"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill();
        }
    }
}

// ---------------------------------------------------------------------------
// A Redis that speaks only TLS
// ---------------------------------------------------------------------------

/// A `redis-server` listening only with TLS on a loopback port, its
/// certificate (for `127.0.0.1` and `localhost`) signed by a CA made for it;
/// clients need no certificate of their own. Killed when dropped.
pub struct TlsRedis {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
    /// Its certificates, and its working folder.
    pki: tempfile::TempDir,
}

impl TlsRedis {
    /// Without a password.
    pub fn start() -> Self {
        Self::spawn(None)
    }

    /// With `requirepass`.
    pub fn start_with_password(password: &str) -> Self {
        Self::spawn(Some(password.to_owned()))
    }

    fn spawn(password: Option<String>) -> Self {
        let pki = new_test_pki();
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new("redis-server");
            command
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(tls_server_args(pki.path()))
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(pki.path());
            if let Some(password) = &password {
                command.args(["--requirepass", password]);
            }
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let deadline = Instant::now() + START_LIMIT;
            loop {
                if tls_cli(pki.path(), port, password.as_deref(), &["ping"]).as_deref() == Some("PONG") {
                    return Self {
                        port,
                        password,
                        child: Some(child),
                        pki,
                    };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    kill(child);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("a TLS redis-server did not start (is redis-server built with TLS?)");
    }

    /// `rediss://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// `rediss://:<password>@127.0.0.1:<port>`.
    pub fn url_with_password(&self) -> String {
        let password = self.password.as_deref().expect("started with a password");
        format!("rediss://:{password}@127.0.0.1:{}", self.port)
    }

    /// The PEM file of the CA that signed the server's certificate.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.pki.path().join(CA_FILE)
    }

    /// `redis-cli` over TLS (with the password, if any), its output
    /// trimmed; panics when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        tls_cli(self.pki.path(), self.port, self.password.as_deref(), args)
            .unwrap_or_else(|| panic!("redis-cli --tls {args:?} failed on port {}", self.port))
    }

    /// The keys under `prefix` (`<prefix>:*`), sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        sorted_keys(&self.cli(&["--raw", "keys", &format!("{prefix}:*")]))
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli --tls -p <port> args…` trusting the CA in `pki`, with
/// `password`.
fn tls_cli(pki: &Path, port: u16, password: Option<&str>, args: &[&str]) -> Option<String> {
    let mut all = strings(&["-p", &port.to_string()]);
    all.extend(strings(args));
    redis_cli_with(Some(pki), password, &all)
}

/// The files of [`new_test_pki`].
const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "redis.crt";
const KEY_FILE: &str = "redis.key";

/// The `redis-server` arguments for TLS with the certificate in `pki`;
/// clients need no certificate of their own.
fn tls_server_args(pki: &Path) -> Vec<std::ffi::OsString> {
    let file = |name: &str| pki.join(name).into_os_string();
    vec![
        "--tls-cert-file".into(),
        file(CERT_FILE),
        "--tls-key-file".into(),
        file(KEY_FILE),
        "--tls-ca-cert-file".into(),
        file(CA_FILE),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}

/// A folder with a CA made now ([`CA_FILE`]), and a certificate and key for
/// `127.0.0.1` and `localhost` signed by it ([`CERT_FILE`], [`KEY_FILE`]).
fn new_test_pki() -> tempfile::TempDir {
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gatehouse redis test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    // The nodes of a TLS cluster present it to each other as clients too.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CA_FILE), ca.pem()).unwrap();
    std::fs::write(dir.path().join(CERT_FILE), certificate.pem()).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), key.serialize_pem()).unwrap();
    dir
}
