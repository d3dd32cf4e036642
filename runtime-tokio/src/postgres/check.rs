//! `switchboard check`: whether a database has what realtime needs, each shortfall with the
//! statement that fixes it. `serve` runs the same checks at start and logs them.
//!
//! The catalog is read in a few queries into `Facts`, which pure functions judge
//! (`judge.rs`), so every verdict is tested without a database. Fixes are SQL, with what
//! SQL cannot do (restarting Postgres) in `--` comments, so a fix pastes into psql as
//! printed.

use std::fmt;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

mod judge;

use judge::judge;

/// The roles Supabase's keys carry: visibility checks run as them.
const API_ROLES: [&str; 3] = ["anon", "authenticated", "service_role"];

/// The helpers policies written for Supabase call, as Supabase defines them.
const AUTH_HELPERS: [(&str, &str); 3] = [
    (
        "auth.uid()",
        "CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;",
    ),
    (
        "auth.role()",
        "CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;",
    ),
    (
        "auth.jwt()",
        "CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;",
    ),
];

/// The body of Supabase's `auth.uid()` in [`AUTH_HELPERS`]: the visibility checker knows
/// the helper by it.
pub(super) fn auth_uid_body() -> &'static str {
    AUTH_HELPERS[0]
        .1
        .split("$$")
        .nth(1)
        .expect("the definition has a body")
}

/// An unreachable host fails the check in this long rather than after TCP gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one check came out. Only `Fail` makes `switchboard check` exit non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Realtime has what it needs here.
    Ok,
    /// Realtime runs, but something users may expect is missing (old records, RLS).
    Warn,
    /// Something realtime offers does not work until this is fixed.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so `{:<6}` aligns the report's columns.
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One verdict: what was checked, how it came out, and what to run when it is not ok.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// A short stable name (`wal_level`, `replica identity public.todos`): the log field.
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// A sentence naming the subject and, unless ok, what goes wrong because of it.
    pub detail: String,
    /// SQL (or a `switchboard` command) that fixes it; `None` when there is nothing to do.
    pub fix: Option<String>,
}

/// Why a database could not be checked at all. The driver's error, whose own text is only
/// its kind ("error connecting to server"), is the source: print the chain.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The URL is invalid, or the server is unreachable or refused us.
    #[error("cannot connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    /// Connected, but a catalog query failed.
    #[error("reading the database's catalog failed")]
    Catalog(#[source] tokio_postgres::Error),
}

/// Checks the database at `url` for what streaming `publication` through `slot_name`, and
/// the rest of realtime, needs. One finding per check, failures with their fix.
pub async fn check(
    url: &str,
    publication: &str,
    slot_name: &str,
) -> Result<Vec<Finding>, CheckError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(CheckError::Connect)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, connection) = config.connect(NoTls).await.map_err(CheckError::Connect)?;
    // Ends when `client` is dropped, on return.
    tokio::spawn(connection);
    let facts = read(&client, publication, slot_name)
        .await
        .map_err(CheckError::Catalog)?;
    Ok(judge(&facts))
}

/// Runs [`check`] and logs what is not ok, each with its fix, then a summary; a database
/// that cannot be checked is only logged. `serve` spawns it at start, so a misconfigured
/// database is named in its log before the first subscriber wonders why nothing arrives.
pub async fn log_findings(url: String, publication: String, slot_name: String) {
    match check(&url, &publication, &slot_name).await {
        Ok(findings) => {
            for finding in findings.iter().filter(|f| f.status != Status::Ok) {
                warn!(
                    check = %finding.name,
                    status = %finding.status,
                    fix = finding.fix.as_deref(),
                    "{}",
                    finding.detail
                );
            }
            info!("database checks: {}", summary(&findings));
        }
        Err(error) => warn!(
            error = &error as &dyn std::error::Error,
            "checking the database failed"
        ),
    }
}

/// The findings as `switchboard check` prints them: a line each, its fix indented below,
/// then the summary.
pub fn report(findings: &[Finding]) -> String {
    let mut out = String::new();
    for finding in findings {
        out.push_str(&format!("{:<6}{}\n", finding.status, finding.detail));
        if let Some(fix) = &finding.fix {
            for (n, line) in fix.lines().enumerate() {
                let lead = if n == 0 { "      fix: " } else { "           " };
                out.push_str(&format!("{lead}{line}\n"));
            }
        }
    }
    out.push_str(&summary(findings));
    out.push('\n');
    out
}

/// `2 failed, 1 warning, 9 ok`.
pub fn summary(findings: &[Finding]) -> String {
    let count = |status| findings.iter().filter(|f| f.status == status).count();
    let warnings = count(Status::Warn);
    format!(
        "{} failed, {warnings} {}, {} ok",
        count(Status::Fail),
        if warnings == 1 { "warning" } else { "warnings" },
        count(Status::Ok)
    )
}

/// What the catalog says, as far as the checks need it.
#[derive(Debug)]
struct Facts {
    version: String,
    version_num: i32,
    wal_level: String,
    slots_max: i32,
    slots_used: i32,
    senders_max: i32,
    senders_used: i32,
    /// `current_user`, quoted as an identifier.
    user: String,
    superuser: bool,
    replication: bool,
    /// The publication's name, quoted as an identifier.
    publication: String,
    /// The slot's name as given, and quoted as a literal.
    slot_name: String,
    slot_literal: String,
    slot: Option<Slot>,
    published: Option<Publication>,
    /// The publication's tables, outside switchboard's own `realtime` schema (its
    /// migrations set those tables up).
    tables: Vec<PublishedTable>,
    /// Each of [`API_ROLES`]: whether it exists and whether `user` may switch to it.
    roles: Vec<(&'static str, bool, bool)>,
    /// Those of [`AUTH_HELPERS`] that do not exist.
    helpers_missing: Vec<&'static str>,
    /// The realtime schema's applied migrations; `None` when it is not installed.
    migrations: Option<Migrations>,
}

#[derive(Debug)]
struct Slot {
    kind: String,
    plugin: String,
    /// The database it decodes, empty for a physical slot.
    database: String,
    here: bool,
    active: bool,
}

#[derive(Clone, Copy, Debug)]
struct Publication {
    all_tables: bool,
    /// It publishes UPDATE or DELETE, which Postgres then refuses on a table without a
    /// replica identity.
    updates_or_deletes: bool,
}

#[derive(Debug)]
struct PublishedTable {
    /// `schema.table`, quoted as identifiers.
    name: String,
    /// `pg_class.relreplident`: `d`efault, `f`ull, `i`ndex or `n`othing.
    replica_identity: char,
    has_primary_key: bool,
    has_identity_index: bool,
    rls: bool,
}

#[derive(Debug)]
enum Migrations {
    Applied(Vec<i32>),
    /// Installed by a role `user` may not read it as.
    Unreadable,
}

async fn read(
    client: &Client,
    publication: &str,
    slot_name: &str,
) -> Result<Facts, tokio_postgres::Error> {
    const SETTINGS: &str = "
        select current_setting('server_version'), current_setting('server_version_num')::int,
            current_setting('wal_level'),
            current_setting('max_replication_slots')::int,
            (select count(*) from pg_catalog.pg_replication_slots)::int,
            current_setting('max_wal_senders')::int,
            (select count(*) from pg_catalog.pg_stat_replication)::int,
            quote_ident(current_user), r.rolsuper, r.rolreplication,
            quote_ident($1), quote_literal($2),
            case when to_regclass('realtime.switchboard_migrations') is null then null
                else has_table_privilege('realtime.switchboard_migrations', 'select') end
        from pg_catalog.pg_roles r where r.rolname = current_user";
    const SLOT: &str = "
        select slot_type, coalesce(plugin, ''), coalesce(database::text, ''),
            coalesce(database = current_database(), false), active
        from pg_catalog.pg_replication_slots where slot_name = $1";
    const PUBLICATION: &str = "
        select puballtables, pubupdate or pubdelete
        from pg_catalog.pg_publication where pubname = $1";
    const TABLES: &str = "
        select format('%I.%I', p.schemaname, p.tablename), c.relreplident::text,
            exists (select 1 from pg_catalog.pg_index i
                    where i.indrelid = c.oid and i.indisprimary),
            exists (select 1 from pg_catalog.pg_index i
                    where i.indrelid = c.oid and i.indisreplident),
            c.relrowsecurity
        from pg_catalog.pg_publication_tables p
        join pg_catalog.pg_namespace n on n.nspname = p.schemaname
        join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
        where p.pubname = $1 and p.schemaname <> 'realtime'
        order by p.schemaname, p.tablename";
    const ROLES: &str = "
        select to_regrole(r.name) is not null,
            coalesce(pg_has_role(current_user, to_regrole(r.name)::oid, 'member'), false)
        from unnest($1::text[]) with ordinality r(name, n) order by r.n";
    const HELPERS: &str = "
        select array(select f from unnest($1::text[]) f where to_regprocedure(f) is null)";

    let settings = client
        .query_one(SETTINGS, &[&publication, &slot_name])
        .await?;
    let slot = client
        .query_opt(SLOT, &[&slot_name])
        .await?
        .map(|row| Slot {
            kind: row.get(0),
            plugin: row.get(1),
            database: row.get(2),
            here: row.get(3),
            active: row.get(4),
        });
    let published = client
        .query_opt(PUBLICATION, &[&publication])
        .await?
        .map(|row| Publication {
            all_tables: row.get(0),
            updates_or_deletes: row.get(1),
        });
    let tables = client
        .query(TABLES, &[&publication])
        .await?
        .iter()
        .map(|row| PublishedTable {
            name: row.get(0),
            replica_identity: row.get::<_, String>(1).chars().next().unwrap_or('d'),
            has_primary_key: row.get(2),
            has_identity_index: row.get(3),
            rls: row.get(4),
        })
        .collect();
    let roles = client
        .query(ROLES, &[&API_ROLES.as_slice()])
        .await?
        .iter()
        .zip(API_ROLES)
        .map(|(row, name)| (name, row.get(0), row.get(1)))
        .collect();
    let signatures: Vec<&str> = AUTH_HELPERS.iter().map(|(name, _)| *name).collect();
    let missing: Vec<String> = client.query_one(HELPERS, &[&signatures]).await?.get(0);
    let helpers_missing = signatures
        .into_iter()
        .filter(|name| missing.iter().any(|m| m == name))
        .collect();
    let migrations = match settings.get::<_, Option<bool>>(12) {
        None => None,
        Some(false) => Some(Migrations::Unreadable),
        Some(true) => {
            let row = client
                .query_one(
                    "select coalesce(array_agg(version order by version), '{}')
                     from realtime.switchboard_migrations",
                    &[],
                )
                .await?;
            Some(Migrations::Applied(row.get(0)))
        }
    };
    Ok(Facts {
        version: settings.get(0),
        version_num: settings.get(1),
        wal_level: settings.get(2),
        slots_max: settings.get(3),
        slots_used: settings.get(4),
        senders_max: settings.get(5),
        senders_used: settings.get(6),
        user: settings.get(7),
        superuser: settings.get(8),
        replication: settings.get(9),
        publication: settings.get(10),
        slot_name: slot_name.to_owned(),
        slot_literal: settings.get(11),
        slot,
        published,
        tables,
        roles,
        helpers_missing,
        migrations,
    })
}

#[cfg(test)]
mod tests {
    use super::judge::finding;
    use super::*;

    #[test]
    fn report_prints_a_line_per_finding_fixes_indented_and_a_summary() {
        let findings = vec![
            finding("wal_level", Status::Ok, "wal_level is logical".into(), None),
            finding(
                "publication",
                Status::Fail,
                "publication p does not exist".into(),
                Some("CREATE PUBLICATION p;\n-- then add tables".into()),
            ),
            finding(
                "rls",
                Status::Warn,
                "t has RLS disabled".into(),
                Some("ALTER TABLE t;".into()),
            ),
        ];
        assert_eq!(
            report(&findings),
            "ok    wal_level is logical\n\
             FAIL  publication p does not exist\n\
             \x20     fix: CREATE PUBLICATION p;\n\
             \x20          -- then add tables\n\
             warn  t has RLS disabled\n\
             \x20     fix: ALTER TABLE t;\n\
             1 failed, 1 warning, 1 ok\n"
        );
    }
}
