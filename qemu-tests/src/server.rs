//! The host side of a test: a project (keys, scriptlets, publication dir) driven through the real
//! `idhal` binary, and `idhal serve` on 127.0.0.1 with an ephemeral port (manifests, and
//! `POST /enroll` when it is given the CA's state dir).
use idhal_test_support::process::{announced, Reaped};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Keys and scriptlets of one test, signed with `idhal sign` into `pubdir`.
pub struct Project {
    idhal: PathBuf,
    pub keys: PathBuf,
    pub scriptlets: PathBuf,
    pub pubdir: PathBuf,
    /// `sha256:…` as printed by `idhal keygen`.
    pub fingerprint: String,
    /// `NAME=VALUE` signed into every manifest (`--param`); the env adds `enroll-key=…`.
    pub params: Vec<String>,
}

impl Project {
    pub fn new(idhal: &Path, dir: &Path) -> Project {
        let keys = dir.join("keys");
        let out = Command::new(idhal)
            .args(["keygen", "--no-passphrase", "--dir"])
            .arg(&keys)
            .output()
            .expect("idhal keygen");
        assert!(
            out.status.success(),
            "idhal keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let fingerprint = text
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or_else(|| panic!("no fingerprint in keygen output: {text}"))
            .trim_end_matches([')', ',', '.'])
            .to_string();
        let p = Project {
            idhal: idhal.into(),
            keys,
            scriptlets: dir.join("scriptlets"),
            pubdir: dir.join("pub"),
            fingerprint,
            params: Vec::new(),
        };
        std::fs::create_dir_all(&p.scriptlets).unwrap();
        std::fs::create_dir_all(&p.pubdir).unwrap();
        p
    }

    pub fn pubkey(&self) -> PathBuf {
        self.keys.join("idhal.pub")
    }

    /// Adds (or replaces) scriptlet `ID.sh` with `body`.
    pub fn scriptlet(&self, id: &str, body: &str) {
        std::fs::write(self.scriptlets.join(format!("{id}.sh")), body).unwrap();
    }

    /// `idhal sign` the scriptlets into the publication dir; returns the new serial.
    pub fn sign(&self, extra: &[&str]) -> u64 {
        let out = Command::new(&self.idhal)
            .arg("sign")
            .arg("--key")
            .arg(self.keys.join("idhal.key"))
            .arg("--out")
            .arg(&self.pubdir)
            .args(self.params.iter().flat_map(|p| ["--param", p]))
            .args(extra)
            .arg(&self.scriptlets)
            .output()
            .expect("idhal sign");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "idhal sign: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.published_serial()
    }

    /// The serial `manifest.minisig` names now (its trusted comment).
    pub fn published_serial(&self) -> u64 {
        let sig = std::fs::read_to_string(self.pubdir.join("manifest.minisig")).unwrap();
        sig.split_whitespace()
            .find_map(|w| w.strip_prefix("serial="))
            .and_then(|s| s.parse().ok())
            .expect("serial in trusted comment")
    }
}

/// `idhal serve --listen 127.0.0.1:0`, killed (by pid) when dropped.
/// `idhal serve`, killed (by its pid) and waited for when dropped.
pub struct Serve {
    _child: Reaped,
    pub port: u16,
    pub log: PathBuf,
}

impl Serve {
    /// `ca`: `(state dir, config)` of a CA made by `idhal ca init`: then the same port answers
    /// `POST /enroll` too. Without it, only the publication dir is served.
    pub fn start(idhal: &Path, root: &Path, log: &Path, ca: Option<(&Path, &Path)>) -> Serve {
        let mut cmd = Command::new(idhal);
        if let Some((state, config)) = ca {
            cmd.arg("--state-dir")
                .arg(state)
                .arg("--config")
                .arg(config);
        }
        let (child, addr) = announced(
            cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
                .arg(root)
                .stderr(std::fs::File::create(log).unwrap()),
            "listening on http://",
            crate::Limits::SERVER_START,
        );
        let port = addr
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("idhal serve listens on {addr:?}: no port"));
        Serve {
            _child: child,
            port,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
