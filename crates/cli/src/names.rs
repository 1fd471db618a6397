//! Names for the numbers an image holds (x86-64 Linux): signals, system calls, flags.

/// `SIGTERM`, `SIGRTMIN+3`, or `signal 70`.
pub fn signal(sig: i32) -> String {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match sig {
        1..=31 => NAMES[(sig - 1) as usize].to_string(),
        32 => "SIGRTMIN".to_string(),
        33..=64 => format!("SIGRTMIN+{}", sig - 32),
        _ => format!("signal {sig}"),
    }
}

/// The signals of a 64-bit mask (bit `n-1` is signal `n`).
pub fn signal_set(mask: u64) -> Vec<String> {
    (1..=64)
        .filter(|s| mask & (1u64 << (s - 1)) != 0)
        .map(signal)
        .collect()
}

/// Names of common x86-64 system calls, for describing where a thread was stopped.
pub fn syscall(nr: i64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        1 => "write",
        2 => "open",
        3 => "close",
        7 => "poll",
        9 => "mmap",
        13 => "rt_sigaction",
        14 => "rt_sigprocmask",
        16 => "ioctl",
        17 => "pread64",
        18 => "pwrite64",
        19 => "readv",
        20 => "writev",
        23 => "select",
        24 => "sched_yield",
        34 => "pause",
        35 => "nanosleep",
        39 => "getpid",
        43 => "accept",
        45 => "recvfrom",
        47 => "recvmsg",
        56 => "clone",
        57 => "fork",
        59 => "execve",
        60 => "exit",
        61 => "wait4",
        62 => "kill",
        72 => "fcntl",
        73 => "flock",
        74 => "fsync",
        128 => "rt_sigtimedwait",
        130 => "rt_sigsuspend",
        202 => "futex",
        219 => "restart_syscall",
        228 => "clock_gettime",
        230 => "clock_nanosleep",
        231 => "exit_group",
        232 => "epoll_wait",
        247 => "waitid",
        257 => "openat",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        435 => "clone3",
        441 => "epoll_pwait2",
        _ => return None,
    })
}

/// What the kernel would do with a system call interrupted with return value `rax`.
pub fn restart_state(rax: i64) -> Option<&'static str> {
    Some(match rax {
        -512 => "ERESTARTSYS (re-executed on restore)",
        -513 => "ERESTARTNOINTR (re-executed on restore)",
        -514 => "ERESTARTNOHAND (re-executed on restore)",
        -516 => "ERESTART_RESTARTBLOCK (returns EINTR on restore; poll runs again)",
        _ => return None,
    })
}

/// `O_RDWR|O_APPEND|O_NONBLOCK` for `open(2)` flags (x86-64 values).
pub fn open_flags(flags: i32) -> String {
    let mut out = vec![match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    }
    .to_string()];
    let known: [(i32, &str); 13] = [
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_NOCTTY, "O_NOCTTY"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_NONBLOCK, "O_NONBLOCK"),
        (libc::O_DSYNC, "O_DSYNC"),
        (libc::O_DIRECT, "O_DIRECT"),
        // libc's O_LARGEFILE is 0 on x86-64; the kernel still reports its bit.
        (0o100000, "O_LARGEFILE"),
        (libc::O_DIRECTORY, "O_DIRECTORY"),
        (libc::O_NOFOLLOW, "O_NOFOLLOW"),
        (libc::O_NOATIME, "O_NOATIME"),
        (libc::O_CLOEXEC, "O_CLOEXEC"),
    ];
    let mut rest = flags & !libc::O_ACCMODE;
    // O_SYNC includes the O_DSYNC bit; name it once.
    if rest & libc::O_SYNC == libc::O_SYNC {
        out.push("O_SYNC".into());
        rest &= !libc::O_SYNC;
    }
    if rest & libc::O_PATH != 0 {
        out.push("O_PATH".into());
        rest &= !libc::O_PATH;
    }
    for (bit, name) in known {
        if rest & bit != 0 {
            out.push(name.into());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#o}"));
    }
    out.join("|")
}

/// `SA_RESTART|SA_SIGINFO` for `sigaction` flags.
pub fn sa_flags(flags: u64) -> Vec<String> {
    const KNOWN: [(u64, &str); 8] = [
        (0x0000_0001, "SA_NOCLDSTOP"),
        (0x0000_0002, "SA_NOCLDWAIT"),
        (0x0000_0004, "SA_SIGINFO"),
        (0x0400_0000, "SA_RESTORER"),
        (0x0800_0000, "SA_ONSTACK"),
        (0x1000_0000, "SA_RESTART"),
        (0x4000_0000, "SA_NODEFER"),
        (0x8000_0000, "SA_RESETHAND"),
    ];
    flag_names(flags, &KNOWN)
}

/// The names of the bits of `flags` that `known` names, then whatever is left in hex.
fn flag_names(flags: u64, known: &[(u64, &str)]) -> Vec<String> {
    let mut out: Vec<String> =
        known.iter().filter(|(b, _)| flags & b != 0).map(|(_, n)| n.to_string()).collect();
    let rest = flags & !known.iter().fold(0, |m, (b, _)| m | b);
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out
}

/// `RLIMIT_NOFILE` for a resource number.
pub fn rlimit(resource: u32) -> String {
    match stasis_engine::task::RLIMIT_NAMES.get(resource as usize) {
        Some(n) => n.to_string(),
        None => format!("rlimit {resource}"),
    }
}

/// `r-xp` as in `/proc/PID/maps`.
pub fn prot(prot: u32, shared: bool) -> String {
    use stasis_image::{PROT_EXEC, PROT_READ, PROT_WRITE};
    let c = |bit, ch| if prot & bit != 0 { ch } else { '-' };
    [
        c(PROT_READ, 'r'),
        c(PROT_WRITE, 'w'),
        c(PROT_EXEC, 'x'),
        if shared { 's' } else { 'p' },
    ]
    .iter()
    .collect()
}

/// Names of the extra mapping flags (`stasis_image::vmflags`).
pub fn vm_flags(flags: u64) -> Vec<String> {
    use stasis_image::vmflags::*;
    const KNOWN: [(u64, &str); 9] = [
        (GROWSDOWN, "growsdown"),
        (DONTFORK, "dontfork"),
        (WIPEONFORK, "wipeonfork"),
        (DONTDUMP, "dontdump"),
        (HUGEPAGE, "hugepage"),
        (NOHUGEPAGE, "nohugepage"),
        (MAYWRITE, "maywrite"),
        (LOCKED, "locked"),
        (MERGEABLE, "mergeable"),
    ];
    flag_names(flags, &KNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal(15), "SIGTERM");
        assert_eq!(signal(34), "SIGRTMIN+2");
        assert_eq!(signal(0), "signal 0");
        assert_eq!(signal_set((1 << 1) | (1 << 14)), ["SIGINT", "SIGTERM"]);
    }

    #[test]
    fn flag_names() {
        assert_eq!(
            open_flags(libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC),
            "O_WRONLY|O_APPEND|O_CLOEXEC"
        );
        assert_eq!(open_flags(libc::O_RDWR | libc::O_SYNC), "O_RDWR|O_SYNC");
        assert_eq!(
            sa_flags(0x1400_0004),
            ["SA_SIGINFO", "SA_RESTORER", "SA_RESTART"]
        );
        assert_eq!(prot(5, false), "r-xp");
        assert_eq!(prot(0, true), "---s");
        assert_eq!(rlimit(7), "RLIMIT_NOFILE");
        assert_eq!(syscall(35), Some("nanosleep"));
        assert!(restart_state(-516).unwrap().contains("EINTR"));
    }
}
