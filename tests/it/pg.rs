//! A throwaway PostgreSQL for the tests: its own data directory, port and socket directory,
//! set up the way Supabase sets up a project (the `anon`, `authenticated` and
//! `service_role` roles, the `auth` helpers, the `supabase_realtime` publication) unless a
//! [`Setup`] says otherwise, removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What Supabase creates in every project, as far as realtime depends on it.
const SUPABASE_SQL: &str = include_str!("../sql/supabase.sql");

/// How [`TempPostgres::start_with`] makes its server; the default is what
/// [`TempPostgres::start`] makes, and what most tests need.
pub struct Setup {
    /// `logical` for the change stream; `replica` shows `switchboard check` refusing it.
    pub wal_level: &'static str,
    /// Whether to create what Supabase creates in every project (`tests/sql/supabase.sql`);
    /// without it the database is as `initdb` left it.
    pub supabase: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            wal_level: "logical",
            supabase: true,
        }
    }
}

/// A running PostgreSQL server, stopped and deleted on drop.
pub struct TempPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// From the [`Setup`], for each [`TempPostgres::configure`] of a start on another port.
    wal_level: &'static str,
    /// The unprivileged user the server runs as when the tests run as root (initdb and
    /// postgres refuse to run as root).
    user: Option<&'static str>,
}

impl TempPostgres {
    /// Creates a cluster with logical replication enabled and starts it on a free port.
    pub fn start() -> TempPostgres {
        TempPostgres::start_with(Setup::default())
    }

    /// Creates a cluster as `setup` says and starts it on a free port.
    pub fn start_with(setup: Setup) -> TempPostgres {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "switchboard-pg-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the cluster directory");
        let user = is_root().then_some("postgres");
        if let Some(user) = user {
            run(Command::new("chown").args([user, path(&dir)]));
        }
        let mut pg = TempPostgres {
            dir,
            bin: bindir(),
            port: 0,
            wal_level: setup.wal_level,
            user,
        };
        let initdb = pg
            .postgres_command("initdb")
            .args(["-D", path(&pg.data()), "-U", "postgres", "-A", "trust"])
            .args([
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .expect("initdb runs");
        check("initdb", initdb);
        std::fs::write(
            pg.data().join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n\
             local replication all trust\nhost replication all 127.0.0.1/32 trust\n",
        )
        .expect("writing pg_hba.conf");
        // A port picked now may be taken before the server binds it: try a few.
        for attempt in 1..=5 {
            pg.port = free_port();
            pg.configure();
            let started = pg
                .postgres_command("pg_ctl")
                .args(["-D", path(&pg.data()), "-l", path(&pg.dir.join("log"))])
                .args(["-w", "-t", "30", "start"])
                .output()
                .expect("pg_ctl runs");
            if started.status.success() {
                break;
            }
            assert!(attempt < 5, "postgres did not start: {}", pg.log());
        }
        if setup.supabase {
            pg.psql(SUPABASE_SQL);
        }
        pg
    }

    /// `postgresql://` URL of the `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A fresh connection, driven on its own task.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connecting to the test postgres");
        tokio::spawn(connection);
        client
    }

    /// Runs SQL through `psql`, failing the test on the first error.
    pub fn psql(&self, sql: &str) {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql])
            .output()
            .expect("psql runs");
        check("psql", out);
    }

    /// Stops the server (fast shutdown: open connections are closed) and starts it again on
    /// the same port, waiting until it accepts connections.
    pub fn restart(&self) {
        let out = self
            .postgres_command("pg_ctl")
            .args(["-D", path(&self.data()), "-l", path(&self.dir.join("log"))])
            .args(["-w", "-t", "30", "-m", "fast", "restart"])
            .output()
            .expect("pg_ctl runs");
        assert!(out.status.success(), "restart failed: {}", self.log());
    }

    /// Stops the server: `immediate` is a crash (no checkpoint, clients cut off), `fast`
    /// a clean shutdown that closes open connections.
    pub fn stop(&self, mode: &str) {
        let out = self
            .postgres_command("pg_ctl")
            .args([
                "-D",
                path(&self.data()),
                "-m",
                mode,
                "-w",
                "-t",
                "30",
                "stop",
            ])
            .output()
            .expect("pg_ctl runs");
        assert!(out.status.success(), "stop failed: {}", self.log());
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&self) {
        let out = self
            .postgres_command("pg_ctl")
            .args(["-D", path(&self.data()), "-l", path(&self.dir.join("log"))])
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("pg_ctl runs");
        assert!(out.status.success(), "start failed: {}", self.log());
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Appends the settings; a later line wins, so a retry only needs a new port.
    fn configure(&self) {
        use std::io::Write;
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = {}\nmax_replication_slots = 10\nmax_wal_senders = 10\n\
             max_connections = 40\nshared_buffers = 16MB\nfsync = off\n\
             full_page_writes = off\ntimezone = 'UTC'\n",
            self.port,
            self.dir.display(),
            self.wal_level,
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .expect("writing postgresql.conf");
    }

    /// A server binary, run as the unprivileged user when the tests run as root.
    fn postgres_command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match self.user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self
            .postgres_command("pg_ctl")
            .args(["-D", path(&self.data()), "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the server binaries are: `pg_config --bindir`, else Debian's PostgreSQL 15.
fn bindir() -> PathBuf {
    Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .filter(|dir| dir.join("initdb").exists())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a free port")
        .port()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn run(command: &mut Command) {
    check("command", command.output().expect("command runs"));
}

fn check(what: &str, out: Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
