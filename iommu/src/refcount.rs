//! Reference counts of host frames mapped through an IOMMU, kept as runs of frames
//! with the same count, so that a domain's whole physmap (large pages) costs a few
//! entries while single grant frames mapped at several IOVAs are counted exactly.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Counts per 4 KiB frame number, stored as disjoint runs `[start, end)` of equal
/// count (never 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameRefs {
    runs: BTreeMap<u64, (u64, u32)>,
}

/// A range of frames `[start, start + count)` given as frame numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRange {
    /// First frame number.
    pub start: u64,
    /// Number of frames.
    pub count: u64,
}

/// Why a count change was refused (nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefError {
    /// A frame in the range has no reference to drop.
    NotReferenced(u64),
    /// A frame's count would pass `u32::MAX`.
    Overflow(u64),
    /// The range wraps around the frame-number space.
    BadRange,
}

impl FrameRefs {
    /// No references.
    pub fn new() -> Self {
        FrameRefs::default()
    }

    /// The count of frame `pfn`.
    pub fn get(&self, pfn: u64) -> u32 {
        match self.runs.range(..=pfn).next_back() {
            Some((_, &(end, c))) if pfn < end => c,
            _ => 0,
        }
    }

    /// Whether no frame is referenced.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Number of stored runs (memory use).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Sum of all counts (frames times references).
    pub fn total(&self) -> u64 {
        self.runs
            .iter()
            .map(|(&s, &(e, c))| (e - s) * u64::from(c))
            .sum()
    }

    /// Splits the run containing `pfn` (strictly inside) so a run starts at `pfn`.
    fn split_at(&mut self, pfn: u64) {
        let Some((&s, &(e, c))) = self.runs.range(..pfn).next_back() else {
            return;
        };
        if pfn < e {
            self.runs.insert(s, (pfn, c));
            self.runs.insert(pfn, (e, c));
        }
    }

    /// Merges runs touching `[start, end]` with equal counts.
    fn merge_around(&mut self, start: u64, end: u64) {
        let first = self
            .runs
            .range(..start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let keys: Vec<u64> = self.runs.range(first..=end).map(|(&s, _)| s).collect();
        let mut prev: Option<u64> = None;
        for k in keys {
            let (ke, kc) = self.runs[&k];
            if let Some(p) = prev {
                let (pe, pc) = self.runs[&p];
                if pe == k && pc == kc {
                    self.runs.remove(&k);
                    self.runs.insert(p, (ke, pc));
                    continue;
                }
            }
            prev = Some(k);
        }
    }

    fn range_end(start: u64, count: u64) -> Result<u64, RefError> {
        start.checked_add(count).ok_or(RefError::BadRange)
    }

    /// Adds one reference to each of `count` frames from `start`.
    pub fn add(&mut self, start: u64, count: u64) -> Result<(), RefError> {
        let end = Self::range_end(start, count)?;
        if count == 0 {
            return Ok(());
        }
        if let Some((&s, _)) = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .find(|(_, &(_, c))| c == u32::MAX)
        {
            return Err(RefError::Overflow(s.max(start)));
        }
        self.split_at(start);
        self.split_at(end);
        let mut pos = start;
        let inside: Vec<(u64, u64)> = self
            .runs
            .range(start..end)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        for (s, e) in inside {
            if pos < s {
                self.runs.insert(pos, (s, 1));
            }
            if let Some(run) = self.runs.get_mut(&s) {
                run.1 += 1;
            }
            pos = e;
        }
        if pos < end {
            self.runs.insert(pos, (end, 1));
        }
        self.merge_around(start, end);
        Ok(())
    }

    /// Drops one reference from each of `count` frames from `start`; the frames whose
    /// count reaches zero are appended to `released` (adjacent ones as one range).
    /// All or nothing: if a frame has no reference, nothing changes.
    pub fn remove(
        &mut self,
        start: u64,
        count: u64,
        released: &mut Vec<FrameRange>,
    ) -> Result<(), RefError> {
        let end = Self::range_end(start, count)?;
        if count == 0 {
            return Ok(());
        }
        // Coverage check first.
        let mut pos = start;
        if let Some((_, &(e, _))) = self.runs.range(..=start).next_back() {
            if e > start {
                pos = e;
            }
        }
        while pos < end {
            match self.runs.get(&pos) {
                Some(&(e, _)) => pos = e,
                None => return Err(RefError::NotReferenced(pos)),
            }
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, c) = self.runs[&s];
            if c == 1 {
                self.runs.remove(&s);
                match released.last_mut() {
                    Some(last) if last.start + last.count == s => last.count += e - s,
                    _ => released.push(FrameRange {
                        start: s,
                        count: e - s,
                    }),
                }
            } else {
                self.runs.insert(s, (e, c - 1));
            }
        }
        self.merge_around(start, end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn basics() {
        let mut r = FrameRefs::new();
        r.add(10, 5).unwrap();
        r.add(12, 1).unwrap();
        assert_eq!(
            (r.get(9), r.get(10), r.get(12), r.get(14), r.get(15)),
            (0, 1, 2, 1, 0)
        );
        assert_eq!(r.total(), 6);
        assert_eq!(r.runs(), 3);
        let mut rel = Vec::new();
        assert_eq!(r.remove(9, 2, &mut rel), Err(RefError::NotReferenced(9)));
        assert_eq!(r.remove(14, 2, &mut rel), Err(RefError::NotReferenced(15)));
        assert_eq!(r.total(), 6, "failed removes change nothing");
        r.remove(10, 5, &mut rel).unwrap();
        assert_eq!(
            rel,
            [
                FrameRange {
                    start: 10,
                    count: 2
                },
                FrameRange {
                    start: 13,
                    count: 2
                }
            ]
        );
        assert_eq!(r.get(12), 1);
        assert_eq!(r.runs(), 1);
        rel.clear();
        r.remove(12, 1, &mut rel).unwrap();
        assert_eq!(
            rel,
            [FrameRange {
                start: 12,
                count: 1
            }]
        );
        assert!(r.is_empty());
        // A 1 GiB run is one entry.
        r.add(0x40000, 0x40000).unwrap();
        assert_eq!(r.runs(), 1);
        assert_eq!(r.add(u64::MAX, 2), Err(RefError::BadRange));
        r.add(0, 0).unwrap();
        r.remove(0, 0, &mut rel).unwrap();
    }

    #[test]
    fn overflow_is_refused() {
        let mut r = FrameRefs::new();
        r.runs.insert(5, (6, u32::MAX));
        assert_eq!(r.add(0, 10), Err(RefError::Overflow(5)));
        assert_eq!(r.get(4), 0);
        assert_eq!(r.get(5), u32::MAX);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(u64, u64),
        Remove(u64, u64),
    }

    proptest! {
        #[test]
        fn matches_per_frame_model(ops in proptest::collection::vec(
            prop_oneof![
                (0..64u64, 0..20u64).prop_map(|(s, n)| Op::Add(s, n)),
                (0..64u64, 0..20u64).prop_map(|(s, n)| Op::Remove(s, n)),
            ], 1..60)) {
            let mut r = FrameRefs::new();
            let mut model: HashMap<u64, u32> = HashMap::new();
            for op in &ops {
                match *op {
                    Op::Add(s, n) => {
                        r.add(s, n).unwrap();
                        for f in s..s + n {
                            *model.entry(f).or_default() += 1;
                        }
                    }
                    Op::Remove(s, n) => {
                        let mut rel = Vec::new();
                        let ok = (s..s + n).all(|f| model.get(&f).copied().unwrap_or(0) > 0);
                        let got = r.remove(s, n, &mut rel);
                        prop_assert_eq!(got.is_ok(), ok, "{:?}", op);
                        if ok {
                            let mut want = Vec::new();
                            for f in s..s + n {
                                let c = model.get_mut(&f).unwrap();
                                *c -= 1;
                                if *c == 0 {
                                    model.remove(&f);
                                    want.push(f);
                                }
                            }
                            let got: Vec<u64> = rel.iter().flat_map(|x| x.start..x.start + x.count).collect();
                            prop_assert_eq!(got, want);
                        }
                    }
                }
                for f in 0..90 {
                    prop_assert_eq!(r.get(f), model.get(&f).copied().unwrap_or(0), "frame {} after {:?}", f, op);
                }
                // Runs stay merged: neighbours never have equal counts.
                let v: Vec<_> = r.runs.iter().map(|(&s, &(e, c))| (s, e, c)).collect();
                for w in v.windows(2) {
                    prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2), "{:?}", v);
                }
            }
            prop_assert_eq!(r.total(), model.values().map(|&c| u64::from(c)).sum::<u64>());
        }
    }
}
