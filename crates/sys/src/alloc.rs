//! The allocator of the stasis binary: the system's, except in a thread that holds a
//! [`SharedArena`], whose allocations come from one large shared anonymous mapping.
//!
//! Why: `stasis restore` forks every restored process from itself. A fork copies the page
//! table entries of every private anonymous page the parent has (and the child removes
//! them again when it rebuilds its address space), so the decoded image metadata, about
//! 10 KiB per process, was copied once per restored process: for a tree of 1000, 11 MiB
//! a thousand times, a third of the restore's CPU time. A shared mapping is duplicated
//! by a fork without its pages: the children still read the records (nothing there is
//! written after the fork), at the cost of a minor fault for each page they touch.
//!
//! The arena only grows while anything allocated in it lives; once everything is freed,
//! the next [`SharedArena`] starts it over and gives its pages back. When it is full
//! (or cannot be mapped) allocations go to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Address space reserved for the arena (MAP_NORESERVE: pages exist once touched).
const ARENA_LEN: usize = 4 << 30;

/// The global allocator of the stasis binary (`#[global_allocator]` in its main.rs). In
/// a program without it, [`SharedArena`] changes nothing.
pub struct StasisAlloc;

thread_local! {
    static IN_ARENA: Cell<bool> = const { Cell::new(false) };
}
/// The arena's start, 0 until it is mapped.
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Bytes of the arena handed out so far.
static USED: AtomicUsize = AtomicUsize::new(0);
/// Allocations of the arena not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);

fn arena_wanted() -> bool {
    IN_ARENA.try_with(|c| c.get()).unwrap_or(false)
}

fn in_arena(p: *mut u8) -> bool {
    let base = BASE.load(Ordering::Acquire);
    base != 0 && (p as usize) >= base && (p as usize) < base + ARENA_LEN
}

/// The arena's start, mapping it on first use; None if it cannot be mapped.
fn arena_base() -> Option<usize> {
    let base = BASE.load(Ordering::Acquire);
    if base != 0 {
        return Some(base);
    }
    // SAFETY: a fresh mapping at an address the kernel picks; no memory of ours changes.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ARENA_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    match BASE.compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(p as usize),
        Err(other) => {
            // SAFETY: our own mapping from above, which nothing else knows of.
            unsafe { libc::munmap(p, ARENA_LEN) };
            Some(other)
        }
    }
}

/// `layout` bytes from the arena, or null if it has no room.
fn arena_alloc(layout: Layout) -> *mut u8 {
    let Some(base) = arena_base() else { return std::ptr::null_mut() };
    let mut used = USED.load(Ordering::Relaxed);
    loop {
        let start = (base + used).next_multiple_of(layout.align()) - base;
        let end = match start.checked_add(layout.size()) {
            Some(end) if end <= ARENA_LEN => end,
            _ => return std::ptr::null_mut(),
        };
        match USED.compare_exchange_weak(used, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                LIVE.fetch_add(1, Ordering::AcqRel);
                return (base + start) as *mut u8;
            }
            Err(now) => used = now,
        }
    }
}

// SAFETY: every block handed out is `layout.size()` bytes aligned to `layout.align()`,
// from the system allocator or from the arena, whose blocks never overlap (a bump
// pointer moved by compare-and-swap) and are only reused once none is live; each block
// goes back to where it came from.
unsafe impl GlobalAlloc for StasisAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match arena_wanted().then(|| arena_alloc(layout)).filter(|p| !p.is_null()) {
            Some(p) => p,
            // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // An arena block was never handed out since the arena was last emptied (and its
        // pages removed): still zero.
        match arena_wanted().then(|| arena_alloc(layout)).filter(|p| !p.is_null()) {
            Some(p) => p,
            // SAFETY: the caller's layout (calloc: fresh pages from the kernel need no memset).
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            LIVE.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        // SAFETY: a block of the system allocator with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_arena(ptr) && !arena_wanted() {
            // SAFETY: a block of the system allocator, as the caller guarantees.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the new layout is valid: same alignment, a size the caller checked.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for alloc.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are at least this long and distinct (a new block).
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: the old block with its layout, no longer used.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

/// While it lives, the current thread's allocations go to the shared arena (see the
/// module documentation). What is allocated there must not be written after a fork that
/// copies it, and nothing may fork while one lives: a child would allocate in memory it
/// shares with us. Without [`StasisAlloc`] as the global allocator, changes nothing.
pub struct SharedArena(std::marker::PhantomData<*const ()>);

impl SharedArena {
    pub fn enter() -> SharedArena {
        let base = BASE.load(Ordering::Acquire);
        if base != 0 && LIVE.load(Ordering::Acquire) == 0 {
            let used = USED.swap(0, Ordering::AcqRel);
            if used > 0 {
                // SAFETY: the used part of our own arena, where nothing is live; its pages
                // are given back (a shared mapping keeps them otherwise), zero after.
                unsafe { libc::madvise(base as *mut libc::c_void, used.next_multiple_of(4096), libc::MADV_REMOVE) };
            }
        }
        IN_ARENA.with(|c| c.set(true));
        SharedArena(std::marker::PhantomData)
    }
}

impl Drop for SharedArena {
    fn drop(&mut self) {
        IN_ARENA.with(|c| c.set(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_blocks_are_aligned_and_apart() {
        let a = arena_alloc(Layout::from_size_align(10, 1).unwrap());
        let b = arena_alloc(Layout::from_size_align(64, 64).unwrap());
        assert!(!a.is_null() && !b.is_null());
        assert!(in_arena(a) && in_arena(b));
        assert_eq!(b as usize % 64, 0);
        assert!(b as usize >= a as usize + 10);
        let huge = arena_alloc(Layout::from_size_align(ARENA_LEN, 8).unwrap());
        assert!(huge.is_null(), "no room: the caller falls back to the system allocator");
        // SAFETY: blocks from above, with their layouts.
        unsafe {
            StasisAlloc.dealloc(a, Layout::from_size_align(10, 1).unwrap());
            StasisAlloc.dealloc(b, Layout::from_size_align(64, 64).unwrap());
        }
    }
}
