//! Coarse extents of a volume, as its record keeps them, written to the
//! store before the first write in each is sent: so whichever node holds
//! the volume next knows where replicas may differ without reading any
//! node's local state. Two lists use it. Pure.
//!
//! - **What a faulted replica missed.** The engine's own dirty map
//!   (`core::dirty`, in its node's data dir) is fine-grained and persisted
//!   before each write is acknowledged; but a node that takes the volume
//!   over cannot read it. So each faulted replica's record also lists
//!   coarse extents, and whichever node catches it up copies only those.
//! - **Where writes are in flight** (the volume's write log): a holder
//!   killed mid-write may leave its healthy replicas different there, so
//!   the next engine makes them agree before it serves a read. Extents
//!   leave the log once idle, so it names the last seconds' writing.
//!
//! Either list holds at most `MAX_EXTENTS` for the volume, never smaller
//! than `MIN_EXTENT`: one store write per extent, however much is written
//! there.
//!
//! A list is only as good as every holder's care: a holder of an older
//! version writes without listing. So the list names the last claim epoch
//! whose engine kept it (`through_epoch`); an engine under claim `e` trusts
//! it only when that is `e - 1` (no claim in between went unrecorded), and
//! otherwise assumes every extent.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::core::dirty::{DEFAULT_REGION, DirtyMap};

/// The most extents a volume is divided into when a replica faults: bounds
/// the record's size and the store writes one fault can cost.
pub const MAX_EXTENTS: u64 = 1024;
/// The smallest extent: a degraded volume's sequential writes pay one store
/// write (an API server round trip) per extent, so not one per region.
pub const MIN_EXTENT: u64 = 8 * DEFAULT_REGION;
/// How many extents past a forward-moving write the write log lists with
/// it (`to_list`).
pub const LOOKAHEAD: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentList {
    /// A power of two, at least a dirty-map region.
    pub extent_bytes: u64,
    /// The last claim epoch whose engine listed every extent it wrote.
    pub through_epoch: u64,
    /// Extent indexes, written as ranges ("0-3,17").
    #[serde(with = "ranges")]
    pub extents: BTreeSet<u64>,
}

impl ExtentList {
    /// Nothing missed yet, for a replica of a `capacity`-byte volume
    /// faulted under claim `epoch`.
    pub fn none_yet(capacity: u64, epoch: u64) -> ExtentList {
        let wanted = capacity.div_ceil(MAX_EXTENTS).max(MIN_EXTENT);
        ExtentList {
            extent_bytes: wanted.next_power_of_two(),
            through_epoch: epoch,
            extents: BTreeSet::new(),
        }
    }

    /// Everything missed: a replacement, empty, for a `capacity`-byte volume.
    pub fn everything(capacity: u64, epoch: u64) -> ExtentList {
        let mut m = ExtentList::none_yet(capacity, epoch);
        m.extents = (0..capacity.div_ceil(m.extent_bytes)).collect();
        m
    }

    /// The extents listed whose every region `map` has clean: copied by
    /// catch-up, and not written since.
    pub fn copied(&self, map: &DirtyMap) -> Vec<u64> {
        let region = map.region_size();
        self.extents
            .iter()
            .copied()
            .filter(|&e| {
                let start = e.saturating_mul(self.extent_bytes);
                let end = start.saturating_add(self.extent_bytes);
                let (first, last) = (start / region, end.div_ceil(region).min(map.regions()));
                (first..last).all(|r| !map.is_dirty(r))
            })
            .collect()
    }

    /// Unlists `extents` (copied); whether any was listed.
    pub fn unlist(&mut self, extents: &[u64]) -> bool {
        let before = self.extents.len();
        for e in extents {
            self.extents.remove(e);
        }
        self.extents.len() != before
    }

    /// The extents `[offset, offset+len)` touches that are not listed yet.
    pub fn unlisted(&self, offset: u64, len: u64) -> Vec<u64> {
        if len == 0 || self.extent_bytes == 0 {
            return Vec::new();
        }
        let first = offset / self.extent_bytes;
        let last = offset.saturating_add(len - 1) / self.extent_bytes;
        (first..=last)
            .filter(|e| !self.extents.contains(e))
            .collect()
    }

    /// Lists `extents`; whether any was new.
    pub fn list(&mut self, extents: &[u64]) -> bool {
        let before = self.extents.len();
        self.extents.extend(extents.iter().copied());
        self.extents.len() != before
    }

    /// The extents a write of `[offset, offset+len)` must list first, in a
    /// volume of `capacity` bytes: those it touches that are not listed,
    /// and when the extent before them is listed (a stream moving
    /// forward), the next `LOOKAHEAD` too, so sequential writing pays a
    /// store write per few extents rather than per extent.
    pub fn to_list(&self, offset: u64, len: u64, capacity: u64) -> Vec<u64> {
        let mut new = self.unlisted(offset, len);
        let (Some(&first), Some(&last)) = (new.first(), new.last()) else {
            return new;
        };
        let streaming = first > 0 && self.extents.contains(&(first - 1));
        if streaming {
            let end = capacity.div_ceil(self.extent_bytes.max(1));
            new.extend(
                (last + 1..end)
                    .take(LOOKAHEAD as usize)
                    .filter(|e| !self.extents.contains(e)),
            );
        }
        new
    }

    /// The same list in extents no more than `MAX_EXTENTS` to a volume of
    /// `capacity` bytes (four times that for a volume grown since it was
    /// made, before it is coarsened): a list that outgrew its record's
    /// room after an expansion names the same bytes, or more.
    pub fn coarsened(self, capacity: u64) -> ExtentList {
        if capacity.div_ceil(self.extent_bytes.max(1)) <= 4 * MAX_EXTENTS {
            return self;
        }
        let coarse = ExtentList::none_yet(capacity, self.through_epoch).extent_bytes;
        let per = coarse / self.extent_bytes.max(1);
        ExtentList {
            extent_bytes: coarse,
            through_epoch: self.through_epoch,
            extents: self.extents.iter().map(|e| e / per.max(1)).collect(),
        }
    }

    /// The listed extents as byte ranges `(start, len)` within a
    /// `capacity`-byte volume, neighbours merged.
    pub fn byte_runs(&self, capacity: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &e in &self.extents {
            let start = e.saturating_mul(self.extent_bytes);
            if start >= capacity {
                break;
            }
            let end = start.saturating_add(self.extent_bytes).min(capacity);
            match runs.last_mut() {
                Some((s, l)) if *s + *l == start => *l = end - *s,
                _ => runs.push((start, end - start)),
            }
        }
        runs
    }

    /// Marks every listed extent in `map`.
    pub fn mark_into(&self, map: &mut DirtyMap) {
        for e in &self.extents {
            map.mark(e.saturating_mul(self.extent_bytes), self.extent_bytes);
        }
    }

    /// Whether an engine under claim `epoch` may rely on the list: every
    /// claim since the fault kept it. Claim 0 (no claims: a standalone
    /// node's engines, tests) never moves.
    pub fn trusted_under(&self, epoch: u64) -> bool {
        epoch == 0 || self.through_epoch.saturating_add(1) == epoch || self.through_epoch == epoch
    }
}

/// Sorted, disjoint inclusive ranges as "a-b,c,d-e": compact for the runs
/// sequential writes leave.
pub mod ranges {
    use std::collections::BTreeSet;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn encode(set: &BTreeSet<u64>) -> String {
        let mut out = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for &e in set {
            run = match run {
                Some((a, b)) if b + 1 == e => Some((a, e)),
                Some(r) => {
                    out.push(r);
                    Some((e, e))
                }
                None => Some((e, e)),
            };
        }
        out.extend(run);
        out.iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The most extents a list may name: far above what `MAX_EXTENTS`
    /// leaves after any expansion, far below what could exhaust memory.
    const MAX_LISTED: u64 = 1 << 24;

    pub fn decode(text: &str) -> Result<BTreeSet<u64>, String> {
        let mut set = BTreeSet::new();
        if text.is_empty() {
            return Ok(set);
        }
        for part in text.split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let parse = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| format!("{part:?} is not an extent or a range of them"))
            };
            let (a, b) = (parse(a)?, parse(b)?);
            if a > b || b - a >= MAX_LISTED || set.len() as u64 + (b - a) >= MAX_LISTED {
                return Err(format!("extent range {part:?} is backwards or too long"));
            }
            set.extend(a..=b);
        }
        Ok(set)
    }

    pub fn serialize<S: Serializer>(set: &BTreeSet<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(set))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<u64>, D::Error> {
        let text = String::deserialize(d)?;
        decode(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extents_are_coarse_for_big_volumes_and_regions_for_small_ones() {
        assert_eq!(ExtentList::none_yet(128 << 20, 1).extent_bytes, 8 << 20);
        assert_eq!(ExtentList::none_yet(8 << 30, 1).extent_bytes, 8 << 20);
        assert_eq!(ExtentList::none_yet(9 << 30, 1).extent_bytes, 16 << 20);
        assert_eq!(ExtentList::none_yet(100 << 30, 1).extent_bytes, 128 << 20);
        assert_eq!(ExtentList::none_yet(0, 1).extent_bytes, 8 << 20);
        let m = ExtentList::none_yet(u64::MAX, 1);
        assert!(m.extent_bytes.is_power_of_two());
    }

    #[test]
    fn a_write_lists_the_extents_it_touches_once() {
        let mut m = ExtentList::none_yet(64 << 20, 3);
        m.extent_bytes = 1 << 20;
        assert_eq!(m.unlisted(0, 0), Vec::<u64>::new());
        assert_eq!(m.unlisted((1 << 20) - 1, 2), vec![0, 1]);
        assert!(m.list(&[0, 1]));
        assert!(!m.list(&[1]));
        assert_eq!(m.unlisted(0, 3 << 20), vec![2]);
        assert_eq!(m.unlisted(u64::MAX - 1, 2), vec![u64::MAX >> 20]);
        let mut map = DirtyMap::new(64 << 20, DEFAULT_REGION);
        m.mark_into(&mut map);
        assert_eq!(map.dirty_regions().collect::<Vec<_>>(), vec![0, 1]);
        let coarse = ExtentList {
            extents: [1].into(),
            ..ExtentList::none_yet(64 << 20, 3)
        };
        let mut map = DirtyMap::new(64 << 20, DEFAULT_REGION);
        coarse.mark_into(&mut map);
        assert_eq!(
            map.dirty_regions().collect::<Vec<_>>(),
            (8..16).collect::<Vec<_>>()
        );
    }

    #[test]
    fn extents_are_unlisted_once_every_region_in_them_is_copied() {
        let mut m = ExtentList::everything(8 << 20, 1);
        m.extent_bytes = 2 << 20;
        m.extents = (0..4).collect();
        let mut map = DirtyMap::new(8 << 20, DEFAULT_REGION);
        map.mark_all();
        assert!(m.copied(&map).is_empty());
        map.clear(0);
        assert!(m.copied(&map).is_empty(), "half of extent 0 is still dirty");
        map.clear(1);
        map.clear(7);
        assert_eq!(m.copied(&map), vec![0]);
        map.clear(6);
        assert_eq!(m.copied(&map), vec![0, 3]);
        assert!(m.unlist(&[0, 3]));
        assert!(!m.unlist(&[0]));
        assert_eq!(m.extents, [1, 2].into());
        let all = ExtentList::everything(100 << 20, 2);
        assert_eq!(all.extents.len(), 13, "100 MiB in 8 MiB extents");
        assert_eq!(all.through_epoch, 2);
    }

    #[test]
    fn a_forward_stream_lists_ahead_and_a_random_write_only_itself() {
        let e = MIN_EXTENT;
        let mut log = ExtentList::none_yet(64 * e, 1);
        assert_eq!(log.to_list(5 * e, 10, 64 * e), vec![5], "nothing before it");
        log.list(&[5]);
        assert_eq!(log.to_list(6 * e, 10, 64 * e), vec![6, 7, 8, 9]);
        log.list(&[6, 7, 8, 9]);
        assert_eq!(log.to_list(7 * e - 1, 2, 64 * e), Vec::<u64>::new());
        log.unlist(&[8]);
        assert_eq!(
            log.to_list(8 * e, 10, 64 * e),
            vec![8, 10, 11],
            "9 is listed"
        );
        assert_eq!(log.to_list(10 * e, 10, 64 * e), vec![10, 11, 12, 13]);
        assert_eq!(log.to_list(20 * e, 10, 64 * e), vec![20]);
        log.list(&[62]);
        assert_eq!(
            log.to_list(63 * e, 10, 64 * e),
            vec![63],
            "none past the end"
        );
    }

    #[test]
    fn byte_runs_merge_neighbours_and_stop_at_the_capacity() {
        let e = MIN_EXTENT;
        let mut log = ExtentList::none_yet(10 * e, 1);
        assert!(log.byte_runs(10 * e).is_empty());
        log.list(&[0, 1, 3, 9, 12]);
        assert_eq!(
            log.byte_runs(9 * e + 5),
            vec![(0, 2 * e), (3 * e, e), (9 * e, 5)]
        );
    }

    #[test]
    fn a_list_of_a_volume_grown_far_is_coarsened_over_the_same_bytes() {
        let mut log = ExtentList::none_yet(1 << 30, 1);
        log.list(&[0, 3, 127]);
        assert_eq!(log.clone().coarsened(1 << 30), log, "room enough");
        let grown = 64u64 << 40;
        let coarse = log.clone().coarsened(grown);
        assert_eq!(coarse.extent_bytes, 64 << 30);
        assert_eq!(coarse.extents, [0].into());
        let mut fine = DirtyMap::new(1 << 30, DEFAULT_REGION);
        log.mark_into(&mut fine);
        let mut wide = DirtyMap::new(1 << 30, DEFAULT_REGION);
        coarse.mark_into(&mut wide);
        assert!(fine.dirty_regions().all(|r| wide.is_dirty(r)));
    }

    #[test]
    fn only_an_unbroken_chain_of_claims_is_trusted() {
        let m = ExtentList::none_yet(1 << 30, 4);
        assert!(m.trusted_under(4), "the claim that faulted it");
        assert!(m.trusted_under(5), "the next claim");
        assert!(!m.trusted_under(6), "claim 5 kept no list");
        assert!(!m.trusted_under(3));
        assert!(m.trusted_under(0));
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in [
            "x",
            "1-",
            "-1",
            "3-1",
            "1,,2",
            "0-18446744073709551615",
            " 1",
        ] {
            assert!(ranges::decode(bad).is_err(), "{bad:?}");
        }
        let json = r#"{"extent_bytes":1048576,"through_epoch":2,"extents":"0-99999999999"}"#;
        assert!(serde_json::from_str::<ExtentList>(json).is_err());
    }

    proptest! {
        #[test]
        fn ranges_round_trip(set in proptest::collection::btree_set(0u64..5000, 0..300)) {
            let text = ranges::encode(&set);
            prop_assert_eq!(ranges::decode(&text).unwrap(), set.clone());
            let m = ExtentList { extent_bytes: 1 << 20, through_epoch: 1, extents: set };
            let back: ExtentList = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn listed_extents_cover_every_write(
            writes in proptest::collection::vec((0u64..(256 << 20), 1u64..(8 << 20)), 1..20),
        ) {
            let size = 256u64 << 20;
            let mut m = ExtentList::none_yet(size, 1);
            let mut fine = DirtyMap::new(size, DEFAULT_REGION);
            for (offset, len) in writes {
                let new = m.to_list(offset, len, size);
                prop_assert!(new.len() as u64 <= len.div_ceil(m.extent_bytes) + 1 + LOOKAHEAD);
                m.list(&new);
                fine.mark(offset, len);
                prop_assert!(m.unlisted(offset, len).is_empty());
            }
            let mut coarse = DirtyMap::new(size, DEFAULT_REGION);
            m.mark_into(&mut coarse);
            let mut runs = DirtyMap::new(size, DEFAULT_REGION);
            for (start, len) in m.byte_runs(size) {
                runs.mark(start, len);
            }
            for r in fine.dirty_regions() {
                prop_assert!(coarse.is_dirty(r), "region {} written but not listed", r);
                prop_assert!(runs.is_dirty(r), "region {} listed but not in a run", r);
            }
        }
    }
}
