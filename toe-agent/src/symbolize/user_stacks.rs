//! User stacks from the stack copies collectors take in the kernel: every collector that
//! records user stacks (CPU samples, signal senders) turns its copies into frames here.

use std::{collections::HashMap, sync::Arc, time::Duration};

use toe_artifacts::summary::UnwindAccounting;
use toe_common::stacks::{MAX_FRAMES, UserStackCopy};

use super::{
    images::Images,
    unwind::{Miss, Outcome, StackCopy, UnwindCache},
};

/// Turns stack copies into user stacks, with the mappings and files the run keeps for the
/// processes it saw.
pub struct UserStacks {
    images: Arc<Images>,
    cache: UnwindCache,
    out: Vec<u64>,
    /// When each process last had its mappings looked at for a leaf no kept mapping held.
    looked: HashMap<u32, std::time::Instant>,
}

/// A process whose leaf lies in no kept mapping has its mappings read again at most this often
/// (leaves in the vDSO or in JIT code are in no file, sample after sample).
const LOOK_AGAIN: Duration = Duration::from_millis(100);

impl UserStacks {
    #[must_use]
    pub fn new(images: Arc<Images>) -> Self {
        Self {
            images,
            cache: UnwindCache::default(),
            out: Vec::with_capacity(MAX_FRAMES),
            looked: HashMap::new(),
        }
    }

    /// `pid`'s user stack, leaf first: unwound from `copy` when it holds one, else `fp` (the
    /// kernel's frame-pointer walk). `copy_failed`: the kernel could not read the registers
    /// or the stack (counted). Each outcome is counted in `counts`.
    pub fn of<'a>(
        &'a mut self,
        pid: u32,
        copy: &UserStackCopy,
        copy_failed: bool,
        fp: &'a [u64],
        counts: &mut UnwindAccounting,
    ) -> &'a [u64] {
        if copy_failed {
            counts.copy_errors += 1;
            return fp;
        }
        let Some(copy) = StackCopy::of(copy) else {
            return fp;
        };
        let now = std::time::Instant::now();
        let may_look = self
            .looked
            .get(&pid)
            .is_none_or(|t| now.duration_since(*t) >= LOOK_AGAIN);
        let u = self.images.unwind(
            pid,
            &copy,
            fp,
            MAX_FRAMES,
            &mut self.cache,
            &mut self.out,
            may_look,
        );
        if may_look {
            self.looked.insert(pid, now);
        }
        match u.outcome {
            Outcome::Tables => counts.tables += 1,
            Outcome::Joined => counts.joined += 1,
            Outcome::FramePointers => counts.frame_pointers += 1,
        }
        match u.leaf_miss {
            Some(Miss::NoUnwindInfo) => counts.leaf_no_unwind_info += 1,
            Some(Miss::Unreadable) => counts.leaf_unreadable += 1,
            Some(Miss::MemoryFull) => counts.leaf_memory_full += 1,
            Some(Miss::NotMapped) => counts.leaf_not_mapped += 1,
            None => {}
        }
        &self.out
    }
}

/// A run's unwind counts with the agent-wide readings the summary shows beside them: table
/// memory held now, files read and the time that took.
#[must_use]
pub fn with_table_readings(counts: &UnwindAccounting) -> UnwindAccounting {
    let (table_files_read, table_read_ms) = super::unwind::tables_read();
    UnwindAccounting {
        table_memory_bytes: super::unwind::table_memory() as u64,
        table_files_read,
        table_read_ms,
        ..counts.clone()
    }
}
