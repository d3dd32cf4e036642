//! Deterministic simulation of switchboard on turmoil.
//!
//! Every node runs the production server code ([`switchboard_tokio::serve`]) on turmoil's
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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use switchboard_engine::{Config, PlantedBug};
use switchboard_tokio::{Clock, Listener, Options};

use switchboard_engine::changes::ChangeKind;
use switchboard_tokio::Server;

use crate::bus::Bus;
use crate::client::Plan;
use crate::db::Db;
use crate::oracle::{Event, Oracle};

const PORT: u16 = 4000;
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

/// Fault rates, themselves drawn from the seed.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Chance that a client crashes during the chaos.
    pub client_crash: f64,
    /// Number of delay episodes (held client-node links).
    pub delays: u32,
    /// Number of partitions between nodes.
    pub partitions: u32,
    /// Whether one node crashes and restarts.
    pub node_crash: bool,
}

/// One simulation run, fully determined by its seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Nodes, 1–3.
    pub nodes: usize,
    /// Clients, 5–50.
    pub clients: usize,
    /// Fault rates.
    pub faults: Faults,
    /// Simulated time with actions and faults.
    pub chaos: Duration,
    /// Quiet time after healing, before checking.
    pub settle: Duration,
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
}

impl Scenario {
    /// Draws topology and fault rates from `seed`.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let nodes = 1 + pick(3) as usize;
        let clients = 5 + pick(46) as usize;
        let faults = Faults {
            client_crash: [0.0, 0.1, 0.3][pick(3) as usize],
            delays: pick(4) as u32,
            partitions: if nodes > 1 { pick(3) as u32 } else { 0 },
            node_crash: nodes > 1 && pick(4) == 0,
        };
        Scenario {
            seed,
            nodes,
            clients,
            faults,
            chaos: Duration::from_secs(20),
            settle: Duration::from_secs(10),
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
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed);
        let mut sim = turmoil::Builder::new()
            .rng_seed(self.seed)
            .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
            .simulation_duration(self.chaos + self.settle + Duration::from_secs(30))
            .tick_duration(Duration::from_millis(5))
            .max_message_latency(Duration::from_millis(20))
            .build();
        let bus = Bus::default();
        let db = Db::default();
        let oracle = Oracle::default();
        for host in 0..self.nodes {
            let (bus, db, config, seed) = (bus.clone(), db.clone(), self.config(), self.seed);
            sim.host(format!("node{host}"), move || {
                let (bus, db, config) = (bus.clone(), db.clone(), config.clone());
                async move {
                    let listener =
                        SimListener(turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?);
                    let (node, link, pump) = bus.join(host);
                    tokio::spawn(pump);
                    let mut options = Options::new(config);
                    options.node = node;
                    options.seed = seed ^ node.0;
                    options.peers = Some(link);
                    options.clock = Clock::with_wall(Arc::new(|| {
                        turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
                    }));
                    let (database, outputs) = tokio::sync::mpsc::unbounded_channel();
                    options.database = Some(database);
                    let (server, task) = Server::start(options);
                    tokio::spawn(db.replicate(host, server.handle(), outputs));
                    task.run(listener, server.metrics(), std::future::pending())
                        .await;
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
        let mut node_of = Vec::new();
        for index in 0..self.clients {
            let node = (rng.next_u64() % self.nodes as u64) as usize;
            node_of.push(node);
            let crashes = (rng.next_u64() % 1000) as f64 / 1000.0 < self.faults.client_crash;
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
            let plan = Plan {
                channel_token,
                service,
                filter_owner,
                index,
                node: format!("node{node}"),
                v2: rng.next_u64() % 3 != 0,
                seed: rng.next_u64(),
                chaos_ms,
                end_ms,
                crash_at: crashes.then(|| 1_000 + rng.next_u64() % chaos_ms),
                key: key.clone(),
            };
            let oracle = oracle.clone();
            sim.client(format!("client{index}"), client::run(plan, oracle));
        }
        // The fault schedule: (at ms, action), healed before the settle phase.
        let mut schedule: Vec<(u64, Fault)> = Vec::new();
        for _ in 0..self.faults.delays {
            let (client, start) = (
                (rng.next_u64() % self.clients as u64) as usize,
                rng.next_u64() % chaos_ms,
            );
            let end = (start + 200 + rng.next_u64() % 3_000).min(chaos_ms);
            schedule.push((start, Fault::Hold(client)));
            schedule.push((end, Fault::Release(client)));
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
        schedule.push((chaos_ms, Fault::HealAll));
        schedule.sort_by_key(|(at, _)| *at);
        let mut schedule = schedule.into_iter().peekable();
        let mut violations = Vec::new();
        loop {
            let now = sim.elapsed().as_millis() as u64;
            while let Some((_, fault)) = schedule.next_if(|(at, _)| *at <= now) {
                fault.apply(&mut sim, &bus, &db, &oracle, &node_of, now);
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
        let events = oracle.events();
        violations.extend(oracle::check(&events, &db.log()));
        let deliveries = events
            .iter()
            .filter(|e| matches!(e, Event::Delivered { .. }))
            .count();
        let changes = events
            .iter()
            .filter(|e| matches!(e, Event::ChangeSeen { .. }))
            .count();
        Report {
            seed: self.seed,
            violations,
            trace_hash: oracle.trace_hash(),
            deliveries,
            changes,
        }
    }

    fn config(&self) -> Config {
        Config {
            jwt_secret: SECRET.to_owned(),
            join_error_backoff_ms: 0,
            connect_error_backoff_ms: 0,
            events_per_sec_max: 0,
            joins_per_sec_max: 0,
            presence_events_per_sec_max: 0,
            client_presence_calls_max: 1_000,
            concurrent_users_max: usize::MAX,
            postgres_changes: true,
            planted_bug: self.planted_bug,
            ..Config::default()
        }
    }
}

#[derive(Clone, Debug)]
enum Fault {
    Commit(String, ChangeKind),
    Hold(usize),
    Release(usize),
    Partition(usize, usize),
    Heal(usize, usize),
    Crash(usize),
    Restart(usize),
    HealAll,
}

impl Fault {
    fn apply(
        self,
        sim: &mut turmoil::Sim<'_>,
        bus: &Bus,
        db: &Db,
        oracle: &Oracle,
        node_of: &[usize],
        now: u64,
    ) {
        let client_link = |client: usize| {
            (
                format!("client{client}"),
                format!("node{}", node_of[client]),
            )
        };
        match self {
            Fault::Hold(client) => {
                let (a, b) = client_link(client);
                sim.hold(a, b);
            }
            Fault::Release(client) => {
                let (a, b) = client_link(client);
                sim.release(a, b);
            }
            Fault::Commit(owner, kind) => db.commit(now, owner, kind),
            Fault::Partition(a, b) => bus.partition(a, b),
            Fault::Heal(a, b) => bus.heal(a, b),
            Fault::Crash(node) => {
                bus.crash(node);
                sim.crash(format!("node{node}"));
                // Its clients lost their connections, whatever their sockets report.
                for (client, _) in node_of.iter().enumerate().filter(|(_, n)| **n == node) {
                    oracle.record(Event::Disconnected { client, at: now });
                }
            }
            Fault::Restart(node) => sim.bounce(format!("node{node}")),
            Fault::HealAll => {
                bus.heal_all();
                for client in 0..node_of.len() {
                    let (a, b) = client_link(client);
                    sim.release(a, b);
                }
            }
        }
    }
}
