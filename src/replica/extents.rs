//! The extent index: which layer of the chain holds each 4 KiB block.
//!
//! Everything here counts in blocks ([`BLOCK_SIZE`] bytes), never bytes.
//!
//! [`RangeMap`] is an ordered map of disjoint, half-open block ranges to a
//! value. It is kept *canonical*: no two entries overlap and no two adjacent
//! entries carry the same value (they are merged), so its size is the number of
//! distinct written extents, independent of the volume size and of how many
//! layers the chain has. One entry costs a `BTreeMap` slot of 8 (key) + 16
//! (end, value) bytes plus node overhead.
//!
//! Two instantiations are used by the replica:
//! - [`ExtentSet`] (`RangeMap<()>`): the data extents of one layer file.
//! - [`View`] (`RangeMap<u32>`): for every block of the volume, the index in
//!   the active chain of the topmost layer holding it. A read of any block is
//!   one ordered-map lookup, however deep the chain.

use std::collections::BTreeMap;
use std::ops::Range;

/// The block size the index works in; the unit of every offset in this module.
pub const BLOCK_SIZE: u64 = 4096;

/// Disjoint, canonical half-open block ranges, each carrying a `V`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeMap<V> {
    /// start -> (end, value)
    map: BTreeMap<u64, (u64, V)>,
}

/// The data extents of one layer.
pub type ExtentSet = RangeMap<()>;

/// The merged view: block range -> chain index of the layer holding it.
pub type View = RangeMap<u32>;

impl<V: Copy + Eq> RangeMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }

    /// Number of entries (distinct extents).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no block is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total number of mapped blocks.
    pub fn blocks(&self) -> u64 {
        self.map.iter().map(|(s, (e, _))| e - s).sum()
    }

    /// All entries in order, as `(range, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (Range<u64>, V)> + '_ {
        self.map.iter().map(|(&s, &(e, v))| (s..e, v))
    }

    /// Maps every block of `r` to `v`, replacing what was there.
    pub fn insert(&mut self, r: Range<u64>, v: V) {
        if r.is_empty() {
            return;
        }
        self.cut(r.clone());
        let (mut start, mut end) = (r.start, r.end);
        // Merge with a left neighbour ending exactly at `start`.
        if let Some((&ls, &(le, lv))) = self.map.range(..start).next_back() {
            if le == start && lv == v {
                self.map.remove(&ls);
                start = ls;
            }
        }
        // Merge with a right neighbour starting exactly at `end`.
        if let Some(&(re, rv)) = self.map.get(&end) {
            if rv == v {
                self.map.remove(&end);
                end = re;
            }
        }
        self.map.insert(start, (end, v));
    }

    /// Unmaps every block of `r`.
    pub fn remove(&mut self, r: Range<u64>) {
        if !r.is_empty() {
            self.cut(r);
        }
    }

    /// Removes everything inside `r`, splitting entries that straddle its edges.
    fn cut(&mut self, r: Range<u64>) {
        // An entry starting before r.start that reaches into r.
        if let Some((&s, &(e, v))) = self.map.range(..r.start).next_back() {
            if e > r.start {
                self.map.insert(s, (r.start, v));
                if e > r.end {
                    self.map.insert(r.end, (e, v));
                    return;
                }
            }
        }
        // Entries starting inside r, one at a time: no allocation in the
        // common case of none or one.
        while let Some((&s, &(e, v))) = self.map.range(r.start..r.end).next() {
            self.map.remove(&s);
            if e > r.end {
                self.map.insert(r.end, (e, v));
            }
        }
    }

    /// The value at block `b`, if mapped. One ordered-map lookup.
    pub fn get(&self, b: u64) -> Option<V> {
        let (_, &(e, v)) = self.map.range(..=b).next_back()?;
        (b < e).then_some(v)
    }

    /// Covers `r` completely with consecutive segments, each either mapped
    /// (`Some(v)`) or a hole (`None`), in order.
    pub fn segments(&self, r: Range<u64>) -> Vec<(Range<u64>, Option<V>)> {
        let mut out = Vec::new();
        let mut pos = r.start;
        let first = self
            .map
            .range(..r.start)
            .next_back()
            .filter(|(_, &(e, _))| e > r.start)
            .map(|(&s, &ev)| (s, ev));
        for (s, (e, v)) in first
            .into_iter()
            .chain(self.map.range(r.start..r.end).map(|(&s, &ev)| (s, ev)))
        {
            let s = s.max(r.start);
            let e = e.min(r.end);
            if s > pos {
                out.push((pos..s, None));
            }
            out.push((s..e, Some(v)));
            pos = e;
        }
        if pos < r.end {
            out.push((pos..r.end, None));
        }
        out
    }

    /// The mapped parts of `r`, clipped to `r`.
    pub fn overlapping(&self, r: Range<u64>) -> Vec<(Range<u64>, V)> {
        self.segments(r)
            .into_iter()
            .filter_map(|(rr, v)| v.map(|v| (rr, v)))
            .collect()
    }

    /// True when some block of `r` is mapped.
    pub fn intersects(&self, r: Range<u64>) -> bool {
        if r.is_empty() {
            return false;
        }
        if self.map.range(r.start..r.end).next().is_some() {
            return true;
        }
        matches!(self.map.range(..r.start).next_back(), Some((_, &(e, _))) if e > r.start)
    }

    /// Rewrites every value with `f`; entries mapped to `None` are dropped.
    /// Used when the chain's numbering changes (snapshot removal).
    pub fn remap(&mut self, f: impl Fn(V) -> Option<V>) {
        let old = std::mem::take(&mut self.map);
        for (s, (e, v)) in old {
            if let Some(nv) = f(v) {
                self.insert(s..e, nv);
            }
        }
    }
}

impl ExtentSet {
    /// Adds the blocks of `r`.
    pub fn add(&mut self, r: Range<u64>) {
        self.insert(r, ());
    }

    /// The extents as plain ranges.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.iter().map(|(r, ())| r)
    }

    /// The parts of `r` this set does *not* cover.
    pub fn holes(&self, r: Range<u64>) -> Vec<Range<u64>> {
        self.segments(r)
            .into_iter()
            .filter_map(|(rr, v)| v.is_none().then_some(rr))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    const DOMAIN: u64 = 64;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64, u8),
        Remove(u64, u64),
        Remap(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..DOMAIN, 0..16u64, 0..4u8).prop_map(|(s, l, v)| Op::Insert(s, (s + l).min(DOMAIN), v)),
            2 => (0..DOMAIN, 0..16u64).prop_map(|(s, l)| Op::Remove(s, (s + l).min(DOMAIN))),
            1 => (0..4u8).prop_map(Op::Remap),
        ]
    }

    fn check_canonical(m: &RangeMap<u8>) {
        let mut prev: Option<(u64, u8)> = None;
        for (r, v) in m.iter() {
            assert!(r.start < r.end, "empty entry {r:?}");
            if let Some((pe, pv)) = prev {
                assert!(pe <= r.start, "overlap at {r:?}");
                assert!(!(pe == r.start && pv == v), "unmerged neighbours at {r:?}");
            }
            prev = Some((r.end, v));
        }
    }

    proptest! {
        /// The range map agrees, block by block, with a naive per-block map,
        /// and stays canonical after every operation.
        #[test]
        fn matches_per_block_model(ops in proptest::collection::vec(op(), 1..60),
                                   q in (0..DOMAIN, 0..DOMAIN)) {
            let mut m = RangeMap::<u8>::new();
            let mut model = Model::<u64, u8>::new();
            for op in ops {
                match op {
                    Op::Insert(s, e, v) => {
                        m.insert(s..e, v);
                        for b in s..e { model.insert(b, v); }
                    }
                    Op::Remove(s, e) => {
                        m.remove(s..e);
                        for b in s..e { model.remove(&b); }
                    }
                    Op::Remap(drop) => {
                        let f = |v: u8| if v == drop { None } else if v > drop { Some(v - 1) } else { Some(v) };
                        m.remap(f);
                        model = model.into_iter().filter_map(|(b, v)| f(v).map(|v| (b, v))).collect();
                    }
                }
                check_canonical(&m);
            }
            for b in 0..DOMAIN {
                prop_assert_eq!(m.get(b), model.get(&b).copied(), "block {}", b);
            }
            prop_assert_eq!(m.blocks(), model.len() as u64);
            let (a, b) = (q.0.min(q.1), q.0.max(q.1) + 1);
            let segs = m.segments(a..b);
            let mut pos = a;
            for (r, v) in &segs {
                prop_assert_eq!(r.start, pos);
                for blk in r.clone() { prop_assert_eq!(model.get(&blk).copied(), *v); }
                pos = r.end;
            }
            prop_assert_eq!(pos, b);
            prop_assert_eq!(m.intersects(a..b), (a..b).any(|x| model.contains_key(&x)));
        }
    }

    #[test]
    fn holes_are_the_complement() {
        let mut s = ExtentSet::new();
        s.add(2..4);
        s.add(6..8);
        assert_eq!(s.holes(0..10), vec![0..2, 4..6, 8..10]);
        assert_eq!(s.holes(2..4), Vec::<Range<u64>>::new());
    }

    #[test]
    fn sequential_writes_collapse_to_one_entry() {
        let mut v = View::new();
        for b in 0..10_000 {
            v.insert(b..b + 1, 3);
        }
        assert_eq!(v.len(), 1);
        for b in (0..10_000).rev() {
            v.insert(20_000 + b..20_001 + b, 3);
        }
        assert_eq!(v.len(), 2);
    }
}
