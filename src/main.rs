//! `switchboard`: a realtime server that speaks the Supabase Realtime protocol.
//!
//! `switchboard serve` starts it; every option also reads an environment variable.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

mod jwks;
mod settings;

use anyhow::Context;
use clap::builder::RangedU64ValueParser;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use settings::LogFormat;
use switchboard_engine::{auth, Config};
use switchboard_tokio::cluster::{self, ClusterConfig};
use switchboard_tokio::postgres::check::{self, Status};
use switchboard_tokio::postgres::{self, PostgresConfig};
use switchboard_tokio::{to_shards, Options, Server};
use tracing::{error, info, warn};

/// jemalloc, with its background threads returning freed memory to the system within
/// seconds. glibc's allocator kept what a burst of large messages had used: after clients
/// holding 190 MB of unfinished messages left, RSS stayed at 187 MB with glibc and went
/// back to 13 MB with jemalloc, which also holds idle sockets in slightly less (4,974 B
/// against 5,070 B each, 19,000 joined sockets).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "A realtime server for the Supabase Realtime protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket clients and the REST API.
    Serve(Box<Serve>),
    /// Install or upgrade the `realtime` schema (`serve` does it too at start), then exit.
    Migrate(Migrate),
    /// Check a database for what realtime needs and print a fix for each shortfall
    /// (`serve` logs the same checks at start). Exits 1 when a check failed, 2 when the
    /// database could not be checked.
    Check(Check),
    /// Mint a token signed with the project's JWT secret (HS256) and print it on the last
    /// line: an anon or service_role key, or a user's token to try policies with.
    Token(Token),
}

#[derive(Args)]
struct Token {
    /// The project's JWT secret, as `serve` is given it.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// The `role` claim: anon, authenticated, service_role or a database role of yours.
    #[arg(long)]
    role: String,
    /// The `sub` claim: the user id that `auth.uid()` returns in policies.
    #[arg(long)]
    sub: Option<String>,
    /// How long it is valid: seconds, or a number with s, m, h or d (`90s`, `1h`, `30d`).
    #[arg(long, default_value = "1h", value_parser = lifetime)]
    exp: u64,
}

#[derive(Args)]
struct Migrate {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Args)]
struct Check {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[command(flatten)]
    stream: Stream,
}

/// Where `serve` streams changes from, and so what `check` checks.
#[derive(Args)]
struct Stream {
    /// The publication whose tables postgres_changes streams (Supabase creates it).
    #[arg(
        long,
        env = "SWITCHBOARD_PUBLICATION",
        default_value = "supabase_realtime"
    )]
    publication: String,
    /// The logical replication slot, created on first start and kept across restarts.
    #[arg(
        long,
        env = "SWITCHBOARD_SLOT_NAME",
        default_value = "switchboard_slot"
    )]
    slot_name: String,
}

/// Which runtime drives the engines. Both run the same serving core, one engine and one
/// SO_REUSEPORT listener per shard; one engine on tokio's work-stealing pool was measured
/// beside shards and won no scenario (README, Benchmarks), so it is not offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Runtime {
    /// One thread per shard, each with its own single-threaded tokio runtime (epoll).
    Tokio,
    /// One glommio executor per shard, each pinned to a core of its own (io_uring).
    Glommio,
}

#[derive(Args)]
struct Serve {
    /// A TOML file of settings keyed by option name (`bind = "0.0.0.0:4000"`,
    /// `max_concurrent_users = 500`): flags and environment variables override it, and it
    /// overrides the defaults.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<String>,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, env = "SWITCHBOARD_BIND", default_value = "127.0.0.1:4000")]
    bind: SocketAddr,
    /// The project's JWT secret (HS256/384/512). Without one a development secret is
    /// generated and ready-to-use keys are printed.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Keys for asymmetric tokens (RS256/384/512, ES256/384, EdDSA) and further HS secrets,
    /// chosen by each token's `kid`: a JWKS (`{"keys": [...]}`), inline or as a file path,
    /// like upstream's API_JWT_JWKS.
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS", hide_env_values = true)]
    jwt_jwks: Option<String>,
    /// A URL serving a JWKS (a Supabase project's `https://<ref>.supabase.co/auth/v1/.well-known/jwks.json`):
    /// fetched at start, fetched again when a token names a key it lacks, kept while the
    /// URL is down. Adds to `--jwt-jwks`.
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS_URL")]
    jwt_jwks_url: Option<String>,
    /// Least time between two fetches of `--jwt-jwks-url`, in seconds.
    #[arg(long, env = "SWITCHBOARD_JWT_JWKS_REFRESH_SECS", default_value_t = 30,
          value_parser = RangedU64ValueParser::<u64>::new().range(1..))]
    jwt_jwks_refresh_secs: u64,
    /// Postgres connection URL; enables postgres_changes.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    stream: Stream,
    /// Database connections answering Row Level Security visibility checks.
    #[arg(long, env = "SWITCHBOARD_VISIBILITY_CONNECTIONS", default_value_t = 2)]
    visibility_connections: usize,
    /// Joins a cluster through this NATS server (`nats://host:port`): broadcast and
    /// presence reach the members on every node. Every node needs the same JWT settings
    /// and database.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_NATS")]
    cluster_nats: Option<String>,
    /// First token of the cluster's NATS subjects: clusters sharing a broker differ here.
    #[arg(
        long,
        env = "SWITCHBOARD_CLUSTER_PREFIX",
        default_value = "switchboard",
        value_parser = subject_prefix
    )]
    cluster_prefix: String,
    /// This node's name in the cluster's logs; default: host name and process id.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_NODE_NAME")]
    cluster_node_name: Option<String>,
    /// How often a node tells the cluster it is alive, in milliseconds.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_HEARTBEAT_MS", default_value_t = 1_000,
          value_parser = RangedU64ValueParser::<u64>::new().range(10..))]
    cluster_heartbeat_ms: u64,
    /// Silence after which a node counts as down and its presence leaves, in milliseconds.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_DOWN_MS", default_value_t = 5_000,
          value_parser = RangedU64ValueParser::<u64>::new().range(10..))]
    cluster_down_ms: u64,
    /// Runtime that drives the engines.
    #[arg(long, env = "SWITCHBOARD_RUNTIME", value_enum, default_value = "tokio")]
    runtime: Runtime,
    /// Engines in this process, each a peer of the others, each with its own listener on
    /// the same address; default: the cores this process may use.
    #[arg(
        long,
        env = "SWITCHBOARD_SHARDS",
        value_parser = RangedU64ValueParser::<u16>::new().range(1..=1024)
    )]
    shards: Option<u16>,
    /// Log filter, RUST_LOG syntax; pg_walstream logs every WAL confirmation at info.
    #[arg(
        long,
        env = "SWITCHBOARD_LOG",
        default_value = "info,pg_walstream=warn"
    )]
    log_level: String,
    /// Log lines as text (coloured only on a terminal, and never with NO_COLOR set) or as
    /// JSON, one object per line, for log shippers.
    #[arg(
        long,
        env = "SWITCHBOARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Frames queued per socket before the client is closed as a slow consumer.
    #[arg(
        long,
        env = "SWITCHBOARD_SEND_QUEUE",
        default_value_t = 1024,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..)
    )]
    send_queue: usize,
    /// Bytes queued per socket before the client is closed as a slow consumer.
    #[arg(
        long,
        env = "SWITCHBOARD_SEND_QUEUE_BYTES",
        default_value_t = 16 << 20,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..)
    )]
    send_queue_bytes: usize,
    /// Sockets with at least one channel.
    #[arg(long, env = "SWITCHBOARD_MAX_CONCURRENT_USERS", default_value_t = Config::default().concurrent_users_max)]
    max_concurrent_users: usize,
    /// Channels per socket.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CHANNELS_PER_CLIENT",
        default_value_t = Config::default().channels_per_client_max
    )]
    max_channels_per_client: usize,
    /// Joins per second, averaged over --rate-window-secs (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_MAX_JOINS_PER_SECOND", default_value_t = Config::default().joins_per_sec_max)]
    max_joins_per_second: u32,
    /// Events per second, averaged over --rate-window-secs (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_MAX_EVENTS_PER_SECOND", default_value_t = Config::default().events_per_sec_max)]
    max_events_per_second: u32,
    /// Presence events per second, averaged over --rate-window-secs (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_PRESENCE_EVENTS_PER_SECOND",
        default_value_t = Config::default().presence_events_per_sec_max
    )]
    max_presence_events_per_second: u32,
    /// Largest payload, in kilobytes.
    #[arg(long, env = "SWITCHBOARD_MAX_PAYLOAD_SIZE_KB", default_value_t = Config::default().payload_kb_max)]
    max_payload_size_kb: u64,
    /// Largest presence state of one channel, in bytes: tracks beyond it are refused.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_PRESENCE_STATE_BYTES",
        default_value_t = Config::default().presence_state_bytes_max
    )]
    max_presence_state_bytes: usize,
    /// Bytes that unfinished WebSocket messages of all sockets may hold together.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_UNFINISHED_BYTES",
        default_value_t = Config::default().unfinished_bytes_max
    )]
    max_unfinished_bytes: usize,
    /// Delay before a join error reply.
    #[arg(
        long,
        env = "SWITCHBOARD_JOIN_ERROR_BACKOFF_MS",
        default_value_t = Config::default().join_error_backoff_ms
    )]
    join_error_backoff_ms: u64,
    /// Delay before a refused upgrade is answered.
    #[arg(
        long,
        env = "SWITCHBOARD_CONNECT_ERROR_BACKOFF_MS",
        default_value_t = Config::default().connect_error_backoff_ms
    )]
    connect_error_backoff_ms: u64,
    /// A socket without any channel for this long is closed.
    #[arg(
        long,
        env = "SWITCHBOARD_NO_CHANNEL_TIMEOUT_MS",
        default_value_t = Config::default().no_channel_timeout_ms
    )]
    no_channel_timeout_ms: u64,
    /// Presence pushes one channel may make per --client-presence-window-ms.
    #[arg(
        long,
        env = "SWITCHBOARD_CLIENT_PRESENCE_MAX_CALLS",
        default_value_t = Config::default().client_presence_calls_max
    )]
    client_presence_max_calls: u32,
    /// The window for --client-presence-max-calls.
    #[arg(
        long,
        env = "SWITCHBOARD_CLIENT_PRESENCE_WINDOW_MS",
        default_value_t = Config::default().client_presence_window_ms
    )]
    client_presence_window_ms: u64,
    /// The window rate limits average over: bursts within it are allowed.
    #[arg(
        long,
        env = "SWITCHBOARD_RATE_WINDOW_SECS",
        default_value_t = Config::default().rate_window_secs,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    rate_window_secs: u64,
    /// How often presence heartbeats go to peer replicas.
    #[arg(
        long,
        env = "SWITCHBOARD_PRESENCE_BROADCAST_MS",
        default_value_t = Config::default().presence_broadcast_ms,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    presence_broadcast_ms: u64,
    /// A socket that sends nothing for this long is closed.
    #[arg(
        long,
        env = "SWITCHBOARD_HEARTBEAT_TIMEOUT_MS",
        default_value_t = Config::default().heartbeat_timeout_ms
    )]
    heartbeat_timeout_ms: u64,
    /// Send presence_state on every join.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_ENABLED")]
    presence_enabled: bool,
    /// Refuse public channels.
    #[arg(long, env = "SWITCHBOARD_PRIVATE_ONLY")]
    private_only: bool,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = settings::with_config_file(Cli::command(), std::env::args_os().collect())?;
    let command = Cli::parse_from(args).command;
    let (log_level, log_format) = match &command {
        Command::Serve(serve) => (serve.log_level.as_str(), serve.log_format),
        Command::Migrate(_) | Command::Token(_) => ("info", LogFormat::Text),
        // The report is the output; a log line would only interleave with it.
        Command::Check(_) => ("warn", LogFormat::Text),
    };
    settings::init_logs(log_level, log_format)?;
    match command {
        Command::Serve(serve) => run(*serve).map(|()| ExitCode::SUCCESS),
        Command::Migrate(migrate) => run_migrate(&migrate.database_url).map(|()| ExitCode::SUCCESS),
        Command::Token(token) => {
            println!("{}", mint(&token, unix_now()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(check) => run_check(&check),
    }
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The token `switchboard token` prints, issued at `now`.
fn mint(token: &Token, now: u64) -> String {
    auth::mint(
        &token.jwt_secret,
        &token.role,
        token.sub.as_deref(),
        now,
        token.exp,
    )
}

/// A lifetime in seconds from `90`, `90s`, `15m`, `1h` or `30d`; at least a second.
fn lifetime(given: &str) -> Result<u64, String> {
    let given = given.trim();
    let (number, unit) = match given.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => given.split_at(at),
        None => (given, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h or d")),
    };
    match number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(secs) if secs > 0 => Ok(secs),
        _ => Err(format!(
            "{given:?} is not a lifetime such as 90s, 15m, 1h or 30d"
        )),
    }
}

/// Runs a command's one future to completion.
fn block_on<F: Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    Ok(runtime.block_on(future))
}

/// `switchboard migrate`: brings the schema up to date and says what it applied.
fn run_migrate(database_url: &str) -> anyhow::Result<()> {
    let applied =
        block_on(postgres::migrate(database_url))?.context("installing the realtime schema")?;
    if applied.is_empty() {
        println!("the realtime schema is up to date");
    } else {
        println!("applied realtime schema migrations {applied:?}");
    }
    Ok(())
}

/// `switchboard check`: prints the report; exit code 1 when a check failed (warnings pass),
/// 2 when the database could not be checked, so scripts can tell the two apart.
fn run_check(given: &Check) -> anyhow::Result<ExitCode> {
    let checked = block_on(check::check(
        &given.database_url,
        &given.stream.publication,
        &given.stream.slot_name,
    ))?;
    match checked {
        Ok(findings) => {
            print!("{}", check::report(&findings));
            if findings.iter().any(|f| f.status == Status::Fail) {
                Ok(ExitCode::from(1))
            } else {
                Ok(ExitCode::SUCCESS)
            }
        }
        Err(error) => {
            eprintln!("switchboard check: {:#}", anyhow::Error::from(error));
            Ok(ExitCode::from(2))
        }
    }
}

/// A NATS subject prefix: tokens without wildcards or spaces, none empty.
fn subject_prefix(given: &str) -> Result<String, String> {
    let valid = given.split('.').all(|token| {
        !token.is_empty()
            && !token
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
    });
    if valid {
        Ok(given.to_owned())
    } else {
        Err("a subject prefix is dot-separated tokens without spaces, '*' or '>'".into())
    }
}

/// The JWKS of `--jwt-jwks`: the JSON itself when it is an object, else a file holding it.
fn read_jwks(given: &str) -> anyhow::Result<auth::Jwks> {
    let json = if given.trim_start().starts_with('{') {
        given.to_owned()
    } else {
        std::fs::read_to_string(given).with_context(|| format!("reading the JWKS file {given}"))?
    };
    auth::Jwks::parse(&json).context("--jwt-jwks")
}

/// A development secret: 40 characters, 240 bits from the OS's random source.
fn random_secret() -> anyhow::Result<String> {
    // 64 symbols, so six bits of each byte pick one without bias.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 40];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 63)] as char)
        .collect())
}

/// Pending connections the kernel queues before accept (capped by `net.core.somaxconn`).
/// tokio's `TcpListener::bind` asks for 128: a reconnect storm of a few hundred clients
/// overflows that, and each dropped SYN is only retried after a second.
const LISTEN_BACKLOG: i32 = 4096;

/// One listener per shard, all on the address the first one bound (port 0 picks one free
/// port for all). SO_REUSEPORT lets every shard bind it; the kernel spreads new
/// connections over them. Bound before any shard starts, for either runtime.
fn bind(mut addr: SocketAddr, shards: u16) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    (0..shards)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket
                .bind(&addr.into())
                .with_context(|| format!("binding {addr}"))?;
            socket.listen(LISTEN_BACKLOG)?;
            let listener = std::net::TcpListener::from(socket);
            addr = listener.local_addr().context("reading the bound address")?;
            Ok(listener)
        })
        .collect()
}

/// The shards' threads, on either runtime.
enum Shards {
    Tokio(switchboard_tokio::Shards),
    Glommio(switchboard_glommio::Shards),
}

impl Shards {
    fn join(self) -> anyhow::Result<()> {
        match self {
            Shards::Tokio(shards) => shards.join()?,
            Shards::Glommio(shards) => shards.join()?,
        }
        Ok(())
    }
}

fn run(serve: Serve) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = serve
        .shards
        .unwrap_or_else(|| u16::try_from(cores).unwrap_or(u16::MAX));
    if serve.runtime == Runtime::Glommio {
        switchboard_glommio::check(usize::from(shards))?;
    }
    let listeners = bind(serve.bind, shards)?;
    let addr = listeners[0]
        .local_addr()
        .context("reading the bound address")?;
    let inline_jwks = serve.jwt_jwks.as_deref().map(read_jwks).transpose()?;
    // The URL's keys are fetched before the shards start, so the first tokens find them; a
    // URL that is down now is tried again in the background.
    let fetched_jwks = serve.jwt_jwks_url.as_deref().and_then(|url| {
        jwks::fetch(url)
            .inspect_err(|error| warn!(error = format!("{error:#}"), "no JWKS yet; retrying"))
            .ok()
    });
    let jwt_jwks = match &fetched_jwks {
        Some(fetched) => Some(jwks::keys(inline_jwks.as_ref(), fetched)),
        None => inline_jwks.clone(),
    };
    let (jwt_secret, generated) = match serve.jwt_secret {
        Some(secret) => (secret, false),
        None => (random_secret()?, true),
    };
    if generated {
        let now = unix_now();
        let key = |role: &str| {
            let token = Token {
                jwt_secret: jwt_secret.clone(),
                role: role.to_owned(),
                sub: None,
                exp: 10 * 365 * 86_400,
            };
            mint(&token, now)
        };
        println!("No --jwt-secret given: generated a development secret for this run.");
        println!("  jwt secret:        {jwt_secret}");
        println!("  anon key:          {}", key("anon"));
        println!("  service_role key:  {}", key("service_role"));
        println!("  createClient URL:  http://{addr}");
    }
    // Every field is set; the update supplies `planted_bug` when a workspace build (the
    // simulator's) unifies the engine's `planted-bugs` feature into this binary.
    #[allow(clippy::needless_update)]
    let config = Config {
        jwt_secret,
        jwt_jwks,
        heartbeat_timeout_ms: serve.heartbeat_timeout_ms,
        no_channel_timeout_ms: serve.no_channel_timeout_ms,
        client_presence_calls_max: serve.client_presence_max_calls,
        client_presence_window_ms: serve.client_presence_window_ms,
        rate_window_secs: serve.rate_window_secs,
        presence_broadcast_ms: serve.presence_broadcast_ms,
        join_error_backoff_ms: serve.join_error_backoff_ms,
        connect_error_backoff_ms: serve.connect_error_backoff_ms,
        concurrent_users_max: serve.max_concurrent_users,
        channels_per_client_max: serve.max_channels_per_client,
        joins_per_sec_max: serve.max_joins_per_second,
        events_per_sec_max: serve.max_events_per_second,
        presence_events_per_sec_max: serve.max_presence_events_per_second,
        payload_kb_max: serve.max_payload_size_kb,
        presence_state_bytes_max: serve.max_presence_state_bytes,
        unfinished_bytes_max: serve.max_unfinished_bytes,
        presence_enabled: serve.presence_enabled,
        private_only: serve.private_only,
        database: serve.database_url.is_some(),
        cluster: serve.cluster_nats.is_some(),
        development: generated,
        ..Config::default()
    };
    let mut options = Options::new(config);
    options.send_queue = serve.send_queue;
    options.send_queue_bytes = serve.send_queue_bytes;
    // Presence keys and refs come from the engines' RNGs, and replica ids from the process
    // id: fresh per start, so a restarted server never hands out refs that reconnecting
    // clients still hold, nor comes back as a replica its peers knew.
    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("reading /dev/urandom")?;
    options.seed = u64::from_le_bytes(seed);
    let process = options.seed >> 16;
    let database = serve.database_url.map(|url| {
        let (outputs, receiver) = tokio::sync::mpsc::unbounded_channel();
        options.database = Some(outputs);
        (url, receiver)
    });
    let jwks_url = serve.jwt_jwks_url.map(|url| {
        let (asks, asked) = tokio::sync::mpsc::unbounded_channel();
        options.jwks_refresh = Some(asks);
        (url, asked)
    });
    let metrics = options.shared.metrics.clone();
    let count = listeners.len();
    let (to_cluster, from_shards) = tokio::sync::mpsc::unbounded_channel();
    let cluster = serve.cluster_nats.is_some().then_some(to_cluster);
    let set = options.shards(process, shards, cluster);
    let (servers, tasks) = Server::shards(set.options);
    let handles: Vec<_> = servers.iter().map(Server::handle).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shutdown = move || async move {
        let mut stopped = stopped;
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    // The database side and the signals run on this thread, beside the shards. The signal
    // handlers go in before the shards serve anyone: a SIGTERM sent as soon as a client
    // could connect (a supervisor's, or a test's once it read the address) drains the
    // server instead of killing it unannounced.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let signals = {
        let _runtime = control.enter();
        Signals::new().context("installing the SIGINT and SIGTERM handlers")?
    };
    let serving = tasks.into_iter().zip(listeners).collect();
    let shards = match serve.runtime {
        Runtime::Tokio => Shards::Tokio(
            switchboard_tokio::Shards::start(serving, shutdown).context("starting the shards")?,
        ),
        Runtime::Glommio => Shards::Glommio(switchboard_glommio::Shards::start(serving, shutdown)?),
    };
    if let Some((url, _)) = &database {
        // Before the WAL reader starts, so that creating its slot (which waits for every
        // open transaction) never waits for ours. A database that is down now only delays
        // the schema: it is installed once the database is back.
        let installed = match control.block_on(postgres::migrate(url)) {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "installing the realtime schema failed; trying again in the background");
                false
            }
        };
        control.spawn(postgres::keep_schema(url.clone(), installed));
        // After the schema, so its check reports what this start installed; in the
        // background, so a slow database does not delay serving.
        control.spawn(check::log_findings(
            url.clone(),
            serve.stream.publication.clone(),
            serve.stream.slot_name.clone(),
        ));
    }
    // In a cluster the slot holder's reader feeds every node through the cluster link.
    let (cluster_db, local_db) = match (&serve.cluster_nats, &database) {
        (Some(_), Some(_)) => {
            let handles = handles.clone();
            let (db, local) = cluster::database_link(move |input| to_shards(&handles, input));
            (Some(db), Some(local))
        }
        _ => (None, None),
    };
    let mut cluster_task = None;
    if let Some(url) = serve.cluster_nats {
        let name = serve.cluster_node_name.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let config = ClusterConfig {
            url,
            prefix: serve.cluster_prefix,
            name,
            heartbeat: std::time::Duration::from_millis(serve.cluster_heartbeat_ms),
            down_after: std::time::Duration::from_millis(serve.cluster_down_ms),
        };
        let local = cluster::Local {
            process,
            inboxes: set.inboxes,
            database: local_db,
        };
        let metrics = metrics.clone();
        cluster_task = Some(control.spawn(async move {
            if let Err(e) = cluster::run(config, local, from_shards, metrics).await {
                error!(error = %e, "the cluster link stopped");
            }
        }));
    }
    if let Some((url, asked)) = jwks_url {
        let interval = std::time::Duration::from_secs(serve.jwt_jwks_refresh_secs);
        let fetched = fetched_jwks.is_some();
        control.spawn(jwks::keep(
            url,
            inline_jwks,
            handles.clone(),
            asked,
            interval,
            fetched,
        ));
    }
    // Runs until the server stops; dropping it closes the database connections.
    let _postgres = database.map(|(url, outputs)| {
        let _entered = control.enter();
        let mut config = PostgresConfig::new(url);
        config.publication = serve.stream.publication;
        config.slot_name = serve.stream.slot_name;
        config.visibility_connections = serve.visibility_connections;
        config.visibility_queries = metrics.visibility_queries.clone();
        config.visibility_query_seconds = metrics.visibility_query_seconds.clone();
        config.changes_decoded = metrics.changes_decoded.clone();
        config.replication_lag_bytes = metrics.replication_lag_bytes.clone();
        config.replication_lag_seconds = metrics.replication_lag_seconds.clone();
        config.authorization_queries = metrics.authorization_queries.clone();
        config.slot_held = metrics.slot_held.clone();
        config.shards = count;
        info!(
            publication = %config.publication,
            slot = %config.slot_name,
            "postgres_changes enabled"
        );
        postgres::start(
            config,
            move |input| to_shards(&handles, input),
            outputs,
            cluster_db,
        )
    });
    // Tests and scripts wait for this line; stdout may be a pipe, so flush it now.
    println!("switchboard listening on http://{addr}");
    std::io::stdout().flush().context("writing to stdout")?;
    info!(%addr, runtime = ?serve.runtime, shards = count, config = serve.config, "listening");
    control.block_on(signals.recv());
    let _ = stop.send(true);
    // The shards drain on their threads while this one keeps the cluster link and the
    // database side running: the presence leaves of the drained sockets reach the other
    // nodes, and the link ends once every shard is done.
    control.block_on(async move {
        let joined = tokio::task::spawn_blocking(move || shards.join()).await;
        if let Some(task) = cluster_task {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
        }
        joined.context("joining the shards")?
    })?;
    info!("stopped");
    Ok(())
}

/// SIGINT and SIGTERM, caught from the moment this is made: until then either kills the
/// process.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; needs a tokio runtime entered.
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Completes on either signal.
    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        info!("shutting down");
    }
}
