//! A project's CA on disk and everything it signs: node and VPN-server certificates (every field
//! set here, nothing copied from a request), CRLs, and the project's enrollment key.
//!
//! Layout under `STATE/projects/NAME/`: `ca.key` (0600), `ca.crt`, `enroll.key` (0600),
//! `crl.pem`, `servers/NAME.{key,crt}`.

use crate::openvpn::config::ServerFiles;
use crate::publish::{write_atomic, write_new, PublishError};
use idhal_manifest::der;
use idhal_manifest::enroll::EnrollKey;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SerialNumber, SignatureAlgorithm, PKCS_ED25519,
};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("project {project:?} has no CA in {dir}: run `idhal ca init --project {project}`")]
    Missing { project: String, dir: PathBuf },
    #[error("{path}: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error(transparent)]
    Write(#[from] PublishError),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Paths of one project's files.
#[derive(Debug, Clone)]
pub struct ProjectDir {
    pub dir: PathBuf,
}

impl ProjectDir {
    pub fn new(state_dir: &Path, project: &str) -> Self {
        Self {
            dir: state_dir.join("projects").join(project),
        }
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn enroll_key(&self) -> PathBuf {
        self.dir.join("enroll.key")
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    pub fn servers(&self) -> PathBuf {
        self.dir.join("servers")
    }
    /// What server `name`'s OpenVPN config names.
    pub fn server_files(&self, name: &str) -> ServerFiles {
        let servers = self.servers();
        ServerFiles {
            ca_cert: self.ca_cert(),
            crl: self.crl(),
            cert: servers.join(format!("{name}.crt")),
            key: servers.join(format!("{name}.key")),
        }
    }
}

/// An Ed25519 public key taken out of a CSR: only its 32 bytes go into a certificate.
pub struct NodePublicKey(pub [u8; 32]);

impl PublicKeyData for NodePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

fn datetime(unix: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix.min(253_402_300_799) as i64)
        .expect("clamped to year 9999")
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

/// What a certificate is for; decides its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node: TLS client only, so it can never pose as a VPN server.
    Node,
    /// A VPN server (`remote-cert-tls server` on nodes checks this).
    Server,
}

/// A leaf certificate's parameters, all chosen by the CA.
pub struct Leaf<'a> {
    pub role: Role,
    pub cn: &'a str,
    pub serial: u64,
    pub not_before: u64,
    pub not_after: u64,
}

pub struct ProjectCa {
    pub project: String,
    pub paths: ProjectDir,
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub enroll: idhal_manifest::enroll::KeyPair,
}

impl ProjectCa {
    /// Creates the CA key and certificate and the enrollment key. Never overwrites a key: an
    /// existing one is an error (a second CA for the project would orphan every node).
    pub fn create(state_dir: &Path, project: &str, now: u64) -> Result<ProjectCa, CaError> {
        let paths = ProjectDir::new(state_dir, project);
        for dir in [&paths.dir, &paths.servers()] {
            std::fs::create_dir_all(dir).map_err(|source| CaError::Read {
                path: dir.clone(),
                source,
            })?;
        }
        let (key_pem, key) = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "idhal");
            dn.push(DnType::CommonName, format!("idhal {project} CA"));
            dn
        };
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = datetime(now.saturating_sub(300));
        params.not_after = datetime(now + 20 * 365 * 86_400);
        params.serial_number = Some(SerialNumber::from(random_u64()?));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;

        let seed = random_seed()?;
        write_new(&paths.ca_key(), key_pem.as_bytes(), 0o600)?;
        write_new(
            &paths.enroll_key(),
            der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&seed)).as_bytes(),
            0o600,
        )?;
        write_atomic(&paths.ca_cert(), cert.pem().as_bytes(), 0o644)?;
        Self::load(state_dir, project)
    }

    pub fn exists(state_dir: &Path, project: &str) -> bool {
        ProjectDir::new(state_dir, project).ca_key().exists()
    }

    pub fn load(state_dir: &Path, project: &str) -> Result<ProjectCa, CaError> {
        let paths = ProjectDir::new(state_dir, project);
        if !paths.ca_key().exists() {
            return Err(CaError::Missing {
                project: project.to_owned(),
                dir: paths.dir,
            });
        }
        let bad = |path: PathBuf, why: String| CaError::BadFile { path, why };
        let key = KeyPair::from_pem(&read(&paths.ca_key())?)
            .map_err(|e| bad(paths.ca_key(), e.to_string()))?;
        let cert_pem = read(&paths.ca_cert())?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| bad(paths.ca_cert(), e.to_string()))?;
        let enroll_text = read(&paths.enroll_key())?;
        let seed = der::pem_decode("PRIVATE KEY", &enroll_text)
            .and_then(|d| der::ed25519_seed_from_pkcs8(&d))
            .ok_or_else(|| bad(paths.enroll_key(), "not an Ed25519 PKCS#8 key".into()))?;
        let enroll =
            idhal_manifest::enroll::KeyPair::from_seed(idhal_manifest::enroll::Seed::new(seed));
        Ok(ProjectCa {
            project: project.to_owned(),
            paths,
            cert_pem,
            issuer,
            enroll,
        })
    }

    /// The public half of the enrollment key, as `param enroll-key` carries it.
    pub fn enroll_public(&self) -> EnrollKey {
        EnrollKey(*self.enroll.pk)
    }

    /// Signs a leaf for `public_key`. Subject, validity, serial and every extension come from
    /// `leaf` and the role; nothing from the request.
    pub fn issue(&self, leaf: &Leaf, public_key: &impl PublicKeyData) -> Result<String, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, leaf.cn);
            dn
        };
        params.serial_number = Some(SerialNumber::from(leaf.serial));
        params.not_before = datetime(leaf.not_before);
        params.not_after = datetime(leaf.not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match leaf.role {
            Role::Node => ExtendedKeyUsagePurpose::ClientAuth,
            Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// Signs a CRL listing `revoked` (serial, revocation time).
    pub fn crl(
        &self,
        revoked: &[(u64, u64)],
        number: u64,
        now: u64,
        validity: u64,
    ) -> Result<String, CaError> {
        let params = CertificateRevocationListParams {
            this_update: datetime(now.saturating_sub(60)),
            next_update: datetime(now + validity),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&(serial, at)| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: datetime(at),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// A new Ed25519 key: its PEM (PKCS#8 v1, which OpenSSL and OpenVPN read; ring's own v2
/// encoding is refused by OpenSSL 3.0) and the same key for signing here.
pub fn new_key() -> Result<(String, KeyPair), CaError> {
    let pem = der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&random_seed()?));
    let key = KeyPair::from_pem(&pem)?;
    Ok((pem, key))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| CaError::Read {
        path: "/dev/urandom".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(b)
}

pub fn random_u64() -> Result<u64, CaError> {
    // Positive and non-zero, as RFC 5280 wants serials.
    Ok((u64::from_le_bytes(random_bytes()?) >> 1) | 1)
}

pub fn random_seed() -> Result<[u8; 32], CaError> {
    random_bytes()
}

pub fn random_40() -> Result<[u8; 40], CaError> {
    random_bytes()
}
