//! [`AlignedBuf`]: a zero-initialised heap buffer whose start is aligned to
//! [`ALIGN`], as `O_DIRECT` I/O needs (the kernel refuses, or bounces, a misaligned user
//! buffer). Volume plaintext and ciphertext only: keys live in [`crate::secret`].

use std::alloc::Layout;
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page, which covers any logical block size a
/// host filesystem reports for direct I/O (512 or 4096).
pub const ALIGN: usize = 4096;

/// A byte buffer aligned to [`ALIGN`], zeroed on allocation, freed on drop.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocated bytes (>= len, a multiple of ALIGN; 0 for an empty buffer).
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); nothing aliases it.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8], as Vec<u8> does.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    ///
    /// # Panics
    /// When the allocation fails (as `Vec` does).
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                ptr: NonNull::<u8>::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let cap = len.div_ceil(ALIGN) * ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len, cap }
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, ALIGN).expect("ALIGN is a power of two; cap fits isize")
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that can be had without reallocating.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length to `len`, reallocating (zeroed, contents dropped) only when it
    /// exceeds the capacity; bytes that become visible again keep their old contents.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            *self = Self::zeroed(len);
        } else {
            self.len = len;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap != 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes, or dangling
        // and non-null for len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Whether `n` is a multiple of `align` (a power of two).
#[must_use]
pub fn is_aligned(n: u64, align: u64) -> bool {
    n & (align - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resizable() {
        let mut b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|&x| x == 0));
        b[4999] = 7;
        b.resize(100);
        assert_eq!(b.len(), 100);
        b.resize(8192);
        assert_eq!(b[4999], 7, "no reallocation within the capacity");
        b.resize(9000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0), "a reallocated buffer is zeroed");
        assert!(AlignedBuf::zeroed(0).is_empty());
        assert!(is_aligned(8192, 4096) && !is_aligned(512, 4096));
    }
}
