//! A throwaway `nats-server` on a free port, and a TCP proxy that can be paused (a node
//! behind it is cut from the cluster while its process stays up) or put before several
//! nodes as a load balancer that fails over.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::pg::free_port;

/// A `nats-server` process, killed on drop. `scripts/test` installs Debian's.
pub struct Nats {
    child: Option<Child>,
    /// The port it listens on, kept across restarts.
    pub port: u16,
}

impl Nats {
    /// Starts one on a free port of 127.0.0.1 and waits until it accepts connections.
    pub fn start() -> Nats {
        let mut nats = Nats {
            child: None,
            port: free_port(),
        };
        nats.spawn();
        nats
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (scripts/test installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    /// Kills it, which drops every node's connection.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Forwards a local port to the first of its targets that accepts, byte for byte, until
/// paused: then it forwards nothing in either direction (the connections stay open, as
/// across a network partition) until resumed. With several targets it is a load balancer
/// that fails over: a new connection goes to the next target when the first is down.
pub struct Proxy {
    /// The port to connect to instead of the target's.
    pub port: u16,
    paused: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy to `127.0.0.1:target`, on threads of its own.
    pub fn start(target: u16) -> Proxy {
        Proxy::balance(&[target])
    }

    /// A proxy to the first of `127.0.0.1:<targets>` that accepts each connection.
    pub fn balance(targets: &[u16]) -> Proxy {
        let targets = targets.to_vec();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let paused = Arc::new(AtomicBool::new(false));
        let flag = paused.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Some(server) = targets
                    .iter()
                    .find_map(|port| TcpStream::connect(("127.0.0.1", *port)).ok())
                else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let flag = flag.clone();
                        std::thread::spawn(move || pump(from, to, &flag));
                    }
                }
            }
        });
        Proxy { port, paused }
    }

    /// `http://127.0.0.1:PORT` of the proxy, before a switchboard node.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `nats://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding: what was sent waits in the sockets' buffers.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Forwards again, the waiting bytes first.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while not paused, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, paused: &AtomicBool) {
    use std::io::{Read, Write};
    let mut buffer = [0u8; 16 * 1024];
    loop {
        while paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just before a pause are held until the resume.
        while paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}
