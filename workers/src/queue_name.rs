//! Queue names are interpolated into table names (`pgmq.q_<name>`), so they are
//! validated before any SQL sees them: `[a-z0-9_]`, 1 to 47 characters. 47 is pgmq's
//! own limit (`pgmq.create` refuses longer names: its index names must fit PostgreSQL's
//! 63-byte identifiers), so a longer kind is refused when it is registered, at start.

use std::fmt;

/// The longest queue name pgmq accepts.
pub const MAX_LEN: usize = 47;

/// A validated queue name: safe to interpolate into an identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(String);

/// Why a string is not a queue name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueNameError {
    #[error("queue name is empty")]
    /// The name is empty.
    Empty,
    #[error("queue name is longer than {MAX_LEN} characters")]
    /// The name is longer than [`MAX_LEN`].
    TooLong,
    #[error("queue name may only contain a-z, 0-9 and _")]
    /// The name has a character outside `[a-z0-9_]`.
    BadChar,
}

impl QueueName {
    /// Checks `s` and wraps it.
    pub fn parse(s: &str) -> Result<Self, QueueNameError> {
        if s.is_empty() {
            return Err(QueueNameError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(QueueNameError::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(QueueNameError::BadChar);
        }
        Ok(QueueName(s.to_owned()))
    }

    /// The name, safe to interpolate into an identifier.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kinds() {
        assert!(QueueName::parse("probe").is_ok());
        assert!(QueueName::parse("charge_escrow_2").is_ok());
        assert!(QueueName::parse(&"a".repeat(47)).is_ok());
    }

    #[test]
    fn rejects_injection_and_junk() {
        for bad in [
            "",
            "x; drop table",
            "a'b",
            "Probe",
            "q-1",
            "é",
            "a\"b",
            "a b",
        ] {
            assert!(QueueName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            QueueName::parse(&"a".repeat(48)),
            Err(QueueNameError::TooLong)
        );
    }
}
