//! A dump-time session of injected system calls in a frozen thread, with a scratch page
//! in the target for the calls' input and output structures.
//!
//! The scratch page is mapped by an injected mmap and removed by an injected munmap before
//! the session ends, so the memory layout read afterwards is the program's own. During the
//! session every signal is blocked in the thread so that none is delivered to it while it
//! runs our calls; the freeze guard puts the thread's own mask back.

use crate::error::{Error, Result};
use crate::freeze::FrozenThread;
use crate::inject::{find_syscall_insn, Injector};
use crate::procfs;
use stasis_sys::ptrace;
use stasis_sys::{Pid, RemoteAddr};
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const SCRATCH_LEN: u64 = 16 * 4096;

pub struct Parasite {
    pub inj: Injector,
    mem: File,
    pub scratch: RemoteAddr,
    syscall_ip: u64,
    open: bool,
}

impl Parasite {
    /// Starts a session in `thread` of process `pid`.
    pub fn start(pid: Pid, thread: &mut FrozenThread) -> Result<Parasite> {
        let mem = File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem").into(), err: e })?;
        let ip = find_syscall_in_target(pid, &mem)?;
        ptrace::set_sigmask(thread.tid, !0).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        thread.injected = true;
        let mut inj = Injector::new(pid, thread.tid, ip, thread.regs);
        let scratch = inj.call(
            "mmap",
            libc::SYS_mmap,
            [
                0,
                SCRATCH_LEN,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        Ok(Parasite { inj, mem, scratch: RemoteAddr(scratch), syscall_ip: ip, open: true })
    }

    /// Runs the following calls in another frozen thread of the same process (the scratch
    /// page is shared by all threads).
    pub fn use_thread(&mut self, thread: &mut FrozenThread) -> Result<()> {
        let pid = self.inj.pid;
        ptrace::set_sigmask(thread.tid, !0).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        thread.injected = true;
        self.inj = Injector::new(pid, thread.tid, self.syscall_ip, thread.regs);
        Ok(())
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let pid = self.inj.pid;
        self.mem
            .read_exact_at(buf, self.scratch.0 + off)
            .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem").into(), err: e })
    }

    pub fn read_u64(&self, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Removes the scratch page.
    pub fn finish(mut self) -> Result<()> {
        self.open = false;
        self.inj
            .call("munmap", libc::SYS_munmap, [self.scratch.0, SCRATCH_LEN, 0, 0, 0, 0])
            .map(drop)
    }
}

impl Drop for Parasite {
    fn drop(&mut self) {
        if self.open {
            let _ = self.inj.raw(libc::SYS_munmap, [self.scratch.0, SCRATCH_LEN, 0, 0, 0, 0]);
        }
    }
}

/// A `syscall` instruction in the target: in its vDSO, else in any executable mapping.
fn find_syscall_in_target(pid: Pid, mem: &File) -> Result<u64> {
    let (path, text) = procfs::read_text(pid, "maps")?;
    let maps = procfs::parse_smaps(&text).map_err(|what| Error::ProcParse { pid, path, what })?;
    let mut candidates: Vec<&procfs::MapEntry> = maps.iter().filter(|m| m.exec).collect();
    candidates.sort_by_key(|m| m.name != "[vdso]");
    for m in candidates {
        let mut buf = vec![0u8; (m.end - m.start).min(1 << 20) as usize];
        if mem.read_exact_at(&mut buf, m.start).is_ok() {
            if let Some(ip) = find_syscall_insn(&buf, m.start) {
                return Ok(ip);
            }
        }
    }
    Err(Error::Unsupported { pid, what: "a process without any syscall instruction mapped".into() })
}
