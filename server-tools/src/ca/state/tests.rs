//! Every test of the state layer, one body run on both backends: `both!` expands each into
//! `sqlite::NAME` (a file in a temp dir) and `postgres::NAME` (a fresh database on the test
//! binary's own PostgreSQL cluster on 127.0.0.1, test-support's `pg::shared`).

use super::migrate::{migrate, require_current, Migration, MIGRATIONS};
use super::postgres::PgStore;
use super::*;
use crate::ca::db::{Db, Open};
use std::collections::HashSet;

/// A connection factory for one test's database: more connections to the same state.
type Connect = Box<dyn Fn() -> Box<dyn StateStore> + Send + Sync>;

macro_rules! both {
    ($(fn $name:ident($s:ident, $connect:ident) $body:block)*) => {
        mod sqlite {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().to_owned();
                    let $connect: Connect = Box::new(move || {
                        Box::new(Db::open(&path, Open::Create).unwrap())
                    });
                    let mut store = $connect();
                    let $s: &mut dyn StateStore = store.as_mut();
                    $body
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let Some(pg) = idhal_test_support::pg::shared() else { return };
                    let url = pg.fresh_db();
                    let $connect: Connect = Box::new(move || {
                        Box::new(PgStore::connect(&url, None, Open::Create).unwrap())
                    });
                    let mut store = $connect();
                    let $s: &mut dyn StateStore = store.as_mut();
                    $body
                }
            )*
        }
    };
}

fn token(id: &str, created: u64, uses: u32) -> NewToken {
    NewToken {
        id: id.into(),
        project: "p".into(),
        node_type: "worker".into(),
        verifier: [7; 32],
        uses,
        created,
        expires: created + 60,
        comment: "c".into(),
    }
}

fn claim<'a>(token: &'a str, key: &'a [u8], now: u64) -> Claim<'a> {
    Claim {
        project: "p",
        token,
        node_type: "worker",
        public_key: key,
        now,
        not_after: now + 1000,
    }
}

/// Enrolls `key` with `token`, signing "pem SERIAL".
fn enroll(
    s: &mut dyn StateStore,
    token: &str,
    key: &[u8],
    now: u64,
) -> Result<Enrollment, Refusal> {
    s.enroll(&claim(token, key, now), &mut |a| {
        Ok(format!("pem {}", a.serial))
    })
}

both! {
    fn tokens_round_trip(s, _c) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        assert_eq!(s.token_for_enroll("b").unwrap(), None);
        s.create_token(&token("b", 5, 2)).unwrap();
        s.create_token(&token("a", 5, 2)).unwrap();
        s.create_token(&token("z", 1, 2)).unwrap();
        // The id is the primary key; an unknown project is refused (foreign key).
        assert!(s.create_token(&token("a", 9, 2)).is_err());
        let mut orphan = token("o", 1, 2);
        orphan.project = "nope".into();
        assert!(s.create_token(&orphan).is_err());
        let ids: Vec<_> = s.tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["z", "a", "b"]);
        let info = s.token_for_enroll("b").unwrap().unwrap();
        assert_eq!((info.project.as_str(), info.node_type.as_str()), ("p", "worker"));
        assert_eq!(info.verifier, vec![7; 32]);
        let t = &s.tokens().unwrap()[0];
        assert_eq!((t.uses, t.used, t.created, t.expires, t.comment.as_str()), (2, 0, 1, 61, "c"));
    }

    fn enroll_commits_only_when_sign_succeeds(s, _c) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        s.create_token(&token("t", 1, 2)).unwrap();
        s.create_token(&token("u", 1, 2)).unwrap();
        let key = [9u8; 32];
        let refused = s.enroll(&claim("t", &key, 10), &mut |_| {
            Err(Refusal::Internal("signer down".into()))
        });
        assert!(matches!(refused, Err(Refusal::Internal(_))));
        // Rolled back: the token use, the node number, address and serial are all still free.
        let used: Vec<_> = s.tokens().unwrap().iter().map(|t| t.used).collect();
        assert_eq!(used, [0, 0]);
        assert!(s.nodes(None).unwrap().is_empty());
        let mut signed = Vec::new();
        let e = s
            .enroll(&claim("t", &key, 10), &mut |a| {
                signed.push(a.node.clone());
                Ok(format!("pem {}", a.serial))
            })
            .unwrap();
        assert_eq!(
            (e.node.as_str(), e.address.to_string(), e.pem.as_str(), e.fresh),
            ("client1", "10.8.0.2".to_owned(), "pem 1", true)
        );
        assert_eq!(signed, ["client1"]);
        // The same key with the same token: the same node, nothing signed again.
        let again = s.enroll(&claim("t", &key, 11), &mut |_| panic!("signed twice")).unwrap();
        assert_eq!((again.node, again.pem, again.fresh), (e.node, e.pem, false));
        // With another token: refused, and that token keeps its uses.
        assert!(matches!(
            s.enroll(&claim("u", &key, 12), &mut |_| panic!("signed")),
            Err(Refusal::KeyInUse)
        ));
        let used: Vec<_> = s.tokens().unwrap().iter().map(|t| t.used).collect();
        assert_eq!(used, [1, 0]);
        let n = s.node("client1").unwrap().unwrap();
        assert_eq!((n.project.as_str(), n.node_type.as_str(), n.address.as_str(), n.cert_serial, n.enrolled_at, n.revoked_at),
                   ("p", "worker", "10.8.0.2", 1, 10, None));
        assert_eq!(s.node("client2").unwrap(), None);
    }

    fn enroll_refuses_used_up_expired_and_unknown_and_counts_on(s, _c) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        s.insert_project("q", 0, "10.9.0.0/24", &mut |_| Ok(())).unwrap();
        s.create_token(&token("once", 100, 1)).unwrap();
        let mut q = token("q", 100, 1);
        q.project = "q".into();
        s.create_token(&q).unwrap();
        assert_eq!(enroll(s, "once", &[1; 32], 110).unwrap().node, "client1");
        assert!(matches!(enroll(s, "once", &[2; 32], 110), Err(Refusal::UsedUp)));
        s.create_token(&token("old", 100, 5)).unwrap();
        // expires = created + 60: refused at that second and after.
        assert!(matches!(enroll(s, "old", &[3; 32], 160), Err(Refusal::Expired)));
        assert!(matches!(enroll(s, "gone", &[3; 32], 110), Err(Refusal::UnknownToken)));
        // Node numbers are global, addresses and serials per project; refusals used none.
        let e = s
            .enroll(
                &Claim { project: "q", ..claim("q", &[4; 32], 110) },
                &mut |a| Ok(format!("pem {}", a.serial)),
            )
            .unwrap();
        assert_eq!((e.node.as_str(), e.address.to_string()), ("client2", "10.9.0.2".to_owned()));
        let p = s.project("p").unwrap().unwrap();
        assert_eq!((p.next_host, p.next_serial), (3, 2));
        assert_eq!(s.nodes(Some("q")).unwrap().len(), 1);
        assert_eq!(s.nodes(None).unwrap().len(), 2);
    }

    fn pool_exhaustion_is_its_own_refusal(s, _c) {
        // A /30 holds hosts .1 and .2; idhal hands out from .2: one node, then none.
        s.insert_project("p", 0, "10.8.0.0/30", &mut |_| Ok(())).unwrap();
        s.create_token(&token("t", 1, 5)).unwrap();
        enroll(s, "t", &[1; 32], 10).unwrap();
        assert!(matches!(enroll(s, "t", &[2; 32], 10), Err(Refusal::PoolExhausted(_))));
        assert_eq!(s.tokens().unwrap()[0].used, 1);
    }

    fn revoke_reads_and_marks_once(s, _c) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        s.create_token(&token("t", 1, 5)).unwrap();
        let e = enroll(s, "t", &[1; 32], 10).unwrap();
        assert_eq!(s.revoke("client9", 20).unwrap(), None);
        let before = s.revoke(&e.node, 20).unwrap().unwrap();
        assert_eq!(before.revoked_at, None);
        let again = s.revoke(&e.node, 30).unwrap().unwrap();
        assert_eq!(again.revoked_at, Some(20), "the first time is kept");
        // The key cannot come back, even with its own token.
        assert!(matches!(enroll(s, "t", &[1; 32], 40), Err(Refusal::KeyInUse)));
        // The CRL lists its certificate with that time.
        let mut listed = Vec::new();
        s.resign_crl("p", 40, 1000, Resign::Always, &mut |_, r| {
            listed = r.to_vec();
            Ok(String::new())
        })
        .unwrap();
        assert_eq!(listed, [(1, 20)]);
    }

    fn a_revocation_is_seen_through_every_other_connection(s, connect) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        s.create_token(&token("t", 1, 5)).unwrap();
        enroll(s, "t", &[1; 32], 10).unwrap();
        // Another server's hook, connected before the revocation.
        let mut other = connect();
        assert_eq!(other.node("client1").unwrap().unwrap().revoked_at, None);
        s.revoke("client1", 20).unwrap();
        assert_eq!(other.node("client1").unwrap().unwrap().revoked_at, Some(20));
        assert!(matches!(
            enroll(other.as_mut(), "t", &[1; 32], 30),
            Err(Refusal::KeyInUse)
        ));
    }

    fn projects_created_at_once_are_checked_one_after_the_other(s, connect) {
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (mut store, start) = (connect(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    // Every pool overlaps every other: only the first may be created.
                    store.insert_project(&format!("p{i}"), 0, "10.8.0.0/24", &mut |others| {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        match others.first() {
                            Some(o) => Err(ProjectError::NoProject(format!("overlaps {}", o.name))),
                            None => Ok(()),
                        }
                    })
                })
            })
            .collect();
        let created = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(Result::is_ok)
            .count();
        assert_eq!(created, 1);
        assert_eq!(s.projects().unwrap().len(), 1);
        // The name is the key: the same project twice is refused even if the check passes.
        let name = s.projects().unwrap()[0].name.clone();
        assert!(s.insert_project(&name, 0, "10.9.0.0/24", &mut |_| Ok(())).is_err());
    }

    fn crl_numbers_grow_and_roll_back_and_due_is_checked_inside(s, _c) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        let mut sign_ok = |n: u64, _: &[(u64, u64)]| Ok(format!("crl {n}"));
        assert_eq!(s.resign_crl("p", 100, 1100, Resign::Always, &mut sign_ok).unwrap(), Some(1));
        // Valid until 1100 with a validity of 1000: due once less than 500 is left.
        let due = Resign::IfDue { validity: 1000 };
        assert_eq!(s.resign_crl("p", 599, 1599, due, &mut |_, _| panic!("signed")).unwrap(), None);
        let failed = s.resign_crl("p", 601, 1601, due, &mut |_, _| {
            Err(ProjectError::NoProject("signing failed".into()))
        });
        assert!(failed.is_err());
        assert_eq!(s.project("p").unwrap().unwrap().crl_number, 1, "rolled back");
        assert_eq!(s.resign_crl("p", 601, 1601, due, &mut sign_ok).unwrap(), Some(2));
        let p = s.project("p").unwrap().unwrap();
        assert_eq!((p.crl_number, p.crl_next_update), (2, 1601));
    }

    fn server_certificates_share_the_serials_and_roll_back(s, _c) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        let refused = s.issue_server_cert("p", "vpn1", 1, 2, &mut |n| Ok(format!("srv {n}")), &mut |_| {
            Err(ProjectError::NoProject("disk full".into()))
        });
        assert!(refused.is_err());
        let serial = s
            .issue_server_cert("p", "vpn1", 1, 2, &mut |n| Ok(format!("srv {n}")), &mut |pem| {
                assert_eq!(pem, "srv 1");
                Ok(())
            })
            .unwrap();
        assert_eq!(serial, 1);
        s.create_token(&token("t", 1, 5)).unwrap();
        assert_eq!(enroll(s, "t", &[1; 32], 10).unwrap().pem, "pem 2");
        assert!(s.insert_project("p", 0, "10.7.0.0/24", &mut |_| Ok(())).is_err(), "a project exists once");
    }

    fn concurrent_enrollments_get_distinct_ids_addresses_and_serials(s, connect) {
        s.insert_project("p", 0, "10.8.0.0/16", &mut |_| Ok(())).unwrap();
        s.create_token(&token("many", 1, 1000)).unwrap();
        s.create_token(&token("once", 1, 1)).unwrap();
        let connect = std::sync::Arc::new(connect);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let connect = connect.clone();
                std::thread::spawn(move || {
                    let mut store = connect();
                    let mut got = Vec::new();
                    for i in 0..10u8 {
                        let mut key = [0u8; 32];
                        key[0] = t;
                        key[1] = i;
                        got.push(enroll(store.as_mut(), "many", &key, 10).unwrap());
                    }
                    // Everyone also tries the one-use token, with a key of its own.
                    let once = enroll(store.as_mut(), "once", &[t + 100; 32], 10);
                    (got, once)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut once_ok = 0;
        for t in threads {
            let (got, once) = t.join().unwrap();
            all.extend(got);
            match once {
                Ok(_) => once_ok += 1,
                Err(Refusal::UsedUp) => {}
                Err(e) => panic!("one-use token: {e:?}"),
            }
        }
        assert_eq!(once_ok, 1, "a one-use token redeemed {once_ok} times");
        let ids: HashSet<_> = all.iter().map(|e| e.node.clone()).collect();
        let addrs: HashSet<_> = all.iter().map(|e| e.address).collect();
        let pems: HashSet<_> = all.iter().map(|e| e.pem.clone()).collect();
        assert_eq!((ids.len(), addrs.len(), pems.len()), (80, 80, 80));
        // No gaps: 81 nodes numbered 1..=81, serials 1..=81.
        let nodes = s.nodes(None).unwrap();
        let nums: Vec<u64> = nodes.iter().map(|n| n.id[6..].parse().unwrap()).collect();
        assert_eq!(nums, (1..=81).collect::<Vec<_>>());
        let mut serials: Vec<u64> = nodes.iter().map(|n| n.cert_serial).collect();
        serials.sort();
        assert_eq!(serials, (1..=81).collect::<Vec<_>>());
    }

    fn concurrent_retries_of_one_key_and_token_get_the_one_node(s, connect) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        s.create_token(&token("t", 1, 5)).unwrap();
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (mut store, start) = (connect(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    store.enroll(
                        &claim("t", &[5; 32], 10),
                        &mut |a| {
                            // Signing takes a while: the retries arrive meanwhile.
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(format!("pem {}", a.serial))
                        },
                    )
                })
            })
            .collect();
        let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let nodes: HashSet<_> = got
            .iter()
            .map(|r| r.as_ref().map(|e| e.node.clone()).map_err(|e| e.to_string()))
            .collect();
        assert_eq!(nodes, HashSet::from([Ok("client1".to_owned())]));
        assert_eq!(got.iter().filter(|r| r.as_ref().unwrap().fresh).count(), 1);
        assert_eq!(s.tokens().unwrap()[0].used, 1, "one use spent");
    }

    fn concurrent_crl_resigning_never_goes_back(s, connect) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        let connect = std::sync::Arc::new(connect);
        let signed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (connect, signed) = (connect.clone(), signed.clone());
                std::thread::spawn(move || {
                    let mut store = connect();
                    for _ in 0..10 {
                        store
                            .resign_crl("p", 10, 1000, Resign::Always, &mut |n, _| {
                                // Inside the lock: the order numbers are published in.
                                signed.lock().unwrap().push(n);
                                Ok(format!("crl {n}"))
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*signed.lock().unwrap(), (1..=40).collect::<Vec<_>>());
        // Due-checks made together: one re-signs, the others find it done.
        let due = Resign::IfDue { validity: 1000 };
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (mut store, start) = (connect(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    store
                        .resign_crl("p", 900, 1900, due, &mut |_, _| {
                            // Signing takes a while: the others are at the door meanwhile.
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            Ok("crl".into())
                        })
                        .unwrap()
                })
            })
            .collect();
        let done: Vec<_> = threads.into_iter().filter_map(|t| t.join().unwrap()).collect();
        assert_eq!(done, [41]);
    }

    fn migrations_apply_in_order_each_in_its_own_transaction(s, _c) {
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        require_current(s).unwrap();
        let (next, after) = (SCHEMA_VERSION + 1, SCHEMA_VERSION + 2);
        let mut steps = MIGRATIONS.to_vec();
        steps.push(Migration {
            version: next,
            sqlite: "CREATE TABLE extra (v INTEGER); INSERT INTO extra VALUES (2);",
            postgres: "CREATE TABLE extra (v BIGINT); INSERT INTO extra VALUES (2);",
        });
        steps.push(Migration {
            version: after,
            sqlite: "CREATE TABLE later (v INTEGER); THIS IS NOT SQL;",
            postgres: "CREATE TABLE later (v BIGINT); THIS IS NOT SQL;",
        });
        // The last step fails: the one before stays committed, the last left nothing behind.
        assert!(migrate(s, &steps).is_err());
        assert_eq!(s.schema_version().unwrap(), next);
        assert!(!s.apply_migration(&steps[steps.len() - 2]).unwrap(), "applied twice");
        // A database newer than this idhal is refused, not downgraded.
        match require_current(s) {
            Err(e @ StateError::Newer { found, .. }) if found == next => assert!(
                e.to_string().ends_with(&format!(
                    "has schema version {next}; this idhal knows {SCHEMA_VERSION} (upgrade idhal)"
                )),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(migrate(s, MIGRATIONS), Err(StateError::Newer { found, .. }) if found == next));
        let ok_steps = &steps[..steps.len() - 1];
        assert_eq!(migrate(s, ok_steps).unwrap(), migrate::Migrated { from: next, to: next });
    }

    fn the_newest_crl_is_kept_with_its_number_and_one_missing_is_due(s, connect) {
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
        assert_eq!(s.newest_crl("p").unwrap(), None);
        assert_eq!(s.newest_crl("nope").unwrap(), None);
        // None stored yet (a database from before version 2): due even when the time is not.
        let due = Resign::IfDue { validity: 1000 };
        s.resign_crl("p", 100, 1100, due, &mut |n, _| Ok(format!("crl {n}"))).unwrap();
        assert_eq!(s.newest_crl("p").unwrap(), Some((1, "crl 1".into())));
        assert_eq!(s.resign_crl("p", 101, 1101, due, &mut |_, _| panic!("signed")).unwrap(), None);
        // A failed signing keeps the one before, number and PEM together.
        assert!(s
            .resign_crl("p", 102, 1102, Resign::Always, &mut |_, _| {
                Err(ProjectError::NoProject("signing failed".into()))
            })
            .is_err());
        assert_eq!(s.newest_crl("p").unwrap(), Some((1, "crl 1".into())));
        s.resign_crl("p", 103, 1103, Resign::Always, &mut |n, _| Ok(format!("crl {n}"))).unwrap();
        // Every other server reads it from the database.
        assert_eq!(connect().newest_crl("p").unwrap(), Some((2, "crl 2".into())));
    }
}

/// Renews `node` at `now` (valid until `now + 1000`) unless its certificate is younger than
/// `min_interval`, signing "renewed SERIAL".
fn renew(s: &mut dyn StateStore, node: &str, now: u64, min_interval: u64) -> Renewed {
    s.renew(
        &Renewal {
            node,
            now,
            not_after: now + 1000,
            min_interval,
        },
        &mut |serial| Ok(format!("renewed {serial}")),
    )
    .unwrap()
}

/// Certificate renewal (`POST /renew`) and what it means for revocation.
mod renewal {
    use super::*;

    fn cert(serial: u64, issued: u64, pem: &str) -> NodeCert {
        NodeCert {
            project: "p".into(),
            address: "10.8.0.2".into(),
            serial,
            issued,
            not_after: issued + 1000,
            pem: pem.into(),
        }
    }

    both! {
        fn renewal_signs_a_new_serial_for_the_same_node_and_revocation_lists_them_all(s, _c) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 5)).unwrap();
            let e = enroll(s, "t", &[1; 32], 10).unwrap();
            assert_eq!((e.node.as_str(), e.pem.as_str()), ("client1", "pem 1"));
            // Within the interval: the certificate it has, nothing signed.
            let current = NodeCert { not_after: 1010, ..cert(1, 10, "pem 1") };
            let r = s.renew(
                &Renewal { node: "client1", now: 20, not_after: 1020, min_interval: 100 },
                &mut |_| panic!("signed within the interval"),
            );
            assert_eq!(r.unwrap(), Renewed::Current(current));
            assert_eq!(renew(s, "client1", 110, 100), Renewed::Issued(cert(2, 110, "renewed 2")));
            // The node row points at it; same id, key and address.
            let k = s.node_key("client1").unwrap().unwrap();
            assert_eq!((k.row.cert_serial, k.cert_not_after, k.public_key), (2, Some(1110), vec![1; 32]));
            assert_eq!(k.row.address, "10.8.0.2");
            // An enrollment retry with the same key and token gets the renewed one.
            assert_eq!(enroll(s, "t", &[1; 32], 120).unwrap().pem, "renewed 2");
            // A signer that fails rolls everything back: the serial is not spent.
            let failed = s.renew(
                &Renewal { node: "client1", now: 300, not_after: 1300, min_interval: 100 },
                &mut |_| Err(ProjectError::NoProject("signer down".into())),
            );
            assert!(failed.is_err());
            assert_eq!(s.node("client1").unwrap().unwrap().cert_serial, 2);
            assert_eq!(renew(s, "client1", 300, 100), Renewed::Issued(cert(3, 300, "renewed 3")));
            assert_eq!(s.project("p").unwrap().unwrap().next_serial, 4);
            assert_eq!(renew(s, "client9", 300, 0), Renewed::NoNode);

            // Revoking revokes every certificate the node ever had: the old ones are still
            // valid until they expire, and the CRL lists all three.
            s.revoke("client1", 400).unwrap();
            let revoked: Vec<_> = s.export().unwrap().certs.iter().map(|c| (c.serial, c.revoked_at)).collect();
            assert_eq!(revoked, [(1, Some(400)), (2, Some(400)), (3, Some(400))]);
            let mut listed = Vec::new();
            s.resign_crl("p", 500, 1500, Resign::Always, &mut |_, r| {
                listed = r.to_vec();
                Ok(String::new())
            })
            .unwrap();
            assert_eq!(listed, [(1, 400), (2, 400), (3, 400)]);
            // Revoked: nothing more signed; a second revocation keeps the time.
            assert_eq!(renew(s, "client1", 500, 0), Renewed::Revoked);
            s.revoke("client1", 600).unwrap();
            assert!(s.export().unwrap().certs.iter().all(|c| c.revoked_at == Some(400)));
        }

        fn an_expired_certificate_is_not_renewed_and_other_nodes_are_untouched(s, _c) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 5)).unwrap();
            enroll(s, "t", &[1; 32], 10).unwrap();
            enroll(s, "t", &[2; 32], 10).unwrap();
            // not_after 1010 is past at 1010 (the CRL's rule).
            assert_eq!(renew(s, "client1", 1010, 0), Renewed::Expired(1010));
            assert_eq!(renew(s, "client1", 5000, 0), Renewed::Expired(1010));
            assert_eq!(renew(s, "client1", 1009, 0), Renewed::Issued(cert(3, 1009, "renewed 3")));
            // Revoking client2 touches none of client1's certificates.
            s.revoke("client2", 1100).unwrap();
            let certs = s.export().unwrap().certs;
            let of = |n: &str| -> Vec<_> { certs.iter().filter(|c| c.subject == n).map(|c| c.revoked_at).collect() };
            assert_eq!(of("client1"), [None, None]);
            assert_eq!(of("client2"), [Some(1100)]);
        }

        fn concurrent_renewals_of_one_node_sign_once(s, connect) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 5)).unwrap();
            enroll(s, "t", &[1; 32], 10).unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(20));
            let threads: Vec<_> = (0..20)
                .map(|_| {
                    let (mut store, start) = (connect(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        store
                            .renew(
                                &Renewal { node: "client1", now: 500, not_after: 1500, min_interval: 100 },
                                &mut |serial| {
                                    // Signing takes a while: the others arrive meanwhile.
                                    std::thread::sleep(std::time::Duration::from_millis(50));
                                    Ok(format!("renewed {serial}"))
                                },
                            )
                            .unwrap()
                    })
                })
                .collect();
            let got: Vec<Renewed> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let issued = got.iter().filter(|r| matches!(r, Renewed::Issued(_))).count();
            assert_eq!(issued, 1, "{got:?}");
            let c = cert(2, 500, "renewed 2");
            assert!(got.iter().all(|r| *r == Renewed::Issued(c.clone()) || *r == Renewed::Current(c.clone())), "{got:?}");
            assert_eq!(s.project("p").unwrap().unwrap().next_serial, 3);
            assert_eq!(s.export().unwrap().certs.len(), 2);
        }

        fn a_revocation_racing_renewals_still_revokes_every_certificate(s, connect) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 5)).unwrap();
            enroll(s, "t", &[1; 32], 10).unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(9));
            let renewals: Vec<_> = (0..8u64)
                .map(|i| {
                    let (mut store, start) = (connect(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        store
                            .renew(
                                &Renewal { node: "client1", now: 100 + i, not_after: 2000, min_interval: 0 },
                                &mut |serial| {
                                    std::thread::sleep(std::time::Duration::from_millis(20));
                                    Ok(format!("renewed {serial}"))
                                },
                            )
                            .unwrap()
                    })
                })
                .collect();
            let mut revoker = connect();
            start.wait();
            std::thread::sleep(std::time::Duration::from_millis(30));
            revoker.revoke("client1", 150).unwrap();
            let got: Vec<Renewed> = renewals.into_iter().map(|t| t.join().unwrap()).collect();
            // Each renewal either came before the revocation (and its certificate is revoked
            // with the others) or after it (refused).
            assert!(got.iter().all(|r| matches!(r, Renewed::Issued(_) | Renewed::Revoked)), "{got:?}");
            let certs = s.export().unwrap().certs;
            let issued = got.iter().filter(|r| matches!(r, Renewed::Issued(_))).count();
            assert_eq!(certs.len(), 1 + issued);
            assert!(certs.iter().all(|c| c.revoked_at == Some(150)), "{certs:?}");
            println!("{issued} of 8 renewals came before the revocation");
        }
    }

    /// A node revoked by an older `idhal revoke`, which marked only the current certificate:
    /// the one it was renewed from is still valid. Revoking it again puts that one on the CRL
    /// too, at the first revocation's time. `src` and `dst` are two empty databases.
    fn a_second_revoke_marks_what_an_older_one_left(
        src: &mut dyn StateStore,
        dst: &mut dyn StateStore,
    ) {
        src.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(()))
            .unwrap();
        src.create_token(&token("t", 1, 5)).unwrap();
        enroll(src, "t", &[1; 32], 10).unwrap();
        assert_eq!(
            renew(src, "client1", 110, 0),
            Renewed::Issued(cert(2, 110, "renewed 2"))
        );
        src.revoke("client1", 400).unwrap();
        let mut snapshot = src.export().unwrap();
        for c in &mut snapshot.certs {
            if c.serial == 1 {
                c.revoked_at = None;
            }
        }
        dst.import(&snapshot).unwrap();
        let revoked = |s: &mut dyn StateStore| -> Vec<_> {
            s.export()
                .unwrap()
                .certs
                .iter()
                .map(|c| (c.serial, c.revoked_at))
                .collect()
        };
        assert_eq!(revoked(dst), [(1, None), (2, Some(400))]);
        let before = dst.revoke("client1", 600).unwrap().unwrap();
        assert_eq!(before.revoked_at, Some(400), "already revoked");
        assert_eq!(revoked(dst), [(1, Some(400)), (2, Some(400))]);
        let mut listed = Vec::new();
        dst.resign_crl("p", 700, 1700, Resign::Always, &mut |_, r| {
            listed = r.to_vec();
            Ok(String::new())
        })
        .unwrap();
        assert_eq!(listed, [(1, 400), (2, 400)]);
    }

    #[test]
    fn a_second_revoke_marks_what_an_older_one_left_on_sqlite() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut src = Db::open(a.path(), Open::Create).unwrap();
        let mut dst = Db::open(b.path(), Open::Create).unwrap();
        a_second_revoke_marks_what_an_older_one_left(&mut src, &mut dst);
    }

    #[test]
    fn a_second_revoke_marks_what_an_older_one_left_on_postgresql() {
        let Some(pg) = idhal_test_support::pg::shared() else {
            return;
        };
        let mut src = PgStore::connect(&pg.fresh_db(), None, Open::Create).unwrap();
        let mut dst = PgStore::connect(&pg.fresh_db(), None, Open::Create).unwrap();
        a_second_revoke_marks_what_an_older_one_left(&mut src, &mut dst);
    }
}

/// Registers `key` (32 bytes of `k`) for `node` with `endpoints` at `now`.
fn register(s: &mut dyn StateStore, node: &str, k: u8, endpoints: &str, now: u64) -> Registered {
    s.register_peer(&PeerRegistration {
        node,
        wg_key: &[k; 32],
        endpoints,
        now,
        request_time: now,
    })
    .unwrap()
}

/// `(node, first key byte, endpoints)` of each peer `asker` gets (any registration time, at
/// time 0: no certificate expired).
fn listed(s: &mut dyn StateStore, project: &str, asker: &str) -> Vec<(String, u8, String)> {
    s.peers(project, asker, 0, 0, 100)
        .unwrap()
        .into_iter()
        .map(|p| (p.node, p.wg_key[0], p.endpoints))
        .collect()
}

/// The WireGuard registrations of direct paths (`POST /peers`).
mod peers {
    use super::*;

    both! {
        fn peers_register_replace_and_list_without_the_asker_the_revoked_and_the_unregistered(s, _c) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.insert_project("q", 0, "10.9.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 10)).unwrap();
            let mut q = token("tq", 1, 10);
            q.project = "q".into();
            s.create_token(&q).unwrap();
            for k in 1..=3u8 {
                enroll(s, "t", &[k; 32], 10).unwrap();
            }
            let other = s
                .enroll(&Claim { project: "q", ..claim("tq", &[4; 32], 10) }, &mut |a| Ok(format!("pem {}", a.serial)))
                .unwrap();
            // The enrollment key, for the signature check.
            let NodeKey { row, public_key: key, cert_not_after } = s.node_key("client2").unwrap().unwrap();
            assert_eq!((row.id.as_str(), key), ("client2", vec![2u8; 32]));
            assert_eq!(cert_not_after, Some(1010));
            assert_eq!((row.wg_key, row.wg_registered_at), (None, None));
            assert_eq!(s.node_key("client9").unwrap(), None);

            assert_eq!(register(s, "client1", 0xa1, "192.168.1.1:51820", 20), Registered::Done);
            assert_eq!(register(s, "client2", 0xb2, "192.168.1.2:51820 [2001:db8::2]:51820", 21), Registered::Done);
            assert_eq!(register(s, other.node.as_str(), 0xc4, "192.168.1.4:51820", 22), Registered::Done);
            let one = ("client1".to_owned(), 0xa1, "192.168.1.1:51820".to_owned());
            let two = ("client2".to_owned(), 0xb2, "192.168.1.2:51820 [2001:db8::2]:51820".to_owned());
            // Never the asker, never another project's node, never one without a key.
            assert_eq!(listed(s, "p", "client1"), std::slice::from_ref(&two));
            assert_eq!(listed(s, "p", "client2"), std::slice::from_ref(&one));
            assert_eq!(listed(s, "p", "client3"), [one.clone(), two.clone()]);
            assert_eq!(s.peers("p", "client3", 0, 0, 1).unwrap().len(), 1, "limit");
            assert_eq!(listed(s, "q", other.node.as_str()), []);
            let n = s.node("client2").unwrap().unwrap();
            assert_eq!(n.wg_key, Some(idhal_manifest::peers::WgKey([0xb2; 32]).to_string()));
            assert_eq!(n.wg_registered_at, Some(21));
            assert_eq!(s.node("client3").unwrap().unwrap().wg_registered_at, None);

            // Again with the same key and new endpoints (none): replaced whole.
            assert_eq!(register(s, "client1", 0xa1, "", 30), Registered::Done);
            assert_eq!(listed(s, "p", "client3")[0], ("client1".to_owned(), 0xa1, String::new()));
            assert_eq!(s.node("client1").unwrap().unwrap().wg_registered_at, Some(30));
            // A key another node holds, in this project or another: refused, nothing changed.
            assert_eq!(register(s, "client3", 0xb2, "192.168.1.3:1", 31), Registered::KeyHeldBy("client2".into()));
            assert_eq!(register(s, "client3", 0xc4, "192.168.1.3:1", 31), Registered::KeyHeldBy(other.node.clone()));
            assert_eq!(s.node("client3").unwrap().unwrap().wg_key, None);
            // A new key for client1 frees its old one.
            assert_eq!(register(s, "client1", 0xa2, "", 32), Registered::Done);
            // A request older than the one registered (a replay bringing back key 0xa1): refused,
            // nothing changed; the same time again is accepted (a retry within the second).
            let replay = PeerRegistration { node: "client1", wg_key: &[0xa1; 32], endpoints: "", now: 33, request_time: 31 };
            assert_eq!(s.register_peer(&replay).unwrap(), Registered::Older { last: 32 });
            assert_eq!(s.node("client1").unwrap().unwrap().wg_key, Some(idhal_manifest::peers::WgKey([0xa2; 32]).to_string()));
            assert_eq!(register(s, "client1", 0xa2, "", 32), Registered::Done);
            assert_eq!(register(s, "client3", 0xa1, "192.168.1.3:1", 33), Registered::Done);

            // Revoked: gone from every list, and it cannot register again; its key stays taken.
            s.revoke("client2", 40).unwrap();
            assert_eq!(register(s, "client2", 0xb3, "", 41), Registered::Revoked);
            assert_eq!(s.node("client2").unwrap().unwrap().wg_registered_at, Some(21));
            let names = |v: Vec<(String, u8, String)>| v.into_iter().map(|p| p.0).collect::<Vec<_>>();
            assert_eq!(names(listed(s, "p", "client1")), ["client3"]);
            assert_eq!(names(listed(s, "p", "client3")), ["client1"]);
            assert_eq!(register(s, "client1", 0xb2, "", 42), Registered::KeyHeldBy("client2".into()));
            assert_eq!(register(s, "client9", 0xd9, "", 42), Registered::NoNode);
        }

        fn peers_leave_out_stale_registrations_and_expired_certificates(s, _c) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 10)).unwrap();
            let sign = &mut |a: &Allocation| Ok(format!("pem {}", a.serial));
            for (k, not_after) in [(1u8, 1010), (2, 2000), (3, 2000)] {
                s.enroll(&Claim { not_after, ..claim("t", &[k; 32], 10) }, sign).unwrap();
            }
            assert_eq!(s.node_key("client1").unwrap().unwrap().cert_not_after, Some(1010));
            assert_eq!(register(s, "client1", 0xa1, "", 100), Registered::Done);
            assert_eq!(register(s, "client2", 0xa2, "", 200), Registered::Done);
            let names = |s: &mut dyn StateStore, since: u64, now: u64| {
                s.peers("p", "client3", since, now, 100)
                    .unwrap()
                    .into_iter()
                    .map(|p| p.node)
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(s, 0, 500), ["client1", "client2"]);
            // Registered before the cutoff: left out (the cutoff itself still counts).
            assert_eq!(names(s, 100, 500), ["client1", "client2"]);
            assert_eq!(names(s, 101, 500), ["client2"]);
            assert_eq!(names(s, 201, 500), Vec::<String>::new());
            // Registering again brings it back.
            assert_eq!(register(s, "client1", 0xa1, "", 300), Registered::Done);
            assert_eq!(names(s, 201, 500), ["client1"]);
            // A certificate at its not_after is expired (the CRL's rule): left out.
            assert_eq!(names(s, 0, 1009), ["client1", "client2"]);
            assert_eq!(names(s, 0, 1010), ["client2"]);
            assert_eq!(names(s, 0, 2000), Vec::<String>::new());
        }

        fn concurrent_registrations_all_land_and_a_contested_key_goes_to_one(s, connect) {
            s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(())).unwrap();
            s.create_token(&token("t", 1, 100)).unwrap();
            for k in 1..=16u8 {
                enroll(s, "t", &[k; 32], 10).unwrap();
            }
            let connect = std::sync::Arc::new(connect);
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8u8)
                .map(|t| {
                    let (connect, start) = (connect.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut store = connect();
                        start.wait();
                        // Its own key for client(t+1), then the same key for client(t+9) as all others.
                        let own = register(store.as_mut(), &format!("client{}", t + 1), t + 1, "192.168.2.1:1", 50);
                        let contested = register(store.as_mut(), &format!("client{}", t + 9), 0xee, "192.168.2.2:2", 50);
                        (own, contested)
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert!(results.iter().all(|(own, _)| *own == Registered::Done), "{results:?}");
            let winners = results.iter().filter(|(_, c)| *c == Registered::Done).count();
            assert_eq!(winners, 1, "{results:?}");
            // Asked by client1 (never a contender for 0xee): the 7 other own keys and the winner.
            let listed_all = listed(s, "p", "client1");
            assert_eq!(listed_all.len(), 8, "{listed_all:?}");
            let holder = listed_all.iter().find(|p| p.1 == 0xee).unwrap().0.clone();
            for (_, c) in &results {
                if *c != Registered::Done {
                    assert_eq!(*c, Registered::KeyHeldBy(holder.clone()));
                }
            }
        }
    }
}

#[test]
fn an_empty_database_is_refused_until_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(dir.path(), Open::Migrate).unwrap();
    assert_eq!(db.schema_version().unwrap(), 0);
    drop(db);
    let e = Db::open(dir.path(), Open::Existing).err().unwrap();
    assert!(matches!(e, StateError::Empty(_)), "{e}");
    let mut db = Db::open(dir.path(), Open::Migrate).unwrap();
    assert_eq!(
        migrate(&mut db, MIGRATIONS).unwrap(),
        migrate::Migrated {
            from: 0,
            to: SCHEMA_VERSION
        }
    );
    Db::open(dir.path(), Open::Existing).unwrap();
}

/// A connect hook reads the projects, then its node: through one connection (one "connection
/// authorized" line in PostgreSQL's log for the database), not one each.
#[test]
fn hook_lookups_open_the_state_once() {
    let Some(pg) = idhal_test_support::pg::shared() else {
        return;
    };
    let url = pg.fresh_db();
    let db = url.rsplit('/').next().unwrap().to_owned();
    PgStore::connect(&url, None, Open::Create).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::default();
    cfg.state.database = Some(url);
    let opened = || {
        std::fs::read_to_string(pg.log())
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains("connection authorized") && l.contains(&format!("database={db} "))
            })
            .count()
    };
    let before = opened();
    assert!(lookup_projects(&cfg, dir.path()).unwrap().is_empty());
    assert_eq!(lookup_node(&cfg, dir.path(), "client1").unwrap(), None);
    assert_eq!(lookup_projects(&cfg, dir.path()).unwrap().len(), 0);
    assert_eq!(opened() - before, 1, "connections opened by three lookups");
    // Without a database, no state: nothing known, nothing refused.
    let none = ServerConfig::default();
    assert_eq!(lookup_node(&none, dir.path(), "client1").unwrap(), None);
}

/// `idhal db copy`'s two halves: every row and counter survives SQLite → PostgreSQL → SQLite,
/// the copy goes on exactly where the source stopped, and only an empty database at the same
/// schema version is filled.
#[test]
fn a_copy_keeps_every_row_and_counter_and_fills_only_an_empty_database() {
    let Some(pg) = idhal_test_support::pg::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lite = Db::open(dir.path(), Open::Create).unwrap();
    let s: &mut dyn StateStore = &mut lite;
    s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(()))
        .unwrap();
    s.insert_project("q", 5, "10.9.0.0/24", &mut |_| Ok(()))
        .unwrap();
    s.create_token(&token("t", 1, 5)).unwrap();
    s.create_token(&token("u", 2, 1)).unwrap();
    for k in 1..=3u8 {
        enroll(s, "t", &[k; 32], 10).unwrap();
    }
    assert_eq!(
        register(s, "client1", 0xa1, "192.168.1.1:51820", 15),
        Registered::Done
    );
    s.revoke("client2", 20).unwrap();
    s.issue_server_cert(
        "p",
        "vpn1",
        1,
        2,
        &mut |n| Ok(format!("srv {n}")),
        &mut |_| Ok(()),
    )
    .unwrap();
    s.resign_crl("p", 30, 1000, Resign::Always, &mut |_, _| Ok("crl".into()))
        .unwrap();
    let snap = s.export().unwrap();
    assert_eq!(
        (
            snap.projects.len(),
            snap.tokens.len(),
            snap.certs.len(),
            snap.nodes.len()
        ),
        (2, 2, 4, 3)
    );
    assert_eq!((snap.next_node, snap.schema_version), (4, SCHEMA_VERSION));
    assert_eq!(
        (
            snap.nodes[0].wg_key.as_deref(),
            snap.nodes[0].wg_endpoints.as_str(),
            snap.nodes[0].wg_registered_at
        ),
        (Some(&[0xa1; 32][..]), "192.168.1.1:51820", Some(15))
    );

    let mut target = PgStore::connect(&pg.fresh_db(), None, Open::Create).unwrap();
    target.import(&snap).unwrap();
    assert_eq!(target.export().unwrap(), snap);
    // Both go on with the same next node, address and serial; the revoked key stays refused.
    let on_pg = enroll(&mut target, "t", &[9; 32], 40).unwrap();
    let on_lite = enroll(&mut lite, "t", &[9; 32], 40).unwrap();
    assert_eq!(
        (on_pg.node.as_str(), on_pg.address, on_pg.pem.as_str()),
        (on_lite.node.as_str(), on_lite.address, on_lite.pem.as_str())
    );
    assert_eq!(
        (on_pg.node.as_str(), on_pg.pem.as_str()),
        ("client4", "pem 5")
    );
    assert!(matches!(
        enroll(&mut target, "t", &[2; 32], 40),
        Err(Refusal::KeyInUse)
    ));
    // The WireGuard registration came along: listed, and its key still one node's.
    assert_eq!(
        listed(&mut target, "p", "client3"),
        [("client1".to_owned(), 0xa1, "192.168.1.1:51820".to_owned())]
    );
    assert_eq!(
        register(&mut target, "client3", 0xa1, "", 41),
        Registered::KeyHeldBy("client1".into())
    );

    // Filled once: a second copy is refused and changes nothing.
    let before = target.export().unwrap();
    match target.import(&snap) {
        Err(e @ StateError::NotEmpty(_)) => assert!(
            e.to_string().ends_with(
                "is not empty: `idhal db copy` only fills an empty database (nothing copied)"
            ),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(target.export().unwrap(), before);
    // Another schema version: refused.
    let mut other = PgStore::connect(&pg.fresh_db(), None, Open::Create).unwrap();
    let newer = Snapshot {
        schema_version: SCHEMA_VERSION + 1,
        ..snap.clone()
    };
    assert!(matches!(
        other.import(&newer),
        Err(StateError::CopyVersion {
            found: SCHEMA_VERSION,
            source_version,
            ..
        }) if source_version == SCHEMA_VERSION + 1
    ));
    assert_eq!(other.export().unwrap().projects.len(), 0);

    // And back into an empty SQLite file: the same rows.
    let dir2 = tempfile::tempdir().unwrap();
    let mut back = Db::open(dir2.path(), Open::Create).unwrap();
    back.import(&before).unwrap();
    assert_eq!(back.export().unwrap(), before);
}

/// Servers starting together on an empty database: each step applied once, all of them open.
#[test]
fn concurrent_first_opens_migrate_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let sqlite: Connect = Box::new(move || Box::new(Db::open(&path, Open::Create).unwrap()));
    let mut backends = vec![("sqlite", sqlite)];
    if let Some(pg) = idhal_test_support::pg::shared() {
        let url = pg.fresh_db();
        let postgres: Connect = Box::new(move || {
            // A first look, as `migrate` takes, before the others commit.
            let mut s = PgStore::connect(&url, None, Open::Migrate).unwrap();
            s.schema_version().unwrap();
            migrate(&mut s, MIGRATIONS).unwrap();
            Box::new(s)
        });
        backends.push(("postgres", postgres));
    }
    for (name, connect) in backends {
        let connect = std::sync::Arc::new(connect);
        let start = std::sync::Arc::new(std::sync::Barrier::new(6));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (connect, start) = (connect.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    connect().schema_version().unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), SCHEMA_VERSION, "{name}");
        }
    }
}

/// A database of version 1 with a project whose CRL is valid for long: migrated to 2, it holds
/// no CRL yet, and the first due-check signs and stores one although the time is not due.
#[test]
fn a_version_1_database_migrates_and_its_first_check_stores_a_crl() {
    let dir = tempfile::tempdir().unwrap();
    let path = Db::path(dir.path());
    type Raw = Box<dyn Fn(&str)>;
    let sqlite_raw: Raw = Box::new(move |sql| {
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(sql)
            .unwrap()
    });
    let mut stores: Vec<(Box<dyn StateStore>, Raw)> = vec![(
        Box::new(Db::open(dir.path(), Open::Migrate).unwrap()),
        sqlite_raw,
    )];
    if let Some(pg) = idhal_test_support::pg::shared() {
        let url = pg.fresh_db();
        let store = PgStore::connect(&url, None, Open::Migrate).unwrap();
        let raw: Raw = Box::new(move |sql| {
            ::postgres::Client::connect(&url, ::postgres::NoTls)
                .unwrap()
                .batch_execute(sql)
                .unwrap()
        });
        stores.push((Box::new(store), raw));
    }
    for (mut s, raw) in stores {
        let s = s.as_mut();
        migrate(s, &MIGRATIONS[..1]).unwrap();
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(()))
            .unwrap();
        // As version 1 left it: CRL number 4, valid until 100000.
        raw("UPDATE projects SET crl_number = 4, crl_next_update = 100000");
        assert_eq!(
            migrate(s, MIGRATIONS).unwrap(),
            migrate::Migrated {
                from: 1,
                to: SCHEMA_VERSION
            }
        );
        assert_eq!(s.newest_crl("p").unwrap(), None, "{}", s.describe());
        let due = Resign::IfDue { validity: 1000 };
        assert_eq!(
            s.resign_crl("p", 10, 1010, due, &mut |n, _| Ok(format!("crl {n}")))
                .unwrap(),
            Some(5),
            "{}",
            s.describe()
        );
        assert_eq!(s.newest_crl("p").unwrap(), Some((5, "crl 5".into())));
        // Stored: the next check finds it not due.
        assert_eq!(
            s.resign_crl("p", 11, 1011, due, &mut |_, _| panic!("signed"))
                .unwrap(),
            None
        );
    }
}

/// A database of version 2 with enrolled nodes: migrated to 3, every node is there with no
/// WireGuard key, and registering one works on both backends.
#[test]
fn a_version_2_database_migrates_with_its_nodes_unregistered() {
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<Box<dyn StateStore>> =
        vec![Box::new(Db::open(dir.path(), Open::Migrate).unwrap())];
    if let Some(pg) = idhal_test_support::pg::shared() {
        stores.push(Box::new(
            PgStore::connect(&pg.fresh_db(), None, Open::Migrate).unwrap(),
        ));
    }
    for mut s in stores {
        let s = s.as_mut();
        migrate(s, &MIGRATIONS[..2]).unwrap();
        s.insert_project("p", 0, "10.8.0.0/24", &mut |_| Ok(()))
            .unwrap();
        s.create_token(&token("t", 1, 5)).unwrap();
        enroll(s, "t", &[1; 32], 10).unwrap();
        enroll(s, "t", &[2; 32], 10).unwrap();
        assert_eq!(
            migrate(s, MIGRATIONS).unwrap(),
            migrate::Migrated { from: 2, to: 3 }
        );
        let n = s.node("client1").unwrap().unwrap();
        assert_eq!(
            (n.enrolled_at, n.wg_key, n.wg_registered_at),
            (10, None, None),
            "{}",
            s.describe()
        );
        assert_eq!(listed(s, "p", "client2"), []);
        assert_eq!(
            register(s, "client1", 7, "192.168.0.1:1", 20),
            Registered::Done
        );
        assert_eq!(listed(s, "p", "client2").len(), 1, "{}", s.describe());
    }
}
