//! The update location table (Fig. 3, [0038]): the block ranges of one pair
//! written while origin and mate may differ. A set of ranges with no
//! overlaps — inserting merges, removing splits — so that a resync copies
//! exactly what was written, at block precision. `rangemap::RangeSet` does
//! the merging and splitting.

use std::ops::Range;

use rangemap::RangeSet;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateLocationTable {
    ranges: RangeSet<u64>,
}

impl UpdateLocationTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `blocks` (merging with neighbours and overlaps).
    pub fn insert(&mut self, blocks: Range<u64>) {
        if !blocks.is_empty() {
            self.ranges.insert(blocks);
        }
    }

    /// Forgets `blocks` (splitting a range that contains them).
    pub fn remove(&mut self, blocks: Range<u64>) {
        if !blocks.is_empty() {
            self.ranges.remove(blocks);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The recorded ranges, in LBA order.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.ranges.iter().cloned().collect()
    }

    pub fn range_count(&self) -> usize {
        self.ranges.iter().count()
    }

    /// How many blocks are recorded.
    pub fn block_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The parts of `blocks` that are recorded, in LBA order.
    pub fn recorded_within(&self, blocks: Range<u64>) -> Vec<Range<u64>> {
        self.ranges
            .overlapping(&blocks)
            .map(|r| r.start.max(blocks.start)..r.end.min(blocks.end))
            .collect()
    }

    /// The first `count` recorded ranges, each cut to at most `max_blocks`
    /// blocks (a long range yields several pieces). Disjoint, in LBA order.
    pub fn first_ranges(&self, max_blocks: u64, count: usize) -> Vec<Range<u64>> {
        let max_blocks = max_blocks.max(1);
        let mut pieces = Vec::with_capacity(count);
        for r in self.ranges.iter() {
            let mut start = r.start;
            while start < r.end && pieces.len() < count {
                let end = r.end.min(start + max_blocks);
                pieces.push(start..end);
                start = end;
            }
            if pieces.len() == count {
                break;
            }
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_10_11_from_8_31_leaves_8_9_and_12_31() {
        // [0038]: block numbers are inclusive there, half-open here.
        let mut table = UpdateLocationTable::new();
        table.insert(8..32);
        table.remove(10..12);
        assert_eq!(table.ranges(), vec![8..10, 12..32]);
        assert_eq!(table.block_count(), 22);
    }

    #[test]
    fn inserting_merges_adjacent_and_overlapping_ranges() {
        let mut table = UpdateLocationTable::new();
        table.insert(0..4);
        table.insert(4..8); // adjacent
        table.insert(6..10); // overlapping on the right
        table.insert(20..30);
        table.insert(18..21); // overlapping on the left
        assert_eq!(table.ranges(), vec![0..10, 18..30]);
        table.insert(0..100); // whole overwrite
        assert_eq!(table.ranges(), vec![0..100]);
        assert_eq!(table.range_count(), 1);
    }

    #[test]
    fn removing_edges_and_everything() {
        let mut table = UpdateLocationTable::new();
        table.insert(10..20);
        table.remove(10..11); // first block
        table.remove(19..20); // last block
        assert_eq!(table.ranges(), vec![11..19]);
        table.remove(0..5); // nothing there
        assert_eq!(table.ranges(), vec![11..19]);
        table.remove(0..100);
        assert!(table.is_empty());
        table.insert(5..5);
        assert!(table.is_empty(), "an empty range records nothing");
    }

    #[test]
    fn recorded_within_and_first_ranges() {
        let mut table = UpdateLocationTable::new();
        table.insert(2..6);
        table.insert(10..40);
        assert_eq!(table.recorded_within(4..12), vec![4..6, 10..12]);
        assert_eq!(table.recorded_within(6..10), Vec::<Range<u64>>::new());
        assert_eq!(table.first_ranges(3, 4), vec![2..5, 5..6, 10..13, 13..16]);
        assert_eq!(table.first_ranges(100, 5), vec![2..6, 10..40]);
    }
}
