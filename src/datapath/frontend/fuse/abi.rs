//! The FUSE kernel ABI, as much of it as the Terna export needs: structures
//! and constants from `linux/fuse.h` (protocol 7.38; the kernel negotiates the
//! minimum of its own minor version and ours, and every structure below is
//! unchanged up to at least 7.44 / Linux 6.18, apart from `fuse_init_out`,
//! whose newer fields live in what used to be `unused` and which we zero).
//!
//! All structures are `#[repr(C)]`, made only of integers, and spell out their
//! padding, so they have no uninitialised bytes and any bit pattern is valid;
//! that is what [`Pod`] promises and what the byte conversions below rely on.
//! Compile-time assertions pin every size to the kernel's.

#![allow(dead_code)]

use std::mem::size_of;

pub const FUSE_KERNEL_VERSION: u32 = 7;
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 38;
pub const FUSE_ROOT_ID: u64 = 1;
pub const FUSE_MIN_READ_BUFFER: usize = 8192;

// Opcodes.
pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_OPENDIR: u32 = 27;
pub const FUSE_READDIR: u32 = 28;
pub const FUSE_RELEASEDIR: u32 = 29;
pub const FUSE_ACCESS: u32 = 34;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_FALLOCATE: u32 = 43;

// Notification codes (sent in `fuse_out_header.error` with `unique == 0`).
pub const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
pub const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
pub const FUSE_NOTIFY_RESEND: i32 = 7;

// fuse_init flags (first word).
pub const FUSE_ASYNC_READ: u32 = 1 << 0;
pub const FUSE_BIG_WRITES: u32 = 1 << 5;
pub const FUSE_ASYNC_DIO: u32 = 1 << 15;
pub const FUSE_WRITEBACK_CACHE: u32 = 1 << 16;
pub const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
pub const FUSE_MAX_PAGES: u32 = 1 << 22;
pub const FUSE_INIT_EXT: u32 = 1 << 30;
// fuse_init flags2 (second word, with FUSE_INIT_EXT): bit 37 of the 64.
pub const FUSE_PASSTHROUGH_FLAGS2: u32 = 1 << (37 - 32);
/// Deepest filesystem stacking the kernel allows (FILESYSTEM_MAX_STACK_DEPTH):
/// backing files may then live on an overlay.
pub const FUSE_MAX_STACK_DEPTH: u32 = 2;

// fuse_open_out.open_flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

// fuse_setattr_in.valid.
pub const FATTR_SIZE: u32 = 1 << 3;

/// `_IOW(229, 1, struct fuse_backing_map)`: registers a backing file,
/// returns its id.
pub const FUSE_DEV_IOC_BACKING_OPEN: u32 = (1 << 30) | (16 << 16) | (229 << 8) | 1;

/// Plain-old-data: `#[repr(C)]`, integers only, no implicit padding.
///
/// # Safety
/// Implementors must have no padding bytes and accept every bit pattern.
pub unsafe trait Pod: Copy + Default {}

/// Reads a `T` from the start of `bytes`, or `None` if `bytes` is too short.
pub fn read<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<T>() readable bytes (checked
    // above), read_unaligned copes with any alignment, and `T: Pod` is valid
    // for every bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Like [`read`], but a shorter input is zero-extended (for structures that
/// older kernels send truncated, such as `fuse_init_in`).
pub fn read_prefix<T: Pod>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let n = bytes.len().min(size_of::<T>());
    // SAFETY: `value` is a live, exclusively borrowed `T` (no padding, any bit
    // pattern valid, by `Pod`), so it may be viewed as size_of::<T>() bytes.
    let dst = unsafe {
        std::slice::from_raw_parts_mut((&mut value as *mut T).cast::<u8>(), size_of::<T>())
    };
    dst[..n].copy_from_slice(&bytes[..n]);
    value
}

/// The bytes of a `T`.
pub fn bytes_of<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all size_of::<T>() bytes behind the
    // reference are initialised; the slice borrows `value`.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// What a field of a [`Pod`] structure may be: a type every bit pattern of
/// which is a value, without padding. Private, so no type outside this
/// file can claim it.
trait Field {}

macro_rules! field {
    ($($t:ty),*) => {$(impl Field for $t {})*};
}
field!(u16, u32, u64, i32, i64);
impl<T: Field, const N: usize> Field for [T; N] {}

const fn is_field<T: Field>() {}

/// Defines kernel structures as [`Pod`], `#[repr(C)]`, each checked at
/// compile time: the kernel's size, no padding (the size is the sum of the
/// fields'), and only [`Field`]s as fields.
macro_rules! pod {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident = $size:literal {
            $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
        }
    )*) => {$(
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }
        const _: () = assert!(size_of::<$name>() == $size);
        const _: () = assert!(size_of::<$name>() == 0 $(+ size_of::<$ty>())*);
        const _: () = { $(is_field::<$ty>();)* };
        impl Field for $name {}
        // SAFETY: no padding and every field a `Field`, both checked just
        // above, so every byte is initialised and every bit pattern is a
        // value.
        unsafe impl Pod for $name {}
    )*};
}

pod! {
    pub struct fuse_in_header = 40 {
        pub len: u32,
        pub opcode: u32,
        pub unique: u64,
        pub nodeid: u64,
        pub uid: u32,
        pub gid: u32,
        pub pid: u32,
        pub total_extlen: u16,
        pub padding: u16,
    }

    pub struct fuse_out_header = 16 {
        pub len: u32,
        pub error: i32,
        pub unique: u64,
    }

    pub struct fuse_attr = 88 {
        pub ino: u64,
        pub size: u64,
        pub blocks: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub nlink: u32,
        pub uid: u32,
        pub gid: u32,
        pub rdev: u32,
        pub blksize: u32,
        pub flags: u32,
    }

    pub struct fuse_entry_out = 128 {
        pub nodeid: u64,
        pub generation: u64,
        pub entry_valid: u64,
        pub attr_valid: u64,
        pub entry_valid_nsec: u32,
        pub attr_valid_nsec: u32,
        pub attr: fuse_attr,
    }

    pub struct fuse_attr_out = 104 {
        pub attr_valid: u64,
        pub attr_valid_nsec: u32,
        pub dummy: u32,
        pub attr: fuse_attr,
    }

    pub struct fuse_init_in = 64 {
        pub major: u32,
        pub minor: u32,
        pub max_readahead: u32,
        pub flags: u32,
        pub flags2: u32,
        pub unused: [u32; 11],
    }

    pub struct fuse_init_out = 64 {
        pub major: u32,
        pub minor: u32,
        pub max_readahead: u32,
        pub flags: u32,
        pub max_background: u16,
        pub congestion_threshold: u16,
        pub max_write: u32,
        pub time_gran: u32,
        pub max_pages: u16,
        pub map_alignment: u16,
        pub flags2: u32,
        /// `max_stack_depth` (7.40) and `request_timeout` (7.43) in newer
        /// kernels; zero means "not used".
        pub unused: [u32; 7],
    }

    pub struct fuse_setattr_in = 88 {
        pub valid: u32,
        pub padding: u32,
        pub fh: u64,
        pub size: u64,
        pub lock_owner: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub unused4: u32,
        pub uid: u32,
        pub gid: u32,
        pub unused5: u32,
    }

    pub struct fuse_open_out = 16 {
        pub fh: u64,
        pub open_flags: u32,
        /// With FOPEN_PASSTHROUGH (7.40); padding before.
        pub backing_id: i32,
    }

    pub struct fuse_backing_map = 16 {
        pub fd: i32,
        pub flags: u32,
        pub padding: u64,
    }

    pub struct fuse_read_in = 40 {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub read_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }

    pub struct fuse_write_in = 40 {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub write_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }

    pub struct fuse_write_out = 8 {
        pub size: u32,
        pub padding: u32,
    }

    pub struct fuse_kstatfs = 80 {
        pub blocks: u64,
        pub bfree: u64,
        pub bavail: u64,
        pub files: u64,
        pub ffree: u64,
        pub bsize: u32,
        pub namelen: u32,
        pub frsize: u32,
        pub padding: u32,
        pub spare: [u32; 6],
    }

    pub struct fuse_fallocate_in = 32 {
        pub fh: u64,
        pub offset: u64,
        pub length: u64,
        pub mode: u32,
        pub padding: u32,
    }

    pub struct fuse_dirent = 24 {
        pub ino: u64,
        pub off: u64,
        pub namelen: u32,
        pub typ: u32,
        // followed by `namelen` bytes of name, padded to 8 bytes
    }

    pub struct fuse_notify_inval_inode_out = 24 {
        pub ino: u64,
        pub off: i64,
        pub len: i64,
    }

    pub struct fuse_notify_inval_entry_out = 16 {
        pub parent: u64,
        pub namelen: u32,
        pub flags: u32,
    }
}
