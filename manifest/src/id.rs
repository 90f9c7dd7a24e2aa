//! Validated names: a scriptlet id becomes a file name on the node, a parameter name becomes an
//! environment variable, a node id and a project name become file names, certificate CNs and
//! log words on both sides; each refuses anything that could escape its role at parse time.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("scriptlet id {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-', without '..'")]
    Scriptlet(String),
    #[error("parameter name {0:?} is invalid: use 1-32 characters from a-z 0-9 -, starting with a letter")]
    Param(String),
    #[error("node id {0:?} is invalid: use {rule}", rule = SAFE_NAME_RULE)]
    Node(String),
    #[error("project name {0:?} is invalid: use {rule}", rule = SAFE_NAME_RULE)]
    Project(String),
}

/// The rule node ids and project names share, said once for both their refusals.
pub const SAFE_NAME_RULE: &str =
    "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'";

/// The one definition of that rule: safe as a file name, a certificate CN and a word in a log.
fn is_safe_name(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(ok)
        && !s.contains("..")
}

/// What a refusal shows of a bad value: at most 80 characters (`{:?}` escapes the rest).
fn shown(s: &str) -> String {
    s.chars().take(80).collect()
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
            Err(IdError::Scriptlet(shown(s)))
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
            Err(IdError::Param(shown(s)))
        }
    }
}

impl fmt::Display for ParamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node's identity, also its certificate's CN and its name in OAR and the logs: `client317`.
///
/// A project name follows the same rule but is its own type: the two travel side by side (an
/// enrollment response names both), so code that takes one cannot be handed the other, and each
/// refusal names what was refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

/// A project (its own CA, tokens and address pool): `default`, the key of `[projects.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjectName(String);

macro_rules! safe_name_type {
    ($t:ident, $err:ident) => {
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                if is_safe_name(s) {
                    Ok($t(s.to_owned()))
                } else {
                    Err(IdError::$err(shown(s)))
                }
            }
        }

        impl TryFrom<&str> for $t {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

safe_name_type!(NodeId, Node);
safe_name_type!(ProjectName, Project);

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
            assert_eq!(
                bad.parse::<ScriptletId>(),
                Err(IdError::Scriptlet(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn param_names() {
        let p: ParamName = "enroll-key".parse().unwrap();
        assert_eq!(p.env_var(), "IDHAL_PARAM_ENROLL_KEY");
        for bad in ["", "Enroll", "1x", "a_b", "a=b", "a b", &"a".repeat(33)] {
            assert_eq!(
                bad.parse::<ParamName>(),
                Err(IdError::Param(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn node_ids_and_project_names() {
        for good in [
            "client317",
            "a",
            "9",
            "A_b-9.c",
            "vpn1.example",
            &"a".repeat(64),
        ] {
            let n = NodeId::try_from(good).unwrap();
            assert_eq!(
                (n.as_str(), n.as_ref(), n.to_string()),
                (good, good, good.into())
            );
            assert_eq!(good.parse::<ProjectName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            ".x",
            "-x",
            "_x",
            "a..b",
            "a/b",
            "../etc",
            "a b",
            "a\nb",
            "a\0b",
            "x'--",
            "é",
            &"a".repeat(65),
        ] {
            assert_eq!(
                NodeId::try_from(bad),
                Err(IdError::Node(bad.into())),
                "{bad:?}"
            );
            assert_eq!(
                bad.parse::<ProjectName>(),
                Err(IdError::Project(bad.into())),
                "{bad:?}"
            );
        }
        // A hostile value is cut to 80 characters and escaped, so it cannot forge a log line.
        let long = format!("{}\nidhal: forged", "a".repeat(100));
        let e = NodeId::try_from(long.as_str()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "node id \"{}\" is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, \
                 starting with a letter or digit, without '..'",
                "a".repeat(80)
            )
        );
        let e = "x\ny".parse::<ProjectName>().unwrap_err().to_string();
        assert!(
            e.starts_with("project name \"x\\ny\" is invalid: use 1-64"),
            "{e}"
        );
    }
}
