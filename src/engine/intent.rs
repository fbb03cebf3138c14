//! The write-intent record's bookkeeping: which regions of the volume may
//! hold writes that are not yet flushed on every replica.
//!
//! Before a write goes out, every region it touches must be *marked* on the
//! replicas (durably); after a crash of the engine, only marked regions can
//! differ between replicas, so only they are compared and copied. Marks are
//! cleared lazily: a region is unmarked after a flush that covers all of its
//! writes *and* once it has been idle for a whole flush window, so a region
//! written continuously is marked once, not once per flush.
//!
//! This type is pure state; `volume.rs` does the replica calls.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

/// Default write-intent region: small enough that a resync after a crash
/// copies little, large enough that a random workload marks few regions.
pub const DEFAULT_REGION_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// Writes to the region under way.
    inflight: u32,
    /// Flush window in which the last write started.
    last_start: u64,
    /// Flush window in which the last write finished.
    last_done: u64,
}

/// Region bookkeeping. Flush windows are numbered;
/// [`start_flush`](Self::start_flush) opens the next one.
#[derive(Debug)]
pub struct Intent {
    region_bytes: u64,
    window: u64,
    /// Regions durably marked on the replicas.
    marked: BTreeSet<u64>,
    /// Regions some writer waits to have marked.
    wanted: BTreeSet<u64>,
    usage: HashMap<u64, Usage>,
}

impl Intent {
    /// An empty record with regions of `region_bytes`.
    pub fn new(region_bytes: u64) -> Self {
        assert!(region_bytes > 0);
        Self {
            region_bytes,
            window: 1,
            marked: BTreeSet::new(),
            wanted: BTreeSet::new(),
            usage: HashMap::new(),
        }
    }

    /// Region size in bytes.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// The regions `[offset, offset+len)` touches.
    pub fn regions(&self, offset: u64, len: u64) -> Range<u64> {
        offset / self.region_bytes..(offset + len).div_ceil(self.region_bytes)
    }

    /// A write to `rs` starts. Returns true when some of its regions are not
    /// yet marked: the writer must then have them marked (see
    /// [`take_wanted`](Self::take_wanted)) before sending the write.
    pub fn begin(&mut self, rs: Range<u64>) -> bool {
        let mut missing = false;
        for r in rs {
            let u = self.usage.entry(r).or_default();
            u.inflight += 1;
            u.last_start = self.window;
            if !self.marked.contains(&r) {
                self.wanted.insert(r);
                missing = true;
            }
        }
        missing
    }

    /// True when every region of `rs` is marked.
    pub fn all_marked(&self, rs: Range<u64>) -> bool {
        rs.into_iter().all(|r| self.marked.contains(&r))
    }

    /// Every region writers wait for that is not marked yet; the caller
    /// marks them on the replicas and then calls [`marked`](Self::marked).
    pub fn take_wanted(&mut self) -> Vec<u64> {
        let w = std::mem::take(&mut self.wanted);
        w.into_iter().filter(|r| !self.marked.contains(r)).collect()
    }

    /// The replicas hold marks for `rs`.
    pub fn marked(&mut self, rs: &[u64]) {
        self.marked.extend(rs.iter().copied());
    }

    /// `rs` must be marked (again): a writer whose marking failed, or one
    /// that finds its regions taken by such a writer, puts them back.
    pub fn want(&mut self, rs: &[u64]) {
        self.wanted.extend(rs.iter().copied());
    }

    /// A write to `rs` (begun with [`begin`](Self::begin)) finished, whether
    /// or not it succeeded.
    pub fn end(&mut self, rs: Range<u64>) {
        for r in rs {
            if let Some(u) = self.usage.get_mut(&r) {
                u.inflight = u.inflight.saturating_sub(1);
                u.last_done = self.window;
            }
        }
    }

    /// A flush starts; returns its window number for
    /// [`take_clearable`](Self::take_clearable) once it succeeded.
    pub fn start_flush(&mut self) -> u64 {
        self.window += 1;
        self.window
    }

    /// After flush `f` succeeded on every replica: the marked regions whose
    /// writes all finished before `f` started and that saw no write start
    /// in the window before it. They leave the marked set *now*, so a writer
    /// arriving from here on marks them again; the caller then removes them
    /// from the replicas.
    pub fn take_clearable(&mut self, f: u64) -> Vec<u64> {
        let clear: Vec<u64> = self
            .marked
            .iter()
            .copied()
            .filter(|r| {
                self.usage
                    .get(r)
                    .is_none_or(|u| u.inflight == 0 && u.last_done < f && u.last_start + 1 < f)
            })
            .collect();
        for r in &clear {
            self.marked.remove(r);
            self.usage.remove(r);
        }
        clear
    }

    /// Marked regions (for status).
    pub fn marked_count(&self) -> usize {
        self.marked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Begin(u64),
        End,
        FlushStart,
        FlushDone,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..8).prop_map(Step::Begin),
            Just(Step::End),
            Just(Step::FlushStart),
            Just(Step::FlushDone),
        ]
    }

    proptest! {
        /// The safety property: a region holding a write that no completed
        /// flush covers is always marked (once its writer has marked it).
        #[test]
        fn unflushed_writes_stay_marked(steps in proptest::collection::vec(step(), 1..200)) {
            let mut it = Intent::new(1);
            // Writes in flight: region. Finished, unflushed writes: (region, done window).
            let mut inflight: Vec<u64> = Vec::new();
            let mut unflushed: Vec<(u64, u64)> = Vec::new();
            let mut flushes: Vec<u64> = Vec::new();
            for s in steps {
                match s {
                    Step::Begin(r) => {
                        if it.begin(r..r + 1) {
                            let w = it.take_wanted();
                            it.marked(&w);
                        }
                        prop_assert!(it.all_marked(r..r + 1));
                        inflight.push(r);
                    }
                    Step::End => {
                        if let Some(r) = inflight.pop() {
                            it.end(r..r + 1);
                            unflushed.push((r, it.window));
                        }
                    }
                    Step::FlushStart => flushes.push(it.start_flush()),
                    Step::FlushDone => {
                        if !flushes.is_empty() {
                            let f = flushes.remove(0);
                            // The flush covers writes finished before it started.
                            unflushed.retain(|&(_, done)| done >= f);
                            it.take_clearable(f);
                        }
                    }
                }
                for &(r, _) in &unflushed {
                    prop_assert!(it.marked.contains(&r), "unflushed write in unmarked region {}", r);
                }
                for &r in &inflight {
                    prop_assert!(it.marked.contains(&r), "write in flight in unmarked region {}", r);
                }
            }
        }
    }

    #[test]
    fn idle_regions_are_cleared_after_two_flushes() {
        let mut it = Intent::new(4096);
        assert!(it.begin(it.regions(0, 8192)));
        let w = it.take_wanted();
        assert_eq!(w, vec![0, 1]);
        it.marked(&w);
        it.end(0..2);
        let f = it.start_flush();
        assert!(
            it.take_clearable(f).is_empty(),
            "written in the window just closed"
        );
        let f = it.start_flush();
        assert_eq!(it.take_clearable(f), vec![0, 1]);
        assert!(it.begin(0..1), "a cleared region must be marked again");
    }
}
