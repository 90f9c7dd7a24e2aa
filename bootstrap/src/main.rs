//! `idhal-bootstrap`: parses arguments, builds the configuration and dispatches. The boot path
//! itself reads top to bottom in run.rs.

mod child;
mod cli;
mod config;
mod enroll;
mod error;
mod fetch;
mod http;
mod peers;
mod pin;
mod random;
mod renew;
mod run;
mod state;
mod status;
mod trust;
mod watchdog;

use cli::{Cli, Common};
use config::{Config, Proc};
use error::{AgentError, Exit};
use std::process::ExitCode;

/// One line on stderr per event; journald/syslog add the timestamps.
pub fn log(msg: &str) {
    eprintln!("idhal-bootstrap: {msg}");
}

fn config(common: &Common, proc: &Proc) -> Result<Config, AgentError> {
    let mut cfg = Config::default();
    cfg.load_file(&common.config, common.config_required)?;
    cfg.load_cmdline(&proc.cmdline())?;
    for (k, v) in &common.overrides {
        cfg.set(k, v, &format!("--{}", k.replace('_', "-")))?;
    }
    // Scriptlets run in `/`: a relative state directory must not change meaning for them.
    cfg.state_dir = std::path::absolute(&cfg.state_dir)
        .map_err(|e| AgentError::Config(format!("{}: {e}", cfg.state_dir.display())))?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli) => cli,
        Err(e) => {
            log(&e.to_string());
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    let exit = match cli {
        Cli::Help => {
            print!("{}", cli::HELP);
            Exit::Ok
        }
        Cli::Version => {
            println!("idhal-bootstrap {}", env!("CARGO_PKG_VERSION"));
            Exit::Ok
        }
        Cli::Run(common) => {
            let proc = Proc {
                root: &common.proc_root,
            };
            match config(&common, &proc) {
                Err(e) => {
                    log(&e.to_string());
                    e.exit()
                }
                Ok(cfg) => match run::run(&cfg, &proc) {
                    Ok(s) => {
                        // u64, not u128, not floats: their formatting costs the agent KiBs.
                        let us = s.local.as_micros() as u64;
                        let msg = format!(
                            "ok: serial {}, ran {}, {} not due ({}.{:02} ms after download)",
                            s.serial,
                            s.ran,
                            s.skipped,
                            us / 1000,
                            us % 1000 / 10
                        );
                        log(&msg);
                        run::report(&cfg.state_dir, &proc, 0, &msg);
                        Exit::Ok
                    }
                    Err(e) => {
                        log(&e.to_string());
                        if !matches!(e, AgentError::Busy(_)) {
                            run::report(&cfg.state_dir, &proc, e.exit() as u8, &e.to_string());
                        }
                        e.exit()
                    }
                },
            }
        }
        Cli::Enroll { common, args } => {
            let proc = Proc {
                root: &common.proc_root,
            };
            match config(&common, &proc).and_then(|c| enroll::enroll(&c, &proc, &args)) {
                Ok(()) => Exit::Ok,
                Err(e) => {
                    log(&e.to_string());
                    e.exit()
                }
            }
        }
        Cli::Peers(common) => {
            let proc = Proc {
                root: &common.proc_root,
            };
            match config(&common, &proc).and_then(|c| peers::peers(&c, &proc)) {
                Ok(()) => Exit::Ok,
                Err(e) => {
                    log(&e.to_string());
                    e.exit()
                }
            }
        }
        Cli::Renew { common, force } => {
            let proc = Proc {
                root: &common.proc_root,
            };
            match config(&common, &proc).and_then(|c| renew::renew(&c, force)) {
                Ok(()) => Exit::Ok,
                Err(e) => {
                    log(&e.to_string());
                    e.exit()
                }
            }
        }
        Cli::Status { common, json, wait } => {
            let proc = Proc {
                root: &common.proc_root,
            };
            match config(&common, &proc).and_then(|c| match wait {
                None => status::status(&c.state_dir, json, &proc),
                Some(t) => status::wait(
                    &c.state_dir,
                    json,
                    &proc,
                    t.unwrap_or(c.limits.wait_timeout),
                    c.limits.wait_poll_cap,
                ),
            }) {
                Ok(exit) => exit,
                Err(e) => {
                    log(&e.to_string());
                    e.exit()
                }
            }
        }
    };
    ExitCode::from(exit as u8)
}
