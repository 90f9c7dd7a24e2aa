//! `idhal scriptlet` (not built yet).

use crate::Global;
use std::process::ExitCode;

/// (not built yet)
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, _global: &Global) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`idhal scriptlet` is not built yet")
}
