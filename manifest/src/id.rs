//! Validated names: a scriptlet id becomes a file name on the node, a parameter name becomes an
//! environment variable, so both refuse anything that could escape those roles at parse time.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("scriptlet id {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-', without '..'")]
    Scriptlet(String),
    #[error("parameter name {0:?} is invalid: use 1-32 characters from a-z 0-9 -, starting with a letter")]
    Param(String),
}

/// A scriptlet id such as `000-setup-tunnel`: safe as a single path component on the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScriptletId(String);

impl ScriptletId {
    pub const MAX_LEN: usize = 64;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ScriptletId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let valid = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.chars().all(ok_char)
            && !s.starts_with('.')
            && !s.starts_with('-')
            && !s.contains("..");
        if valid {
            Ok(ScriptletId(s.to_owned()))
        } else {
            Err(IdError::Scriptlet(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for ScriptletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A signed parameter name such as `enroll-key`; scriptlets see it as `IDHAL_PARAM_ENROLL_KEY`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamName(String);

impl ParamName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The environment variable scriptlets receive this parameter in.
    pub fn env_var(&self) -> String {
        format!(
            "IDHAL_PARAM_{}",
            self.0.to_ascii_uppercase().replace('-', "_")
        )
    }
}

impl FromStr for ParamName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let valid = (1..=32).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(ParamName(s.to_owned()))
        } else {
            Err(IdError::Param(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for ParamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scriptlet_ids() {
        for good in ["000-setup-tunnel", "a", "x.sh", "A_b-9.c", &"a".repeat(64)] {
            assert!(good.parse::<ScriptletId>().is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "a..b",
            ".hidden",
            "-rf",
            "a b",
            "a\nb",
            "a\0b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(bad.parse::<ScriptletId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn param_names() {
        let p: ParamName = "enroll-key".parse().unwrap();
        assert_eq!(p.env_var(), "IDHAL_PARAM_ENROLL_KEY");
        for bad in ["", "Enroll", "1x", "a_b", "a=b", "a b", &"a".repeat(33)] {
            assert!(bad.parse::<ParamName>().is_err(), "{bad:?}");
        }
    }
}
