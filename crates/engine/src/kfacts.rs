//! What the kernel keeps about the frozen tree's tasks and mappings, read in two passes of
//! BPF iterators over the whole system instead of process by process: per thread its
//! clear_child_tid address and alternate stack, per process its program break, XSAVE
//! permissions and signal dispositions (all of which otherwise take injected calls, see
//! [`crate::parasite`]), and per mapping its VM flags (otherwise /proc/PID/smaps, which
//! walks every page table).
//!
//! The programs pick the tasks whose ptrace parent is this process (the frozen tree) and
//! this process itself. Field offsets come from the running kernel's BTF. Before any of it
//! is used, the values read for this process are compared with what system calls say of
//! it (clear_child_tid, alternate stack, break, XSAVE permissions, dispositions); on any
//! difference, or where BPF is not allowed, the dump takes the ways it took before.
//! `STASIS_NO_BPF=1` asks for those ways outright.

use stasis_image::{AltStack, SigAction};
use stasis_sys::bpf::{self, Asm, Insn, R0, R1, R10, R2, R3, R6, R7, R8};
use stasis_sys::btf::{Btf, BtfError};
use std::collections::HashMap;

const NSIG: usize = 64;
/// Resource limits (RLIM_NLIMITS), each a `struct rlimit` of two longs.
const NLIMITS: usize = 16;
/// Bytes of one `struct k_sigaction` on x86-64: handler, flags, restorer, mask.
const ACTION_LEN: usize = 32;
/// Disposition flags rt_sigaction reports (kernel/signal.c UAPI_SA_FLAGS on x86-64).
const UAPI_SA_FLAGS: u64 = 0x1 | 0x2 | 0x4 | 0x800 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x4000_0000 | 0x8000_0000;
/// The XSAVE features ARCH_GET_XCOMP_PERM reports: the user state components
/// (arch/x86/include/asm/fpu/xstate.h XFEATURE_MASK_USER_SUPPORTED: x87 to AVX-512, MPX,
/// PKRU, AMX, APX), not the supervisor ones the kernel keeps in the same mask.
const XFEATURES_USER: u64 = 0xff | 1 << 9 | 1 << 17 | 1 << 18 | 1 << 19;
const SS_ONSTACK: i32 = 1;
const SS_DISABLE: i32 = 2;
const SS_AUTODISARM: u32 = 1 << 31;

/// A thread's kernel-held addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadFacts {
    pub clear_child_tid: u64,
    ss_sp: u64,
    ss_size: u64,
    ss_flags: u32,
}

impl ThreadFacts {
    /// The alternate stack as `sigaltstack` would report it to the thread with its stack
    /// pointer at `sp` (include/linux/sched/signal.h: sas_ss_flags, on_sig_stack).
    pub fn altstack(&self, sp: u64) -> AltStack {
        let on = self.ss_flags & SS_AUTODISARM == 0 && sp > self.ss_sp && sp - self.ss_sp <= self.ss_size;
        let state = match (self.ss_size, on) {
            (0, _) => SS_DISABLE,
            (_, true) => SS_ONSTACK,
            _ => 0,
        };
        AltStack { sp: self.ss_sp, flags: state | (self.ss_flags & SS_AUTODISARM) as i32, size: self.ss_size }
    }
}

/// A process's program break, XSAVE permissions, dispositions (those not default),
/// resource limits (resource, soft, hard) and execution domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcFacts {
    pub brk: u64,
    pub xcomp_perm: u64,
    pub actions: Vec<SigAction>,
    pub limits: Vec<(u32, u64, u64)>,
    pub personality: u32,
}

/// One mapping: its range and VM flags (include/linux/mm.h VM_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
}

/// The VM flags smaps names (fs/proc/task_mmu.c, show_smap_vma_flags) that a dump uses or
/// [`matches_maps`] checks, with their bits (include/linux/mm.h).
const VM_MNEMONICS: [(&str, u64); 16] = [
    ("rd", 0x1),
    ("wr", 0x2),
    ("ex", 0x4),
    ("sh", 0x8),
    ("mr", 0x10),
    ("mw", 0x20),
    ("me", 0x40),
    ("ms", 0x80),
    ("gd", 0x100),
    ("lo", 0x2000),
    ("dc", 0x2_0000),
    ("wf", 0x200_0000),
    ("dd", 0x400_0000),
    ("hg", 0x2000_0000),
    ("nh", 0x4000_0000),
    ("mg", 0x8000_0000),
];
const VM_READ: u64 = 0x1;
const VM_WRITE: u64 = 0x2;
const VM_EXEC: u64 = 0x4;
const VM_MAYSHARE: u64 = 0x80;

impl Vma {
    /// Its flags as smaps would spell them (those of [`VM_MNEMONICS`]).
    pub fn mnemonics(&self) -> String {
        let names: Vec<&str> = VM_MNEMONICS.iter().filter(|(_, b)| self.flags & b != 0).map(|(n, _)| *n).collect();
        names.join(" ")
    }

    /// Whether this is the mapping `m` of /proc/PID/maps: the same range and the same
    /// permissions (maps prints VM_MAYSHARE as `s`).
    pub fn matches_maps(&self, m: &crate::procfs::MapEntry) -> bool {
        let bit = |b: u64| self.flags & b != 0;
        (self.start, self.end) == (m.start, m.end)
            && (bit(VM_READ), bit(VM_WRITE), bit(VM_EXEC), bit(VM_MAYSHARE)) == (m.read, m.write, m.exec, m.shared)
    }
}

/// Everything read, by TID or PID.
#[derive(Default, Debug)]
pub struct Facts {
    pub threads: HashMap<i32, ThreadFacts>,
    pub procs: HashMap<i32, ProcFacts>,
    pub vmas: HashMap<i32, Vec<Vma>>,
}

/// Where the fields the programs read lie in the running kernel's structures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    iter_task: u32,
    iter_task_vma: u32,
    meta_seq: i16,
    pid: i16,
    tgid: i16,
    parent: i16,
    clear_child_tid: i16,
    sas_ss_sp: i16,
    sas_ss_size: i16,
    sas_ss_flags: i16,
    sighand: i16,
    mm: i16,
    signal: i16,
    personality: i16,
    /// Of signal_struct's 16 resource limits.
    rlim: i16,
    /// Of the group permissions of XSAVE features, from the task pointer.
    xcomp_perm: i32,
    action: i32,
    brk: i16,
    vm_start: i16,
    vm_end: i16,
    vm_flags: i16,
}

fn off(btf: &Btf, strukt: &str, path: &str, size: u32) -> Result<i16, BtfError> {
    let f = btf.field(strukt, path)?;
    if f.size != size {
        return Err(BtfError(format!("{strukt}.{path} is {} bytes, not {size}", f.size)));
    }
    i16::try_from(f.offset).map_err(|_| BtfError(format!("{strukt}.{path} lies too far in")))
}

impl Layout {
    fn read(btf: &Btf) -> Result<Layout, BtfError> {
        let action = btf.field("sighand_struct", "action")?;
        let (elem, n) = btf.array(action.type_id)?;
        if n as usize != NSIG || btf.size_of(elem)? as usize != ACTION_LEN || btf.field("k_sigaction", "sa.sa_mask")?.offset != 24 {
            return Err(BtfError("sighand_struct.action is not 64 x86-64 sigactions".into()));
        }
        // XSAVE permissions: in `struct fpu`, which recent kernels place right after the
        // task_struct (x86_task_fpu), older ones in thread_struct.
        let perm = btf.field("fpu", "perm.__state_perm")?.offset;
        let fpu = match btf.field("task_struct", "thread.fpu") {
            Ok(f) if btf.size_of(f.type_id)? > 8 => f.offset,
            _ => btf.size_of(btf.struct_id("task_struct")?)?,
        };
        Ok(Layout {
            iter_task: btf.func_id("bpf_iter_task")?,
            iter_task_vma: btf.func_id("bpf_iter_task_vma")?,
            meta_seq: off(btf, "bpf_iter_meta", "seq", 8)?,
            pid: off(btf, "task_struct", "pid", 4)?,
            tgid: off(btf, "task_struct", "tgid", 4)?,
            parent: off(btf, "task_struct", "parent", 8)?,
            clear_child_tid: off(btf, "task_struct", "clear_child_tid", 8)?,
            sas_ss_sp: off(btf, "task_struct", "sas_ss_sp", 8)?,
            sas_ss_size: off(btf, "task_struct", "sas_ss_size", 8)?,
            sas_ss_flags: off(btf, "task_struct", "sas_ss_flags", 4)?,
            sighand: off(btf, "task_struct", "sighand", 8)?,
            mm: off(btf, "task_struct", "mm", 8)?,
            signal: off(btf, "task_struct", "signal", 8)?,
            personality: off(btf, "task_struct", "personality", 4)?,
            rlim: off(btf, "signal_struct", "rlim", (NLIMITS * 16) as u32)?,
            xcomp_perm: (fpu + perm) as i32,
            action: action.offset as i32,
            brk: off(btf, "mm_struct", "brk", 8)?,
            vm_start: off(btf, "vm_area_struct", "vm_start", 8)?,
            vm_end: off(btf, "vm_area_struct", "vm_end", 8)?,
            vm_flags: off(btf, "vm_area_struct", "vm_flags", 8)?,
        })
    }
}

/// Bytes of a task record's header, written at fp - HDR_AT (under the pointer slot).
const TASK_HDR: i16 = 72;
const HDR_AT: i16 = TASK_HDR + PTR_SLOT;
/// The limits and dispositions go out 256 bytes at a time from fp - (HDR_AT + CHUNK).
const CHUNK: i32 = 256;

/// Scratch slot on the stack for pointers read with [`probe_read`].
const PTR_SLOT: i16 = 8;

/// `dst = *(u64 *)(src + off)` for a pointer field, read with bpf_probe_read_kernel: the
/// verifier then sees a number, not a typed pointer, and need not look up whether the
/// pointer is trusted (a scan of all the kernel's types, 0.2 ms per load). A fault
/// gives 0.
fn load_ptr(a: &mut Asm, dst: u8, src: u8, off: i32) {
    probe_read(a, PTR_SLOT, 8, src, off);
    a.push(bpf::ldx(8, dst, R10, -PTR_SLOT));
}

/// Jumps to `out` unless the task in R7 is traced by process `us` or (`and_self`) is one
/// of its threads. Leaves its tgid in R3.
fn pick_tasks(a: &mut Asm, l: &Layout, us: i32, and_self: bool, out: usize) {
    let take = a.label();
    load_ptr(a, R1, R7, l.parent as i32);
    probe_read(a, PTR_SLOT, 4, R1, l.tgid as i32);
    a.push(bpf::ldx(4, R2, R10, -PTR_SLOT));
    a.push(bpf::ldx(4, R3, R7, l.tgid));
    a.jump(bpf::jeq_imm(R2, us, 0), take);
    if and_self {
        a.jump(bpf::jeq_imm(R3, us, 0), take);
    }
    a.jump(bpf::ja(0), out);
    a.place(take);
}

/// `bpf_seq_write(seq in R6, fp - at, len)`.
fn seq_write(a: &mut Asm, at: i16, len: i32) {
    a.push(bpf::mov(R1, R6)).push(bpf::mov(R2, R10)).push(bpf::add_imm(R2, -(at as i32)));
    a.push(bpf::mov_imm(R3, len)).push(bpf::call(bpf::FUNC_SEQ_WRITE));
}

/// `bpf_probe_read_kernel(fp - at, len, R{src} + off)`.
fn probe_read(a: &mut Asm, at: i16, len: i32, src: u8, off: i32) {
    // R3 first: `src` may be R1 or R2.
    a.push(bpf::mov(R3, src)).push(bpf::add_imm(R3, off));
    a.push(bpf::mov(R1, R10)).push(bpf::add_imm(R1, -(at as i32))).push(bpf::mov_imm(R2, len));
    a.push(bpf::call(bpf::FUNC_PROBE_READ_KERNEL));
}

/// Per task: a 72-byte header (tid, tgid, clear_child_tid, sas_ss_sp, sas_ss_size,
/// sas_ss_flags, whether the process part follows, brk, XSAVE permissions, sighand,
/// personality), then for a group leader the process part: its 16 resource limits, and
/// the 64 dispositions if it has signal handlers.
fn task_prog(l: &Layout, us: i32) -> Vec<Insn> {
    let mut a = Asm::default();
    let out = a.label();
    let thread_only = a.label();
    a.push(bpf::ldx(8, R6, R1, 0)).push(bpf::ldx(8, R7, R1, 8));
    a.jump(bpf::jeq_imm(R7, 0, 0), out);
    a.push(bpf::ldx(8, R6, R6, l.meta_seq));
    pick_tasks(&mut a, l, us, true, out);
    let h = -HDR_AT;
    a.push(bpf::stx(4, R10, h + 4, R3));
    a.push(bpf::st(4, R10, h + 36, 0)).push(bpf::st(8, R10, h + 40, 0));
    for (field, at, len) in [(l.pid, 0, 4), (l.clear_child_tid, 8, 8), (l.sas_ss_sp, 16, 8), (l.sas_ss_size, 24, 8), (l.sas_ss_flags, 32, 4)] {
        probe_read(&mut a, HDR_AT - at, len, R7, field as i32);
    }
    a.push(bpf::st(8, R10, h + 48, 0)).push(bpf::st(8, R10, h + 56, 0)).push(bpf::st(8, R10, h + 64, 0));
    a.push(bpf::ldx(4, R2, R10, h)).push(bpf::ldx(4, R3, R10, h + 4));
    a.jump(bpf::jne32(R2, R3, 0), thread_only);
    // A leader without an address space (it exited before the other threads) gives no
    // process part: its break is gone with it, and injected calls read it instead.
    load_ptr(&mut a, R8, R7, l.mm as i32);
    a.jump(bpf::jeq_imm(R8, 0, 0), thread_only);
    a.push(bpf::st(4, R10, h + 36, 1));
    probe_read(&mut a, HDR_AT - 40, 8, R8, l.brk as i32);
    probe_read(&mut a, HDR_AT - 48, 8, R7, l.xcomp_perm);
    probe_read(&mut a, HDR_AT - 56, 8, R7, l.sighand as i32);
    probe_read(&mut a, HDR_AT - 64, 4, R7, l.personality as i32);
    a.place(thread_only);
    seq_write(&mut a, HDR_AT, TASK_HDR as i32);
    a.push(bpf::ldx(4, R2, R10, h + 36));
    a.jump(bpf::jeq_imm(R2, 0, 0), out);
    let buf = HDR_AT + CHUNK as i16;
    load_ptr(&mut a, R8, R7, l.signal as i32);
    probe_read(&mut a, buf, (NLIMITS * 16) as i32, R8, l.rlim as i32);
    seq_write(&mut a, buf, (NLIMITS * 16) as i32);
    a.push(bpf::ldx(8, R8, R10, h + 56));
    a.jump(bpf::jeq_imm(R8, 0, 0), out);
    for i in 0..(NSIG * ACTION_LEN) as i32 / CHUNK {
        probe_read(&mut a, buf, CHUNK, R8, l.action + i * CHUNK);
        seq_write(&mut a, buf, CHUNK);
    }
    a.place(out);
    a.push(bpf::mov_imm(R0, 0)).push(bpf::exit());
    a.finish()
}

/// Per mapping of a traced process (and of this one, for tests): tgid, 0, start, end, flags (32 bytes).
fn vma_prog(l: &Layout, us: i32) -> Vec<Insn> {
    let mut a = Asm::default();
    let out = a.label();
    a.push(bpf::ldx(8, R6, R1, 0)).push(bpf::ldx(8, R7, R1, 8)).push(bpf::ldx(8, R8, R1, 16));
    a.jump(bpf::jeq_imm(R7, 0, 0), out);
    a.jump(bpf::jeq_imm(R8, 0, 0), out);
    a.push(bpf::ldx(8, R6, R6, l.meta_seq));
    pick_tasks(&mut a, l, us, true, out);
    a.push(bpf::stx(4, R10, -32, R3)).push(bpf::st(4, R10, -28, 0));
    for (field, at) in [(l.vm_start, -24), (l.vm_end, -16), (l.vm_flags, -8)] {
        a.push(bpf::ldx(8, R1, R8, field)).push(bpf::stx(8, R10, at, R1));
    }
    seq_write(&mut a, 32, 32);
    a.place(out);
    a.push(bpf::mov_imm(R0, 0)).push(bpf::exit());
    a.finish()
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

/// The dispositions that are not the default, from the kernel's 64 `k_sigaction`s.
fn actions(raw: &[u8]) -> Vec<SigAction> {
    (1..=NSIG as i32)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
        .filter_map(|sig| {
            let o = (sig as usize - 1) * ACTION_LEN;
            let a = SigAction {
                sig,
                handler: u64_at(raw, o),
                flags: u64_at(raw, o + 8) & UAPI_SA_FLAGS,
                restorer: u64_at(raw, o + 16),
                mask: u64_at(raw, o + 24),
            };
            (a.handler != 0 || a.flags != 0 || a.mask != 0).then_some(a)
        })
        .collect()
}

fn parse_tasks(out: &[u8], facts: &mut Facts) -> Result<(), String> {
    let mut at = 0;
    while at < out.len() {
        let h = out.get(at..at + TASK_HDR as usize).ok_or("a task record is cut short")?;
        at += TASK_HDR as usize;
        let (tid, tgid) = (u32_at(h, 0) as i32, u32_at(h, 4) as i32);
        facts.threads.insert(
            tid,
            ThreadFacts { clear_child_tid: u64_at(h, 8), ss_sp: u64_at(h, 16), ss_size: u64_at(h, 24), ss_flags: u32_at(h, 32) },
        );
        if u32_at(h, 36) == 0 {
            continue;
        }
        let raw = out.get(at..at + NLIMITS * 16).ok_or("a task's limits are cut short")?;
        at += NLIMITS * 16;
        let limits = (0..NLIMITS).map(|r| (r as u32, u64_at(raw, r * 16), u64_at(raw, r * 16 + 8))).collect();
        let actions = match u64_at(h, 56) {
            0 => Vec::new(),
            _ => {
                let raw = out.get(at..at + NSIG * ACTION_LEN).ok_or("a task's dispositions are cut short")?;
                at += NSIG * ACTION_LEN;
                actions(raw)
            }
        };
        facts.procs.insert(tgid, ProcFacts {
                brk: u64_at(h, 40),
                xcomp_perm: u64_at(h, 48) & XFEATURES_USER,
                actions,
                limits,
                personality: u32_at(h, 64),
            });
    }
    Ok(())
}

fn parse_vmas(out: &[u8], facts: &mut Facts) -> Result<(), String> {
    if !out.len().is_multiple_of(32) {
        return Err("a mapping record is cut short".into());
    }
    for r in out.chunks_exact(32) {
        let v = Vma { start: u64_at(r, 8), end: u64_at(r, 16), flags: u64_at(r, 24) };
        facts.vmas.entry(u32_at(r, 0) as i32).or_default().push(v);
    }
    Ok(())
}

/// Compares what the programs read of this process and thread with what system calls
/// say: a wrong offset shows up here before any of it goes into an image.
/// `brk_before`: this process's break just before the task pass.
fn check_self(facts: &Facts, brk_before: u64) -> Result<(), String> {
    use stasis_sys::proc as sp;
    let (pid, tid) = (sp::getpid(), sp::gettid());
    let t = facts.threads.get(&tid.0).ok_or("this thread is not in the task records")?;
    let p = facts.procs.get(&pid.0).ok_or("this process is not in the task records")?;
    fn e(what: &'static str) -> impl Fn(stasis_sys::Errno) -> String {
        move |err| format!("{what}: {err}")
    }
    let tid_addr = sp::own_tid_address().map_err(e("PR_GET_TID_ADDRESS"))?;
    if t.clear_child_tid != tid_addr {
        return Err(format!("clear_child_tid {:#x}, not {tid_addr:#x}", t.clear_child_tid));
    }
    let (ss_sp, ss_flags, ss_size) = sp::own_altstack().map_err(e("sigaltstack"))?;
    let here = &ss_sp as *const u64 as u64;
    let alt = t.altstack(here);
    if (alt.sp, alt.flags, alt.size) != (ss_sp, ss_flags, ss_size) {
        return Err(format!("alternate stack {alt:?}, not ({ss_sp:#x}, {ss_flags}, {ss_size})"));
    }
    // Other threads of this process may move the break while the programs run: compared
    // only when it stood still around the pass.
    if brk_before == sp::own_brk() && p.brk != brk_before {
        return Err(format!("brk {:#x}, not {:#x}", p.brk, brk_before));
    }
    match sp::own_xcomp_perm() {
        Ok(perm) if perm != p.xcomp_perm => return Err(format!("XSAVE permissions {:#x}, not {perm:#x}", p.xcomp_perm)),
        _ => {}
    }
    if p.personality != sp::own_personality() {
        return Err(format!("personality {:#x}, not {:#x}", p.personality, sp::own_personality()));
    }
    if p.limits != crate::task::own_limits() {
        return Err(format!("limits {:?}, not {:?}", p.limits, crate::task::own_limits()));
    }
    let mut own = Vec::new();
    for sig in (1..=NSIG as i32).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP) {
        let k = sp::own_sigaction(sig).map_err(e("rt_sigaction"))?;
        if k.handler != 0 || k.flags != 0 || k.mask != 0 {
            own.push(SigAction { sig, handler: k.handler, flags: k.flags, restorer: k.restorer, mask: k.mask });
        }
    }
    if own != p.actions {
        return Err(format!("dispositions {:?}, not {own:?}", p.actions));
    }
    Ok(())
}

/// Where the layout found in the kernel's BTF is kept until the next boot (reading and
/// parsing 5 MiB of BTF takes about 10 ms, more than the rest of this module's work for
/// a hundred processes). Keyed by the boot ID: a new boot may run another kernel.
const LAYOUT_CACHE: &str = "/run/stasis/btf-layout-v2";

impl Layout {
    fn to_words(self) -> Vec<i64> {
        let l = self;
        [l.iter_task as i64, l.iter_task_vma as i64, l.xcomp_perm as i64, l.action as i64]
            .into_iter()
            .chain(
                [l.meta_seq, l.pid, l.tgid, l.parent, l.clear_child_tid, l.sas_ss_sp, l.sas_ss_size, l.sas_ss_flags]
                    .map(i64::from),
            )
            .chain([l.sighand, l.mm, l.brk, l.vm_start, l.vm_end, l.vm_flags, l.signal, l.personality, l.rlim].map(i64::from))
            .collect()
    }

    fn from_words(w: &[i64]) -> Option<Layout> {
        let s = |i: usize| w.get(i).and_then(|&v| i16::try_from(v).ok());
        let (Some(&t), Some(&tv), Some(&perm), Some(&act)) = (w.first(), w.get(1), w.get(2), w.get(3)) else {
            return None;
        };
        (w.len() == 21).then_some(())?;
        Some(Layout {
            iter_task: u32::try_from(t).ok()?,
            iter_task_vma: u32::try_from(tv).ok()?,
            xcomp_perm: i32::try_from(perm).ok()?,
            action: i32::try_from(act).ok()?,
            meta_seq: s(4)?,
            pid: s(5)?,
            tgid: s(6)?,
            parent: s(7)?,
            clear_child_tid: s(8)?,
            sas_ss_sp: s(9)?,
            sas_ss_size: s(10)?,
            sas_ss_flags: s(11)?,
            sighand: s(12)?,
            mm: s(13)?,
            brk: s(14)?,
            vm_start: s(15)?,
            vm_end: s(16)?,
            vm_flags: s(17)?,
            signal: s(18)?,
            personality: s(19)?,
            rlim: s(20)?,
        })
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

fn cached_layout(boot: &str) -> Option<Layout> {
    let text = std::fs::read_to_string(LAYOUT_CACHE).ok()?;
    let (id, words) = text.split_once('\n')?;
    (id == boot).then_some(())?;
    let w: Vec<i64> = words.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
    Layout::from_words(&w)
}

/// Keeps `l` for the next dumps of this boot; best effort (a read-only /run only costs
/// the next dump the parse).
fn store_layout(boot: &str, l: Layout) {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::path::Path::new(LAYOUT_CACHE).parent().unwrap_or(std::path::Path::new("/run"));
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let words: Vec<String> = l.to_words().iter().map(|w| w.to_string()).collect();
    let tmp = format!("{LAYOUT_CACHE}.{}", std::process::id());
    if std::fs::write(&tmp, format!("{boot}\n{}\n", words.join(" "))).is_ok() && std::fs::rename(&tmp, LAYOUT_CACHE).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Field offsets on this kernel: from the cache of this boot, else from the BTF.
fn layout() -> Result<Layout, String> {
    static LAYOUT: std::sync::OnceLock<Result<Layout, String>> = std::sync::OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let boot = boot_id();
            if let Some(l) = boot.as_deref().and_then(cached_layout) {
                return Ok(l);
            }
            let l = Btf::vmlinux().and_then(|b| Layout::read(&b)).map_err(|e| e.0)?;
            if let Some(b) = &boot {
                store_layout(b, l);
            }
            Ok(l)
        })
        .clone()
}

/// Reads the facts of every task traced by this process (the frozen tree), or says why
/// it cannot.
pub fn read() -> Result<Facts, String> {
    if std::env::var_os("STASIS_NO_BPF").is_some_and(|v| v == "1") {
        return Err("STASIS_NO_BPF=1".into());
    }
    // The programs see PIDs as the initial PID namespace numbers them, which are ours
    // only there (PROC_PID_INIT_INO).
    match std::fs::read_link("/proc/self/ns/pid") {
        Ok(ns) if ns.as_os_str() == "pid:[4026531836]" => {}
        _ => return Err("this dumper is not in the initial PID namespace".into()),
    }
    read_with(layout()?)
}

/// [`read`] with the field offsets `l`.
fn read_with(l: Layout) -> Result<Facts, String> {
    let us = stasis_sys::proc::getpid().0;
    let load = |name: &str, prog: &[Insn], func| bpf::load_iter(name, prog, func).map_err(|e| format!("loading {name}: {e}"));
    let tasks = load("stasis_tasks", &task_prog(&l, us), l.iter_task)?;
    let vmas = load("stasis_vmas", &vma_prog(&l, us), l.iter_task_vma)?;
    let mut facts = Facts::default();
    let run = |p| bpf::run_iter(p).map_err(|e| format!("reading a BPF iterator: {e}"));
    let brk_before = stasis_sys::proc::own_brk();
    parse_tasks(&run(&tasks)?, &mut facts)?;
    check_self(&facts, brk_before)?;
    parse_vmas(&run(&vmas)?, &mut facts)?;
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_as_system_calls_do() {
        match read() {
            Ok(f) => assert!(f.procs.contains_key(&(std::process::id() as i32))),
            Err(e) => eprintln!("no BPF here ({e}): skipped"),
        }
    }

    #[test]
    fn a_wrong_offset_is_caught_by_the_self_check() {
        let Ok(good) = layout() else { return };
        if read_with(good).is_err() {
            return eprintln!("no BPF here: skipped");
        }
        // Each field the task pass reads, moved by one word: the dumper's own values no
        // longer match what its system calls say.
        let wrong = [
            Layout { clear_child_tid: good.clear_child_tid + 8, ..good },
            Layout { sas_ss_sp: good.sas_ss_sp + 8, ..good },
            Layout { brk: good.brk + 8, ..good },
            Layout { xcomp_perm: good.xcomp_perm + 8, ..good },
            Layout { action: good.action + 32, ..good },
            Layout { rlim: good.rlim + 16, ..good },
        ];
        // (The personality is 0 here, as is the word after it: the self-check cannot
        // tell those apart. bpf_reads_what_injected_calls_read compares a personality
        // that is not 0 with /proc's.)
        for l in wrong {
            assert!(read_with(l).is_err(), "{l:?} passed the self-check");
        }
    }

    #[test]
    fn layout_words_round_trip() {
        let Ok(btf) = Btf::vmlinux() else { return };
        let l = Layout::read(&btf).unwrap();
        assert_eq!(Layout::from_words(&l.to_words()), Some(l));
        assert_eq!(Layout::from_words(&l.to_words()[1..]), None);
    }

    #[test]
    fn mapping_flags_as_smaps_spells_them() {
        // Mappings with the flags a dump keeps, in this very process.
        let len = 4 * 4096;
        let advice = [libc::MADV_DONTFORK, libc::MADV_WIPEONFORK, libc::MADV_DONTDUMP, libc::MADV_HUGEPAGE, libc::MADV_NOHUGEPAGE];
        let maps: Vec<_> = advice
            .iter()
            .map(|&adv| {
                let mut m = stasis_sys::mem::LocalMapping::anonymous(len).unwrap();
                m.advise(adv).unwrap();
                m
            })
            .collect();
        let facts = match read() {
            Ok(f) => f,
            Err(e) => return eprintln!("no BPF here ({e}): skipped"),
        };
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let own = crate::procfs::parse_smaps(&smaps).unwrap();
        let vmas = &facts.vmas[&(std::process::id() as i32)];
        for at in &maps {
            let m = own.iter().find(|m| m.start == at.addr()).expect("the test's mapping is in smaps");
            let v = vmas.iter().find(|v| v.start == m.start).expect("and in the iterator's mappings");
            assert!(v.matches_maps(m));
            let known = |f: &str| VM_MNEMONICS.iter().any(|(n, _)| *n == f);
            let want: Vec<&str> = m.vmflags.split_whitespace().filter(|f| known(f)).collect();
            assert_eq!(v.mnemonics(), want.join(" "), "mapping at {:#x}", m.start);
        }
    }

    #[test]
    fn altstack_flags_as_the_kernel_reports_them() {
        let t = ThreadFacts { clear_child_tid: 0, ss_sp: 0x1000, ss_size: 0x1000, ss_flags: 0 };
        assert_eq!(t.altstack(0x1800).flags, SS_ONSTACK);
        assert_eq!(t.altstack(0x1000).flags, 0);
        assert_eq!(t.altstack(0x2000).flags, SS_ONSTACK);
        assert_eq!(t.altstack(0x2001).flags, 0);
        let d = ThreadFacts { ss_flags: SS_AUTODISARM, ..t };
        assert_eq!(d.altstack(0x1800).flags, SS_AUTODISARM as i32);
        let none = ThreadFacts { ss_sp: 0, ss_size: 0, ..t };
        assert_eq!(none.altstack(0x1800), AltStack { sp: 0, flags: SS_DISABLE, size: 0 });
    }

    #[test]
    fn dispositions_keep_only_what_is_set_and_reported() {
        let mut raw = vec![0u8; NSIG * ACTION_LEN];
        // SIGINT (2): a handler with SA_SIGINFO and an internal bit the kernel hides.
        raw[32..40].copy_from_slice(&0x4010u64.to_le_bytes());
        raw[40..48].copy_from_slice(&(0x4 | 0x0080_0000u64).to_le_bytes());
        // SIGKILL (9) never counts.
        raw[8 * 32..8 * 32 + 8].copy_from_slice(&1u64.to_le_bytes());
        let a = actions(&raw);
        assert_eq!(a, vec![SigAction { sig: 2, handler: 0x4010, flags: 0x4, restorer: 0, mask: 0 }]);
    }
}
