//! `switchboard check` against real databases: a fresh one, one set up as Supabase sets up
//! a project, one without logical WAL, none at all; and `serve` logging the same checks.
//! Where a check fails, the test applies the fix the check printed and checks again.

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::pg::{free_port, Setup, TempPostgres};
use crate::support::Server;

/// What one `switchboard check` run printed, and its exit code.
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {:?}\n{}{}", self.code, self.stdout, self.stderr)
    }
}

impl Checked {
    /// The finding whose line contains `text`, with its fix lines.
    fn finding(&self, text: &str) -> String {
        let mut lines = self.stdout.lines().skip_while(|line| !line.contains(text));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no finding says {text:?}:\n{self}"));
        std::iter::once(first)
            .chain(lines.take_while(|line| line.starts_with("      ")))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every fix printed, each as one text (its lines joined again).
    fn fixes(&self) -> Vec<String> {
        let mut fixes: Vec<String> = Vec::new();
        for line in self.stdout.lines() {
            if let Some(fix) = line.strip_prefix("      fix: ") {
                fixes.push(fix.to_owned());
            } else if let Some(more) = line.strip_prefix("           ") {
                let last = fixes.last_mut().expect("a continuation follows a fix");
                last.push('\n');
                last.push_str(more);
            }
        }
        fixes
    }

    /// The lines of findings that are not ok.
    fn not_ok(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|line| line.starts_with("warn ") || line.starts_with("FAIL "))
            .collect()
    }

    fn summary(&self) -> &str {
        self.stdout.lines().last().unwrap_or_default()
    }
}

fn check(url: &str) -> Checked {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "--database-url", url])
        .env_remove("DATABASE_URL")
        .env_remove("SWITCHBOARD_PUBLICATION")
        .env_remove("SWITCHBOARD_SLOT_NAME")
        .output()
        .expect("the binary runs");
    Checked {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8"),
    }
}

fn migrate(pg: &TempPostgres) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["migrate", "--database-url", &pg.url()])
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "migrate failed: {output:?}");
}

/// Runs each printed fix: SQL through psql, the one command as `switchboard migrate`.
fn apply(pg: &TempPostgres, fixes: &[String]) {
    for fix in fixes {
        if fix.starts_with("switchboard migrate") {
            migrate(pg);
        } else {
            pg.psql(fix);
        }
    }
}

#[test]
fn a_fresh_database_fails_with_a_fix_for_each_missing_piece_and_the_fixes_work() {
    let pg = TempPostgres::start_with(Setup {
        supabase: false,
        ..Setup::default()
    });
    let checked = check(&pg.url());
    assert_eq!(checked.code, Some(1), "{checked}");
    assert!(checked.stdout.starts_with("ok    PostgreSQL "), "{checked}");
    assert!(checked
        .finding("wal_level")
        .starts_with("ok    wal_level is logical"));
    assert!(checked
        .finding("replication slots:")
        .starts_with("ok    replication slots: 10 of 10 free"));
    for (text, status, fix) in [
        (
            "publication supabase_realtime",
            "FAIL",
            "fix: CREATE PUBLICATION supabase_realtime;",
        ),
        (
            "role anon does not exist",
            "FAIL",
            "fix: CREATE ROLE anon NOLOGIN NOINHERIT;",
        ),
        (
            "role authenticated does not exist",
            "FAIL",
            "fix: CREATE ROLE authenticated NOLOGIN NOINHERIT;",
        ),
        (
            "role service_role does not exist",
            "FAIL",
            "fix: CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;",
        ),
        (
            "auth.uid(), auth.role(), auth.jwt() are missing",
            "warn",
            "CREATE FUNCTION auth.uid() RETURNS uuid",
        ),
        (
            "the realtime schema is not installed",
            "warn",
            r#"fix: switchboard migrate --database-url "$DATABASE_URL""#,
        ),
    ] {
        let finding = checked.finding(text);
        assert!(finding.starts_with(status), "{finding}");
        assert!(finding.contains(fix), "{finding}");
    }
    assert_eq!(checked.summary(), "4 failed, 2 warnings, 5 ok");

    apply(&pg, &checked.fixes());
    let checked = check(&pg.url());
    assert_eq!(checked.code, Some(0), "{checked}");
    assert_eq!(
        checked.not_ok(),
        ["warn  publication supabase_realtime has no tables: postgres_changes delivers nothing"],
        "{checked}"
    );
    assert!(checked
        .finding("auth.uid(), auth.role(), auth.jwt() exist")
        .starts_with("ok"));
}

#[test]
fn published_tables_warn_for_replica_identity_and_rls_until_fixed() {
    let pg = TempPostgres::start();
    migrate(&pg);
    pg.psql(
        "create table public.todos (id int primary key, task text);
         alter publication supabase_realtime add table public.todos;",
    );
    let checked = check(&pg.url());
    assert_eq!(checked.code, Some(0), "{checked}");
    assert_eq!(
        checked.finding("replica identity"),
        "warn  public.todos has the default replica identity: old_record in UPDATE and DELETE \
         events holds only its primary key\n      \
         fix: ALTER TABLE public.todos REPLICA IDENTITY FULL;"
    );
    let rls = checked.finding("Row Level Security");
    assert!(
        rls.starts_with(
            "warn  public.todos has Row Level Security disabled: every subscriber allowed to \
             select from it receives every row\n      \
             fix: ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;"
        ),
        "{rls}"
    );
    assert!(checked
        .finding("publication supabase_realtime")
        .starts_with("ok    publication supabase_realtime publishes 1 table: public.todos"));
    assert_eq!(checked.summary(), "0 failed, 2 warnings, 9 ok");

    // A published table without a primary key: Postgres refuses its UPDATE and DELETE.
    pg.psql(
        "create table public.log (line text);
         alter publication supabase_realtime add table public.log;",
    );
    let checked = check(&pg.url());
    assert_eq!(checked.code, Some(1), "{checked}");
    assert!(checked
        .finding("public.log has no replica identity")
        .starts_with("FAIL"));

    apply(&pg, &checked.fixes());
    pg.psql("update public.log set line = 'updates work'");
    let checked = check(&pg.url());
    assert_eq!(checked.code, Some(0), "{checked}");
    assert!(checked.not_ok().is_empty(), "{checked}");
    assert!(checked
        .finding("replica identity")
        .starts_with("ok    replica identity: every published table sends whole old records"));
    assert!(checked
        .finding("Row Level Security")
        .starts_with("ok    Row Level Security is enabled on every published table"));
    assert_eq!(checked.summary(), "0 failed, 0 warnings, 11 ok");
}

#[test]
fn wal_level_replica_and_slots_in_use_fail_until_fixed() {
    let pg = TempPostgres::start_with(Setup {
        wal_level: "replica",
        ..Setup::default()
    });
    migrate(&pg);
    pg.psql(
        "select pg_create_physical_replication_slot('taken_' || n) from generate_series(1, 10) n",
    );
    let checked = check(&pg.url());
    assert_eq!(checked.code, Some(1), "{checked}");
    let wal_level = checked.finding("wal_level");
    assert_eq!(
        wal_level,
        "FAIL  wal_level is replica: postgres_changes and broadcast from the database need \
         logical replication\n      \
         fix: ALTER SYSTEM SET wal_level = logical; -- then restart Postgres"
    );
    let slots = checked.finding("replication slots");
    assert!(
        slots.starts_with(
            "FAIL  replication slots: all 10 in use, none left for switchboard_slot\n      \
             fix: ALTER SYSTEM SET max_replication_slots = 11; -- then restart Postgres"
        ),
        "{slots}"
    );

    // The printed fix, then a restart; a slot of our name that is not ours is named.
    pg.psql(&checked.fixes()[0]);
    pg.restart();
    pg.psql(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots;
         select pg_create_physical_replication_slot('switchboard_slot');",
    );
    let checked = check(&pg.url());
    assert!(checked
        .finding("wal_level")
        .starts_with("ok    wal_level is logical"));
    assert_eq!(
        checked.finding("replication slot"),
        "FAIL  replication slot switchboard_slot is a physical slot: changes cannot stream \
         from it\n      \
         fix: SELECT pg_drop_replication_slot('switchboard_slot'); -- or choose another \
         --slot-name"
    );
    assert_eq!(checked.code, Some(1), "{checked}");
}

#[test]
fn an_unreachable_database_exits_2_saying_so() {
    let url = format!("postgresql://postgres@127.0.0.1:{}/postgres", free_port());
    let checked = check(&url);
    assert_eq!(checked.code, Some(2), "{checked}");
    assert!(checked.stdout.is_empty(), "{checked}");
    assert!(
        checked
            .stderr
            .starts_with("switchboard check: cannot connect to the database: "),
        "{checked}"
    );
    assert!(checked.stderr.contains("Connection refused"), "{checked}");

    let checked = check("postgresql://postgres@127.0.0.1:notaport/postgres");
    assert_eq!(checked.code, Some(2), "{checked}");
    assert!(
        checked.stderr.contains("cannot connect to the database: "),
        "{checked}"
    );
}

#[test]
fn serve_logs_the_checks_at_start() {
    let pg = TempPostgres::start();
    pg.psql(
        "create table public.todos (id int primary key, task text);
         alter table public.todos replica identity full;
         alter publication supabase_realtime add table public.todos;",
    );
    let server = Server::start(&["--database-url", &pg.url()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.logged("public.todos has Row Level Security disabled") == 0 {
        assert!(Instant::now() < deadline, "serve logged no RLS warning");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.logged("ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;"),
        1,
        "the fix is a field of the warning"
    );
    // Only what is not ok is logged, and the schema was installed before the check.
    assert_eq!(server.logged("replica identity"), 0);
    assert_eq!(server.logged("realtime schema"), 0);

    // While it streams, its slot and WAL sender count as in use, and as its own.
    let checked = loop {
        let checked = check(&pg.url());
        if checked.stdout.contains("one streaming switchboard_slot") {
            break checked;
        }
        assert!(Instant::now() < deadline, "never streaming:\n{checked}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(checked
        .finding("replication slot switchboard_slot exists")
        .starts_with("ok"));
}
