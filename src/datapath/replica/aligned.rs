//! Page-aligned byte buffers for O_DIRECT, without `unsafe`: over-allocate
//! and slice at the first aligned address.

pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Whether O_DIRECT can take this buffer, offset and length as they are.
pub fn is_aligned(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize).is_multiple_of(ALIGN)
        && len.is_multiple_of(ALIGN)
        && offset.is_multiple_of(ALIGN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [0, 1, 512, 4096, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().len(), len);
            assert!(is_aligned(b.as_slice().as_ptr(), 0, 0));
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
        assert_eq!(AlignedBuf::copy_of(b"abc").as_slice(), b"abc");
        assert!(!is_aligned(std::ptr::null::<u8>().wrapping_add(1), 4096, 0));
        assert!(!is_aligned(std::ptr::null(), 512, 0));
        assert!(!is_aligned(std::ptr::null(), 4096, 512));
    }
}
