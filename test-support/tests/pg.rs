//! The PostgreSQL fixture on its own: a real cluster on 127.0.0.1 (nowhere else), answering SQL,
//! restartable with its data, and gone (process and files) once dropped.
use idhal_test_support::pg::Postgres;
use idhal_test_support::process::{alive, listening};

#[test]
fn a_private_cluster_on_loopback_answers_sql_and_is_gone_after_drop() {
    if !Postgres::available() {
        return;
    }
    let pg = Postgres::start();
    assert_eq!(listening(pg.port), (true, false), "loopback only");
    assert_eq!(pg.psql("postgres", "select 40 + 2").trim(), "42");
    pg.psql(
        "postgres",
        "create table t (v text); insert into t values ('kept')",
    );

    // Stopped and started again (what the OAR tests do to cut the database away): same data.
    let pid = pg.pid().unwrap();
    pg.stop();
    assert!(!alive(pid));
    assert!(!pg.ready());
    pg.start_server();
    assert_eq!(pg.psql("postgres", "select v from t").trim(), "kept");

    let (pid, port) = (pg.pid().unwrap(), pg.port);
    let root = pg.dir.parent().unwrap().to_path_buf();
    drop(pg);
    assert!(!alive(pid));
    assert_eq!(listening(port), (false, false));
    assert!(!root.exists(), "{} left behind", root.display());
}
