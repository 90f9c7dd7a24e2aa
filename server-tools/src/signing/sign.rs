//! Signing: turns a directory of `*.sh` scriptlets into a signed manifest and publishes it
//! into PUBDIR atomically, in the order agents rely on (versioned pair first, `manifest.minisig` last).

use crate::publish::{self, DirLock, PublishError};
use crate::signing::keys::{KeyError, PassphraseSource, SigningKey, ENV_SIGNING_KEY};
use crate::signing::rotate::{self, RotateError, SignRefusal};
use idhal_manifest::time::now;
use idhal_manifest::{
    paths, verify, Expiry, Frequency, IdError, KeyId, Manifest, Param, ParamName, Policy,
    PublicKey, Scriptlet, ScriptletId, SignatureFile, TrustedMeta, VerifyError,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why nothing was signed or published: one line naming the file, option or serial at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SignError {
    #[error("cannot {doing} {}", path.display())]
    Io {
        /// `read`, `stat`, `create`, `read scriptlet dir`, `read key file`.
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: unknown idhal header {text:?} (expected `# idhal: frequency=once|boot|always`)", file.display())]
    UnknownHeader {
        file: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{}:{line}: {why}", file.display())]
    BadFrequency {
        file: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{}:{line}: second, different frequency header", file.display())]
    SecondFrequency { file: PathBuf, line: usize },
    #[error("{}: with it the scriptlets are over the {cap}-byte cap (--max-size; agents refuse anything over theirs, default 4 MiB); nothing was signed", path.display())]
    OverCap { path: PathBuf, cap: u64 },
    #[error("{}: file name is not UTF-8; rename it (scriptlet ids are ASCII)", .0.display())]
    NameNotUtf8(PathBuf),
    #[error("{} is a symbolic link; scriptlets must be regular files (a link could publish any file the signer can read). Copy the target in instead; nothing was signed", .0.display())]
    Symlink(PathBuf),
    #[error("{}: file name does not make a valid scriptlet id; nothing was signed", path.display())]
    ScriptletName {
        path: PathBuf,
        #[source]
        source: IdError,
    },
    #[error("--param {0:?}: expected NAME=VALUE")]
    ParamSyntax(String),
    #[error("--param {raw:?}")]
    ParamName {
        raw: String,
        #[source]
        source: IdError,
    },
    #[error("--param {0} given twice")]
    ParamTwice(ParamName),
    #[error("--param {name}: invalid value {value:?} (printable ASCII, not empty, no leading or trailing space)")]
    ParamValue { name: ParamName, value: String },
    #[error("{} is not a valid signature", .0.display())]
    SignatureFile(PathBuf, #[source] VerifyError),
    #[error("{}", .0.display())]
    TrustedComment(PathBuf, #[source] VerifyError),
    #[error("{} is signed by key {signed_by}, but you are signing with key {ours}, and no rotation published in keys/ leads from one to the other: nodes pinned to {signed_by} would refuse this manifest. Use the right key, or rotate first with `idhal key rotate --from OLD.key --to NEW.key --out PUBDIR`", path.display())]
    OtherKey {
        path: PathBuf,
        signed_by: KeyId,
        ours: KeyId,
    },
    #[error("{}'s key rotations end at key {last} (rotation {sequence}): sign with that key, not {ours} (nodes that followed the chain refuse any other, and a replaced key may have leaked)", pubdir.display())]
    NotChainEnd {
        ours: KeyId,
        last: KeyId,
        sequence: u64,
        pubdir: PathBuf,
    },
    #[error("the current {} does not verify with this key ({}); refusing to publish over a directory that may have been tampered with. Inspect it with `idhal verify`", signature.display(), manifest.display())]
    CurrentRefused {
        signature: PathBuf,
        manifest: PathBuf,
        #[source]
        source: VerifyError,
    },
    #[error("no signing key: pass --key FILE, or set {ENV_SIGNING_KEY} to the key file's text")]
    NoKey,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("the manifest would be {size} bytes, over the {cap}-byte cap (--max-size; agents refuse anything over theirs, default 4 MiB). Largest scriptlets: {largest}")]
    TooLarge {
        size: usize,
        cap: usize,
        largest: String,
    },
    #[error("--serial {requested} is not above the serial {current} already in {}: nodes that accepted {current} refuse any lower serial as a rollback, and a serial is never reused. Omit --serial (next is {}) or pass a higher one", pubdir.display(), current.saturating_add(1))]
    SerialNotAbove {
        requested: u64,
        current: u64,
        pubdir: PathBuf,
    },
    #[error("the current serial is at the maximum")]
    SerialAtMax,
    #[error("--expires is too far in the future")]
    ExpiresTooFar,
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("internal error: the new signature does not verify; nothing was published")]
    SelfCheck(#[source] VerifyError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Rotation(#[from] RotateError),
}

/// `SignError::Io` for `doing` on `path`.
fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SignError + 'a {
    move |source| SignError::Io {
        doing,
        path: path.to_owned(),
        source,
    }
}

/// Sizes and counts for signing, with their defaults in one place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest encoded manifest; matches the agent's default download cap (4 MiB), so a manifest
    /// that signs also downloads.
    pub(crate) max_manifest: usize,
    /// Versioned manifests kept in PUBDIR/manifests (the newest, including the one just signed).
    pub(crate) keep_versions: usize,
    /// How far into a scriptlet the `# idhal: frequency=` header is looked for.
    pub(crate) header_lines: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest: idhal_manifest::MAX_MANIFEST,
            keep_versions: 10,
            header_lines: 10,
        }
    }
}

/// The lock file every `idhal sign` into a PUBDIR takes (hidden: `idhal serve` never serves it).
pub(crate) const LOCK_FILE: &str = ".idhal-sign.lock";
const PUBLISHED_MODE: u32 = 0o644;

/// One scriptlet file, read and checked.
#[derive(Debug)]
pub(crate) struct SourceFile {
    pub(crate) id: ScriptletId,
    pub(crate) frequency: Frequency,
    pub(crate) body: Vec<u8>,
}

/// Reads the `# idhal: frequency=...` header from the first `max_lines` lines, if any.
fn frequency_header(
    body: &[u8],
    max_lines: usize,
    file: &Path,
) -> Result<Option<Frequency>, SignError> {
    let mut found: Option<Frequency> = None;
    for (n, line) in body.split(|&b| b == b'\n').take(max_lines).enumerate() {
        let line = String::from_utf8_lossy(line);
        let Some(rest) = line.trim().strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("idhal:") else {
            continue;
        };
        let Some(value) = rest.trim().strip_prefix("frequency=") else {
            return Err(SignError::UnknownHeader {
                file: file.to_owned(),
                line: n + 1,
                text: line.trim().to_owned(),
            });
        };
        let freq: Frequency =
            value
                .trim()
                .parse()
                .map_err(|why: String| SignError::BadFrequency {
                    file: file.to_owned(),
                    line: n + 1,
                    why,
                })?;
        if found.is_some_and(|f| f != freq) {
            return Err(SignError::SecondFrequency {
                file: file.to_owned(),
                line: n + 1,
            });
        }
        found = Some(freq);
    }
    Ok(found)
}

/// Reads a scriptlet, refusing it as soon as the scriptlets read so far (`before` bytes) and this
/// one exceed the manifest cap, so a huge or endless file is never read whole.
fn read_capped(path: &Path, before: u64, cap: u64) -> Result<Vec<u8>, SignError> {
    use std::io::Read;
    let room = cap.saturating_sub(before);
    let file = fs::File::open(path).map_err(io("read", path))?;
    let mut body = Vec::new();
    file.take(room + 1)
        .read_to_end(&mut body)
        .map_err(io("read", path))?;
    if body.len() as u64 > room {
        return Err(SignError::OverCap {
            path: path.to_owned(),
            cap,
        });
    }
    Ok(body)
}

/// Every `*.sh` regular file in `dir`, in file-name order. Warnings go to stderr.
pub(crate) fn collect_scriptlets(
    dir: &Path,
    limits: &Limits,
) -> Result<Vec<SourceFile>, SignError> {
    let entries = fs::read_dir(dir).map_err(io("read scriptlet dir", dir))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("read", dir))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(SignError::NameNotUtf8(path));
        };
        if name.starts_with('.') {
            continue;
        }
        let meta = fs::symlink_metadata(&path).map_err(io("stat", &path))?;
        // A link could point at any file the signer can read (its own key, say) and publish it
        // to every node and every HTTP client: scriptlets must be the files themselves.
        if name.ends_with(".sh") && meta.file_type().is_symlink() {
            return Err(SignError::Symlink(path));
        }
        if !name.ends_with(".sh") || !meta.is_file() {
            eprintln!(
                "idhal: warning: ignoring {}: not a *.sh regular file",
                path.display()
            );
            continue;
        }
        files.push((name, path));
    }
    files.sort();
    let mut out = Vec::with_capacity(files.len());
    let mut total: u64 = 0;
    for (name, path) in files {
        let stem = &name[..name.len() - ".sh".len()];
        let id: ScriptletId = stem.parse().map_err(|source| SignError::ScriptletName {
            path: path.clone(),
            source,
        })?;
        let body = read_capped(&path, total, limits.max_manifest as u64)?;
        total += body.len() as u64;
        let frequency = frequency_header(&body, limits.header_lines, &path)?.unwrap_or_default();
        out.push(SourceFile {
            id,
            frequency,
            body,
        });
    }
    Ok(out)
}

/// Parses `--param NAME=VALUE`, checking the value against the manifest format itself.
fn parse_params(raw: &[String]) -> Result<Vec<(ParamName, String)>, SignError> {
    let mut out: Vec<(ParamName, String)> = Vec::new();
    for p in raw {
        let (name, value) = p
            .split_once('=')
            .ok_or_else(|| SignError::ParamSyntax(p.clone()))?;
        let name: ParamName = name.parse().map_err(|source| SignError::ParamName {
            raw: p.clone(),
            source,
        })?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(SignError::ParamTwice(name));
        }
        // Let the format's own parser judge the value, so the signer cannot drift from it.
        let probe = Manifest {
            serial: 1,
            expires: 1,
            params: vec![Param {
                name: name.clone(),
                value,
            }],
            scriptlets: vec![],
        }
        .encode();
        if Manifest::parse(&probe).is_err() {
            return Err(SignError::ParamValue {
                name,
                value: value.to_owned(),
            });
        }
        out.push((name, value.to_owned()));
    }
    Ok(out)
}

/// What PUBDIR holds now, after checking its signature with our key.
#[derive(Debug, Default)]
struct Current {
    /// Serial of the verified `manifest.minisig`.
    signed: Option<u64>,
    /// Highest serial in manifests/ (a publish that died before `manifest.minisig` leaves one).
    highest_version: Option<u64>,
}

impl Current {
    fn floor(&self) -> Option<u64> {
        self.signed.max(self.highest_version)
    }
}

/// Serials present in PUBDIR/manifests, from names `<serial>` and `<serial>.minisig`.
fn version_serials(versions: &Path) -> Result<Vec<u64>, SignError> {
    let mut serials = Vec::new();
    let entries = match fs::read_dir(versions) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serials),
        Err(e) => return Err(io("read", versions)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io("read", versions))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stem = name.strip_suffix(".minisig").unwrap_or(&name);
        if let Ok(n) = stem.parse::<u64>() {
            if n.to_string() == stem && !serials.contains(&n) {
                serials.push(n);
            }
        }
    }
    serials.sort_unstable();
    Ok(serials)
}

fn read_current(pubdir: &Path, key: &SigningKey) -> Result<Current, SignError> {
    let mut current = Current {
        highest_version: version_serials(&pubdir.join(paths::VERSIONS_DIR))?
            .last()
            .copied(),
        ..Current::default()
    };
    let sig_path = pubdir.join(paths::SIGNATURE);
    let sig_text = match fs::read_to_string(&sig_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
        Err(e) => return Err(io("read", &sig_path)(e)),
    };
    let sig = SignatureFile::parse(&sig_text)
        .map_err(|e| SignError::SignatureFile(sig_path.clone(), e))?;
    // Signed by an older key: fine only if the published rotation chain leads from it to ours
    // (nodes follow that chain); the current manifest is then checked with the old key.
    let other_key = || SignError::OtherKey {
        path: sig_path.clone(),
        signed_by: sig.key_id,
        ours: key.public.id(),
    };
    let signed_by = match rotate::signing_over(pubdir, sig.key_id, &key.public)? {
        None if sig.key_id == key.public.id() => key.public.clone(),
        None | Some(Err(SignRefusal::OutsideChain)) => return Err(other_key()),
        Some(Err(SignRefusal::NotLast { last, sequence })) => {
            return Err(SignError::NotChainEnd {
                ours: key.public.id(),
                last,
                sequence,
                pubdir: pubdir.to_owned(),
            })
        }
        Some(Ok(old)) => old,
    };
    // The versioned copy is immutable and always matches its signature; `manifest` may lag
    // behind `manifest.minisig` if a publish died between the two renames.
    let claimed = TrustedMeta::parse(&sig.trusted_comment)
        .map_err(|e| SignError::TrustedComment(sig_path.clone(), e))?
        .serial;
    let versioned = pubdir.join(paths::versioned_manifest(claimed));
    let manifest_path = if versioned.exists() {
        versioned
    } else {
        pubdir.join(paths::MANIFEST)
    };
    let body = fs::read(&manifest_path).map_err(io("read", &manifest_path))?;
    let policy = Policy {
        now: now(),
        expiry: Expiry::Ignore,
        last_serial: None,
    };
    let m = verify(&signed_by, &body, &sig_text, &policy).map_err(|source| {
        SignError::CurrentRefused {
            signature: sig_path.clone(),
            manifest: manifest_path.clone(),
            source,
        }
    })?;
    current.signed = Some(m.serial);
    Ok(current)
}

/// Removes versions older than the newest `keep`. Returns the removed paths.
fn prune(versions: &Path, keep: usize) -> Result<Vec<PathBuf>, SignError> {
    let serials = version_serials(versions)?;
    let mut removed = Vec::new();
    let drop_count = serials.len().saturating_sub(keep);
    for serial in &serials[..drop_count] {
        let name = serial.to_string();
        for p in [
            versions.join(&name),
            versions.join(format!("{name}.minisig")),
        ] {
            if p.exists() {
                publish::remove_durably(&p)?;
                removed.push(p);
            }
        }
    }
    Ok(removed)
}

pub(crate) fn load_key(
    key: Option<&Path>,
    passphrase_file: Option<&Path>,
) -> Result<SigningKey, SignError> {
    let passphrase = PassphraseSource::resolve(passphrase_file, false);
    let (text, origin) = match key {
        Some(path) => {
            let text = fs::read_to_string(path).map_err(io("read key file", path))?;
            if let Ok(meta) = fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    eprintln!(
                        "idhal: warning: {} is readable by other users; chmod 600 it",
                        path.display()
                    );
                }
            }
            (text, path.display().to_string())
        }
        None => match std::env::var(ENV_SIGNING_KEY) {
            Ok(text) => (text, format!("${ENV_SIGNING_KEY}")),
            Err(_) => return Err(SignError::NoKey),
        },
    };
    Ok(SigningKey::load(&text, &origin, &passphrase)?)
}

fn build<'a>(
    serial: u64,
    expires: u64,
    params: &'a [(ParamName, String)],
    sources: &'a [SourceFile],
) -> Manifest<'a> {
    Manifest {
        serial,
        expires,
        params: params
            .iter()
            .map(|(name, value)| Param {
                name: name.clone(),
                value,
            })
            .collect(),
        scriptlets: sources
            .iter()
            .map(|s| Scriptlet {
                id: s.id.clone(),
                frequency: s.frequency,
                body: &s.body,
            })
            .collect(),
    }
}

fn check_size(size: usize, sources: &[SourceFile], limits: &Limits) -> Result<(), SignError> {
    if size <= limits.max_manifest {
        return Ok(());
    }
    let mut biggest: Vec<&SourceFile> = sources.iter().collect();
    biggest.sort_by_key(|s| std::cmp::Reverse(s.body.len()));
    let top: Vec<String> = biggest
        .iter()
        .take(3)
        .map(|s| format!("{} ({} bytes)", s.id, s.body.len()))
        .collect();
    Err(SignError::TooLarge {
        size,
        cap: limits.max_manifest,
        largest: top.join(", "),
    })
}

/// Takes PUBDIR's signer lock, waiting (and saying so) if another `idhal sign` holds it.
pub(crate) fn lock_pubdir(pubdir: &Path) -> Result<DirLock, PublishError> {
    let lock_path = pubdir.join(LOCK_FILE);
    Ok(match DirLock::try_acquire(&lock_path) {
        Err(PublishError::Locked { .. }) => {
            eprintln!(
                "idhal: waiting for another `idhal sign` to finish ({})",
                lock_path.display()
            );
            DirLock::acquire(&lock_path)?
        }
        other => other?,
    })
}

/// The serial to sign: `requested` if it is above everything PUBDIR holds, else current + 1.
fn next_serial(requested: Option<u64>, current: &Current, pubdir: &Path) -> Result<u64, SignError> {
    Ok(match (requested, current.floor()) {
        (Some(n), Some(cur)) if n <= cur => {
            return Err(SignError::SerialNotAbove {
                requested: n,
                current: cur,
                pubdir: pubdir.to_owned(),
            })
        }
        (Some(n), _) => n,
        (None, Some(cur)) => cur.checked_add(1).ok_or(SignError::SerialAtMax)?,
        (None, None) => 1,
    })
}

/// Signs `bytes` with `meta` as the trusted comment and checks the result exactly as an agent
/// would: nothing an agent would refuse is ever published.
fn sign_manifest(
    key: &SigningKey,
    bytes: &[u8],
    meta: TrustedMeta,
    now: u64,
    last_serial: Option<u64>,
) -> Result<String, SignError> {
    let untrusted = format!(
        "idhal manifest serial {}, signed by key {}",
        meta.serial,
        key.public.id()
    );
    let sig_text = minisign::sign(
        Some(&key.minisign_public),
        &key.secret,
        std::io::Cursor::new(bytes),
        Some(&meta.to_comment()),
        Some(&untrusted),
    )
    .map_err(|e| SignError::Sign(e.to_string()))?
    .into_string();
    let policy = Policy {
        now,
        expiry: Expiry::Enforce,
        last_serial,
    };
    verify(&key.public, bytes, &sig_text, &policy).map_err(SignError::SelfCheck)?;
    Ok(sig_text)
}

/// Writes the publication in the order agents rely on: the key (if changed), the immutable
/// versioned pair, then `manifest`, and `manifest.minisig` last. Returns the paths written.
fn publish_files(
    pubdir: &Path,
    key: &PublicKey,
    serial: u64,
    bytes: &[u8],
    sig_text: &str,
) -> Result<Vec<PathBuf>, SignError> {
    let pub_text = key.to_file_text();
    let pub_path = pubdir.join(paths::PUBLIC_KEY);
    let mut written = Vec::new();
    if fs::read_to_string(&pub_path).ok().as_deref() != Some(pub_text.as_str()) {
        publish::write_atomic(&pub_path, pub_text.as_bytes(), PUBLISHED_MODE)?;
        written.push(pub_path);
    }
    for (rel, data) in [
        (paths::versioned_manifest(serial), bytes),
        (paths::versioned_signature(serial), sig_text.as_bytes()),
        (paths::MANIFEST.to_owned(), bytes),
        (paths::SIGNATURE.to_owned(), sig_text.as_bytes()),
    ] {
        let path = pubdir.join(rel);
        publish::write_atomic(&path, data, PUBLISHED_MODE)?;
        written.push(path);
    }
    Ok(written)
}

/// What to sign, with which key, and where to publish it.
pub struct Request<'a> {
    /// Directory of *.sh scriptlets.
    pub scriptlets: &'a Path,
    /// Publication directory (created if missing).
    pub out: &'a Path,
    /// Secret key file; `None`: the key text in $IDHAL_SIGNING_KEY.
    pub key: Option<&'a Path>,
    pub passphrase_file: Option<&'a Path>,
    /// Serial to sign; `None`: the current one + 1.
    pub serial: Option<u64>,
    /// Seconds the manifest stays valid (more than 0).
    pub lifetime: u64,
    /// `NAME=VALUE` parameters, still unchecked.
    pub params: &'a [String],
    pub limits: Limits,
}

/// What `sign_and_publish` signed and wrote, for the report.
pub struct Published {
    pub serial: u64,
    pub key_id: String,
    pub expires: u64,
    pub params: Vec<(ParamName, String)>,
    pub sources: Vec<SourceFile>,
    pub manifest_len: usize,
    pub written: Vec<PathBuf>,
    pub pruned: Vec<PathBuf>,
}

/// Signs every scriptlet of `req.scriptlets` into one manifest and publishes it into
/// `req.out` under its lock. Everything that can be wrong with the input is found before the
/// key (and its passphrase) is asked for.
pub(crate) fn sign_and_publish(req: &Request) -> Result<Published, SignError> {
    let limits = req.limits;
    let params = parse_params(req.params)?;
    let sources = collect_scriptlets(req.scriptlets, &limits)?;
    if sources.is_empty() {
        eprintln!(
            "idhal: warning: {} holds no *.sh scriptlets; signing an empty manifest",
            req.scriptlets.display()
        );
    }
    // A lower bound of the final size (serial and expiry as one digit each); the exact check
    // follows the final encode.
    check_size(
        build(0, 0, &params, &sources).encode().len(),
        &sources,
        &limits,
    )?;
    let key = load_key(req.key, req.passphrase_file)?;

    let pubdir = req.out;
    let versions = pubdir.join(paths::VERSIONS_DIR);
    fs::create_dir_all(&versions).map_err(io("create", &versions))?;
    let _lock = lock_pubdir(pubdir)?;
    // We hold the lock: temp files are leftovers of a killed signer.
    publish::remove_stale_temp_files(pubdir)?;
    publish::remove_stale_temp_files(&versions)?;

    let current = read_current(pubdir, &key)?;
    let serial = next_serial(req.serial, &current, pubdir)?;
    let signed_at = now();
    let expires = signed_at
        .checked_add(req.lifetime)
        .ok_or(SignError::ExpiresTooFar)?;
    let bytes = build(serial, expires, &params, &sources).encode();
    check_size(bytes.len(), &sources, &limits)?;
    let meta = TrustedMeta { serial, expires };
    let sig_text = sign_manifest(&key, &bytes, meta, signed_at, current.signed)?;
    let written = publish_files(pubdir, &key.public, serial, &bytes, &sig_text)?;
    let pruned = prune(&versions, limits.keep_versions)?;
    Ok(Published {
        serial,
        key_id: key.public.id().to_string(),
        expires,
        params,
        sources,
        manifest_len: bytes.len(),
        written,
        pruned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole refusal, context first, as `idhal sign` prints it.
    fn err<T: std::fmt::Debug>(r: Result<T, SignError>) -> String {
        format!("{:#}", anyhow::Error::new(r.unwrap_err()))
    }

    /// Each refusal of a scriptlet directory is its own variant, naming the file.
    #[test]
    fn scriptlet_dir_refusals() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let limits = Limits {
            max_manifest: 100,
            ..Limits::default()
        };
        match collect_scriptlets(&dir.join("none"), &limits) {
            Err(SignError::Io { doing, path, .. }) => {
                assert_eq!((doing, path), ("read scriptlet dir", dir.join("none")))
            }
            other => panic!("{other:?}"),
        }
        fs::write(dir.join("010-a.sh"), "echo a\n").unwrap();
        fs::write(dir.join("notes.txt"), "skipped").unwrap();
        let got = collect_scriptlets(dir, &limits).unwrap();
        assert_eq!(got.len(), 1);
        std::os::unix::fs::symlink("/etc/hostname", dir.join("020-link.sh")).unwrap();
        match collect_scriptlets(dir, &limits) {
            Err(SignError::Symlink(p)) => assert_eq!(p, dir.join("020-link.sh")),
            other => panic!("{other:?}"),
        }
        fs::remove_file(dir.join("020-link.sh")).unwrap();
        fs::write(dir.join("030-a..b.sh"), "").unwrap();
        match collect_scriptlets(dir, &limits) {
            Err(SignError::ScriptletName { path, source }) => assert_eq!(
                (path, source),
                (
                    dir.join("030-a..b.sh"),
                    IdError::Scriptlet("030-a..b".into())
                )
            ),
            other => panic!("{other:?}"),
        }
        fs::remove_file(dir.join("030-a..b.sh")).unwrap();
        // 7 bytes read, then 94 more: one over the 100-byte cap, refused before reading on.
        fs::write(dir.join("040-big.sh"), "x".repeat(94)).unwrap();
        match collect_scriptlets(dir, &limits) {
            Err(SignError::OverCap { path, cap }) => {
                assert_eq!((path, cap), (dir.join("040-big.sh"), 100))
            }
            other => panic!("{other:?}"),
        }
        fs::write(dir.join("040-big.sh"), "x".repeat(93)).unwrap();
        assert_eq!(collect_scriptlets(dir, &limits).unwrap().len(), 2);
    }

    #[test]
    fn serials() {
        let dir = Path::new("/pub");
        let cur = |signed, highest_version| Current {
            signed,
            highest_version,
        };
        assert_eq!(next_serial(None, &cur(None, None), dir).unwrap(), 1);
        assert_eq!(next_serial(None, &cur(Some(4), None), dir).unwrap(), 5);
        // A publish that died after writing manifests/7 but before manifest.minisig.
        assert_eq!(next_serial(None, &cur(Some(6), Some(7)), dir).unwrap(), 8);
        assert_eq!(
            next_serial(Some(9), &cur(Some(6), Some(7)), dir).unwrap(),
            9
        );
        assert_eq!(
            err(next_serial(Some(7), &cur(Some(6), Some(7)), dir)),
            "--serial 7 is not above the serial 7 already in /pub: nodes that accepted 7 refuse any \
             lower serial as a rollback, and a serial is never reused. Omit --serial (next is 8) or \
             pass a higher one"
        );
        assert_eq!(
            err(next_serial(None, &cur(Some(u64::MAX), None), dir)),
            "the current serial is at the maximum"
        );
    }

    #[test]
    fn frequency_headers() {
        let f = |body: &str| frequency_header(body.as_bytes(), 10, Path::new("x.sh"));
        assert_eq!(f("#!/bin/sh\necho\n").unwrap(), None);
        assert_eq!(
            f("#!/bin/sh\n# idhal: frequency=boot\n").unwrap(),
            Some(Frequency::Boot)
        );
        assert_eq!(
            f("#!/bin/sh\n#idhal:frequency=always\n").unwrap(),
            Some(Frequency::Always)
        );
        let late = format!("{}# idhal: frequency=boot\n", "\n".repeat(10));
        assert_eq!(f(&late).unwrap(), None);
        assert!(f("# idhal: frequency=weekly\n")
            .unwrap_err()
            .to_string()
            .contains("x.sh:1: unknown frequency \"weekly\""));
        assert_eq!(
            err(f("# idhal: freq=boot\n")),
            "x.sh:1: unknown idhal header \"# idhal: freq=boot\" (expected `# idhal: frequency=once|boot|always`)"
        );
        assert_eq!(
            err(f("# idhal: frequency=boot\n# idhal: frequency=once\n")),
            "x.sh:2: second, different frequency header"
        );
    }

    #[test]
    fn params() {
        let p = parse_params(&["enroll-url=http://x/y z".into()]).unwrap();
        assert_eq!(p[0].1, "http://x/y z");
        let refused = |raw: &[&str]| {
            err(parse_params(
                &raw.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ))
        };
        assert_eq!(
            refused(&["novalue"]),
            "--param \"novalue\": expected NAME=VALUE"
        );
        assert_eq!(
            refused(&["Bad=x"]),
            "--param \"Bad=x\": parameter name \"Bad\" is invalid: use 1-32 characters from a-z 0-9 -, starting with a letter"
        );
        let value = "(printable ASCII, not empty, no leading or trailing space)";
        assert_eq!(
            refused(&["a= x"]),
            format!("--param a: invalid value \" x\" {value}")
        );
        assert_eq!(
            refused(&["a=x\ty"]),
            format!("--param a: invalid value \"x\\ty\" {value}")
        );
        assert_eq!(refused(&["a=1", "a=2"]), "--param a given twice");
    }
}
