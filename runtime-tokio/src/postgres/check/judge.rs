//! The verdicts on what the catalog says: pure, so each is tested without a database.

use super::{Facts, Finding, Migrations, PublishedTable, Status, API_ROLES, AUTH_HELPERS};
use crate::postgres::migrate::MIGRATIONS;

/// Every verdict on `facts`, in the order an operator fixes them: the server's settings,
/// the publication and its tables, then the roles and helpers subscribers are checked with.
pub(super) fn judge(facts: &Facts) -> Vec<Finding> {
    let mut findings = vec![
        version(facts),
        wal_level(facts),
        replication_privilege(facts),
        replication_slot(facts),
        wal_senders(facts),
        publication(facts),
    ];
    if facts.published.is_some() {
        findings.extend(replica_identity(facts));
        findings.extend(row_level_security(facts));
    }
    findings.extend(roles(facts));
    findings.push(auth_helpers(facts));
    findings.push(realtime_schema(facts));
    findings
}

pub(super) fn finding(name: &str, status: Status, detail: String, fix: Option<String>) -> Finding {
    Finding {
        name: name.to_owned(),
        status,
        detail,
        fix,
    }
}

fn version(facts: &Facts) -> Finding {
    if facts.version_num >= 130_000 {
        finding(
            "version",
            Status::Ok,
            format!("PostgreSQL {}", facts.version),
            None,
        )
    } else {
        finding(
            "version",
            Status::Fail,
            format!(
                "PostgreSQL {} is older than 13: Row Level Security checks on changes need \
                 pg_visible_in_snapshot",
                facts.version
            ),
            Some("-- upgrade to PostgreSQL 13 or later".to_owned()),
        )
    }
}

fn wal_level(facts: &Facts) -> Finding {
    match facts.wal_level.as_str() {
        "logical" => finding("wal_level", Status::Ok, "wal_level is logical".into(), None),
        other => finding(
            "wal_level",
            Status::Fail,
            format!(
                "wal_level is {other}: postgres_changes and broadcast from the database need \
                 logical replication"
            ),
            Some("ALTER SYSTEM SET wal_level = logical; -- then restart Postgres".to_owned()),
        ),
    }
}

fn replication_privilege(facts: &Facts) -> Finding {
    let user = &facts.user;
    let (status, detail, fix) = if facts.superuser {
        (
            Status::Ok,
            format!("{user} is a superuser, so it may replicate"),
            None,
        )
    } else if facts.replication {
        (
            Status::Ok,
            format!("{user} has the REPLICATION attribute"),
            None,
        )
    } else {
        (
            Status::Fail,
            format!("{user} has neither REPLICATION nor superuser: it cannot stream changes"),
            Some(format!("ALTER ROLE {user} REPLICATION;")),
        )
    };
    finding("replication privilege", status, detail, fix)
}

fn replication_slot(facts: &Facts) -> Finding {
    let (name, max, used) = (&facts.slot_name, facts.slots_max, facts.slots_used);
    let drop = format!("SELECT pg_drop_replication_slot({});", facts.slot_literal);
    let (status, detail, fix) = match &facts.slot {
        Some(slot) if slot.kind == "logical" && slot.plugin == "pgoutput" && slot.here => (
            Status::Ok,
            format!("replication slot {name} exists ({used} of {max} slots in use)"),
            None,
        ),
        Some(slot) => {
            let what = match (slot.kind.as_str(), slot.here) {
                ("logical", true) => format!("a logical slot of plugin {}", slot.plugin),
                ("logical", false) => format!("a slot of database {}", slot.database),
                (kind, _) => format!("a {kind} slot"),
            };
            (
                Status::Fail,
                format!("replication slot {name} is {what}: changes cannot stream from it"),
                Some(format!("{drop} -- or choose another --slot-name")),
            )
        }
        None if used < max => (
            Status::Ok,
            format!(
                "replication slots: {} of {max} free; {name} is created on first start",
                max - used
            ),
            None,
        ),
        None => (
            Status::Fail,
            format!("replication slots: all {max} in use, none left for {name}"),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {}; -- then restart Postgres\n\
                 -- or drop a slot nobody reads: SELECT pg_drop_replication_slot('<slot>');",
                max + 1
            )),
        ),
    };
    finding("replication slot", status, detail, fix)
}

fn wal_senders(facts: &Facts) -> Finding {
    let (max, used) = (facts.senders_max, facts.senders_used);
    let streaming = facts.slot.as_ref().is_some_and(|slot| slot.active);
    let (status, detail, fix) = if streaming {
        (
            Status::Ok,
            format!(
                "WAL senders: {used} of {max} in use, one streaming {}",
                facts.slot_name
            ),
            None,
        )
    } else if used < max {
        (
            Status::Ok,
            format!("WAL senders: {} of {max} free", max - used),
            None,
        )
    } else {
        (
            Status::Fail,
            format!("WAL senders: all {max} in use, none left to stream changes"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {}; -- then restart Postgres",
                max + 1
            )),
        )
    };
    finding("wal senders", status, detail, fix)
}

fn publication(facts: &Facts) -> Finding {
    let name = &facts.publication;
    let add = format!("ALTER PUBLICATION {name} ADD TABLE <schema>.<table>;");
    let tables = names(&facts.tables);
    let (status, detail, fix) = match facts.published {
        None => (
            Status::Fail,
            format!("publication {name} does not exist: the change stream cannot start"),
            Some(format!(
                "CREATE PUBLICATION {name};\n-- then, for each table: {add}"
            )),
        ),
        Some(published) if published.all_tables => (
            Status::Ok,
            format!(
                "publication {name} is FOR ALL TABLES ({} now: {tables})",
                facts.tables.len()
            ),
            None,
        ),
        Some(_) if facts.tables.is_empty() => (
            Status::Warn,
            format!("publication {name} has no tables: postgres_changes delivers nothing"),
            Some(add),
        ),
        Some(_) => (
            Status::Ok,
            format!(
                "publication {name} publishes {}: {tables}",
                plural(facts.tables.len(), "table")
            ),
            None,
        ),
    };
    finding("publication", status, detail, fix)
}

/// `UPDATE` and `DELETE` events carry an `old_record` only as far as the replica identity
/// goes; without one, Postgres refuses those statements on a table it publishes them for.
fn replica_identity(facts: &Facts) -> Vec<Finding> {
    let publishes_old = facts.published.is_some_and(|p| p.updates_or_deletes);
    let mut findings = Vec::new();
    for table in &facts.tables {
        let name = &table.name;
        let full = format!("ALTER TABLE {name} REPLICA IDENTITY FULL;");
        let identified = match table.replica_identity {
            'f' => true,
            'i' => table.has_identity_index,
            'd' => table.has_primary_key,
            _ => false,
        };
        if !identified && publishes_old {
            findings.push(finding(
                &format!("replica identity {name}"),
                Status::Fail,
                format!(
                    "{name} has no replica identity (no primary key): Postgres refuses UPDATE \
                     and DELETE on it while they are published"
                ),
                Some(format!("{full} -- or add a primary key")),
            ));
        } else if table.replica_identity == 'd' && publishes_old {
            findings.push(finding(
                &format!("replica identity {name}"),
                Status::Warn,
                format!(
                    "{name} has the default replica identity: old_record in UPDATE and DELETE \
                     events holds only its primary key"
                ),
                Some(full),
            ));
        }
    }
    if findings.is_empty() && !facts.tables.is_empty() {
        findings.push(finding(
            "replica identity",
            Status::Ok,
            "replica identity: every published table sends whole old records".into(),
            None,
        ));
    }
    findings
}

fn row_level_security(facts: &Facts) -> Vec<Finding> {
    let mut findings: Vec<Finding> = facts
        .tables
        .iter()
        .filter(|table| !table.rls)
        .map(|table| {
            let name = &table.name;
            finding(
                &format!("row level security {name}"),
                Status::Warn,
                format!(
                    "{name} has Row Level Security disabled: every subscriber allowed to \
                     select from it receives every row"
                ),
                Some(format!(
                    "ALTER TABLE {name} ENABLE ROW LEVEL SECURITY;\n\
                     -- then say who reads which rows, e.g. CREATE POLICY \"own rows\" ON {name} \
                     FOR SELECT TO authenticated USING (user_id = auth.uid());"
                )),
            )
        })
        .collect();
    if findings.is_empty() && !facts.tables.is_empty() {
        findings.push(finding(
            "row level security",
            Status::Ok,
            "Row Level Security is enabled on every published table".into(),
            None,
        ));
    }
    findings
}

fn roles(facts: &Facts) -> Vec<Finding> {
    let user = &facts.user;
    let grant = |role: &str| format!("GRANT {role} TO {user};");
    let mut findings = Vec::new();
    for &(role, exists, member) in &facts.roles {
        if !exists {
            let attributes = match role {
                "service_role" => "NOLOGIN NOINHERIT BYPASSRLS",
                _ => "NOLOGIN NOINHERIT",
            };
            let mut fix = format!("CREATE ROLE {role} {attributes};");
            if !facts.superuser {
                fix = format!("{fix}\n{}", grant(role));
            }
            findings.push(finding(
                &format!("role {role}"),
                Status::Fail,
                format!(
                    "role {role} does not exist: changes are never visible to subscribers \
                     whose token has role {role}"
                ),
                Some(fix),
            ));
        } else if !member {
            findings.push(finding(
                &format!("role {role}"),
                Status::Fail,
                format!(
                    "{user} may not switch to role {role}: visibility checks for subscribers \
                     with role {role} fail"
                ),
                Some(grant(role)),
            ));
        }
    }
    if findings.is_empty() {
        findings.push(finding(
            "roles",
            Status::Ok,
            format!(
                "roles {} exist and {user} may switch to them",
                API_ROLES.join(", ")
            ),
            None,
        ));
    }
    findings
}

/// Not needed by the server itself: only the policies a project writes call them.
fn auth_helpers(facts: &Facts) -> Finding {
    if facts.helpers_missing.is_empty() {
        let names: Vec<&str> = AUTH_HELPERS.iter().map(|(name, _)| *name).collect();
        return finding(
            "auth helpers",
            Status::Ok,
            format!("{} exist", names.join(", ")),
            None,
        );
    }
    let mut fix = vec!["CREATE SCHEMA IF NOT EXISTS auth;".to_owned()];
    fix.extend(
        AUTH_HELPERS
            .iter()
            .filter(|(name, _)| facts.helpers_missing.contains(name))
            .map(|(_, sql)| (*sql).to_owned()),
    );
    fix.push(format!(
        "GRANT USAGE ON SCHEMA auth TO {};",
        API_ROLES.join(", ")
    ));
    finding(
        "auth helpers",
        Status::Warn,
        format!(
            "{} missing: policies written for Supabase call them",
            match facts.helpers_missing.as_slice() {
                [one] => format!("{one} is"),
                many => format!("{} are", many.join(", ")),
            }
        ),
        Some(fix.join("\n")),
    )
}

/// Private channels and broadcast from the database need the schema; `serve` installs it
/// at start, so a missing one is only a warning.
fn realtime_schema(facts: &Facts) -> Finding {
    let migrate = Some(r#"switchboard migrate --database-url "$DATABASE_URL""#.to_owned());
    let latest: Vec<i32> = MIGRATIONS.iter().map(|(version, _, _)| *version).collect();
    let (status, detail, fix) = match &facts.migrations {
        None => (
            Status::Warn,
            "the realtime schema is not installed (serve installs it at start): private \
             channels and broadcast from the database need it"
                .to_owned(),
            migrate,
        ),
        Some(Migrations::Unreadable) => (
            Status::Warn,
            format!(
                "{} may not read realtime.switchboard_migrations: serve cannot upgrade the \
                 realtime schema as this role",
                facts.user
            ),
            Some("-- run `switchboard migrate` as the realtime schema's owner".to_owned()),
        ),
        Some(Migrations::Applied(applied)) => {
            let missing: Vec<i32> = latest
                .iter()
                .copied()
                .filter(|version| !applied.contains(version))
                .collect();
            match missing.as_slice() {
                [] => (
                    Status::Ok,
                    "the realtime schema is up to date".to_owned(),
                    None,
                ),
                _ => (
                    Status::Warn,
                    format!(
                        "the realtime schema lacks migrations {missing:?} (serve applies them \
                         at start)"
                    ),
                    migrate,
                ),
            }
        }
    };
    finding("realtime schema", status, detail, fix)
}

/// Up to ten table names, then how many more.
fn names(tables: &[PublishedTable]) -> String {
    const SHOWN: usize = 10;
    let shown: Vec<&str> = tables.iter().take(SHOWN).map(|t| t.name.as_str()).collect();
    match tables.len().saturating_sub(SHOWN) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn plural(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::check::{summary, Publication, Slot};

    /// A database realtime is happy with: one published table with whole old records and
    /// RLS, the roles and helpers, the schema installed.
    fn healthy() -> Facts {
        Facts {
            version: "15.8".into(),
            version_num: 150_008,
            wal_level: "logical".into(),
            slots_max: 10,
            slots_used: 0,
            senders_max: 10,
            senders_used: 0,
            user: "postgres".into(),
            superuser: true,
            replication: true,
            publication: "supabase_realtime".into(),
            slot_name: "switchboard_slot".into(),
            slot_literal: "'switchboard_slot'".into(),
            slot: None,
            published: Some(Publication {
                all_tables: false,
                updates_or_deletes: true,
            }),
            tables: vec![table("public.todos")],
            roles: API_ROLES.iter().map(|&r| (r, true, true)).collect(),
            helpers_missing: Vec::new(),
            migrations: Some(Migrations::Applied(
                MIGRATIONS.iter().map(|m| m.0).collect(),
            )),
        }
    }

    fn table(name: &str) -> PublishedTable {
        PublishedTable {
            name: name.into(),
            replica_identity: 'f',
            has_primary_key: true,
            has_identity_index: false,
            rls: true,
        }
    }

    fn not_ok(facts: &Facts) -> Vec<(String, Status)> {
        judge(facts)
            .into_iter()
            .filter(|f| f.status != Status::Ok)
            .map(|f| (f.name, f.status))
            .collect()
    }

    #[test]
    fn a_healthy_database_passes_every_check() {
        let findings = judge(&healthy());
        assert!(findings
            .iter()
            .all(|f| f.status == Status::Ok && f.fix.is_none()));
        assert_eq!(summary(&findings), "0 failed, 0 warnings, 11 ok");
    }

    #[test]
    fn a_missing_slot_needs_a_free_one_and_a_free_sender() {
        let mut facts = healthy();
        facts.slots_used = 10;
        facts.senders_used = 10;
        let findings = judge(&facts);
        let slot = findings
            .iter()
            .find(|f| f.name == "replication slot")
            .unwrap();
        assert_eq!(slot.status, Status::Fail);
        assert!(slot
            .fix
            .as_deref()
            .unwrap()
            .contains("max_replication_slots = 11"));
        let senders = findings.iter().find(|f| f.name == "wal senders").unwrap();
        assert_eq!(senders.status, Status::Fail);
        assert!(senders
            .fix
            .as_deref()
            .unwrap()
            .contains("max_wal_senders = 11"));

        // Our own slot, being streamed, needs neither.
        facts.slot = Some(Slot {
            kind: "logical".into(),
            plugin: "pgoutput".into(),
            database: "postgres".into(),
            here: true,
            active: true,
        });
        assert!(not_ok(&facts).is_empty());
    }

    #[test]
    fn a_slot_of_another_kind_or_database_fails_with_a_drop() {
        let mut facts = healthy();
        for (kind, plugin, here, says) in [
            ("physical", "", false, "a physical slot"),
            ("logical", "wal2json", true, "plugin wal2json"),
            ("logical", "pgoutput", false, "database other"),
        ] {
            facts.slot = Some(Slot {
                kind: kind.into(),
                plugin: plugin.into(),
                database: "other".into(),
                here,
                active: false,
            });
            let findings = judge(&facts);
            let slot = findings
                .iter()
                .find(|f| f.name == "replication slot")
                .unwrap();
            assert_eq!(slot.status, Status::Fail);
            assert!(slot.detail.contains(says), "{}", slot.detail);
            assert!(slot
                .fix
                .as_deref()
                .unwrap()
                .starts_with("SELECT pg_drop_replication_slot('switchboard_slot');"));
        }
    }

    #[test]
    fn replica_identity_warns_on_default_and_fails_without_any() {
        let mut facts = healthy();
        let mut keyed = table("public.keyed");
        keyed.replica_identity = 'd';
        let mut unkeyed = table("public.log");
        unkeyed.replica_identity = 'd';
        unkeyed.has_primary_key = false;
        let mut nothing = table("public.nothing");
        nothing.replica_identity = 'n';
        let mut dropped_index = table("public.indexed");
        dropped_index.replica_identity = 'i';
        facts.tables = vec![keyed, unkeyed, nothing, dropped_index];
        assert_eq!(
            not_ok(&facts),
            [
                ("replica identity public.keyed".into(), Status::Warn),
                ("replica identity public.log".into(), Status::Fail),
                ("replica identity public.nothing".into(), Status::Fail),
                ("replica identity public.indexed".into(), Status::Fail),
            ]
        );
        // Publishing only inserts, nothing is refused and no old record is sent.
        facts.published = Some(Publication {
            all_tables: false,
            updates_or_deletes: false,
        });
        assert!(not_ok(&facts).is_empty());
    }

    #[test]
    fn a_user_without_replication_or_roles_gets_grants() {
        let mut facts = healthy();
        facts.user = "\"App User\"".into();
        facts.superuser = false;
        facts.replication = false;
        facts.roles = vec![
            ("anon", false, false),
            ("authenticated", true, false),
            ("service_role", true, true),
        ];
        let findings = judge(&facts);
        let fix = |name: &str| {
            findings
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.fix.clone())
                .unwrap()
        };
        assert_eq!(
            fix("replication privilege"),
            "ALTER ROLE \"App User\" REPLICATION;"
        );
        assert_eq!(
            fix("role anon"),
            "CREATE ROLE anon NOLOGIN NOINHERIT;\nGRANT anon TO \"App User\";"
        );
        assert_eq!(
            fix("role authenticated"),
            "GRANT authenticated TO \"App User\";"
        );
        assert!(findings.iter().all(|f| f.name != "role service_role"));
    }
}
