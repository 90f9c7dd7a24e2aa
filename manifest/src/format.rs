//! Manifest format v1: a small line-oriented header and length-prefixed scriptlet bodies, so a
//! body can hold any bytes without escaping. The grammar is in docs/manifest.md; parsing is strict
//! and canonical (encode(parse(x)) == x), and only ever runs on bytes whose signature checked out.

use crate::id::{ParamName, ScriptletId};
use std::fmt;
use std::str::FromStr;

pub const FORMAT_LINE: &str = "idhal-manifest 1";
/// Longest header line accepted (a `param` value is the only long one).
pub const MAX_LINE: usize = 2048;
/// Largest encoded manifest (4 MiB): the most `idhal sign` makes by default and the agent's
/// default download cap (`max_manifest_size`), so a manifest that signs also downloads.
pub const MAX_MANIFEST: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("manifest ends early: {0}")]
    Truncated(&'static str),
}

/// When a scriptlet runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Frequency {
    /// Once per node, ever: the classic semantics. A marker is written only after success.
    #[default]
    Once,
    /// Once per boot (keyed by the kernel's boot id).
    Boot,
    /// Every run of the agent.
    Always,
}

impl Frequency {
    pub fn as_str(self) -> &'static str {
        match self {
            Frequency::Once => "once",
            Frequency::Boot => "boot",
            Frequency::Always => "always",
        }
    }
}

impl fmt::Display for Frequency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Frequency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "once" => Ok(Frequency::Once),
            "boot" => Ok(Frequency::Boot),
            "always" => Ok(Frequency::Always),
            other => Err(format!(
                "unknown frequency {other:?} (expected once, boot or always)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scriptlet<'a> {
    pub id: ScriptletId,
    pub frequency: Frequency,
    pub body: &'a [u8],
}

/// A signed `param NAME VALUE` line: settings scriptlets receive as `IDHAL_PARAM_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    pub name: ParamName,
    pub value: &'a str,
}

/// A manifest borrowing its scriptlet bodies from the downloaded buffer (no copies: the agent's
/// memory budget is tight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest<'a> {
    pub serial: u64,
    pub expires: u64,
    pub params: Vec<Param<'a>>,
    pub scriptlets: Vec<Scriptlet<'a>>,
}

/// Parses a decimal u64 with no sign, no leading zero and no padding.
pub(crate) fn canonical_u64(s: &str) -> Option<u64> {
    let n: u64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// A `param` value: printable ASCII (space allowed inside, not at the ends).
fn valid_param_value(v: &str) -> bool {
    !v.is_empty()
        && v.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !v.starts_with(' ')
        && !v.ends_with(' ')
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> FormatError {
        FormatError::Line {
            line: self.line,
            what: what.into(),
        }
    }

    /// The next `\n`-terminated line as UTF-8 without its newline.
    fn line(&mut self) -> Result<&'a str, FormatError> {
        let rest = &self.buf[self.pos..];
        let window = &rest[..rest.len().min(MAX_LINE + 1)];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            return Err(if rest.len() > MAX_LINE {
                self.err("line too long")
            } else {
                FormatError::Truncated("missing newline")
            });
        };
        self.pos += end + 1;
        self.line += 1;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| self.err("not UTF-8"))?;
        if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(self.err("control character in header line"));
        }
        Ok(text)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(FormatError::Truncated(
                "scriptlet body shorter than its length",
            ));
        }
        self.pos += n;
        let body = &rest[..n];
        self.line += body.iter().filter(|&&b| b == b'\n').count();
        Ok(body)
    }
}

impl<'a> Manifest<'a> {
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .iter()
            .find(|p| p.name.as_str() == name)
            .map(|p| p.value)
    }

    /// Parses format v1. Every rule here is in docs/manifest.md.
    pub fn parse(buf: &'a [u8]) -> Result<Self, FormatError> {
        let mut c = Cursor {
            buf,
            pos: 0,
            line: 0,
        };
        if c.line()? != FORMAT_LINE {
            return Err(c.err(format!("expected {FORMAT_LINE:?}")));
        }
        // The header has one order, the encoder's: serial on line 2, expires on line 3. A
        // parser that took them in any order would let two byte strings mean one manifest.
        let mut number = |keyword: &str| -> Result<u64, FormatError> {
            let line = c.line()?;
            match line.split_once(' ') {
                Some((k, rest)) if k == keyword => {
                    canonical_u64(rest).ok_or_else(|| c.err(format!("{keyword} is not a number")))
                }
                _ => Err(c.err(format!("expected \"{keyword} N\""))),
            }
        };
        let serial = number("serial")?;
        let expires = number("expires")?;
        let mut params: Vec<Param<'a>> = Vec::new();
        let mut scriptlets: Vec<Scriptlet<'a>> = Vec::new();
        loop {
            let line = c.line()?;
            let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
            match keyword {
                "serial" | "expires" => return Err(c.err(format!("duplicate {keyword}"))),
                "param" => {
                    if !scriptlets.is_empty() {
                        return Err(c.err("param after the first scriptlet"));
                    }
                    let (name, value) = rest
                        .split_once(' ')
                        .ok_or_else(|| c.err("param needs a name and a value"))?;
                    let name: ParamName = name.parse().map_err(|e| c.err(format!("{e}")))?;
                    if !valid_param_value(value) {
                        return Err(c.err(format!("param {name} has an invalid value")));
                    }
                    if params.iter().any(|p| p.name == name) {
                        return Err(c.err(format!("duplicate param {name}")));
                    }
                    params.push(Param { name, value });
                }
                "scriptlet" => {
                    let mut words = rest.split(' ');
                    let (Some(id), Some(freq), Some(len), None) =
                        (words.next(), words.next(), words.next(), words.next())
                    else {
                        return Err(c.err("expected: scriptlet ID FREQUENCY LENGTH"));
                    };
                    let id: ScriptletId = id.parse().map_err(|e| c.err(format!("{e}")))?;
                    let frequency: Frequency = freq.parse().map_err(|e: String| c.err(e))?;
                    let len = canonical_u64(len)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| c.err("scriptlet length is not a number"))?;
                    if scriptlets.iter().any(|s| s.id == id) {
                        return Err(c.err(format!("duplicate scriptlet {id}")));
                    }
                    let body = c.take(len)?;
                    if c.take(1)? != b"\n" {
                        return Err(c.err(format!("scriptlet {id}: no newline after the body")));
                    }
                    scriptlets.push(Scriptlet {
                        id,
                        frequency,
                        body,
                    });
                }
                "end" if line == "end" => {
                    if c.pos != buf.len() {
                        return Err(c.err("data after end"));
                    }
                    break;
                }
                "end" => return Err(c.err("expected \"end\" alone on its line")),
                _ => return Err(c.err(format!("unknown keyword {keyword:?}"))),
            }
        }
        Ok(Manifest {
            serial,
            expires,
            params,
            scriptlets,
        })
    }

    /// The canonical encoding; `parse(encode(m)) == m`.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.scriptlets.iter().map(|s| s.body.len() + 96).sum();
        let mut out = Vec::with_capacity(size + 128);
        let mut line = |s: String| {
            out.extend_from_slice(s.as_bytes());
            out.push(b'\n');
        };
        line(FORMAT_LINE.to_owned());
        line(format!("serial {}", self.serial));
        line(format!("expires {}", self.expires));
        for p in &self.params {
            line(format!("param {} {}", p.name, p.value));
        }
        for s in &self.scriptlets {
            out.extend_from_slice(
                format!("scriptlet {} {} {}\n", s.id, s.frequency, s.body.len()).as_bytes(),
            );
            out.extend_from_slice(s.body);
            out.push(b'\n');
        }
        out.extend_from_slice(b"end\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        Manifest {
            serial: 7,
            expires: 1_800_000_000,
            params: vec![Param {
                name: "enroll-url".parse().unwrap(),
                value: "http://10.0.2.100:8080/enroll",
            }],
            scriptlets: vec![
                Scriptlet {
                    id: "000-setup".parse().unwrap(),
                    frequency: Frequency::Once,
                    body: b"#!/bin/sh\necho hi\nscriptlet evil once 3\n",
                },
                Scriptlet {
                    id: "010-boot".parse().unwrap(),
                    frequency: Frequency::Boot,
                    body: b"",
                },
            ],
        }
        .encode()
    }

    #[test]
    fn roundtrip() {
        let buf = sample();
        let m = Manifest::parse(&buf).unwrap();
        assert_eq!(m.serial, 7);
        assert_eq!(m.param("enroll-url"), Some("http://10.0.2.100:8080/enroll"));
        assert_eq!(m.scriptlets.len(), 2);
        assert_eq!(
            m.scriptlets[0].body,
            b"#!/bin/sh\necho hi\nscriptlet evil once 3\n"
        );
        assert_eq!(m.encode(), buf);
    }

    #[test]
    fn every_truncation_is_refused() {
        let buf = sample();
        for n in 0..buf.len() {
            let r = Manifest::parse(&buf[..n]);
            assert!(
                matches!(r, Err(FormatError::Line { .. } | FormatError::Truncated(_))),
                "prefix {n}: {r:?}"
            );
        }
    }

    fn parse_err(text: &str) -> String {
        Manifest::parse(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn strictness() {
        let head = "idhal-manifest 1\nserial 1\nexpires 2\n";
        assert_eq!(
            parse_err("idhal-manifest 2\n"),
            "line 1: expected \"idhal-manifest 1\""
        );
        assert!(parse_err(&format!("{head}serial 3\nend\n")).contains("duplicate serial"));
        assert!(parse_err("idhal-manifest 1\nserial 01\n").contains("not a number"));
        assert!(parse_err(&format!("{head}scriptlet ../x once 0\n\nend\n")).contains("invalid"));
        assert!(parse_err(&format!("{head}scriptlet a weekly 0\n\nend\n")).contains("frequency"));
        assert!(parse_err(&format!("{head}scriptlet a once 1\nxyend\n")).contains("no newline"));
        assert!(parse_err(&format!(
            "{head}scriptlet a once 0\n\nscriptlet a once 0\n\nend\n"
        ))
        .contains("duplicate scriptlet a"));
        assert!(parse_err(&format!("{head}end\nmore")).contains("data after end"));
        assert!(parse_err(&format!("{head}bogus 1\nend\n")).contains("unknown keyword"));
        assert!(parse_err(&format!("{head}param x a\tb\nend\n")).contains("control"));
        assert!(parse_err(&format!("{head}param x a\nparam x b\nend\n")).contains("duplicate"));
        assert_eq!(
            parse_err("idhal-manifest 1\nserial 1\nend\n"),
            "line 3: expected \"expires N\""
        );
        // "end " split at its space has an empty rest: the line itself must be "end" (fuzzer).
        assert_eq!(
            parse_err(&format!("{head}end \n")),
            "line 4: expected \"end\" alone on its line"
        );
        // One order only (found by the fuzzer: params before expires parsed, encoded otherwise).
        assert_eq!(
            parse_err("idhal-manifest 1\nexpires 2\nserial 1\nend\n"),
            "line 2: expected \"serial N\""
        );
        assert_eq!(
            parse_err("idhal-manifest 1\nserial 1\nparam e x\nexpires 2\nend\n"),
            "line 3: expected \"expires N\""
        );
        assert_eq!(
            parse_err(&format!("{head}param e x\nexpires 3\nend\n")),
            "line 5: duplicate expires"
        );
        assert!(parse_err(&format!("{head}scriptlet a once 99999999999\n")).contains("shorter"));
        assert!(parse_err(&format!("{}\n", "x".repeat(5000))).contains("too long"));
    }
}
