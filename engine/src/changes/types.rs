//! What the runtime's WAL reader and RLS checker exchange with the engine.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A column: name and Postgres type name (`pg_type.typname`: `int8`, `text`, `_int4`, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `pg_type.typname`; arrays start with `_`.
    pub type_name: String,
}

/// A table of the publication, as the runtime read it from the catalogs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Columns in table order.
    pub columns: Vec<Column>,
    /// Primary key column names; empty when the table has none.
    pub primary_key: Vec<String>,
    /// Row Level Security is enabled: inserts and updates need a visibility check.
    pub rls: bool,
}

/// Which operation a change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
}

impl ChangeKind {
    /// The wire name (`data.type`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
        }
    }
}

/// One row change decoded from the WAL, with typed JSON values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Insert, update or delete.
    pub kind: ChangeKind,
    /// Commit time, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub commit_timestamp: String,
    /// The relation's columns, in table order.
    pub columns: Vec<Column>,
    /// The new row (insert, update); unchanged TOAST values already filled from the old
    /// row where the WAL had it.
    pub record: Option<Map<String, Value>>,
    /// The old row identity (update with an old tuple, delete): key columns, or every
    /// column with `REPLICA IDENTITY FULL`.
    pub old_record: Option<Map<String, Value>>,
    /// The commit end LSN of its transaction: a change at or below what the engine already
    /// handed out is a resend (a reconnected or failed-over stream) and is skipped.
    pub lsn: u64,
    /// Its transaction's id: a visibility check waits until the checker's snapshot sees the
    /// transaction, so policies that read other rows of it judge what it committed.
    pub xid: u32,
}

/// Changes of whole transactions in commit order, handed over together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// The changes, in commit order.
    pub changes: Vec<Change>,
    /// The WAL position up to which this batch completes every transaction: reported back
    /// in [`crate::Output::WalProgress`] once every change is handed out.
    pub lsn: u64,
}

/// One row to check for visibility under a subscriber's claims.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowCheck {
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// The row the change wrote, as decoded from the WAL: policies are judged against these
    /// values, not against the table as it is when the check runs, so a row updated or
    /// deleted since is judged by what this change committed. Shared by every claims group
    /// that checks the change.
    pub row: Arc<Map<String, Value>>,
}

/// A visibility question's id: the shard that asked, so one checker pool serves every
/// shard of a process and routes each answer back, and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueryId {
    /// The asking shard.
    pub shard: crate::ShardId,
    /// The question's number on that shard.
    pub n: u64,
}

/// A visibility question for the database: which of these rows may this role, with these
/// claims, select? One per batch and claims group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisibilityQuery {
    /// Echoed in [`crate::Input::Visibility`].
    pub id: QueryId,
    /// The Postgres role to `set role` to.
    pub role: String,
    /// Every claim, for `request.jwt.claims`.
    pub claims: Arc<Map<String, Value>>,
    /// The rows to check.
    pub checks: Vec<RowCheck>,
    /// The transactions that wrote them: the answer waits until they are visible to the
    /// checker, so policies reading other tables see what those transactions committed.
    pub xids: Vec<u32>,
}

/// How a table's policies judge rows for one role when the judgment needs no database. The
/// runtime reports it with every answer, for each table the question named; the engine then
/// asks only the claims groups the rule cannot judge, and files each channel of an owner
/// rule under its owner so a change costs its recipients, not every subscriber. A batch
/// judged by a rule still sends one question of the role, whose answer confirms the rule
/// holds for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// A row is visible exactly when its `column` holds the subscriber's `sub`, spelled as
    /// the column's type prints it ([`owner_key`]): Supabase's `owner = auth.uid()`.
    Owner {
        /// The owner column.
        column: String,
    },
    /// Every row is visible: a permissive policy `using (true)` and no restrictive one, as
    /// the Supabase dashboard's "Enable read access for all users" template makes.
    All,
}

impl Rule {
    /// The verdict for `row` of a subscriber whose owner key ([`owner_key`]) is `key`: the
    /// one comparison both the engine and the checker judge rows by.
    pub fn verdict(&self, row: Option<&Map<String, Value>>, key: &str) -> Verdict {
        let Rule::Owner { column } = self else {
            return Verdict::Visible;
        };
        match row.and_then(|row| row.get(column)) {
            Some(Value::String(owner)) if owner == key => Verdict::Visible,
            _ => Verdict::Hidden,
        }
    }
}

/// The [`Rule`] of one table under a question's role, as the answer found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRule {
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// `None` when the database must evaluate the table's policies.
    pub rule: Option<Rule>,
}

/// `sub` as a column of `type_name` prints it, for an [`Rule::Owner`] comparison: a uuid
/// in lowercase hyphenated form ([`canonical_uuid`]), text as it is. `None` for other
/// types, and for a `sub` that is no uuid: Postgres raises on its cast, so the subscriber
/// is told it is unauthorized, and that is left to Postgres.
pub fn owner_key(type_name: &str, sub: &str) -> Option<String> {
    match type_name {
        "uuid" => canonical_uuid(sub),
        "text" | "varchar" => Some(sub.to_owned()),
        _ => None,
    }
}

/// `text` as Postgres prints a `uuid` (lowercase, hyphenated 8-4-4-4-12), for every
/// spelling its input accepts: any case, within braces or not, a hyphen after any group of
/// four digits or none. `None` for what Postgres refuses. Upstream compares a filter's
/// value with the column as that type, so `eq` on a uuid must not depend on the spelling.
pub fn canonical_uuid(text: &str) -> Option<String> {
    let digits = match text.strip_prefix('{') {
        Some(braced) => braced.strip_suffix('}')?,
        None => text,
    }
    .as_bytes();
    let mut out = String::with_capacity(36);
    let mut at = 0;
    // Postgres's `string_to_uuid`: sixteen pairs of hex digits, and after every second pair
    // but the last, an optional hyphen.
    for pair in 0..16 {
        let two = digits.get(at..at + 2)?;
        if !two.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        if matches!(pair, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.extend(two.iter().map(|b| char::from(b.to_ascii_lowercase())));
        at += 2;
        if pair % 2 == 1 && pair < 15 && digits.get(at) == Some(&b'-') {
            at += 1;
        }
    }
    (at == digits.len()).then_some(out)
}

/// The answer for one [`RowCheck`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The row exists and the policies let the role see it.
    Visible,
    /// Not visible to this role.
    Hidden,
    /// The role may not select from the table at all (`Error 401: Unauthorized`).
    Unauthorized,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::canonical_uuid;

    /// A uuid's 16 bytes spelled as Postgres may read them: each digit in either case, a
    /// hyphen or none after each group of four digits but the last, braces or none.
    fn spelling() -> impl Strategy<Value = ([u8; 16], String)> {
        (
            any::<[u8; 16]>(),
            any::<[bool; 32]>(),
            any::<[bool; 7]>(),
            any::<bool>(),
        )
            .prop_map(|(bytes, upper, hyphens, braced)| {
                let mut text = String::new();
                for (i, byte) in bytes.iter().enumerate() {
                    for (j, digit) in format!("{byte:02x}").chars().enumerate() {
                        let upper = upper[i * 2 + j];
                        text.push(if upper {
                            digit.to_ascii_uppercase()
                        } else {
                            digit
                        });
                    }
                    if i % 2 == 1 && i < 15 && hyphens[i / 2] {
                        text.push('-');
                    }
                }
                (bytes, if braced { format!("{{{text}}}") } else { text })
            })
    }

    proptest! {
        #[test]
        fn every_spelling_of_a_uuid_reads_as_its_bytes((bytes, text) in spelling()) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let expected = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]
            );
            prop_assert_eq!(canonical_uuid(&text), Some(expected));
        }

        #[test]
        fn what_is_read_is_canonical_and_reads_as_itself(text in "\\PC{0,40}|[{}0-9a-fA-F-]{30,40}") {
            if let Some(canonical) = canonical_uuid(&text) {
                prop_assert_eq!(canonical.len(), 36);
                let shaped = canonical.char_indices().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => matches!(c, '0'..='9' | 'a'..='f'),
                });
                prop_assert!(shaped, "{}", canonical);
                prop_assert_eq!(canonical_uuid(&canonical), Some(canonical.clone()));
            }
        }
    }

    #[test]
    fn uuids_are_spelled_as_postgres_reads_and_prints_them() {
        let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        // The spellings PostgreSQL's manual lists for `uuid` input (§8.12), and one more
        // hyphen placement its parser allows.
        for spelling in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert_eq!(
                canonical_uuid(spelling).as_deref(),
                Some(canonical),
                "{spelling}"
            );
        }
        for refused in [
            "",
            "not-a-uuid",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eeb-c99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0ee--bc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "{{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}}",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380aé",
        ] {
            assert_eq!(canonical_uuid(refused), None, "{refused:?}");
        }
    }
}
