//! Harness for the end-to-end tests: runs the real `stasis` binary against
//! the C fixtures in tests/fixtures (built by build.rs; see fixture.h for
//! their protocol).
//!
//! Every process a test starts is owned by a [`Proc`] guard that kills (by
//! PID) and reaps it when dropped, also when an assertion fails midway.
//! Restored processes are children of `stasis restore`; once that exits
//! they are reparented to the test process, which [`init`] makes a child
//! subreaper, so they are reaped by PID like any child.

pub mod sys;

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Once};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a fixture may take to report READY.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stasis command may run: a 256 MiB dump takes well under a
/// second here, so this only bounds how long a hang blocks the suite.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fixture may take to verify its state and exit after SIGTERM
/// (bigmem re-reads 256 MiB), or to die after a dump killed it.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Held by every test of a test binary that restores a pseudo-terminal pair, and by every
/// test of that binary that opens pseudo-terminals, for as long as it runs. A pair comes
/// back as /dev/pts/N or the restore is refused, and between a dump and its restore N is
/// free: any pseudo-terminal opened meanwhile (a fixture or `script` starting, or another
/// restore, which opens /dev/ptmx until its own index comes) takes the lowest free index,
/// which may be N. Test binaries run one after the other; the lock is also a file lock
/// (flock on /tmp/stasis-tests-devpts.lock), so that test runs side by side on one machine
/// take turns too.
#[allow(dead_code)] // only the test files with pseudo-terminals use it
pub fn devpts_lock() -> DevptsLock {
    static DEVPTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = DEVPTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let path = "/tmp/stasis-tests-devpts.lock";
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    use std::os::fd::AsRawFd;
    stasis_sys::proc::flock(file.as_raw_fd(), libc::LOCK_EX).unwrap_or_else(|e| panic!("flock {path}: {e}"));
    DevptsLock { _file: file, _guard: guard }
}

/// See [`devpts_lock`]: held until dropped (closing the file lets the file lock go).
#[allow(dead_code)]
pub struct DevptsLock {
    _file: File,
    _guard: std::sync::MutexGuard<'static, ()>,
}

/// Once per test process: become a child subreaper.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| sys::set_child_subreaper().expect("prctl(PR_SET_CHILD_SUBREAPER)"));
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("STASIS_FIXTURE_DIR")).join(name)
}

/// A command that starts with stdio only (see [`sys::only_stdio_on_spawn`]) and dies
/// with the test (see [`sys::die_with_parent_on_spawn`]).
pub fn hermetic_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    sys::only_stdio_on_spawn(&mut cmd);
    sys::die_with_parent_on_spawn(&mut cmd);
    cmd
}

pub fn stasis_command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = hermetic_command(env!("CARGO_BIN_EXE_stasis"));
    cmd.args(args);
    cmd
}

// ---------------------------------------------------------------------------
// Temporary directories

/// A private (0700) directory under the system temp dir, removed on drop
/// unless STASIS_KEEP_TEMP is set (to inspect images and logs after a
/// failure).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "stasis-e2e-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("STASIS_KEEP_TEMP").is_some() {
            eprintln!("keeping {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------
// Process guards

/// A process this test is responsible for: a child it spawned, or a restored
/// process it adopted as subreaper. Dropped before [`Proc::wait`] succeeded,
/// it SIGKILLs the process and reaps it.
pub struct Proc {
    pid: i32,
    child: Option<Child>,
    what: String,
    reaped: bool,
}

impl Proc {
    pub fn spawned(child: Child, what: impl Into<String>) -> Proc {
        Proc {
            pid: child.id() as i32,
            child: Some(child),
            what: what.into(),
            reaped: false,
        }
    }

    /// A process that is, or will become once its parent exits, our child.
    pub fn adopted(pid: i32, what: impl Into<String>) -> Proc {
        Proc {
            pid,
            child: None,
            what: what.into(),
            reaped: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn signal(&self, sig: libc::c_int) {
        sys::kill(self.pid, sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) [{}]: {e}", self.pid, self.what));
    }

    /// Waits up to `timeout` for the process to end and reaps it. Panics on
    /// timeout (the guard then kills it).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        assert!(
            !self.reaped,
            "pid {} [{}] already reaped",
            self.pid, self.what
        );
        if !wait_for_exit(self.pid, timeout) {
            panic!(
                "pid {} [{}] still running after {timeout:?}: {}",
                self.pid,
                self.what,
                where_is(self.pid)
            );
        }
        let status = self.reap_now();
        self.reaped = true;
        status.unwrap_or_else(|e| {
            panic!(
                "reaping pid {} [{}]: {e} (not our child: was it reparented to the test?)",
                self.pid, self.what
            )
        })
    }

    /// The process was reaped by someone else (its parent, `stasis
    /// restore`), so there is nothing left to kill or wait for.
    pub fn disown(&mut self) {
        self.reaped = true;
    }

    fn reap_now(&mut self) -> io::Result<ExitStatus> {
        match &mut self.child {
            Some(child) => child.wait(),
            None => sys::waitpid(self.pid, 0)
                .map(|s| s.expect("waitpid without WNOHANG returned no status")),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            // The PID is still ours (unreaped), so it cannot have been reused.
            let _ = sys::kill(self.pid, libc::SIGKILL);
            let _ = self.reap_now();
        }
    }
}

/// What a process that does not end is doing, for the message of a timeout: its state,
/// tracer, signals (pending, blocked, caught), the call it is in and where the kernel
/// has it sleep, and the same for its children.
pub fn where_is(pid: i32) -> String {
    let one = |pid: i32| {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let fields: Vec<&str> = status
            .lines()
            .filter(|l| {
                ["State:", "TracerPid:", "SigPnd:", "ShdPnd:", "SigBlk:", "SigCgt:"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .collect();
        let read = |what: &str| {
            fs::read_to_string(format!("/proc/{pid}/{what}"))
                .map_or_else(|e| format!("({e})"), |t| t.trim().to_owned())
        };
        format!(
            "pid {pid} {}: {}; syscall {}; wchan {}",
            read("comm"),
            fields.join(", ").replace('\t', " "),
            read("syscall"),
            read("wchan")
        )
    };
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .map(one)
        .collect::<Vec<_>>()
        .join("\n")
}

/// True once `pid` has ended (zombie or gone), false after `timeout`.
fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return true,
        Err(e) => panic!("pidfd_open({pid}): {e}"),
    };
    !sys::poll_readable(&[pidfd.as_fd()], timeout)
        .expect("poll pidfd")
        .is_empty()
}

// ---------------------------------------------------------------------------
// /proc inspection

/// Fields of /proc/PID/stat after the command name: state and ppid.
pub fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

pub fn is_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

pub fn tracer_pid(pid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `cond` every millisecond until it holds; panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Asserts that no process `pid` exists (after a restore that must have
/// failed). A zombie means a process was created and died; it is reaped
/// (it can only be ours) and reported.
pub fn assert_no_process(pid: i32, context: &str) {
    if let Some((state, ppid)) = proc_state(pid) {
        let _ = sys::kill(pid, libc::SIGKILL);
        let _ = sys::waitpid(pid, 0);
        panic!("{context}: a process with pid {pid} appeared (state {state}, parent {ppid})");
    }
}

// ---------------------------------------------------------------------------
// Running commands

/// Runs `cmd` to completion with a timeout, capturing stdout and stderr.
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = Proc::spawned(child, what.clone()).wait(timeout);
    // Once the command has exited its pipes must close; one that stays open
    // was inherited by a process it left behind (the restored one).
    let collect = |rx: mpsc::Receiver<Vec<u8>>, name: &str| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                panic!("{name} of {what} still open after it exited: leaked to a child?")
            })
    };
    Output {
        status,
        stdout: collect(stdout, "stdout"),
        stderr: collect(stderr, "stderr"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// `dump -t PID -D IMAGE [extra...]`
pub fn dump_args(pid: i32, image: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "dump".into(),
        "-t".into(),
        pid.to_string().into(),
        "-D".into(),
        image.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// `restore -D IMAGE -d --pidfile PIDFILE`
pub fn restore_detached_args(image: &Path, pidfile: &Path) -> Vec<OsString> {
    vec![
        "restore".into(),
        "-D".into(),
        image.into(),
        "-d".into(),
        "--pidfile".into(),
        pidfile.into(),
    ]
}

/// `restore -D image --pidns -d --pidfile pidfile`.
#[allow(dead_code)] // only the tests of --pidns use it
pub fn restore_pidns_detached_args(image: &Path, pidfile: &Path) -> Vec<OsString> {
    let mut args = restore_detached_args(image, pidfile);
    args.insert(3, "--pidns".into());
    args
}

pub fn stasis<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(stasis_command(args), COMMAND_TIMEOUT)
}

fn describe(args: &[OsString], out: &Output) -> String {
    format!(
        "stasis {:?}: {}\n--- stderr:\n{}--- stdout:\n{}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

fn os_args<S: AsRef<OsStr>>(args: &[S]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Runs stasis and asserts success.
pub fn stasis_ok<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let out = stasis(args);
    assert!(out.status.success(), "{}", describe(&os_args(args), &out));
    out
}

/// Runs stasis, asserts it fails with exactly one line on stderr, and
/// returns that line.
pub fn stasis_error<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = stasis(args);
    let text = describe(&os_args(args), &out);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "expected a failing exit: {text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error: {text}");
    lines[0].to_owned()
}

/// Asserts that stasis fails with a one-line error containing every needle.
pub fn assert_refused<S: AsRef<OsStr>>(args: &[S], all_of: &[&str]) -> String {
    let line = stasis_error(args);
    for needle in all_of {
        assert!(
            line.contains(needle),
            "error {line:?} does not contain {needle:?}"
        );
    }
    line
}

/// Asserts that stasis fails with a one-line error containing at least one
/// of the needles.
pub fn assert_refused_any<S: AsRef<OsStr>>(args: &[S], any_of: &[&str]) -> String {
    let line = stasis_error(args);
    assert!(
        any_of.iter().any(|n| line.contains(n)),
        "error {line:?} contains none of {any_of:?}"
    );
    line
}

// ---------------------------------------------------------------------------
// Fixtures

/// Placeholder in fixture arguments for the fixture's temp dir.
pub const DIR_ARG: &str = "{dir}";

/// A running fixture (see tests/fixtures/fixture.h) in its own temp dir,
/// through any number of dump/restore rounds. Whatever incarnation is
/// current is killed and reaped on drop.
pub struct Fixture {
    name: String,
    // Declared before `dir` so the process goes before its directory.
    proc: Proc,
    log: PathBuf,
    dir: TempDir,
}

impl Fixture {
    /// Starts fixture `name` with `args` after the FIFO and waits for READY.
    /// An argument equal to [`DIR_ARG`] is replaced by the fixture's temp
    /// dir (for fixtures that need a scratch directory).
    pub fn start(name: &str, args: &[&str]) -> Fixture {
        init();
        let dir = TempDir::new(name);
        let fifo = dir.join("ready");
        let mut ready = open_ready_fifo(&fifo);
        let log = dir.join("log");
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log");

        let mut cmd = hermetic_command(fixture_path(name));
        cmd.arg(&fifo).stdin(Stdio::null()).stdout(out).stderr(err);
        for arg in args {
            if *arg == DIR_ARG {
                cmd.arg(dir.path());
            } else {
                cmd.arg(arg);
            }
        }
        sys::setsid_on_spawn(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning fixture {name}: {e}"));
        let fixture = Fixture {
            name: name.to_owned(),
            proc: Proc::spawned(child, name),
            log,
            dir,
        };
        if let Err(e) = wait_ready(&mut ready, fixture.pid()) {
            panic!("fixture {name}: {e}\n{}", fixture.log_text());
        }
        fixture
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    pub fn log_text(&self) -> String {
        let text =
            fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read log: {e})"));
        format!(
            "--- log of fixture {} (pid {}):\n{text}",
            self.name,
            self.pid()
        )
    }

    /// Empties the log, e.g. so that only a later incarnation's verdict
    /// counts. The fixture writes nothing before its verdict, so its file
    /// offset at any dump is 0 and stays valid.
    pub fn clear_log(&self) {
        File::create(&self.log).unwrap_or_else(|e| panic!("truncate {}: {e}", self.log.display()));
    }

    /// Runs stasis and asserts success, showing the fixture's log if not.
    fn stasis_ok(&self, args: &[OsString]) {
        let out = stasis(args);
        assert!(out.status.success(), "{}\n{}", describe(args, &out), self.log_text());
    }

    /// `stasis dump -t PID -D DIR/<image> <extra>`; asserts success and
    /// returns the image directory.
    pub fn dump(&self, image: &str, extra: &[&str]) -> PathBuf {
        let dir = self.dir.join(image);
        let args = dump_args(self.pid(), &dir, extra);
        self.stasis_ok(&args);
        dir
    }

    /// Reaps the process after a dump killed it; it must not have ended on
    /// its own (which would mean the dump disturbed it into a verdict).
    pub fn reap_killed(&mut self) {
        let status = self.proc.wait(EXIT_TIMEOUT);
        assert!(
            status.code().is_none(),
            "fixture {} exited by itself after the dump: {status}\n{}",
            self.name,
            self.log_text()
        );
    }

    /// `stasis restore -D image -d --pidfile ...`; asserts success and that
    /// the original PID came back, and takes charge of the new process.
    pub fn restore_detached(&mut self, image: &Path) {
        let pidfile = self.dir.join(format!(
            "pid-{}",
            image.file_name().unwrap_or_default().to_string_lossy()
        ));
        let args = restore_detached_args(image, &pidfile);
        self.stasis_ok(&args);
        self.adopt_restored(&pidfile);
    }

    /// Takes charge of the process a detached restore wrote to `pidfile`, and asserts
    /// that it came back under the original PID.
    pub fn adopt_restored(&mut self, pidfile: &Path) {
        let restored = read_pidfile(pidfile);
        // Adopt whatever runs now, so it is cleaned up even if it is wrong.
        self.proc = Proc::adopted(restored, format!("{} (restored)", self.name));
        assert_eq!(restored, self.pid(), "restored under another PID");
    }

    /// `stasis restore -D image --pidfile ...` in the background, without
    /// -d: stasis stays the restored process's parent and waits for it.
    /// Returns once the process runs (pidfile written, not a zombie, parent
    /// is that stasis), with the guard of the stasis process.
    pub fn restore_attached(&mut self, image: &Path) -> Proc {
        let pidfile = self.dir.join("pid-attached");
        let log = self.dir.join("restore-output");
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log");
        let mut cmd = stasis_command(&[
            OsStr::new("restore"),
            "-D".as_ref(),
            image.as_os_str(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ]);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let restore = Proc::spawned(
            cmd.spawn().expect("spawning stasis restore"),
            "stasis restore",
        );
        let pid = self.pid();
        wait_until(
            COMMAND_TIMEOUT,
            "the restored process runs under stasis restore",
            || {
                if wait_for_exit(restore.pid(), Duration::ZERO) {
                    panic!(
                        "stasis restore exited early:\n{}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                pidfile.exists()
                    && matches!(proc_state(pid), Some((s, ppid)) if s != 'Z' && ppid == restore.pid())
            },
        );
        assert_eq!(read_pidfile(&pidfile), pid, "restored under another PID");
        self.proc = Proc::adopted(pid, format!("{} (restored, attached)", self.name));
        restore
    }

    /// SIGTERM to a process restored by [`Fixture::restore_attached`]:
    /// stasis restore must pass on its exit status (0 for PASS, 1 for FAIL).
    pub fn finish_attached(mut self, mut restore: Proc, pass: bool) {
        let_runners_run(self.pid());
        self.proc.signal(libc::SIGTERM);
        let status = restore.wait(EXIT_TIMEOUT);
        // stasis reaped it; if it did not, it is ours now and the guard
        // kills it.
        assert!(
            proc_state(self.pid()).is_none(),
            "restored process outlived stasis restore ({status})"
        );
        self.proc.disown();
        self.assert_verdict(status, pass);
    }

    /// `rounds` times: dump (killing the process), reap, restore detached.
    pub fn checkpoint_rounds(&mut self, rounds: usize) {
        for round in 0..rounds {
            let image = self.dump(&format!("img{round}"), &[]);
            self.reap_killed();
            self.restore_detached(&image);
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let_runners_run(self.pid());
        self.proc.signal(libc::SIGTERM);
        self.proc.wait(EXIT_TIMEOUT)
    }

    /// SIGTERM; the fixture must verify its state and PASS.
    pub fn finish(mut self) {
        let status = self.terminate();
        self.assert_verdict(status, true);
    }

    /// Asserts the exit status and the last line of the log: "PASS" with
    /// status 0, or "FAIL: ..." with status 1.
    pub fn assert_verdict(&self, status: ExitStatus, pass: bool) {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().next_back().unwrap_or("");
        let ok = if pass {
            status.code() == Some(0) && last == "PASS"
        } else {
            status.code() == Some(1) && last.starts_with("FAIL: ")
        };
        assert!(
            ok,
            "fixture {} {}: {status}, last line {last:?}\n{}",
            self.name,
            if pass {
                "did not pass"
            } else {
                "did not fail as expected"
            },
            self.log_text()
        );
    }
}

fn read_pidfile(path: &Path) -> i32 {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading pidfile {}: {e}", path.display()));
    let trimmed = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("pidfile {} lacks a newline: {text:?}", path.display()));
    trimmed
        .parse()
        .unwrap_or_else(|e| panic!("pidfile {}: {text:?}: {e}", path.display()))
}

/// Creates the READY FIFO and opens its read end. Opened before the fixture
/// starts (non-blocking, so this does not wait for a writer) so that the
/// fixture's open for writing never blocks.
pub fn open_ready_fifo(path: &Path) -> File {
    sys::mkfifo(path, 0o600).unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Waits until a fixture wrote "READY\n" and closed the FIFO (EOF), so that
/// it holds no FIFO descriptor any more. Fails if `pid` (the fixture, or a
/// process it runs under) exits first or READY takes over READY_TIMEOUT.
pub fn wait_ready(fifo: &mut File, pid: i32) -> Result<(), String> {
    let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = sys::poll_readable(&[fifo.as_fd(), pidfd.as_fd()], left)
            .map_err(|e| format!("poll: {e}"))?;
        if ready.is_empty() {
            return Err(format!("no READY within {READY_TIMEOUT:?}: {}", where_is(pid)));
        }
        if ready[0] {
            let mut buf = [0u8; 64];
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("reading the FIFO: {e}")),
            }
        } else if ready[1] {
            return Err("exited before READY".to_owned());
        }
    }
    if got != b"READY\n" {
        return Err(format!(
            "wrote {:?} instead of READY",
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(())
}

/// DIR/pids of the tree fixture: role ("root", "A", "B", "A1") -> PID, as the tree sees
/// itself.
#[allow(dead_code)] // not every test file uses the tree fixture
pub fn tree_roles(dir: &Path) -> std::collections::BTreeMap<String, i32> {
    fs::read_to_string(dir.join("pids"))
        .expect("reading the fixture's pids")
        .lines()
        .map(|l| {
            let (role, pid) = l.split_once(' ').expect("ROLE PID");
            (role.to_owned(), pid.parse().expect("PID"))
        })
        .collect()
}

/// The processes of a fixture (DIR/pids: "ROLE PID" lines), killed by PID and
/// reaped on drop. Declared after the Fixture, so dropped before it: the root
/// is killed here too (its guard reaps it), so that the children come to the
/// test process, the subreaper, which reaps them.
#[allow(dead_code)] // only the tests of multi-process fixtures use it
pub struct Kids {
    root: i32,
    pub pids: Vec<(String, i32)>,
}

#[allow(dead_code)]
impl Kids {
    pub fn of(fixture: &Fixture) -> Kids {
        let path = fixture.dir().join("pids");
        let pids = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .lines()
            .map(|l| {
                let (role, pid) = l.split_once(' ').expect("ROLE PID");
                (role.to_owned(), pid.parse().expect("PID"))
            })
            .filter(|(role, _)| role != "root")
            .collect();
        Kids { root: fixture.pid(), pids }
    }

    pub fn pid(&self, role: &str) -> i32 {
        self.pids.iter().find(|(r, _)| r == role).map(|(_, p)| *p).expect("role")
    }

    pub fn ours(&self, pid: i32) -> bool {
        proc_state(pid).is_some_and(|(_, ppid)| {
            ppid == self.root || ppid == std::process::id() as i32 || self.pids.iter().any(|&(_, p)| p == ppid)
        })
    }

    /// After a dump killed the tree and the root was reaped.
    pub fn reap_dumped(&self) {
        self.reap().unwrap_or_else(|e| panic!("after the dump: {e}"));
    }

    /// Waits until every child is gone, reaping those that became ours.
    pub fn reap(&self) -> Result<(), String> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        for &(_, pid) in &self.pids {
            while let Some((state, ppid)) = proc_state(pid) {
                if state == 'Z' && ppid == std::process::id() as i32 {
                    let _ = sys::waitpid(pid, libc::WNOHANG);
                }
                if Instant::now() > deadline {
                    return Err(format!("child {pid} still there ({state}, parent {ppid})"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

impl Drop for Kids {
    fn drop(&mut self) {
        for &(_, pid) in &self.pids {
            if self.ours(pid) {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
        if proc_state(self.root).is_some_and(|(_, ppid)| ppid == std::process::id() as i32) {
            let _ = sys::kill(self.root, libc::SIGKILL);
        }
        if let Err(e) = self.reap() {
            eprintln!("cleaning up: {e}");
        }
    }
}

/// Fixtures that spin check on SIGTERM that they made progress since READY (or since the
/// restore). On a loaded machine a thread may not have run at all by then: before the
/// SIGTERM, every running thread of the tree under `root` gets two milliseconds of CPU
/// (as /proc/TID/schedstat counts it), or READY_TIMEOUT passes.
pub fn let_runners_run(root: i32) {
    fn tasks(pid: i32, out: &mut Vec<(i32, i32)>) {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else { return };
        for t in rd.flatten() {
            let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else { continue };
            out.push((pid, tid));
            let kids = fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
                tasks(k, out);
            }
        }
    }
    let running = |pid: i32, tid: i32| {
        fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
            .is_ok_and(|st| st.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('R')))
    };
    let runtime = |pid: i32, tid: i32| -> u64 {
        fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let mut all = Vec::new();
    tasks(root, &mut all);
    let start: Vec<(i32, i32, u64)> =
        all.into_iter().filter(|&(p, t)| running(p, t)).map(|(p, t)| (p, t, runtime(p, t))).collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline && !start.iter().all(|&(p, t, r0)| !running(p, t) || runtime(p, t) >= r0 + 2_000_000) {
        thread::sleep(Duration::from_millis(1));
    }
}

/// `rounds` times for a multi-process fixture: dump (killing the tree), reap it, restore.
#[allow(dead_code)] // only the tests of multi-process fixtures use it
pub fn kids_rounds(fixture: &mut Fixture, kids: &Kids, rounds: usize) {
    for r in 0..rounds {
        let dir = fixture.dump(&format!("img{r}"), &[]);
        fixture.reap_killed();
        kids.reap_dumped();
        fixture.restore_detached(&dir);
    }
}

/// The fixture's root and then its children must pass.
#[allow(dead_code)] // only the tests of multi-process fixtures use it
pub fn kids_finish(mut fixture: Fixture, kids: Kids) {
    let status = fixture.terminate();
    fixture.assert_verdict(status, true);
    kids.reap().unwrap_or_else(|e| panic!("{e}"));
}
