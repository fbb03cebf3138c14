//! Block-range locks between writes: a read-modify-write of a partly written
//! 4 KiB block must not interleave with any other write to that block, or
//! one of the two is lost.
//!
//! Aligned writes take their blocks *shared* (they may overlap each other:
//! the initiator gets one of the two orders, as from any disk); a
//! read-modify-write takes its blocks *exclusive*. The table holds only what
//! is in flight (at most the queue depth), so a linear scan is cheapest.

use std::ops::Range;
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Table {
    next: u64,
    held: Vec<(u64, Range<u64>, bool)>,
}

/// The lock table.
#[derive(Debug, Default)]
pub struct RangeLocks {
    table: Mutex<Table>,
    released: Notify,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl RangeLocks {
    /// Waits until `blocks` can be held (`exclusive` or shared) and holds it.
    pub async fn lock(&self, blocks: Range<u64>, exclusive: bool) -> RangeGuard<'_> {
        loop {
            // Register for the wake-up before checking, so a release between
            // the check and the wait is not missed.
            let released = self.released.notified();
            {
                let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
                let blocked = t
                    .held
                    .iter()
                    .any(|(_, r, x)| (exclusive || *x) && overlaps(r, &blocks));
                if !blocked {
                    let id = t.next;
                    t.next += 1;
                    t.held.push((id, blocks, exclusive));
                    return RangeGuard { locks: self, id };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.table.lock().unwrap_or_else(|p| p.into_inner());
        t.held.retain(|(id, _, _)| *id != self.id);
        drop(t);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_overlapping_shared_and_shared_share() {
        let l = RangeLocks::default();
        let a = l.lock(0..4, false).await;
        let _b = l.lock(2..6, false).await;
        let _c = l.lock(10..12, true).await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), l.lock(3..4, true)).await;
        assert!(
            waiting.is_err(),
            "exclusive lock granted over shared holders"
        );
        drop(a);
        drop(_b);
        let got = tokio::time::timeout(Duration::from_secs(5), l.lock(3..4, true)).await;
        assert!(got.is_ok(), "exclusive lock not granted after release");
    }
}
