//! Values made safe for PostgreSQL before they reach a batched statement.
//!
//! One bad value fails the whole statement it is in, and a batched acknowledgement
//! carries up to `ack_batch` jobs: a NUL byte in one error message (`text` cannot hold
//! it), `\u0000` in one result (`jsonb` refuses it) or one `Snooze(Duration::MAX)`
//! (`interval out of range`) would drop every acknowledgement of the flush and bring the
//! bad job back to poison the next one. So the runtime cleans what it writes: NULs become
//! U+FFFD, errors are capped, delays are clamped. (The store still settles a failing
//! batch row by row; see `worker::completer`.)

use std::time::Duration;

use serde_json::Value;

/// Longest error text kept (bytes); longer ones are cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Longest delay the runtime schedules (about ten years). A longer snooze or retry
/// delay is clamped to it, and the ingress refuses a longer `?delay=`.
pub const MAX_DELAY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The replacement for a NUL, which PostgreSQL's `text` and `jsonb` cannot store.
const REPLACEMENT: char = '\u{FFFD}';

/// An error message as stored: NULs replaced, at most [`MAX_ERROR_BYTES`].
pub fn error_text(s: &str) -> String {
    let mut out: String = if s.contains('\0') {
        s.replace('\0', &REPLACEMENT.to_string())
    } else {
        s.to_owned()
    };
    if out.len() > MAX_ERROR_BYTES {
        const MARK: &str = " …(truncated)";
        let mut cut = MAX_ERROR_BYTES - MARK.len();
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(MARK);
    }
    out
}

/// Whether any string or key in `v` holds a NUL (`\u0000`).
pub fn json_has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(json_has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        _ => false,
    }
}

/// `v` with every NUL in its strings and keys replaced; unchanged (no copy) if it has none.
pub fn json(v: Value) -> Value {
    if !json_has_nul(&v) {
        return v;
    }
    fn fix(v: Value) -> Value {
        match v {
            Value::String(s) => Value::String(s.replace('\0', &REPLACEMENT.to_string())),
            Value::Array(a) => Value::Array(a.into_iter().map(fix).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, v)| (k.replace('\0', &REPLACEMENT.to_string()), fix(v)))
                    .collect(),
            ),
            other => other,
        }
    }
    fix(v)
}

/// A delay the database can add to a timestamp.
pub fn delay(d: Duration) -> Duration {
    d.min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_bytes_are_replaced_and_long_errors_cut_at_a_char_boundary() {
        assert_eq!(error_text("a\0b"), "a\u{FFFD}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = error_text(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with("(truncated)"));
        assert_eq!(error_text("fine"), "fine");
    }

    #[test]
    fn json_nuls_in_strings_and_keys() {
        let v = json!({"a\u{0}": ["x\u{0}y", 1, {"k": "\u{0}"}], "b": null});
        assert!(json_has_nul(&v));
        let c = json(v);
        assert!(!json_has_nul(&c));
        assert_eq!(
            c,
            json!({"a\u{FFFD}": ["x\u{FFFD}y", 1, {"k": "\u{FFFD}"}], "b": null})
        );
        let clean = json!({"ok": [1, "two"]});
        assert_eq!(json(clean.clone()), clean);
    }

    #[test]
    fn delays_are_clamped() {
        assert_eq!(delay(Duration::MAX), MAX_DELAY);
        assert_eq!(delay(Duration::from_secs(5)), Duration::from_secs(5));
    }
}
