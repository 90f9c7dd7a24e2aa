//! The project's certificate revocation list: re-signed when due (`refresh_due`, for
//! `idhal crl refresh` and `idhal serve`'s timer) or at once on a revocation (`regenerate`),
//! kept in the state database, and published from there to this server's crl.pem whenever the
//! database holds a newer number (`publish_newest`): servers that do not share `--state-dir`
//! get every revocation without copying files.

use crate::ca::db::Open;
use crate::ca::pki::{ProjectCa, ProjectDir};
use crate::ca::state::{self, Resign, StateStore};
use crate::ca::ProjectError;
use crate::config::{CaSection, ServerConfig};
use crate::publish::{write_atomic, DirLock};
use idhal_manifest::time::{now, rfc3339};
use std::path::{Path, PathBuf};

/// What `refresh_due` did for one project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    pub project: String,
    /// Re-signed here: the new nextUpdate.
    pub resigned_until: Option<u64>,
    /// crl.pem replaced by the database's newer CRL: its number.
    pub published: Option<u64>,
}

/// Re-signs the CRL of every project that is due (or all with `force`), then brings each
/// project's crl.pem here up to the database's newest CRL (projects whose directory this
/// server does not have are left alone).
pub fn refresh_due(
    db: &mut dyn StateStore,
    state_dir: &Path,
    cfg: &ServerConfig,
    now: u64,
    force: bool,
) -> Result<Vec<Refreshed>, ProjectError> {
    let validity = CaSection::secs(&cfg.ca.crl_validity);
    let when = if force {
        Resign::Always
    } else {
        Resign::IfDue { validity }
    };
    let mut out = Vec::new();
    for p in db.projects()? {
        // Looked at here to skip loading the CA, and again inside the store's transaction:
        // another server may have re-signed since.
        let resigned_until = if when.due(p.crl_next_update, now) {
            let ca = ProjectCa::load(state_dir, &p.name)?;
            resign(db, &ca, cfg, now, when)?
        } else {
            None
        };
        let dir = ProjectDir::new(state_dir, &p.name);
        let published = if dir.dir.is_dir() {
            publish_newest(db, &dir, &p.name, p.crl_number)?
        } else {
            None
        };
        out.push(Refreshed {
            project: p.name,
            resigned_until,
            published,
        });
    }
    Ok(out)
}

/// Signs a new CRL for `ca`'s project (next CRL number, every revoked certificate not yet
/// expired), stores it and publishes it atomically. Returns its nextUpdate.
pub fn regenerate(
    db: &mut dyn StateStore,
    ca: &ProjectCa,
    cfg: &ServerConfig,
    now: u64,
) -> Result<u64, ProjectError> {
    Ok(resign(db, ca, cfg, now, Resign::Always)?.unwrap_or(now))
}

/// Signs a new CRL for `ca`'s project when `when` says so (checked inside the store's
/// transaction, which stores it), then publishes the newest. Returns its nextUpdate, or `None`
/// if not due.
fn resign(
    db: &mut dyn StateStore,
    ca: &ProjectCa,
    cfg: &ServerConfig,
    now: u64,
    when: Resign,
) -> Result<Option<u64>, ProjectError> {
    let validity = CaSection::secs(&cfg.ca.crl_validity);
    let number = db.resign_crl(
        &ca.project,
        now,
        now + validity,
        when,
        &mut |number, revoked| Ok(ca.crl(revoked, number, now, validity)?),
    )?;
    let Some(number) = number else {
        return Ok(None);
    };
    // Published after the commit, from the database: a server that signed a newer one
    // meanwhile has its number kept, never overwritten by this older one.
    publish_newest(db, &ca.paths, &ca.project, number)?;
    Ok(Some(now + validity))
}

/// The largest crl.pem read: far above any CRL idhal signs (a revoked certificate takes about
/// 40 bytes); a bigger file is not ours and is replaced.
pub const MAX_CRL_FILE: u64 = 64 << 20;

/// Replaces `dir`'s crl.pem with the database's newest CRL of `project` when the database's
/// number is above the file's (or the file is missing, or not a CRL idhal can read the number
/// of), atomically, under a lock on `dir/.crl.lock`: publishers sharing a state dir never put
/// an older number over a newer one, so the number on disk never goes back. `known`, a number
/// the database held a moment ago, spares reading the PEM when the file is as new. Returns the
/// number written.
pub fn publish_newest(
    db: &mut dyn StateStore,
    dir: &ProjectDir,
    project: &str,
    known: u64,
) -> Result<Option<u64>, ProjectError> {
    let fail = |source| ProjectError::PublishCrl {
        project: project.to_owned(),
        source,
    };
    let _lock = DirLock::acquire(&dir.dir.join(".crl.lock")).map_err(fail)?;
    let on_disk = file_crl_number(&dir.crl());
    if on_disk.is_some_and(|n| n >= known) {
        return Ok(None);
    }
    let Some((number, pem)) = db.newest_crl(project)? else {
        return Ok(None);
    };
    if on_disk.is_some_and(|n| n >= number) {
        return Ok(None);
    }
    write_atomic(&dir.crl(), pem.as_bytes(), 0o644).map_err(fail)?;
    Ok(Some(number))
}

/// The CRL number of the CRL in `path`, if it is one (read bounded).
pub fn file_crl_number(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CRL_FILE + 1).read_to_end(&mut text))
        .ok()?;
    if text.len() as u64 > MAX_CRL_FILE {
        return None;
    }
    let der = idhal_manifest::der::pem_decode("X509 CRL", std::str::from_utf8(&text).ok()?)?;
    crl_number(&der)
}

/// One DER element: (tag, contents, what follows). Single-byte tags, definite lengths only.
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The crlNumber extension (2.5.29.20) of a DER CertificateList (RFC 5280 5.1, 5.2.3).
fn crl_number(der: &[u8]) -> Option<u64> {
    const SEQUENCE: u8 = 0x30;
    const CRL_NUMBER_OID: &[u8] = &[0x55, 0x1d, 0x14];
    let (SEQUENCE, list, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = tlv(list)? else {
        return None;
    };
    // tbsCertList: version, signature, issuer, thisUpdate, [nextUpdate], [revoked],
    // [0] EXPLICIT crlExtensions.
    let extensions = loop {
        let (tag, body, rest) = tlv(tbs)?;
        if tag == 0xa0 {
            break body;
        }
        tbs = rest;
    };
    let (SEQUENCE, mut exts, _) = tlv(extensions)? else {
        return None;
    };
    while !exts.is_empty() {
        let (SEQUENCE, ext, rest) = tlv(exts)? else {
            return None;
        };
        exts = rest;
        let (0x06, oid, mut ext) = tlv(ext)? else {
            return None;
        };
        if oid != CRL_NUMBER_OID {
            continue;
        }
        // critical BOOLEAN DEFAULT FALSE, then extnValue OCTET STRING holding an INTEGER.
        let value = loop {
            match tlv(ext)? {
                (0x04, value, _) => break value,
                (0x01, _, rest) => ext = rest,
                _ => return None,
            }
        };
        let (0x02, int, _) = tlv(value)? else {
            return None;
        };
        let int = match int {
            [0, rest @ ..] => rest,
            _ if int.first().is_some_and(|b| b & 0x80 != 0) => return None,
            _ => int,
        };
        if int.len() > 8 {
            return None;
        }
        return Some(int.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)));
    }
    None
}

/// Starts `idhal serve`'s background thread that re-signs due CRLs, checking every tenth of
/// their validity (at most hourly), so a server left running never lets a CRL expire; and
/// brings crl.pem up to the database's newest every `[state] crl_publish_secs`, so a
/// revocation made on another server reaches this one's OpenVPN. Each re-signed or published
/// CRL and each failure is one line on stderr. The state stays open between checks (reopened
/// after an error).
pub fn spawn_refresher(state_dir: PathBuf, cfg: ServerConfig) -> std::io::Result<()> {
    let every = (CaSection::secs(&cfg.ca.crl_validity) / 10)
        .clamp(1, 3600)
        .min(cfg.state.crl_publish_secs.max(1));
    std::thread::Builder::new()
        .name("crl-refresh".into())
        .spawn(move || {
            let mut store: Option<Box<dyn StateStore>> = None;
            loop {
                let result = match store.take() {
                    Some(s) => Ok(s),
                    None => state::open(&cfg, &state_dir, Open::Existing),
                }
                .map_err(ProjectError::from)
                .and_then(|mut db| {
                    let done = refresh_due(db.as_mut(), &state_dir, &cfg, now(), false)?;
                    store = Some(db);
                    Ok(done)
                });
                match result {
                    Ok(done) => {
                        for r in done {
                            if let Some(next) = r.resigned_until {
                                eprintln!(
                                    "idhal serve: CRL of project {} re-signed, valid until {}",
                                    r.project,
                                    rfc3339(next)
                                );
                            } else if let Some(n) = r.published {
                                eprintln!(
                                    "idhal serve: CRL of project {} number {n} published from the state database",
                                    r.project
                                );
                            }
                        }
                    }
                    Err(e) => eprintln!(
                        "idhal serve: error: CRL refresh: {:#}",
                        anyhow::Error::new(e)
                    ),
                }
                std::thread::sleep(std::time::Duration::from_secs(every));
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::db::Db;

    /// A project `p` on SQLite in `state`, its CA made and its first CRL stored (number 1).
    fn project(state: &Path) -> (Db, ProjectCa) {
        let cfg = ServerConfig::default();
        let created = crate::ca::project::init(
            state,
            &cfg,
            "p",
            crate::names::Ipv4Net::parse("10.134.0.0/24").unwrap(),
            1_800_000_000,
        )
        .unwrap();
        (Db::open(state, Open::Existing).unwrap(), created.ca)
    }

    #[test]
    fn the_number_is_read_from_a_signed_crl_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let (_db, ca) = project(tmp.path());
        let f = tmp.path().join("c.pem");
        for number in [
            1,
            127,
            128,
            255,
            256,
            12_345_678_901,
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let pem = ca
                .crl(&[(3, 1_800_000_000)], number, 1_800_000_000, 100)
                .unwrap();
            std::fs::write(&f, &pem).unwrap();
            assert_eq!(file_crl_number(&f), Some(number), "{number}");
        }
        // Missing, empty, not PEM, PEM of something else, every truncation, one byte too
        // many, and a huge file (read no further than the limit): no number, no panic.
        let pem = ca.crl(&[], 7, 1_800_000_000, 100).unwrap();
        let der = idhal_manifest::der::pem_decode("X509 CRL", &pem).unwrap();
        assert_eq!(crl_number(&der), Some(7));
        assert_eq!(file_crl_number(&tmp.path().join("none")), None);
        for bad in ["", "garbage\n", &ca.cert_pem] {
            std::fs::write(&f, bad).unwrap();
            assert_eq!(file_crl_number(&f), None, "{bad}");
        }
        for cut in 0..der.len() {
            assert_eq!(crl_number(&der[..cut]), None, "cut at {cut}");
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = crl_number(&flipped);
            flipped[i] ^= 0xff;
        }
        let mut huge = pem.into_bytes();
        huge.resize(MAX_CRL_FILE as usize + 1, b'\n');
        std::fs::write(&f, &huge).unwrap();
        assert_eq!(file_crl_number(&f), None);
        assert_eq!(file_crl_number(Path::new("/dev/zero")), None);
    }

    #[test]
    fn crl_pem_is_replaced_only_by_a_newer_number() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut db, ca) = project(tmp.path());
        let dir = &ca.paths;
        assert_eq!(file_crl_number(&dir.crl()), Some(1), "ca init published it");
        let cfg = ServerConfig::default();
        let until = regenerate(&mut db, &ca, &cfg, 1_800_000_100).unwrap();
        assert_eq!(until, 1_800_000_100 + 30 * 86_400);
        assert_eq!(file_crl_number(&dir.crl()), Some(2));
        // Another server's newer CRL on disk (number 9): left as it is.
        let newer = ca.crl(&[], 9, 1_800_000_000, 100).unwrap();
        write_atomic(&dir.crl(), newer.as_bytes(), 0o644).unwrap();
        assert_eq!(publish_newest(&mut db, dir, "p", 2).unwrap(), None);
        assert_eq!(std::fs::read_to_string(dir.crl()).unwrap(), newer);
        // An older one (or none, or a broken file): replaced by the database's, number 2.
        let older = ca.crl(&[], 1, 1_800_000_000, 100).unwrap();
        for file in [
            Some(older.as_str()),
            None,
            Some("-----BEGIN X509 CRL-----\n"),
        ] {
            match file {
                Some(text) => std::fs::write(dir.crl(), text).unwrap(),
                None => std::fs::remove_file(dir.crl()).unwrap(),
            }
            assert_eq!(publish_newest(&mut db, dir, "p", 2).unwrap(), Some(2));
            assert_eq!(file_crl_number(&dir.crl()), Some(2));
        }
        // Signed elsewhere since (number 3): published once the number read says so.
        db.resign_crl(
            "p",
            1_800_000_200,
            1_800_100_000,
            Resign::Always,
            &mut |n, r| Ok(ca.crl(r, n, 1_800_000_200, 100)?),
        )
        .unwrap();
        assert_eq!(publish_newest(&mut db, dir, "p", 3).unwrap(), Some(3));
        assert_eq!(publish_newest(&mut db, dir, "p", 3).unwrap(), None);
        assert_eq!(file_crl_number(&dir.crl()), Some(3));
    }

    #[test]
    fn refresh_brings_every_project_here_up_to_the_database() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut db, ca) = project(tmp.path());
        let cfg = ServerConfig::default();
        // Signed elsewhere (the file here not rewritten): not due, but published.
        db.resign_crl(
            "p",
            1_800_000_000,
            1_900_000_000,
            Resign::Always,
            &mut |n, r| Ok(ca.crl(r, n, 1_800_000_000, 100)?),
        )
        .unwrap();
        assert_eq!(file_crl_number(&ca.paths.crl()), Some(1));
        let done = refresh_due(&mut db, tmp.path(), &cfg, 1_800_000_000, false).unwrap();
        assert_eq!(
            done,
            [Refreshed {
                project: "p".into(),
                resigned_until: None,
                published: Some(2)
            }]
        );
        assert_eq!(file_crl_number(&ca.paths.crl()), Some(2));
        // A server without the project's directory leaves it alone.
        std::fs::remove_dir_all(&ca.paths.dir).unwrap();
        let done = refresh_due(&mut db, tmp.path(), &cfg, 1_800_000_000, false).unwrap();
        assert_eq!(done[0].published, None);
    }

    #[test]
    fn publishers_in_one_state_dir_never_put_the_number_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, ca) = project(tmp.path());
        let state = tmp.path().to_owned();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A reader, as OpenVPN's crl-verify: every number it sees, in order.
        let watcher = {
            let (crl, stop) = (ca.paths.crl(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = file_crl_number(&crl);
                    if n.is_some() && seen.last() != n.as_ref() {
                        seen.extend(n);
                    }
                }
                seen
            })
        };
        let cfg = ServerConfig::default();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (state, cfg) = (state.clone(), cfg.clone());
                std::thread::spawn(move || {
                    let mut db = Db::open(&state, Open::Existing).unwrap();
                    let ca = ProjectCa::load(&state, "p").unwrap();
                    for _ in 0..25 {
                        regenerate(&mut db, &ca, &cfg, 1_800_000_000).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(file_crl_number(&ca.paths.crl()), Some(201));
    }
}
