//! Fault injection. Planning is pure ([`plan()`]: options + measured [`facts()`] about the
//! target -> the exact worker setup); running ([`FaultWork`]) spawns workers inside the target's
//! cgroups, samples what they achieve, and rolls everything back at the end, on abort, or (through
//! the [`ledger`]) in the next run after a crash.

pub mod cgroups;
mod facts;
pub mod fill;
pub mod ledger;
mod plan;
mod work;
pub mod worker;

use bytes::Bytes;
use toe_artifacts::names;
pub use toe_artifacts::summary::fault::{
    FaultSample, FaultSummary, Termination, csv, render, timeline_lane,
};
use toe_common::api::ToolOptions;

pub use self::{
    facts::{FsFacts, Proc, TargetFacts, facts},
    plan::{FaultPlan, plan},
    work::FaultWork,
};
use super::{Attach, Finish, Finished, MapSizes, Prepare, Tick, Tool, ToolRun};
use crate::{run::RunError, targets::TargetError};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("fault ledger {path}: {source}")]
    Ledger {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting a worker in the target's cgroups: {0}")]
    Worker(#[source] std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A fault tool (cpu-stress, memory-stress, volume-fill, terminate): planned from the target's
/// measured limits before anything is loaded, started once every collector is attached.
pub struct Fault {
    options: ToolOptions,
    planned: Option<(FaultPlan, TargetFacts)>,
}

impl Fault {
    #[must_use]
    pub fn new(options: ToolOptions) -> Self {
        Self {
            options,
            planned: None,
        }
    }
}

impl Tool for Fault {
    fn map_sizes(&self, _cpus: u32) -> MapSizes {
        use toe_common::signals as sig;
        match self.options {
            // terminate traces its victims' signals and exits.
            ToolOptions::Terminate(_) => vec![
                (sig::STACKS_MAP, sig::MAX_STACKS),
                (sig::TASKS_MAP, sig::MAX_TASKS),
                (sig::EVENTS_RING, sig::RING_BYTES),
            ],
            _ => Vec::new(),
        }
    }

    fn prepare(&mut self, cx: &Prepare<'_>) -> Result<(), RunError> {
        let facts = facts(cx.target, &self.options)?;
        let plan = plan(&self.options, &facts)?;
        self.planned = Some((plan, facts));
        Ok(())
    }

    fn is_fault(&self) -> bool {
        true
    }

    fn attach(self: Box<Self>, cx: &mut Attach<'_>) -> Result<Box<dyn ToolRun>, RunError> {
        let (plan, facts) = self
            .planned
            .ok_or(RunError::Stopped("a fault started before it was planned"))?;
        Ok(Box::new(FaultWork::start(cx.run_id, plan, facts)?))
    }
}

impl ToolRun for FaultWork {
    fn fast_tick(&mut self, _cx: &mut Tick<'_>) -> Result<(), RunError> {
        self.tick();
        Ok(())
    }

    fn ticks_first(&self) -> bool {
        true
    }

    fn progress(&self) -> String {
        format!("{} running", self.plan.name())
    }

    fn done(&self) -> bool {
        FaultWork::done(self)
    }

    fn finish(self: Box<Self>, _cx: &mut Finish<'_>) -> Result<Finished, RunError> {
        let summary = (*self).finish();
        let mut finished = Finished::default();
        if summary.leftovers > 0 {
            finished.warnings.push(format!(
                "{} worker(s) survived the rollback",
                summary.leftovers
            ));
        }
        finished
            .artifacts
            .push((names::FAULT_SERIES, Bytes::from(csv(&summary))));
        finished.lanes.push(timeline_lane(&summary));
        finished.fault = Some(summary);
        Ok(finished)
    }
}
