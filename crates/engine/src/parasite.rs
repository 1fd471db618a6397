//! A dump-time session of injected system calls in a frozen thread, with a scratch area
//! in the target for the calls' input and output structures.
//!
//! The scratch area is mapped by an injected mmap and removed by an injected munmap before
//! the session ends, so the memory layout read afterwards is the program's own. During the
//! session every signal is blocked in the thread so that none is delivered to it while it
//! runs our calls; the freeze guard puts the thread's own mask back.
//!
//! A dumper killed by SIGKILL in the middle of the session must not leave a thread with
//! borrowed registers (the kernel detaches it and it runs on). So, once the scratch area
//! exists, each thread gets an `rt_sigframe` there holding its own context (registers
//! adjusted as the kernel would for a restart, signal mask, alternate stack, XSAVE image),
//! and its calls run from a `syscall; ret` pair with the stack pointer at that frame,
//! whose return slot holds the program's own signal trampoline (`mov $15,%rax; syscall`):
//! a thread orphaned mid-call returns into rt_sigreturn and continues where it was. Only
//! the mmap and the final munmap run unprotected.
//!
//! Calls whose results land in memory are queued and run as one chain (see
//! [`Parasite::flush`]): each call returns through rt_sigreturn into a small frame that
//! loads the next one, and the last frame unblocks a signal we sent beforehand, whose
//! delivery stops the thread for us. One resume and one stop instead of two stops per call.

use crate::error::{Error, Result};
use crate::freeze::FrozenThread;
use crate::inject::{call_regs, checked, restart_fixup, wait_stop, Injector};
use crate::procfs;
use stasis_image::AltStack;
use stasis_sys::ptrace::{self, UserRegs};
use stasis_sys::mem::RemoteRange;
use stasis_sys::{Pid, RemoteAddr};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes for call arguments and results, at the start of the scratch area.
pub const SCRATCH_LEN: u64 = 4096;
/// One sigframe slot per thread after that in a mapped scratch area: header, registers
/// and an XSAVE image, then the thread's chain frames.
const FRAME_SLOT: u64 = 16 * 4096;
const ALT_OUT: u64 = SCRATCH_LEN - 64;
/// Kept free under the stack pointer: the x86-64 red zone.
const RED_ZONE: u64 = 128;
/// Where a thread's chain frames start in a slot of a mapped scratch area (after its own
/// frame), and their size. On the stack they start right after the frame (see
/// [`frame_room`]): the fewer stack pages the area covers, the fewer the dump saves.
const CHAIN_AT: u64 = 16 * 1024;
const CHAIN_FRAME: u64 = 512;
/// A `stack_t` that rt_sigreturn rejects, which leaves the alternate signal stack as it is
/// (the kernel ignores every error of that step but EFAULT): the frames never change it.
const KEEP_ALTSTACK: AltStack = AltStack { sp: 0, flags: 3, size: 0 };
/// Signals whose default action is to ignore them: one of these, neither caught nor
/// blocked by the thread, ends a chain (if nobody traces the thread it is discarded).
const STOP_SIGNALS: [i32; 3] = [libc::SIGURG, libc::SIGWINCH, libc::SIGCHLD];

/// A call queued for [`Parasite::flush`]: its results are read from memory it writes.
/// `strict`: a failure is an error (checked where a call runs on its own; in a chain the
/// caller checks what the call wrote).
struct Queued {
    name: &'static str,
    nr: i64,
    args: [u64; 6],
    strict: bool,
}

/// Addresses in the target that make protected calls possible.
#[derive(Clone, Copy)]
struct Trampolines {
    /// `syscall; ret`
    syscall_ret: u64,
    /// `mov $15,%rax; syscall` (rt_sigreturn), the program's own sa_restorer code.
    sigreturn: u64,
}

pub struct Parasite {
    pub inj: Injector,
    mem: File,
    pub scratch: RemoteAddr,
    scratch_len: u64,
    /// Bytes of one thread's slot (after the first SCRATCH_LEN bytes).
    slot_len: u64,
    /// Where the chain frames start in a slot.
    chain_at: u64,
    /// The scratch area lies on the thread's own stack, under its red zone, instead of
    /// in a mapping of its own: what was there, put back when the session ends.
    stack_bytes: Option<Vec<u8>>,
    syscall_ip: u64,
    tramp: Option<Trampolines>,
    /// Registers for unprotected calls in the current thread.
    plain: UserRegs,
    slot: u64,
    open: bool,
    /// Signals the process catches (no chain may end with one of them).
    caught: u64,
    /// The XSAVE image of the thread armed last, read for its frame.
    xstate: Option<(Pid, Vec<u8>)>,
    /// The current thread's own frame and what ends its chains, if it can have them.
    chain: Option<Chain>,
    queued: Vec<Queued>,
    /// Scratch writes not yet made (offset, bytes), in order: made together, by one
    /// process_vm_writev, before the thread runs or anything is read back.
    pending: std::cell::RefCell<Vec<(u64, Vec<u8>)>>,
    /// The first SCRATCH_LEN bytes of the scratch area (where calls leave their results),
    /// read in one go by the first read after the calls ran.
    cache: std::cell::RefCell<Option<Vec<u8>>>,
}

/// What a thread needs for chains of calls.
#[derive(Clone, Copy)]
struct Chain {
    /// The thread's own frame (its context, returned to at the end).
    frame: u64,
    /// Its XSAVE image in that frame, which every chain frame points to.
    fpstate: Option<u64>,
    /// Offset of the thread's slot in the scratch area.
    slot: u64,
    stop_sig: i32,
    regs: UserRegs,
    tid: Pid,
}

impl Parasite {
    /// Starts a session in `thread` of process `pid`, with room for `nthreads` frames.
    /// `code` remembers where earlier processes had the instructions injection needs;
    /// `caught` are the signals the process has handlers for.
    /// `maps`: the process's mappings, read with it frozen. `own_stack`: the process has
    /// one thread and shares its address space with no other process, and `chain` calls
    /// at most go in one chain; then, if its stack has the room, the scratch area goes
    /// there (see [`stack_scratch`]): no mapping to make and remove, two injected calls
    /// fewer, and not a moment unprotected.
    pub fn start(
        pid: Pid,
        thread: &mut FrozenThread,
        nthreads: usize,
        maps: &[procfs::MapEntry],
        code: &std::sync::Mutex<CodeCache>,
        caught: u64,
        own_stack: Option<usize>,
    ) -> Result<Parasite> {
        let mem = File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem").into(), err: e })?;
        let (ip, tramp) = find_code(pid, &mem, maps, &mut code.lock().unwrap_or_else(|p| p.into_inner()))?;
        let stack_chain_at = frame_room(stasis_sys::cpu::xsave_size() as u64);
        let on_stack = own_stack.and_then(|chain| {
            let slot_len = stack_chain_at + (chain as u64 + 1) * CHAIN_FRAME;
            stack_scratch(maps, thread.regs.rsp, SCRATCH_LEN + slot_len).map(|at| (at, slot_len))
        });
        let mut stack_bytes = None;
        if let Some((at, slot_len)) = on_stack {
            let mut was = vec![0u8; (SCRATCH_LEN + slot_len) as usize];
            read_remote(pid, &mem, at, &mut was)?;
            stack_bytes = Some(was);
        }
        ptrace::set_sigmask(thread.tid, !0).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        thread.injected = true;
        let mut inj = Injector::new(pid, thread.tid, ip, thread.regs);
        let (scratch, scratch_len, slot_len, chain_at) = match on_stack {
            Some((at, slot_len)) => (at, SCRATCH_LEN + slot_len, slot_len, stack_chain_at),
            None => {
                let len = SCRATCH_LEN + FRAME_SLOT * nthreads as u64;
                let at = inj.call(
                    "mmap",
                    libc::SYS_mmap,
                    [
                        0,
                        len,
                        (libc::PROT_READ | libc::PROT_WRITE) as u64,
                        (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                        u64::MAX,
                        0,
                    ],
                )?;
                (at, len, FRAME_SLOT, CHAIN_AT)
            }
        };
        let mut p = Parasite {
            inj,
            mem,
            scratch: RemoteAddr(scratch),
            scratch_len,
            slot_len,
            chain_at,
            stack_bytes,
            syscall_ip: ip,
            tramp,
            plain: thread.regs,
            slot: 0,
            open: true,
            caught,
            xstate: None,
            chain: None,
            queued: Vec::new(),
            pending: Default::default(),
            cache: Default::default(),
        };
        p.arm(thread)?;
        Ok(p)
    }

    /// Runs the following calls in another frozen thread of the same process.
    pub fn use_thread(&mut self, thread: &mut FrozenThread) -> Result<()> {
        let pid = self.inj.pid;
        ptrace::set_sigmask(thread.tid, !0).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        thread.injected = true;
        self.slot += 1;
        self.arm(thread)
    }

    /// Writes the thread's sigframe and switches to protected calls. Its alternate stack
    /// is read by the first flush (see [`Parasite::queue_altstack`]).
    fn arm(&mut self, thread: &FrozenThread) -> Result<()> {
        let pid = self.inj.pid;
        self.plain = thread.regs;
        self.chain = None;
        self.inj = Injector::new(pid, thread.tid, self.syscall_ip, thread.regs);
        let Some(t) = self.tramp else { return Ok(()) };
        let slot = SCRATCH_LEN + self.slot.min((self.scratch_len - SCRATCH_LEN) / self.slot_len - 1) * self.slot_len;
        let frame = self.scratch.0 + slot;
        let xstate = ptrace::get_regset(thread.tid, ptrace::NT_X86_XSTATE, stasis_sys::cpu::xsave_size())
            .map_err(Error::sys(pid, "PTRACE_GETREGSET NT_X86_XSTATE"))?;
        let resume = restart_fixup(&thread.regs, true);
        let bytes = sigframe(frame, t.sigreturn, &resume, thread.sigmask, &KEEP_ALTSTACK, &xstate);
        let fpstate = (!xstate.is_empty()).then(|| fpstate_at(frame));
        self.xstate = Some((thread.tid, xstate));
        if bytes.len() as u64 > self.chain_at {
            return Ok(()); // an XSAVE area larger than the room for it: stay unprotected
        }
        self.write(slot, &bytes)?;
        let mut base = thread.regs;
        base.rsp = frame;
        self.inj = Injector::new(pid, thread.tid, t.syscall_ret, base);
        let usable = |s: &&i32| (self.caught | thread.sigmask) & (1u64 << (**s - 1)) == 0;
        self.chain = STOP_SIGNALS.iter().find(usable).map(|&stop_sig| Chain {
            frame,
            fpstate,
            slot,
            stop_sig,
            regs: thread.regs,
            tid: thread.tid,
        });
        Ok(())
    }

    /// The XSAVE image of thread `tid`: the one read to arm it, else read now.
    pub fn xstate_of(&mut self, tid: Pid) -> Result<Vec<u8>> {
        match self.xstate.take() {
            Some((t, x)) if t == tid => Ok(x),
            _ => crate::threads::xstate(self.inj.pid, tid),
        }
    }

    /// Queues a call for the next flush; `strict`: see [`Queued`].
    pub fn queue(&mut self, name: &'static str, nr: i64, args: [u64; 6], strict: bool) {
        self.queued.push(Queued { name, nr, args, strict });
    }

    /// Queues the query of the current thread's alternate stack; [`Parasite::altstack`]
    /// reads it after the flush.
    pub fn queue_altstack(&mut self) -> Result<()> {
        self.write(ALT_OUT, &[0xff; 24])?;
        self.queue("sigaltstack", libc::SYS_sigaltstack, [0, self.scratch.0 + ALT_OUT, 0, 0, 0, 0], true);
        Ok(())
    }

    /// The alternate stack the last flush read.
    pub fn altstack(&self) -> Result<AltStack> {
        let mut b = [0u8; 24];
        self.read(ALT_OUT, &mut b)?;
        if b == [0xff; 24] {
            return Err(Error::Injected { pid: self.inj.pid, call: "sigaltstack", errno: stasis_sys::Errno(libc::EFAULT) });
        }
        let word = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        Ok(AltStack { sp: word(0), flags: word(8) as u32 as i32, size: word(16) })
    }

    /// Runs the queued calls in the current thread. With the thread's own frame in place
    /// and a usable stop signal, as one chain: the signal is sent (it stays pending, every
    /// signal being blocked), the first call is started with the stack pointer at a frame
    /// that loads the second, and so on; the last frame unblocks only the stop signal and
    /// returns into rt_sigreturn over the thread's own frame. The signal's delivery is our
    /// stop, before that return. A thread orphaned meanwhile runs the rest of the chain,
    /// its stop signal is discarded (default action: ignore) and it returns to where it
    /// was. Otherwise one protected call at a time.
    pub fn flush(&mut self) -> Result<()> {
        let calls = std::mem::take(&mut self.queued);
        self.cache.borrow_mut().take();
        match (self.chain, self.tramp) {
            // The chain's frames join the queued writes.
            (Some(c), Some(t)) if !calls.is_empty() => self.run_chain(c, t, &calls),
            _ => {
                self.sync()?;
                for q in calls {
                    let r = self.inj.raw(q.nr, q.args)?;
                    if q.strict {
                        checked(self.inj.pid, q.name, r)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn run_chain(&mut self, c: Chain, t: Trampolines, calls: &[Queued]) -> Result<()> {
        let pid = self.inj.pid;
        let blocked_but_stop = !(1u64 << (c.stop_sig - 1));
        let at = |k: usize| self.scratch.0 + c.slot + self.chain_at + k as u64 * CHAIN_FRAME;
        let room = ((self.slot_len - self.chain_at) / CHAIN_FRAME) as usize;
        if calls.len() > room {
            return Err(Error::Unsupported { pid, what: format!("{} injected calls in one chain", calls.len()) });
        }
        let with_call = |r: UserRegs, q: &Queued, rsp: u64| UserRegs { rsp, ..call_regs(&r, t.syscall_ret, q.nr, q.args) };
        // Frame k loads call k + 1 (its stack pointer at frame k + 1); the last one ends.
        let mut bytes = Vec::with_capacity(calls.len() * CHAIN_FRAME as usize);
        for (k, q) in calls.iter().enumerate().skip(1) {
            let regs = with_call(c.regs, q, at(k));
            bytes.extend(frame_header(t.sigreturn, &regs, !0, &KEEP_ALTSTACK, c.fpstate));
            bytes.resize(k * CHAIN_FRAME as usize, 0);
        }
        let mut last = c.regs;
        last.rip = t.sigreturn;
        last.rsp = c.frame + 8;
        bytes.extend(frame_header(t.sigreturn, &last, blocked_but_stop, &KEEP_ALTSTACK, c.fpstate));
        self.write(c.slot + self.chain_at, &bytes)?;
        self.sync()?;
        stasis_sys::proc::tgkill(pid, c.tid, c.stop_sig).map_err(Error::sys(pid, "tgkill"))?;
        let first = with_call(c.regs, &calls[0], at(0));
        ptrace::set_regs(c.tid, &first).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
        ptrace::cont(c.tid, 0).map_err(Error::sys(pid, "PTRACE_CONT"))?;
        crate::inject::fault_point();
        wait_stop(pid, c.tid, "in a chain of injected calls", |s, ev| s == c.stop_sig && ev == 0)?;
        // Stopped at the stop signal's delivery, which the next resume drops; everything
        // blocked again for the calls that follow.
        ptrace::set_sigmask(c.tid, !0).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        log::trace!("pid {pid}: {} injected calls in one chain", calls.len());
        Ok(())
    }

    /// Reads scratch bytes, once the queued writes are made. The result area (the first
    /// SCRATCH_LEN bytes) is read whole by the first read after calls ran, and later
    /// reads of it are answered from that copy; anything else is read as asked (see
    /// [`read_remote`]).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.sync()?;
        let end = off + buf.len() as u64;
        if end > SCRATCH_LEN {
            return read_remote(self.inj.pid, &self.mem, self.scratch.0 + off, buf);
        }
        let mut cache = self.cache.borrow_mut();
        if cache.is_none() {
            let mut all = vec![0u8; SCRATCH_LEN as usize];
            read_remote(self.inj.pid, &self.mem, self.scratch.0, &mut all)?;
            *cache = Some(all);
        }
        buf.copy_from_slice(&cache.as_deref().unwrap_or_default()[off as usize..end as usize]);
        Ok(())
    }

    /// Writes scratch bytes: queued, and made by [`Parasite::sync`] with every other
    /// queued write, before the thread next runs or anything is read.
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.pending.borrow_mut().push((off, buf.to_vec()));
        Ok(())
    }

    /// Makes the queued scratch writes: all with one process_vm_writev (one copy; the
    /// scratch area is the process's own private memory), the rest, if any, through
    /// /proc/PID/mem. Later writes win where they overlap earlier ones.
    fn sync(&self) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        if pending.is_empty() {
            return Ok(());
        }
        self.cache.borrow_mut().take();
        let pid = self.inj.pid;
        let bytes: Vec<u8> = pending.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let remote: Vec<RemoteRange> =
            pending.iter().map(|(off, b)| RemoteRange { addr: RemoteAddr(self.scratch.0 + off), len: b.len() }).collect();
        let mut done = stasis_sys::mem::process_vm_writev(pid, &bytes, &remote).unwrap_or(0).min(bytes.len());
        for (off, b) in &pending {
            let skip = done.min(b.len());
            done -= skip;
            if skip < b.len() {
                self.mem
                    .write_all_at(&b[skip..], self.scratch.0 + off + skip as u64)
                    .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem").into(), err: e })?;
            }
        }
        Ok(())
    }

    /// Puts back the stack bytes the scratch area covered; queued writes into it go.
    fn put_back_stack(&self, was: &[u8]) -> Result<()> {
        self.pending.borrow_mut().clear();
        self.write(0, was)?;
        self.sync()
    }

    /// An unprotected call with its result (what lands in memory is queued instead).
    pub fn call(&mut self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        self.sync()?;
        self.cache.borrow_mut().take();
        self.inj.call(name, nr, args)
    }

    pub fn read_u64(&self, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Removes the scratch area: puts back the stack bytes it covered, or unmaps it from
    /// the current thread (unprotected: its frame goes).
    pub fn finish(mut self) -> Result<()> {
        self.open = false;
        if let Some(was) = self.stack_bytes.take() {
            return self.put_back_stack(&was);
        }
        let (pid, tid) = (self.inj.pid, self.inj.tid);
        let mut inj = Injector::new(pid, tid, self.syscall_ip, self.plain);
        inj.call("munmap", libc::SYS_munmap, [self.scratch.0, self.scratch_len, 0, 0, 0, 0]).map(drop)
    }
}

impl Drop for Parasite {
    fn drop(&mut self) {
        if self.open {
            if let Some(was) = self.stack_bytes.take() {
                let _ = self.put_back_stack(&was);
                return;
            }
            let mut inj = Injector::new(self.inj.pid, self.inj.tid, self.syscall_ip, self.plain);
            let _ = inj.raw(libc::SYS_munmap, [self.scratch.0, self.scratch_len, 0, 0, 0, 0]);
        }
    }
}

/// Reads `buf.len()` bytes of `pid`'s memory at `at`: with process_vm_readv, the rest,
/// if any, through its /proc/PID/mem (`mem`). Only for memory the session writes anyway:
/// process_vm_readv pins what it reads, which gives the process its own copy of a page
/// it shared copy-on-write.
fn read_remote(pid: Pid, mem: &File, at: u64, buf: &mut [u8]) -> Result<()> {
    let remote = [RemoteRange { addr: RemoteAddr(at), len: buf.len() }];
    let done = stasis_sys::mem::process_vm_readv(pid, buf, &remote).unwrap_or(0).min(buf.len());
    if done == buf.len() {
        return Ok(());
    }
    mem.read_exact_at(&mut buf[done..], at + done as u64)
        .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem").into(), err: e })
}

/// Where a scratch area of `len` bytes fits on the process's main stack under the stack
/// pointer `sp` and its red zone (64-byte aligned, a page above the mapping's start), if
/// `sp` is in that stack. The bytes there are free by the ABI: a signal handler may
/// overwrite them at any moment, and the kernel writes its own signal frames there.
/// Pure.
pub fn stack_scratch(maps: &[procfs::MapEntry], sp: u64, len: u64) -> Option<u64> {
    let stack = maps.iter().find(|m| m.name == "[stack]" && m.start < sp && sp <= m.end && m.read && m.write)?;
    let at = sp.checked_sub(RED_ZONE + len)? & !63;
    (at >= stack.start + 4096).then_some(at)
}

const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;
const UC_STRICT_RESTORE_SS: u64 = 4;
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Offset of `struct _fpx_sw_bytes` in the legacy FXSAVE area.
const SW_BYTES: usize = 464;

/// An x86-64 `rt_sigframe` at `at`: return slot, ucontext (flags, link, stack, sigcontext,
/// mask), siginfo, then the XSAVE image 64-byte aligned with its trailing magic. What
/// rt_sigreturn reads to put a thread back into `regs`. Pure: bytes out.
pub fn sigframe(at: u64, restorer: u64, regs: &UserRegs, mask: u64, alt: &AltStack, xstate: &[u8]) -> Vec<u8> {
    let fpstate = (!xstate.is_empty()).then(|| fpstate_at(at));
    let mut f = frame_header(restorer, regs, mask, alt, fpstate);
    if xstate.is_empty() {
        return f;
    }
    let fp_off = fpstate_at(at) - at;
    f.resize(fp_off as usize, 0);
    let fp = f.len();
    f.extend_from_slice(xstate);
    // Software bytes of a signal frame's XSAVE image. (In the ptrace image the same bytes
    // hold XCR0, which is the feature mask wanted here.)
    let xfeatures = xstate
        .get(SW_BYTES..SW_BYTES + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0);
    let size = xstate.len() as u32;
    let mut sw = [0u8; 48];
    sw[0..4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    sw[4..8].copy_from_slice(&(size + 4).to_le_bytes()); // extended_size: with MAGIC2
    sw[8..16].copy_from_slice(&xfeatures.to_le_bytes());
    sw[16..20].copy_from_slice(&size.to_le_bytes());
    f[fp + SW_BYTES..fp + SW_BYTES + 48].copy_from_slice(&sw);
    f.extend_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
    f
}

/// Bytes that hold a [`sigframe`] with an XSAVE image of `xsave` bytes wherever it starts
/// (a 64-byte multiple, for the frames that follow). Pure.
fn frame_room(xsave: u64) -> u64 {
    (440 + 63 + xsave + 4).next_multiple_of(64)
}

/// Where [`sigframe`] puts the XSAVE image of a frame at `at`.
fn fpstate_at(at: u64) -> u64 {
    (at + 440).next_multiple_of(64)
}

/// The first 440 bytes of an `rt_sigframe` at `at`: return slot, ucontext with the
/// registers, mask and alternate stack, and a pointer to an XSAVE image at `fpstate`
/// (none: rt_sigreturn resets the FPU state). Pure.
fn frame_header(restorer: u64, regs: &UserRegs, mask: u64, alt: &AltStack, fpstate: Option<u64>) -> Vec<u8> {
    let mut f = vec![0u8; 440];
    let put = |f: &mut Vec<u8>, off: usize, v: u64| f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut f, 0, restorer);
    let flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS | if fpstate.is_some() { UC_FP_XSTATE } else { 0 };
    put(&mut f, 8, flags);
    put(&mut f, 24, alt.sp);
    f[32..36].copy_from_slice(&alt.flags.to_le_bytes());
    put(&mut f, 40, alt.size);
    // struct sigcontext at 48.
    let r = regs;
    for (i, v) in [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.eflags,
    ]
    .into_iter()
    .enumerate()
    {
        put(&mut f, 48 + i * 8, v);
    }
    let segs = (r.cs & 0xffff) | ((r.gs & 0xffff) << 16) | ((r.fs & 0xffff) << 32) | ((r.ss & 0xffff) << 48);
    put(&mut f, 48 + 18 * 8, segs);
    if let Some(fp) = fpstate {
        put(&mut f, 48 + 23 * 8, fp); // fpstate pointer
    }
    put(&mut f, 304, mask);
    f
}

/// A `syscall` instruction (preferably in the vDSO) and, if the program has them, a
/// `syscall; ret` pair and an rt_sigreturn trampoline.
/// The code addresses found in one executable mapping: `syscall`, `syscall; ret` and the
/// rt_sigreturn trampoline.
#[derive(Clone, Copy, Default)]
struct Found {
    plain: Option<u64>,
    syscall_ret: Option<u64>,
    sigreturn: Option<u64>,
}

const SYSCALL: &[u8] = &[0x0f, 0x05];
const SYSCALL_RET: &[u8] = &[0x0f, 0x05, 0xc3];
const SIGRETURN: &[u8] = &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// What earlier processes of one dump had at the same place: processes of a tree mostly
/// map the same libc at the same address, and scanning it costs more than everything else
/// the parasite does. A hit is checked against the process's own bytes before use.
#[derive(Default)]
pub struct CodeCache {
    by_mapping: std::collections::HashMap<MappingKey, Found>,
}

fn has_bytes(mem: &File, at: Option<u64>, pat: &[u8]) -> bool {
    let Some(at) = at else { return true };
    let mut b = [0u8; 16];
    mem.read_exact_at(&mut b[..pat.len()], at).is_ok() && &b[..pat.len()] == pat
}

fn scan(m: &procfs::MapEntry, mem: &File) -> Option<Found> {
    let mut buf = vec![0u8; (m.end - m.start).min(8 << 20) as usize];
    mem.read_exact_at(&mut buf, m.start).ok()?;
    let find = |pat: &[u8]| find_bytes(&buf, pat).map(|i| m.start + i as u64);
    Some(Found { plain: find(SYSCALL), syscall_ret: find(SYSCALL_RET), sigreturn: find(SIGRETURN) })
}

/// First position of `pat` in `hay`, looking only where its first byte occurs.
fn find_bytes(hay: &[u8], pat: &[u8]) -> Option<usize> {
    let (first, rest) = pat.split_first()?;
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|b| b == first) {
        let at = from + i;
        if hay.len() - at < pat.len() {
            return None;
        }
        if &hay[at + 1..at + pat.len()] == rest {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

type MappingKey = (u64, u64, u64, u64, u64);

fn mapping_key(m: &procfs::MapEntry) -> MappingKey {
    (m.start, m.end, m.offset, m.inode, ((m.dev_major as u64) << 32) | m.dev_minor as u64)
}

/// What the cache knows for the mappings `candidates` (in order of preference), if it
/// knows all that is needed and one read of the process's memory confirms every byte
/// pattern: the usual case from the second process of a tree on.
fn cached_code(pid: Pid, candidates: &[&procfs::MapEntry], cache: &CodeCache) -> Option<Found> {
    let mut got = Found::default();
    let mut checks: Vec<(u64, &[u8])> = Vec::new();
    for m in candidates {
        let f = cache.by_mapping.get(&mapping_key(m))?;
        for (slot, at, pat) in [(&mut got.plain, f.plain, SYSCALL), (&mut got.syscall_ret, f.syscall_ret, SYSCALL_RET), (&mut got.sigreturn, f.sigreturn, SIGRETURN)] {
            if let (None, Some(at)) = (*slot, at) {
                *slot = Some(at);
                checks.push((at, pat));
            }
        }
        if got.plain.is_some() && got.syscall_ret.is_some() && got.sigreturn.is_some() {
            break;
        }
    }
    let ranges: Vec<RemoteRange> = checks.iter().map(|(at, pat)| RemoteRange { addr: RemoteAddr(*at), len: pat.len() }).collect();
    let want: Vec<u8> = checks.iter().flat_map(|(_, pat)| pat.iter().copied()).collect();
    let mut buf = vec![0u8; want.len()];
    let n = stasis_sys::mem::process_vm_readv(pid, &mut buf, &ranges).ok()?;
    (n == want.len() && buf == want).then_some(got)
}

fn find_code(pid: Pid, mem: &File, maps: &[procfs::MapEntry], cache: &mut CodeCache) -> Result<(u64, Option<Trampolines>)> {
    let mut candidates: Vec<&procfs::MapEntry> = maps.iter().filter(|m| m.exec && m.read).collect();
    candidates.sort_by_key(|m| m.name != "[vdso]");
    let (mut plain, mut syscall_ret, mut sigreturn) = (None, None, None);
    if let Some(f) = cached_code(pid, &candidates, cache) {
        (plain, syscall_ret, sigreturn) = (f.plain, f.syscall_ret, f.sigreturn);
        candidates.clear();
    }
    for m in candidates {
        let key = mapping_key(m);
        let cached = cache.by_mapping.get(&key).copied().filter(|f| {
            has_bytes(mem, f.plain, SYSCALL) && has_bytes(mem, f.syscall_ret, SYSCALL_RET) && has_bytes(mem, f.sigreturn, SIGRETURN)
        });
        let Some(f) = cached.or_else(|| scan(m, mem)) else { continue };
        cache.by_mapping.insert(key, f);
        plain = plain.or(f.plain);
        syscall_ret = syscall_ret.or(f.syscall_ret);
        sigreturn = sigreturn.or(f.sigreturn);
        if plain.is_some() && syscall_ret.is_some() && sigreturn.is_some() {
            break;
        }
    }
    let plain = plain.ok_or_else(|| Error::Unsupported { pid, what: "a process without any syscall instruction mapped".into() })?;
    let tramp = match (syscall_ret, sigreturn) {
        (Some(syscall_ret), Some(sigreturn)) => Some(Trampolines { syscall_ret, sigreturn }),
        _ => {
            log::debug!("pid {pid}: no rt_sigreturn trampoline found: injected calls run unprotected");
            None
        }
    };
    Ok((plain, tramp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_occurrence() {
        assert_eq!(find_bytes(b"xx\x0f\x05\x0f\x05\xc3", SYSCALL_RET), Some(4));
        assert_eq!(find_bytes(b"\x0f\x05", SYSCALL), Some(0));
        assert_eq!(find_bytes(b"\x0f", SYSCALL), None);
        assert_eq!(find_bytes(b"", SYSCALL), None);
    }

    #[test]
    fn scratch_on_the_stack_only_with_room_under_the_red_zone() {
        let map = |start: u64, end: u64, name: &str| procfs::MapEntry {
            start,
            end,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            name: name.into(),
            vmflags: String::new(),
        };
        let maps = [map(0x1000_0000, 0x1010_0000, ""), map(0x7ff0_0000, 0x7ff2_0000, "[stack]")];
        let sp = 0x7ff1_f008;
        let at = stack_scratch(&maps, sp, 0x3000).expect("room on the stack");
        assert_eq!(at % 64, 0);
        assert!(at + 0x3000 <= sp - RED_ZONE);
        assert!(at >= 0x7ff0_1000);
        // Not enough room above the stack's first page, a stack pointer elsewhere.
        assert_eq!(stack_scratch(&maps, 0x7ff0_2000, 0x3000), None);
        assert_eq!(stack_scratch(&maps, 0x1008_0000, 0x3000), None);
    }

    #[test]
    fn a_frame_fits_its_room_wherever_it_starts() {
        let regs = UserRegs::default();
        let alt = AltStack { sp: 0, flags: 0, size: 0 };
        for xsave in [512u64, 832, 2432, 2696, 11008] {
            let room = frame_room(xsave);
            assert_eq!(room % 64, 0);
            for at in (0x10_0000..0x10_0000 + 64).step_by(8) {
                let f = sigframe(at, 0, &regs, 0, &alt, &vec![0u8; xsave as usize]);
                assert!(f.len() as u64 <= room, "xsave {xsave} at {at:#x}: {} > {room}", f.len());
            }
        }
    }

    #[test]
    fn sigframe_layout() {
        let regs = UserRegs { rip: 0x1111, rsp: 0x2222, rax: 0x3333, r8: 0x8, cs: 0x33, ss: 0x2b, ..Default::default() };
        let mut xs = vec![0u8; 832];
        xs[SW_BYTES..SW_BYTES + 8].copy_from_slice(&0xe7u64.to_le_bytes()); // XCR0, as ptrace gives it
        let alt = AltStack { sp: 0x5000, flags: 0, size: 0x2000 };
        let f = sigframe(0x10_0000, 0xabc, &regs, 0x4000, &alt, &xs);
        let word = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
        assert_eq!(word(0), 0xabc);
        assert_eq!(word(8), 7);
        assert_eq!((word(24), word(40)), (0x5000, 0x2000));
        assert_eq!(word(48), 0x8); // r8 first
        assert_eq!(word(48 + 13 * 8), 0x3333); // rax
        assert_eq!(word(48 + 15 * 8), 0x2222); // rsp
        assert_eq!(word(48 + 16 * 8), 0x1111); // rip
        assert_eq!(word(48 + 18 * 8) & 0xffff, 0x33); // cs
        assert_eq!(word(48 + 18 * 8) >> 48, 0x2b); // ss
        let fp = word(48 + 23 * 8);
        assert_eq!(fp % 64, 0);
        assert_eq!(word(304), 0x4000);
        let fpo = (fp - 0x10_0000) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(fpo + SW_BYTES), FP_XSTATE_MAGIC1);
        assert_eq!(u32_at(fpo + SW_BYTES + 4), 836);
        assert_eq!(word(fpo + SW_BYTES + 8), 0xe7);
        assert_eq!(u32_at(fpo + SW_BYTES + 16), 832);
        assert_eq!(u32_at(fpo + 832), FP_XSTATE_MAGIC2);
    }
}
