//! The `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` (Linux 6.7+): which pages of a range
//! exist, and of what kind, in one call per batch of regions instead of 8 bytes per page.

use crate::types::{Errno, SysResult};
use std::os::fd::AsRawFd;

pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
/// Guard regions installed with `MADV_GUARD_INSTALL` (Linux 6.15+).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One run of pages with identical categories: `[start, end)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// What to look for, in the kernel's terms: a page matches when
/// `((cat ^ inverted) & mask) == mask` and, if `anyof` is set, `(cat ^ inverted) & anyof != 0`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanQuery {
    pub mask: u64,
    pub inverted: u64,
    pub anyof: u64,
    pub return_mask: u64,
}

const PAGEMAP_SCAN: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16) | (0x66 << 8) | 16;

/// `ioctl(pagemap_fd, PAGEMAP_SCAN)` over `[start, end)`, appending matching regions to
/// `out`. Loops until the kernel has walked the whole range.
pub fn scan(
    pagemap: &impl AsRawFd,
    start: u64,
    end: u64,
    q: ScanQuery,
    out: &mut Vec<PageRegion>,
) -> SysResult<()> {
    let mut buf = vec![PageRegion::default(); 512];
    let mut pos = start;
    while pos < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: pos,
            end,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            category_inverted: q.inverted,
            category_mask: q.mask,
            category_anyof_mask: q.anyof,
            return_mask: q.return_mask,
            ..Default::default()
        };
        // SAFETY: `arg` is a correctly sized pm_scan_arg whose `vec` points to `buf`, a live
        // array of `vec_len` page_region records the kernel may fill.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut PmScanArg) };
        if n < 0 {
            return Err(Errno::last());
        }
        out.extend_from_slice(&buf[..n as usize]);
        if arg.walk_end <= pos {
            break;
        }
        pos = arg.walk_end;
    }
    Ok(())
}

/// Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
/// The page is mapped once, by this process only.
pub const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
/// The page frame number of a present page (zero without CAP_SYS_ADMIN).
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Reads the pagemap entries of the `out.len()` pages from `addr` with one pread.
pub fn read_entries(pagemap: &std::fs::File, addr: u64, out: &mut [u64]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; out.len() * 8];
    pagemap.read_exact_at(&mut bytes, addr / crate::PAGE_SIZE * 8)?;
    for (e, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *e = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
    Ok(())
}
