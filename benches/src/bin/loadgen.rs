//! End-to-end load generator: opens N WebSocket connections speaking the real protocol
//! (vsn 2.0.0 with binary broadcasts, or 1.0.0), joins them to rooms, has M publishers send
//! at a target rate with timestamps in the payload, and reports delivered messages/s,
//! end-to-end latency percentiles, connection setup rate and server memory.
//!
//! It stays on loopback, stops by itself after `--duration`, and prints one
//! machine-readable JSON line last. `--mode floor` drives the raw fan-out floor instead, and
//! `--mode pusher` a Pusher-protocol server (sockudo), so a peer is measured by the same
//! load, clock and figures: only connecting, joining and the publish frame differ.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use switchboard_benches::websocket_config;
use switchboard_engine::protocol::{encode_user_broadcast_push, UserBroadcastPush};
use switchboard_engine::Encoding;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The switchboard server, real protocol.
    Switchboard,
    /// The raw fan-out floor (`floor` binary).
    Floor,
    /// A Pusher-protocol server (protocol 7), such as sockudo: private channels whose
    /// subscriptions are signed with the app secret, and client events, which Pusher never
    /// echoes to their sender, as switchboard does not with `self: false`.
    Pusher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Vsn {
    /// JSON arrays and binary broadcasts, as realtime-js 2.x.
    V2,
    /// JSON objects.
    V1,
}

#[derive(Parser, Debug)]
struct Args {
    /// Server address, `host:port` on loopback.
    #[arg(long, default_value = "127.0.0.1:4000")]
    addr: String,
    /// What is being measured.
    #[arg(long, value_enum, default_value = "switchboard")]
    mode: Mode,
    /// API key (a JWT) for switchboard.
    #[arg(long, env = "SWITCHBOARD_ANON_KEY", default_value = "")]
    key: String,
    /// The Pusher app's key, in the socket's path and in subscription signatures.
    #[arg(long, default_value = "")]
    app_key: String,
    /// The Pusher app's secret: private channels are signed here, as an app's auth
    /// endpoint would, so joining costs no HTTP round trip.
    #[arg(long, default_value = "")]
    app_secret: String,
    /// Serializer version of every connection.
    #[arg(long, value_enum, default_value = "v2")]
    vsn: Vsn,
    /// Connections to open (subscribers and publishers together).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Rooms; connections are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Connections that publish (the first of each room first).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Total messages per second across publishers.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Extra payload bytes per message.
    #[arg(long, default_value_t = 16)]
    payload_bytes: usize,
    /// Server process id, to read its resident memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Concurrent connection attempts while setting up.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds between the last connection set up and the idle RSS reading. What the
    /// set-up freed leaves the server's RSS as the allocator decays it (jemalloc: about
    /// 10 s), so the idle scenario waits that out and reads what the sockets hold.
    #[arg(long, default_value_t = 0.5)]
    settle_secs: f64,
    /// Label echoed in the summary (e.g. the runtime).
    #[arg(long, default_value = "")]
    label: String,
    /// Publishers re-track presence instead of broadcasting; latency is measured on the
    /// `presence_diff` every member receives (presence churn).
    #[arg(long)]
    presence: bool,
    /// Loopback source addresses to spread connections over (127.0.0.2 and up). One address
    /// has about 28,000 ephemeral ports, and connect() slows down sharply as they fill up,
    /// with the TIME_WAIT sockets of earlier runs too.
    #[arg(long, default_value_t = 16)]
    source_ips: u8,
    /// Another node of the same cluster: every other subscriber connects there, publishers
    /// stay on `--addr`, and latency is reported for them apart (cross-node delivery).
    #[arg(long)]
    remote_addr: Option<String>,
    /// The other node's process id, so server CPU covers both.
    #[arg(long)]
    remote_pid: Option<u32>,
}

impl Args {
    /// Where connection `index` goes: subscribers alternate between the nodes.
    fn addr_of(&self, index: usize) -> &str {
        match &self.remote_addr {
            Some(remote) if self.is_remote(index) => remote,
            _ => &self.addr,
        }
    }

    fn is_remote(&self, index: usize) -> bool {
        self.remote_addr.is_some() && index >= self.publishers && index % 2 == 1
    }
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

/// CPU time `pid` has used, user and system, in seconds (from /proc, in clock ticks of
/// 1/100 s).
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the parenthesised command name: state is the 3rd, utime the 14th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Seconds switchboard's engines have spent handling inputs, summed over its shards (the
/// `switchboard_engine_handle_seconds` histogram's sum on `/metrics`); `None` for a server
/// without that metric (the floor).
async fn engine_secs(addr: &str) -> Option<f64> {
    metric(addr, "switchboard_engine_handle_seconds_sum").await
}

/// An unlabelled metric of the server at `addr`, from `/metrics`.
async fn metric(addr: &str, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The channel of `room`: Pusher allows client events on private channels only.
fn topic(mode: Mode, room: usize) -> String {
    match mode {
        Mode::Pusher => format!("private-load-{room}"),
        _ => format!("realtime:load-{room}"),
    }
}

/// Leaves the port to connect(), which picks one free for the whole address pair. A port
/// bind() picks alone may still be in TIME_WAIT at the server from an earlier run, and
/// such a SYN is only retried after a second.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a pointer to a live c_int and its
    // size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects from loopback source address `127.0.0.<2 + index % source_ips>`.
async fn tcp(args: &Args, index: usize) -> std::io::Result<TcpStream> {
    let server: SocketAddr = args
        .addr_of(index)
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = TcpSocket::new_v4()?;
    bind_address_no_port(&socket)?;
    let last = 2 + (index % usize::from(args.source_ips.max(1))) as u8;
    socket.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn open(args: &Args, index: usize, room: usize) -> Result<(Sink, Source), String> {
    let url = match args.mode {
        Mode::Switchboard => {
            let vsn = if args.vsn == Vsn::V2 {
                "2.0.0"
            } else {
                "1.0.0"
            };
            format!(
                "ws://{}/realtime/v1/websocket?apikey={}&vsn={vsn}",
                args.addr_of(index),
                args.key
            )
        }
        Mode::Floor => format!("ws://{}/?room={room}", args.addr),
        Mode::Pusher => format!(
            "ws://{}/app/{}?protocol=7&client=loadgen&version=1",
            args.addr_of(index),
            args.app_key
        ),
    };
    let stream = tcp(args, index).await.map_err(|e| e.to_string())?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(websocket_config()))
            .await
            .map_err(|e| e.to_string())?;
    let (mut sink, mut source) = ws.split();
    let channel = topic(args.mode, room);
    // A connection counts as set up once its join is confirmed.
    match args.mode {
        Mode::Switchboard => {
            let join = frame(
                args.vsn,
                Some("1"),
                "1",
                &channel,
                "phx_join",
                // What realtime-js 2.x sends for `channel(name).subscribe()` (PROTOCOL.md §2.2),
                // with presence enabled as it is for a channel with presence listeners: a
                // channel without gets no presence diffs.
                json!({"config": {"broadcast": {"ack": false, "self": false},
                    "presence": {"key": "", "enabled": args.presence}, "postgres_changes": [],
                    "private": false}}),
            );
            sink.send(join).await.map_err(|e| e.to_string())?;
            let reply = first_text(&mut source, &["phx_reply"]).await?;
            if !reply.contains("\"ok\"") {
                return Err(format!("join refused: {reply}"));
            }
        }
        Mode::Pusher => {
            let established = first_text(&mut source, &["pusher:connection_established"]).await?;
            let socket_id =
                socket_id(&established).ok_or_else(|| format!("no socket_id in {established}"))?;
            let auth = pusher_auth(&args.app_key, &args.app_secret, &socket_id, &channel);
            let subscribe = json!({"event": "pusher:subscribe",
                "data": {"channel": channel, "auth": auth}});
            sink.send(Message::Text(subscribe.to_string().into()))
                .await
                .map_err(|e| e.to_string())?;
            let reply = first_text(&mut source, &["subscription_succeeded", "error"]).await?;
            if !reply.contains("subscription_succeeded") {
                return Err(format!("subscription refused: {reply}"));
            }
        }
        Mode::Floor => {}
    }
    Ok((sink, source))
}

/// The first text frame that contains one of `markers`, skipping the rest.
async fn first_text(source: &mut Source, markers: &[&str]) -> Result<String, String> {
    loop {
        match source.next().await {
            Some(Ok(Message::Text(text))) if markers.iter().any(|m| text.contains(m)) => {
                return Ok(text.to_string())
            }
            Some(Ok(_)) => {}
            other => return Err(format!("closed waiting for {markers:?}: {other:?}")),
        }
    }
}

/// The `socket_id` of `pusher:connection_established`, whose `data` is JSON in a string.
fn socket_id(established: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_str(established).ok()?;
    let data: serde_json::Value = serde_json::from_str(event["data"].as_str()?).ok()?;
    Some(data["socket_id"].as_str()?.to_owned())
}

/// What a Pusher app's auth endpoint answers for a private channel:
/// `<key>:<hex HMAC-SHA256(secret, "<socket_id>:<channel>")>`.
fn pusher_auth(key: &str, secret: &str, socket_id: &str, channel: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{socket_id}:{channel}").as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{key}:{signature}")
}

fn frame(
    vsn: Vsn,
    join_ref: Option<&str>,
    ref_: &str,
    topic: &str,
    event: &str,
    payload: serde_json::Value,
) -> Message {
    let text = match vsn {
        Vsn::V2 => json!([join_ref, ref_, topic, event, payload]).to_string(),
        Vsn::V1 => json!({"topic": topic, "event": event, "payload": payload, "ref": ref_, "join_ref": join_ref}).to_string(),
    };
    Message::Text(text.into())
}

/// The message a publisher sends: a timestamp in microseconds since `origin`.
fn message(args: &Args, room: usize, seq: u64, origin: Instant, padding: &str) -> Message {
    let micros = origin.elapsed().as_micros() as u64;
    let body = format!(r#"{{"t":{micros},"s":{seq},"p":"{padding}"}}"#);
    if args.presence {
        let payload: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        let track = json!({"type": "presence", "event": "track", "payload": payload});
        return frame(
            args.vsn,
            Some("1"),
            &seq.to_string(),
            &topic(args.mode, room),
            "presence",
            track,
        );
    }
    match (args.mode, args.vsn) {
        (Mode::Floor, _) => Message::Text(body.into()),
        (Mode::Pusher, _) => Message::Text(
            format!(
                r#"{{"event":"client-e","channel":"{}","data":{body}}}"#,
                topic(args.mode, room)
            )
            .into(),
        ),
        (Mode::Switchboard, Vsn::V2) => {
            let push = UserBroadcastPush {
                event: "m".into(),
                metadata: None,
                encoding: Encoding::Json,
                payload: Bytes::from(body),
            };
            let bytes = encode_user_broadcast_push(
                Some("1"),
                Some(&seq.to_string()),
                &topic(args.mode, room),
                &push,
            )
            .expect("short header strings");
            Message::Binary(bytes)
        }
        (Mode::Switchboard, Vsn::V1) => {
            let payload: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
            frame(
                Vsn::V1,
                Some("1"),
                &seq.to_string(),
                &topic(args.mode, room),
                "broadcast",
                json!({"type": "broadcast", "event": "m", "payload": payload}),
            )
        }
    }
}

/// The timestamp of a `presence_diff`'s joins (leaves quote the previous track).
fn timestamp_join(data: &[u8]) -> Option<u64> {
    let joins = data.windows(8).position(|w| w == b"\"joins\":")?;
    let leaves = data
        .windows(9)
        .position(|w| w == b"\"leaves\":")
        .unwrap_or(data.len());
    let (from, to) = if joins < leaves {
        (joins, leaves)
    } else {
        (joins, data.len())
    };
    timestamp(&data[from..to])
}

fn contains(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

/// Finds `"t":<digits>` in a received frame.
fn timestamp(data: &[u8]) -> Option<u64> {
    let at = data.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    if args.presence && args.mode != Mode::Switchboard {
        eprintln!("--presence needs --mode switchboard");
        std::process::exit(2);
    }
    let origin = Instant::now();
    let rss_before = rss_kib(args.server_pid);

    // Connection setup, bounded concurrency.
    let setup_started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency));
    let mut opening = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (args, semaphore) = (args.clone(), semaphore.clone());
        opening.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore open");
            let room = i % args.rooms;
            (i, room, open(&args, i, room).await)
        }));
    }
    let mut connections = Vec::with_capacity(args.connections);
    let mut failures = 0usize;
    let mut first_error = None;
    for task in opening {
        match task.await.expect("setup task") {
            (i, room, Ok(pair)) => connections.push((i, room, pair)),
            (_, _, Err(e)) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();
    if let Some(e) = &first_error {
        eprintln!("{failures} connections failed, first: {e}");
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let rss_idle = rss_kib(args.server_pid);

    // Receivers record latency; publishers are the first connections of each room.
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    // Subscribers on the other node, apart: cross-node delivery.
    let remote_histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    let received = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut publishers = Vec::new();
    let mut readers = Vec::new();
    for (index, (i, room, (mut sink, mut source))) in connections.into_iter().enumerate() {
        if index < args.publishers {
            publishers.push((room, sink));
        } else {
            // Subscribers keep their sink alive (dropping it would close the socket), and
            // answer a Pusher server's pings with it.
            let mode = args.mode;
            let histogram = if args.is_remote(i) {
                remote_histogram.clone()
            } else {
                histogram.clone()
            };
            let received = received.clone();
            let mut stopped = stopped.clone();
            readers.push(tokio::spawn(async move {
                let mut local =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                let mut count = 0u64;
                let flush = |local: &mut Histogram<u64>, count: &mut u64| {
                    histogram
                        .lock()
                        .expect("histogram")
                        .add(&*local)
                        .expect("same bounds");
                    received.fetch_add(*count, Ordering::Relaxed);
                    local.reset();
                    *count = 0;
                };
                loop {
                    let msg = tokio::select! {
                        msg = source.next() => match msg {
                            Some(Ok(msg)) => msg,
                            _ => break,
                        },
                        _ = stopped.changed() => break,
                    };
                    let data: &[u8] = match &msg {
                        Message::Text(t) => t.as_bytes(),
                        Message::Binary(b) => b,
                        _ => continue,
                    };
                    // A presence diff quotes the old meta too: its timestamp is the new one's.
                    let stamp = if contains(data, b"\"joins\"") {
                        timestamp_join(data)
                    } else {
                        timestamp(data)
                    };
                    if let Some(sent) = stamp {
                        let now = origin.elapsed().as_micros() as u64;
                        let _ = local.record(now.saturating_sub(sent).max(1));
                        count += 1;
                        if count >= 256 {
                            flush(&mut local, &mut count);
                        }
                    } else if mode == Mode::Pusher && contains(data, b"\"pusher:ping\"") {
                        let pong = r#"{"event":"pusher:pong","data":{}}"#;
                        let _ = sink.send(Message::Text(pong.into())).await;
                    }
                }
                flush(&mut local, &mut count);
            }));
        }
    }

    // Publishing at the target rate, in 1 ms ticks.
    let padding = "x".repeat(args.payload_bytes);
    let publish_started = Instant::now();
    let cpu = || {
        let remote = args.remote_pid.map(|pid| cpu_secs(Some(pid)));
        match remote {
            Some(remote) => cpu_secs(args.server_pid).zip(remote).map(|(a, b)| a + b),
            None => cpu_secs(args.server_pid),
        }
    };
    let cpu_before = cpu();
    let engine_before = engine_secs(&args.addr).await;
    let published = "switchboard_cluster_messages_published_total";
    let nats_before = metric(&args.addr, published).await;
    let deadline = publish_started + Duration::from_secs(args.duration);
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let publishers_count = publishers.len().max(1) as u64;
    while Instant::now() < deadline && !publishers.is_empty() {
        tick.tick().await;
        let due = (publish_started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            let (room, sink) = &mut publishers[(sent % publishers_count) as usize];
            let msg = message(&args, *room, sent, origin, &padding);
            if sink.feed(msg).await.is_err() {
                break;
            }
            sent += 1;
        }
        for (_, sink) in publishers.iter_mut() {
            let _ = sink.flush().await;
        }
    }
    let publish_secs = publish_started.elapsed().as_secs_f64();
    // Let in-flight messages land, then stop everything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_busy = rss_kib(args.server_pid);
    let server_cpu = cpu_before.zip(cpu()).map(|(before, after)| after - before);
    // Everything the publishers' node published to NATS, per broadcast sent.
    let nats_per_broadcast = match &args.remote_addr {
        Some(_) if sent > 0 => nats_before
            .zip(metric(&args.addr, published).await)
            .map(|(before, after)| (after - before) / sent as f64),
        _ => None,
    };
    // The engines' share of one core over the same window.
    let engine_share = engine_before
        .zip(engine_secs(&args.addr).await)
        .map(|(before, after)| (after - before) / publish_started.elapsed().as_secs_f64());
    for (_, mut sink) in publishers {
        let _ = sink.close().await;
    }
    // Readers stop and flush their counts.
    let _ = stop.send(true);
    for reader in readers {
        let _ = reader.await;
    }

    let remote = remote_histogram.lock().expect("histogram");
    let remote_quantile = |q: f64| (!remote.is_empty()).then(|| remote.value_at_quantile(q));
    let (remote_p50, remote_p99) = (remote_quantile(0.5), remote_quantile(0.99));
    let mut histogram = histogram.lock().expect("histogram");
    let local_p99 = (!histogram.is_empty()).then(|| histogram.value_at_quantile(0.99));
    histogram.add(&*remote).expect("same bounds");
    let delivered = received.load(Ordering::Relaxed);
    let opened = args.connections - failures;
    let per_conn = match (rss_before, rss_idle) {
        (Some(before), Some(idle)) if opened > 0 => {
            Some((idle.saturating_sub(before) * 1024) / opened as u64)
        }
        _ => None,
    };
    let summary = json!({
        "label": args.label,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "vsn": format!("{:?}", args.vsn).to_lowercase(),
        "connections": opened,
        "failed": failures,
        "rooms": args.rooms,
        "publishers": args.publishers,
        "target_rate": args.rate,
        "sent": sent,
        "delivered": delivered,
        "delivered_per_sec": (delivered as f64 / publish_secs).round(),
        "p50_us": histogram.value_at_quantile(0.50),
        "p99_us": histogram.value_at_quantile(0.99),
        "p999_us": histogram.value_at_quantile(0.999),
        "setup_per_sec": (opened as f64 / setup_secs).round(),
        "rss_idle_kib": rss_idle,
        "rss_busy_kib": rss_busy,
        // Server CPU over the publishing and the 2 s after it, per million deliveries:
        // what the server costs, whatever the shared cores did to latency.
        "server_cpu_secs": server_cpu,
        "server_cpu_ms_per_million": server_cpu
            .filter(|_| delivered > 0)
            .map(|cpu| (cpu * 1e9 / delivered as f64).round()),
        "rss_per_idle_conn_bytes": per_conn,
        "engine_core_share": engine_share,
        "local_p99_us": local_p99,
        "remote_p50_us": remote_p50,
        "remote_p99_us": remote_p99,
        "nats_messages_per_broadcast": nats_per_broadcast,
    });
    println!("{summary}");
}
