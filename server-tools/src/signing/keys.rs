//! The signing key: where its passphrase comes from (file, environment, prompt, or none), loading
//! minisign secret keys (from a file or from CI's environment) and generating new key pairs.

use crate::publish::{self, PublishError};
use idhal_manifest::{paths, PublicKey};
use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The secret key's file name in `idhal keygen --dir`.
pub(crate) const SECRET_KEY_FILE: &str = "idhal.key";

/// Environment variable holding the passphrase (CI secrets).
pub(crate) const ENV_PASSPHRASE: &str = "IDHAL_KEY_PASSPHRASE";
/// Environment variable holding the whole secret key file's text (CI secrets).
pub(crate) const ENV_SIGNING_KEY: &str = "IDHAL_SIGNING_KEY";

/// minisign's decoded secret key: alg, kdf alg, chk alg, salt, opslimit, memlimit, keynum, sk, chk.
const SECRET_KEY_BYTES: usize = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32;
/// Where the checksum sits in the decoded key.
const CHECKSUM: std::ops::Range<usize> = SECRET_KEY_BYTES - 32..SECRET_KEY_BYTES;
const KDF_NONE: [u8; 2] = [0, 0];
const KDF_SCRYPT: [u8; 2] = *b"Sc";
/// minisign refuses longer passphrases; so do we, with a clearer message.
const MAX_PASSPHRASE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not a minisign secret key ({why})")]
    NotASecretKey { origin: String, why: &'static str },
    #[error("{origin} is encrypted with an unsupported method (only scrypt, as minisign uses)")]
    UnsupportedKdf { origin: String },
    #[error("wrong passphrase for {origin}")]
    WrongPassphrase { origin: String },
    #[error("{origin} is corrupted (its checksum does not match)")]
    Corrupted { origin: String },
    #[error("{origin} is encrypted and no passphrase is available: pass --passphrase-file FILE, set {ENV_PASSPHRASE}, or run on a terminal to be prompted")]
    NeedPassphrase { origin: String },
    #[error("no passphrase option given and stdin is not a terminal: pass --passphrase-file FILE, set {ENV_PASSPHRASE}, or --no-passphrase for an unencrypted key (like minisign -W)")]
    NoPassphraseOption,
    #[error("the passphrase from {0} is empty (an unencrypted key is made with `idhal keygen --no-passphrase`)")]
    EmptyPassphrase(String),
    #[error("the passphrase from {0} is longer than {MAX_PASSPHRASE} bytes")]
    LongPassphrase(String),
    #[error("the two passphrases typed differ")]
    PassphraseMismatch,
    #[error("cannot prompt for the passphrase: {0}")]
    Prompt(#[source] std::io::Error),
    #[error("minisign: {0}")]
    Minisign(String),
    #[error(
        "{path} already exists; refusing to overwrite a signing key. Move it away first if you \
             really mean to replace it (nodes pinned to it will refuse the new one)"
    )]
    SecretKeyExists { path: PathBuf },
    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the secret key")]
    WriteSecret(#[source] PublishError),
    #[error("cannot write the public key")]
    WritePublic(#[source] PublishError),
}

fn minisign_err(e: minisign::PError) -> KeyError {
    KeyError::Minisign(e.to_string())
}

/// A passphrase held only as long as needed.
pub(crate) struct Passphrase(String);

impl Passphrase {
    fn checked(s: String, origin: &str) -> Result<Self, KeyError> {
        if s.is_empty() {
            return Err(KeyError::EmptyPassphrase(origin.to_owned()));
        }
        if s.len() > MAX_PASSPHRASE {
            return Err(KeyError::LongPassphrase(origin.to_owned()));
        }
        Ok(Passphrase(s))
    }
}

/// Where a passphrase comes from, resolved once from flags and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PassphraseSource {
    /// `--passphrase-file FILE`: the first line of the file (a trailing newline is not part of it).
    File(PathBuf),
    /// `IDHAL_KEY_PASSPHRASE`.
    Env,
    /// Asked on the terminal.
    Prompt,
    /// `idhal keygen --no-passphrase`: an unencrypted key, like `minisign -W`.
    None,
    /// Nothing given and no terminal to ask on.
    Unavailable,
}

impl PassphraseSource {
    /// Precedence: explicit flags, then the environment, then a prompt if stdin is a terminal.
    pub(crate) fn resolve(file: Option<&Path>, no_passphrase: bool) -> Self {
        if let Some(f) = file {
            PassphraseSource::File(f.to_owned())
        } else if no_passphrase {
            PassphraseSource::None
        } else if std::env::var_os(ENV_PASSPHRASE).is_some() {
            PassphraseSource::Env
        } else if std::io::stdin().is_terminal() {
            PassphraseSource::Prompt
        } else {
            PassphraseSource::Unavailable
        }
    }

    /// Reads the passphrase; `confirm` asks twice when prompting (new keys).
    fn read(&self, confirm: bool) -> Result<Option<Passphrase>, KeyError> {
        match self {
            PassphraseSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                    what: "passphrase file",
                    path: path.clone(),
                    source,
                })?;
                let line = text.lines().next().unwrap_or("").to_owned();
                Passphrase::checked(line, &path.display().to_string()).map(Some)
            }
            PassphraseSource::Env => {
                let v = std::env::var(ENV_PASSPHRASE).map_err(|_| {
                    KeyError::EmptyPassphrase(format!("{ENV_PASSPHRASE} (not UTF-8)"))
                })?;
                Passphrase::checked(v, ENV_PASSPHRASE).map(Some)
            }
            PassphraseSource::Prompt => {
                let first = rpassword::prompt_password("Passphrase: ").map_err(KeyError::Prompt)?;
                if confirm {
                    let again = rpassword::prompt_password("Passphrase (again): ")
                        .map_err(KeyError::Prompt)?;
                    if again != first {
                        return Err(KeyError::PassphraseMismatch);
                    }
                }
                Passphrase::checked(first, "the terminal").map(Some)
            }
            PassphraseSource::None => Ok(None),
            PassphraseSource::Unavailable => Err(KeyError::NoPassphraseOption),
        }
    }
}

/// A usable signing key: the decrypted secret key and its public half.
pub(crate) struct SigningKey {
    pub(crate) secret: minisign::SecretKey,
    pub(crate) minisign_public: minisign::PublicKey,
    pub(crate) public: PublicKey,
}

impl SigningKey {
    /// Loads a minisign secret key file's `text` (from `idhal keygen` or `minisign -G`). `origin`
    /// names it in errors (a path, or the environment variable). Unencrypted keys need no
    /// passphrase; encrypted ones read it from `passphrase`.
    pub(crate) fn load(
        text: &str,
        origin: &str,
        passphrase: &PassphraseSource,
    ) -> Result<SigningKey, KeyError> {
        let not_key = |why| KeyError::NotASecretKey {
            origin: origin.to_owned(),
            why,
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = lines.next().ok_or(not_key("it is empty"))?;
        if !first.starts_with("untrusted comment:") {
            return Err(not_key("first line is not an untrusted comment"));
        }
        let b64 = lines.next().ok_or(not_key("no key line"))?;
        let raw = {
            use ct_codecs::{Base64, Decoder};
            Base64::decode_to_vec(b64, None).map_err(|_| not_key("key line is not base64"))?
        };
        if raw.len() != SECRET_KEY_BYTES {
            return Err(not_key("key line has the wrong length"));
        }
        if raw[..2] != *b"Ed" {
            return Err(not_key("algorithm is not Ed25519"));
        }
        // A box with exactly the comment and key lines, as the minisign crate expects.
        let sk_box = minisign::SecretKeyBox::from_string(&format!("{first}\n{b64}\n"))
            .map_err(minisign_err)?;
        let kdf = [raw[2], raw[3]];
        let secret = if kdf == KDF_NONE {
            match sk_box.into_unencrypted_secret_key() {
                Ok(sk) => sk,
                // Stock `minisign -G -W` leaves the checksum of unencrypted keys zeroed. Such a
                // key is still checked: `sign` below verifies every signature it makes with the
                // public half, so a damaged key cannot publish anything.
                Err(_) if raw[CHECKSUM].iter().all(|&b| b == 0) => {
                    minisign::SecretKey::from_bytes(&raw).map_err(minisign_err)?
                }
                Err(_) => {
                    return Err(KeyError::Corrupted {
                        origin: origin.to_owned(),
                    })
                }
            }
        } else if kdf == KDF_SCRYPT {
            let pass = match passphrase {
                PassphraseSource::None | PassphraseSource::Unavailable => {
                    return Err(KeyError::NeedPassphrase {
                        origin: origin.to_owned(),
                    })
                }
                source => source
                    .read(false)?
                    .ok_or_else(|| KeyError::NeedPassphrase {
                        origin: origin.to_owned(),
                    })?,
            };
            sk_box.into_secret_key(Some(pass.0)).map_err(|e| {
                if matches!(e.kind(), minisign::ErrorKind::Verify) {
                    KeyError::WrongPassphrase {
                        origin: origin.to_owned(),
                    }
                } else {
                    minisign_err(e)
                }
            })?
        } else {
            return Err(KeyError::UnsupportedKdf {
                origin: origin.to_owned(),
            });
        };
        let minisign_public =
            minisign::PublicKey::from_secret_key(&secret).map_err(minisign_err)?;
        let public = PublicKey::from_base64(&minisign_public.to_base64())
            .map_err(|_| not_key("its public half is not an Ed25519 key"))?;
        Ok(SigningKey {
            secret,
            minisign_public,
            public,
        })
    }
}

/// A freshly generated key pair, serialized in minisign's file formats.
pub(crate) struct NewKeyPair {
    pub(crate) secret_file: String,
    pub(crate) public: PublicKey,
    pub(crate) encrypted: bool,
}

/// Generates an Ed25519 key pair; encrypts the secret key (scrypt, minisign's parameters) unless
/// the source is `None`.
pub(crate) fn generate(passphrase: &PassphraseSource) -> Result<NewKeyPair, KeyError> {
    let pass = passphrase.read(true)?;
    let encrypted = pass.is_some();
    let pair = match pass {
        Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p.0)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(minisign_err)?;
    let comment = if encrypted {
        "idhal encrypted secret key"
    } else {
        "idhal unencrypted secret key"
    };
    let secret_file = pair
        .sk
        .to_box(Some(comment))
        .map_err(minisign_err)?
        .into_string();
    let public = PublicKey::from_base64(&pair.pk.to_base64())
        .map_err(|e| KeyError::Minisign(format!("generated public key: {e}")))?;
    Ok(NewKeyPair {
        secret_file,
        public,
        encrypted,
    })
}

/// Where `write_pair` put a new key pair.
#[derive(Debug)]
pub(crate) struct KeyFiles {
    pub(crate) secret: PathBuf,
    pub(crate) public: PathBuf,
}

impl KeyFiles {
    pub(crate) fn in_dir(dir: &Path) -> Self {
        Self {
            secret: dir.join(SECRET_KEY_FILE),
            public: dir.join(paths::PUBLIC_KEY),
        }
    }

    /// Refuses a directory that already holds a secret key: checked before asking for a
    /// passphrase; `write_pair` is what actually guarantees it.
    pub(crate) fn refuse_existing(&self) -> Result<(), KeyError> {
        if self.secret.exists() {
            return Err(KeyError::SecretKeyExists {
                path: self.secret.clone(),
            });
        }
        Ok(())
    }
}

/// Writes `pair` into `dir` (created 0700 when missing; an existing one keeps its mode): the
/// secret key 0600 and never over an existing one, then the public key atomically.
pub(crate) fn write_pair(dir: &Path, pair: &NewKeyPair) -> Result<KeyFiles, KeyError> {
    let files = KeyFiles::in_dir(dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    publish::write_new(&files.secret, pair.secret_file.as_bytes(), 0o600).map_err(|e| match e {
        PublishError::Exists { path } => KeyError::SecretKeyExists { path },
        other => KeyError::WriteSecret(other),
    })?;
    publish::write_atomic(&files.public, pair.public.to_file_text().as_bytes(), 0o644)
        .map_err(KeyError::WritePublic)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new directory is private, the secret key 0600; a second pair never replaces the
    /// first, even when the early check is skipped (the race `write_new` closes).
    #[test]
    fn write_pair_never_overwrites_a_secret_key() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let first = generate(&PassphraseSource::None).unwrap();
        let files = write_pair(&dir, &first).unwrap();
        assert_eq!((mode(&dir), mode(&files.secret)), (0o700, 0o600));
        assert_eq!(
            std::fs::read_to_string(&files.public).unwrap(),
            first.public.to_file_text()
        );
        let second = generate(&PassphraseSource::None).unwrap();
        match write_pair(&dir, &second) {
            Err(KeyError::SecretKeyExists { path }) => assert_eq!(path, files.secret),
            other => panic!("{other:?}"),
        }
        match KeyFiles::in_dir(&dir).refuse_existing() {
            Err(KeyError::SecretKeyExists { path }) => assert_eq!(path, files.secret),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(&files.secret).unwrap(),
            first.secret_file
        );
        // A file where the directory should be: the one-line reason names it.
        let blocked = tmp.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        match write_pair(&blocked.join("keys"), &first) {
            Err(KeyError::CreateDir { path, .. }) => assert_eq!(path, blocked.join("keys")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unencrypted_roundtrip() {
        let pair = generate(&PassphraseSource::None).unwrap();
        assert!(!pair.encrypted);
        let key = SigningKey::load(&pair.secret_file, "test", &PassphraseSource::None).unwrap();
        assert_eq!(key.public, pair.public);
    }

    #[test]
    fn rejects_garbage_with_the_reason() {
        let err = |t: &str| {
            SigningKey::load(t, "k", &PassphraseSource::None)
                .err()
                .unwrap()
                .to_string()
        };
        assert_eq!(err(""), "k is not a minisign secret key (it is empty)");
        let not_a_key = |why: &str| format!("k is not a minisign secret key ({why})");
        assert_eq!(
            err("untrusted comment: x\n!!!\n"),
            not_a_key("key line is not base64")
        );
        assert_eq!(
            err("untrusted comment: x\nRWQ=\n"),
            not_a_key("key line has the wrong length")
        );
        assert_eq!(
            err("hello\n"),
            not_a_key("first line is not an untrusted comment")
        );
    }
}
