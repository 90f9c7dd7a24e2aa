//! The state on PostgreSQL through the real `idhal` binary: enrollment through `idhal serve`
//! (the sync client off the async workers), two `idhal serve` sharing one database (distinct
//! ids, addresses and serials; a one-use token redeemed once; CRL numbers never going back),
//! and every way the database can be wrong, each refused in one line. One private cluster on
//! 127.0.0.1 per test binary, a fresh database per test.

mod enroll_support;

use enroll_support::*;
use idhal_manifest::peers::WgKey;
use idhal_test_support::pg::{shared, Postgres};
use std::collections::HashSet;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Barrier};

/// A project on a fresh database of the shared cluster (`ca init` migrates it).
fn pg_project() -> Option<(&'static Postgres, String, Project)> {
    let pg = shared()?;
    let url = pg.fresh_db();
    let p = Project::new(&format!("[state]\ndatabase = \"{url}\"\n"));
    Some((pg, url, p))
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

fn lines(o: &Output) -> (Option<i32>, String, String) {
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `idhal db status` with `config` as the whole server config, in a fresh state dir.
fn status(dir: &Path, config: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = std::process::Command::new(IDHAL);
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .env_remove("PGPASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn a_node_enrolls_through_idhal_serve_on_postgresql() {
    let Some((pg, url, p)) = pg_project() else {
        return;
    };
    let server = p.serve();
    assert!(
        server.log().contains(&format!("(state {url})")),
        "{}",
        server.log()
    );
    let token = p.token(&["--uses", "2"]);
    let key = NodeKey::random();
    let r = enroll(&server.addr, &p.enroll_key, &token, &key).expect("enrolled");
    assert_eq!(
        (r.node.as_str(), r.address.to_string()),
        ("client1", "10.134.0.2".into())
    );
    // A retry gets the same node; the row is in PostgreSQL, not in a SQLite file.
    let again = enroll(&server.addr, &p.enroll_key, &token, &key).expect("re-sent");
    assert_eq!(again.node, "client1");
    assert!(!p.state.join("idhal.sqlite").exists());
    assert_eq!(
        pg.psql(db_name(&url), "SELECT id, address, cert_serial FROM nodes")
            .trim(),
        "client1|10.134.0.2|1"
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes[0]["id"], "client1");
    // Revoked on PostgreSQL: the key is refused, the CRL re-signed (number 2).
    // (Exit 4: no OpenVPN management interface answers here to drop the session.)
    let revoked = p.idhal(&["revoke", "client1"]);
    assert!(
        String::from_utf8_lossy(&revoked.stdout).starts_with("client1: revoked (project default"),
        "{revoked:?}"
    );
    assert_eq!(
        enroll(&server.addr, &p.enroll_key, &token, &key)
            .unwrap_err()
            .0,
        409
    );
    assert_eq!(
        pg.psql(db_name(&url), "SELECT crl_number FROM projects")
            .trim(),
        "2"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn two_servers_on_one_database_hand_out_200_distinct_ids_addresses_and_serials() {
    let Some((pg, url, p)) = pg_project() else {
        return;
    };
    let servers = Arc::new([p.serve(), p.serve()]);
    let token = Arc::new(p.token(&["--uses", "200"]));
    let key = p.enroll_key;
    let start = Arc::new(Barrier::new(201));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let (servers, token, start) = (servers.clone(), token.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                enroll(&servers[i % 2].addr, &key, &token, &NodeKey::random())
            })
        })
        .collect();
    start.wait();
    let began = std::time::Instant::now();
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().unwrap().expect("enrolled"))
        .collect();
    // A figure, not a limit (debug build, shared machine).
    eprintln!(
        "200 enrollments over two idhal serve on PostgreSQL: {:.2} s",
        began.elapsed().as_secs_f64()
    );
    let ids: HashSet<_> = results.iter().map(|r| r.node.clone()).collect();
    let addrs: HashSet<_> = results.iter().map(|r| r.address).collect();
    assert_eq!((ids.len(), addrs.len()), (200, 200));
    let db = db_name(&url);
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*), count(DISTINCT cert_serial), count(DISTINCT address), min(num), max(num) FROM nodes"
        )
        .trim(),
        "200|200|200|1|200",
        "no gaps, nothing twice"
    );
    // Both servers enrolled (their logs), and the token's uses are spent for both.
    for s in servers.iter() {
        assert!(
            s.log().contains("idhal serve: enrolled client"),
            "{}",
            s.log()
        );
    }
    for s in servers.iter() {
        let refused = enroll(&s.addr, &key, &token, &NodeKey::random()).unwrap_err();
        assert_eq!(refused, (409, "token used up".into()));
    }
}

#[test]
fn twenty_redemptions_of_a_one_use_token_across_two_servers_let_exactly_one_in() {
    let Some((pg, url, p)) = pg_project() else {
        return;
    };
    let servers = Arc::new([p.serve(), p.serve()]);
    let token = Arc::new(p.token(&[]));
    let key = p.enroll_key;
    let start = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let (servers, token, start) = (servers.clone(), token.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                enroll(&servers[i % 2].addr, &key, &token, &NodeKey::random())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert_eq!(admitted, 1, "refusals: {refused:?}");
    assert!(
        refused.iter().all(|r| *r == (409, "token used up".into())),
        "{refused:?}"
    );
    assert_eq!(
        pg.psql(
            db_name(&url),
            "SELECT used, (SELECT count(*) FROM nodes) FROM tokens"
        )
        .trim(),
        "1|1"
    );
}

/// The CRL number of `crl.pem` (openssl).
fn crl_number(p: &Project) -> u64 {
    let (good, out) = openssl_try(
        p.dir.path(),
        &[
            "crl",
            "-noout",
            "-crlnumber",
            "-in",
            p.ca_dir().join("crl.pem").to_str().unwrap(),
        ],
    );
    assert!(good, "{out}");
    u64::from_str_radix(out.trim().trim_start_matches("crlNumber=0x"), 16).unwrap()
}

#[test]
fn crl_resigning_by_many_at_once_signs_once_when_due_and_never_goes_back() {
    let Some((pg, url, p)) = pg_project() else {
        return;
    };
    // Two servers running (their CRL threads check too), and ten refreshes at once.
    let _servers = [p.serve(), p.serve()];
    let db = db_name(&url);
    let refresh = |args: &'static [&'static str]| {
        let start = Arc::new(Barrier::new(10));
        let threads: Vec<_> = (0..10)
            .map(|_| {
                let (state, config, start) = (p.state.clone(), p.config.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    ok(idhal(&state, Some(&config), args))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    };
    // Made due (nextUpdate in the past): exactly one re-signs, one of the ten or a server's
    // own CRL thread that got there first (then all ten find it not due).
    pg.psql(db, "UPDATE projects SET crl_next_update = 0");
    let out = refresh(&["crl", "refresh"]);
    let signed = out.iter().filter(|o| o.contains("CRL re-signed")).count();
    let not_due = out.iter().filter(|o| o.contains("CRL not due")).count();
    assert!(signed <= 1 && signed + not_due == 10, "{out:?}");
    assert_eq!(pg.psql(db, "SELECT crl_number FROM projects").trim(), "2");
    // Forced, all ten sign: ten new numbers, and the published file holds the last one.
    refresh(&["crl", "refresh", "--force"]);
    assert_eq!(pg.psql(db, "SELECT crl_number FROM projects").trim(), "12");
    assert_eq!(crl_number(&p), 12);
}

#[test]
fn each_wrong_database_is_refused_in_one_clear_line() {
    let Some(pg) = shared() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = pg.port;
    let one_line_error = |o: &Output| {
        let (code, out, err) = lines(o);
        assert_eq!(code, Some(1), "{out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        err.trim_end().to_owned()
    };

    // No database in the URL.
    let o = status(
        dir,
        &format!("[state]\ndatabase = \"postgresql://postgres@127.0.0.1:{port}\"\n"),
        &[],
        &["db", "status"],
    );
    assert_eq!(
        one_line_error(&o),
        format!("idhal: error: [state] database postgresql://postgres@127.0.0.1:{port}: names no database: add it (postgresql://USER@HOST:PORT/DB, or dbname=DB)")
    );

    // A password in the URL: refused, and not repeated.
    let o = status(
        dir,
        &format!("[state]\ndatabase = \"postgresql://postgres:hunter2@127.0.0.1:{port}/x\"\n"),
        &[],
        &["db", "status"],
    );
    assert_eq!(
        one_line_error(&o),
        format!("idhal: error: [state] database postgresql://postgres@127.0.0.1:{port}/x: holds a password: put it in [state] password_file or PGPASSWORD instead")
    );

    // Not a connection string at all.
    let o = status(
        dir,
        "[state]\ndatabase = \"postgresql://[\"\n",
        &[],
        &["db", "status"],
    );
    let e = one_line_error(&o);
    assert!(
        e.starts_with(
            "idhal: error: [state] database postgresql://[: not a PostgreSQL connection string ("
        ),
        "{e}"
    );

    // Nobody listening there.
    let down = idhal_test_support::free_port();
    let o = status(
        dir,
        &format!("[state]\ndatabase = \"postgresql://postgres@127.0.0.1:{down}/idhal\"\n"),
        &[],
        &["db", "status"],
    );
    assert_eq!(
        one_line_error(&o),
        format!("idhal: error: state database postgresql://postgres@127.0.0.1:{down}/idhal: error connecting to server: Connection refused (os error 111)")
    );

    // A wrong password (from the file; the right one from PGPASSWORD or the file works).
    let url = pg.fresh_db();
    let db = db_name(&url).to_owned();
    pg.password_role("idhal_pw", "right-one", &db);
    let pw_url = format!("postgresql://idhal_pw@127.0.0.1:{port}/{db}");
    let wrong = dir.join("wrong.pw");
    std::fs::write(&wrong, "wrong-one\n").unwrap();
    let config = format!(
        "[state]\ndatabase = \"{pw_url}\"\npassword_file = \"{}\"\n",
        wrong.display()
    );
    let expected = format!("idhal: error: state database {pw_url}: password authentication failed for user \"idhal_pw\"");
    // The rule takes effect once PostgreSQL has reloaded its configuration.
    wait_for(
        "pg_hba.conf reloaded",
        std::time::Duration::from_secs(10),
        || {
            let (_, _, err) = lines(&status(dir, &config, &[], &["db", "status"]));
            err.trim_end() == expected
        },
    );
    let o = status(dir, &config, &[], &["db", "status"]);
    assert_eq!(one_line_error(&o), expected);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("wrong-one"));
    // Right password from the environment: connected; the database is still empty.
    let o = status(
        dir,
        &format!("[state]\ndatabase = \"{pw_url}\"\n"),
        &[("PGPASSWORD", "right-one")],
        &["db", "status"],
    );
    let (code, out, err) = lines(&o);
    assert_eq!(
        (code, out.trim_end(), err.as_str()),
        (
            Some(1),
            format!("{pw_url}: state database {pw_url} has no idhal schema yet: run `idhal db migrate` (or `idhal ca init`)").as_str(),
            ""
        )
    );
    // Right password from a file: migrated, then current.
    let right = dir.join("right.pw");
    std::fs::write(&right, "right-one\n").unwrap();
    let config = format!(
        "[state]\ndatabase = \"{pw_url}\"\npassword_file = \"{}\"\n",
        right.display()
    );
    let o = status(dir, &config, &[], &["db", "migrate"]);
    assert_eq!(
        lines(&o),
        (
            Some(0),
            format!("{pw_url}: schema migrated from version 0 to 3\n"),
            String::new()
        )
    );
    let o = status(dir, &config, &[], &["db", "migrate"]);
    assert_eq!(
        lines(&o).1,
        format!("{pw_url}: schema version 3, up to date\n")
    );
    let o = status(dir, &config, &[], &["db", "status"]);
    assert_eq!(
        lines(&o),
        (
            Some(0),
            format!("{pw_url}: schema version 3 (this idhal: 3), up to date\n"),
            String::new()
        )
    );

    // A database a newer idhal migrated: every command refuses it, nothing is downgraded.
    pg.psql(
        &db,
        "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
    );
    let newer = format!(
        "state database {pw_url} has schema version 99; this idhal knows 3 (upgrade idhal)"
    );
    let o = status(dir, &config, &[], &["nodes"]);
    assert_eq!(one_line_error(&o), format!("idhal: error: {newer}"));
    let o = status(dir, &config, &[], &["db", "migrate"]);
    assert_eq!(one_line_error(&o), format!("idhal: error: {newer}"));
    let o = status(dir, &config, &[], &["db", "status"]);
    assert_eq!(
        lines(&o),
        (Some(1), format!("{pw_url}: {newer}\n"), String::new())
    );
    assert_eq!(
        pg.psql(&db, "SELECT value FROM meta WHERE key = 'schema_version'")
            .trim(),
        "99"
    );
}

#[test]
fn a_unix_socket_works_too() {
    let Some(pg) = shared() else {
        return;
    };
    let url = pg.fresh_db();
    let tmp = tempfile::tempdir().unwrap();
    let kv = format!(
        "host={} port={} user=postgres dbname={}",
        pg.dir.display(),
        pg.port,
        db_name(&url)
    );
    let o = status(
        tmp.path(),
        &format!("[state]\ndatabase = \"{kv}\"\n"),
        &[],
        &["db", "migrate"],
    );
    assert_eq!(
        lines(&o),
        (
            Some(0),
            format!("{kv}: schema migrated from version 0 to 3\n"),
            String::new()
        )
    );
}

#[test]
fn db_copy_moves_a_sqlite_state_to_postgresql_where_enrollment_goes_on() {
    let Some(pg) = shared() else {
        return;
    };
    let p = Project::new("");
    let token = p.token(&["--uses", "3"]);
    let wg = idhal_manifest::peers::WgKey([0xa1; 32]);
    let second = NodeKey::random();
    {
        let server = p.serve();
        let first = NodeKey::random();
        enroll(&server.addr, &p.enroll_key, &token, &first).unwrap();
        enroll(&server.addr, &p.enroll_key, &token, &second).unwrap();
        // client1 registers a WireGuard key and an endpoint: copied with its node.
        let req = peers_request("client1", wg, &["192.168.7.1:51820"], now(), &first);
        peers_exchange(&server.addr, &p.enroll_key, &req).unwrap();
    }
    let nodes_before = ok(p.idhal(&["nodes", "--json"]));
    assert!(nodes_before.contains(&wg.to_string()), "{nodes_before}");
    let url = pg.fresh_db();
    let out = ok(p.idhal(&["db", "copy", "--to", &url]));
    assert_eq!(
        out,
        format!(
            "copied 1 project(s), 1 token(s), 2 certificate(s), 2 node(s) from {} to {url} \
             (schema version 3, next node number 3); set [state] database to use it\n",
            p.state.join("idhal.sqlite").display()
        )
    );
    // A second copy into it: refused in one line, nothing changed.
    let again = p.idhal(&["db", "copy", "--to", &url]);
    let (code, _, err) = lines(&again);
    assert_eq!(
        (code, err),
        (
            Some(1),
            format!("idhal: error: state database {url} is not empty: `idhal db copy` only fills an empty database (nothing copied)\n")
        )
    );
    // Switched over: the same nodes, and the next enrollment goes on from the copied counters.
    std::fs::write(&p.config, format!("[state]\ndatabase = \"{url}\"\n")).unwrap();
    assert_eq!(ok(p.idhal(&["nodes", "--json"])), nodes_before);
    let server = p.serve();
    let r = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap();
    assert_eq!(
        (r.node.as_str(), r.address.to_string()),
        ("client3", "10.134.0.4".into())
    );
    let refused = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap_err();
    assert_eq!(refused, (409, "token used up".into()));
    // POST /peers on PostgreSQL: client2 gets client1 as copied, and its key stays client1's.
    let req = peers_request("client2", WgKey([0xb2; 32]), &[], now(), &second);
    let list = peers_exchange(&server.addr, &p.enroll_key, &req).unwrap();
    assert_eq!(
        list.peers,
        [idhal_manifest::peers::Peer {
            node: "client1".into(),
            address: "10.134.0.2".parse().unwrap(),
            wg_key: wg,
            endpoints: vec!["192.168.7.1:51820".parse().unwrap()],
        }]
    );
    let req = peers_request("client2", wg, &[], now(), &second);
    assert_eq!(
        peers_exchange(&server.addr, &p.enroll_key, &req)
            .unwrap_err()
            .0,
        409
    );
}

#[test]
fn a_database_that_never_answers_or_an_empty_url_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    // Accepts connections on loopback and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for s in silent.incoming().take(1) {
            open.push(s.unwrap());
        }
        // Held until the test ends (the thread is not joined).
        std::thread::park();
        drop(open);
    });
    let url = format!("postgresql://idhal@127.0.0.1:{port}/idhal");
    let began = std::time::Instant::now();
    let o = status(
        tmp.path(),
        &format!("[state]\ndatabase = \"{url}\"\nconnect_timeout_secs = 1\n"),
        &[],
        &["nodes"],
    );
    eprintln!(
        "a silent server was given up on after {:.1} s",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(
        lines(&o),
        (
            Some(1),
            String::new(),
            format!("idhal: error: state database {url}: no answer within 1 s ([state] connect_timeout_secs): is PostgreSQL listening there?\n")
        )
    );
    drop(held);

    let o = status(tmp.path(), "[state]\ndatabase = \"\"\n", &[], &["nodes"]);
    assert_eq!(
        lines(&o),
        (
            Some(1),
            String::new(),
            "idhal: error: [state] database : is empty: write postgresql://USER@HOST:PORT/DB, or remove it for SQLite in --state-dir\n".into()
        )
    );
}

#[test]
fn a_password_file_that_is_missing_empty_huge_or_binary_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let url = "postgresql://idhal@127.0.0.1:9/idhal";
    let refused = |file: &Path| {
        let o = status(
            tmp.path(),
            &format!(
                "[state]\ndatabase = \"{url}\"\npassword_file = \"{}\"\n",
                file.display()
            ),
            &[],
            &["nodes"],
        );
        let (code, out, err) = lines(&o);
        assert_eq!(
            (code, out.as_str(), err.lines().count()),
            (Some(1), "", 1),
            "{err}"
        );
        err.trim_end()
            .strip_prefix(&format!(
                "idhal: error: [state] database {url}: password_file "
            ))
            .unwrap_or_else(|| panic!("{err}"))
            .to_owned()
    };
    let f = tmp.path().join("pw");
    assert_eq!(
        refused(&f),
        format!("{}: No such file or directory (os error 2)", f.display())
    );
    std::fs::write(&f, "\nsecond line\n").unwrap();
    assert_eq!(
        refused(&f),
        format!(
            "{} has an empty first line: write the password there",
            f.display()
        )
    );
    std::fs::write(&f, vec![b'x'; 1 << 20]).unwrap();
    assert_eq!(
        refused(&f),
        format!(
            "{} is larger than 4096 bytes: not a password file",
            f.display()
        )
    );
    // Endless: read no further than the limit.
    assert_eq!(
        refused(Path::new("/dev/zero")),
        "/dev/zero is larger than 4096 bytes: not a password file"
    );
    std::fs::write(&f, [0xff, 0xfe, b'\n']).unwrap();
    assert_eq!(refused(&f), format!("{} is not UTF-8 text", f.display()));
}

/// Seconds since the epoch of an RFC 3339 UTC time as idhal prints it (`2027-01-02T17:23:58Z`).
fn epoch(t: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

#[test]
fn two_servers_keeping_the_crl_fresh_re_sign_once_per_due_time_never_going_back() {
    let Some(pg) = shared() else {
        return;
    };
    assert_eq!(epoch("1970-01-02T00:00:01Z"), 86_401);
    let url = pg.fresh_db();
    // Valid 10 s: each server's CRL thread looks every second and re-signs below 5 s left.
    let p = Project::new(&format!(
        "[ca]\ncrl_validity = \"10s\"\n[state]\ndatabase = \"{url}\"\n"
    ));
    let servers = [p.serve(), p.serve()];
    let resigned = |servers: &[Server]| -> Vec<i64> {
        let mut until: Vec<i64> = servers
            .iter()
            .flat_map(|s| {
                s.log()
                    .lines()
                    .filter_map(|l| {
                        l.split_once("re-signed, valid until ")
                            .map(|(_, t)| epoch(t))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        until.sort();
        until
    };
    let mut seen = vec![crl_number(&p)];
    wait_for(
        "four re-signings by the two servers",
        std::time::Duration::from_secs(90),
        || {
            let n = crl_number(&p);
            seen.push(n);
            resigned(&servers).len() >= 4
        },
    );
    // The published number never went back.
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let until = resigned(&servers);
    // Each due time re-signed once: one server found it done by the other (at least half the
    // validity between two, less a second of rounding).
    assert!(until.windows(2).all(|w| w[1] - w[0] >= 4), "{until:?}");
    let number: usize = pg
        .psql(db_name(&url), "SELECT crl_number FROM projects")
        .trim()
        .parse()
        .unwrap();
    assert!(number > until.len(), "{number} vs {until:?}");
    for s in &servers {
        assert!(!s.log().contains("error"), "{}", s.log());
    }
}

/// The serials `crl.pem` in `dir` lists (openssl), and its number.
fn crl_listing(dir: &Path) -> (u64, Vec<u64>) {
    let (good, out) = openssl_try(
        dir,
        &[
            "crl",
            "-noout",
            "-text",
            "-in",
            dir.join("crl.pem").to_str().unwrap(),
        ],
    );
    assert!(good, "{out}");
    let mut number = None;
    let mut serials = Vec::new();
    let mut lines = out.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if l.starts_with("X509v3 CRL Number:") {
            number = lines.next().map(|n| n.parse().unwrap());
        } else if let Some(s) = l.strip_prefix("Serial Number: ") {
            serials.push(u64::from_str_radix(s, 16).unwrap());
        }
    }
    (number.unwrap_or_else(|| panic!("{out}")), serials)
}

#[test]
fn a_revocation_through_one_server_reaches_the_crl_of_another_with_its_own_state_dir() {
    let Some(pg) = shared() else {
        return;
    };
    let url = pg.fresh_db();
    let config = format!("[state]\ndatabase = \"{url}\"\ncrl_publish_secs = 1\n");
    let a = Project::new(&config);
    // Server B: its own --state-dir, holding only the project's keys (no crl.pem yet).
    let b_dir = tempfile::tempdir().unwrap();
    let b_state = b_dir.path().join("state");
    let b_project = b_state.join("projects/default");
    std::fs::create_dir_all(&b_project).unwrap();
    for f in ["ca.key", "ca.crt", "enroll.key"] {
        std::fs::copy(a.ca_dir().join(f), b_project.join(f)).unwrap();
    }
    let b_config = b_dir.path().join("server.toml");
    std::fs::write(&b_config, &config).unwrap();
    std::fs::create_dir_all(b_dir.path().join("pub")).unwrap();
    let b = Server::start(&b_state, &b_config, &b_dir.path().join("pub"));
    // B publishes the database's CRL (number 1, from `ca init` on A) on its own.
    let b_crl = b_project.join("crl.pem");
    wait_for(
        "B's first crl.pem",
        std::time::Duration::from_secs(60),
        || b_crl.exists(),
    );
    assert_eq!(crl_listing(&b_project), (1, vec![]));

    // A node enrolls through B (which writes no file for it: its address is in the database),
    // and is revoked through A's state dir.
    let token = a.token(&[]);
    let r = enroll(&b.addr, &a.enroll_key, &token, &NodeKey::random()).unwrap();
    let revoked = a.idhal(&["revoke", &r.node]);
    assert!(
        String::from_utf8_lossy(&revoked.stdout).contains("re-signed"),
        "{revoked:?}"
    );
    assert_eq!(crl_listing(&a.ca_dir()), (2, vec![1]));
    // B's crl.pem lists it soon, without any file copied; its number never went back.
    let mut seen = Vec::new();
    wait_for(
        "the revocation in B's crl.pem",
        std::time::Duration::from_secs(60),
        || {
            let now = crl_listing(&b_project);
            seen.push(now.0);
            now == (2, vec![1])
        },
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        b.log()
            .contains("CRL of project default number 2 published from the state database"),
        "{}",
        b.log()
    );
    // `idhal crl refresh` on a third state dir pulls it too, once.
    let c_dir = tempfile::tempdir().unwrap();
    let c_project = c_dir.path().join("projects/default");
    std::fs::create_dir_all(&c_project).unwrap();
    let c_config = c_dir.path().join("server.toml");
    std::fs::write(&c_config, &config).unwrap();
    let out = ok(idhal(c_dir.path(), Some(&c_config), &["crl", "refresh"]));
    assert_eq!(
        out,
        "default: CRL not due; crl.pem updated to the database's number 2\n"
    );
    assert_eq!(crl_listing(&c_project), (2, vec![1]));
    let out = ok(idhal(c_dir.path(), Some(&c_config), &["crl", "refresh"]));
    assert_eq!(out, "default: CRL not due\n");
    assert!(!b.log().contains("error"), "{}", b.log());
}

/// Runs `cmd` to its end, failing the test (the child killed) if it has not ended by `limit`.
fn output_within(cmd: &mut std::process::Command, limit: std::time::Duration) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{cmd:?} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_lock_held_elsewhere_fails_a_command_and_an_enrollment_within_the_statement_timeout() {
    let Some(pg) = shared() else {
        return;
    };
    let url = pg.fresh_db();
    let p = Project::new(&format!(
        "[state]\ndatabase = \"{url}\"\nstatement_timeout_ms = 500\n"
    ));
    let token = p.token(&[]);
    let server = p.serve();
    // Another session holds the tokens table (a stuck migration, a frozen admin's psql).
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut held = holder.transaction().unwrap();
    held.batch_execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let stalled = format!(
        "state database {url}: canceling statement due to statement timeout ([state] \
         statement_timeout_ms): is the database stalled, or is a lock held elsewhere?"
    );
    let began = std::time::Instant::now();
    let o = output_within(
        std::process::Command::new(IDHAL)
            .arg("--state-dir")
            .arg(&p.state)
            .arg("--config")
            .arg(&p.config)
            .args(["token", "list"]),
        std::time::Duration::from_secs(60),
    );
    eprintln!(
        "`idhal token list` behind a held lock gave up after {:.2} s",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(
        lines(&o),
        (Some(1), String::new(), format!("idhal: error: {stalled}\n"))
    );
    // An enrollment is answered (500, the reason in the server's log), not left hanging.
    let began = std::time::Instant::now();
    let refused = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap_err();
    eprintln!(
        "an enrollment behind a held lock was answered after {:.2} s",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(refused, (500, "internal error".into()));
    assert!(server.log().contains(&stalled), "{}", server.log());
    // Released: both work again (the server reconnects).
    held.rollback().unwrap();
    assert!(ok(p.idhal(&["token", "list"])).contains(&token.id.to_string()));
    let r = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap();
    assert_eq!(r.node, "client1");
}
