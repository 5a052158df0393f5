//! Shared column lists for the compile-time-checked queries. A list read by many statements
//! (the task's in `task_store.rs`, the droplet's in `droplet_row.rs`) is declared once, as
//! the single string literal inside a `macro_rules!` that splices it between the caller's
//! tokens and calls the macro it is given: `task_columns!(sqlx::query_as { Task, "SELECT " + }
//! { + " FROM ..." + $tail, args })` becomes `sqlx::query_as!(Task, "SELECT " + "<columns>" +
//! " FROM ..." + $tail, args)`, which the query macros accept (`+` joins literals) and check.
//!
//! The list names its columns with the overrides the macros need (`AS "priority!"`,
//! `AS "status!: Status"`). The one statement still built at run time that reads tasks (the
//! listing's filters, `task_listing.rs`) takes the same list through [`plain_columns!`]: a
//! `&'static str` made at compile time with the overrides taken out (`AS priority`), so that
//! `FromRow` finds the field names.
//!
//! A statement that reads more than a task or a droplet calls `sqlx::query!` through the list
//! and takes the task or the droplet out of each record with `task_of!` or `droplet_of!`
//! (what `#[sqlx(flatten)]` does for `FromRow`, which the query macros cannot fill). Another
//! fixed piece shared by statements is declared the same way (the heartbeat's health event
//! CTE, `events::heartbeat_health_event!`), and two such macros compose through a local one
//! that each calls back (`heartbeats_query!` in `heartbeats.rs`).

/// `concat!` of `"a" + "b" + ...`: the form the column macros splice, as one `&'static str`.
/// Given to a column macro as its callback: `task_columns!(concat_plus {} {})`.
macro_rules! concat_plus {
    ($first:literal $(+ $rest:literal)*) => {
        concat!($first $(, $rest)*)
    };
}
pub(crate) use concat_plus;

/// The SQL of a column list (a `&'static str` constant expression, usually
/// `<list>_columns!(concat_plus {...} {...})`) with the query macros' overrides taken out:
/// `AS "priority!"` and `AS "status!: Status"` become `AS priority` and `AS status`. Made at
/// compile time; a constant expression.
macro_rules! plain_columns {
    ($raw:expr) => {{
        const RAW: &str = $raw;
        const PLAIN: ([u8; RAW.len()], usize) = $crate::services::sql_columns::strip_overrides(RAW);
        match ::core::str::from_utf8(PLAIN.0.split_at(PLAIN.1).0) {
            Ok(s) => s,
            Err(_) => panic!("plain_columns!: not UTF-8"),
        }
    }};
}
pub(crate) use plain_columns;

/// The bytes of `sql` (at most `N`) with each double-quoted name written bare and cut at its
/// override (`!`, `?` or `: Type`), and how many were written. Names in the lists are plain
/// lower-case identifiers, which need no quotes. Used by [`plain_columns!`].
pub const fn strip_overrides<const N: usize>(sql: &str) -> ([u8; N], usize) {
    let bytes = sql.as_bytes();
    let mut out = [0u8; N];
    let (mut i, mut n) = (0, 0);
    let (mut quoted, mut cut) = (false, false);
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'"' {
            quoted = !quoted;
            cut = false;
        } else if quoted && (c == b'!' || c == b'?' || c == b':') {
            cut = true;
        } else if !cut {
            out[n] = c;
            n += 1;
        }
        i += 1;
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn overrides_are_taken_out() {
        const SQL: &str = plain_columns!(concat_plus!(
            "t.id AS \"id!\", d.name AS \"name?\", t.status AS \"status!: crate::X\", "
                + "'[]'::jsonb AS c, t.deadline"
        ));
        assert_eq!(
            SQL,
            "t.id AS id, d.name AS name, t.status AS status, '[]'::jsonb AS c, t.deadline"
        );
    }
}
