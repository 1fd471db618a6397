//! The metadata records of an image. New fields must be `#[serde(default)]` so that older
//! images keep decoding; removing or retyping a field needs a new format version.

use serde::{Deserialize, Serialize};

/// Everything an image holds apart from the page data itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub stasis_version: String,
    pub created_unix_ms: u64,
    pub host: HostInfo,
    pub root_pid: i32,
    /// The tree was dumped with `--shell-job`: terminals and an outside session are
    /// expected and are replaced by the restorer's own on restore.
    pub shell_job: bool,
    pub processes: Vec<ProcessRecord>,
    /// Pipes whose both ends are in the image, with the bytes sitting in their buffers.
    #[serde(default)]
    pub pipes: Vec<PipeRecord>,
    /// The tree lived in a PID namespace of its own: every PID in the image is the one the
    /// tree saw itself, and restore needs `--pidns`.
    #[serde(default)]
    pub pid_namespace: bool,
    /// Named pipes (FIFOs) open in the image, with the bytes sitting in their buffers.
    #[serde(default)]
    pub fifos: Vec<FifoRecord>,
    /// Memory objects mapped or held by the processes (shared anonymous memory, memfd,
    /// deleted tmpfs files), each saved once however many processes use it.
    #[serde(default)]
    pub shmem: Vec<ShmemRecord>,
    /// Pseudo-terminal pairs whose master is held in the image.
    #[serde(default)]
    pub ptys: Vec<PtyRecord>,
    /// Filled by the writer: page data is hashed in blocks of this many bytes.
    pub page_block_size: u64,
    pub page_block_hashes: Vec<u64>,
}

/// What restore needs to decide whether this machine can honour the image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct HostInfo {
    pub kernel_release: String,
    pub machine: String,
    pub cpu_model: String,
    /// XCR0 of the dumping CPU: the XSAVE components register state may use.
    pub xcr0: u64,
    pub xsave_size: u32,
    pub page_size: u64,
    /// The kernel's special mappings ([vvar], [vvar_vclock], [vdso]) in address order,
    /// with sizes, and a hash of the vDSO text.
    pub vdso_layout: Vec<SpecialMapping>,
    pub vdso_hash: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpecialMapping {
    pub name: String,
    pub size: u64,
    /// Offset from the start of the first special mapping: vDSO code addresses [vvar]
    /// data relative to itself, so the block only moves as a whole.
    #[serde(default)]
    pub offset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessRecord {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub creds: Creds,
    #[serde(with = "serde_bytes")]
    pub cwd: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub root: Vec<u8>,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (raw `siginfo_t`).
    pub shared_pending: Vec<SigInfo>,
    pub mm: MmRecord,
    pub fds: Vec<FdRecord>,
    pub threads: Vec<ThreadRecord>,
    /// prctl(PR_SET_NO_NEW_PRIVS) was set.
    #[serde(default)]
    pub no_new_privs: bool,
    /// personality(2) flags.
    #[serde(default)]
    pub personality: u32,
    /// A zombie: exited, not yet reaped by its parent; its raw wait status. A zombie has
    /// no memory, descriptors or threads.
    #[serde(default)]
    pub zombie_status: Option<i32>,
    /// File locks this process takes again on restore: its own POSIX record locks, and
    /// the flock and OFD locks of open file descriptions it holds (each description's
    /// locks recorded with one process only).
    #[serde(default)]
    pub locks: Vec<LockRecord>,
    /// The process's controlling terminal (none in images from before it was recorded).
    #[serde(default)]
    pub ctty: Option<ControllingTty>,
    /// Shares its descriptor table with its parent (it was cloned with CLONE_FILES): the
    /// restored parent clones it so again, and only the first process of such a chain
    /// installs the descriptors, which are then the same for all of them.
    #[serde(default)]
    pub files_with_parent: bool,
    /// Shares its cwd, root and umask with its parent (cloned with CLONE_FS), alike.
    #[serde(default)]
    pub fs_with_parent: bool,
    /// Shares its address space with its parent (cloned with CLONE_VM, without
    /// CLONE_THREAD): its memory is its parent's, whose record holds the mappings (this
    /// one's `mm.vmas` is empty). The restored parent clones it so again.
    #[serde(default)]
    pub vm_with_parent: bool,
    /// Shares its signal handlers with its parent (CLONE_SIGHAND, which needs
    /// `vm_with_parent`): its `sigactions` are its parent's.
    #[serde(default)]
    pub sighand_with_parent: bool,
    /// The signal its parent gets when it ends (`exit_signal` of clone; SIGCHLD for a
    /// fork). Absent in images from before it was recorded.
    #[serde(default)]
    pub exit_signal: Option<i32>,
}

/// A controlling terminal, as /proc/PID/stat shows it (tty_nr, tpgid).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControllingTty {
    /// The slave /dev/pts/N of a pair in the image (`Image::ptys`); `None`: a terminal
    /// outside the image, which --shell-job replaces by the restoring terminal.
    pub pty: Option<u32>,
    /// The terminal's foreground process group.
    pub fg_pgrp: i32,
}

/// One file lock, held through descriptor `fd` of the process whose record lists it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockRecord {
    pub fd: i32,
    pub kind: LockKind,
    /// A write (exclusive) lock; else a read (shared) one.
    pub write: bool,
    /// Byte range of a POSIX or OFD lock: first byte and length, 0 meaning "to the end
    /// of the file, however long it grows". A flock lock covers the whole file (0, 0).
    pub start: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum LockKind {
    /// flock(2): belongs to the open file description.
    Flock,
    /// fcntl(F_SETLK): belongs to the process.
    Posix,
    /// fcntl(F_OFD_SETLK): belongs to the open file description.
    Ofd,
}

impl LockKind {
    pub fn name(&self) -> &'static str {
        match self {
            LockKind::Flock => "flock",
            LockKind::Posix => "posix",
            LockKind::Ofd => "ofd",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// One signal's disposition, in the kernel's x86-64 `struct sigaction` terms.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    pub sig: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A raw 128-byte `siginfo_t`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigInfo(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl SigInfo {
    pub fn signo(&self) -> i32 {
        i32::from_le_bytes(self.0[0..4].try_into().unwrap_or([0; 4]))
    }
    pub fn code(&self) -> i32 {
        i32::from_le_bytes(self.0[8..12].try_into().unwrap_or([0; 4]))
    }
}

/// A file as it was seen at dump time, so restore can tell when it changed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRef {
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileRef {
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MmRecord {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
    pub exe: FileRef,
    /// `arch_prctl(ARCH_GET_XCOMP_PERM)`: dynamically enabled XSAVE features (AMX).
    pub xcomp_perm: u64,
    pub vmas: Vec<Vma>,
}

/// Protection bits, as in `PROT_*`.
pub const PROT_READ: u32 = 1;
pub const PROT_WRITE: u32 = 2;
pub const PROT_EXEC: u32 = 4;

/// Flags of a mapping beyond its protection (from smaps `VmFlags`).
pub mod vmflags {
    pub const GROWSDOWN: u64 = 1 << 0;
    pub const DONTFORK: u64 = 1 << 1;
    pub const WIPEONFORK: u64 = 1 << 2;
    pub const DONTDUMP: u64 = 1 << 3;
    pub const HUGEPAGE: u64 = 1 << 4;
    pub const NOHUGEPAGE: u64 = 1 << 5;
    pub const MAYWRITE: u64 = 1 << 6;
    pub const LOCKED: u64 = 1 << 7;
    pub const MERGEABLE: u64 = 1 << 8;
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub flags: u64,
    pub backing: VmaBacking,
    /// Offset into the backing file, in bytes.
    pub file_offset: u64,
    /// Saved pages, in address order. The bytes of the runs without a `data` offset of
    /// their own follow one another in the page data, starting at `data_offset`; a run
    /// with one (a page shared copy-on-write with an earlier saved page) reads its bytes
    /// there.
    pub pages: Vec<PageRun>,
    pub data_offset: u64,
    /// Guard regions (`MADV_GUARD_INSTALL`) inside the mapping.
    pub guards: Vec<PageRun>,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// Bytes of page data this mapping holds itself, from `data_offset`: its runs without
    /// a data offset of their own.
    pub fn data_len(&self) -> u64 {
        self.pages.iter().filter(|r| r.data.is_none()).map(|r| r.len()).sum()
    }
    /// Bytes of the mapping that restore fills: all its runs.
    pub fn saved_len(&self) -> u64 {
        self.pages.iter().map(|r| r.len()).sum()
    }
    /// Every run with the offset of its bytes in the page data. Overflow cannot happen in
    /// a validated image; here it saturates.
    pub fn runs_with_data(&self) -> impl Iterator<Item = (PageRun, u64)> + '_ {
        let mut next = self.data_offset;
        self.pages.iter().map(move |r| match r.data {
            Some(at) => (*r, at),
            None => {
                let at = next;
                next = next.saturating_add(r.len());
                (*r, at)
            }
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum VmaBacking {
    Anonymous,
    File(FileRef),
    /// A mapping the kernel provides ([vdso], [vvar], [vvar_vclock]); never saved, moved.
    Special(String),
    /// A mapping of the memory object `Image::shmem[..].id` at `Vma::file_offset`. Shared:
    /// nothing saved with the mapping (the object holds the data); private: the pages
    /// written (copy-on-write copies), like a private file mapping.
    Shmem(u64),
}

/// `npages` pages starting at `addr`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub npages: u64,
    /// Only in `Vma::pages`: where the run's bytes are in the page data, when they are a
    /// copy saved earlier (pages shared copy-on-write between processes are saved once).
    /// Absent: the bytes are the mapping's own, next from its `data_offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<u64>,
}

impl PageRun {
    /// A run whose bytes are next in its mapping's (or object's) own data.
    pub fn new(addr: u64, npages: u64) -> PageRun {
        PageRun { addr, npages, data: None }
    }
    pub fn len(&self) -> u64 {
        self.npages * 4096
    }
    pub fn is_empty(&self) -> bool {
        self.npages == 0
    }
    pub fn end(&self) -> u64 {
        self.addr + self.len()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FdRecord {
    pub fd: i32,
    pub cloexec: bool,
    pub kind: FdKind,
    /// A lower descriptor of the same process sharing this one's open file description
    /// (a dup): restore duplicates it instead of opening again, so offset and flags
    /// stay shared. (Images since format 1.1 use `desc` instead.)
    #[serde(default)]
    pub same_as: Option<i32>,
    /// Open file description: descriptors (of any process of the image) with the same
    /// non-zero id share one description, as after dup() or fork().
    #[serde(default)]
    pub desc: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum FdKind {
    /// A regular file or directory, reopened by path at its offset with its flags.
    File { file: FileRef, flags: i32, pos: u64 },
    /// A stateless character device such as /dev/null, reopened by path.
    CharDevice { #[serde(with = "serde_bytes")] path: Vec<u8>, rdev: u64, flags: i32 },
    /// A terminal; with --shell-job it becomes the restorer's terminal.
    Terminal { #[serde(with = "serde_bytes")] path: Vec<u8>, rdev: u64, flags: i32 },
    /// One end of a pipe whose both ends are in the image (see `Image::pipes`).
    Pipe { ino: u64, write: bool, flags: i32 },
    /// A named pipe opened by path (read, write or both, as `flags` say); its buffer is
    /// the `Image::fifos` record with the same device and inode.
    Fifo { file: FileRef, flags: i32 },
    /// A descriptor of the memory object `id` of `Image::shmem` (a memfd, a deleted tmpfs
    /// file, shared anonymous memory opened through /proc), at its offset with its flags.
    Shmem { id: u64, flags: i32, pos: u64 },
    /// The master (/dev/ptmx) of the pseudo-terminal pair `index` (see `Image::ptys`).
    PtyMaster { index: u32, flags: i32 },
    /// The slave /dev/pts/`index` of a pair whose master is in the image.
    PtySlave { index: u32, flags: i32 },
    /// A signalfd: the signals it reads (bit N-1 stands for signal N) and its status flags.
    Signalfd { mask: u64, flags: i32 },
    /// An eventfd: its counter, semaphore mode (`EFD_SEMAPHORE`) and status flags.
    Eventfd { count: u64, semaphore: bool, flags: i32 },
    /// A timerfd (see `TimerfdRecord`).
    Timerfd(TimerfdRecord),
    /// An epoll instance: its status flags and its registrations.
    Epoll { flags: i32, targets: Vec<EpollTarget> },
}

/// A timerfd: its clock, status flags, the flags it was last armed with, when it expires
/// next, its period, and the expirations that happened and were not read yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimerfdRecord {
    pub clockid: i32,
    pub flags: i32,
    /// `timerfd_settime` flags: `TFD_TIMER_ABSTIME` (1), `TFD_TIMER_CANCEL_ON_SET` (2).
    pub settime_flags: i32,
    /// Next expiry in nanoseconds: time left at dump for a relative timer, the clock's
    /// time of the expiry with `TFD_TIMER_ABSTIME`; 0: disarmed.
    pub value_ns: u64,
    /// Period in nanoseconds; 0: one-shot.
    pub interval_ns: u64,
    /// Expirations not read yet.
    pub ticks: u64,
}

/// One registration of an epoll instance: the target at descriptor `fd` of the process
/// that registers it on restore, which must hold the description `desc` there.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollTarget {
    pub fd: i32,
    /// `EPOLLIN`, ..., `EPOLLET`, `EPOLLONESHOT`, `EPOLLEXCLUSIVE`, `EPOLLWAKEUP`, as the
    /// kernel keeps them (a one-shot registration that fired keeps only its flag bits).
    pub events: u32,
    pub data: u64,
    /// The target's open file description (`FdRecord::desc`).
    pub desc: u64,
}

impl FdKind {
    pub fn kind_name(&self) -> &'static str {
        match self {
            FdKind::File { .. } => "file",
            FdKind::CharDevice { .. } => "chardev",
            FdKind::Terminal { .. } => "tty",
            FdKind::Pipe { .. } => "pipe",
            FdKind::Fifo { .. } => "fifo",
            FdKind::Shmem { .. } => "shmem",
            FdKind::PtyMaster { .. } => "ptmx",
            FdKind::PtySlave { .. } => "pts",
            FdKind::Signalfd { .. } => "signalfd",
            FdKind::Eventfd { .. } => "eventfd",
            FdKind::Timerfd(_) => "timerfd",
            FdKind::Epoll { .. } => "epoll",
        }
    }
}

/// A pipe inside the image: its identity (inode at dump time), capacity and the bytes in
/// its buffer, in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PipeRecord {
    pub ino: u64,
    pub capacity: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The other end was held outside the tree: restore connects the ends in the image to
    /// what `--inherit-fd fd[N]:pipe:[INO]` names (no data or capacity are saved).
    #[serde(default)]
    pub external: bool,
}

/// A named pipe of the image: its identity at dump time, capacity and the bytes in its
/// buffer, in order. Restore reopens it by the path of its descriptors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FifoRecord {
    pub dev: u64,
    pub ino: u64,
    pub capacity: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A memory object used by the processes of the image, saved once: mapped with
/// `VmaBacking::Shmem(id)` and/or held as `FdKind::Shmem { id, .. }`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShmemRecord {
    /// Unique in the image, non-zero.
    pub id: u64,
    pub kind: ShmemKind,
    /// Size of the object in bytes (`st_size`).
    pub size: u64,
    /// Permission bits of the inode.
    pub mode: u32,
    /// Owner of the inode.
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// `F_GET_SEALS` of a memfd (`F_SEAL_SEAL` alone for one created without
    /// `MFD_ALLOW_SEALING`); zero for other kinds.
    pub seals: u32,
    /// The object's data ranges, as runs of `npages` pages starting at byte offset `addr`
    /// of the object (holes are not saved); their bytes follow one another in the page data
    /// from `data_offset`.
    pub pages: Vec<PageRun>,
    pub data_offset: u64,
}

impl ShmemRecord {
    pub fn data_len(&self) -> u64 {
        self.pages.iter().map(|r| r.len()).sum()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ShmemKind {
    /// `MAP_SHARED|MAP_ANONYMOUS` memory (the kernel's "/dev/zero (deleted)" shmem file).
    Anonymous,
    /// `memfd_create(name)`: the name without the "memfd:" prefix.
    Memfd { #[serde(with = "serde_bytes")] name: Vec<u8> },
    /// A tmpfs file (such as a POSIX shared memory object in /dev/shm) unlinked while
    /// still mapped or open: its path before it was unlinked.
    DeletedFile { #[serde(with = "serde_bytes")] path: Vec<u8> },
}

impl ShmemKind {
    pub fn describe(&self) -> String {
        match self {
            ShmemKind::Anonymous => "shared anonymous memory".into(),
            ShmemKind::Memfd { name } => format!("memfd:{}", String::from_utf8_lossy(name)),
            ShmemKind::DeletedFile { path } => format!("{} (deleted)", String::from_utf8_lossy(path)),
        }
    }
}

/// A pseudo-terminal pair inside the image, identified by its index N (/dev/pts/N).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PtyRecord {
    pub index: u32,
    /// The slave's termios (a pty master has no settable termios of its own).
    pub termios: Termios,
    pub winsize: WinSize,
    /// TIOCPKT on the master.
    pub packet: bool,
    /// The slave is locked (unlockpt not called).
    pub locked: bool,
    /// TIOCEXCL on the slave.
    pub exclusive: bool,
    /// Typed into the master and not yet read on the slave side, as the slave's line
    /// discipline holds it (after input processing and echo), in order.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// Offsets into `input` at which a canonical line ended with the end-of-file
    /// character (VEOF), which the line discipline does not keep as a byte.
    pub input_eof_at: Vec<u64>,
    /// Written on the slave side and not yet read from the master (after output
    /// processing), in order.
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
}

/// `struct termios2`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: [u8; 19],
    pub ispeed: u32,
    pub ospeed: u32,
}

/// `struct winsize`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
    pub xpixel: u16,
    pub ypixel: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ThreadRecord {
    pub tid: i32,
    pub comm: String,
    /// `user_regs_struct` in kernel order (27 values, see stasis-sys `UserRegs::NAMES`).
    pub regs: Vec<u64>,
    /// The `NT_X86_XSTATE` regset: the thread's XSAVE area.
    #[serde(with = "serde_bytes")]
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub pending: Vec<SigInfo>,
    pub rseq: Option<Rseq>,
    pub robust_list: (u64, u64),
    pub clear_child_tid: u64,
    pub altstack: AltStack,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}
