//! Memory objects that mappings and descriptors refer to, saved once per object however
//! many processes use it: shared anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, the kernel's
//! "/dev/zero (deleted)" shmem file), memfd, and tmpfs files unlinked while still mapped or
//! open (a POSIX shared memory object after shm_unlink).
//!
//! Dump: every mapping and descriptor of such an object is identified by the (device,
//! inode) of /proc/PID/map_files/START-END or /proc/PID/fd/N; the first one seen opens the
//! object (read-only, through that link) and records its kind, name, size, owner, mode, seals and
//! data ranges (SEEK_DATA/SEEK_HOLE, so holes cost nothing); the mappings and descriptors
//! get the object's id. The page writer then reads each object's data once with pread.
//!
//! Restore, before any process exists: [`ShmemTable::create`] makes every object again
//! (mmap of shared anonymous memory in the restorer, reopened through
//! /proc/self/map_files so that it stays the same kind of object; memfd_create; a tmpfs
//! file created and unlinked at once), sets its size and writes its data with large
//! pwrites. Restored processes inherit the restorer's descriptors of each object and map
//! them at the saved offsets (mm::MmRestore) or reopen them as their descriptors
//! (files::DescTable). Seals go on last ([`ShmemTable::seal`]), once every mapping exists:
//! a write seal forbids writable mappings, a future-write seal forbids new ones.

use crate::error::{Error, Result};
use stasis_image::{FdKind, Image, PageRun, ShmemKind, ShmemRecord, VmaBacking};
use stasis_sys::{Pid, PAGE_SIZE};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

const TMPFS_MAGIC: i64 = 0x0102_1994;
/// The longest name memfd_create accepts (249 bytes after the "memfd:" prefix).
const MEMFD_NAME_MAX: usize = 249;
const MFD_CLOEXEC: u32 = 1;
const MFD_ALLOW_SEALING: u32 = 2;

/// What a /proc name ("/dev/zero (deleted)", "/memfd:NAME (deleted)", "/dev/shm/x
/// (deleted)") says the object is, if it is one saved as a memory object. Whether a deleted
/// file really is on tmpfs is checked on the object itself.
pub fn kind_from_name(name: &[u8]) -> Option<ShmemKind> {
    let s = name.strip_suffix(b" (deleted)")?;
    if s == b"/dev/zero" {
        return Some(ShmemKind::Anonymous);
    }
    if let Some(n) = s.strip_prefix(b"/memfd:") {
        return Some(ShmemKind::Memfd { name: n.to_vec() });
    }
    if s.starts_with(b"/SYSV") || !s.starts_with(b"/") {
        return None;
    }
    Some(ShmemKind::DeletedFile { path: s.to_vec() })
}

// ---------------------------------------------------------------------------------------
// Dump half.

struct Object {
    ident: (u64, u64),
    rec: ShmemRecord,
    /// Our read-only descriptor of the object, for its data.
    file: File,
}

/// The memory objects of a tree, as its mappings and descriptors are collected.
#[derive(Default)]
pub struct ShmemDump {
    objects: Vec<Object>,
}

impl ShmemDump {
    /// The id of the object that `link` (/proc/PID/map_files/S-E or /proc/PID/fd/N) leads
    /// to, recording it the first time. `kind` comes from the /proc name; `refuse` turns a
    /// reason into the error that names the mapping or descriptor.
    pub fn intern(&mut self, pid: Pid, link: &str, kind: ShmemKind, refuse: impl Fn(String) -> Error) -> Result<u64> {
        let md = std::fs::metadata(link).map_err(|e| Error::Proc { pid, path: link.into(), err: e })?;
        let ident = (md.dev(), md.ino());
        if let Some(o) = self.objects.iter().find(|o| o.ident == ident) {
            return Ok(o.rec.id);
        }
        if !md.is_file() {
            return Err(refuse(format!("{} that is not a regular file", kind.describe())));
        }
        let file = File::open(link).map_err(|e| Error::Proc { pid, path: link.into(), err: e })?;
        let fs = stasis_sys::proc::fs_type(file.as_raw_fd()).map_err(Error::sys(pid, "fstatfs"))?;
        if fs != TMPFS_MAGIC {
            return Err(refuse(format!("{} on a file system other than tmpfs (type {fs:#x})", kind.describe())));
        }
        let seals = match kind {
            ShmemKind::Memfd { .. } => stasis_sys::proc::get_seals(file.as_raw_fd()).map_err(Error::sys(pid, "F_GET_SEALS"))?,
            _ => 0,
        };
        let pages = data_runs(&file, md.size());
        let rec = ShmemRecord {
            id: self.objects.len() as u64 + 1,
            kind,
            size: md.size(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            seals,
            pages,
            data_offset: 0,
        };
        log::debug!("pid {pid}: {link}: object {} ({}, {} bytes, {} saved)", rec.id, rec.kind.describe(), rec.size, rec.data_len());
        let id = rec.id;
        self.objects.push(Object { ident, rec, file });
        Ok(id)
    }

    /// Bytes of data to save, over all objects.
    pub fn data_len(&self) -> u64 {
        self.objects.iter().map(|o| o.rec.data_len()).sum()
    }

    /// Each object's data runs as (object index, byte offset in the object, length), in
    /// the order they go into the page data; sets each record's `data_offset`, the first
    /// at `base`.
    pub fn layout(&mut self, base: u64) -> Vec<(usize, u64, u64)> {
        let mut at = base;
        let mut out = Vec::new();
        for (i, o) in self.objects.iter_mut().enumerate() {
            o.rec.data_offset = at;
            for r in &o.rec.pages {
                out.push((i, r.addr, r.len()));
            }
            at += o.rec.data_len();
        }
        out
    }

    /// Fills `out` with object `idx`'s bytes from offset `off`; past the end of the object
    /// (the tail of its last page), zeros.
    pub fn read(&self, idx: usize, off: u64, out: &mut [u8]) -> Result<()> {
        let o = &self.objects[idx];
        let avail = o.rec.size.saturating_sub(off).min(out.len() as u64) as usize;
        o.file
            .read_exact_at(&mut out[..avail], off)
            .map_err(|e| Error::Io { op: "read", path: o.rec.kind.describe().into(), err: e })?;
        out[avail..].fill(0);
        Ok(())
    }

    pub fn into_records(self) -> Vec<ShmemRecord> {
        self.objects.into_iter().map(|o| o.rec).collect()
    }
}

/// The data ranges of a file of `size` bytes, as page runs (`addr` is the byte offset).
fn data_runs(f: &File, size: u64) -> Vec<PageRun> {
    let end = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut runs: Vec<PageRun> = Vec::new();
    let mut off = 0;
    while off < end {
        let Some(data) = stasis_sys::proc::seek_data(f.as_raw_fd(), off, false) else { break };
        if data >= end {
            break;
        }
        let hole = stasis_sys::proc::seek_data(f.as_raw_fd(), data, true).unwrap_or(end).min(end);
        let s = data & !(PAGE_SIZE - 1);
        let e = hole.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        match runs.last_mut() {
            Some(last) if last.end() == s => last.npages += (e - s) / PAGE_SIZE,
            _ => runs.push(PageRun::new(s, (e - s) / PAGE_SIZE)),
        }
        off = e;
    }
    runs
}

// ---------------------------------------------------------------------------------------
// Restore half.

/// Checks the memory-object table of an image and every reference to it, before anything
/// is created: ids unique, names usable, data inside the object and inside the image.
pub fn validate(img: &Image, pages_len: u64) -> Result<()> {
    let bad = |what: String| Error::Incompatible(what);
    let mut ids = std::collections::HashSet::new();
    for r in &img.shmem {
        let what = format!("memory object {} ({})", r.id, r.kind.describe());
        if r.id == 0 || !ids.insert(r.id) {
            return Err(bad(format!("{what}: id is zero or not unique")));
        }
        match &r.kind {
            ShmemKind::Anonymous => {
                if r.size == 0 || r.size % PAGE_SIZE != 0 {
                    return Err(bad(format!("{what}: size {} is not a whole number of pages", r.size)));
                }
            }
            ShmemKind::Memfd { name } => {
                if name.len() > MEMFD_NAME_MAX || name.contains(&0) {
                    return Err(bad(format!("{what}: unusable name")));
                }
            }
            ShmemKind::DeletedFile { path } => {
                if !path.starts_with(b"/") || path.contains(&0) || Path::new(std::ffi::OsStr::from_bytes(path)).parent().is_none() {
                    return Err(bad(format!("{what}: unusable path")));
                }
            }
        }
        if r.seals != 0 && !matches!(r.kind, ShmemKind::Memfd { .. }) {
            return Err(bad(format!("{what}: seals on an object that is not a memfd")));
        }
        let limit = r.size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut prev = 0;
        for p in &r.pages {
            if p.data.is_some() || p.addr % PAGE_SIZE != 0 || p.addr < prev || p.addr.checked_add(p.len()).is_none_or(|e| e > limit) {
                return Err(bad(format!("{what}: data run at {:#x} lies outside the object or out of order", p.addr)));
            }
            prev = p.end();
        }
        if r.data_offset.checked_add(r.data_len()).is_none_or(|e| e > pages_len) {
            return Err(bad(format!("{what}: its data lies outside the image")));
        }
    }
    for p in &img.processes {
        for v in &p.mm.vmas {
            if let VmaBacking::Shmem(id) = v.backing {
                if !ids.contains(&id) {
                    return Err(bad(format!("pid {}: mapping {:#x}-{:#x} refers to memory object {id}, which the image lacks", p.pid, v.start, v.end)));
                }
            }
        }
        for f in &p.fds {
            if let FdKind::Shmem { id, .. } = f.kind {
                if !ids.contains(&id) {
                    return Err(bad(format!("pid {}: fd {} refers to memory object {id}, which the image lacks", p.pid, f.fd)));
                }
            }
        }
    }
    Ok(())
}

struct Made {
    /// Read-write descriptor: data, seals, writable shared mappings, reopened descriptors.
    rw: OwnedFd,
    /// Read-only descriptor, for mappings that may never become writable (no VM_MAYWRITE),
    /// which a write seal requires.
    ro: OwnedFd,
    seals: u32,
}

/// The memory objects of an image, re-created by the restorer; restored processes inherit
/// the descriptors.
#[derive(Default)]
pub struct ShmemTable {
    objects: HashMap<u64, Made>,
    /// Bytes of data written into the objects.
    pub loaded: u64,
}

impl ShmemTable {
    /// Creates every object with its size, mode and data (not yet its seals). `pages` is
    /// all page data of the image; the records were checked by [`validate`].
    pub fn create(recs: &[ShmemRecord], pages: &[u8], root: Pid) -> Result<ShmemTable> {
        let mut t = ShmemTable::default();
        for r in recs {
            let what = || format!("memory object {} ({})", r.id, r.kind.describe());
            let fail = |op: &str, e: std::io::Error| Error::Restore { pid: root, what: format!("{}: {op}: {e}", what()) };
            let file = make(r).map_err(|e| fail("create", e))?;
            if file.metadata().map_err(|e| fail("fstat", e))?.size() != r.size {
                file.set_len(r.size).map_err(|e| fail("ftruncate", e))?;
            }
            if !matches!(r.kind, ShmemKind::Anonymous) {
                std::os::unix::fs::fchown(&file, Some(r.uid), Some(r.gid)).map_err(|e| fail("fchown", e))?;
                file.set_permissions(std::fs::Permissions::from_mode(r.mode)).map_err(|e| fail("fchmod", e))?;
            }
            let mut at = r.data_offset as usize;
            for p in &r.pages {
                let len = p.len().min(r.size.saturating_sub(p.addr)) as usize;
                file.write_all_at(&pages[at..at + len], p.addr).map_err(|e| fail("write", e))?;
                at += p.len() as usize;
                t.loaded += len as u64;
            }
            let rw = OwnedFd::from(file);
            let ro = stasis_sys::proc::open(
                Path::new(&format!("/proc/self/fd/{}", rw.as_raw_fd())),
                libc::O_RDONLY | libc::O_CLOEXEC,
                0,
            )
            .map_err(|e| fail("reopen read-only", e.into()))?;
            t.objects.insert(r.id, Made { rw, ro, seals: r.seals });
        }
        Ok(t)
    }

    /// Our descriptor of object `id`, read-write or read-only.
    pub fn fd(&self, id: u64, rw: bool) -> Option<i32> {
        self.objects.get(&id).map(|m| if rw { m.rw.as_raw_fd() } else { m.ro.as_raw_fd() })
    }

    /// Puts the saved seals on every memfd, once all mappings exist.
    pub fn seal(&self, root: Pid) -> Result<()> {
        for (id, m) in &self.objects {
            if m.seals != 0 {
                stasis_sys::proc::add_seals(m.rw.as_raw_fd(), m.seals).map_err(|e| Error::Restore {
                    pid: root,
                    what: format!("memory object {id}: F_ADD_SEALS {:#x}: {e}", m.seals),
                })?;
            }
        }
        Ok(())
    }
}

/// A new, empty object of the record's kind.
fn make(r: &ShmemRecord) -> std::io::Result<File> {
    match &r.kind {
        ShmemKind::Anonymous => {
            // Anonymous shared memory is a shmem file only the kernel can make: map some and
            // open the mapping's file; the mapping itself is not needed any more.
            let m = stasis_sys::mem::LocalMapping::shared_anonymous(r.size as usize)?;
            let link = format!("/proc/self/map_files/{:x}-{:x}", m.addr(), m.addr() + r.size);
            Ok(File::from(stasis_sys::proc::open(Path::new(&link), libc::O_RDWR | libc::O_CLOEXEC, 0)?))
        }
        ShmemKind::Memfd { name } => {
            Ok(File::from(stasis_sys::proc::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)?))
        }
        ShmemKind::DeletedFile { path } => {
            // Under its old name if that is free (then /proc shows the same "(deleted)"
            // name), else as an unnamed file in the same directory.
            let p = Path::new(std::ffi::OsStr::from_bytes(path));
            let flags = libc::O_RDWR | libc::O_CLOEXEC;
            match stasis_sys::proc::open(p, flags | libc::O_CREAT | libc::O_EXCL, r.mode & 0o777) {
                Ok(fd) => {
                    std::fs::remove_file(p)?;
                    Ok(File::from(fd))
                }
                Err(_) => {
                    let dir = p.parent().unwrap_or(Path::new("/dev/shm"));
                    Ok(File::from(stasis_sys::proc::open(dir, flags | libc::O_TMPFILE, r.mode & 0o777)?))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_names() {
        assert_eq!(kind_from_name(b"/dev/zero (deleted)"), Some(ShmemKind::Anonymous));
        assert_eq!(kind_from_name(b"/memfd:a b (deleted)"), Some(ShmemKind::Memfd { name: b"a b".to_vec() }));
        assert_eq!(
            kind_from_name(b"/dev/shm/x (deleted)"),
            Some(ShmemKind::DeletedFile { path: b"/dev/shm/x".to_vec() })
        );
        assert_eq!(kind_from_name(b"/SYSV00000000 (deleted)"), None);
        assert_eq!(kind_from_name(b"/dev/shm/x"), None);
        assert_eq!(kind_from_name(b"anon_inode:[eventfd]"), None);
    }

    #[test]
    fn data_runs_skip_holes() {
        let f = File::from(stasis_sys::proc::memfd_create(b"runs", MFD_CLOEXEC).unwrap());
        f.set_len(16 * PAGE_SIZE + 100).unwrap();
        f.write_all_at(&[1; 10], PAGE_SIZE + 5).unwrap();
        f.write_all_at(&[1; 10], 16 * PAGE_SIZE).unwrap();
        assert_eq!(
            data_runs(&f, 16 * PAGE_SIZE + 100),
            vec![PageRun::new(PAGE_SIZE, 1), PageRun::new(16 * PAGE_SIZE, 1)]
        );
    }
}
