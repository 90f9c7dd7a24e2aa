//! Creating a project (`idhal ca init`: its CA, enrollment key, first CRL and address pool),
//! its VPN servers' certificates (`idhal ca issue-server`) and their OpenVPN configs
//! (`idhal openvpn server-config`). The subcommands only print what these return.

use crate::ca::crl;
use crate::ca::db::{Open, ProjectRow};
use crate::ca::pki::{new_key, Leaf, ProjectCa, ProjectDir, Role};
use crate::ca::state;
use crate::ca::{require_inside_names_pool, require_project, ProjectError};
use crate::config::{CaSection, ServerConfig};
use crate::names::{Ipv4Net, ServerName};
use crate::openvpn::config::ServerSetup;
use crate::openvpn::management::{ensure_password_file, password_file};
use crate::publish::{write_atomic, write_new, PublishError};
use std::path::{Path, PathBuf};

/// A project `init` made.
pub struct Created {
    pub ca: ProjectCa,
    pub pool: Ipv4Net,
    /// The first CRL's nextUpdate.
    pub crl_until: u64,
}

/// Creates `project` at `now`: checks its pool (inside `[names] pool`, apart from every other
/// project's), then the CA and enrollment keys, the database row and the first CRL. Refuses a
/// project that exists, and a CA key left without its row by an interrupted run.
pub fn init(
    state_dir: &Path,
    cfg: &ServerConfig,
    project: &str,
    pool: Ipv4Net,
    now: u64,
) -> Result<Created, ProjectError> {
    require_inside_names_pool(cfg, project, &pool)?;
    let mut db = state::open(cfg, state_dir, Open::Create)?;
    let dir = ProjectDir::new(state_dir, project).dir;
    // The project must be new and its pool apart from every other project's: checked before
    // any key is made, and again in the transaction that inserts it (another server may be
    // creating one at the same time).
    let check = |others: &[ProjectRow]| -> Result<(), ProjectError> {
        if others.iter().any(|o| o.name == project) {
            return Err(ProjectError::Exists {
                project: project.to_owned(),
                dir: dir.clone(),
            });
        }
        for other in others {
            let theirs = Ipv4Net::parse(&other.pool)?;
            if theirs.overlaps(&pool) {
                return Err(ProjectError::PoolOverlap {
                    pool,
                    other: other.name.clone(),
                    theirs,
                });
            }
        }
        Ok(())
    };
    check(&db.projects()?)?;
    if ProjectCa::exists(state_dir, project) {
        return Err(ProjectError::OrphanKey {
            project: project.to_owned(),
            dir,
        });
    }
    let fresh_dir = !dir.exists();
    let ca = ProjectCa::create(state_dir, project, now)?;
    let inserted = db.insert_project(project, now, &pool.to_string(), &mut |others| check(others));
    if let Err(e) = inserted {
        // Lost the race (or the database failed): the keys just made belong to nothing.
        if fresh_dir {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Err(e);
    }
    let crl_until = crl::regenerate(db.as_mut(), &ca, cfg, now)?;
    Ok(Created {
        ca,
        pool,
        crl_until,
    })
}

/// A VPN server certificate `issue_server` made.
pub struct IssuedServer {
    pub serial: i64,
    pub not_after: u64,
    pub key: PathBuf,
    pub cert: PathBuf,
    /// The project's management password file and whether it was made now (or why it could
    /// not be: the certificate stands, so the caller shows it first); `None` with
    /// `[openvpn] management_auth = "none"`.
    pub management: Option<(PathBuf, Result<bool, PublishError>)>,
}

/// Issues server `name`'s certificate (its key made here, 0600, never over an existing one)
/// with the next serial of `project`, and the project's management password file when missing.
pub fn issue_server(
    state_dir: &Path,
    cfg: &ServerConfig,
    project: &str,
    name: &str,
    now: u64,
) -> Result<IssuedServer, ProjectError> {
    ServerName::parse(name)?;
    let mut db = state::open(cfg, state_dir, Open::Existing)?;
    let ca = ProjectCa::load(state_dir, project)?;
    let dir = ca.paths.servers();
    let (key_path, cert_path) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    if key_path.exists() {
        return Err(ProjectError::ServerKeyExists {
            path: key_path,
            name: name.to_owned(),
        });
    }
    let (key_pem, key) = new_key()?;
    let validity = CaSection::secs(&cfg.ca.server_cert_validity);
    let serial = db.issue_server_cert(
        project,
        name,
        now,
        now + validity,
        &mut |serial| {
            Ok(ca.issue(
                &Leaf {
                    role: Role::Server,
                    cn: name,
                    serial,
                    not_before: now.saturating_sub(300),
                    not_after: now + validity,
                },
                &key,
            )?)
        },
        // Files before the commit: a failure leaves no certificate row without its files.
        &mut |pem| {
            write_new(&key_path, key_pem.as_bytes(), 0o600)?;
            write_atomic(&cert_path, pem.as_bytes(), 0o644)?;
            Ok(())
        },
    )?;
    let management = password_file(cfg, state_dir, project).map(|pw| {
        let made = ensure_password_file(&pw);
        (pw, made)
    });
    Ok(IssuedServer {
        serial: serial as i64,
        not_after: now + validity,
        key: key_path,
        cert: cert_path,
        management,
    })
}

/// What `server_config` rendered, and the management password file it made (when it did).
pub struct RenderedServer {
    pub config: String,
    pub password_made: Option<PathBuf>,
}

/// Where the rendered server config points OpenVPN's hooks: this `idhal` binary, and the
/// config and state paths (absolute) they get as `setenv` lines.
pub struct HookPaths<'a> {
    pub idhal: &'a Path,
    pub config: Option<PathBuf>,
    pub state_dir: &'a Path,
}

/// Renders server `name`'s OpenVPN config for `project` (its pool from the database, checked
/// against `[names] pool`; its certificate must exist), making the project's management
/// password file (0600) when missing.
pub fn server_config(
    state_dir: &Path,
    cfg: &ServerConfig,
    project: &str,
    name: &str,
    hooks: HookPaths,
) -> Result<RenderedServer, ProjectError> {
    let mut db = state::open(cfg, state_dir, Open::Existing)?;
    let row = require_project(db.as_mut(), project)?;
    let pool = Ipv4Net::parse(&row.pool)?;
    require_inside_names_pool(cfg, project, &pool)?;
    let paths = ProjectDir::new(state_dir, project);
    let cert = paths.servers().join(format!("{name}.crt"));
    if !cert.is_file() {
        return Err(ProjectError::NoServerCert {
            path: cert,
            name: name.to_owned(),
            project: project.to_owned(),
        });
    }
    let management_password = password_file(cfg, state_dir, project);
    let config = ServerSetup {
        project,
        management_password: management_password.clone(),
        name,
        pool,
        files: paths.server_files(name),
        openvpn: &cfg.openvpn_for(project),
        idhal: hooks.idhal,
        config: hooks.config,
        state_dir: hooks.state_dir,
        route_dev: cfg.routing.table.map(|_| &cfg.routing.dev),
    }
    .render()?;
    // Made only once the config renders: a refused config changes nothing.
    let mut password_made = None;
    if let Some(pw) = management_password {
        if ensure_password_file(&pw)? {
            password_made = Some(pw);
        }
    }
    Ok(RenderedServer {
        config,
        password_made,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::project_name;
    use crate::openvpn::config::RenderError;

    fn net(s: &str) -> Ipv4Net {
        Ipv4Net::parse(s).unwrap()
    }

    /// Each refusal of `ca init` and `ca issue-server` is its own variant, and leaves the
    /// existing project as it was.
    /// Two servers on one PostgreSQL run `ca init` at once with overlapping pools: one project
    /// is created; the other is refused and leaves no keys behind.
    #[test]
    fn concurrent_inits_with_overlapping_pools_create_one_project() {
        let Some(pg) = idhal_test_support::pg::shared() else {
            return;
        };
        let mut cfg = ServerConfig::default();
        cfg.state.database = Some(pg.fresh_db());
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (cfg, start) = (cfg.clone(), start.clone());
                std::thread::spawn(move || {
                    let tmp = tempfile::tempdir().unwrap();
                    let pool = Ipv4Net::parse(&format!("10.134.{}.0/24", i % 2)).unwrap();
                    start.wait();
                    let pool = if i < 2 {
                        pool
                    } else {
                        Ipv4Net::parse("10.134.0.0/23").unwrap()
                    };
                    let r = init(tmp.path(), &cfg, &format!("p{i}"), pool, 1_800_000_000);
                    let left = ProjectDir::new(tmp.path(), &format!("p{i}")).dir.exists();
                    (r.map(|_| ()), left)
                })
            })
            .collect();
        let mut created = 0;
        for t in threads {
            match t.join().unwrap() {
                (Ok(()), true) => created += 1,
                (Err(ProjectError::PoolOverlap { .. }), false) => {}
                (r, left) => panic!("{:?}, project dir left: {left}", r.err()),
            }
        }
        // p0 (10.134.0.0/24) and p1 (10.134.1.0/24) can both exist, the /23s overlap both.
        let mut db = state::open(&cfg, Path::new("/nonexistent"), Open::Existing).unwrap();
        let names: Vec<_> = db.projects().unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(created, names.len());
        assert!(
            names == ["p0", "p1"]
                || names == ["p2"]
                || names == ["p3"]
                || names == ["p0"]
                || names == ["p1"],
            "{names:?}"
        );
    }

    #[test]
    fn init_and_issue_server_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let cfg = ServerConfig::default();
        let now = 1_800_000_000;
        let created = init(state, &cfg, "alpha", net("10.134.0.0/17"), now).unwrap();
        assert_eq!(
            created.crl_until,
            now + CaSection::secs(&cfg.ca.crl_validity)
        );
        let dir = ProjectDir::new(state, "alpha").dir;
        let ca_key = std::fs::read(ProjectDir::new(state, "alpha").ca_key()).unwrap();

        match init(state, &cfg, "alpha", net("10.134.128.0/17"), now) {
            Err(ProjectError::Exists { project, dir: d }) => {
                assert_eq!((project.as_str(), d), ("alpha", dir.clone()))
            }
            other => panic!("{:?}", other.err()),
        }
        match init(state, &cfg, "beta", net("10.134.64.0/18"), now) {
            Err(ProjectError::PoolOverlap {
                pool,
                other,
                theirs,
            }) => assert_eq!(
                (pool, other.as_str(), theirs),
                (net("10.134.64.0/18"), "alpha", net("10.134.0.0/17"))
            ),
            other => panic!("{:?}", other.err()),
        }
        match init(state, &cfg, "beta", net("10.135.0.0/24"), now) {
            Err(ProjectError::PoolOutsideNames { pool, names, .. }) => {
                assert_eq!((pool, names), (net("10.135.0.0/24"), cfg.names.pool))
            }
            other => panic!("{:?}", other.err()),
        }
        // A CA key without its database row (an interrupted init) is never replaced.
        let orphan = ProjectDir::new(state, "gamma");
        std::fs::create_dir_all(&orphan.dir).unwrap();
        std::fs::write(orphan.ca_key(), "kept").unwrap();
        match init(state, &cfg, "gamma", net("10.134.128.0/17"), now) {
            Err(ProjectError::OrphanKey { dir, .. }) => assert_eq!(dir, orphan.dir),
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(std::fs::read_to_string(orphan.ca_key()).unwrap(), "kept");
        assert_eq!(
            std::fs::read(ProjectDir::new(state, "alpha").ca_key()).unwrap(),
            ca_key
        );

        match project_name(Some("../x".into()), &cfg) {
            Err(ProjectError::BadName(e)) => {
                assert_eq!(e, idhal_manifest::IdError::Project("../x".into()))
            }
            other => panic!("{other:?}"),
        }
        let issued = issue_server(state, &cfg, "alpha", "vpn1", now).unwrap();
        assert_eq!(issued.serial, 1);
        assert_eq!(
            issued.key,
            ProjectDir::new(state, "alpha").servers().join("vpn1.key")
        );
        let (pw, made) = issued.management.unwrap();
        assert!(made.unwrap() && pw.is_file());
        let key = std::fs::read(&issued.key).unwrap();
        match issue_server(state, &cfg, "alpha", "vpn1", now) {
            Err(ProjectError::ServerKeyExists { path, name }) => {
                assert_eq!((path, name.as_str()), (issued.key.clone(), "vpn1"))
            }
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(std::fs::read(&issued.key).unwrap(), key);
        for bad in ["", "../x", "a b", "-x", &"a".repeat(65)] {
            match issue_server(state, &cfg, "alpha", bad, now) {
                Err(ProjectError::Name(e)) => assert_eq!(Err(e), ServerName::parse(bad)),
                other => panic!("{bad:?}: {:?}", other.err()),
            }
        }
        // The next server gets the next serial; the password file is kept.
        let second = issue_server(state, &cfg, "alpha", "vpn2", now).unwrap();
        let (pw2, made) = second.management.unwrap();
        assert_eq!((second.serial, pw2, made.unwrap()), (2, pw.clone(), false));

        // Its OpenVPN config: only for a server with a certificate.
        let hooks = || HookPaths {
            idhal: Path::new("/usr/bin/idhal"),
            config: None,
            state_dir: state,
        };
        match server_config(state, &cfg, "alpha", "vpn3", hooks()) {
            Err(ProjectError::NoServerCert { path, .. }) => assert_eq!(
                path,
                ProjectDir::new(state, "alpha").servers().join("vpn3.crt")
            ),
            other => panic!("{:?}", other.err()),
        }
        match server_config(state, &cfg, "nope", "vpn1", hooks()) {
            Err(ProjectError::NoProject(p)) => assert_eq!(p, "nope"),
            other => panic!("{:?}", other.err()),
        }
        std::fs::remove_file(&pw).unwrap();
        // A config OpenVPN would refuse makes no password file either.
        let mut off_loopback = cfg.clone();
        off_loopback.openvpn.management = vec!["10.0.0.1:7505".parse().unwrap()];
        match server_config(state, &off_loopback, "alpha", "vpn1", hooks()) {
            Err(ProjectError::Render(RenderError::ManagementNotLoopback(_))) => {}
            other => panic!("{:?}", other.err()),
        }
        assert!(!pw.exists());
        let rendered = server_config(state, &cfg, "alpha", "vpn1", hooks()).unwrap();
        assert_eq!(rendered.password_made, Some(pw.clone()));
        assert!(rendered
            .config
            .contains("\nserver 10.134.0.0 255.255.128.0 nopool\n"));
        assert!(rendered
            .config
            .contains(&format!("\ncert {}\n", issued.cert.display())));
        let again = server_config(state, &cfg, "alpha", "vpn1", hooks()).unwrap();
        assert_eq!((again.password_made, again.config), (None, rendered.config));
    }
}
