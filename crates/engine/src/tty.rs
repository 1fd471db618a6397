//! Pseudo-terminal pairs inside the tree, and controlling terminals.
//!
//! A pair is in the image when a process of the tree holds its master (/dev/ptmx). Its
//! slave's termios and window size, the master's packet mode, the lock and exclusive
//! state, and the bytes queued in both directions are saved: typed into the master and
//! not yet read on the slave side (the slave's line discipline holds them, already
//! processed and echoed), and written on the slave side and not yet read from the master.
//! A slave whose master is outside the tree is the shell's terminal: accepted only with
//! --shell-job (it then becomes the restoring terminal).
//!
//! A terminal has no tee(), so dump reads the queued bytes out through descriptions of
//! its own (pidfd_getfd of the master, TIOCGPTPEER for the slave) and puts them back
//! (`Drained`) unless the tree is killed: on --leave-running and on every failed dump.
//! Reading the slave in canonical mode returns whole lines, one per read, so line ends
//! are known; the last, unfinished line is read after turning canonical mode off for a
//! moment. A read that finds nothing first makes the kernel hand its asynchronous flip
//! buffer to the line discipline, so nothing in flight is missed.
//!
//! Restore creates each pair before any process exists, with its old index N (by opening
//! /dev/ptmx until N comes). The programs know the slave by its name (ttyname, a path
//! they reopen, utmp, the session's controlling terminal as `ps` shows it), so it comes
//! back as /dev/pts/N or not at all: when N is taken, the restore is refused, as CRIU
//! does, before any process exists. Then it puts the bytes back
//! through the slave with the line discipline's processing off: input byte by byte with
//! TIOCSTI, which goes through the line discipline at once (a write into the master
//! would be processed later, under whatever settings hold then), in canonical mode if
//! the terminal was, so that line ends stay where they were; output written on the slave
//! with output processing off. Then the saved termios go in. A session leader takes its
//! controlling terminal (TIOCSCTTY) right after setsid and before it forks, so that its
//! children inherit it; the foreground process group is set (TIOCSPGRP, injected into
//! the leader) once the process groups exist.

use crate::error::{Error, Result};
use crate::procfs;
use stasis_image::{ControllingTty, FdKind, FdRecord, ProcessRecord, PtyRecord};
use stasis_sys::tty::{self as st, Termios, WinSize};
use stasis_sys::{Errno, Pid, RemoteFd};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub fn major(rdev: u64) -> u64 {
    ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)
}

pub fn minor(rdev: u64) -> u64 {
    (rdev & 0xff) | ((rdev >> 12) & !0xff)
}

/// /dev/ptmx (and /dev/pts/ptmx): 5:2.
pub fn is_ptmx(rdev: u64) -> bool {
    major(rdev) == 5 && minor(rdev) == 2
}

/// The index N of a /dev/pts/N device (majors 136-143).
pub fn pts_index(rdev: u64) -> Option<u32> {
    let maj = major(rdev);
    (136..=143).contains(&maj).then(|| ((maj - 136) * 256 + minor(rdev)) as u32)
}

/// The N_TTY line-discipline buffer holds this many bytes of input at most.
const INPUT_LIMIT: usize = 4095;

fn to_record(t: &Termios) -> stasis_image::Termios {
    stasis_image::Termios {
        iflag: t.iflag,
        oflag: t.oflag,
        cflag: t.cflag,
        lflag: t.lflag,
        line: t.line,
        cc: t.cc,
        ispeed: t.ispeed,
        ospeed: t.ospeed,
    }
}

fn from_record(t: &stasis_image::Termios) -> Termios {
    Termios {
        iflag: t.iflag,
        oflag: t.oflag,
        cflag: t.cflag,
        lflag: t.lflag,
        line: t.line,
        cc: t.cc,
        ispeed: t.ispeed,
        ospeed: t.ospeed,
    }
}

// ---------------------------------------------------------------------------
// Dump

/// Decides, for the whole tree, which pseudo-terminal slaves belong to a pair inside it
/// (its master is held in the tree). The others lead outside: with --shell-job they are
/// recorded as the shell's terminal, otherwise the dump is refused. Returns the pairs'
/// masters: index -> (pid, fd) of one descriptor of each.
pub fn resolve_slaves(procs: &mut [(Pid, &mut Vec<FdRecord>)], shell_job: bool) -> Result<BTreeMap<u32, (Pid, i32)>> {
    let mut masters: BTreeMap<u32, (Pid, i32)> = BTreeMap::new();
    for (pid, recs) in procs.iter() {
        for r in recs.iter() {
            if let FdKind::PtyMaster { index, .. } = r.kind {
                masters.entry(index).or_insert((*pid, r.fd));
            }
        }
    }
    for (pid, recs) in procs.iter_mut() {
        for r in recs.iter_mut() {
            let FdKind::PtySlave { index, flags } = r.kind else { continue };
            if masters.contains_key(&index) {
                continue;
            }
            if !shell_job {
                return Err(Error::PtyMasterOutside { pid: *pid, fd: r.fd, index });
            }
            let rdev = ((136 + (index as u64 >> 8)) << 8) | (index as u64 & 0xff);
            r.kind = FdKind::Terminal { path: format!("/dev/pts/{index}").into_bytes(), rdev, flags };
        }
    }
    Ok(masters)
}

/// The pairs of the tree, with the bytes queued in them read out. The returned guard puts
/// the bytes back when dropped, unless the tree is gone ([`Drained::discard`]).
pub fn dump_ptys(masters: &BTreeMap<u32, (Pid, i32)>, pidfds: &[(Pid, OwnedFd)]) -> Result<(Vec<PtyRecord>, Drained)> {
    let mut drained = Drained { ptys: Vec::new() };
    let mut out = Vec::new();
    for (&index, &(pid, fd)) in masters {
        let pidfd = pidfds.iter().find(|(p, _)| *p == pid).map(|(_, f)| f).ok_or(Error::NoSuchProcess(pid))?;
        let master = stasis_sys::proc::pidfd_getfd(pidfd, RemoteFd(fd)).map_err(Error::sys(pid, "pidfd_getfd"))?;
        let (rec, d) = drain_one(pid, fd, index, master)?;
        log::debug!(
            "pid {pid}: fd {fd}: /dev/pts/{index}: {} bytes of input and {} of output queued",
            rec.input.len(),
            rec.output.len()
        );
        drained.ptys.push(d);
        out.push(rec);
    }
    Ok((out, drained))
}

/// Bytes read out of the pairs of a frozen tree, put back on drop unless discarded.
pub struct Drained {
    ptys: Vec<DrainedPty>,
}

impl Drained {
    /// The tree runs on: every byte goes back where it was, termios as they were.
    pub fn put_back(mut self) -> Result<()> {
        let mut first = Ok(());
        for p in std::mem::take(&mut self.ptys) {
            first = first.and(p.put_back());
        }
        first
    }

    /// The tree was killed: the pairs are gone with it.
    pub fn discard(mut self) {
        for p in self.ptys.iter_mut() {
            p.armed = false;
        }
        self.ptys.clear();
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        // Each DrainedPty puts its own bytes back (and logs a failure) when dropped.
        self.ptys.clear();
    }
}

/// One pair of a frozen tree with the bytes taken out of it.
struct DrainedPty {
    pid: Pid,
    index: u32,
    /// Our duplicate of a master descriptor of the tree (the same open file description).
    master: OwnedFd,
    /// A slave description of our own (O_NONBLOCK).
    slave: OwnedFd,
    termios: Termios,
    input: Vec<u8>,
    eof_at: Vec<u64>,
    output: Vec<u8>,
    /// The bytes still have to go back.
    armed: bool,
}

impl DrainedPty {
    fn put_back(mut self) -> Result<()> {
        self.armed = false;
        refill(self.pid, self.slave.as_raw_fd(), &self.termios, &self.input, &self.eof_at, &self.output)
    }
}

impl Drop for DrainedPty {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if let Err(e) = refill(self.pid, self.slave.as_raw_fd(), &self.termios, &self.input, &self.eof_at, &self.output) {
            log::warn!("/dev/pts/{}: putting back the bytes read out of it failed: {e}", self.index);
        }
    }
}

fn drain_one(pid: Pid, fd: i32, index: u32, master: OwnedFd) -> Result<(PtyRecord, DrainedPty)> {
    let m = master.as_raw_fd();
    let termios = st::get_termios(m).map_err(Error::sys(pid, "TCGETS2"))?;
    if termios.line != 0 {
        return Err(Error::Unsupported {
            pid,
            what: format!("fd {fd}: /dev/pts/{index} with line discipline {} (only N_TTY)", termios.line),
        });
    }
    let winsize = st::get_winsize(m).map_err(Error::sys(pid, "TIOCGWINSZ"))?;
    let packet = st::packet_mode(m).map_err(Error::sys(pid, "TIOCGPKT"))?;
    let locked = st::pty_locked(m).map_err(Error::sys(pid, "TIOCGPTLCK"))?;
    // A locked slave cannot be opened: unlock it for the moment it takes.
    if locked {
        st::set_pty_locked(m, false).map_err(Error::sys(pid, "TIOCSPTLCK"))?;
    }
    let slave = st::open_peer(m, libc::O_RDWR | libc::O_NONBLOCK);
    if locked {
        st::set_pty_locked(m, true).map_err(Error::sys(pid, "TIOCSPTLCK"))?;
    }
    let slave = slave.map_err(Error::sys(pid, "TIOCGPTPEER"))?;
    let exclusive = st::exclusive(slave.as_raw_fd()).map_err(Error::sys(pid, "TIOCGEXCL"))?;
    let mut d = DrainedPty {
        pid,
        index,
        master,
        slave,
        termios,
        input: Vec::new(),
        eof_at: Vec::new(),
        output: Vec::new(),
        armed: true,
    };
    // From here on, whatever was read goes back if anything fails (DrainedPty's drop).
    read_input(&mut d)?;
    read_output(&mut d, packet)?;
    if d.input.len() + d.eof_at.len() > INPUT_LIMIT {
        return Err(Error::Unsupported {
            pid,
            what: format!(
                "fd {fd}: /dev/pts/{index} with {} bytes of unread input (more than the {INPUT_LIMIT} its line discipline holds)",
                d.input.len()
            ),
        });
    }
    let rec = PtyRecord {
        index,
        termios: to_record(&termios),
        winsize: stasis_image::WinSize { rows: winsize.rows, cols: winsize.cols, xpixel: winsize.xpixel, ypixel: winsize.ypixel },
        packet,
        locked,
        exclusive,
        input: d.input.clone(),
        input_eof_at: d.eof_at.clone(),
        output: d.output.clone(),
    };
    Ok((rec, d))
}

fn is_again(e: Errno) -> bool {
    e.0 == libc::EAGAIN
}

/// Does canonical input byte `c` end a line (newline, VEOL, VEOL2 with IEXTEN)?
fn ends_line(t: &Termios, c: u8) -> bool {
    c == b'\n'
        || (c != 0 && c == t.cc[libc::VEOL])
        || (c != 0 && t.lflag & libc::IEXTEN != 0 && c == t.cc[libc::VEOL2])
}

/// Reads everything the slave side could read, from our non-blocking slave description.
fn read_input(d: &mut DrainedPty) -> Result<()> {
    let (pid, s) = (d.pid, d.slave.as_raw_fd());
    let mut buf = vec![0u8; 8192];
    if d.termios.lflag & libc::ICANON != 0 {
        // Whole lines, one per read. A line ended by VEOF comes without it (and an empty
        // one as a read of 0 bytes): remember where.
        let mut eof_lines = 0;
        loop {
            match stasis_sys::proc::read_raw(s, &mut buf) {
                Ok(0) => {
                    eof_lines += 1;
                    if eof_lines > INPUT_LIMIT {
                        return Err(Error::Unsupported { pid, what: format!("/dev/pts/{}: a hung-up terminal", d.index) });
                    }
                    d.eof_at.push(d.input.len() as u64);
                }
                Ok(n) => {
                    d.input.extend_from_slice(&buf[..n]);
                    if !ends_line(&d.termios, buf[n - 1]) {
                        d.eof_at.push(d.input.len() as u64);
                    }
                }
                Err(e) if is_again(e) => break,
                Err(e) => return Err(Error::Sys { pid, op: "read (pty slave)", errno: e }),
            }
        }
        // The unfinished line, readable only in non-canonical mode.
        let mut raw = d.termios;
        raw.lflag &= !libc::ICANON;
        raw.cc[libc::VMIN] = 0;
        raw.cc[libc::VTIME] = 0;
        st::set_termios(s, &raw).map_err(Error::sys(pid, "TCSETS2"))?;
        let r = read_available(pid, s, &mut buf, &mut d.input);
        st::set_termios(s, &d.termios).map_err(Error::sys(pid, "TCSETS2"))?;
        r
    } else {
        read_available(pid, s, &mut buf, &mut d.input)
    }
}

/// Non-canonical reads until none returns anything.
fn read_available(pid: Pid, s: RawFd, buf: &mut [u8], out: &mut Vec<u8>) -> Result<()> {
    loop {
        match stasis_sys::proc::read_raw(s, buf) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if is_again(e) => return Ok(()),
            Err(e) => return Err(Error::Sys { pid, op: "read (pty slave)", errno: e }),
        }
    }
}

/// Reads what the master could read, through the tree's own master description (which
/// may be blocking): only as many bytes as FIONREAD reports, so no read waits. poll()
/// hands pending flip-buffer data to the line discipline when none is there yet.
fn read_output(d: &mut DrainedPty, packet: bool) -> Result<()> {
    let (pid, m) = (d.pid, d.master.as_raw_fd());
    let queued = |m| stasis_sys::proc::bytes_readable(m).map_err(Error::sys(pid, "FIONREAD"));
    loop {
        let mut n = queued(m)?;
        if n == 0 {
            stasis_sys::proc::poll_now(m, libc::POLLIN).map_err(Error::sys(pid, "poll"))?;
            n = queued(m)?;
            if n == 0 {
                return Ok(());
            }
        }
        // In packet mode every read starts with a status byte.
        let mut buf = vec![0u8; n + 1];
        let got = stasis_sys::proc::read_raw(m, &mut buf).map_err(|e| Error::Sys { pid, op: "read (pty master)", errno: e })?;
        match (packet, got) {
            (_, 0) => return Ok(()),
            (false, _) => d.output.extend_from_slice(&buf[..got]),
            (true, _) if buf[0] == 0 => d.output.extend_from_slice(&buf[1..got]),
            (true, _) => log::debug!("pid {pid}: /dev/pts/{}: packet-mode status {:#x} dropped", d.index, buf[0]),
        }
    }
}

/// Puts queued bytes into a pair through `slave`, a description of its slave, with the
/// line discipline's processing off, then sets `termios`.
fn refill(pid: Pid, slave: RawFd, termios: &Termios, input: &[u8], eof_at: &[u64], output: &[u8]) -> Result<()> {
    let mut quiet = *termios;
    quiet.lflag &= !(libc::ECHO
        | libc::ECHOE
        | libc::ECHOK
        | libc::ECHONL
        | libc::ECHOCTL
        | libc::ECHOPRT
        | libc::ECHOKE
        | libc::ISIG
        | libc::PENDIN);
    // Flow control (IXON) stays: the buffer cannot hold START/STOP characters it would
    // act on, and changing it would queue a status byte on a master in packet mode.
    quiet.iflag &= !(libc::ISTRIP | libc::INLCR | libc::IGNCR | libc::ICRNL | libc::IUCLC | libc::PARMRK);
    quiet.oflag &= !libc::OPOST;
    // Editing characters off; VEOF, VEOL and VEOL2 stay, they end lines.
    for c in [libc::VERASE, libc::VKILL, libc::VWERASE, libc::VREPRINT, libc::VLNEXT, libc::VDISCARD] {
        quiet.cc[c] = 0;
    }
    st::set_termios(slave, &quiet).map_err(Error::sys(pid, "TCSETS2"))?;
    let r = inject(pid, slave, termios.cc[libc::VEOF], input, eof_at).and_then(|()| write_output(pid, slave, output));
    st::set_termios(slave, termios).map_err(Error::sys(pid, "TCSETS2"))?;
    r
}

fn inject(pid: Pid, slave: RawFd, veof: u8, input: &[u8], eof_at: &[u64]) -> Result<()> {
    let sti = |b| st::inject_input(slave, b).map_err(Error::sys(pid, "TIOCSTI"));
    let mut marks = eof_at.iter().peekable();
    for (i, &b) in input.iter().enumerate() {
        while marks.next_if(|&&at| at == i as u64).is_some() {
            sti(veof)?;
        }
        sti(b)?;
    }
    for _ in marks {
        sti(veof)?;
    }
    Ok(())
}

/// Writes on the slave side (output processing is off): the bytes go to the master's
/// side as they are. The master's side may take a moment to move them out of its flip
/// buffer when there are many.
fn write_output(pid: Pid, slave: RawFd, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        match stasis_sys::proc::write_some(slave, data) {
            Ok(n) => data = &data[n..],
            Err(e) if is_again(e) => {
                let ev = stasis_sys::proc::poll_wait(slave, libc::POLLOUT, 5000).map_err(Error::sys(pid, "poll"))?;
                if ev & libc::POLLOUT == 0 {
                    return Err(Error::Unsupported {
                        pid,
                        what: format!("putting {} bytes of output back into a pseudo-terminal: no room", data.len()),
                    });
                }
            }
            Err(e) => return Err(Error::Sys { pid, op: "write (pty slave)", errno: e }),
        }
    }
    Ok(())
}

/// The controlling terminal of every live process of the tree, from its /proc/PID/stat
/// (`stats`, one per process, read with the tree frozen): a pair of the image, or (with
/// --shell-job) the shell's terminal. A process must have its session leader's, when the
/// leader is in the tree; the foreground group of a leader's pseudo-terminal must be one
/// of the tree's.
pub fn controlling_ttys(
    procs: &mut [ProcessRecord],
    stats: &[&procfs::Stat],
    masters: &BTreeMap<u32, (Pid, i32)>,
    shell_job: bool,
) -> Result<()> {
    for (p, stat) in procs.iter_mut().zip(stats).filter(|(p, _)| p.zombie_status.is_none()) {
        let pid = Pid(p.pid);
        if stat.tty_nr == 0 {
            continue;
        }
        let rdev = stat.tty_nr as u32 as u64;
        let pty = match pts_index(rdev) {
            Some(i) if masters.contains_key(&i) => Some(i),
            _ if shell_job => None,
            idx => {
                let name = idx.map_or_else(|| format!("tty {}:{}", major(rdev), minor(rdev)), |i| format!("/dev/pts/{i}"));
                return Err(Error::Unsupported {
                    pid,
                    what: format!("a controlling terminal ({name}) outside the dumped tree (dump with --shell-job to give it the restoring terminal)"),
                });
            }
        };
        p.ctty = Some(ControllingTty { pty, fg_pgrp: stat.tpgid });
    }
    for p in procs.iter().filter(|p| p.zombie_status.is_none()) {
        let Some(leader) = procs.iter().find(|l| l.pid == p.sid && l.zombie_status.is_none()) else { continue };
        let pty = |r: &ProcessRecord| r.ctty.as_ref().map(|c| c.pty);
        if pty(p) != pty(leader) {
            return Err(Error::Unsupported {
                pid: Pid(p.pid),
                what: format!("a controlling terminal other than its session leader's (pid {})", leader.pid),
            });
        }
        if p.pid != p.sid {
            continue;
        }
        if let Some(ControllingTty { pty: Some(i), fg_pgrp }) = p.ctty {
            let in_session = procs.iter().any(|q| q.pgid == fg_pgrp && q.sid == p.sid && q.zombie_status.is_none());
            if fg_pgrp > 0 && !in_session {
                return Err(Error::Unsupported {
                    pid: Pid(p.pid),
                    what: format!("/dev/pts/{i} with foreground process group {fg_pgrp}, which has no live process in the dumped tree"),
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Restore

/// A restored pair: the master and a slave description the restorer keeps for the
/// session leader's TIOCSCTTY and TIOCSPGRP.
pub struct Pair {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub locked: bool,
}

/// Opens /dev/ptmx until it gives index `want` (closing the others). `None` when
/// /dev/pts/`want` is taken: its node exists, or the kernel, which hands out the lowest
/// free index, gives one past `want` (somebody took it meanwhile, or a description of the
/// old slave is still open somewhere).
fn open_indexed(want: u32) -> Result<Option<OwnedFd>> {
    let me = stasis_sys::proc::getpid();
    if std::path::Path::new(&format!("/dev/pts/{want}")).exists() {
        return Ok(None);
    }
    // Each index below `want` is held until `want` comes, so that the next open moves on.
    let mut below = Vec::new();
    loop {
        let m = st::open_ptmx().map_err(Error::sys(me, "open /dev/ptmx"))?;
        let i = st::pty_index(m.as_raw_fd()).map_err(Error::sys(me, "TIOCGPTN"))?;
        match i.cmp(&want) {
            std::cmp::Ordering::Less => below.push(m),
            std::cmp::Ordering::Equal => return Ok(Some(m)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
}

/// Creates a pair as the record describes it (the lock goes on in [`finish`], once every
/// slave description is open). `holder` is a descriptor of its master in the image (a
/// process and its fd), named when /dev/pts/N is taken.
pub fn create(rec: &PtyRecord, holder: Option<(Pid, i32)>) -> Result<Pair> {
    let me = stasis_sys::proc::getpid();
    let master = open_indexed(rec.index)?.ok_or_else(|| Error::PtyIndexTaken {
        index: rec.index,
        holder: holder.map_or_else(|| "no process".into(), |(pid, fd)| format!("pid {pid} fd {fd}")),
    })?;
    let m = master.as_raw_fd();
    st::set_pty_locked(m, false).map_err(Error::sys(me, "TIOCSPTLCK"))?;
    let slave = st::open_peer(m, libc::O_RDWR | libc::O_NONBLOCK).map_err(Error::sys(me, "TIOCGPTPEER"))?;
    let w = &rec.winsize;
    st::set_winsize(m, &WinSize { rows: w.rows, cols: w.cols, xpixel: w.xpixel, ypixel: w.ypixel })
        .map_err(Error::sys(me, "TIOCSWINSZ"))?;
    refill(me, slave.as_raw_fd(), &from_record(&rec.termios), &rec.input, &rec.input_eof_at, &rec.output)?;
    st::set_packet_mode(m, rec.packet).map_err(Error::sys(me, "TIOCPKT"))?;
    st::set_exclusive(slave.as_raw_fd(), rec.exclusive).map_err(Error::sys(me, "TIOCEXCL"))?;
    Ok(Pair { master, slave, locked: rec.locked })
}

/// A new open file description of the pair's slave, as a process of the image had one.
pub fn open_slave(pair: &Pair, flags: i32) -> Result<OwnedFd> {
    let me = stasis_sys::proc::getpid();
    let keep = libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND | libc::O_ASYNC;
    st::open_peer(pair.master.as_raw_fd(), flags & keep).map_err(Error::sys(me, "TIOCGPTPEER"))
}

/// Once every slave description exists: the lock as it was.
pub fn finish(pair: &Pair) -> Result<()> {
    if pair.locked {
        let me = stasis_sys::proc::getpid();
        st::set_pty_locked(pair.master.as_raw_fd(), true).map_err(Error::sys(me, "TIOCSPTLCK"))?;
    }
    Ok(())
}

/// What a restored session leader does about its controlling terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CttyPlan {
    /// A descriptor of the terminal, inherited from the restorer.
    pub fd: RawFd,
    /// Take it from the session that has it (the restoring shell's terminal).
    pub steal: bool,
    /// Foreground process group to set once groups exist, if not the leader's own.
    pub fg_pgrp: Option<i32>,
}

/// For a process that leads its session: which terminal becomes its controlling one.
/// `pty_fd` gives the restorer's slave description of a pair; `terminal` is the
/// restorer's own terminal (for --shell-job).
pub fn plan_ctty(
    rec: &ProcessRecord,
    all: &[ProcessRecord],
    pty_fd: impl Fn(u32) -> Option<RawFd>,
    terminal: Option<RawFd>,
) -> Result<Option<CttyPlan>> {
    let Some(c) = &rec.ctty else { return Ok(None) };
    let pid = Pid(rec.pid);
    let (fd, steal) = match c.pty {
        Some(i) => (
            pty_fd(i).ok_or_else(|| Error::Restore { pid, what: format!("its controlling terminal /dev/pts/{i} has no record") })?,
            false,
        ),
        None => (
            terminal.ok_or_else(|| Error::Restore {
                pid,
                what: "it had the shell's terminal as controlling terminal but the restorer has no terminal on fd 0-2".into(),
            })?,
            true,
        ),
    };
    let fg = c.fg_pgrp;
    let fg_pgrp = (fg > 0 && fg != rec.pid && all.iter().any(|q| q.pgid == fg && q.sid == rec.pid && q.zombie_status.is_none()))
        .then_some(fg);
    Ok(Some(CttyPlan { fd, steal, fg_pgrp }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pts_numbers() {
        assert_eq!(pts_index((136 << 8) | 5), Some(5));
        assert_eq!(pts_index((137 << 8) | 1), Some(257));
        assert_eq!(pts_index((4 << 8) | 1), None);
        assert!(is_ptmx((5 << 8) | 2));
        assert!(!is_ptmx(5 << 8));
    }

    #[test]
    fn line_ends() {
        let mut t = Termios::default();
        assert!(ends_line(&t, b'\n'));
        assert!(!ends_line(&t, 0));
        t.cc[libc::VEOL] = b';';
        t.cc[libc::VEOL2] = b'|';
        assert!(ends_line(&t, b';'));
        assert!(!ends_line(&t, b'|'));
        t.lflag |= libc::IEXTEN;
        assert!(ends_line(&t, b'|'));
    }
}
