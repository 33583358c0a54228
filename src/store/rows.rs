//! Any number of rows in one bound parameter: a statement reads its rows from a JSON array of
//! arrays (`jsonb_each` on SQLite, `jsonb_array_elements` on PostgreSQL: each row is parsed
//! once into the binary form, and `->> N` reads a column without parsing again), so its text is the
//! same for 1 row or 1,000. Both backends then parse and plan it once per connection and
//! keep it in the statement cache, and binding costs one parameter instead of one per value
//! (SQLite resolves each numbered parameter by name, so thousands of them cost O(n^2)).
//! This file owns the encoding and the statement pairs' type; the statements live beside the
//! code that runs them.

use super::{Backend, StoreError};
use serde::Serialize;

/// One statement in the two dialects.
#[derive(Clone, Copy)]
pub(super) struct Sql {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Sql {
    pub fn get(&self, backend: Backend) -> &'static str {
        match backend {
            Backend::Sqlite => self.sqlite,
            Backend::Postgres => self.postgres,
        }
    }
}

/// The rows as one JSON parameter: each row a JSON array (tuples serialise as arrays). Only
/// strings, integers and nulls go in, so this does not fail; if it ever did, the batch is
/// refused rather than written short.
pub(super) fn json<T: Serialize>(rows: &[T]) -> Result<String, StoreError> {
    // Sized for a typical row up front, so that a batch's parameter is not grown (and
    // copied) step by step from empty.
    let mut out = Vec::with_capacity(ROW_BYTES_HINT * rows.len() + 2);
    serde_json::to_writer(&mut out, rows)
        .map_err(|e| StoreError::Corrupt(format!("row encoding: {e}")))?;
    String::from_utf8(out).map_err(|e| StoreError::Corrupt(format!("row encoding: {e}")))
}

/// Bytes reserved per row of a JSON parameter before encoding (a guess, not a limit).
const ROW_BYTES_HINT: usize = 96;

#[cfg(test)]
mod tests {
    #[test]
    fn tuples_become_arrays() {
        let rows = [("a\"b", 1i64, None::<&str>), ("c", 2, Some("d"))];
        assert_eq!(
            super::json(&rows).unwrap(),
            r#"[["a\"b",1,null],["c",2,"d"]]"#
        );
    }
}
