//! `idhal-bootstrap enroll`, top to bottom: trust chain → token → node key → request → verify
//! the answer → record. Owns `enroll.lock` and `enroll/` in the state directory.
//!
//! The node's key never leaves it, the token's secret never crosses the network, and nothing is
//! written unless the answer is signed by the enrollment key the signed manifest names and
//! answers this very request (docs/enrollment.md).

use crate::config::{Config, Proc};
use crate::error::AgentError;
use crate::fetch::Fetcher;
use crate::log;
use crate::random::fill_random;
use crate::state::{write_atomic, StateDir};
use crate::trust::{self, Refusals};
use idhal_manifest::der;
use idhal_manifest::enroll::{self, KeyPair, Request, Response, Seed, Token};
use std::fs;
use std::io::{Error, ErrorKind};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The enrollment's directory under the state directory; `openvpn --cd` runs in it.
pub const DIR: &str = "enroll";
/// Written last: its presence means "enrolled".
pub const NODE_ID: &str = "node-id";
pub const ADDRESS: &str = "address";
pub const NODE_KEY: &str = "node.key";
/// Replaced by `renew`.
pub const NODE_CRT: &str = "node.crt";
/// Not the run's `lock`: the run that started the scriptlet calling us holds that one.
pub const LOCK: &str = "enroll.lock";
/// Where QEMU's fw_cfg appears in sysfs; the token is the `opt/idhal/token` item.
pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg";
const FW_CFG_TOKEN: &str = "by_name/opt/idhal/token/raw";
/// The subject the CSR asks for; the CA ignores it and sets CN to the node id.
const CSR_CN: &str = "idhal-node";
/// How the server refuses a token or a request (bad signature, unknown, used up, expired,
/// clock skew; `renew`: bad signature, unknown or revoked node, expired certificate, clock
/// skew): exit 5, never retried. Any other failed exchange is a fetch failure (exit 4).
pub const REFUSALS: [u16; 5] = [401, 403, 409, 410, 422];
static REFUSED: Refusals = Refusals {
    cmd: "enroll",
    statuses: &REFUSALS,
    error: AgentError::EnrollRefused,
    suffix: "",
};
/// `find_token`'s name for a token from `idhal.token=` (readable by every local user).
const CMDLINE: &str = "kernel command line idhal.token=";

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    /// `--token-file`: the first token source, and when given, the only one.
    pub token_file: Option<PathBuf>,
    /// `--fw-cfg`: the sysfs root of QEMU's fw_cfg.
    pub fw_cfg: PathBuf,
}

/// This node's enrollment, if it is done: (node id, address).
pub fn enrolled(state: &StateDir) -> Result<Option<(String, String)>, AgentError> {
    let dir = state.path(DIR);
    let Some(node) = state.read(&dir.join(NODE_ID))? else {
        return Ok(None);
    };
    let address = state.read(&dir.join(ADDRESS))?.unwrap_or_default();
    Ok(Some((node.trim().to_owned(), address.trim().to_owned())))
}

// Not inlined into main: at opt-level z that grew the agent by 2 KiB (scripts/agent-size.sh).
#[inline(never)]
pub fn enroll(cfg: &Config, proc: &Proc, args: &Args) -> Result<(), AgentError> {
    let state = StateDir::new(&cfg.state_dir);
    if !state.root.is_dir() {
        return Err(trust::no_manifest(cfg, "enroll"));
    }
    let _lock = state.lock(LOCK)?;
    if let Some((node, address)) = enrolled(&state)? {
        log(&format!("already enrolled as {node} ({address})"));
        return Ok(());
    }

    // The enrollment key comes only from the manifest `run` accepted, verified again here.
    let (enroll_key, url) =
        trust::exchange(cfg, &state, "enroll", enroll::URL_PARAM, enroll::PATH)?;
    let fetcher = Fetcher {
        base: url,
        limits: cfg.limits.clone(),
        tls: cfg.tls()?,
    };

    let (token, source) = find_token(args.token_file.as_deref(), &proc.cmdline(), &args.fw_cfg)?;
    let dir = state.path(DIR);
    fs::create_dir_all(&dir)
        .and_then(|_| fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)))
        .map_err(|e| AgentError::state(&dir, e))?;
    let kp = node_key(&dir.join(NODE_KEY))?;

    // The kernel command line is readable by every local user, and a token's text does not
    // say how many uses it has: warn for every token found there.
    let warning = if source == CMDLINE {
        "; WARNING: every local user can read the kernel command line: put only 1-use tokens \
         there (uses are unknown here), else use fw_cfg or --token-file"
    } else {
        ""
    };
    log(&format!(
        "enrolling at {} with token {} ({source}){warning}",
        fetcher.base, token.id
    ));
    let csr = der::ed25519_csr(&kp, CSR_CN);
    // Each attempt is a new request (fresh time, next nonce); the server answers the same node
    // for the same key.
    let (body, digest) = trust::post(
        &fetcher,
        enroll::CONTENT_TYPE,
        enroll::MAX_RESPONSE,
        &REFUSED,
        &mut |time, nonce| {
            Request {
                token: token.id,
                time,
                nonce,
                csr: csr.clone(),
            }
            .sign(&token)
        },
    )?;
    let r = Response::verify(&body, &enroll_key, &digest)
        .map_err(|e| AgentError::EnrollRefused(format!("enrollment response: {e}")))?;

    // node-id last: a crash before it leaves the node "not enrolled", and the next call asks
    // again with the same key (the server answers the same node without spending a use).
    for (name, text, mode) in [
        (NODE_CRT, r.certificate, 0o644),
        ("ca.crt", r.ca, 0o644),
        ("openvpn.conf", r.openvpn, 0o600),
        (ADDRESS, format!("{}\n", r.address), 0o644),
        (NODE_ID, format!("{}\n", r.node), 0o644),
    ] {
        write_atomic(&dir.join(name), text.as_bytes(), mode)?;
    }
    log(&format!(
        "enrolled as {}, address {} (project {})",
        r.node, r.address, r.project
    ));
    Ok(())
}

/// The token, first found wins: `--token-file`, the kernel command line's `idhal.token=`
/// (the last one), QEMU fw_cfg. Returns where it came from, for the log; never logs the secret.
pub fn find_token(
    file: Option<&Path>,
    cmdline: &str,
    fw_cfg: &Path,
) -> Result<(Token, String), AgentError> {
    let parse = |text: &str, source: String| match text.parse::<Token>() {
        Ok(t) => Ok((t, source)),
        Err(e) => Err(AgentError::Config(format!("{source}: {e}"))),
    };
    if let Some(f) = file {
        let source = format!("--token-file {}", f.display());
        let text =
            fs::read_to_string(f).map_err(|e| AgentError::Config(format!("{source}: {e}")))?;
        return parse(&text, source);
    }
    let on_cmdline = cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("idhal.token="))
        .next_back();
    if let Some(t) = on_cmdline {
        return parse(t, CMDLINE.into());
    }
    let raw = fw_cfg.join(FW_CFG_TOKEN);
    match fs::read_to_string(&raw) {
        Ok(text) => parse(&text, format!("fw_cfg {}", raw.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(AgentError::Config(format!(
            "no enrollment token: give --token-file FILE, idhal.token= on the kernel command \
             line, or QEMU -fw_cfg name=opt/idhal/token,file=FILE (read at {})",
            raw.display()
        ))),
        Err(e) => Err(AgentError::Config(format!("fw_cfg {}: {e}", raw.display()))),
    }
}

/// The node's key: the one at `path`, or a new one written there durably before it is used,
/// so that a retry after a crash asks for the same key (and spends no second use of the token).
fn node_key(path: &Path) -> Result<KeyPair, AgentError> {
    if let Some(kp) = read_node_key(path)? {
        return Ok(kp);
    }
    let mut seed = [0u8; 32];
    fill_random(&mut seed)?;
    write_atomic(path, enroll::node_key_pem(&seed).as_bytes(), 0o600)?;
    key_pair(path, seed)
}

/// The node's key at `path` (`None` if there is none), refused unless it is exactly what
/// `node_key` writes: `peers` and `renew` sign with it, and nothing ever replaces it.
// Not inlined: enroll, peers and renew share one copy (the agent's size is budgeted).
#[inline(never)]
pub fn read_node_key(path: &Path) -> Result<Option<KeyPair>, AgentError> {
    match fs::read_to_string(path) {
        Ok(text) => match seed_from_pem(&text) {
            Some(seed) => key_pair(path, seed).map(Some),
            None => Err(bad_key(
                path,
                "not an Ed25519 PKCS#8 key as idhal-bootstrap writes it; refusing to replace it",
            )),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::state(path, e)),
    }
}

fn key_pair(path: &Path, seed: [u8; 32]) -> Result<KeyPair, AgentError> {
    KeyPair::try_from_seed(Seed::new(seed)).map_err(|_| bad_key(path, "not a usable Ed25519 seed"))
}

fn bad_key(path: &Path, why: &str) -> AgentError {
    AgentError::state(path, Error::new(ErrorKind::InvalidData, why))
}

/// The seed of a key file of exactly the shape `enroll::node_key_pem` writes, proven by encoding
/// the seed again and comparing, so any other key, layout or stray byte is refused.
fn seed_from_pem(text: &str) -> Option<[u8; 32]> {
    let seed = der::ed25519_seed_from_pkcs8(&der::pem_decode("PRIVATE KEY", text)?)?;
    (enroll::node_key_pem(&seed) == text).then_some(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "0001020304050607.CAkKCwwNDg8QERITFBUWFxgZGhscHR4fICEiIyQlJic";
    const TOKEN_B: &str = "1011121314151617.CAkKCwwNDg8QERITFBUWFxgZGhscHR4fICEiIyQlJic";
    const TOKEN_C: &str = "2021222324252627.CAkKCwwNDg8QERITFBUWFxgZGhscHR4fICEiIyQlJic";

    fn id(r: Result<(Token, String), AgentError>) -> String {
        r.unwrap().0.id.to_string()
    }

    #[test]
    fn token_sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        fs::write(&file, format!("{TOKEN_A}\n")).unwrap();
        let fw = dir.path().join("fw_cfg");
        let raw = fw.join(FW_CFG_TOKEN);
        fs::create_dir_all(raw.parent().unwrap()).unwrap();
        fs::write(&raw, TOKEN_C).unwrap();
        let proc_root = dir.path().join("proc");
        fs::create_dir_all(&proc_root).unwrap();
        fs::write(
            proc_root.join("cmdline"),
            format!("ro idhal.server=http://x/ idhal.token={TOKEN_B} quiet\n"),
        )
        .unwrap();
        let cmdline = Proc { root: &proc_root }.cmdline();

        assert_eq!(
            id(find_token(Some(&file), &cmdline, &fw)),
            "0001020304050607"
        );
        assert_eq!(id(find_token(None, &cmdline, &fw)), "1011121314151617");
        // As for every kernel parameter, the last one wins.
        let twice = format!("idhal.token={TOKEN_A} {cmdline}");
        assert_eq!(id(find_token(None, &twice, &fw)), "1011121314151617");
        let (t, source) = find_token(None, "ro quiet", &fw).unwrap();
        assert_eq!(t.id.to_string(), "2021222324252627");
        assert!(source.starts_with("fw_cfg ") && source.ends_with("/token/raw"));

        // A given file is the only source: unreadable is an error, not a fallback.
        let missing = dir.path().join("nope");
        let e = find_token(Some(&missing), &cmdline, &fw).unwrap_err();
        assert!(matches!(e, AgentError::Config(_)), "{e}");

        let none = find_token(None, "ro", &dir.path().join("no-fw")).unwrap_err();
        let msg = none.to_string();
        for source in ["--token-file", "idhal.token=", "opt/idhal/token"] {
            assert!(msg.contains(source), "{msg}");
        }

        // A malformed token names its source and never echoes what it read.
        let secretish = "0001020304050607.notbase64!!";
        let e = find_token(None, &format!("idhal.token={secretish}"), &fw)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kernel command line") && !e.contains("notbase64"),
            "{e}"
        );
    }

    #[test]
    fn node_key_is_made_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_KEY);
        let first = node_key(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = node_key(&path).unwrap();
        assert_eq!(first.pk, again.pk);
        let mut seeds = vec![[0u8; 32], [0xff; 32], [7; 32]];
        seeds.push(std::array::from_fn(|i| (i * 37 + 11) as u8));
        for seed in seeds {
            let pem = enroll::node_key_pem(&seed);
            assert_eq!(seed_from_pem(&pem), Some(seed));
            // Anything but that exact text is refused: CRLF, no final newline, padding.
            assert_eq!(seed_from_pem(&pem.replace('\n', "\r\n")), None);
            assert_eq!(seed_from_pem(pem.trim_end()), None);
            assert_eq!(seed_from_pem(&format!("{pem}\n")), None);
            // The PEM reader is lenient; the exact comparison is not: text around the block,
            // or the same base64 wrapped at another width, is not the file the agent wrote.
            assert_eq!(seed_from_pem(&format!("junk\n{pem}")), None);
            assert_eq!(seed_from_pem(&format!("{pem}junk\n")), None);
            let rewrapped = pem.replacen("\n", "\n ", 2);
            assert_eq!(
                der::pem_decode("PRIVATE KEY", &rewrapped),
                der::pem_decode("PRIVATE KEY", &pem)
            );
            assert_eq!(seed_from_pem(&rewrapped), None);
        }

        // Another algorithm's key of the same length (an X25519 PKCS#8: OID 1.3.101.110).
        let mut x25519 = der::ed25519_pkcs8(&[7; 32]);
        x25519[11] = 0x6e;
        for other in [
            String::new(),
            "garbage".into(),
            der::pem("PRIVATE KEY", &[0x30, 0x00]),
            der::pem("PRIVATE KEY", &x25519),
            der::pem("CERTIFICATE", &der::ed25519_pkcs8(&[7; 32])),
        ] {
            fs::write(&path, &other).unwrap();
            assert!(
                matches!(node_key(&path), Err(AgentError::State { .. })),
                "{other:?}"
            );
            assert_eq!(fs::read_to_string(&path).unwrap(), other, "replaced");
        }
    }
}
