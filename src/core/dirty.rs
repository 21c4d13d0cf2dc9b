//! Which regions of a volume a faulted replica has missed. Pure: a bitmap
//! over fixed-size regions, with an encoding for persisting it.
//!
//! A replica that comes back catches up by copying only the marked regions
//! from a healthy replica, then rejoins.

pub const DEFAULT_REGION: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"TRNADIRT";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    region: u64,
    size: u64,
    words: Vec<u64>,
}

impl DirtyMap {
    pub fn new(size: u64, region: u64) -> DirtyMap {
        let region = region.max(1);
        let regions = size.div_ceil(region);
        DirtyMap {
            region,
            size,
            words: vec![0; regions.div_ceil(64) as usize],
        }
    }

    pub fn region_size(&self) -> u64 {
        self.region
    }

    pub fn regions(&self) -> u64 {
        self.size.div_ceil(self.region)
    }

    /// Marks every region `[offset, offset+len)` touches. Returns whether
    /// any bit was newly set (then the map must be persisted before the
    /// write it records is acknowledged).
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.size {
            return false;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset / self.region;
        let last = (end - 1) / self.region;
        let mut changed = false;
        for r in first..=last {
            let (w, b) = ((r / 64) as usize, r % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                changed = true;
            }
        }
        changed
    }

    /// Marks everything: what is known when the map itself was lost.
    pub fn mark_all(&mut self) {
        let n = self.regions();
        for r in 0..n {
            self.words[(r / 64) as usize] |= 1 << (r % 64);
        }
    }

    pub fn clear(&mut self, region: u64) {
        if let Some(w) = self.words.get_mut((region / 64) as usize) {
            *w &= !(1 << (region % 64));
        }
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        self.words
            .get((region / 64) as usize)
            .is_some_and(|w| w & (1 << (region % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Dirty regions in ascending order.
    pub fn dirty_regions(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions()).filter(|&r| self.is_dirty(r))
    }

    /// Byte range of `region`, clipped to the volume (and empty past its
    /// end). Saturating: a decoded map may be as large as u64 allows.
    pub fn range(&self, region: u64) -> (u64, u64) {
        let start = region.saturating_mul(self.region).min(self.size);
        let end = start.saturating_add(self.region).min(self.size);
        (start, end - start)
    }

    /// Grows the map after a volume expansion; new space is clean.
    pub fn resize(&mut self, size: u64) {
        self.size = size.max(self.size);
        let words = self.regions().div_ceil(64) as usize;
        self.words.resize(words, 0);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + self.words.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.region.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
        out
    }

    /// `None` when the bytes are not an intact map (then everything must be
    /// treated as dirty).
    pub fn decode(bytes: &[u8]) -> Option<DirtyMap> {
        let body_len = bytes.len().checked_sub(4)?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32c::crc32c(body).to_le_bytes() != crc || body.len() < 24 || &body[..8] != MAGIC {
            return None;
        }
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(a)
        };
        // Checked before allocating anything: a damaged header may claim
        // any size, and the words present are all there is.
        let (region, size) = (u64_at(8), u64_at(16));
        // A region of 0 and bits past the last region are never written
        // (`new` takes at least 1, `mark` clips to the size).
        let words = body[24..].chunks_exact(8);
        if region == 0
            || !words.remainder().is_empty()
            || size.div_ceil(region).div_ceil(64) != words.len() as u64
        {
            return None;
        }
        let mut map = DirtyMap::new(size, region);
        for (w, bytes) in map.words.iter_mut().zip(words) {
            let mut a = [0u8; 8];
            a.copy_from_slice(bytes);
            *w = u64::from_le_bytes(a);
        }
        let tail = map.regions() % 64;
        if tail != 0 && map.words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        Some(map)
    }
}

/// Where volumes' dirty maps are kept between stagings
/// (`datapath::dirty_maps` keeps them in the data dir).
pub trait DirtyMapStore: Send + Sync {
    /// Forgets every map of `volume_id`, which was deleted. Forgetting
    /// what is already gone is success.
    fn forget(&self, volume_id: &str) -> crate::core::error::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_cover_touched_regions_only() {
        let mut m = DirtyMap::new(10 << 20, 1 << 20);
        assert!(m.mark((1 << 20) - 1, 2));
        assert!(!m.mark(1 << 20, 10));
        assert_eq!(m.dirty_regions().collect::<Vec<_>>(), [0, 1]);
        assert!(!m.mark(10 << 20, 5), "past the end marks nothing");
        assert!(m.mark((10 << 20) - 1, 100));
        assert_eq!(m.count(), 3);
        m.clear(0);
        assert_eq!(m.dirty_regions().collect::<Vec<_>>(), [1, 9]);
        assert_eq!(m.range(9), (9 << 20, 1 << 20));
    }

    #[test]
    fn damaged_encodings_are_refused() {
        let mut m = DirtyMap::new(100 << 20, 1 << 20);
        m.mark(5 << 20, 1);
        let mut bytes = m.encode();
        assert_eq!(DirtyMap::decode(&bytes), Some(m));
        bytes[30] ^= 1;
        assert_eq!(DirtyMap::decode(&bytes), None);
        assert_eq!(DirtyMap::decode(&[]), None);
        assert_eq!(DirtyMap::decode(b"short"), None);
    }

    /// A map's encoding from its header fields and words, with a valid CRC.
    fn encoded(region: u64, size: u64, words: &[u64]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&region.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
        out
    }

    // Found by tests/fuzz.rs (dirty_map); the inputs are also in
    // fuzz/corpus/dirty_map/crash-*.

    #[test]
    fn fuzz_regression_a_claimed_size_is_checked_against_the_words_before_allocating() {
        // 7 words claiming 2^64 - 2^58 bytes of 1 MiB regions: decode used
        // to allocate the 2 TB bitmap (and abort) before comparing.
        let bytes = encoded(1 << 20, 0xeaea_ea00_4000_0200, &[0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(DirtyMap::decode(&bytes), None);
    }

    #[test]
    fn fuzz_regression_ranges_saturate_at_the_end_of_u64() {
        // Two regions of 2^63 bytes: the second one's end used to overflow.
        let map = DirtyMap::decode(&encoded(1 << 63, u64::MAX, &[0b11])).unwrap();
        assert_eq!(map.dirty_regions().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(map.range(1), (1 << 63, (1 << 63) - 1));
        assert_eq!(map.range(2), (u64::MAX, 0), "past the end: empty");
    }

    #[test]
    fn fuzz_regression_bits_past_the_last_region_are_corruption() {
        // Three regions, a bit set for a fourth: counted as dirty, yet no
        // dirty region would ever clear it.
        assert_eq!(
            DirtyMap::decode(&encoded(1 << 20, 3 << 20, &[0b1001])),
            None
        );
        assert!(DirtyMap::decode(&encoded(1 << 20, 3 << 20, &[0b101])).is_some());
        // A full last word is all regions.
        assert!(DirtyMap::decode(&encoded(1, 64, &[u64::MAX])).is_some());
    }

    #[test]
    fn fuzz_regression_region_zero_is_corruption() {
        // `new` never makes one; decoded as 1 it re-encoded differently.
        assert_eq!(DirtyMap::decode(&encoded(0, 0, &[])), None);
        assert_eq!(DirtyMap::decode(&encoded(0, 64, &[1])), None);
    }

    proptest! {
        /// Any mutation of a real map, its checksum then recomputed (so it
        /// is not simply refused), is either refused or decodes to a map no
        /// bigger than its bytes, whose dirty regions lie within it and
        /// which encodes back to exactly those bytes.
        #[test]
        fn mutated_maps_are_refused_or_bounded(
            size in 0u64..(1 << 40),
            region_shift in 10u32..30,
            marks in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut m = DirtyMap::new(size % (1 << 30), 1 << region_shift);
            for (off, len) in marks {
                m.mark(off % (size + 1), len % (1 << 30));
            }
            let mut bytes = m.encode();
            prop_assert_eq!(DirtyMap::decode(&bytes), Some(m));
            let body = bytes.len() - 4;
            let mut body_bytes = bytes[..body].to_vec();
            for (at, value) in edits {
                let i = at.index(body_bytes.len());
                body_bytes[i] = value;
            }
            if truncate {
                body_bytes.truncate(cut.index(body_bytes.len() + 1));
            }
            bytes = body_bytes.clone();
            bytes.extend_from_slice(&crc32c::crc32c(&body_bytes).to_le_bytes());
            if let Some(d) = DirtyMap::decode(&bytes) {
                prop_assert_eq!(d.words.len() * 8 + 28, bytes.len());
                prop_assert!(d.count() <= d.regions());
                prop_assert!(d.dirty_regions().all(|r| d.range(r).1 > 0));
                prop_assert_eq!(d.encode(), bytes);
            }
        }

        /// The checksum catches every single-bit error, wherever it is.
        #[test]
        fn any_bit_flip_is_refused(
            size in 0u64..(1 << 30),
            marks in proptest::collection::vec(any::<u64>(), 0..8),
            bit in any::<prop::sample::Index>(),
        ) {
            let mut m = DirtyMap::new(size, 1 << 16);
            for off in marks {
                m.mark(off % (size + 1), 1);
            }
            let mut bytes = m.encode();
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            prop_assert_eq!(DirtyMap::decode(&bytes), None);
        }

        /// Against a reference model: a set of dirty byte-region indices.
        #[test]
        fn behaves_like_a_set_of_regions(
            size in 1u64..(64 << 20),
            region_shift in 12u32..22,
            ops in proptest::collection::vec((any::<bool>(), 0u64..(70 << 20), 0u64..(8 << 20)), 0..40),
        ) {
            let region = 1u64 << region_shift;
            let mut m = DirtyMap::new(size, region);
            let mut model = std::collections::BTreeSet::new();
            for (is_mark, off, len) in ops {
                if is_mark {
                    let before = model.len();
                    if len > 0 && off < size {
                        let end = (off + len).min(size);
                        for r in off / region..=(end - 1) / region { model.insert(r); }
                    }
                    prop_assert_eq!(m.mark(off, len), model.len() > before);
                } else {
                    let r = off / region;
                    m.clear(r);
                    model.remove(&r);
                }
                prop_assert_eq!(m.dirty_regions().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            }
            prop_assert_eq!(DirtyMap::decode(&m.encode()), Some(m.clone()));
        }
    }
}
