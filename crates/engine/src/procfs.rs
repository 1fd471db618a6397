//! Pure parsers for the /proc files a dump reads. Text in, records out; no I/O here, so
//! every parser is unit-tested against real samples.

/// One line of /proc/PID/maps, plus the `VmFlags` line when parsed from smaps.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path or pseudo-name ("[heap]", "[vdso]", "/dev/zero (deleted)"), empty if none.
    pub name: String,
    /// The two-letter codes of the `VmFlags` line, as smaps prints them.
    pub vmflags: String,
}

impl MapEntry {
    pub fn has_flag(&self, f: &str) -> bool {
        self.vmflags.split_ascii_whitespace().any(|x| x == f)
    }
}

fn parse_map_header(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return None;
    }
    let (maj, min) = dev.split_once(':')?;
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode: inode.parse().ok()?,
        name,
        vmflags: String::new(),
    })
}

/// Parses /proc/PID/smaps (or maps: entries then have no VmFlags).
pub fn parse_smaps(text: &str) -> Result<Vec<MapEntry>, String> {
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        // Field lines look like "Rss:   4 kB" (a capital first); mapping lines start with
        // a range in lower-case hex.
        match line.as_bytes().first() {
            Some(b'V') => {
                if let Some(rest) = line.strip_prefix("VmFlags:") {
                    let last = out.last_mut().ok_or("VmFlags before any mapping")?;
                    last.vmflags = rest.trim().to_string();
                }
                continue;
            }
            Some(b'0'..=b'9' | b'a'..=b'f') => {}
            _ => continue,
        }
        let first = line.split(' ').next().unwrap_or("");
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            out.push(parse_map_header(line).ok_or_else(|| format!("bad mapping line: {line}"))?);
        }
    }
    Ok(out)
}

/// The fields of /proc/PID/stat that a dump needs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub tty_nr: i32,
    /// Foreground process group of the controlling terminal (-1: none).
    pub tpgid: i32,
    pub flags: u32,
    pub num_threads: i64,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// The signal the parent gets when this process ends.
    pub exit_signal: i32,
}

/// `PF_KTHREAD` in the stat flags field.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Parses /proc/PID/stat. The command name is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last ')'.
pub fn parse_stat(text: &str) -> Result<Stat, String> {
    let open = text.find('(').ok_or("no '('")?;
    let close = text.rfind(')').ok_or("no ')'")?;
    let pid = text[..open].trim().parse().map_err(|_| "bad pid")?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state) in proc(5) numbering.
    let f = |n: usize| -> Result<&str, String> {
        rest.get(n - 3).copied().ok_or_else(|| format!("missing field {n}"))
    };
    let num = |n: usize| -> Result<u64, String> {
        f(n)?.parse::<u64>().map_err(|_| format!("bad field {n}"))
    };
    let int = |n: usize| -> Result<i64, String> {
        f(n)?.parse::<i64>().map_err(|_| format!("bad field {n}"))
    };
    Ok(Stat {
        pid,
        comm,
        state: f(3)?.chars().next().unwrap_or('?'),
        ppid: int(4)? as i32,
        pgrp: int(5)? as i32,
        session: int(6)? as i32,
        tty_nr: int(7)? as i32,
        tpgid: int(8)? as i32,
        flags: num(9)? as u32,
        num_threads: int(20)?,
        start_code: num(26)?,
        end_code: num(27)?,
        start_stack: num(28)?,
        start_data: num(45)?,
        end_data: num(46)?,
        start_brk: num(47)?,
        arg_start: num(48)?,
        arg_end: num(49)?,
        env_start: num(50)?,
        env_end: num(51)?,
        exit_signal: int(38)? as i32,
    })
}

/// The fields of /proc/PID/status that a dump needs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Status {
    pub umask: u32,
    pub tracer_pid: i32,
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub threads: u32,
    pub nspid: Vec<i32>,
    pub nspgid: Vec<i32>,
    pub nssid: Vec<i32>,
    pub kthread: bool,
    pub state: char,
    pub cap_eff: u64,
    pub no_new_privs: bool,
    pub seccomp: u32,
    /// Signals with a handler (SigCgt) or ignored (SigIgn): bit n-1 for signal n.
    pub sig_caught: u64,
    pub sig_ignored: u64,
    /// Signals pending for the thread (SigPnd) or the whole process (ShdPnd).
    pub sig_pending: u64,
}

pub fn parse_status(text: &str) -> Result<Status, String> {
    let mut s = Status::default();
    let four = |v: &str| -> Result<[u32; 4], String> {
        let n: Vec<u32> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        n.try_into().map_err(|_| format!("expected four ids: {v}"))
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k {
            "Umask" => s.umask = u32::from_str_radix(v, 8).map_err(|_| "bad Umask")?,
            "TracerPid" => s.tracer_pid = v.parse().map_err(|_| "bad TracerPid")?,
            "Uid" => s.uids = four(v)?,
            "Gid" => s.gids = four(v)?,
            "Groups" => s.groups = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "Threads" => s.threads = v.parse().map_err(|_| "bad Threads")?,
            "NSpid" => s.nspid = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "NSpgid" => s.nspgid = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "NSsid" => s.nssid = v.split_whitespace().filter_map(|x| x.parse().ok()).collect(),
            "Kthread" => s.kthread = v == "1",
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "SigCgt" => s.sig_caught = u64::from_str_radix(v, 16).map_err(|_| "bad SigCgt")?,
            "SigIgn" => s.sig_ignored = u64::from_str_radix(v, 16).map_err(|_| "bad SigIgn")?,
            "SigPnd" | "ShdPnd" => s.sig_pending |= u64::from_str_radix(v, 16).map_err(|_| "bad SigPnd/ShdPnd")?,
            "NoNewPrivs" => s.no_new_privs = v == "1",
            "Seccomp" => s.seccomp = v.parse().map_err(|_| "bad Seccomp")?,
            "CapEff" => s.cap_eff = u64::from_str_radix(v, 16).map_err(|_| "bad CapEff")?,
            _ => {}
        }
    }
    Ok(s)
}

/// /proc/PID/limits row names in RLIMIT_* order.
const LIMIT_NAMES: [&str; 16] = [
    "Max cpu time",
    "Max file size",
    "Max data size",
    "Max stack size",
    "Max core file size",
    "Max resident set",
    "Max processes",
    "Max open files",
    "Max locked memory",
    "Max address space",
    "Max file locks",
    "Max pending signals",
    "Max msgqueue size",
    "Max nice priority",
    "Max realtime priority",
    "Max realtime timeout",
];

/// Parses /proc/PID/limits into (resource, soft, hard); "unlimited" is `u64::MAX`.
pub fn parse_limits(text: &str) -> Result<Vec<(u32, u64, u64)>, String> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let Some(res) = LIMIT_NAMES.iter().position(|n| line.starts_with(n)) else {
            return Err(format!("unknown limit row: {line}"));
        };
        let vals: Vec<&str> = line[LIMIT_NAMES[res].len()..].split_whitespace().collect();
        let v = |s: Option<&&str>| -> Result<u64, String> {
            match s {
                Some(&"unlimited") => Ok(u64::MAX),
                Some(x) => x.parse().map_err(|_| format!("bad limit value in: {line}")),
                None => Err(format!("short limit row: {line}")),
            }
        };
        out.push((res as u32, v(vals.first())?, v(vals.get(1))?));
    }
    Ok(out)
}

/// The common fields of /proc/PID/fdinfo/N.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FdInfo {
    pub pos: u64,
    pub flags: i32,
    pub mnt_id: i32,
}

pub fn parse_fdinfo(text: &str) -> Result<FdInfo, String> {
    let mut fi = FdInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k {
            "pos" => fi.pos = v.parse().map_err(|_| "bad pos")?,
            "flags" => fi.flags = i32::from_str_radix(v, 8).map_err(|_| "bad flags")?,
            "mnt_id" => fi.mnt_id = v.parse().map_err(|_| "bad mnt_id")?,
            _ => {}
        }
    }
    Ok(fi)
}

/// Parses /proc/PID/auxv into its u64 words, up to and including the AT_NULL pair.
/// The value of the first `key: value` line of an fdinfo text with this key, trimmed.
pub fn fdinfo_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.split_once(':').filter(|(k, _)| *k == key).map(|(_, v)| v.trim()))
}

pub fn parse_auxv(bytes: &[u8]) -> Vec<u64> {
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let mut out = Vec::new();
    for pair in words.chunks_exact(2) {
        out.extend_from_slice(pair);
        if pair[0] == 0 {
            break;
        }
    }
    out
}

/// Reads /proc/PID/NAME as text; the one I/O helper of this module, so that a missing
/// process is reported as such everywhere. Returns the path for error messages.
pub fn read_text(pid: stasis_sys::Pid, name: &str) -> crate::error::Result<(String, String)> {
    let path = format!("/proc/{pid}/{name}");
    match read_proc_file(&path).and_then(|b| String::from_utf8(b).map_err(std::io::Error::other)) {
        Ok(t) => Ok((path, t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "task" => {
            Err(crate::error::Error::NoSuchProcess(pid))
        }
        Err(e) => Err(crate::error::Error::Proc { pid, path: path.into(), err: e }),
    }
}

/// The bytes of a /proc file. Unlike std::fs::read it asks for no size hint (/proc files
/// say 0: a wasted fstat, lseek and small probe read per file, which add up over a tree)
/// and reads into a buffer big enough for most of them at once.
pub fn read_proc_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    // Plain reads: File::read_to_end would first fstat and lseek for a size hint.
    let mut buf = vec![0u8; 16 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(2 * len, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c4a00000-55d0c4a02000 r--p 00000000 fe:00 1234   /usr/bin/my prog
Size:                  8 kB
Rss:                   8 kB
VmFlags: rd mr mw me dw sd
7ffd1c9e0000-7ffd1ca01000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
VmFlags: rd wr mr mw me gd ac
7f0000000000-7f0000001000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms sd
";

    #[test]
    fn smaps_entries_and_flags() {
        let m = parse_smaps(SMAPS).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start, 0x55d0c4a00000);
        assert_eq!(m[0].name, "/usr/bin/my prog");
        assert_eq!((m[0].dev_major, m[0].dev_minor, m[0].inode), (0xfe, 0, 1234));
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "[stack]");
        assert!(m[1].has_flag("gd"));
        assert!(m[2].shared);
        assert_eq!(m[2].name, "/dev/zero (deleted)");
    }

    #[test]
    fn maps_without_name() {
        let m = parse_smaps("7f0000000000-7f0000001000 ---p 00000000 00:00 0 \n").unwrap();
        assert_eq!(m[0].name, "");
        assert!(!m[0].read);
    }

    #[test]
    fn stat_with_parens_in_comm() {
        let s = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 100 1000 10 18446744073709551615 4194304 4196000 140737488346000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 6000000 6001000 7000000 140737488347000 140737488347100 140737488347100 140737488348000 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.pid, 1234);
        assert_eq!(st.comm, "a) b (c)");
        assert_eq!(st.state, 'S');
        assert_eq!((st.ppid, st.pgrp, st.session), (1, 1234, 1234));
        assert_eq!(st.num_threads, 1);
        assert_eq!(st.start_code, 4194304);
        assert_eq!(st.end_code, 4196000);
        assert_eq!(st.start_stack, 140737488346000);
        assert_eq!(st.start_data, 6000000);
        assert_eq!(st.end_data, 6001000);
        assert_eq!(st.start_brk, 7000000);
        assert_eq!(st.arg_start, 140737488347000);
        assert_eq!(st.env_end, 140737488348000);
        assert_eq!(st.exit_signal, 17);
    }

    #[test]
    fn stat_of_self_parses() {
        let st = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert_eq!(st.pid as u32, std::process::id());
        assert!(st.arg_start > 0 && st.arg_end > st.arg_start);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nUmask:\t0027\nState:\tS (sleeping)\nTracerPid:\t55\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 20 \nThreads:\t3\nNSpid:\t99\t1\nKthread:\t0\n";
        let st = parse_status(s).unwrap();
        assert_eq!(st.umask, 0o027);
        assert_eq!(st.tracer_pid, 55);
        assert_eq!(st.uids, [1, 2, 3, 4]);
        assert_eq!(st.gids, [5, 6, 7, 8]);
        assert_eq!(st.groups, vec![10, 20]);
        assert_eq!(st.threads, 3);
        assert_eq!(st.nspid, vec![99, 1]);
        assert!(!st.kthread);
        assert_eq!(st.state, 'S');
    }

    #[test]
    fn limits_of_self_parse() {
        let l = parse_limits(&std::fs::read_to_string("/proc/self/limits").unwrap()).unwrap();
        assert_eq!(l.len(), 16);
        assert_eq!(l[7].0, 7);
    }

    #[test]
    fn limits_values() {
        let t = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            777                  20000                files     \n";
        let l = parse_limits(t).unwrap();
        assert_eq!(l, vec![(0, u64::MAX, u64::MAX), (7, 777, 20000)]);
    }

    #[test]
    fn fdinfo_fields() {
        let f = parse_fdinfo("pos:\t12345\nflags:\t02100002\nmnt_id:\t30\nino:\t77\n").unwrap();
        assert_eq!(f, FdInfo { pos: 12345, flags: 0o2100002, mnt_id: 30 });
    }

    #[test]
    fn auxv_stops_at_null() {
        let mut b = Vec::new();
        for w in [6u64, 4096, 0, 0, 99, 99] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(parse_auxv(&b), vec![6, 4096, 0, 0]);
    }
}
