//! Memory mappings: which ones exist, which pages hold data, and how to build them again.
//!
//! Dump: /proc/PID/smaps gives the mappings; PAGEMAP_SCAN tells which pages exist.
//! Private mappings save their anonymous pages only (never-touched pages, zero-page
//! mappings and file pages that were never written come back by themselves); shared file
//! mappings save nothing (their data is the file); mappings of memory objects (shared
//! anonymous memory, memfd, deleted tmpfs files) refer to the object, whose data the shmem
//! module saves once for the whole tree. Page bytes are read with large process_vm_readv
//! calls, falling back to /proc/PID/mem for pages the program itself cannot read
//! (PROT_NONE).
//!
//! Restore (in the restorer, driving the stopped child by injected calls): move the
//! child's vDSO block aside, unmap everything else the child had, move the vDSO block to
//! its saved place, map every saved mapping writable where data must go (memory objects
//! through the descriptor the child inherited from the restorer), copy the pages from the
//! image, then set final protections, madvise flags and guard regions.

use crate::error::{Error, Result};
use crate::inject::Batch;
use crate::procfs::{self, MapEntry};
use crate::shmem::{self, ShmemDump};
use stasis_image::{vmflags, FileRef, ImageWriter, PageRun, ShmemKind, Vma, VmaBacking, PROT_EXEC, PROT_READ, PROT_WRITE};
use stasis_sys::mem::{process_vm_readv, process_vm_writev, RemoteRange};
use stasis_sys::pagemap::{self, ScanQuery};
use stasis_sys::{Pid, PAGE_SIZE};
use std::collections::hash_map::{Entry, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

/// Kernel-provided mappings that are moved, never saved.
pub const VDSO_NAMES: [&str; 3] = ["[vvar]", "[vvar_vclock]", "[vdso]"];

const VMFLAG_NAMES: [(&str, u64); 9] = [
    ("gd", vmflags::GROWSDOWN),
    ("dc", vmflags::DONTFORK),
    ("wf", vmflags::WIPEONFORK),
    ("dd", vmflags::DONTDUMP),
    ("hg", vmflags::HUGEPAGE),
    ("nh", vmflags::NOHUGEPAGE),
    ("mw", vmflags::MAYWRITE),
    ("lo", vmflags::LOCKED),
    ("mg", vmflags::MERGEABLE),
];

/// How a mapping from smaps is to be saved, decided from its name and flags alone.
#[derive(Debug, PartialEq, Eq)]
pub enum MapClass {
    /// Not part of the image ([vsyscall] is the same fixed page in every process).
    Skip,
    Special,
    Anonymous,
    /// A mapping of a memory object saved once for the tree (see the shmem module).
    Shmem(ShmemKind),
    File,
    Refuse(String),
}

pub fn classify(m: &MapEntry) -> MapClass {
    let n = m.name.as_str();
    if n == "[vsyscall]" {
        return MapClass::Skip;
    }
    if VDSO_NAMES.contains(&n) {
        return MapClass::Special;
    }
    if n.is_empty() || n == "[heap]" || n == "[stack]" || n.starts_with("[anon:") {
        return if m.shared { MapClass::Shmem(ShmemKind::Anonymous) } else { MapClass::Anonymous };
    }
    if n.starts_with('[') {
        return MapClass::Refuse(format!("kernel mapping {n}"));
    }
    if n == "/dev/zero (deleted)" && m.inode != 0 && !m.shared {
        return MapClass::Anonymous;
    }
    if n.starts_with("/SYSV") {
        return MapClass::Refuse("System V shared memory (shmat)".into());
    }
    if let Some(kind) = shmem::kind_from_name(n.as_bytes()) {
        return MapClass::Shmem(kind);
    }
    if n.ends_with(" (deleted)") {
        return MapClass::Refuse(format!("mapping of deleted file {n}"));
    }
    if !n.starts_with('/') {
        return MapClass::Refuse(format!("mapping of {n}"));
    }
    MapClass::File
}

pub fn vm_flags(m: &MapEntry) -> u64 {
    VMFLAG_NAMES.iter().filter(|(n, _)| m.has_flag(n)).fold(0, |acc, (_, f)| acc | f)
}

pub fn prot_of(m: &MapEntry) -> u32 {
    (if m.read { PROT_READ } else { 0 })
        | (if m.write { PROT_WRITE } else { 0 })
        | (if m.exec { PROT_EXEC } else { 0 })
}

/// Reads the target's mappings with their flags and sizes (smaps).
pub fn read_maps(pid: Pid) -> Result<Vec<MapEntry>> {
    read_mappings(pid, "smaps")
}

/// The mappings with their flags, the flags from `vmas` (read by [`crate::kfacts`]) if
/// they describe exactly the mappings /proc/PID/maps lists (the [vsyscall] page aside,
/// which is no mapping of the process), else from smaps.
pub fn read_maps_with(pid: Pid, vmas: Option<&[crate::kfacts::Vma]>) -> Result<Vec<MapEntry>> {
    let Some(vmas) = vmas else { return read_maps(pid) };
    let mut maps = read_layout(pid)?;
    let mut it = vmas.iter();
    let all = maps.iter_mut().filter(|m| m.name != "[vsyscall]").all(|m| match it.next() {
        Some(v) if v.matches_maps(m) => {
            m.vmflags = v.mnemonics();
            true
        }
        _ => false,
    });
    if all && it.next().is_none() {
        return Ok(maps);
    }
    log::debug!("pid {pid}: the BPF mappings differ from /proc/{pid}/maps; reading smaps");
    read_maps(pid)
}

/// Reads only where a process's mappings are and what they are called (maps: far cheaper
/// than smaps, which walks the page tables of every mapping).
pub fn read_layout(pid: Pid) -> Result<Vec<MapEntry>> {
    read_mappings(pid, "maps")
}

/// Only the mappings that injected calls need to know of: the executable ones (for the
/// code they run) and the one that holds `sp` (for room on the stack), asked with
/// PROCMAP_QUERY instead of reading the whole list. `None` where the kernel has no
/// PROCMAP_QUERY (before 6.11): read the layout then.
pub fn read_for_injection(pid: Pid, sp: u64) -> Result<Option<Vec<MapEntry>>> {
    use stasis_sys::proc::{procmap_query, QueriedVma, PROCMAP_QUERY_COVERING_OR_NEXT_VMA, PROCMAP_QUERY_VMA_EXECUTABLE};
    let path = format!("/proc/{pid}/maps");
    let maps = File::open(&path).map_err(|e| Error::Proc { pid, path: path.into(), err: e })?;
    let entry = |v: QueriedVma| MapEntry {
        start: v.start,
        end: v.end,
        read: v.read,
        write: v.write,
        exec: v.exec,
        shared: v.shared,
        offset: v.offset,
        dev_major: v.dev_major,
        dev_minor: v.dev_minor,
        inode: v.inode,
        name: String::from_utf8_lossy(&v.name).into_owned(),
        vmflags: String::new(),
    };
    let mut out = Vec::new();
    let mut addr = 0;
    loop {
        match procmap_query(&maps, addr, PROCMAP_QUERY_VMA_EXECUTABLE | PROCMAP_QUERY_COVERING_OR_NEXT_VMA) {
            Err(e) if e.0 == libc::ENOTTY || e.0 == libc::EINVAL => return Ok(None),
            Err(e) => return Err(Error::sys(pid, "PROCMAP_QUERY")(e)),
            Ok(None) => break,
            Ok(Some(v)) => {
                addr = v.end;
                out.push(entry(v));
            }
        }
    }
    if let Some(v) = procmap_query(&maps, sp, 0).map_err(Error::sys(pid, "PROCMAP_QUERY"))? {
        if !v.exec {
            out.push(entry(v));
        }
    }
    Ok(Some(out))
}

fn read_mappings(pid: Pid, file: &str) -> Result<Vec<MapEntry>> {
    let (path, text) = procfs::read_text(pid, file)?;
    procfs::parse_smaps(&text).map_err(|what| Error::ProcParse { pid, path, what })
}

pub fn file_ref(path: &[u8], md: &std::fs::Metadata) -> FileRef {
    FileRef {
        path: path.to_vec(),
        dev: md.dev(),
        ino: md.ino(),
        mode: md.mode(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
    }
}

/// Everything of one mapping needed to save it.
struct Planned {
    vma: Vma,
    /// Per page of `vma.pages`, the physical page it may share with other mappings (see
    /// [`share_keys`]); empty when none may.
    keys: Vec<u64>,
}

/// A process's mappings with the pages to save, before their bytes are copied.
pub struct MmPlan {
    pid: Pid,
    planned: Vec<Planned>,
}

/// The mapped files of a tree, each stat'ed once: by device, inode and path as the maps
/// give them (a tree maps the same libraries over and over).
pub type MappedFiles = std::sync::Mutex<HashMap<(u32, u32, u64, String), FileRef>>;

/// Decides every mapping of `pid`: its record and which pages hold data. Memory objects
/// are recorded in `objects`, once for the tree; mapped files are looked up in `files`.
pub fn plan(pid: Pid, maps: &[MapEntry], objects: &std::sync::Mutex<ShmemDump>, files: &MappedFiles) -> Result<MmPlan> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/pagemap").into(), err: e })?;
    let guards_supported = guard_scan_supported(&pagemap);
    let regions = scan_process(pid, &pagemap, maps, guards_supported)?;
    let mut planned = Vec::new();
    for m in maps {
        let class = classify(m);
        let backing = match &class {
            MapClass::Skip => continue,
            MapClass::Refuse(what) => {
                return Err(Error::UnsupportedMapping { pid, start: m.start, end: m.end, what: what.clone() })
            }
            MapClass::Special => VmaBacking::Special(m.name.clone()),
            MapClass::Anonymous => VmaBacking::Anonymous,
            MapClass::Shmem(kind) => {
                let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                let (start, end) = (m.start, m.end);
                let mut objects = objects.lock().unwrap_or_else(|p| p.into_inner());
                VmaBacking::Shmem(objects.intern(pid, &mf, kind.clone(), |what| Error::UnsupportedMapping { pid, start, end, what })?)
            }
            MapClass::File => {
                // A file is mapped as several neighbouring mappings (text, data, ...), and
                // by many processes of a tree: one stat of it is enough.
                let key = (m.dev_major, m.dev_minor, m.inode, m.name.clone());
                let known = files.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
                match known {
                    Some(f) => VmaBacking::File(f),
                    None => {
                        let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                        let md = std::fs::metadata(&mf).map_err(|e| Error::Proc { pid, path: mf.into(), err: e })?;
                        let f = file_ref(m.name.as_bytes(), &md);
                        files.lock().unwrap_or_else(|p| p.into_inner()).insert(key, f.clone());
                        VmaBacking::File(f)
                    }
                }
            }
        };
        let mut vma = Vma {
            start: m.start,
            end: m.end,
            prot: prot_of(m),
            shared: m.shared,
            flags: vm_flags(m),
            backing,
            file_offset: m.offset,
            pages: Vec::new(),
            data_offset: 0,
            guards: Vec::new(),
        };
        // Private mappings keep their own (copy-on-write) pages; shared ones only refer to
        // their file or object.
        let is_guard = |cat: u64| cat & pagemap::PAGE_IS_GUARD != 0;
        let mut keys = Vec::new();
        if matches!(class, MapClass::Anonymous | MapClass::File | MapClass::Shmem(_)) && !m.shared {
            vma.pages = runs_in(&regions, m.start, m.end, |cat| !is_guard(cat));
            keys = share_keys(pid, &pagemap, &vma.pages);
        }
        if guards_supported && !matches!(vma.backing, VmaBacking::Special(_)) {
            vma.guards = runs_in(&regions, m.start, m.end, is_guard);
        }
        planned.push(Planned { vma, keys });
    }
    log::debug!("pid {pid}: {} mappings scanned", planned.len());
    Ok(MmPlan { pid, planned })
}

/// Whether this kernel reports guard regions: asked once (the answer is the kernel's).
fn guard_scan_supported(pagemap: &File) -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let mut out = Vec::new();
        let q = ScanQuery { mask: pagemap::PAGE_IS_GUARD, return_mask: pagemap::PAGE_IS_GUARD, ..Default::default() };
        pagemap::scan(pagemap, 0, PAGE_SIZE, q, &mut out).is_ok()
    })
}

/// Highest user-space address: mappings above (the legacy vsyscall page) cannot be scanned.
const USER_END: u64 = 1 << 47;

/// One scan of the whole address space for what a plan needs: pages that hold the
/// program's own data (present or swapped, not a page of a file, not the shared zero
/// page) and guard markers, told apart by their categories. Which mapping each belongs
/// to, and whether it matters there, is for the caller.
fn scan_process(pid: Pid, pagemap: &File, maps: &[MapEntry], guards: bool) -> Result<Vec<pagemap::PageRegion>> {
    let user = || maps.iter().filter(|m| m.end <= USER_END);
    let (Some(start), Some(end)) = (user().map(|m| m.start).min(), user().map(|m| m.end).max()) else {
        return Ok(Vec::new());
    };
    let not = pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO;
    let anyof = pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED | if guards { pagemap::PAGE_IS_GUARD } else { 0 };
    let mut regions = Vec::new();
    let q = ScanQuery { mask: not, inverted: not, anyof, return_mask: anyof };
    pagemap::scan(pagemap, start, end, q, &mut regions).map_err(Error::sys(pid, "PAGEMAP_SCAN"))?;
    Ok(regions)
}

/// The runs of pages within `start..end` of the regions whose categories `want` takes.
/// `regions` are sorted and may span several mappings. Pure.
fn runs_in(regions: &[pagemap::PageRegion], start: u64, end: u64, want: impl Fn(u64) -> bool) -> Vec<PageRun> {
    let first = regions.partition_point(|r| r.end <= start);
    let mut runs: Vec<PageRun> = Vec::new();
    for r in regions[first..].iter().take_while(|r| r.start < end).filter(|r| want(r.categories)) {
        let (a, b) = (r.start.max(start), r.end.min(end));
        let npages = (b - a) / PAGE_SIZE;
        match runs.last_mut() {
            Some(last) if last.end() == a => last.npages += npages,
            _ => runs.push(PageRun::new(a, npages)),
        }
    }
    runs
}

/// Runs closer than this (in pages) are read from the pagemap in one go.
const PAGEMAP_GAP: u64 = 512;

/// The key of each page of `runs` for saving it once: its page frame number when it is
/// present and mapped more than once (by several processes after a fork, or merged by
/// KSM), else 0 (saved as its own). While the tree is frozen, two pages with one frame
/// number are one physical page and hold the same bytes: a writer outside the tree gets
/// its own copy on write. Empty when no page is shared, or the frame numbers cannot be
/// read (they read as zero without CAP_SYS_ADMIN): then everything is saved as before.
fn share_keys(pid: Pid, pagemap: &File, runs: &[PageRun]) -> Vec<u64> {
    let total: u64 = runs.iter().map(|r| r.npages).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut keys = Vec::with_capacity(total as usize);
    let mut buf = Vec::new();
    let mut i = 0;
    while i < runs.len() {
        // Neighbouring runs share one read of the span they cover.
        let mut j = i + 1;
        while j < runs.len() && runs[j].addr - runs[j - 1].end() <= PAGEMAP_GAP * PAGE_SIZE {
            j += 1;
        }
        let (start, end) = (runs[i].addr, runs[j - 1].end());
        buf.resize(((end - start) / PAGE_SIZE) as usize, 0);
        if let Err(e) = pagemap::read_entries(pagemap, start, &mut buf) {
            log::debug!("pid {pid}: pagemap at {start:#x}-{end:#x}: {e}; its pages are saved unshared");
            return Vec::new();
        }
        for r in &runs[i..j] {
            let at = ((r.addr - start) / PAGE_SIZE) as usize;
            keys.extend(buf[at..at + r.npages as usize].iter().map(|&e| {
                let shared = e & pagemap::PM_PRESENT != 0 && e & pagemap::PM_MMAP_EXCLUSIVE == 0;
                if shared { e & pagemap::PM_PFN_MASK } else { 0 }
            }));
        }
        i = j;
    }
    if keys.iter().all(|&k| k == 0) {
        return Vec::new();
    }
    keys
}

/// Reads the frame numbers of the plans' shared pages again, now that every process has
/// been planned, and saves as its own every page whose frame changed. The frames were
/// read process by process; a page the kernel moved meanwhile (compaction, swap) could
/// leave its old frame to another page of the tree. A page found in one frame at both
/// reads stayed there (it would have to come back to that very frame), so two pages that
/// did were one physical page at the moment between the plans and this check. The
/// processes are shared out among COPY_THREADS threads.
fn confirm_keys(plans: &mut [Option<MmPlan>]) {
    let per = plans.len().div_ceil(COPY_THREADS).max(1);
    std::thread::scope(|s| {
        for part in plans.chunks_mut(per) {
            s.spawn(|| part.iter_mut().flatten().for_each(confirm_plan));
        }
    });
}

/// confirm_keys for one process: the shared pages of all its mappings in one pass over
/// its page map (neighbouring mappings share reads).
fn confirm_plan(plan: &mut MmPlan) {
    let pid = plan.pid;
    let keyed: Vec<&mut Planned> = plan.planned.iter_mut().filter(|p| !p.keys.is_empty()).collect();
    if keyed.is_empty() {
        return;
    }
    let again = match File::open(format!("/proc/{pid}/pagemap")) {
        Ok(f) => {
            let runs: Vec<PageRun> = keyed.iter().flat_map(|p| p.vma.pages.iter().copied()).collect();
            share_keys(pid, &f, &runs)
        }
        Err(e) => {
            log::debug!("pid {pid}: pagemap: {e}; its pages are saved unshared");
            Vec::new()
        }
    };
    let mut again = again.into_iter();
    let all_zero = again.len() == 0;
    for p in keyed {
        if all_zero {
            p.keys.clear();
            continue;
        }
        for (k, a) in p.keys.iter_mut().zip(again.by_ref()) {
            if *k != a {
                *k = 0;
            }
        }
    }
}

/// Lays out a mapping's saved pages in the page data. A page whose key (non-zero) was
/// saved before refers to that copy (a run with its own `data` offset); any other page is
/// the mapping's own, placed at `*next`, which advances. `keys` holds one key per page of
/// `runs`, or is empty (every page its own). Returns the runs for the record: own runs
/// merged where addresses meet, references where addresses and copies both do. Pure.
fn lay_out(runs: &[PageRun], keys: &[u64], saved: &mut HashMap<u64, u64>, next: &mut u64) -> Vec<PageRun> {
    if keys.is_empty() {
        *next += runs.iter().map(|r| r.len()).sum::<u64>();
        return runs.to_vec();
    }
    let mut out: Vec<PageRun> = Vec::with_capacity(runs.len());
    let mut key = keys.iter().copied();
    for r in runs {
        for addr in (r.addr..r.end()).step_by(PAGE_SIZE as usize) {
            let data = match key.next().unwrap_or(0) {
                0 => None,
                k => match saved.entry(k) {
                    Entry::Occupied(at) => Some(*at.get()),
                    Entry::Vacant(slot) => {
                        slot.insert(*next);
                        None
                    }
                },
            };
            if data.is_none() {
                *next += PAGE_SIZE;
            }
            match out.last_mut() {
                Some(last) if last.end() == addr && last.data.map(|d| d + last.len()) == data => last.npages += 1,
                _ => out.push(PageRun { addr, npages: 1, data }),
            }
        }
    }
    out
}

/// Bytes each dump worker copies per step: one hash block. Each worker's buffer is one
/// chunk of fresh memory, faulted in page by page: 4 MiB cost a tree of 100 small
/// processes a thousand page faults, and copied 256 MiB no faster than this (measured).
const COPY_CHUNK: usize = 1 << 20;
/// process_vm_readv accepts at most IOV_MAX remote ranges.
const MAX_IOV: usize = 1024;
/// Dump workers: this machine class has two cores; more only adds contention.
const COPY_THREADS: usize = 2;

/// Where a stretch of page data comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Mapping `vma` of process `proc` (indexes into the plans); `addr` is an address.
    Mapping { proc: usize, vma: usize },
    /// Memory object `obj` (an index of the ShmemDump); `addr` is an offset in it.
    Object { obj: usize },
}

/// A stretch of page data: `len` bytes at `addr` of its source, landing at `data_off`.
/// `cow`: pages that other mappings share copy-on-write (see [`copy_batch`]).
#[derive(Clone, Copy)]
struct Segment {
    data_off: u64,
    addr: u64,
    len: u64,
    src: Source,
    cow: bool,
}

/// Copies the planned pages of every process, then the data of every memory object, into
/// the image in one parallel write, assigning each mapping and object its data offset.
/// Returns each process's mapping records.
pub fn save_all(plans: &mut [Option<MmPlan>], objects: &mut ShmemDump, w: &mut ImageWriter) -> Result<Vec<Vec<Vma>>> {
    confirm_keys(plans);
    let mut segs = Vec::new();
    let mut total = w.pages_len();
    // Physical pages saved so far (by frame number), with where their copy is.
    let mut saved: HashMap<u64, u64> = HashMap::new();
    for (pi, plan) in plans.iter_mut().enumerate() {
        let Some(plan) = plan else { continue };
        for (vi, p) in plan.planned.iter_mut().enumerate() {
            p.vma.data_offset = total;
            let keys = std::mem::take(&mut p.keys);
            let cow = keyed_pages(&p.vma.pages, &keys);
            p.vma.pages = lay_out(&p.vma.pages, &keys, &mut saved, &mut total);
            let mut at = p.vma.data_offset;
            for r in p.vma.pages.iter().filter(|r| r.data.is_none()) {
                for (addr, len, cow) in split_shared(r, &cow) {
                    segs.push(Segment { data_off: at, addr, len, src: Source::Mapping { proc: pi, vma: vi }, cow });
                    at += len;
                }
            }
        }
    }
    for (obj, off, len) in objects.layout(total) {
        segs.push(Segment { data_off: total, addr: off, len, src: Source::Object { obj }, cow: false });
        total += len;
    }
    if !segs.is_empty() {
        // Opened only for pages process_vm_readv cannot read.
        let mems: Vec<LazyMem> = plans.iter().map(|_| LazyMem::new()).collect();
        let plans_ref: &[Option<MmPlan>] = plans;
        let objects_ref: &ShmemDump = objects;
        w.write_pages_parallel(total, COPY_THREADS, COPY_CHUNK, |off, buf: &mut [u8]| -> Result<()> {
            fault_stop_point();
            fill_chunk(plans_ref, objects_ref, &mems, &segs, off, buf)
        })?;
    }
    Ok(plans
        .iter_mut()
        .map(|p| p.take().map(|p| p.planned.into_iter().map(|x| x.vma).collect()).unwrap_or_default())
        .collect())
}

/// Fault injection for tests of rule 1: with `STASIS_FAULT_STOP_AT_PAGE_CHUNK=N` in the
/// environment, the process stops itself (SIGSTOP) as the N-th chunk of page data (counting
/// from 1, over all copy threads) is about to be read, so that a test can kill it in the
/// middle of writing the image without racing it. With N above COPY_THREADS, some copy
/// thread has written a chunk of its own by then.
fn fault_stop_point() {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::fault_hit("STASIS_FAULT_STOP_AT_PAGE_CHUNK", &AT, &COUNT) {
        let _ = stasis_sys::proc::kill(stasis_sys::proc::getpid(), libc::SIGSTOP);
    }
}

/// A process's /proc/PID/mem, opened on first use (`mem`, shared by the copy threads).
type LazyMem = std::sync::OnceLock<std::result::Result<File, i32>>;

/// The page data at `[off, off + buf.len())`, read from the processes and objects it
/// belongs to.
fn fill_chunk(
    plans: &[Option<MmPlan>],
    objects: &ShmemDump,
    mems: &[LazyMem],
    segs: &[Segment],
    off: u64,
    buf: &mut [u8],
) -> Result<()> {
    // Segments overlapping the window, cut to it.
    let end = off + buf.len() as u64;
    let first = segs.partition_point(|s| s.data_off + s.len <= off);
    let mut pieces: Vec<Segment> = Vec::new();
    for s in &segs[first..] {
        if s.data_off >= end {
            break;
        }
        let from = s.data_off.max(off);
        let to = (s.data_off + s.len).min(end);
        pieces.push(Segment { data_off: from, addr: s.addr + (from - s.data_off), len: to - from, ..*s });
    }
    let readable = |p: &Segment| match p.src {
        Source::Mapping { proc, vma } => {
            !p.cow && plans[proc].as_ref().is_some_and(|pl| pl.planned[vma].vma.prot & PROT_READ != 0)
        }
        Source::Object { .. } => false,
    };
    // Consecutive pieces of one process go in one call, those process_vm_readv may read
    // apart from the others (which /proc/PID/mem reads).
    let mut i = 0;
    while i < pieces.len() {
        let at = (pieces[i].data_off - off) as usize;
        let pi = match pieces[i].src {
            Source::Object { obj } => {
                let p = pieces[i];
                objects.read(obj, p.addr, &mut buf[at..at + p.len as usize])?;
                i += 1;
                continue;
            }
            Source::Mapping { proc, .. } => proc,
        };
        let readable_i = readable(&pieces[i]);
        let same = |p: &Segment| matches!(p.src, Source::Mapping { proc, .. } if proc == pi) && readable(p) == readable_i;
        let mut j = i + 1;
        while j < pieces.len() && same(&pieces[j]) && j - i < MAX_IOV {
            j += 1;
        }
        let len: u64 = pieces[i..j].iter().map(|p| p.len).sum();
        let ranges: Vec<RemoteRange> = pieces[i..j]
            .iter()
            .map(|p| RemoteRange { addr: stasis_sys::RemoteAddr(p.addr), len: p.len as usize })
            .collect();
        let Some(plan) = &plans[pi] else { unreachable!("segments only of planned processes") };
        copy_batch(plan.pid, readable_i, &mems[pi], &ranges, &mut buf[at..at + len as usize])?;
        i = j;
    }
    Ok(())
}

/// The addresses of the pages of `runs` with a key (shared copy-on-write), sorted. Pure.
fn keyed_pages(runs: &[PageRun], keys: &[u64]) -> Vec<u64> {
    if keys.is_empty() {
        return Vec::new();
    }
    let pages = runs.iter().flat_map(|r| (r.addr..r.end()).step_by(PAGE_SIZE as usize));
    pages.zip(keys).filter(|(_, &k)| k != 0).map(|(a, _)| a).collect()
}

/// Run `r` cut where its pages go from being in `cow` (sorted) to not, or back: (address,
/// length, in `cow`). Pure.
fn split_shared(r: &PageRun, cow: &[u64]) -> Vec<(u64, u64, bool)> {
    if cow.is_empty() {
        return vec![(r.addr, r.len(), false)];
    }
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for addr in (r.addr..r.end()).step_by(PAGE_SIZE as usize) {
        let shared = cow.binary_search(&addr).is_ok();
        match out.last_mut() {
            Some(last) if last.2 == shared => last.1 += PAGE_SIZE,
            _ => out.push((addr, PAGE_SIZE, shared)),
        }
    }
    out
}

/// Fills `out` with the bytes of `ranges` of a process, in order. `readable`: the pages
/// may be read with process_vm_readv; it pins the pages it reads, and the kernel gives a
/// pinned page shared copy-on-write its own copy in the process first (the tree would use
/// more memory after a dump that lets it run on, and every shared page would be copied
/// once more). The others come from /proc/PID/mem, which reads with the kernel's force
/// access and leaves the pages as they are.
fn copy_batch(pid: Pid, readable: bool, mem: &LazyMem, ranges: &[RemoteRange], out: &mut [u8]) -> Result<()> {
    let mut done = 0usize;
    if readable {
        done = process_vm_readv(pid, out, ranges).unwrap_or(0);
    }
    // Whatever process_vm_readv could not read (unreadable pages) comes from /proc/PID/mem,
    // which reads with the kernel's force access.
    let mut pos = 0usize;
    for r in ranges {
        let (rs, re) = (pos, pos + r.len);
        pos = re;
        if re <= done {
            continue;
        }
        let path = || format!("/proc/{pid}/mem");
        let mem = match mem.get_or_init(|| File::open(path()).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))) {
            Ok(f) => f,
            Err(errno) => return Err(Error::Proc { pid, path: path().into(), err: std::io::Error::from_raw_os_error(*errno) }),
        };
        let from = rs.max(done);
        let addr = r.addr.0 + (from - rs) as u64;
        mem.read_exact_at(&mut out[from..re], addr)
            .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem at {addr:#x}").into(), err: e })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Restore half.

/// Fixed layout of the helper region the restore child maps for the restorer: a `syscall`
/// instruction at its start, then a data area for the arguments of injected calls.
pub const HELPER_LEN: u64 = 64 * 1024;
pub const HELPER_DATA: u64 = 4096;

/// Lowest address considered for the helper region and the vDSO parking area.
const LOW_ADDR: u64 = 0x10_0000;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Finds `len` bytes free in every one of `layouts` (each a sorted or unsorted list of
/// busy [start, end) ranges), with a page of space on both sides; lowest address first.
pub fn find_free(layouts: &[&[(u64, u64)]], len: u64) -> Option<u64> {
    let mut busy: Vec<(u64, u64)> = layouts.iter().flat_map(|l| l.iter().copied()).collect();
    busy.sort();
    let mut cand = LOW_ADDR;
    for (s, e) in busy {
        if cand + len + PAGE_SIZE <= s {
            return Some(cand);
        }
        cand = cand.max(e + PAGE_SIZE);
    }
    (cand + len <= TASK_SIZE).then_some(cand)
}

/// The saved layout as busy ranges, including the room a growing stack needs below it.
pub fn busy_ranges(vmas: &[Vma]) -> Vec<(u64, u64)> {
    vmas.iter()
        .map(|v| {
            let low = if v.flags & vmflags::GROWSDOWN != 0 { v.start.saturating_sub(8 << 20) } else { v.start };
            (low, v.end)
        })
        .collect()
}

/// Checks every mapping's saved pages before anything is created: runs whole pages inside
/// the mapping and in address order, the mapping's own data and every copy a run refers to
/// inside the page data (`pages_len` bytes), page-aligned.
pub fn validate(img: &stasis_image::Image, pages_len: u64) -> Result<()> {
    for p in &img.processes {
        for v in &p.mm.vmas {
            let bad = |what: String| Error::Incompatible(format!("pid {}: mapping {:#x}-{:#x}: {what}", p.pid, v.start, v.end));
            let mut prev = v.start;
            for r in &v.pages {
                let end = r.npages.checked_mul(PAGE_SIZE).and_then(|l| r.addr.checked_add(l));
                if r.addr % PAGE_SIZE != 0 || r.addr < prev || end.is_none_or(|e| e > v.end) {
                    return Err(bad(format!("saved page run at {:#x} lies outside the mapping or out of order", r.addr)));
                }
                prev = r.end();
                if let Some(at) = r.data {
                    if at % PAGE_SIZE != 0 {
                        return Err(bad(format!("the run at {:#x} refers to page data at {at:#x}, not on a page boundary", r.addr)));
                    }
                    if at.checked_add(r.len()).is_none_or(|e| e > pages_len) {
                        return Err(bad(format!("the run at {:#x} refers to page data at {at:#x}, outside the image", r.addr)));
                    }
                }
            }
            if v.data_offset.checked_add(v.data_len()).is_none_or(|e| e > pages_len) {
                return Err(bad("its page data lies outside the image".into()));
            }
            if v.guards.iter().any(|g| g.data.is_some()) {
                return Err(bad("a guard run carries a data offset".into()));
            }
        }
    }
    Ok(())
}

/// Descriptor numbers in the restore child for the files and memory objects its mappings
/// need.
pub struct MapFds {
    /// (backing file, fd number in the child, opened for writing)
    pub files: Vec<(FileRef, i32, bool)>,
    /// (memory object id, read-write, fd number in the child). A shared mapping that may
    /// become writable (VM_MAYWRITE) needs a read-write descriptor; any other gets a
    /// read-only one, so that it stays without VM_MAYWRITE, as a write seal requires.
    pub objects: Vec<(u64, bool, i32)>,
}

/// Whether a mapping must be made from a descriptor open for writing.
fn needs_rw(v: &Vma) -> bool {
    v.shared && v.flags & vmflags::MAYWRITE != 0
}

impl MapFds {
    /// One descriptor per distinct file, then per distinct (object, access), numbered from
    /// `base`.
    pub fn plan(vmas: &[Vma], base: i32) -> MapFds {
        let mut files: Vec<(FileRef, i32, bool)> = Vec::new();
        for v in vmas {
            if let VmaBacking::File(f) = &v.backing {
                let rw = needs_rw(v);
                match files.iter_mut().find(|(g, _, _)| g.path == f.path) {
                    Some(e) => e.2 |= rw,
                    None => files.push((f.clone(), base + files.len() as i32, rw)),
                }
            }
        }
        let mut objects: Vec<(u64, bool, i32)> = Vec::new();
        for v in vmas {
            if let VmaBacking::Shmem(id) = v.backing {
                let rw = needs_rw(v);
                if !objects.iter().any(|&(i, w, _)| (i, w) == (id, rw)) {
                    objects.push((id, rw, base + (files.len() + objects.len()) as i32));
                }
            }
        }
        MapFds { files, objects }
    }

    /// How many descriptor numbers from `base` the plan uses.
    pub fn len(&self) -> usize {
        self.files.len() + self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn fd_of(&self, f: &FileRef) -> i32 {
        self.files.iter().find(|(g, _, _)| g.path == f.path).map(|e| e.1).unwrap_or(-1)
    }

    fn fd_of_object(&self, v: &Vma, id: u64) -> i32 {
        let rw = needs_rw(v);
        self.objects.iter().find(|&&(i, w, _)| (i, w) == (id, rw)).map(|e| e.2).unwrap_or(-1)
    }
}

/// Checks, before anything is created, that the files behind the mappings still fit.
/// `seen` keeps what was looked up already: the processes of a tree map the same files.
pub fn check_files(pid: Pid, vmas: &[Vma], seen: &mut std::collections::HashMap<Vec<u8>, std::fs::Metadata>) -> Result<()> {
    for v in vmas {
        let VmaBacking::File(f) = &v.backing else { continue };
        let path = f.display();
        let md = match seen.get(&f.path) {
            Some(md) => md.clone(),
            None => {
                let md = std::fs::metadata(&path).map_err(|e| Error::FileChanged {
                    pid,
                    path: path.clone(),
                    what: format!("is gone ({e}); it is mapped at {:#x}-{:#x}", v.start, v.end),
                })?;
                seen.insert(f.path.clone(), md.clone());
                md
            }
        };
        let needed = f.size.min(v.file_offset + v.len());
        if md.size() < needed {
            return Err(Error::FileChanged {
                pid,
                path,
                what: format!("shrank from {} to {} bytes; its mapping at {:#x}-{:#x} needs {needed}", f.size, md.size(), v.start, v.end),
            });
        }
        // Private mappings mix saved pages with the file's own: a file whose content may
        // differ would produce a subtly different program.
        let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        if !v.shared && (md.size() != f.size || mtime != f.mtime_ns) {
            return Err(Error::FileChanged {
                pid,
                path,
                what: format!("changed since the dump (size {} -> {}, mtime differs: {}); it is mapped privately at {:#x}-{:#x}", f.size, md.size(), mtime != f.mtime_ns, v.start, v.end),
            });
        }
    }
    Ok(())
}

/// Writes bytes into the child's memory (the helper data area).
pub struct ChildMem {
    pub pid: Pid,
    pub file: File,
}

impl ChildMem {
    pub fn open(pid: Pid) -> Result<ChildMem> {
        let path = format!("/proc/{pid}/mem");
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Proc { pid, path: path.into(), err: e })?;
        Ok(ChildMem { pid, file })
    }

    /// Writes `data` at `addr`, memory the child may write itself (its helper page): with
    /// process_vm_writev, which copies once; what it cannot write goes through
    /// [`ChildMem::write_forced`].
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let remote = [RemoteRange { addr: stasis_sys::RemoteAddr(addr), len: data.len() }];
        let done = process_vm_writev(self.pid, data, &remote).unwrap_or(0).min(data.len());
        if done == data.len() {
            return Ok(());
        }
        self.write_forced(addr + done as u64, &data[done..])
    }

    /// Writes through /proc/PID/mem, which may write read-only private memory, as a
    /// debugger does (the kernel copies through a page of its own).
    pub fn write_forced(&self, addr: u64, data: &[u8]) -> Result<()> {
        let pid = self.pid;
        self.file
            .write_all_at(data, addr)
            .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem at {addr:#x}").into(), err: e })
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let pid = self.pid;
        self.file
            .read_exact_at(buf, addr)
            .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem at {addr:#x}").into(), err: e })
    }
}

/// The restorer's view of the restore child's memory work: the calls that rebuild the
/// address space go into `calls` (run as one batch, see inject::Batch), the page data
/// follows with [`MmRestore::fill`].
pub struct MmRestore<'a> {
    pub pid: Pid,
    pub calls: &'a mut Batch,
    pub mem: &'a ChildMem,
    pub helper: u64,
    /// All page data of the image, mapped.
    pub pages: &'a [u8],
}

impl MmRestore<'_> {
    /// The calls that replace the child's own address space with the saved one, data
    /// aside (all but the registers and mm fields). `child_maps` is the layout the child
    /// was forked with: its vDSO block must be where it says; mappings the child made
    /// since may be missing (everything but the vDSO block and the helper page is
    /// unmapped, and the vDSO block may be parked over such a mapping).
    pub fn rebuild(&mut self, child_maps: &[MapEntry], vmas: &[Vma], fds: &MapFds) -> Result<()> {
        let pid = self.pid;
        // 1. Park the child's vDSO block where neither layout has anything.
        let child_vdso: Vec<&MapEntry> = child_maps.iter().filter(|m| VDSO_NAMES.contains(&m.name.as_str())).collect();
        let saved_vdso: Vec<&Vma> = vmas.iter().filter(|v| matches!(v.backing, VmaBacking::Special(_))).collect();
        let child_busy: Vec<(u64, u64)> = child_maps.iter().map(|m| (m.start, m.end)).collect();
        let saved_busy = busy_ranges(vmas);
        let helper_busy = [(self.helper, self.helper + HELPER_LEN)];
        let (lo, hi) = child_vdso.iter().fold((u64::MAX, 0), |(l, h), m| (l.min(m.start), h.max(m.end)));
        let mut parked: Vec<(String, u64, u64)> = Vec::new();
        // Where the saved block does not overlap the child's, the child's block stays put
        // through the unmapping and then moves straight to its place: three calls less.
        let direct = saved_vdso.iter().all(|v| v.end <= lo || v.start >= hi);
        if direct {
            parked = child_vdso.iter().map(|m| (m.name.clone(), m.start, m.end - m.start)).collect();
        } else if !child_vdso.is_empty() {
            let park = find_free(&[&child_busy, &saved_busy, &helper_busy], hi - lo).ok_or_else(|| {
                Error::Restore { pid, what: "no free address range to move the vDSO through".into() }
            })?;
            for m in &child_vdso {
                let to = park + (m.start - lo);
                self.mremap(m.start, m.end - m.start, to);
                parked.push((m.name.clone(), to, m.end - m.start));
            }
        }
        let keep: Vec<(u64, u64)> = {
            let mut k: Vec<(u64, u64)> = parked.iter().map(|(_, a, l)| (*a, *a + *l)).collect();
            k.push((self.helper, self.helper + HELPER_LEN));
            k.sort();
            k
        };
        // 2. Unmap everything else.
        let mut pos = 0u64;
        for (s, e) in keep.iter().copied().chain(std::iter::once((TASK_SIZE, TASK_SIZE))) {
            if s > pos {
                self.calls.push("munmap", libc::SYS_munmap, [pos, s - pos, 0, 0, 0, 0]);
            }
            pos = e;
        }
        // 3. The vDSO block to its saved place (or away, if the image has none).
        for (name, at, len) in &parked {
            match saved_vdso.iter().find(|v| matches!(&v.backing, VmaBacking::Special(n) if n == name)) {
                Some(v) => self.mremap(*at, *len, v.start),
                None => self.calls.push("munmap", libc::SYS_munmap, [*at, *len, 0, 0, 0, 0]),
            }
        }
        // 4. Every saved mapping with its final protection (the data comes with fill()).
        let restored: Vec<&Vma> = vmas.iter().filter(|v| !matches!(v.backing, VmaBacking::Special(_))).collect();
        for v in &restored {
            let prot = v.prot;
            let mut flags = libc::MAP_FIXED | if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
            let (fd, off) = match &v.backing {
                VmaBacking::File(f) => (fds.fd_of(f), v.file_offset),
                VmaBacking::Shmem(id) => (fds.fd_of_object(v, *id), v.file_offset),
                VmaBacking::Anonymous | VmaBacking::Special(_) => {
                    flags |= libc::MAP_ANONYMOUS;
                    (-1, 0)
                }
            };
            if v.flags & vmflags::GROWSDOWN != 0 {
                flags |= libc::MAP_GROWSDOWN;
            }
            self.calls.push("mmap", libc::SYS_mmap, [v.start, v.len(), prot as u64, flags as u64, fd as i64 as u64, off]);
        }
        // Advice, locks and guards before the data: none needs it.
        for v in &restored {
            self.advise(v);
        }
        Ok(())
    }

    fn mremap(&mut self, from: u64, len: u64, to: u64) {
        if from == to {
            return;
        }
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        self.calls.push("mremap", libc::SYS_mremap, [from, len, len, flags, to, 0]);
    }

    fn advise(&mut self, v: &Vma) {
        const ADVICE: [(u64, i32); 5] = [
            (vmflags::DONTFORK, libc::MADV_DONTFORK),
            (vmflags::WIPEONFORK, libc::MADV_WIPEONFORK),
            (vmflags::DONTDUMP, libc::MADV_DONTDUMP),
            (vmflags::HUGEPAGE, libc::MADV_HUGEPAGE),
            (vmflags::NOHUGEPAGE, libc::MADV_NOHUGEPAGE),
        ];
        for (flag, advice) in ADVICE {
            if v.flags & flag != 0 {
                self.calls.push("madvise", libc::SYS_madvise, [v.start, v.len(), advice as u64, 0, 0, 0]);
            }
        }
        if v.flags & vmflags::LOCKED != 0 {
            self.calls.push("mlock", libc::SYS_mlock, [v.start, v.len(), 0, 0, 0, 0]);
        }
        const MADV_GUARD_INSTALL: u64 = 102;
        for g in &v.guards {
            self.calls.push("madvise(MADV_GUARD_INSTALL)", libc::SYS_madvise, [g.addr, g.len(), MADV_GUARD_INSTALL, 0, 0, 0]);
        }
    }
}

/// The saved pages, once the calls of [`MmRestore::rebuild`] have run: through
/// process_vm_writev into writable mappings, through /proc/PID/mem (which may write
/// read-only private memory, as a debugger does) into the others. Returns the bytes loaded.
pub fn fill(pid: Pid, mem: &ChildMem, pages: &[u8], vmas: &[Vma]) -> Result<u64> {
    let restored = vmas.iter().filter(|v| !matches!(v.backing, VmaBacking::Special(_)));
    let (writable, read_only): (Vec<&Vma>, Vec<&Vma>) = restored.partition(|v| v.prot & PROT_WRITE != 0);
    let mut loaded = fill_parallel(pid, pages, &writable)?;
    for v in read_only.iter().filter(|v| !v.pages.is_empty()) {
        for (r, off) in v.runs_with_data() {
            let data = off
                .checked_add(r.len())
                .and_then(|end| pages.get(off as usize..end as usize))
                .ok_or_else(|| Error::Restore { pid, what: "page data of a mapping lies outside the image".into() })?;
            mem.write_forced(r.addr, data)?;
        }
        loaded += v.saved_len();
    }
    Ok(loaded)
}

/// Workers that copy page data into the restored process.
const FILL_THREADS: usize = 2;
/// Up to this many bytes the calling thread copies alone: starting threads costs more.
const SMALL_FILL: u64 = 4 << 20;

/// Copies every mapping's saved pages from the mapped image into the child with
/// process_vm_writev, split by bytes over [`FILL_THREADS`] threads. The child is stopped
/// and its mappings are writable; page faults on its side run in parallel.
fn fill_parallel(pid: Pid, pages: &[u8], vmas: &[&Vma]) -> Result<u64> {
    let mut segs: Vec<(u64, u64, u64)> = Vec::new(); // (addr, data offset, len)
    for v in vmas {
        segs.extend(v.runs_with_data().map(|(r, off)| (r.addr, off, r.len())));
    }
    let total: u64 = segs.iter().map(|s| s.2).sum();
    if segs.iter().any(|&(_, off, len)| off.checked_add(len).is_none_or(|e| e > pages.len() as u64)) {
        return Err(Error::Restore { pid, what: "page data of a mapping lies outside the image".into() });
    }
    if total <= SMALL_FILL {
        write_segments(pid, pages, &segs)?;
        return Ok(total);
    }
    let share = total.div_ceil(FILL_THREADS as u64);
    // Cut the segment list into byte-balanced shares.
    let mut shares: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new()];
    let mut acc = 0u64;
    for &(addr, off, len) in &segs {
        let (mut a, mut o, mut l) = (addr, off, len);
        while l > 0 {
            let room = share - acc;
            let take = l.min(room.max(PAGE_SIZE));
            if let Some(v) = shares.last_mut() {
                v.push((a, o, take));
            }
            acc += take;
            a += take;
            o += take;
            l -= take;
            if acc >= share {
                shares.push(Vec::new());
                acc = 0;
            }
        }
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = shares
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| s.spawn(move || write_segments(pid, pages, v)))
            .collect();
        workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(total)
}

/// process_vm_writev of segments whose image bytes are consecutive, in batches.
fn write_segments(pid: Pid, pages: &[u8], segs: &[(u64, u64, u64)]) -> Result<()> {
    let mut i = 0;
    while i < segs.len() {
        let mut j = i + 1;
        while j < segs.len() && j - i < MAX_IOV && segs[j].1 == segs[j - 1].1 + segs[j - 1].2 {
            j += 1;
        }
        let start = segs[i].1 as usize;
        let len: u64 = segs[i..j].iter().map(|s| s.2).sum();
        let remote: Vec<RemoteRange> =
            segs[i..j].iter().map(|s| RemoteRange { addr: stasis_sys::RemoteAddr(s.0), len: s.2 as usize }).collect();
        let n = stasis_sys::mem::process_vm_writev(pid, &pages[start..start + len as usize], &remote)
            .map_err(Error::sys(pid, "process_vm_writev"))?;
        if n as u64 != len {
            return Err(Error::Restore { pid, what: format!("wrote {n} of {len} bytes of pages at {:#x}", segs[i].0) });
        }
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_at_mapping_edges_and_sorted_by_kind() {
        let r = |start: u64, end: u64, categories: u64| pagemap::PageRegion { start, end, categories };
        let (data, guard) = (pagemap::PAGE_IS_PRESENT, pagemap::PAGE_IS_GUARD | pagemap::PAGE_IS_SWAPPED);
        // One data region over two mappings (0x1000-0x4000, 0x4000-0x8000), a guard
        // page, then data again.
        let regions = [r(0x2000, 0x6000, data), r(0x6000, 0x7000, guard), r(0x7000, 0x8000, data), r(0x9000, 0xa000, data)];
        let is_guard = |c: u64| c & pagemap::PAGE_IS_GUARD != 0;
        let pages = |s, e| runs_in(&regions, s, e, |c| !is_guard(c));
        assert_eq!(pages(0x1000, 0x4000), vec![PageRun::new(0x2000, 2)]);
        assert_eq!(pages(0x4000, 0x8000), vec![PageRun::new(0x4000, 2), PageRun::new(0x7000, 1)]);
        assert_eq!(runs_in(&regions, 0x4000, 0x8000, is_guard), vec![PageRun::new(0x6000, 1)]);
        assert!(pages(0x8000, 0x9000).is_empty());
        assert!(runs_in(&[], 0x1000, 0x2000, |_| true).is_empty());
    }

    #[test]
    fn shared_own_pages_are_read_apart() {
        const P: u64 = PAGE_SIZE;
        let runs = [PageRun::new(0x10000, 4), PageRun::new(0x20000, 2)];
        let cow = keyed_pages(&runs, &[0, 7, 8, 0, 9, 0]);
        assert_eq!(cow, vec![0x11000, 0x12000, 0x20000]);
        assert!(keyed_pages(&runs, &[]).is_empty());
        assert_eq!(
            split_shared(&runs[0], &cow),
            vec![(0x10000, P, false), (0x11000, 2 * P, true), (0x13000, P, false)]
        );
        assert_eq!(split_shared(&runs[1], &cow), vec![(0x20000, P, true), (0x21000, P, false)]);
        assert_eq!(split_shared(&runs[1], &[]), vec![(0x20000, 2 * P, false)]);
    }

    #[test]
    fn shared_pages_are_laid_out_once() {
        const P: u64 = PAGE_SIZE;
        let mut saved = HashMap::new();
        let mut next = 10 * P;
        // The parent: 4 pages at 0x10000, of which the middle two are shared (frames 7, 8),
        // then 1 exclusive page at 0x20000.
        let parent = [PageRun::new(0x10000, 4), PageRun::new(0x20000, 1)];
        let out = lay_out(&parent, &[0, 7, 8, 0, 0], &mut saved, &mut next);
        assert_eq!(out, parent.to_vec(), "first copies are the mapping's own");
        assert_eq!(next, 15 * P);
        assert_eq!(saved, HashMap::from([(7, 11 * P), (8, 12 * P)]));
        // A child: the same addresses; frame 7 and 8 still shared, its first page now its
        // own (written after the fork), frame 9 shared with nobody saved yet.
        let child = [PageRun::new(0x10000, 4), PageRun::new(0x20000, 1)];
        let out = lay_out(&child, &[0, 7, 8, 9, 0], &mut saved, &mut next);
        assert_eq!(
            out,
            vec![
                PageRun::new(0x10000, 1),
                PageRun { addr: 0x11000, npages: 2, data: Some(11 * P) },
                PageRun::new(0x13000, 1),
                PageRun::new(0x20000, 1),
            ]
        );
        assert_eq!(next, 18 * P, "3 own pages");
        assert_eq!(saved[&9], 16 * P);
        // Another child whose shared pages are in reverse order: no merge of references
        // whose copies are not consecutive; a page of its own between references.
        let out = lay_out(&[PageRun::new(0x30000, 4)], &[8, 7, 0, 9], &mut saved, &mut next);
        assert_eq!(
            out,
            vec![
                PageRun { addr: 0x30000, npages: 1, data: Some(12 * P) },
                PageRun { addr: 0x31000, npages: 1, data: Some(11 * P) },
                PageRun::new(0x32000, 1),
                PageRun { addr: 0x33000, npages: 1, data: Some(16 * P) },
            ]
        );
        assert_eq!(next, 19 * P);
        // Without keys, runs stay as they are.
        let out = lay_out(&parent, &[], &mut saved, &mut next);
        assert_eq!(out, parent.to_vec());
        assert_eq!(next, 24 * P);
    }

    #[test]
    fn runs_with_data_follow_the_own_data_or_their_reference() {
        let v = Vma {
            start: 0x10000,
            end: 0x20000,
            prot: 3,
            shared: false,
            flags: 0,
            backing: VmaBacking::Anonymous,
            file_offset: 0,
            pages: vec![
                PageRun::new(0x10000, 2),
                PageRun { addr: 0x12000, npages: 3, data: Some(0) },
                PageRun::new(0x15000, 1),
            ],
            data_offset: 0x8000,
            guards: vec![],
        };
        let got: Vec<(u64, u64)> = v.runs_with_data().map(|(r, at)| (r.addr, at)).collect();
        assert_eq!(got, vec![(0x10000, 0x8000), (0x12000, 0), (0x15000, 0xa000)]);
        assert_eq!(v.data_len(), 3 * PAGE_SIZE);
        assert_eq!(v.saved_len(), 6 * PAGE_SIZE);
    }

    fn entry(name: &str, shared: bool, inode: u64) -> MapEntry {
        MapEntry { start: 0x1000, end: 0x2000, shared, inode, name: name.into(), read: true, ..Default::default() }
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&entry("[vsyscall]", false, 0)), MapClass::Skip);
        assert_eq!(classify(&entry("[vdso]", false, 0)), MapClass::Special);
        assert_eq!(classify(&entry("", false, 0)), MapClass::Anonymous);
        assert_eq!(classify(&entry("[heap]", false, 0)), MapClass::Anonymous);
        assert_eq!(classify(&entry("/usr/lib/libc.so.6", false, 9)), MapClass::File);
        // Saved as an object if it is on tmpfs; refused when its file system is seen.
        assert_eq!(classify(&entry("/tmp/x (deleted)", false, 9)), MapClass::Shmem(ShmemKind::DeletedFile { path: b"/tmp/x".to_vec() }));
        assert!(matches!(classify(&entry("x (deleted)", false, 9)), MapClass::Refuse(_)));
        assert_eq!(classify(&entry("/memfd:x (deleted)", true, 9)), MapClass::Shmem(ShmemKind::Memfd { name: b"x".to_vec() }));
        assert_eq!(classify(&entry("/dev/zero (deleted)", true, 5)), MapClass::Shmem(ShmemKind::Anonymous));
        assert!(matches!(classify(&entry("/SYSV00000000 (deleted)", true, 9)), MapClass::Refuse(_)));
        assert!(matches!(classify(&entry("[uprobes]", false, 0)), MapClass::Refuse(_)));
    }

    #[test]
    fn free_range_avoids_all_layouts() {
        let a = [(0x10_0000, 0x20_0000)];
        let b = [(0x20_1000, 0x30_0000)];
        let got = find_free(&[&a, &b], 0x1_0000).unwrap();
        assert!(got >= 0x30_1000);
        assert_eq!(find_free(&[&[]], 0x1000), Some(LOW_ADDR));
    }

    #[test]
    fn stack_room_is_busy() {
        let v = Vma {
            start: 0x4000_0000,
            end: 0x4001_0000,
            prot: 3,
            shared: false,
            flags: vmflags::GROWSDOWN,
            backing: VmaBacking::Anonymous,
            file_offset: 0,
            pages: vec![],
            data_offset: 0,
            guards: vec![],
        };
        assert_eq!(busy_ranges(&[v])[0].0, 0x4000_0000 - (8 << 20));
    }

}
