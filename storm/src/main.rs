//! `idhal-storm`: the boot-storm benchmark (issue 13 §3). N nodes, each with its own one-time
//! token, enroll through `idhal serve` and then connect at once, through a real OpenVPN 2.6 server
//! (real client processes) and through the hook path directly, against real OAR (PostgreSQL) and
//! Knot, with `idhal reconcile` every 10 s. Everything runs on 127.0.0.1 with ephemeral ports and
//! is stopped by pid on exit, on failure and on Ctrl-C. It prints figures and writes a CSV and an
//! SVG; it asserts no time. Run it with `scripts/storm.sh` (release builds, root).

mod args;
mod clients;
mod enroll;
mod figures;
mod plot;
mod probe;
mod setup;
mod sim;
mod watch;

use std::time::Instant;

fn main() {
    let args = args::parse();
    if let Err(why) = args::check(&args) {
        eprintln!("idhal-storm: {why}");
        std::process::exit(2);
    }
    let t = Instant::now();
    let code = run(&args);
    eprintln!("idhal-storm: done in {:.0} s", t.elapsed().as_secs_f64());
    std::process::exit(code);
}

fn run(args: &args::Args) -> i32 {
    let rig = setup::Rig::start(args);
    let enrolled = enroll::run(args, &rig);
    if args.enroll_only {
        figures::enrollment(args, &enrolled);
        let ok = enrolled.failed.is_empty()
            && enrolled.duplicate_ids + enrolled.duplicate_addresses == 0;
        return i32::from(!ok);
    }
    let report = clients::storm(args, &rig, &enrolled);
    let code = figures::print(args, &rig, &enrolled, &report);
    std::fs::create_dir_all(&args.out).unwrap_or_else(|e| panic!("{}: {e}", args.out.display()));
    let csv = args.out.join("storm.csv");
    figures::write_csv(&csv, &enrolled, &report);
    let svg = args.out.join("storm.svg");
    plot::draw(&svg, args, &report);
    println!("wrote {} and {}", csv.display(), svg.display());
    code
}
