//! Deterministic simulation of switchboard on turmoil.
//!
//! Every node runs the production server code ([`switchboard_tokio::ServerTask::run`]) on turmoil's
//! simulated TCP; nodes exchange peer messages through a simulated [`bus::Bus`]; simulated
//! clients speak the real wire protocol. Faults are drawn from the seed: client crashes,
//! message delays between clients and nodes, partitions between nodes (held, then healed)
//! and node crashes with restarts. After the faults heal and the system goes quiet, the
//! [`oracle`] checks the invariants of DESIGN.md.
//!
//! A run is a pure function of its seed: `SIM_SEED=<n>` replays one seed, `SIM_SEEDS=<count>`
//! runs many, and a failing run prints the command that replays it.

pub mod bus;
pub mod client;
pub mod db;
pub mod oracle;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use switchboard_engine::{Config, PlantedBug};
use switchboard_tokio::{Accepting, Clock, Listener, Metrics, Options, Tokio};

use switchboard_engine::changes::ChangeKind;
use switchboard_tokio::Server;

use crate::bus::Bus;
use crate::client::Plan;
use crate::db::{Db, DbFaults, Policy};
use crate::oracle::{Event, Oracle};

const PORT: u16 = 4000;

/// One simulation step. Hosts take turns within a step, each running its own clock through
/// it, so times two hosts record in the same step may disagree by up to this much: the
/// oracle orders events of different hosts only when they are further apart.
pub const TICK_MS: u64 = 10;
pub(crate) const SECRET: &str = "simulation-secret-simulation-secret";

/// The seeds a test runs: `SIM_SEED` alone, else `SIM_SEEDS` (or `default`) seeds from 0.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (0..count).collect()
}

/// Prints how to replay `seed` if the thread panics while this is alive, so a panic deep
/// inside the server still names its seed.
pub struct PrintSeedOnPanic(pub u64, pub &'static str);

impl Drop for PrintSeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "replay: SIM_SEED={} cargo test -p switchboard-sim --test {} -- --nocapture",
                self.0, self.1
            );
        }
    }
}

/// A turmoil listener for the production server.
struct SimListener(turmoil::net::TcpListener);

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&self) -> std::io::Result<(Self::Stream, std::net::SocketAddr)> {
        self.0.accept().await
    }
}

/// The shards of one host share its one simulated listener: connections go to them in
/// turn, as the kernel's SO_REUSEPORT spreads them over shards' listeners in production.
struct ShardListener(tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Accepted>>);

type Accepted = std::io::Result<(turmoil::net::TcpStream, std::net::SocketAddr)>;

impl Listener for ShardListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&self) -> Accepted {
        match self.0.lock().await.recv().await {
            Some(accepted) => accepted,
            None => std::future::pending().await,
        }
    }
}

/// Spreads `listener`'s connections over `shards` listeners, round robin.
fn split(listener: SimListener, shards: usize) -> Vec<ShardListener> {
    let (senders, listeners): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| {
            let (send, receive) = tokio::sync::mpsc::channel(64);
            (send, ShardListener(tokio::sync::Mutex::new(receive)))
        })
        .unzip();
    tokio::spawn(async move {
        for next in (0..senders.len()).cycle() {
            let accepted = listener.accept().await;
            if senders[next].send(accepted).await.is_err() {
                return;
            }
        }
    });
    listeners
}

/// Fault rates, themselves drawn from the seed.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Chance that a client's process is killed during the chaos (its socket drops, the
    /// server hears it close); most restart and reconnect.
    pub client_crash: f64,
    /// Chance that a client's machine vanishes: its link goes silent for good, so the
    /// server must notice on its own, by the heartbeat timeout.
    pub client_vanish: f64,
    /// Number of delay episodes (a client's links held, then released in order).
    pub delays: u32,
    /// Number of client partitions (a client's links drop everything, then repair): its
    /// connection stalls, both sides time it out, the client reconnects.
    pub client_partitions: u32,
    /// Number of stalls: a client reads and sends nothing for a while (a slow consumer).
    pub stalls: u32,
    /// Number of partitions between nodes.
    pub partitions: u32,
    /// Whether one node crashes and restarts.
    pub node_crash: bool,
    /// Number of severed links between nodes (as a cluster link cut from NATS).
    pub severs: u32,
    /// How the database misbehaves.
    pub db: DbFaults,
}

/// One simulation run, fully determined by its seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Nodes, 1–3.
    pub nodes: usize,
    /// Shards per node, 1–4: peers of each other and of every other node's shards.
    pub shards: u16,
    /// Clients, 5–50.
    pub clients: usize,
    /// Fault rates.
    pub faults: Faults,
    /// Simulated time with actions and faults.
    pub chaos: Duration,
    /// Quiet time after healing, before checking.
    pub settle: Duration,
    /// The published table's read policy: `owner = auth.uid()` in three runs of four.
    pub policy: Policy,
    /// A deliberate bug to plant in the engine.
    pub planted_bug: Option<PlantedBug>,
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Broken invariants, empty when the run is correct.
    pub violations: Vec<String>,
    /// A hash of every recorded event: equal seeds give equal hashes.
    pub trace_hash: u64,
    /// Broadcasts delivered, for a sense of the run's size.
    pub deliveries: usize,
    /// Postgres changes delivered.
    pub changes: usize,
    /// Connections made after a client's first.
    pub reconnects: usize,
    /// Sockets the servers closed because their send queue overflowed.
    pub slow_consumers: u64,
    /// Visibility questions that only confirmed a rule the engines judged rows by.
    pub rule_confirmations: u64,
    /// How connections ended, as their clients saw it.
    pub endings: BTreeMap<String, usize>,
}

/// Frames queued per socket in the simulation: a quarter of production's 1,024, so a
/// stalled client overflows it within seconds, yet as many as the inputs the engine task
/// takes per wake-up, so the burst a healed node partition releases does not.
const SEND_QUEUE: usize = 256;

/// The server's heartbeat timeout in the simulation: longer than any stall, so stalled
/// clients are judged as slow consumers, and short enough to expire a vanished client well
/// within the settle time.
const HEARTBEAT_TIMEOUT_MS: u64 = 6_000;

impl Scenario {
    /// Draws topology and fault rates from `seed`.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let nodes = 1 + pick(3) as usize;
        let clients = 5 + pick(46) as usize;
        let faults = Faults {
            client_crash: [0.0, 0.1, 0.3][pick(3) as usize],
            client_vanish: [0.0, 0.0, 0.05][pick(3) as usize],
            delays: pick(4) as u32,
            client_partitions: pick(3) as u32,
            stalls: 1 + pick(4) as u32,
            partitions: if nodes > 1 { pick(3) as u32 } else { 0 },
            node_crash: nodes > 1 && pick(4) == 0,
            // A stream of its own, so the draws above stay what they were.
            severs: match ChaCha8Rng::seed_from_u64(seed ^ 0x5e7e).next_u64() % 3 {
                n if nodes > 1 => n as u32,
                _ => 0,
            },
            db: {
                // A stream of its own, so the draws above stay what they were.
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xdb);
                let mut pick = |n: u64| rng.next_u64() % n;
                DbFaults {
                    fail: [0.0, 0.05, 0.3][pick(3) as usize],
                    delay_ms_max: [0, 30, 300][pick(3) as usize],
                    outages: pick(3) as u32,
                    rule_flaps: [0.0, 0.1, 0.5][pick(3) as usize],
                }
            },
        };
        // A stream of its own, so the draws above stay what they were.
        let shards = 1 + (ChaCha8Rng::seed_from_u64(seed ^ 0x5aa2d).next_u64() % 4) as u16;
        // A stream of its own, so the draws above stay what they were.
        let policy = match ChaCha8Rng::seed_from_u64(seed ^ 0x70e).next_u64() % 4 {
            0 => Policy::Everyone,
            _ => Policy::Owner,
        };
        Scenario {
            seed,
            nodes,
            shards,
            clients,
            faults,
            policy,
            chaos: Duration::from_secs(20),
            settle: Duration::from_secs(12),
            planted_bug: None,
        }
    }

    /// Plants `bug` in every node's engine.
    pub fn plant(mut self, bug: PlantedBug) -> Scenario {
        self.planted_bug = Some(bug);
        self
    }

    /// Runs the simulation and checks the invariants.
    pub fn run(&self) -> Report {
        let panics_before = panics::count();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed);
        let mut sim = turmoil::Builder::new()
            .rng_seed(self.seed)
            .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
            .simulation_duration(self.chaos + self.settle + Duration::from_secs(30))
            .tick_duration(Duration::from_millis(TICK_MS))
            .max_message_latency(Duration::from_millis(20))
            // Hosts step in an order drawn from the seed, not always node0 first.
            .enable_random_order()
            .build();
        let bus = Bus::default();
        let db = Db::new(self.faults.db, self.policy, self.seed, self.planted_bug);
        let oracle = Oracle::default();
        let metrics: Arc<Mutex<Vec<Arc<Metrics>>>> = Arc::default();
        for host in 0..self.nodes {
            let (bus, db, config, seed) = (bus.clone(), db.clone(), self.config(), self.seed);
            let metrics = metrics.clone();
            let shards = self.shards;
            sim.host(format!("node{host}"), move || {
                let (bus, db, config) = (bus.clone(), db.clone(), config.clone());
                let metrics = metrics.clone();
                async move {
                    let listener =
                        SimListener(turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?);
                    let mut base = Options::new(config);
                    base.seed = seed;
                    base.send_queue = SEND_QUEUE;
                    base.clock = Clock::with_wall(Arc::new(|| {
                        turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
                    }));
                    let (database, outputs) = tokio::sync::mpsc::unbounded_channel();
                    base.database = Some(database);
                    metrics
                        .lock()
                        .expect("metrics lock")
                        .push(base.shared.metrics.clone());
                    // The shards' ids and links come from the bus, which knows every host.
                    let replicas = (0..shards).map(|shard| {
                        let (node, link) = bus.join(host, shard);
                        (node, Some(link))
                    });
                    let (servers, tasks) = Server::shards(base.replicas(replicas));
                    let handles: Vec<_> = servers.iter().map(Server::handle).collect();
                    tokio::spawn(db.replicate(host, handles, outputs));
                    let listeners = split(listener, tasks.len());
                    let serving = tasks.into_iter().zip(listeners).map(|(task, listener)| {
                        let serving = task.run(Tokio, Accepting(listener), std::future::pending());
                        tokio::task::spawn_local(serving)
                    });
                    for serving in serving.collect::<Vec<_>>() {
                        let _ = serving.await;
                    }
                    Ok(())
                }
            });
        }
        let chaos_ms = self.chaos.as_millis() as u64;
        let end_ms = chaos_ms + self.settle.as_millis() as u64;
        let key = switchboard_engine::auth::sign(
            SECRET,
            &serde_json::json!({"role": "anon", "exp": 4_000_000_000u64}),
        );
        // The fault schedule: (at ms, action), healed before the settle phase.
        let mut schedule: Vec<(u64, Fault)> = Vec::new();
        let mut stalls: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
        for _ in 0..self.faults.stalls {
            let client = (rng.next_u64() % self.clients as u64) as usize;
            let start = 1_000 + rng.next_u64() % (chaos_ms - 1_000);
            let length = 500 + rng.next_u64() % 4_000;
            stalls.entry(client).or_default().push((start, length));
        }
        for index in 0..self.clients {
            let home = (rng.next_u64() % self.nodes as u64) as usize;
            let service = rng.next_u64() % 5 == 0;
            let role = if service {
                "service_role"
            } else {
                "authenticated"
            };
            let channel_token = switchboard_engine::auth::sign(
                SECRET,
                &serde_json::json!({"role": role, "sub": format!("c{index}"), "exp": 4_000_000_000u64}),
            );
            let filter_owner = match rng.next_u64() % 3 {
                0 => None,
                1 => Some(format!("c{index}")),
                _ => Some(format!("c{}", rng.next_u64() % self.clients as u64)),
            };
            let crashes = chance(&mut rng, self.faults.client_crash);
            let vanishes = chance(&mut rng, self.faults.client_vanish);
            let kill = if vanishes {
                // Silence first, then the process goes: not even a FIN gets out.
                let at = 1_000 + rng.next_u64() % (chaos_ms - 1_000);
                schedule.push((at, Fault::Vanish(index)));
                Some((at + 50, None))
            } else {
                crashes.then(|| {
                    let restart = (rng.next_u64() % 4 != 0).then(|| 200 + rng.next_u64() % 3_000);
                    (1_000 + rng.next_u64() % chaos_ms, restart)
                })
            };
            let plan = Plan {
                channel_token,
                service,
                filter_owner,
                index,
                nodes: self.nodes,
                home,
                v2: rng.next_u64() % 3 != 0,
                seed: rng.next_u64(),
                chaos_ms,
                end_ms,
                kill,
                stalls: {
                    let mut stalls = stalls.remove(&index).unwrap_or_default();
                    stalls.sort_unstable();
                    stalls
                },
                key: key.clone(),
            };
            let oracle = oracle.clone();
            sim.client(format!("client{index}"), client::run(plan, oracle));
        }
        for _ in 0..self.faults.delays {
            let (client, start) = (
                (rng.next_u64() % self.clients as u64) as usize,
                rng.next_u64() % chaos_ms,
            );
            let end = (start + 200 + rng.next_u64() % 3_000).min(chaos_ms);
            schedule.push((start, Fault::Hold(client)));
            schedule.push((end, Fault::Release(client)));
        }
        for _ in 0..self.faults.client_partitions {
            let (client, start) = (
                (rng.next_u64() % self.clients as u64) as usize,
                rng.next_u64() % chaos_ms,
            );
            let end = (start + 500 + rng.next_u64() % 5_000).min(chaos_ms);
            schedule.push((start, Fault::Cut(client)));
            schedule.push((end, Fault::Repair(client)));
        }
        for _ in 0..self.faults.partitions {
            let a = (rng.next_u64() % self.nodes as u64) as usize;
            let b = (a + 1 + (rng.next_u64() % (self.nodes as u64 - 1)) as usize) % self.nodes;
            let start = rng.next_u64() % chaos_ms;
            schedule.push((start, Fault::Partition(a, b)));
            schedule.push((
                (start + 500 + rng.next_u64() % 5_000).min(chaos_ms),
                Fault::Heal(a, b),
            ));
        }
        let mut severs = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5e7e5);
        for _ in 0..self.faults.severs {
            let a = (severs.next_u64() % self.nodes as u64) as usize;
            let b = (a + 1 + (severs.next_u64() % (self.nodes as u64 - 1)) as usize) % self.nodes;
            let start = severs.next_u64() % chaos_ms;
            schedule.push((start, Fault::Sever(a, b)));
            schedule.push((
                (start + 500 + severs.next_u64() % 5_000).min(chaos_ms),
                Fault::Mend(a, b),
            ));
        }
        for _ in 0..self.faults.db.outages {
            let start = rng.next_u64() % chaos_ms;
            schedule.push((start, Fault::DbDown));
            schedule.push((
                (start + 200 + rng.next_u64() % 3_000).min(chaos_ms),
                Fault::DbUp,
            ));
        }
        if self.faults.node_crash {
            let node = (rng.next_u64() % self.nodes as u64) as usize;
            let at = 2_000 + rng.next_u64() % (chaos_ms / 2);
            schedule.push((at, Fault::Crash(node)));
            schedule.push((at + 1_000 + rng.next_u64() % 3_000, Fault::Restart(node)));
        }
        // The database's writer: a change every 100–400 ms of the chaos.
        let mut at = 500;
        while at < chaos_ms {
            let owner = format!("c{}", rng.next_u64() % self.clients as u64);
            let kind = [ChangeKind::Insert, ChangeKind::Update, ChangeKind::Delete]
                [(rng.next_u64() % 3) as usize];
            schedule.push((at, Fault::Commit(owner, kind)));
            at += 100 + rng.next_u64() % 300;
        }
        // Messages sent from SQL, every 200–800 ms, to a public or the private room (a
        // stream of its own, so the draws above stay what they were).
        let mut sends = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5e4d);
        let mut at = 700;
        while at < chaos_ms {
            let private = sends.next_u64().is_multiple_of(2);
            let room = if private {
                db::PRIVATE_ROOM
            } else {
                client::ROOMS[0]
            };
            schedule.push((at, Fault::Send(room.to_owned(), private)));
            at += 200 + sends.next_u64() % 600;
        }
        schedule.push((chaos_ms, Fault::HealAll));
        schedule.sort_by_key(|(at, _)| *at);
        let mut schedule = schedule.into_iter().peekable();
        let mut links = Links {
            clients: self.clients,
            nodes: self.nodes,
            ..Links::default()
        };
        let mut violations = Vec::new();
        loop {
            let now = sim.elapsed().as_millis() as u64;
            while let Some((_, fault)) = schedule.next_if(|(at, _)| *at <= now) {
                fault.apply(&mut sim, &bus, &db, &mut links, &oracle, now);
            }
            match sim.step() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    violations.push(format!("invariant 7: a host failed: {e}"));
                    break;
                }
            }
        }
        let panics = panics::count() - panics_before;
        if panics > 0 {
            violations.push(format!("invariant 7: {panics} tasks panicked"));
        }
        let events = oracle.events();
        violations.extend(oracle::check(&events, &db.log(), self.policy));
        violations.extend(db.violations());
        if let Ok(path) = std::env::var("SIM_TRACE") {
            // The whole event log, one event a line, for reading a replayed failure.
            let trace: String = events.iter().map(|e| format!("{e:?}\n")).collect();
            if let Err(e) = std::fs::write(&path, trace) {
                eprintln!("SIM_TRACE: writing {path}: {e}");
            }
        }
        let mut report = Report {
            seed: self.seed,
            violations,
            trace_hash: oracle.trace_hash(),
            deliveries: 0,
            changes: 0,
            reconnects: 0,
            slow_consumers: metrics
                .lock()
                .expect("metrics lock")
                .iter()
                .map(|m| m.slow_consumers.get())
                .sum(),
            endings: BTreeMap::new(),
            rule_confirmations: db.confirmations(),
        };
        for event in &events {
            match event {
                Event::Delivered { .. } => report.deliveries += 1,
                Event::ChangeSeen { .. } => report.changes += 1,
                Event::Connected { who, .. } if who.life > 1 => report.reconnects += 1,
                Event::Disconnected { why, .. } => {
                    *report.endings.entry(format!("{why:?}")).or_default() += 1;
                }
                _ => {}
            }
        }
        report
    }

    fn config(&self) -> Config {
        Config {
            jwt_secret: SECRET.to_owned(),
            heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
            join_error_backoff_ms: 0,
            connect_error_backoff_ms: 0,
            events_per_sec_max: 0,
            joins_per_sec_max: 0,
            presence_events_per_sec_max: 0,
            client_presence_calls_max: 1_000,
            concurrent_users_max: usize::MAX,
            database: true,
            planted_bug: self.planted_bug,
            ..Config::default()
        }
    }
}

/// True with probability `p`, drawn from `rng`.
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    (rng.next_u64() % 1000) as f64 / 1000.0 < p
}

/// What the fault schedule knows of the links between clients and nodes.
#[derive(Default)]
struct Links {
    clients: usize,
    nodes: usize,
    /// Clients whose links are held.
    held: BTreeSet<usize>,
    /// Clients whose links drop everything.
    cut: BTreeSet<usize>,
    /// Clients whose machine vanished: their links stay cut to the end.
    vanished: BTreeSet<usize>,
}

impl Links {
    /// Calls `f` with the hosts of every link of `client` (it may be on any node), unless it
    /// vanished.
    fn each(&self, client: usize, mut f: impl FnMut(&str, &str)) {
        if self.vanished.contains(&client) {
            return;
        }
        let client = format!("client{client}");
        for node in 0..self.nodes {
            f(&client, &format!("node{node}"));
        }
    }

    /// Crashes `node` silently, as a machine dies: not one FIN or RST reaches a client,
    /// which must notice by its heartbeats. Its links are cut while turmoil drops the node's
    /// sockets, then put back as they were.
    ///
    /// Silence also keeps the run a function of its seed: tokio drops a crashed runtime's
    /// tasks in an order that depends on process-wide task ids, and each segment sent in
    /// that order would draw its latency from the simulation's one RNG.
    fn crash(&self, sim: &mut turmoil::Sim<'_>, node: usize) {
        let host = format!("node{node}");
        let clients: Vec<String> = (0..self.clients).map(|c| format!("client{c}")).collect();
        for client in &clients {
            sim.partition(client.as_str(), host.as_str());
        }
        sim.crash(host.as_str());
        for (index, client) in clients.iter().enumerate() {
            if self.held.contains(&index) {
                sim.hold(client.as_str(), host.as_str());
            } else if !self.cut.contains(&index) && !self.vanished.contains(&index) {
                sim.repair(client.as_str(), host.as_str());
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Fault {
    Commit(String, ChangeKind),
    Send(String, bool),
    Hold(usize),
    Release(usize),
    Cut(usize),
    Repair(usize),
    Vanish(usize),
    Partition(usize, usize),
    Heal(usize, usize),
    Sever(usize, usize),
    Mend(usize, usize),
    Crash(usize),
    Restart(usize),
    DbDown,
    DbUp,
    HealAll,
}

impl Fault {
    fn apply(
        self,
        sim: &mut turmoil::Sim<'_>,
        bus: &Bus,
        db: &Db,
        links: &mut Links,
        oracle: &Oracle,
        now: u64,
    ) {
        match self {
            Fault::Hold(client) => {
                links.each(client, |a, b| sim.hold(a, b));
                links.held.insert(client);
            }
            Fault::Release(client) => {
                links.each(client, |a, b| sim.release(a, b));
                links.held.remove(&client);
            }
            Fault::Cut(client) => {
                links.each(client, |a, b| sim.partition(a, b));
                links.cut.insert(client);
            }
            Fault::Repair(client) => {
                links.each(client, |a, b| sim.repair(a, b));
                links.cut.remove(&client);
            }
            Fault::Vanish(client) => {
                links.each(client, |a, b| sim.partition(a, b));
                links.vanished.insert(client);
            }
            Fault::Commit(owner, kind) => db.commit(now, owner, kind),
            Fault::Send(room, private) => db.send(now, room, private),
            Fault::Partition(a, b) => bus.partition(a, b),
            Fault::Heal(a, b) => bus.heal(a, b),
            Fault::Sever(a, b) => {
                bus.sever(a, b);
                oracle.record(Event::Severed { a, b, at: now });
            }
            Fault::Mend(a, b) => {
                bus.mend(a, b);
                oracle.record(Event::Mended { a, b, at: now });
            }
            Fault::Crash(node) => {
                bus.crash(node);
                links.crash(sim, node);
            }
            Fault::Restart(node) => sim.bounce(format!("node{node}")),
            Fault::DbDown => db.set_down(true),
            Fault::DbUp => db.set_down(false),
            Fault::HealAll => {
                for (a, b) in bus.severed() {
                    bus.mend(a, b);
                    oracle.record(Event::Mended { a, b, at: now });
                }
                bus.heal_all();
                db.set_down(false);
                links.held.clear();
                links.cut.clear();
                for client in 0..links.clients {
                    links.each(client, |a, b| {
                        sim.release(a, b);
                        sim.repair(a, b);
                    });
                }
            }
        }
    }
}

/// Counts panics on this thread: a simulation runs on one thread, and a panic in any of its
/// tasks (which tokio would otherwise swallow) breaks invariant 7.
mod panics {
    use std::cell::Cell;
    use std::sync::Once;

    thread_local! {
        static PANICS: Cell<u64> = const { Cell::new(0) };
    }

    /// Panics seen on this thread so far.
    pub(crate) fn count() -> u64 {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICS.with(|p| p.set(p.get() + 1));
                previous(info);
            }));
        });
        PANICS.with(Cell::get)
    }
}
