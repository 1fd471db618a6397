//! `stasis show`: what an image holds, for a person or (with `--json`) for a program.
//!
//! The JSON document is built from report types defined here, not from the image records,
//! so that it stays stable while the records evolve. Addresses are hex strings (`"0x..."`,
//! exact where JSON numbers are not); sizes and counts are numbers. `schema` is raised on
//! any incompatible change.

use crate::{names, util};
use anyhow::Result;
use serde::Serialize;
use stasis_image::{FdKind, Image, ImageReader, ProcessRecord, ThreadRecord, Vma, VmaBacking};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// Directory holding the image.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print a JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also check every page-data block against its checksum.
    #[arg(long)]
    pub verify: bool,
}

pub const SCHEMA: u32 = 1;

#[derive(Serialize, Debug)]
pub struct ShowReport {
    pub schema: u32,
    pub image: ImageSummary,
    pub host: HostReport,
    pub processes: Vec<ProcessReport>,
    /// Memory objects (shared anonymous memory, memfd, deleted tmpfs files), each saved
    /// once; mappings and descriptors name them as `object ID`.
    pub memory_objects: Vec<ObjectReport>,
}

#[derive(Serialize, Debug)]
pub struct ObjectReport {
    pub id: u64,
    /// `anonymous`, `memfd` or `deleted-file`
    pub kind: &'static str,
    /// The memfd name or the file's path.
    pub name: Option<String>,
    pub size: u64,
    pub mode: String,
    pub seals: u32,
    pub saved_bytes: u64,
    pub data_offset: u64,
}

#[derive(Serialize, Debug)]
pub struct ImageSummary {
    pub path: String,
    pub format_version: u32,
    pub stasis_version: String,
    pub created_unix_ms: u64,
    pub file_bytes: u64,
    pub page_data_bytes: u64,
    pub metadata_bytes: u64,
    pub page_blocks: usize,
    pub root_pid: i32,
    pub shell_job: bool,
    /// `true`/`false` after `--verify`, absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_verified: Option<bool>,
}

#[derive(Serialize, Debug)]
pub struct HostReport {
    pub kernel_release: String,
    pub machine: String,
    pub cpu_model: String,
    pub xcr0: String,
    pub xsave_features: Vec<&'static str>,
    pub xsave_size: u32,
    pub page_size: u64,
    pub vdso_layout: Vec<SpecialReport>,
    pub vdso_hash: String,
}

#[derive(Serialize, Debug)]
pub struct SpecialReport {
    pub name: String,
    pub size: u64,
    /// Offset from the start of the first special mapping.
    pub offset: u64,
}

#[derive(Serialize, Debug)]
pub struct ProcessReport {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub exe: String,
    pub cwd: String,
    pub root: String,
    pub umask: String,
    /// What it shares with its parent: "descriptor table" (CLONE_FILES), "fs" (cwd,
    /// root and umask: CLONE_FS); absent when nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_with_parent: Vec<&'static str>,
    pub creds: CredsReport,
    pub no_new_privs: bool,
    /// personality(2) flags.
    pub personality: String,
    pub rlimits: Vec<RlimitReport>,
    pub memory: MemoryReport,
    pub mappings: Vec<MappingReport>,
    pub files: Vec<FileReport>,
    pub threads: Vec<ThreadReport>,
    pub signals: SignalsReport,
}

#[derive(Serialize, Debug)]
pub struct CredsReport {
    /// real, effective, saved, filesystem
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
}

#[derive(Serialize, Debug)]
pub struct RlimitReport {
    pub resource: String,
    /// `null` means unlimited.
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct MemoryReport {
    pub mappings: usize,
    pub mapped_bytes: u64,
    /// Bytes of pages restore fills, shared ones included.
    pub saved_bytes: u64,
    /// Of `saved_bytes`, the pages stored once for several mappings (shared copy-on-write
    /// after a fork) whose copy belongs to an earlier mapping.
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_bytes: u64,
    pub start_code: String,
    pub end_code: String,
    pub start_data: String,
    pub end_data: String,
    pub start_brk: String,
    pub brk: String,
    pub start_stack: String,
    pub arg_start: String,
    pub arg_end: String,
    pub env_start: String,
    pub env_end: String,
    pub auxv_entries: usize,
    pub xcomp_perm: String,
}

#[derive(Serialize, Debug)]
pub struct MappingReport {
    pub start: String,
    pub end: String,
    pub size: u64,
    /// As in /proc/PID/maps: `r-xp`.
    pub prot: String,
    /// `anonymous`, `file` or `special`.
    pub kind: &'static str,
    /// File path, or the special mapping's name (`[vdso]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub file_offset: u64,
    pub saved_bytes: u64,
    /// Of `saved_bytes`, the pages whose copy belongs to an earlier mapping.
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_bytes: u64,
    pub saved_runs: usize,
    /// Where the mapping's own saved bytes start in the page data.
    pub data_offset: u64,
    pub guard_bytes: u64,
    pub flags: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct FileReport {
    pub fd: i32,
    /// `file`, `chardev` or `tty`.
    pub kind: &'static str,
    pub path: String,
    pub flags: String,
    pub flags_raw: i32,
    /// File position, for regular files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    pub cloexec: bool,
    /// A lower descriptor sharing this one's open file description (a dup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_as: Option<i32>,
    /// File locks the process takes through this descriptor on restore, such as
    /// "posix write lock on bytes 0-9".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct ThreadReport {
    pub tid: i32,
    pub comm: String,
    pub rip: String,
    pub rsp: String,
    pub fs_base: String,
    pub gs_base: String,
    pub rax: String,
    pub orig_rax: String,
    /// Present when the thread was stopped inside a system call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<SyscallReport>,
    pub blocked: Vec<String>,
    pub blocked_raw: String,
    pub pending: Vec<String>,
    pub xstate_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rseq: Option<RseqReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub altstack: Option<AltStackReport>,
}

#[derive(Serialize, Debug)]
pub struct SyscallReport {
    pub nr: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'static str>,
    /// `rax` as a signed value: the pending return value, or the restart code.
    pub result: i64,
    /// What restore does with it, when `result` is a restart code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<&'static str>,
}

#[derive(Serialize, Debug)]
pub struct RseqReport {
    pub addr: String,
    pub len: u32,
    pub sig: String,
}

#[derive(Serialize, Debug)]
pub struct AltStackReport {
    pub sp: String,
    pub size: u64,
    pub flags: i32,
}

#[derive(Serialize, Debug)]
pub struct SignalsReport {
    /// Signals whose disposition is not the default.
    pub handlers: Vec<HandlerReport>,
    /// Pending for the whole process.
    pub pending: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct HandlerReport {
    pub signal: String,
    pub number: i32,
    /// `SIG_IGN` or the handler's address.
    pub handler: String,
    pub flags: Vec<String>,
    pub mask: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Builds the report from a decoded image.
pub fn report(reader: &ImageReader, pages_verified: Option<bool>) -> ShowReport {
    let img = &reader.image;
    let h = &reader.header;
    ShowReport {
        schema: SCHEMA,
        image: ImageSummary {
            path: reader.path.display().to_string(),
            format_version: h.version,
            stasis_version: img.stasis_version.clone(),
            created_unix_ms: img.created_unix_ms,
            file_bytes: h.file_len(),
            page_data_bytes: h.pages_len,
            metadata_bytes: h.meta_len,
            page_blocks: img.page_block_hashes.len(),
            root_pid: img.root_pid,
            shell_job: img.shell_job,
            pages_verified,
        },
        host: host_report(img),
        processes: img.processes.iter().map(process_report).collect(),
        memory_objects: img.shmem.iter().map(object_report).collect(),
    }
}

fn object_report(r: &stasis_image::ShmemRecord) -> ObjectReport {
    let (kind, name) = match &r.kind {
        stasis_image::ShmemKind::Anonymous => ("anonymous", None),
        stasis_image::ShmemKind::Memfd { name } => ("memfd", Some(lossy(name))),
        stasis_image::ShmemKind::DeletedFile { path } => ("deleted-file", Some(lossy(path))),
    };
    ObjectReport {
        id: r.id,
        kind,
        name,
        size: r.size,
        mode: format!("{:o}", r.mode),
        seals: r.seals,
        saved_bytes: r.data_len(),
        data_offset: r.data_offset,
    }
}

fn host_report(img: &Image) -> HostReport {
    let host = &img.host;
    HostReport {
        kernel_release: host.kernel_release.clone(),
        machine: host.machine.clone(),
        cpu_model: host.cpu_model.clone(),
        xcr0: hex(host.xcr0),
        xsave_features: stasis_engine::check::xsave_components(host.xcr0),
        xsave_size: host.xsave_size,
        page_size: host.page_size,
        vdso_layout: host
            .vdso_layout
            .iter()
            .map(|s| SpecialReport {
                name: s.name.clone(),
                size: s.size,
                offset: s.offset,
            })
            .collect(),
        vdso_hash: format!("{:016x}", host.vdso_hash),
    }
}

fn process_report(p: &ProcessRecord) -> ProcessReport {
    let mm = &p.mm;
    let limit = |v: u64| if v == u64::MAX { None } else { Some(v) };
    ProcessReport {
        pid: p.pid,
        ppid: p.ppid,
        pgid: p.pgid,
        sid: p.sid,
        comm: p.comm.clone(),
        exe: mm.exe.display(),
        cwd: lossy(&p.cwd),
        root: lossy(&p.root),
        umask: format!("{:04o}", p.umask),
        shared_with_parent: [
            (p.vm_with_parent, "address space"),
            (p.sighand_with_parent, "signal handlers"),
            (p.files_with_parent, "descriptor table"),
            (p.fs_with_parent, "fs"),
        ]
            .into_iter()
            .filter_map(|(on, what)| on.then_some(what))
            .collect(),
        creds: CredsReport {
            uid: p.creds.uids,
            gid: p.creds.gids,
            groups: p.creds.groups.clone(),
        },
        no_new_privs: p.no_new_privs,
        personality: hex(p.personality as u64),
        rlimits: p
            .rlimits
            .iter()
            .map(|r| RlimitReport {
                resource: names::rlimit(r.resource),
                soft: limit(r.soft),
                hard: limit(r.hard),
            })
            .collect(),
        memory: MemoryReport {
            mappings: mm.vmas.len(),
            mapped_bytes: mm.vmas.iter().map(Vma::len).sum(),
            saved_bytes: mm.vmas.iter().map(Vma::saved_len).sum(),
            shared_bytes: mm.vmas.iter().map(|v| v.saved_len() - v.data_len()).sum(),
            start_code: hex(mm.start_code),
            end_code: hex(mm.end_code),
            start_data: hex(mm.start_data),
            end_data: hex(mm.end_data),
            start_brk: hex(mm.start_brk),
            brk: hex(mm.brk),
            start_stack: hex(mm.start_stack),
            arg_start: hex(mm.arg_start),
            arg_end: hex(mm.arg_end),
            env_start: hex(mm.env_start),
            env_end: hex(mm.env_end),
            auxv_entries: mm.auxv.len() / 2,
            xcomp_perm: hex(mm.xcomp_perm),
        },
        mappings: mm.vmas.iter().map(mapping_report).collect(),
        files: p.fds.iter().map(|f| file_report(f, &p.locks)).collect(),
        threads: p.threads.iter().map(thread_report).collect(),
        signals: SignalsReport {
            handlers: p
                .sigactions
                .iter()
                .filter(|a| a.handler != 0)
                .map(|a| HandlerReport {
                    signal: names::signal(a.sig),
                    number: a.sig,
                    handler: if a.handler == 1 {
                        "SIG_IGN".into()
                    } else {
                        hex(a.handler)
                    },
                    flags: names::sa_flags(a.flags),
                    mask: names::signal_set(a.mask),
                })
                .collect(),
            pending: p
                .shared_pending
                .iter()
                .map(|s| names::signal(s.signo()))
                .collect(),
        },
    }
}

fn mapping_report(v: &Vma) -> MappingReport {
    let (kind, path) = match &v.backing {
        VmaBacking::Anonymous => ("anonymous", None),
        VmaBacking::File(f) => ("file", Some(f.display())),
        VmaBacking::Special(name) => ("special", Some(name.clone())),
        VmaBacking::Shmem(id) => ("shmem", Some(format!("object {id}"))),
    };
    MappingReport {
        start: hex(v.start),
        end: hex(v.end),
        size: v.len(),
        prot: names::prot(v.prot, v.shared),
        kind,
        path,
        file_offset: v.file_offset,
        saved_bytes: v.saved_len(),
        shared_bytes: v.saved_len() - v.data_len(),
        saved_runs: v.pages.len(),
        data_offset: v.data_offset,
        guard_bytes: v.guards.iter().map(|g| g.len()).sum(),
        flags: names::vm_flags(v.flags),
    }
}

fn file_report(f: &stasis_image::FdRecord, locks: &[stasis_image::LockRecord]) -> FileReport {
    let (path, flags, offset) = match &f.kind {
        FdKind::File { file, flags, pos } => (file.display(), *flags, Some(*pos)),
        FdKind::CharDevice { path, flags, .. } | FdKind::Terminal { path, flags, .. } => {
            (lossy(path), *flags, None)
        }
        FdKind::Pipe { ino, write, flags } => {
            (format!("pipe:[{ino}] ({} end)", if *write { "write" } else { "read" }), *flags, None)
        }
        FdKind::Fifo { file, flags } => (file.display(), *flags, None),
        FdKind::Shmem { id, flags, pos } => (format!("object {id}"), *flags, Some(*pos)),
        FdKind::PtyMaster { index, flags } => (format!("/dev/ptmx (master of /dev/pts/{index})"), *flags, None),
        FdKind::PtySlave { index, flags } => (format!("/dev/pts/{index}"), *flags, None),
        FdKind::Signalfd { mask, flags } => (format!("signalfd (signals {})", signal_list(*mask)), *flags, None),
        FdKind::Eventfd { count, semaphore, flags } => {
            (format!("eventfd (count {count}{})", if *semaphore { ", semaphore" } else { "" }), *flags, None)
        }
        FdKind::Timerfd(t) => (
            format!(
                "timerfd (clock {}, next {} ns{}, interval {} ns, {} unread)",
                t.clockid,
                t.value_ns,
                if t.settime_flags & 1 != 0 { " absolute" } else { "" },
                t.interval_ns,
                t.ticks
            ),
            t.flags,
            None,
        ),
        FdKind::Epoll { flags, targets } => {
            let regs: Vec<String> =
                targets.iter().map(|t| format!("fd {} events {:#x} data {:#x}", t.fd, t.events, t.data)).collect();
            (format!("epoll [{}]", regs.join("; ")), *flags, None)
        }
    };
    FileReport {
        fd: f.fd,
        kind: f.kind.kind_name(),
        path,
        flags: names::open_flags(flags),
        flags_raw: flags,
        offset,
        cloexec: f.cloexec,
        same_as: f.same_as,
        locks: locks.iter().filter(|l| l.fd == f.fd).map(stasis_engine::locks::describe).collect(),
    }
}

/// Signal numbers of a mask (bit N-1: signal N), comma-separated.
fn signal_list(mask: u64) -> String {
    let sigs: Vec<String> = (0..64).filter(|b| mask & (1 << b) != 0).map(|b| (b + 1).to_string()).collect();
    sigs.join(",")
}

/// Register `name` of a thread record (0 if the record is short).
fn reg(t: &ThreadRecord, name: &str) -> u64 {
    stasis_sys::ptrace::UserRegs::NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| t.regs.get(i))
        .copied()
        .unwrap_or(0)
}

fn thread_report(t: &ThreadRecord) -> ThreadReport {
    let rax = reg(t, "rax");
    let orig = reg(t, "orig_rax");
    let syscall = (orig as i64 >= 0).then(|| SyscallReport {
        nr: orig as i64,
        name: names::syscall(orig as i64),
        result: rax as i64,
        restart: names::restart_state(rax as i64),
    });
    ThreadReport {
        tid: t.tid,
        comm: t.comm.clone(),
        rip: hex(reg(t, "rip")),
        rsp: hex(reg(t, "rsp")),
        fs_base: hex(reg(t, "fs_base")),
        gs_base: hex(reg(t, "gs_base")),
        rax: hex(rax),
        orig_rax: hex(orig),
        syscall,
        blocked: names::signal_set(t.sigmask),
        blocked_raw: hex(t.sigmask),
        pending: t.pending.iter().map(|s| names::signal(s.signo())).collect(),
        xstate_bytes: t.xstate.len(),
        rseq: t.rseq.map(|r| RseqReport {
            addr: hex(r.addr),
            len: r.len,
            sig: hex(r.sig as u64),
        }),
        altstack: (t.altstack.sp != 0 || t.altstack.size != 0).then(|| AltStackReport {
            sp: hex(t.altstack.sp),
            size: t.altstack.size,
            flags: t.altstack.flags,
        }),
    }
}

pub fn run(args: ShowArgs) -> Result<u8> {
    let reader = ImageReader::open(&args.dir)?;
    let verified = if args.verify {
        // A failed check is reported, not hidden; it also makes the command fail below.
        Some(
            reader
                .map_pages()
                .and_then(|m| reader.verify_pages(&m, 2))
                .map_err(|e| e.to_string()),
        )
    } else {
        None
    };
    let rep = report(&reader, verified.as_ref().map(|r| r.is_ok()));
    if args.json {
        util::print_out(&format!("{}\n", serde_json::to_string_pretty(&rep)?))?;
    } else {
        util::print_out(&text(&rep, &reader.image))?;
    }
    if let Some(Err(e)) = verified {
        anyhow::bail!("{e}");
    }
    Ok(0)
}

fn list_or(items: &[String], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items.join(" ")
    }
}

/// The text form of the report.
pub fn text(r: &ShowReport, img: &Image) -> String {
    let mut o = String::new();
    let i = &r.image;
    let _ = writeln!(
        o,
        "image    {} (format {}, stasis {}, created {})",
        i.path,
        i.format_version,
        i.stasis_version,
        util::utc_time(i.created_unix_ms)
    );
    let _ = writeln!(
        o,
        "         {}: page data {} in {} checksummed blocks, metadata {}{}{}",
        util::bytes(i.file_bytes),
        util::bytes(i.page_data_bytes),
        i.page_blocks,
        util::bytes(i.metadata_bytes),
        if i.shell_job {
            "; dumped with --shell-job"
        } else {
            ""
        },
        match i.pages_verified {
            Some(true) => "; page data verified",
            Some(false) => "; PAGE DATA CORRUPT",
            None => "",
        }
    );
    let h = &r.host;
    let _ = writeln!(
        o,
        "host     Linux {} {}, {}",
        h.kernel_release, h.machine, h.cpu_model
    );
    let vdso: Vec<String> = h
        .vdso_layout
        .iter()
        .map(|s| format!("{} {} at +{:#x}", s.name, util::bytes(s.size), s.offset))
        .collect();
    let _ = writeln!(
        o,
        "         xcr0 {} ({}), XSAVE area {} bytes, page size {}",
        h.xcr0,
        h.xsave_features.join(" "),
        h.xsave_size,
        h.page_size
    );
    let _ = writeln!(
        o,
        "         vDSO layout: {} (hash {})",
        if vdso.is_empty() {
            "none".to_string()
        } else {
            vdso.join(", ")
        },
        h.vdso_hash
    );
    for (p, rec) in r.processes.iter().zip(&img.processes) {
        process_text(&mut o, p, rec);
    }
    if !r.memory_objects.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "memory objects (saved once, shared by the mappings and descriptors naming them)");
        for m in &r.memory_objects {
            let _ = writeln!(
                o,
                "  object {:<3} {:<12} {:<24} size {}, mode {}, seals {:#x}, saved {}",
                m.id,
                m.kind,
                m.name.as_deref().unwrap_or("-"),
                util::bytes(m.size),
                m.mode,
                m.seals,
                util::bytes(m.saved_bytes)
            );
        }
    }
    o
}

fn process_text(o: &mut String, p: &ProcessReport, rec: &ProcessRecord) {
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "process  {} \"{}\" (ppid {}, pgid {}, sid {})",
        p.pid, p.comm, p.ppid, p.pgid, p.sid
    );
    let _ = writeln!(o, "  exe    {}", p.exe);
    let _ = writeln!(
        o,
        "  cwd    {}   root {}   umask {}",
        p.cwd, p.root, p.umask
    );
    if !p.shared_with_parent.is_empty() {
        let _ = writeln!(o, "  shares with its parent: {}", p.shared_with_parent.join(", "));
    }
    let c = &p.creds;
    let ids = |v: &[u32; 4]| v.iter().map(u32::to_string).collect::<Vec<_>>().join("/");
    let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
    let _ = writeln!(
        o,
        "  creds  uid {} gid {} (real/effective/saved/fs), groups {}",
        ids(&c.uid),
        ids(&c.gid),
        list_or(&groups, "none")
    );
    if p.no_new_privs || p.personality != "0x0" {
        let _ = writeln!(
            o,
            "  prctl  no_new_privs {}, personality {}",
            if p.no_new_privs { "set" } else { "unset" },
            p.personality
        );
    }
    let m = &p.memory;
    let _ = writeln!(
        o,
        "  memory {} mappings, {} mapped, {} saved{}; brk {}-{}, stack {}",
        m.mappings,
        util::bytes(m.mapped_bytes),
        util::bytes(m.saved_bytes),
        if m.shared_bytes > 0 { format!(" ({} of it shared with earlier processes)", util::bytes(m.shared_bytes)) } else { String::new() },
        m.start_brk,
        m.brk,
        m.start_stack
    );

    let _ = writeln!(o, "\n  mappings");
    let _ = writeln!(
        o,
        "    {:>16} {:<16} {:>9} {:<4} {:>9}  BACKING",
        "START", "END", "SIZE", "PROT", "SAVED"
    );
    for v in &p.mappings {
        let mut backing = match (&v.path, v.kind) {
            (Some(path), "file") => format!("{path} @{:#x}", v.file_offset),
            (Some(name), _) => name.clone(),
            (None, kind) => kind.to_string(),
        };
        if v.guard_bytes > 0 {
            let _ = write!(backing, " (guard {})", util::bytes(v.guard_bytes));
        }
        // Nearly every private mapping may be written; only the unusual flags say much.
        let flags: Vec<&str> = v
            .flags
            .iter()
            .map(String::as_str)
            .filter(|f| *f != "maywrite")
            .collect();
        if !flags.is_empty() {
            let _ = write!(backing, " [{}]", flags.join(","));
        }
        let saved = if v.saved_bytes == 0 {
            "-".to_string()
        } else {
            util::bytes(v.saved_bytes)
        };
        let _ = writeln!(
            o,
            "    {:>16}-{:<16} {:>9} {:<4} {:>9}  {}",
            v.start.trim_start_matches("0x"),
            v.end.trim_start_matches("0x"),
            util::bytes(v.size),
            v.prot,
            saved,
            backing
        );
    }

    let _ = writeln!(o, "\n  files");
    if p.files.is_empty() {
        let _ = writeln!(o, "    none");
    } else {
        let _ = writeln!(
            o,
            "    {:>4} {:<8} {:<36} {:>10}  PATH",
            "FD", "KIND", "FLAGS", "OFFSET"
        );
    }
    for f in &p.files {
        let flags = if f.cloexec && !f.flags.contains("O_CLOEXEC") {
            format!("{}|O_CLOEXEC", f.flags)
        } else {
            f.flags.clone()
        };
        let off = f
            .offset
            .map(|x| x.to_string())
            .unwrap_or_else(|| "-".into());
        let shared = f
            .same_as
            .map(|d| format!(" (same open file as fd {d})"))
            .unwrap_or_default();
        let shared = if f.locks.is_empty() {
            shared
        } else {
            format!("{shared} [{}]", f.locks.join(", "))
        };
        let _ = writeln!(
            o,
            "    {:>4} {:<8} {:<36} {:>10}  {}{shared}",
            f.fd, f.kind, flags, off, f.path
        );
    }

    let _ = writeln!(o, "\n  threads");
    for t in &p.threads {
        let _ = writeln!(
            o,
            "    {} \"{}\": rip {} rsp {} fs_base {} xstate {} bytes",
            t.tid, t.comm, t.rip, t.rsp, t.fs_base, t.xstate_bytes
        );
        match &t.syscall {
            Some(s) => {
                let name = s
                    .name
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("#{}", s.nr));
                let state = s.restart.map(|r| format!(": {r}")).unwrap_or_default();
                let _ = writeln!(
                    o,
                    "      in system call {name} (orig_rax {}), rax {}{state}",
                    s.nr, s.result
                );
            }
            None => {
                let _ = writeln!(o, "      in user space (rax {})", t.rax);
            }
        }
        let _ = writeln!(
            o,
            "      blocked {}; pending {}",
            list_or(&t.blocked, "none"),
            list_or(&t.pending, "none")
        );
        if let Some(r) = &t.rseq {
            let _ = writeln!(
                o,
                "      rseq {} ({} bytes, signature {})",
                r.addr, r.len, r.sig
            );
        }
        if let Some(a) = &t.altstack {
            let _ = writeln!(
                o,
                "      sigaltstack {} ({}, flags {})",
                a.sp,
                util::bytes(a.size),
                a.flags
            );
        }
    }

    let _ = writeln!(o, "\n  signals");
    if p.signals.handlers.is_empty() {
        let _ = writeln!(o, "    all dispositions are default");
    }
    for hd in &p.signals.handlers {
        let _ = writeln!(
            o,
            "    {:<12} {:<18} flags {}; mask {}",
            hd.signal,
            hd.handler,
            list_or(&hd.flags, "none"),
            list_or(&hd.mask, "none")
        );
    }
    let _ = writeln!(
        o,
        "    pending for the process: {}",
        list_or(&p.signals.pending, "none")
    );
    let limited: Vec<String> = rec
        .rlimits
        .iter()
        .filter(|r| r.soft != u64::MAX || r.hard != u64::MAX)
        .map(|r| {
            let v = |x: u64| {
                if x == u64::MAX {
                    "unlimited".to_string()
                } else {
                    x.to_string()
                }
            };
            format!("{} {}/{}", names::rlimit(r.resource), v(r.soft), v(r.hard))
        })
        .collect();
    let _ = writeln!(o, "\n  rlimits (soft/hard, unlimited ones omitted)");
    for l in limited {
        let _ = writeln!(o, "    {l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_image::*;

    /// A small image, written as JSON so that fields added to the records later (with
    /// `#[serde(default)]`) do not break it.
    fn sample() -> Image {
        let mut regs = stasis_sys::ptrace::UserRegs {
            rip: 0x401000,
            rsp: 0x7ffc0000,
            rax: (-516i64) as u64,
            orig_rax: 35,
            fs_base: 0x7f0000001000,
            ..Default::default()
        }
        .to_array()
        .to_vec();
        regs.truncate(27);
        let file = |path: &str| {
            serde_json::json!({"path": path, "dev": 1, "ino": 2, "mode": 0o100644,
                "size": 10, "mtime_ns": 0})
        };
        let mm = serde_json::json!({
            "start_code": 0x400000, "end_code": 0x401000, "start_data": 0,
            "end_data": 0, "start_brk": 0x500000, "brk": 0x521000,
            "start_stack": 0x7ffc0000u64, "arg_start": 0, "arg_end": 0,
            "env_start": 0, "env_end": 0, "auxv": [0, 0, 0, 0, 0, 0, 0, 0],
            "exe": file("/bin/x"), "xcomp_perm": 0,
            "vmas": [
                {"start": 0x400000, "end": 0x402000, "prot": PROT_READ | PROT_EXEC,
                 "shared": false, "flags": 0, "backing": {"File": file("/bin/x")},
                 "file_offset": 0, "pages": [{"addr": 0x401000, "npages": 1}],
                 "data_offset": 0, "guards": []},
                {"start": 0x500000, "end": 0x521000, "prot": PROT_READ | PROT_WRITE,
                 "shared": false, "flags": vmflags::GROWSDOWN, "backing": "Anonymous",
                 "file_offset": 0, "pages": [{"addr": 0x500000, "npages": 2}],
                 "data_offset": 4096, "guards": [{"addr": 0x520000, "npages": 1}]}
            ]
        });
        let thread = serde_json::json!({
            "tid": 100, "comm": "t", "regs": regs, "xstate": vec![0u8; 64],
            "sigmask": 1u64 << 9, "pending": [],
            "rseq": {"addr": 0x7f0000002000u64, "len": 32, "sig": 0x53053053},
            "robust_list": [0, 0], "clear_child_tid": 0,
            "altstack": {"sp": 0, "flags": 0, "size": 0}
        });
        let doc = serde_json::json!({
            "stasis_version": "0.1.0",
            "created_unix_ms": 0,
            "host": {
                "kernel_release": "6.18", "machine": "x86_64", "cpu_model": "cpu",
                "xcr0": 7, "xsave_size": 2432, "page_size": 4096,
                "vdso_layout": [{"name": "[vdso]", "size": 8192, "offset": 0x6000}],
                "vdso_hash": 1
            },
            "root_pid": 100,
            "shell_job": false,
            "processes": [{
                "pid": 100, "ppid": 1, "pgid": 100, "sid": 100, "comm": "x",
                "creds": {"uids": [0, 0, 0, 0], "gids": [0, 0, 0, 0], "groups": []},
                "cwd": "/", "root": "/", "umask": 0o22,
                "rlimits": [{"resource": 7, "soft": 1024, "hard": u64::MAX}],
                "sigactions": [
                    {"sig": 15, "handler": 0x401200, "flags": 0x1400_0004u64, "restorer": 0, "mask": 0},
                    {"sig": 13, "handler": 1, "flags": 0, "restorer": 0, "mask": 0},
                    {"sig": 2, "handler": 0, "flags": 0, "restorer": 0, "mask": 0}
                ],
                "shared_pending": [],
                "mm": mm,
                "fds": [{"fd": 1, "cloexec": true, "kind": {"File": {
                    "file": file("/tmp/log"), "flags": libc::O_WRONLY | libc::O_APPEND,
                    "pos": 5}}}],
                "threads": [thread]
            }],
            "page_block_size": 1 << 20,
            "page_block_hashes": [0]
        });
        serde_json::from_value(doc).expect("the sample image matches the records")
    }

    #[test]
    fn report_of_a_sample_image() {
        let img = sample();
        let p = process_report(&img.processes[0]);
        assert_eq!(p.memory.saved_bytes, 3 * 4096);
        assert_eq!(p.mappings[0].prot, "r-xp");
        assert_eq!(p.mappings[1].guard_bytes, 4096);
        assert_eq!(p.files[0].offset, Some(5));
        assert_eq!(p.files[0].flags, "O_WRONLY|O_APPEND");
        assert_eq!(p.signals.handlers.len(), 2);
        assert_eq!(p.signals.handlers[1].handler, "SIG_IGN");
        let t = &p.threads[0];
        let s = t.syscall.as_ref().unwrap();
        assert_eq!((s.nr, s.name, s.result), (35, Some("nanosleep"), -516));
        assert_eq!(t.blocked, ["SIGUSR1"]);
        assert_eq!(p.rlimits[0].hard, None);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["mappings"][1]["start"], "0x500000");
        assert_eq!(json["threads"][0]["rip"], "0x401000");
        assert_eq!(host_report(&img).xsave_features, ["x87", "SSE", "AVX"]);
    }

    #[test]
    fn text_mentions_everything() {
        let img = sample();
        let rep = ShowReport {
            schema: SCHEMA,
            image: ImageSummary {
                path: "/x/stasis.img".into(),
                format_version: 1,
                stasis_version: "0.1.0".into(),
                created_unix_ms: 0,
                file_bytes: 1,
                page_data_bytes: 1,
                metadata_bytes: 1,
                page_blocks: 1,
                root_pid: 100,
                shell_job: false,
                pages_verified: None,
            },
            host: host_report(&img),
            processes: img.processes.iter().map(process_report).collect(),
            memory_objects: Vec::new(),
        };
        let t = text(&rep, &img);
        for needle in [
            "process  100",
            "/tmp/log",
            "nanosleep",
            "ERESTART_RESTARTBLOCK",
            "SIGTERM",
            "SA_RESTART",
            "RLIMIT_NOFILE 1024/unlimited",
            "[vdso]",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
    }
}
