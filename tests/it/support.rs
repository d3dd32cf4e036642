//! Starting the real binary and talking to it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const SECRET: &str = "integration-test-secret-integration-test";

/// A `switchboard serve` process on a free port, killed on drop.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The arguments after the defaults, for a restart.
    extra: Vec<String>,
    /// The file descriptor limit it runs with, if not the test's own.
    fd_limit: Option<u32>,
    /// Its `--jwt-secret`; none in development mode.
    secret: Option<&'static str>,
    /// Every line it logged so far (also echoed to the test's stderr).
    logs: Arc<Mutex<Vec<String>>>,
    /// The program and arguments it runs with.
    argv: Vec<String>,
}

impl Server {
    /// Starts the binary with test-friendly limits plus `extra` arguments. It logs at `warn`
    /// unless `SWITCHBOARD_TEST_LOG` gives another filter (`debug`, say, to follow a failure).
    /// It runs `SWITCHBOARD_TEST_SHARDS` shards (default 1) unless `extra` says `--shards`,
    /// on `SWITCHBOARD_TEST_RUNTIME` (default tokio) unless it says `--runtime`:
    /// `scripts/test` runs the whole suite once per runtime and shard count.
    pub fn start(extra: &[&str]) -> Server {
        Server::spawn("127.0.0.1:0", extra, None, Some(SECRET))
    }

    /// Like [`Server::start`] without `--jwt-secret`: development mode, with a secret
    /// generated for the run.
    pub fn start_development(extra: &[&str]) -> Server {
        Server::spawn("127.0.0.1:0", extra, None, None)
    }

    /// Like [`Server::start`], with at most `fds` open file descriptors (`prlimit`).
    pub fn start_with_fd_limit(fds: u32, extra: &[&str]) -> Server {
        Server::spawn("127.0.0.1:0", extra, Some(fds), Some(SECRET))
    }

    fn spawn(
        bind: &str,
        extra: &[&str],
        fd_limit: Option<u32>,
        secret: Option<&'static str>,
    ) -> Server {
        let binary = env!("CARGO_BIN_EXE_switchboard");
        let mut command = match fd_limit {
            Some(fds) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={fds}:{fds}"))
                    .arg("--")
                    .arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .args(["serve", "--bind", bind])
            .args(
                secret
                    .map(|secret| ["--jwt-secret", secret])
                    .into_iter()
                    .flatten(),
            )
            .args([
                "--join-error-backoff-ms",
                "0",
                "--connect-error-backoff-ms",
                "0",
            ])
            .args([
                "--max-concurrent-users",
                "10000",
                "--max-joins-per-second",
                "0",
            ])
            .args(["--max-events-per-second", "0", "--log-level"])
            .arg(std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .args(default_arg(extra, "--shards", shards))
            .args(default_arg(extra, "--runtime", runtime))
            .args(extra);
        let argv: Vec<String> = std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the switchboard binary starts");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().expect("piped stderr");
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                kept.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("switchboard printed its address")
                .expect("stdout is UTF-8");
            if let Some(url) = line.strip_prefix("switchboard listening on http://") {
                break url.trim().to_owned();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child: Some(child),
            addr,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            fd_limit,
            secret,
            logs,
            argv,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The program and arguments that start it again on the same address.
    pub fn restart_argv(&self) -> Vec<String> {
        let mut argv = self.argv.clone();
        if let Some(bind) = argv.iter().position(|a| a == "--bind") {
            argv[bind + 1] = self.addr.clone();
        }
        argv
    }

    /// The lines it logged so far that contain `text`.
    pub fn logged(&self, text: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Its resident memory, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    /// Kills the process with SIGKILL, as a crash would, and starts it again on the same
    /// address with the same arguments.
    pub fn crash_and_restart(&mut self, down: Duration) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(down);
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        *self = Server::spawn(&self.addr.clone(), &extra, self.fd_limit, self.secret);
    }

    /// Sends SIGTERM and waits for the process; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        for _ in 0..100 {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        false
    }

    pub fn url(&self, vsn: &str, key: &str) -> String {
        format!(
            "ws://{}/realtime/v1/websocket?apikey={key}&vsn={vsn}",
            self.addr
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `flag` and its value from `value`, unless `extra` gives the flag itself.
fn default_arg(extra: &[&str], flag: &str, value: fn() -> String) -> Vec<String> {
    if extra.contains(&flag) {
        Vec::new()
    } else {
        vec![flag.to_owned(), value()]
    }
}

/// The runtime the suite runs on: `SWITCHBOARD_TEST_RUNTIME`, default tokio.
pub fn runtime() -> String {
    std::env::var("SWITCHBOARD_TEST_RUNTIME").unwrap_or_else(|_| "tokio".into())
}

/// The shard count the suite runs with: `SWITCHBOARD_TEST_SHARDS`, default 1.
pub fn shards() -> String {
    std::env::var("SWITCHBOARD_TEST_SHARDS").unwrap_or_else(|_| "1".into())
}

/// A token for `role` expiring `secs` from now.
pub fn token(role: &str, secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    switchboard_engine::auth::sign(
        SECRET,
        &json!({"role": role, "exp": now + secs, "sub": role}),
    )
}

pub async fn connect(server: &Server, vsn: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(server.url(vsn, &token("anon", 3600)))
        .await
        .expect("upgrade");
    ws
}

pub async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
}

/// The next text frame as JSON, within 5 s.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("socket open")
            .expect("no error");
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// Joins `realtime:<sub>` on a v2 socket and waits for the ok reply.
pub async fn join(ws: &mut Ws, sub: &str, config: Value) {
    send(
        ws,
        json!(["1", "1", format!("realtime:{sub}"), "phx_join", {"config": config}]),
    )
    .await;
    let reply = recv(ws).await;
    assert_eq!(reply[4]["status"], "ok", "join reply: {reply}");
}

/// The headers of a WebSocket upgrade request, for [`http`].
pub const UPGRADE: [(&str, &str); 4] = [
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// A plain HTTP/1.1 request; returns status, headers (lowercased names) and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("response")
        .expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head, response[split + 4..].to_vec())
}

/// The value of an unlabelled metric on `/metrics`, as exported.
pub async fn metric(server: &Server, name: &str) -> String {
    let (status, _, body) = http(&server.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let body = String::from_utf8(body).expect("metrics are UTF-8");
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} in {body}"))
        .to_owned()
}

/// Reads frames until `found` picks something out of one, within 10 s; a failure lists
/// the frames that came instead.
pub async fn until<T>(ws: &mut Ws, mut found: impl FnMut(&Value) -> Option<T>) -> T {
    let mut passed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(&text).expect("JSON"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("not found within 10 s ({other:?}); got instead: {passed:#?}"),
        };
        if let Some(t) = found(&frame) {
            return t;
        }
        passed.push(frame);
    }
}

/// The phx_ref of `key`'s meta if `frame` is a presence frame that names it.
pub fn meta_ref(frame: &Value, key: &str) -> Option<String> {
    let payload = match frame[3].as_str()? {
        "presence_diff" => &frame[4]["joins"],
        "presence_state" => &frame[4],
        _ => return None,
    };
    payload[key]["metas"][0]["phx_ref"]
        .as_str()
        .map(str::to_owned)
}
