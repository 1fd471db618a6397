//! Pseudo-terminal pairs inside the dumped tree, and controlling terminals.
//!
//! The C fixture `pty` (see its header) checks itself: termios, window size,
//! packet mode, the slave's name, bytes queued both ways arriving exactly
//! once and in order (an unfinished canonical line staying unfinished), the
//! slave still being the controlling terminal of C's session with G's group
//! in the foreground, and ^C typed into the master reaching that group. From
//! outside, every round also checks /proc: C's and G's tty_nr is the slave
//! they hold, tpgid is G's group.
//!
//! The real program is a Python parent that runs bash under `pty.fork()` and
//! answers every number bash prints with that number, which bash reads back
//! and compares: a lost byte in either direction stalls the loop, a repeated
//! one shows up as a mismatch or a repeated number.
//!
//! Needs root, like the other end-to-end tests: `cargo test -p stasis --test pty`.

// Each test crate compiles the shared harness anew and uses only part of it. Every test
// here opens pseudo-terminals, so each holds `devpts_lock()` while it runs.
#[allow(dead_code)]
mod common;

use common::*;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Children of every thread of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<i32> = tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect();
    out.sort();
    out
}

/// /proc/PID/stat fields 4..=8: ppid, pgrp, session, tty_nr, tpgid.
fn links(pid: i32) -> [i32; 5] {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<i32> = rest.split(' ').skip(1).take(5).map(|v| v.parse().expect("number")).collect();
    f.try_into().expect("five fields")
}

/// The device number of `pid`'s descriptor `fd`, as /proc/PID/stat encodes tty_nr.
fn tty_nr_of_fd(pid: i32, fd: i32) -> i32 {
    let rdev = fs::metadata(format!("/proc/{pid}/fd/{fd}")).expect("stat fd").rdev();
    let (major, minor) = ((rdev >> 8) & 0xfff, (rdev & 0xff) | ((rdev >> 12) & !0xff));
    ((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as i32
}

fn fd_target(pid: i32, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("readlink").to_string_lossy().into_owned()
}

/// The processes of a tree under a root whose guard lives elsewhere. On drop, every one
/// still there is killed by PID (if it is still the one we know: its parent is another
/// member or us) and reaped once it is our zombie.
struct Members {
    root: i32,
    pids: Vec<i32>,
}

impl Members {
    fn ours(&self, pid: i32) -> bool {
        let me = std::process::id() as i32;
        proc_state(pid).is_some_and(|(_, ppid)| ppid == me || ppid == self.root || self.pids.contains(&ppid))
    }

    /// After a dump killed the tree: each member becomes our zombie (the subreaper's);
    /// reap it so that its PID is free for the restore.
    fn reap_dumped(&self) {
        for &pid in &self.pids {
            wait_until(EXIT_TIMEOUT, &format!("member {pid} is our zombie"), || {
                matches!(proc_state(pid), Some(('Z', ppid)) if ppid == std::process::id() as i32)
                    || proc_state(pid).is_none()
            });
            if proc_state(pid).is_some() {
                sys::waitpid(pid, 0).expect("reap member");
            }
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if self.ours(pid) && is_alive(pid) {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
        for &pid in &self.pids {
            let _ = sys::waitpid(pid, libc::WNOHANG);
        }
    }
}

/// C and G of the pty fixture.
fn fixture_members(fixture: &Fixture) -> (i32, i32) {
    let c = children(fixture.pid());
    assert_eq!(c.len(), 1, "the root has one child: {c:?}");
    let g = children(c[0]);
    assert_eq!(g.len(), 1, "C has one child: {g:?}");
    (c[0], g[0])
}

/// From outside: the slave on G's stdin is the controlling terminal of C and G, with G's
/// group in the foreground; C leads the session.
fn assert_session(c: i32, g: i32) {
    let tty = tty_nr_of_fd(g, 0);
    let [_, c_pgrp, c_sid, c_tty, c_tpgid] = links(c);
    let [g_ppid, g_pgrp, g_sid, g_tty, g_tpgid] = links(g);
    assert_eq!((c_pgrp, c_sid), (c, c), "C leads its session and group");
    assert_eq!((g_ppid, g_pgrp, g_sid), (c, g, c), "G: parent, group, session");
    assert_eq!((c_tty, g_tty), (tty, tty), "controlling terminal of C and G");
    assert_eq!((c_tpgid, g_tpgid), (g, g), "foreground group");
    assert!(fd_target(g, 0).starts_with("/dev/pts/"), "G's stdin is {}", fd_target(g, 0));
}

fn pty_rounds(mode: &str, rounds: usize) {
    let mut fixture = Fixture::start("pty", &[mode]);
    let (c, g) = fixture_members(&fixture);
    let members = Members { root: fixture.pid(), pids: vec![c, g] };
    assert_session(c, g);
    let slave = fd_target(g, 0);
    for round in 0..rounds {
        let image = fixture.dump(&format!("img{round}"), &[]);
        fixture.reap_killed();
        members.reap_dumped();
        fixture.restore_detached(&image);
        assert_eq!(fixture_members(&fixture), (c, g), "round {round}: the tree differs");
        assert_session(c, g);
        // The fixture fails if the slave's name changed; say so here first.
        assert_eq!(fd_target(g, 0), slave, "round {round}: the slave came back under another name");
    }
    fixture.finish();
    drop(members);
}

/// Opens /dev/ptmx until the pair /dev/pts/`index` is ours (the others are closed again).
/// The index is free, and the kernel hands out the lowest free one.
fn take_pts(index: u32) -> fs::File {
    let mut below = Vec::new();
    loop {
        let m = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")
            .expect("open /dev/ptmx");
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", m.as_raw_fd())).expect("fdinfo of /dev/ptmx");
        let got: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("tty-index:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("tty-index in the fdinfo of /dev/ptmx");
        assert!(got <= index, "/dev/pts/{index} was taken before the test could take it (got {got})");
        if got == index {
            return m;
        }
        below.push(m);
    }
}

/// The tree knows its terminal by name, so a pair comes back as /dev/pts/N or not at all:
/// with N taken, the restore is refused naming it and no process appears; once N is free
/// again, the same image restores and the fixture passes (it checks the slave's name).
#[test]
fn restore_with_the_pts_index_taken_is_refused() {
    let _devpts = devpts_lock();
    let mut fixture = Fixture::start("pty", &["canon"]);
    let (c, g) = fixture_members(&fixture);
    let members = Members { root: fixture.pid(), pids: vec![c, g] };
    let slave = fd_target(g, 0);
    let index: u32 = slave.strip_prefix("/dev/pts/").and_then(|n| n.parse().ok()).expect("G's stdin is /dev/pts/N");
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    members.reap_dumped();

    let taken = take_pts(index);
    let pidfile = fixture.dir().join("pid-refused");
    let line = assert_refused(&restore_detached_args(&image, &pidfile), &[&format!("/dev/pts/{index} "), "taken"]);
    assert!(line.contains("pid "), "the error names the holder of the master: {line}");
    for pid in [fixture.pid(), c, g] {
        assert!(proc_state(pid).is_none(), "pid {pid} exists after a refused restore");
    }
    assert!(!pidfile.exists(), "a pidfile was written");
    drop(taken);

    fixture.restore_detached(&image);
    assert_eq!(fixture_members(&fixture), (c, g), "the tree differs");
    assert_session(c, g);
    assert_eq!(fd_target(g, 0), slave, "the slave came back under another name");
    fixture.finish();
    drop(members);
}

#[test]
fn pty_fixture_alone_passes() {
    let _devpts = devpts_lock();
    pty_rounds("canon", 0);
    pty_rounds("raw", 0);
}

#[test]
fn pty_canonical_one_round() {
    let _devpts = devpts_lock();
    pty_rounds("canon", 1);
}

#[test]
fn pty_canonical_three_rounds() {
    let _devpts = devpts_lock();
    pty_rounds("canon", 3);
}

#[test]
fn pty_raw_packet_mode_one_round() {
    let _devpts = devpts_lock();
    pty_rounds("raw", 1);
}

/// --leave-running reads the queued bytes out and must put every one back: the fixture,
/// left running, then still passes (its checks of the queued bytes included).
#[test]
fn pty_leave_running_puts_queued_bytes_back() {
    let _devpts = devpts_lock();
    for mode in ["canon", "raw"] {
        let fixture = Fixture::start("pty", &[mode]);
        let (c, g) = fixture_members(&fixture);
        let members = Members { root: fixture.pid(), pids: vec![c, g] };
        fixture.dump("img", &["--leave-running"]);
        assert_session(c, g);
        fixture.finish();
        drop(members);
    }
}

/// C alone holds the slave; its master is in the root, outside the dumped tree: refused
/// naming the descriptor and --shell-job, and the whole fixture runs on unharmed.
#[test]
fn a_slave_whose_master_is_outside_is_refused() {
    let _devpts = devpts_lock();
    let fixture = Fixture::start("pty", &["canon"]);
    let (c, g) = fixture_members(&fixture);
    let members = Members { root: fixture.pid(), pids: vec![c, g] };
    let image = fixture.dir().join("img");
    let line = assert_refused(&dump_args(c, &image, &[]), &["fd 0", "/dev/pts/", "--shell-job"]);
    assert!(line.contains(&format!("pid {c}")), "{line}");
    assert_session(c, g);
    fixture.finish();
    drop(members);
}

// ---------------------------------------------------------------------------
// A real program: bash under Python's pty.fork()

/// argv[1]: OUT, where the parent copies everything bash writes to the terminal.
const PTY_PARENT: &str = r#"
import os, pty, sys
SCRIPT = ('stty -echo; i=0; while :; do i=$((i+1)); echo $i; read -r n || exit 1; '
          '[ "$n" = "$i" ] || { echo "MISMATCH $i $n"; exit 1; }; done')
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
pid, master = pty.fork()
if pid == 0:
    os.execvp("bash", ["bash", "-c", SCRIPT])
pending = b""
while True:
    try:
        data = os.read(master, 4096)
    except OSError:
        break
    if not data:
        break
    os.write(out, data)
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        line = line.strip(b"\r")
        if line.isdigit():
            os.write(master, line + b"\n")
os.waitpid(pid, 0)
sys.exit(1)
"#;

/// The numbers in OUT: 1, 2, 3, ... with nothing lost, repeated or mismatched; only the
/// last line may be cut short. Returns how many.
fn assert_counting(out: &Path) -> usize {
    let text = fs::read_to_string(out).expect("read OUT");
    let (complete, partial) = text.split_at(text.rfind('\n').map_or(0, |i| i + 1));
    let mut count = 0;
    for line in complete.lines() {
        let line = line.trim_end_matches('\r');
        count += 1;
        assert_eq!(line, count.to_string(), "line {count} of {}", out.display());
    }
    assert!((count + 1).to_string().starts_with(partial.trim_end_matches('\r')), "OUT ends in {partial:?}");
    count
}

fn numbers_in(out: &Path) -> usize {
    fs::read(out).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

fn python_pty(rounds: usize) {
    init();
    let dir = TempDir::new("python-pty");
    let script = dir.join("parent.py");
    fs::write(&script, PTY_PARENT).expect("write the Python program");
    let out = dir.join("out");
    let log = dir.join("log");
    let mut cmd = hermetic_command("python3");
    cmd.arg(&script).arg(&out).stdin(Stdio::null());
    cmd.stdout(fs::File::create(&log).expect("log")).stderr(fs::File::create(dir.join("err")).expect("err"));
    sys::setsid_on_spawn(&mut cmd);
    let mut root = Proc::spawned(cmd.spawn().expect("spawn python3"), "python pty parent");
    let pid = root.pid();
    let grow = |at_least: usize| {
        wait_until(Duration::from_secs(30), &format!("OUT has {at_least} lines"), || {
            assert!(is_alive(pid), "the Python parent ended: {}", fs::read_to_string(dir.join("err")).unwrap_or_default());
            numbers_in(&out) >= at_least
        })
    };
    grow(100);
    let bash = children(pid);
    assert_eq!(bash.len(), 1, "python has one child: {bash:?}");
    let members = Members { root: pid, pids: bash.clone() };
    let [_, pgrp, sid, tty, tpgid] = links(bash[0]);
    assert_eq!((pgrp, sid, tpgid), (bash[0], bash[0], bash[0]), "bash leads its session, in the foreground");
    assert_eq!(tty, tty_nr_of_fd(bash[0], 0), "bash's controlling terminal is its stdin");
    for round in 0..rounds {
        let image = dir.join(format!("img{round}"));
        stasis_ok(&dump_args(pid, &image, &[]));
        let status = root.wait(EXIT_TIMEOUT);
        assert!(status.code().is_none(), "python exited by itself: {status}");
        members.reap_dumped();
        let pidfile = dir.join(format!("pid{round}"));
        stasis_ok(&restore_detached_args(&image, &pidfile));
        root = Proc::adopted(pid, "python pty parent (restored)");
        assert_eq!(links(bash[0])[..4], [pid, bash[0], bash[0], tty], "bash after round {round}");
        assert_eq!(links(bash[0])[4], bash[0], "foreground group after round {round}");
        grow(numbers_in(&out) + 100);
    }
    // Stop the loop: kill bash (our zombie once python ends) and python.
    sys::kill(bash[0], libc::SIGKILL).expect("kill bash");
    root.wait(EXIT_TIMEOUT);
    members.reap_dumped();
    let n = assert_counting(&out);
    assert!(n >= 100 * (rounds + 1), "only {n} numbers");
}

#[test]
fn bash_under_python_pty_fork_one_round() {
    let _devpts = devpts_lock();
    python_pty(1);
}

#[test]
fn bash_under_python_pty_fork_three_rounds() {
    let _devpts = devpts_lock();
    python_pty(3);
}

// ---------------------------------------------------------------------------
// --shell-job: a session leader whose controlling terminal is the shell's
//
// `setsid -c` in a shell under `script` makes the counter fixture lead a
// session of its own with script's terminal as controlling terminal. It is
// refused without --shell-job; with it, a restore under another `script`
// gives it the restoring terminal as its controlling terminal (taken from
// the restoring shell's session), with its group in the foreground, and its
// PASS arrives on that terminal.

/// `script -qec CMD /dev/null` with its terminal output going to `output`.
fn spawn_in_pty(shell_cmd: &str, output: &Path, what: &str) -> Proc {
    let mut cmd = hermetic_command("script");
    cmd.args(["-qec", shell_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(output).expect("create script output"))
        .stderr(Stdio::null());
    Proc::spawned(cmd.spawn().expect("spawning script (util-linux)"), what)
}

fn shell_quote(s: &std::ffi::OsStr) -> String {
    format!("'{}'", s.to_str().expect("UTF-8 path").replace('\'', r"'\''"))
}

/// The process whose command line is exactly `argv`.
fn find_by_argv(argv: &[&std::ffi::OsStr]) -> Option<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.as_encoded_bytes().iter().copied().chain([0])).collect();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|pid: &i32| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
}

#[test]
fn a_session_leader_on_the_shell_terminal_gets_the_restoring_terminal() {
    let _devpts = devpts_lock();
    init();
    let dir = TempDir::new("shell-job-leader");
    let bin = fixture_path("counter");
    let fifo = dir.join("ready");
    let mut ready = open_ready_fifo(&fifo);
    let job = format!("setsid -c {} {}; true", shell_quote(bin.as_os_str()), shell_quote(fifo.as_os_str()));
    let mut script = spawn_in_pty(&job, &dir.join("pty-before"), "script (original)");
    wait_ready(&mut ready, script.pid()).expect("fixture in script");
    let pid = find_by_argv(&[bin.as_os_str(), fifo.as_os_str()]).expect("fixture process");
    let mut original = Proc::adopted(pid, "counter under setsid -c");
    let [_, pgrp, sid, tty, tpgid] = links(pid);
    assert_eq!((pgrp, sid, tpgid), (pid, pid, pid), "setsid -c: a session leader in the foreground");
    assert_eq!(tty, tty_nr_of_fd(pid, 0), "its controlling terminal is script's");

    let image = dir.join("img");
    assert_refused(&dump_args(pid, &image, &[]), &["--shell-job"]);
    assert!(is_alive(pid), "the fixture died after a refused dump");
    stasis_ok(&dump_args(pid, &image, &["--shell-job"]));
    script.wait(EXIT_TIMEOUT);
    wait_until(EXIT_TIMEOUT, "the dumped fixture is gone", || proc_state(pid).is_none());
    original.disown();

    let pidfile = dir.join("pid");
    let restore = format!(
        "{} restore --shell-job -D {} --pidfile {}",
        shell_quote(std::ffi::OsStr::new(env!("CARGO_BIN_EXE_stasis"))),
        shell_quote(image.as_os_str()),
        shell_quote(pidfile.as_os_str())
    );
    let output = dir.join("pty-after");
    let mut script = spawn_in_pty(&restore, &output, "script (restore)");
    wait_until(COMMAND_TIMEOUT, "the restored fixture runs", || {
        assert!(is_alive(script.pid()), "script exited: {}", fs::read_to_string(&output).unwrap_or_default());
        pidfile.exists() && is_alive(pid)
    });
    let mut restored = Proc::adopted(pid, "counter restored in script");
    let (_, stasis) = proc_state(pid).expect("restored process");
    let [_, pgrp, sid, tty, tpgid] = links(pid);
    assert_eq!((pgrp, sid, tpgid), (pid, pid, pid), "restored: a session leader in the foreground");
    assert_eq!(tty, tty_nr_of_fd(stasis, 0), "restored: its controlling terminal is the restoring one");

    let_runners_run(pid);
    restored.signal(libc::SIGTERM);
    let status = script.wait(EXIT_TIMEOUT);
    restored.disown(); // reaped by its parent, stasis restore
    let text = fs::read_to_string(&output).expect("read pty output");
    let last = text.lines().map(|l| l.trim_end_matches('\r')).rfind(|l| !l.is_empty());
    assert!(status.success() && last == Some("PASS"), "{status}, terminal output:\n{text}");
}
