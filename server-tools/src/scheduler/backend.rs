//! The one place that picks the scheduler backend from the configuration. A new backend
//! (slurm.rs beside oar.rs) is added to `SchedulerBackend` and here.

use super::oar::Oar;
use super::Scheduler;
use crate::config::{SchedulerBackend, ServerConfig};
use std::path::Path;

/// The backend the configuration asks for, or `None` when scheduling is switched off.
pub fn open(cfg: &ServerConfig, state_dir: &Path) -> Option<Box<dyn Scheduler>> {
    match cfg.scheduler.backend {
        SchedulerBackend::Oar => Some(Box::new(Oar::new(cfg, state_dir))),
        SchedulerBackend::None => None,
    }
}
