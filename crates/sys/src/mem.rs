//! Reading and writing another process's memory, and mapping memory in our own.

use crate::types::{cvt, Errno, Pid, RemoteAddr, SysResult};

/// One remote range for a vectored transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRange {
    pub addr: RemoteAddr,
    pub len: usize,
}

/// `process_vm_readv(2)`: copy the remote ranges, in order, into `buf`.
/// Returns the number of bytes copied (short when a remote page is unreadable).
pub fn process_vm_readv(pid: Pid, buf: &mut [u8], remote: &[RemoteRange]) -> SysResult<usize> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let riov: Vec<libc::iovec> = remote
        .iter()
        .map(|r| libc::iovec { iov_base: r.addr.0 as *mut libc::c_void, iov_len: r.len })
        .collect();
    // SAFETY: `local` covers exactly `buf`, which is writable and outlives the call; the
    // remote iovecs describe the other process's memory, which the kernel checks itself.
    let n = unsafe { libc::process_vm_readv(pid.0, &local, 1, riov.as_ptr(), riov.len() as _, 0) };
    cvt(n as libc::c_long).map(|n| n as usize)
}

/// `process_vm_writev(2)`: copy `buf` into the remote ranges, in order.
pub fn process_vm_writev(pid: Pid, buf: &[u8], remote: &[RemoteRange]) -> SysResult<usize> {
    let local = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let riov: Vec<libc::iovec> = remote
        .iter()
        .map(|r| libc::iovec { iov_base: r.addr.0 as *mut libc::c_void, iov_len: r.len })
        .collect();
    // SAFETY: `local` covers exactly `buf`, which is readable for the call's duration; the
    // kernel validates the remote ranges.
    let n = unsafe { libc::process_vm_writev(pid.0, &local, 1, riov.as_ptr(), riov.len() as _, 0) };
    cvt(n as libc::c_long).map(|n| n as usize)
}

/// A private anonymous mapping in our own address space, unmapped on drop. Used for
/// large I/O buffers that must not be touched by the allocator.
pub struct LocalMapping {
    ptr: *mut u8,
    len: usize,
}

impl LocalMapping {
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS)`.
    pub fn anonymous(len: usize) -> SysResult<LocalMapping> {
        // SAFETY: a fresh anonymous mapping aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(LocalMapping { ptr: p as *mut u8, len })
    }

    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_ANONYMOUS)`: a new shmem
    /// object of `len` bytes (the kernel's "/dev/zero (deleted)" file), reachable by others
    /// through /proc/self/map_files while mapped.
    pub fn shared_anonymous(len: usize) -> SysResult<LocalMapping> {
        // SAFETY: a fresh anonymous mapping aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(LocalMapping { ptr: p as *mut u8, len })
    }

    /// `mmap(NULL, len, PROT_READ, MAP_SHARED [| MAP_POPULATE], fd, off)`: a read-only view
    /// of a file.
    pub fn file_readonly(
        fd: &impl std::os::fd::AsRawFd,
        off: u64,
        len: usize,
        populate: bool,
    ) -> SysResult<LocalMapping> {
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new read-only shared mapping of a file; no Rust object is aliased and
        // the slice handed out is only ever read.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, fd.as_raw_fd(), off as i64)
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(LocalMapping { ptr: p as *mut u8, len })
    }

    /// `madvise(advice)` over the whole mapping. `&mut self`: advice such as
    /// MADV_DONTNEED changes the bytes, so no slice of them may be alive.
    pub fn advise(&mut self, advice: i32) -> SysResult<()> {
        // SAFETY: the range is this mapping, which lives as long as `self`, and no
        // reference into it is alive (exclusive borrow); any advice that later makes an
        // access fault (guard pages, poison) is the caller's to know of, as with mprotect.
        cvt(unsafe { libc::madvise(self.ptr.cast(), self.len, advice) } as libc::c_long).map(drop)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe a live mapping owned exclusively by self. For file views
        // mapped read-only this is never called (the engine only writes anonymous buffers).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for LocalMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the region this object created; no reference outlives self.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

// SAFETY: the mapping is plain memory owned by this object; moving it between threads is
// as safe as moving a Vec<u8>.
unsafe impl Send for LocalMapping {}
// SAFETY: shared references only read.
unsafe impl Sync for LocalMapping {}

/// Map a fixed, previously free range of our own address space read/write/execute and
/// copy `code` to its start (`MAP_FIXED_NOREPLACE`). Used by a restore child just before it
/// hands itself to the restorer: the page becomes the place where injected system calls
/// run. The mapping is deliberately leaked: the restorer removes it from the child.
pub fn map_helper_region(addr: u64, len: usize, code: &[u8]) -> SysResult<()> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no Rust object
    // can be aliased; we then write only within the new mapping.
    unsafe {
        let p = libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        if p as u64 != addr {
            libc::munmap(p, len);
            return Err(Errno(libc::EEXIST));
        }
        std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len().min(len));
    }
    Ok(())
}

/// Gives the memory the allocator holds free back to the kernel (glibc's `malloc_trim`),
/// so that a fork copies, and the child later unmaps, only pages in use.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only returns free allocator memory; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts writing back the dirty page-cache pages of `fd` in `offset..offset + len`
/// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`): returns once the I/O is queued, so a
/// later fsync has only to wait for it.
pub fn start_writeback(fd: &impl std::os::fd::AsRawFd, offset: u64, len: u64) -> SysResult<()> {
    // SAFETY: plain integer arguments; the descriptor is borrowed for the call.
    cvt(unsafe { libc::sync_file_range(fd.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) }
        as libc::c_long)
    .map(drop)
}

