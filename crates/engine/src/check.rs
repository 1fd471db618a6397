//! Probes of every kernel feature stasis relies on, for `stasis check`.
//!
//! Each probe exercises the feature for real where that is cheap and harmless: the ptrace
//! family and the remote-access calls run against a forked child that only waits for
//! signals (killed and reaped at the end), `clone3` with `set_tid` creates a child at a
//! chosen free PID that exits at once, `PAGEMAP_SCAN` and guard regions run on our own
//! memory. Nothing here changes the state of any other process.
//!
//! The result is a list of [`Check`]s in a fixed order; presenting them is the caller's
//! business. The text parsers (`/proc/self/maps`, capability masks, XCR0) are pure and
//! unit-tested.

use serde::Serialize;
use stasis_sys::pagemap::{self, ScanQuery};
use stasis_sys::probe;
use stasis_sys::ptrace::{self, WaitStatus};
use stasis_sys::{cpu, Pid, RemoteAddr, RemoteFd};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Whether a probed feature works here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Present,
    Missing,
}

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable key, for programs.
    pub id: &'static str,
    /// What was probed, for people.
    pub name: &'static str,
    pub status: Status,
    /// Without it, dump or restore of ordinary processes cannot work.
    pub essential: bool,
    /// What the probe found (sizes, addresses) or the error it got.
    pub detail: String,
    /// What will not work without the feature.
    pub without: &'static str,
}

impl Check {
    pub fn present(&self) -> bool {
        self.status == Status::Present
    }
}

/// Runs every probe, in a fixed order.
pub fn run_checks() -> Vec<Check> {
    let mut out = ptrace_checks();
    out.push(pagemap_scan_check());
    out.push(clone3_check());
    out.push(mm_map_check());
    out.push(userfaultfd_check());
    out.push(guard_check());
    out.push(sys_resource_check());
    out.push(vdso_check());
    out.push(xsave_check());
    out
}

/// True when every essential check passed.
pub fn essentials_present(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.present() || !c.essential)
}

struct Spec {
    id: &'static str,
    name: &'static str,
    essential: bool,
    without: &'static str,
}

impl Spec {
    fn result(&self, r: Result<String, String>) -> Check {
        let (status, detail) = match r {
            Ok(d) => (Status::Present, d),
            Err(d) => (Status::Missing, d),
        };
        Check {
            id: self.id,
            name: self.name,
            status,
            essential: self.essential,
            detail,
            without: self.without,
        }
    }
}

const SEIZE: Spec = Spec {
    id: "ptrace_seize",
    name: "ptrace PTRACE_SEIZE + PTRACE_INTERRUPT",
    essential: true,
    without: "no process can be frozen: neither dump nor restore works",
};
const XSTATE: Spec = Spec {
    id: "ptrace_xstate",
    name: "PTRACE_GETREGSET NT_X86_XSTATE",
    essential: true,
    without: "vector registers (SSE/AVX/AVX-512/AMX) cannot be saved or restored",
};
const SIGSTATE: Spec = Spec {
    id: "ptrace_signals",
    name: "PTRACE_GETSIGMASK + PTRACE_PEEKSIGINFO",
    essential: true,
    without: "blocked masks and pending signals cannot be saved",
};
const RSEQ: Spec = Spec {
    id: "ptrace_rseq",
    name: "PTRACE_GET_RSEQ_CONFIGURATION",
    essential: true,
    without: "glibc's per-thread rseq areas cannot be found: restored threads would crash",
};
const VM_READV: Spec = Spec {
    id: "process_vm_readv",
    name: "process_vm_readv",
    essential: true,
    without: "memory is read through /proc/PID/mem only (slower dumps)",
};
const PROC_MEM: Spec = Spec {
    id: "proc_pid_mem",
    name: "/proc/PID/mem",
    essential: true,
    without: "pages without read permission (PROT_NONE, write-only) cannot be dumped",
};
const PIDFD: Spec = Spec {
    id: "pidfd_getfd",
    name: "pidfd_open + pidfd_getfd",
    essential: true,
    without: "the target's file descriptors cannot be inspected from outside",
};
const KCMP: Spec = Spec {
    id: "kcmp",
    name: "kcmp(KCMP_FILE)",
    essential: true,
    without: "descriptors that share one open file cannot be told apart from copies",
};
const SCAN: Spec = Spec {
    id: "pagemap_scan",
    name: "PAGEMAP_SCAN ioctl on /proc/PID/pagemap",
    essential: true,
    without: "dump cannot find which pages exist and would copy untouched memory",
};
const CLONE3: Spec = Spec {
    id: "clone3_set_tid",
    name: "clone3 with set_tid (privileged)",
    essential: true,
    without: "processes cannot get their original PIDs back: restore is impossible",
};
const MM_MAP: Spec = Spec {
    id: "pr_set_mm_map",
    name: "prctl PR_SET_MM_MAP",
    essential: true,
    without: "brk, argument/environment area, auxv and exe link cannot be restored",
};
const UFFD: Spec = Spec {
    id: "userfaultfd_wp_async",
    name: "userfaultfd with UFFD_FEATURE_WP_ASYNC",
    essential: false,
    without: "no dirty-page tracking: incremental and live (pre-copy) dumps, lazy restore",
};
const GUARD: Spec = Spec {
    id: "madv_guard_install",
    name: "MADV_GUARD_INSTALL guard regions",
    essential: false,
    without: "processes using guard regions cannot be restored (and may not be seen on dump)",
};
const SYS_RESOURCE: Spec = Spec {
    id: "cap_sys_resource",
    name: "CAP_SYS_RESOURCE",
    essential: false,
    without: "restore cannot raise a hard rlimit above stasis's own, nor set rlimits of \
              processes of another uid; single PR_SET_MM fields are refused (stasis uses \
              PR_SET_MM_MAP, which does not need it)",
};
const VDSO: Spec = Spec {
    id: "vdso_layout",
    name: "vDSO layout ([vvar], [vvar_vclock], [vdso])",
    essential: true,
    without: "the vDSO cannot be moved to its saved address: clock_gettime would break",
};
const XSAVE: Spec = Spec {
    id: "xsave",
    name: "XSAVE features (XCR0)",
    essential: true,
    without: "no extended register state: images cannot be matched to this CPU",
};

/// The probe child: killed and reaped on drop.
struct IdleChild(Pid);

impl Drop for IdleChild {
    fn drop(&mut self) {
        let _ = stasis_sys::proc::kill(self.0, libc::SIGKILL);
        let _ = ptrace::waitpid(self.0, libc::__WALL);
    }
}

fn err(op: &str, e: impl std::fmt::Display) -> String {
    format!("{op}: {e}")
}

/// Every probe that needs another process, run against one idle forked child.
fn ptrace_checks() -> Vec<Check> {
    let specs = [
        &SEIZE, &XSTATE, &SIGSTATE, &RSEQ, &VM_READV, &PROC_MEM, &PIDFD, &KCMP,
    ];
    // Known content at a known address, inherited by the child through fork.
    let marker: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let devnull = match File::open("/dev/null") {
        Ok(f) => f,
        Err(e) => {
            let why = err("open /dev/null", e);
            return specs.iter().map(|s| s.result(Err(why.clone()))).collect();
        }
    };
    let child = match probe::fork_idle_child() {
        Ok(p) => IdleChild(p),
        Err(e) => {
            let why = err("fork a probe child", e);
            return specs.iter().map(|s| s.result(Err(why.clone()))).collect();
        }
    };
    let pid = child.0;
    let seized = seize_and_stop(pid);
    let mut out = vec![SEIZE.result(seized.clone())];
    let stopped = seized.is_ok();
    let need_stop = |r: Result<String, String>| {
        if stopped {
            r
        } else {
            Err("not probed: the child could not be seized".to_string())
        }
    };
    out.push(XSTATE.result(need_stop(probe_xstate(pid))));
    out.push(SIGSTATE.result(need_stop(probe_signals(pid))));
    out.push(RSEQ.result(need_stop(probe_rseq(pid))));
    let addr = RemoteAddr(marker.as_ptr() as u64);
    out.push(VM_READV.result(probe_vm_readv(pid, addr, &marker)));
    out.push(PROC_MEM.result(need_stop(probe_proc_mem(pid, addr, &marker))));
    let fd = RemoteFd(devnull.as_raw_fd());
    out.push(PIDFD.result(probe_pidfd(pid, fd)));
    out.push(KCMP.result(probe_kcmp(pid, fd)));
    drop(child);
    out
}

fn seize_and_stop(pid: Pid) -> Result<String, String> {
    ptrace::seize(pid, ptrace::PTRACE_O_EXITKILL).map_err(|e| err("PTRACE_SEIZE", e))?;
    ptrace::interrupt(pid).map_err(|e| err("PTRACE_INTERRUPT", e))?;
    match ptrace::waitpid(pid, libc::__WALL).map_err(|e| err("waitpid", e))? {
        WaitStatus::Stopped(_, _, ptrace::PTRACE_EVENT_STOP) => {}
        other => return Err(format!("expected a PTRACE_EVENT_STOP, got {other:?}")),
    }
    let regs = ptrace::get_regs(pid).map_err(|e| err("PTRACE_GETREGSET NT_PRSTATUS", e))?;
    let mut detail = format!("seized and stopped a forked child (rip {:#x})", regs.rip);
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        detail.push_str(&format!("; yama ptrace_scope {}", s.trim()));
    }
    Ok(detail)
}

fn probe_xstate(pid: Pid) -> Result<String, String> {
    let want = cpu::xsave_size();
    let got = ptrace::get_regset(pid, ptrace::NT_X86_XSTATE, want)
        .map_err(|e| err("PTRACE_GETREGSET NT_X86_XSTATE", e))?;
    if got.len() != want {
        return Err(format!(
            "the kernel gave {} bytes of XSAVE state, CPUID says {want}: saved state would not \
             match this CPU's layout",
            got.len()
        ));
    }
    Ok(format!("{want} bytes, as CPUID leaf 0xD reports"))
}

fn probe_signals(pid: Pid) -> Result<String, String> {
    let mask = ptrace::get_sigmask(pid).map_err(|e| err("PTRACE_GETSIGMASK", e))?;
    let own = ptrace::peek_siginfo(pid, false).map_err(|e| err("PTRACE_PEEKSIGINFO", e))?;
    let shared =
        ptrace::peek_siginfo(pid, true).map_err(|e| err("PTRACE_PEEKSIGINFO (shared)", e))?;
    Ok(format!(
        "blocked mask {mask:#x}, {} thread and {} process signals pending",
        own.len(),
        shared.len()
    ))
}

fn probe_rseq(pid: Pid) -> Result<String, String> {
    let c = ptrace::get_rseq_config(pid).map_err(|e| err("PTRACE_GET_RSEQ_CONFIGURATION", e))?;
    if c.rseq_abi_pointer == 0 {
        Ok("works; the probe child has no rseq area registered".into())
    } else {
        Ok(format!(
            "rseq area {:#x}, {} bytes, signature {:#x}",
            c.rseq_abi_pointer, c.rseq_abi_size, c.signature
        ))
    }
}

fn probe_vm_readv(pid: Pid, addr: RemoteAddr, marker: &[u8]) -> Result<String, String> {
    let mut buf = vec![0u8; marker.len()];
    let range = stasis_sys::mem::RemoteRange {
        addr,
        len: buf.len(),
    };
    let n = stasis_sys::mem::process_vm_readv(pid, &mut buf, &[range])
        .map_err(|e| err("process_vm_readv", e))?;
    if n != marker.len() || buf != marker {
        return Err(format!(
            "read {n} bytes that do not match the child's memory"
        ));
    }
    Ok(format!("read {n} bytes of the child's memory"))
}

fn probe_proc_mem(pid: Pid, addr: RemoteAddr, marker: &[u8]) -> Result<String, String> {
    let path = format!("/proc/{pid}/mem");
    let f = File::open(&path).map_err(|e| err(&format!("open {path}"), e))?;
    let mut buf = vec![0u8; marker.len()];
    f.read_exact_at(&mut buf, addr.0)
        .map_err(|e| err(&format!("read {path}"), e))?;
    if buf != marker {
        return Err(format!(
            "{path} returned bytes that do not match the child's memory"
        ));
    }
    Ok(format!("read {} bytes of the stopped child", buf.len()))
}

fn probe_pidfd(pid: Pid, fd: RemoteFd) -> Result<String, String> {
    let pidfd = stasis_sys::proc::pidfd_open(pid).map_err(|e| err("pidfd_open", e))?;
    let dup = stasis_sys::proc::pidfd_getfd(&pidfd, fd).map_err(|e| err("pidfd_getfd", e))?;
    Ok(format!(
        "duplicated the child's fd {fd} as our fd {}",
        dup.as_raw_fd()
    ))
}

fn probe_kcmp(pid: Pid, fd: RemoteFd) -> Result<String, String> {
    let me = stasis_sys::proc::getpid();
    let same = stasis_sys::proc::kcmp_same_file(pid, fd, me, fd).map_err(|e| err("kcmp", e))?;
    if !same {
        return Err("kcmp does not see an inherited descriptor as the same open file".into());
    }
    Ok("an inherited descriptor compares equal".into())
}

fn pagemap_scan_check() -> Check {
    SCAN.result(probe_pagemap_scan())
}

fn probe_pagemap_scan() -> Result<String, String> {
    let f = File::open("/proc/self/pagemap").map_err(|e| err("open /proc/self/pagemap", e))?;
    let region = probe::ProbeRegion::map(4).map_err(|e| err("mmap", e))?;
    region.touch(1).map_err(|e| err("touch", e))?;
    let q = ScanQuery {
        mask: pagemap::PAGE_IS_PRESENT,
        return_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_WRITTEN,
        ..Default::default()
    };
    let mut found = Vec::new();
    let end = region.addr() + region.len() as u64;
    pagemap::scan(&f, region.addr(), end, q, &mut found).map_err(|e| {
        if e.0 == libc::ENOTTY || e.0 == libc::EINVAL {
            format!("not supported by this kernel (Linux 6.7+ needed): {e}")
        } else {
            err("PAGEMAP_SCAN", e)
        }
    })?;
    let page = region.addr() + stasis_sys::PAGE_SIZE;
    let hit = found.iter().any(|r| r.start <= page && page < r.end);
    if !hit {
        return Err("the scan did not report a page that was just written".into());
    }
    Ok("found the one written page of a 4-page probe mapping".into())
}

fn clone3_check() -> Check {
    CLONE3.result(probe_clone3())
}

fn probe_clone3() -> Result<String, String> {
    let e = probe::clone3_invalid_call();
    if e.0 == libc::ENOSYS {
        return Err("the kernel has no clone3 (Linux 5.5+ needed for set_tid)".into());
    }
    let caps = read_caps().map_err(|e| err("read /proc/self/status", e))?;
    if !has_cap(caps.effective, CAP_SYS_ADMIN) && !has_cap(caps.effective, CAP_CHECKPOINT_RESTORE) {
        return Err(
            "clone3 exists, but neither CAP_SYS_ADMIN nor CAP_CHECKPOINT_RESTORE is \
                    effective: set_tid is refused"
                .into(),
        );
    }
    let last = read_number("/proc/sys/kernel/ns_last_pid").unwrap_or(1000);
    let max = read_number("/proc/sys/kernel/pid_max").unwrap_or(32768);
    let mut last_err = String::from("no free PID found");
    for cand in free_pid_candidates(last, max).take(8) {
        if std::path::Path::new(&format!("/proc/{cand}")).exists() {
            continue;
        }
        match probe::fork_exiting_child_at(Pid(cand as i32)) {
            Ok(child) => {
                let _ = ptrace::waitpid(child, 0);
                if child.0 as u64 != cand {
                    return Err(format!("asked for PID {cand}, got {child}"));
                }
                return Ok(format!("created a child at the chosen PID {cand}"));
            }
            Err(e) if e.0 == libc::EEXIST => {
                last_err = format!("PID {cand} taken meanwhile");
                continue;
            }
            Err(e) => return Err(err("clone3 with set_tid", e)),
        }
    }
    Err(last_err)
}

/// PIDs likely to be free: a little ahead of the last one handed out, wrapping below
/// `pid_max` and skipping the low range the kernel reserves after a wrap.
fn free_pid_candidates(last: u64, max: u64) -> impl Iterator<Item = u64> {
    let span = max.saturating_sub(301).max(1);
    (0..64u64).map(move |i| 300 + (last + 5000 + i * 97).saturating_sub(300) % span)
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn mm_map_check() -> Check {
    MM_MAP.result(
        probe::prctl_mm_map_size()
            .map(|n| format!("struct prctl_mm_map is {n} bytes"))
            .map_err(|e| err("PR_SET_MM_MAP_SIZE", e)),
    )
}

const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

fn userfaultfd_check() -> Check {
    UFFD.result(match probe::userfaultfd_features() {
        Err(e) => Err(err("userfaultfd", e)),
        Ok(f) if f & UFFD_FEATURE_WP_ASYNC == 0 => Err(format!(
            "userfaultfd works, but without WP_ASYNC (features {f:#x})"
        )),
        Ok(f) => Ok(format!("features {f:#x}")),
    })
}

fn guard_check() -> Check {
    GUARD.result(probe_guard())
}

fn probe_guard() -> Result<String, String> {
    let region = probe::ProbeRegion::map(4).map_err(|e| err("mmap", e))?;
    region.touch(0).map_err(|e| err("touch", e))?;
    region.install_guard(2).map_err(|e| {
        if e.0 == libc::EINVAL {
            format!("not supported by this kernel (Linux 6.13+ needed): {e}")
        } else {
            err("madvise(MADV_GUARD_INSTALL)", e)
        }
    })?;
    let f = File::open("/proc/self/pagemap").map_err(|e| err("open /proc/self/pagemap", e))?;
    let q = ScanQuery {
        mask: pagemap::PAGE_IS_GUARD,
        return_mask: pagemap::PAGE_IS_GUARD,
        ..Default::default()
    };
    let mut found = Vec::new();
    let end = region.addr() + region.len() as u64;
    let guard = region.addr() + 2 * stasis_sys::PAGE_SIZE;
    match pagemap::scan(&f, region.addr(), end, q, &mut found) {
        Ok(()) if found.iter().any(|r| r.start <= guard && guard < r.end) => {
            Ok("installed a guard page; PAGEMAP_SCAN reports it (PAGE_IS_GUARD)".into())
        }
        Ok(()) => Err(
            "guard pages work, but PAGEMAP_SCAN does not report them: dump cannot \
                       see guard regions"
                .into(),
        ),
        Err(e) => Err(format!(
            "guard pages work, but PAGEMAP_SCAN cannot look for them (Linux 6.15+ needed): {e}"
        )),
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Capability sets from `/proc/self/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Caps {
    effective: u64,
    bounding: u64,
}

fn has_cap(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

fn parse_caps(status: &str) -> Option<Caps> {
    let field = |name: &str| {
        status.lines().find_map(|l| {
            let v = l.strip_prefix(name)?.strip_prefix(':')?;
            u64::from_str_radix(v.trim(), 16).ok()
        })
    };
    Some(Caps {
        effective: field("CapEff")?,
        bounding: field("CapBnd")?,
    })
}

fn read_caps() -> Result<Caps, String> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    parse_caps(&s).ok_or_else(|| "no CapEff/CapBnd lines".to_string())
}

fn sys_resource_check() -> Check {
    SYS_RESOURCE.result(match read_caps() {
        Err(e) => Err(err("read /proc/self/status", e)),
        Ok(c) if has_cap(c.effective, CAP_SYS_RESOURCE) => Ok("in the effective set".into()),
        Ok(c) if !has_cap(c.bounding, CAP_SYS_RESOURCE) => {
            Err("not in the effective set, and dropped from the bounding set".into())
        }
        Ok(_) => Err("not in the effective set".into()),
    })
}

/// One kernel-provided mapping found in a maps file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialRegion {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// The `[vvar]`, `[vvar_vclock]` and `[vdso]` lines of a `/proc/PID/maps` text, in address
/// order.
pub fn parse_vdso_regions(maps: &str) -> Vec<SpecialRegion> {
    let mut out: Vec<SpecialRegion> = maps
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let name = it.nth(4)?;
            if !matches!(name, "[vvar]" | "[vvar_vclock]" | "[vdso]") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(SpecialRegion {
                name: name.to_string(),
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
            })
        })
        .collect();
    out.sort_by_key(|r| r.start);
    out
}

fn vdso_check() -> Check {
    VDSO.result(probe_vdso())
}

fn probe_vdso() -> Result<String, String> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| err("read /proc/self/maps", e))?;
    let regions = parse_vdso_regions(&maps);
    if !regions.iter().any(|r| r.name == "[vdso]") {
        return Err("no [vdso] mapping in /proc/self/maps".into());
    }
    let contiguous = regions.windows(2).all(|w| w[0].end == w[1].start);
    let parts: Vec<String> = regions
        .iter()
        .map(|r| format!("{} {} KiB", r.name, (r.end - r.start) / 1024))
        .collect();
    Ok(format!(
        "{}{}",
        parts.join(", "),
        if contiguous {
            " (one contiguous block)"
        } else {
            " (not contiguous)"
        }
    ))
}

/// Names of the XSAVE state components enabled in `xcr0`, in bit order.
pub fn xsave_components(xcr0: u64) -> Vec<&'static str> {
    const NAMES: [(u32, &str); 14] = [
        (0, "x87"),
        (1, "SSE"),
        (2, "AVX"),
        (3, "MPX-BNDREGS"),
        (4, "MPX-BNDCSR"),
        (5, "AVX-512-opmask"),
        (6, "AVX-512-ZMM_Hi256"),
        (7, "AVX-512-Hi16_ZMM"),
        (9, "PKRU"),
        (11, "CET-U"),
        (14, "UINTR"),
        (17, "AMX-TILECFG"),
        (18, "AMX-TILEDATA"),
        (19, "APX"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| xcr0 & (1u64 << bit) != 0)
        .map(|&(_, n)| n)
        .collect()
}

fn xsave_check() -> Check {
    let xcr0 = cpu::xcr0();
    XSAVE.result(if xcr0 & 0b11 != 0b11 {
        Err(format!("XSAVE is not enabled by the OS (xcr0 {xcr0:#x})"))
    } else {
        Ok(format!(
            "xcr0 {xcr0:#x}: {}; XSAVE area {} bytes",
            xsave_components(xcr0).join(" "),
            cpu::xsave_size()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7ffd1b1f0000-7ffd1b211000 rw-p 00000000 00:00 0                          [stack]
7f4492c3d000-7f4492c3f000 r-xp 00000000 00:00 0                          [vdso]
7f4492c37000-7f4492c3b000 r--p 00000000 00:00 0                          [vvar]
7f4492c3b000-7f4492c3d000 r--p 00000000 00:00 0                          [vvar_vclock]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn vdso_regions_in_address_order() {
        let r = parse_vdso_regions(MAPS);
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["[vvar]", "[vvar_vclock]", "[vdso]"]);
        assert_eq!(r[0].end - r[0].start, 0x4000);
        assert_eq!(r[2].start, 0x7f4492c3d000);
        assert!(parse_vdso_regions("garbage\n\n1-2 r\n").is_empty());
    }

    #[test]
    fn capability_masks() {
        let s = "Name:\tx\nCapInh:\t0\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        let c = parse_caps(s).unwrap();
        assert!(has_cap(c.effective, CAP_SYS_ADMIN));
        assert!(!has_cap(c.effective, CAP_SYS_RESOURCE));
        assert!(has_cap(c.effective, CAP_CHECKPOINT_RESTORE));
        assert_eq!(parse_caps("CapEff:\tzz\n"), None);
    }

    #[test]
    fn xcr0_components() {
        assert_eq!(xsave_components(0x7), ["x87", "SSE", "AVX"]);
        let amx = xsave_components(0x602e7);
        assert!(amx.contains(&"AMX-TILEDATA") && amx.contains(&"PKRU"));
    }

    #[test]
    fn pid_candidates_stay_in_range() {
        for (last, max) in [
            (100, 32768),
            (32760, 32768),
            (4_194_000, 4_194_304),
            (0, 400),
        ] {
            for c in free_pid_candidates(last, max).take(16) {
                assert!((300..max).contains(&c), "{c} out of range for max {max}");
            }
        }
    }

    #[test]
    fn every_probe_reports() {
        let checks = run_checks();
        let mut ids: Vec<&str> = checks.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), 16);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 16, "ids must be unique");
        assert!(checks.iter().all(|c| !c.detail.is_empty()));
    }
}
