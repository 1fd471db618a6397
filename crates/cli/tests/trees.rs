//! End-to-end tests of process trees: `stasis dump -t PID` takes the whole
//! tree under PID and a restore brings it back with the same PIDs, parents,
//! process groups and sessions, shared open files and the pipes between its
//! members (unread data, capacity, flags).
//!
//! The C fixtures `tree` and `pipes` check themselves (see their headers);
//! the real programs (a bash pipeline, a Python program with threads and a
//! subprocess) are checked from here.  Every test also compares the tree's
//! shape in /proc before the dump and after the restore, and owns all of its
//! processes through a [`Tree`] guard, which kills and reaps them by PID.
//!
//! Needs root, like the e2e tests: `cargo test -p stasis --test trees`.

#[allow(dead_code)] // shared with e2e.rs, which uses the rest
mod common;

use common::*;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Processes as /proc shows them

/// What must survive a checkpoint: a process's name and its links.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kin {
    comm: String,
    ppid: i32,
    pgid: i32,
    sid: i32,
}

#[derive(Debug)]
struct Stat {
    state: char,
    kin: Kin,
}

/// /proc/PID/stat (also readable for zombies: they keep their group and
/// session until reaped).
fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let mut fields = text[close + 2..].split(' ');
    let state = fields.next()?.chars().next()?;
    let mut number = || fields.next()?.parse().ok();
    Some(Stat {
        state,
        kin: Kin {
            comm: text[open + 1..close].to_owned(),
            ppid: number()?,
            pgid: number()?,
            sid: number()?,
        },
    })
}

fn all_processes() -> impl Iterator<Item = (i32, Stat)> {
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
}

/// Children of every thread of `pid` (a thread that forks is the parent).
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Adds the descendants of `pid` down to `depth` generations.
fn add_descendants(pid: i32, depth: usize, out: &mut BTreeSet<i32>) {
    if depth == 0 {
        return;
    }
    for child in children(pid) {
        if out.insert(child) {
            add_descendants(child, depth - 1, out);
        }
    }
}

/// A depth for [`shape`] that takes the whole tree.
const ALL: usize = usize::MAX;

/// pid -> kin of `root` and its descendants down to `depth` generations.
type Shape = BTreeMap<i32, Kin>;

fn shape(root: i32, depth: usize) -> Shape {
    let mut pids = BTreeSet::from([root]);
    add_descendants(root, depth, &mut pids);
    pids.into_iter()
        .filter_map(|pid| Some((pid, stat(pid)?.kin)))
        .collect()
}

fn our_pid() -> i32 {
    std::process::id() as i32
}

// ---------------------------------------------------------------------------
// The processes of a tree

/// Owns the processes of the tree under `root` other than the root itself,
/// whose guard (in a Fixture or Job) is created first and so dropped after
/// this one. On drop, kills and reaps every one of them that is left.
///
/// Members are found in two ways: the root's descendants (while the root is
/// still our unreaped process, so its PID is the tree's), and every process
/// in the root's session, which also finds descendants whose parent died:
/// they come to the test process, the subreaper. Once the root is gone the
/// session's PID could be reused, so then only such orphans count.
struct Tree {
    root: i32,
    root_reaped: Cell<bool>,
}

impl Tree {
    fn new(root: i32) -> Tree {
        Tree {
            root,
            root_reaped: Cell::new(false),
        }
    }

    fn root_owned(&self) -> bool {
        !self.root_reaped.get() && proc_state(self.root).is_some_and(|(_, ppid)| ppid == our_pid())
    }

    fn members(&self) -> BTreeMap<i32, Stat> {
        let owned = self.root_owned();
        let mut pids: BTreeSet<i32> = all_processes()
            .filter(|(_, s)| s.kin.sid == self.root && (owned || s.kin.ppid == our_pid()))
            .map(|(pid, _)| pid)
            .collect();
        if owned {
            add_descendants(self.root, ALL, &mut pids);
        }
        pids.remove(&self.root);
        pids.into_iter()
            .filter_map(|pid| Some((pid, stat(pid)?)))
            .collect()
    }

    /// Reaps members as they become zombies of ours, until none is left;
    /// with `kill`, SIGKILLs the root (not reaped: that is its guard's job)
    /// and every live member first. Returns the reaped PIDs, or what was
    /// still there after EXIT_TIMEOUT.
    fn clear(&self, kill: bool) -> Result<BTreeSet<i32>, String> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let mut reaped = BTreeSet::new();
        loop {
            // Listed before anything is killed: the walk from the root only
            // sees its descendants while they are still its descendants.
            let members = self.members();
            if kill && self.root_owned() {
                let _ = sys::kill(self.root, libc::SIGKILL);
            }
            if members.is_empty() {
                return Ok(reaped);
            }
            for (&pid, s) in &members {
                if s.state == 'Z' && s.kin.ppid == our_pid() {
                    if let Ok(Some(_)) = sys::waitpid(pid, libc::WNOHANG) {
                        reaped.insert(pid);
                    }
                } else if kill && s.state != 'Z' {
                    let _ = sys::kill(pid, libc::SIGKILL);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "processes of the tree of {} still there after {EXIT_TIMEOUT:?}: {members:?}",
                    self.root
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// After a dump, which kills the tree: reaps the members, and fails if
    /// any of them lives on. Called before the root is reaped, so that its
    /// PID still names the tree.
    fn reap_dumped(&self) {
        self.clear(false)
            .unwrap_or_else(|e| panic!("after the dump: {e}"));
    }

    /// SIGTERM to the root, which must give its verdict after its
    /// descendants are gone.
    fn finish(&self, mut root: impl RootOwner, pass: bool) {
        let status = root.terminate();
        self.root_reaped.set(true);
        let orphans = self.clear(true);
        root.assert_verdict(status, pass);
        let orphans = orphans.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            orphans.is_empty(),
            "processes outlived the root {}: {orphans:?}",
            self.root
        );
    }

    /// SIGKILL to every process of the tree, root included.
    fn kill(&self, root: &mut impl RootOwner) {
        self.clear(true).unwrap_or_else(|e| panic!("{e}"));
        root.reap_killed();
        self.root_reaped.set(true);
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Err(e) = self.clear(true) {
            eprintln!("cleaning up: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Checkpoints of a tree

/// The owner of a tree's root process, as a checkpoint round needs it.
trait RootOwner {
    fn pid(&self) -> i32;
    /// Dumps the tree into image `name`, asserting success.
    fn dump(&self, name: &str) -> PathBuf;
    /// Reaps the root after a dump (or a SIGKILL) ended it.
    fn reap_killed(&mut self);
    /// Restores detached, asserting that the root's PID came back.
    fn restore_detached(&mut self, image: &Path);
    /// SIGTERM; returns the exit status.
    fn terminate(&mut self) -> ExitStatus;
    /// Exit 0 with "PASS" as the last log line, or 1 with "FAIL: ...".
    fn assert_verdict(&self, status: ExitStatus, pass: bool);
}

impl RootOwner for Fixture {
    fn pid(&self) -> i32 {
        Fixture::pid(self)
    }
    fn dump(&self, name: &str) -> PathBuf {
        Fixture::dump(self, name, &[])
    }
    fn reap_killed(&mut self) {
        Fixture::reap_killed(self)
    }
    fn restore_detached(&mut self, image: &Path) {
        Fixture::restore_detached(self, image)
    }
    fn terminate(&mut self) -> ExitStatus {
        Fixture::terminate(self)
    }
    fn assert_verdict(&self, status: ExitStatus, pass: bool) {
        Fixture::assert_verdict(self, status, pass)
    }
}

/// Dump (which kills the tree), reap, restore detached; the tree must be
/// the same before and after, down to `depth` generations.
fn checkpoint_round(root: &mut impl RootOwner, tree: &Tree, image: &str, depth: usize) {
    let before = shape(root.pid(), depth);
    let dir = root.dump(image);
    tree.reap_dumped();
    root.reap_killed();
    root.restore_detached(&dir);
    let after = shape(root.pid(), depth);
    assert_eq!(after, before, "{image}: the restored tree differs");
}

fn checkpoint_rounds(root: &mut impl RootOwner, tree: &Tree, rounds: usize) {
    for round in 0..rounds {
        checkpoint_round(root, tree, &format!("img{round}"), ALL);
    }
}

// ---------------------------------------------------------------------------
// Real programs

/// A real program started like the fixtures: as a session leader, stdin
/// /dev/null, stdout and stderr into DIR/log.
struct Job {
    name: String,
    root: Proc,
    log: PathBuf,
    dir: TempDir,
}

impl Job {
    /// `cmd` comes from [`hermetic_command`].
    fn start(name: &str, dir: TempDir, mut cmd: Command) -> Job {
        init();
        let log = dir.join("log");
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        sys::setsid_on_spawn(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Job {
            name: name.to_owned(),
            root: Proc::spawned(child, name),
            log,
            dir,
        }
    }

    fn log_text(&self) -> String {
        let text =
            fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read log: {e})"));
        format!(
            "--- log of {} (pid {}):\n{text}",
            self.name,
            self.root.pid()
        )
    }
}

impl RootOwner for Job {
    fn pid(&self) -> i32 {
        self.root.pid()
    }

    fn dump(&self, name: &str) -> PathBuf {
        let image = self.dir.join(name);
        let out = stasis(&dump_args(self.pid(), &image, &[]));
        assert!(
            out.status.success(),
            "dump of {}: {}\n{}\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        image
    }

    fn reap_killed(&mut self) {
        let status = self.root.wait(EXIT_TIMEOUT);
        assert!(
            status.code().is_none(),
            "{} exited by itself: {status}\n{}",
            self.name,
            self.log_text()
        );
    }

    fn restore_detached(&mut self, image: &Path) {
        let pidfile = self.dir.join(format!(
            "pid-{}",
            image.file_name().unwrap_or_default().to_string_lossy()
        ));
        stasis_ok(&restore_detached_args(image, &pidfile));
        let text = fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pidfile.display()));
        let pid: i32 = text
            .trim_end()
            .parse()
            .unwrap_or_else(|e| panic!("pidfile {text:?}: {e}"));
        self.root = Proc::adopted(pid, format!("{} (restored)", self.name));
        assert_eq!(pid, self.pid(), "restored under another PID");
    }

    fn terminate(&mut self) -> ExitStatus {
        self.root.signal(libc::SIGTERM);
        self.root.wait(EXIT_TIMEOUT)
    }

    fn assert_verdict(&self, status: ExitStatus, pass: bool) {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().next_back().unwrap_or("");
        let (code, ok) = if pass {
            (0, last == "PASS")
        } else {
            (1, last.starts_with("FAIL: "))
        };
        assert!(
            ok && status.code() == Some(code),
            "{}: {status}, want exit {code}\n{}",
            self.name,
            self.log_text()
        );
    }
}

// ---------------------------------------------------------------------------
// The tree fixture

/// DIR/pids of the tree fixture: role ("root", "A", "B", "A1") -> PID.
fn roles(fixture: &Fixture) -> BTreeMap<String, i32> {
    let path = fixture.dir().join("pids");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|line| {
            let (role, pid) = line.split_once(' ').expect("ROLE PID");
            (role.to_owned(), pid.parse().expect("PID"))
        })
        .collect()
}

/// The fixture's own layout, seen from outside: who is whose parent, and
/// that only B leads a process group of its own.
fn assert_tree_layout(fixture: &Fixture) {
    let roles = roles(fixture);
    let kin = |role: &str| stat(roles[role]).expect("live process").kin;
    let (root, a, b) = (roles["root"], roles["A"], roles["B"]);
    assert_eq!(root, fixture.pid());
    let links = |k: Kin| (k.ppid, k.pgid, k.sid);
    assert_eq!(links(kin("A")), (root, root, root), "A");
    assert_eq!(links(kin("B")), (root, b, root), "B");
    assert_eq!(links(kin("A1")), (a, root, root), "A1");
    assert_eq!(shape(root, ALL).len(), 4, "tree size");
}

/// The fixtures without stasis: each must pass when left alone.
#[test]
fn tree_fixture_alone_passes() {
    let fixture = Fixture::start("tree", &[DIR_ARG]);
    let tree = Tree::new(fixture.pid());
    assert_tree_layout(&fixture);
    tree.finish(fixture, true);
}

/// ... and fail when a member dies: here A1, killed as a bad restore might
/// lose it.
#[test]
fn tree_fixture_fails_when_a_grandchild_is_killed() {
    let fixture = Fixture::start("tree", &[DIR_ARG]);
    let tree = Tree::new(fixture.pid());
    sys::kill(roles(&fixture)["A1"], libc::SIGKILL).expect("kill A1");
    tree.finish(fixture, false);
}

fn tree_round_trip(rounds: usize) {
    let mut fixture = Fixture::start("tree", &[DIR_ARG]);
    let tree = Tree::new(fixture.pid());
    assert_tree_layout(&fixture);
    checkpoint_rounds(&mut fixture, &tree, rounds);
    tree.finish(fixture, true);
}

#[test]
fn tree_one_round() {
    tree_round_trip(1);
}

#[test]
fn tree_three_rounds() {
    tree_round_trip(3);
}

/// The numbers in `text`, to find a PID in an error message.
fn numbers_in(text: &str) -> Vec<i32> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// A1 holds an unsupported descriptor at fd 20: the dump must be refused
/// naming A1, the fd and its kind, and leave the whole tree running
/// undisturbed (and passing).
fn tree_with_unsupported_fd(kind: &str) {
    let fixture = Fixture::start("tree", &[DIR_ARG, kind]);
    let tree = Tree::new(fixture.pid());
    let a1 = roles(&fixture)["A1"];
    let before = shape(fixture.pid(), ALL);
    let line = assert_refused(
        &dump_args(fixture.pid(), &fixture.dir().join("img"), &[]),
        &["fd 20", kind],
    );
    assert!(
        numbers_in(&line).contains(&a1),
        "error {line:?} does not name A1 (pid {a1})"
    );
    for &pid in before.keys() {
        let state = stat(pid).map(|s| s.state);
        assert!(
            matches!(state, Some('R' | 'S')),
            "pid {pid} is {state:?} after the refused dump"
        );
        assert_eq!(tracer_pid(pid), Some(0), "pid {pid} is still traced");
    }
    assert_eq!(shape(fixture.pid(), ALL), before);
    tree.finish(fixture, true);
}

#[test]
fn tree_with_a_socket_is_refused() {
    tree_with_unsupported_fd("socket");
}

#[test]
fn tree_with_an_inotify_instance_is_refused() {
    tree_with_unsupported_fd("inotify");
}

// ---------------------------------------------------------------------------
// The pipes fixture

/// The parent's read end of P1, which holds the child's first 10000 bytes.
const PIPES_P1_READ_FD: i32 = 10;

#[test]
fn pipes_fixture_alone_passes() {
    let fixture = Fixture::start("pipes", &[]);
    let tree = Tree::new(fixture.pid());
    assert_eq!(shape(fixture.pid(), ALL).len(), 2, "tree size");
    tree.finish(fixture, true);
}

/// Bytes read from P1 behind the parent's back (through /proc, a new open
/// file description of the same pipe) are lost to it, as they would be in
/// a restore that drops pipe contents: it must fail.
#[test]
fn pipes_fixture_fails_when_queued_bytes_are_stolen() {
    let fixture = Fixture::start("pipes", &[]);
    let tree = Tree::new(fixture.pid());
    let path = format!("/proc/{}/fd/{PIPES_P1_READ_FD}", fixture.pid());
    let mut pipe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    let mut stolen = [0u8; 100];
    pipe.read_exact(&mut stolen).expect("read from P1");
    tree.finish(fixture, false);
}

fn pipes_round_trip(rounds: usize) {
    let mut fixture = Fixture::start("pipes", &[]);
    let tree = Tree::new(fixture.pid());
    checkpoint_rounds(&mut fixture, &tree, rounds);
    tree.finish(fixture, true);
}

#[test]
fn pipes_one_round() {
    pipes_round_trip(1);
}

#[test]
fn pipes_three_rounds() {
    pipes_round_trip(3);
}

// ---------------------------------------------------------------------------
// A bash pipeline
//
// The root bash runs a pipeline of two children: a subshell printing
// consecutive numbers, one per line, forking a `sleep` between them, and a
// `cat` copying them from the pipe into OUT. Numbers queued in the pipe at
// the dump must come back with it, and cat's offset in OUT too, or OUT
// shows a gap or a repetition.

const PIPELINE: &str = r#"i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done | cat > "$1""#;
/// How many lines OUT must grow by between checkpoints and after the last.
const PIPELINE_STEP: usize = 50;
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The root and the two sides of the pipeline; the loop's sleeps, one
/// generation further down, come and go.
const PIPELINE_DEPTH: usize = 1;

fn count_lines(path: &Path) -> usize {
    match fs::read(path) {
        Ok(bytes) => bytes.iter().filter(|&&b| b == b'\n').count(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

fn wait_for_lines(job: &Job, out: &Path, lines: usize) {
    wait_until(
        PIPELINE_TIMEOUT,
        &format!("{} has {lines} lines", out.display()),
        || {
            assert!(
                is_alive(job.pid()),
                "the pipeline ended:\n{}",
                job.log_text()
            );
            count_lines(out) >= lines
        },
    );
}

/// OUT must read 0, 1, 2, ... with nothing lost or repeated; only the last
/// line may be cut short (the tree was killed while cat wrote it). Returns
/// the number of complete lines.
fn assert_consecutive(out: &Path) -> usize {
    let text = fs::read_to_string(out).expect("read OUT");
    let (complete, partial) = text.split_at(text.rfind('\n').map_or(0, |i| i + 1));
    let mut count = 0;
    for (i, line) in complete.lines().enumerate() {
        assert_eq!(
            line,
            i.to_string(),
            "line {} of {}: {line:?}, want {i}",
            i + 1,
            out.display()
        );
        count += 1;
    }
    assert!(
        count.to_string().starts_with(partial),
        "{} ends in {partial:?} after {count} lines",
        out.display()
    );
    count
}

fn bash_pipeline(rounds: usize) {
    let dir = TempDir::new("bash-pipeline");
    let out = dir.join("out");
    let mut cmd = hermetic_command("bash");
    cmd.args(["-c", PIPELINE, "bash"]).arg(&out);
    let mut job = Job::start("bash pipeline", dir, cmd);
    let tree = Tree::new(job.pid());
    wait_for_lines(&job, &out, PIPELINE_STEP);
    for round in 0..rounds {
        checkpoint_round(&mut job, &tree, &format!("img{round}"), PIPELINE_DEPTH);
        // The tree is dead from the dump until the restore, so this is
        // where the restored processes go on.
        wait_for_lines(&job, &out, count_lines(&out) + PIPELINE_STEP);
    }
    tree.kill(&mut job);
    let lines = assert_consecutive(&out);
    assert!(lines >= PIPELINE_STEP * (rounds + 1), "only {lines} lines");
}

#[test]
fn bash_pipeline_one_round() {
    bash_pipeline(1);
}

#[test]
fn bash_pipeline_three_rounds() {
    bash_pipeline(3);
}

// ---------------------------------------------------------------------------
// A Python program with threads and a subprocess

/// argv[1] is the READY FIFO (the fixture protocol). Three worker threads
/// and the main thread count; a `sleep` runs as a subprocess with all its
/// stdio on /dev/null, so Python holds no pipe to it. On SIGTERM: the PID,
/// the thread IDs and the subprocess (alive, still our child) must be
/// unchanged, and every worker must still be counting, i.e. be running
/// after the restore.
const PYTHON_PROGRAM: &str = r#"
import os, signal, subprocess, sys, threading, time

WORKERS = 3
PROGRESS_TIMEOUT = 30

terminated = threading.Event()
stop = threading.Event()
counts = [0] * (WORKERS + 1)  # counts[0] is the main thread's
failures = []

def check(cond, what):
    if not cond:
        failures.append(what)

def work(i):
    while not stop.is_set():
        counts[i] += 1

def tids():
    return sorted(int(t) for t in os.listdir("/proc/self/task"))

signal.signal(signal.SIGTERM, lambda *_: terminated.set())
child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
workers = [threading.Thread(target=work, args=(i,)) for i in range(1, WORKERS + 1)]
for t in workers:
    t.start()
pid, tids_at_ready = os.getpid(), tids()
with open(sys.argv[1], "w") as fifo:
    fifo.write("READY\n")

while not terminated.is_set():
    counts[0] += 1

check(os.getpid() == pid, f"pid {os.getpid()}, want {pid}")
check(tids() == tids_at_ready, f"threads {tids()}, want {tids_at_ready}")
check(child.poll() is None, f"subprocess {child.pid} ended: {child.returncode}")
with open(f"/proc/{child.pid}/stat") as f:
    child_stat = f.read()
check(child_stat.split(") ")[1].split()[1] == str(pid),
      f"subprocess {child.pid} is not our child: {child_stat}")
at_term = list(counts)
deadline = time.monotonic() + PROGRESS_TIMEOUT
while time.monotonic() < deadline and any(counts[i] == at_term[i] for i in range(1, WORKERS + 1)):
    time.sleep(0.001)
check(all(counts[i] > at_term[i] for i in range(1, WORKERS + 1)),
      f"workers stopped counting: {at_term} then {counts}")

stop.set()
for t in workers:
    t.join(PROGRESS_TIMEOUT)
    check(not t.is_alive(), f"worker {t.native_id} does not end")
child.terminate()
check(child.wait(PROGRESS_TIMEOUT) == -signal.SIGTERM,
      f"subprocess exited with {child.returncode}")
print(f"FAIL: {failures[0]}" if failures else "PASS", flush=True)
sys.exit(1 if failures else 0)
"#;

/// The descriptors `pid` holds, by number.
fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fd dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    fds
}

fn python_program(rounds: usize) {
    let dir = TempDir::new("python");
    let script = dir.join("program.py");
    fs::write(&script, PYTHON_PROGRAM).expect("write the Python program");
    let fifo = dir.join("ready");
    let mut ready = open_ready_fifo(&fifo);
    let mut cmd = hermetic_command("python3");
    cmd.arg(&script).arg(&fifo);
    let mut job = Job::start("python", dir, cmd);
    let tree = Tree::new(job.pid());
    if let Err(e) = wait_ready(&mut ready, job.pid()) {
        panic!("python: {e}\n{}", job.log_text());
    }
    // Only stdio: anything else would make a failed dump the program's fault.
    for pid in shape(job.pid(), ALL).keys() {
        assert_eq!(open_fds(*pid), [0, 1, 2], "descriptors of {pid}");
    }
    checkpoint_rounds(&mut job, &tree, rounds);
    tree.finish(job, true);
}

#[test]
fn python_threads_and_subprocess_one_round() {
    python_program(1);
}

#[test]
fn python_threads_and_subprocess_two_rounds() {
    python_program(2);
}

/// The Python program alone must pass too.
#[test]
fn python_program_alone_passes() {
    python_program(0);
}

// ---------------------------------------------------------------------------
// Process groups made every way a restore can make them

/// argv[1] is the READY FIFO. The root (a session leader) forks L, which leads
/// its own group, with L1 in it (by descent); M, which joins L's group (its
/// leader a sibling), with M1 in it (the leader neither parent nor ancestor);
/// and N, which leads its own group, with N1, which moves back into the root's
/// group (an ancestor's). On SIGTERM every process checks its PID, group and
/// session, ends its children and reaps them.
const GROUPS_PROGRAM: &str = r#"
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
r, w = os.pipe()

def proc(role, group, kids):
    def body():
        group()
        ids = (os.getpid(), os.getpgid(0), os.getsid(0))
        pids = [fork(k) for k in kids]
        os.write(w, b"x")
        signal.sigwait({signal.SIGTERM})
        fails = []
        now = (os.getpid(), os.getpgid(0), os.getsid(0))
        if now != ids:
            fails.append(f"{role}: pid, group, session {now}, want {ids}")
        for p in pids:
            os.kill(p, signal.SIGTERM)
        for p in pids:
            st = os.waitpid(p, 0)[1]
            if st != 0:
                fails.append(f"{role}: child {p} ended with {st:#x}")
        return fails
    return body

def fork(body):
    pid = os.fork()
    if pid == 0:
        try:
            fails = body()
        except BaseException as e:
            fails = [repr(e)]
        for f in fails:
            print(f"FAIL: {f}", flush=True)
        os._exit(1 if fails else 0)
    return pid

root = os.getpid()
def lead():
    os.setpgid(0, 0)
L = proc("L", lead, [proc("L1", lambda: None, [])])
l = fork(L)
os.setpgid(l, l)
m = fork(proc("M", lambda: os.setpgid(0, l), [proc("M1", lambda: None, [])]))
n = fork(proc("N", lead, [proc("N1", lambda: os.setpgid(0, root), [])]))
got = 0
while got < 6:
    got += len(os.read(r, 6 - got))
ids = (os.getpid(), os.getpgid(0), os.getsid(0))
with open(sys.argv[1], "w") as fifo:
    fifo.write("READY\n")
signal.sigwait({signal.SIGTERM})
fails = []
if (os.getpid(), os.getpgid(0), os.getsid(0)) != ids:
    fails.append(f"root: pid, group, session changed from {ids}")
for p in (l, m, n):
    os.kill(p, signal.SIGTERM)
for p in (l, m, n):
    st = os.waitpid(p, 0)[1]
    if st != 0:
        fails.append(f"child {p} ended with {st:#x}")
print(f"FAIL: {fails[0]}" if fails else "PASS", flush=True)
sys.exit(1 if fails else 0)
"#;

fn process_groups(rounds: usize) {
    let dir = TempDir::new("groups");
    let script = dir.join("groups.py");
    fs::write(&script, GROUPS_PROGRAM).expect("write the program");
    let fifo = dir.join("ready");
    let mut ready = open_ready_fifo(&fifo);
    let mut cmd = hermetic_command("python3");
    cmd.arg(&script).arg(&fifo);
    let mut job = Job::start("groups", dir, cmd);
    let tree = Tree::new(job.pid());
    if let Err(e) = wait_ready(&mut ready, job.pid()) {
        panic!("groups: {e}\n{}", job.log_text());
    }
    let kin = shape(job.pid(), ALL);
    let groups: BTreeSet<i32> = kin.values().map(|k| k.pgid).collect();
    assert_eq!((kin.len(), groups.len()), (7, 3), "the program's layout: {kin:?}");
    checkpoint_rounds(&mut job, &tree, rounds);
    tree.finish(job, true);
}

#[test]
fn process_groups_come_back_one_round() {
    process_groups(1);
}

#[test]
fn process_groups_come_back_two_rounds() {
    process_groups(2);
}

// ---------------------------------------------------------------------------
// A zombie child

/// argv[1] is the READY FIFO. The program forks a child that exits with 7 at once and
/// takes its SIGCHLD (blocked) before READY, leaving it a zombie. On SIGTERM: no SIGCHLD
/// may be pending (the zombie's re-creation must not show), and the zombie is reaped
/// with its status.
const ZOMBIE_PROGRAM: &str = r#"
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
z = os.fork()
if z == 0:
    os._exit(7)
signal.sigwait({signal.SIGCHLD})
with open(sys.argv[1], "w") as fifo:
    fifo.write("READY\n")
signal.sigwait({signal.SIGTERM})
fails = []
if signal.SIGCHLD in signal.sigpending():
    fails.append("a SIGCHLD is pending")
st = os.waitpid(z, 0)[1]
if not (os.WIFEXITED(st) and os.WEXITSTATUS(st) == 7):
    fails.append(f"zombie {z}: status {st:#x}, want exit 7")
print(f"FAIL: {fails[0]}" if fails else "PASS", flush=True)
sys.exit(1 if fails else 0)
"#;

#[test]
fn a_zombie_comes_back_without_a_sigchld() {
    let dir = TempDir::new("zombie");
    let script = dir.join("zombie.py");
    fs::write(&script, ZOMBIE_PROGRAM).expect("write the program");
    let fifo = dir.join("ready");
    let mut ready = open_ready_fifo(&fifo);
    let mut cmd = hermetic_command("python3");
    cmd.arg(&script).arg(&fifo);
    let mut job = Job::start("zombie", dir, cmd);
    let tree = Tree::new(job.pid());
    if let Err(e) = wait_ready(&mut ready, job.pid()) {
        panic!("zombie: {e}\n{}", job.log_text());
    }
    checkpoint_rounds(&mut job, &tree, 2);
    tree.finish(job, true);
}

// ---------------------------------------------------------------------------
// A shell with many children (more than one process forks them back on restore)

/// $1 is a file created once the children run. bash forks $2 `sleep`s, then waits for them
/// one by one and says PASS once all of them ended: they must come back as its own children,
/// whose exits it is told of and reaps. The loops are arithmetic ones: once $1 exists, bash
/// forks nothing more (a `$(seq ...)` there would be a short-lived child that a snapshot of
/// the tree may or may not catch).
const MANY_CHILDREN: &str = r#"
for ((i = 0; i < $2; i++)); do sleep 1000 & done
: > "$1"
n=0
for ((i = 0; i < $2; i++)); do wait -n; n=$((n + 1)); done
if [ "$n" = "$2" ] && [ -z "$(jobs -p)" ]; then echo PASS; else echo "FAIL: $n of $2 reaped"; fi
"#;
const SHELL_CHILDREN: usize = 24;

fn shell_with_many_children(rounds: usize) {
    let dir = TempDir::new("many-children");
    let ready = dir.join("ready");
    let mut cmd = hermetic_command("bash");
    cmd.args(["-c", MANY_CHILDREN, "bash"]).arg(&ready).arg(SHELL_CHILDREN.to_string());
    let mut job = Job::start("bash with many children", dir, cmd);
    let tree = Tree::new(job.pid());
    wait_until(Duration::from_secs(30), "the children run sleep", || {
        let kids = children(job.pid());
        ready.exists()
            && kids.len() == SHELL_CHILDREN
            && kids.iter().all(|&k| stat(k).is_some_and(|s| s.kin.comm == "sleep"))
    });
    checkpoint_rounds(&mut job, &tree, rounds);
    let kids = children(job.pid());
    assert_eq!(kids.len(), SHELL_CHILDREN, "children after the restore: {kids:?}");
    for k in kids {
        assert_eq!(stat(k).map(|s| s.kin.ppid), Some(job.pid()), "pid {k} is not bash's child");
        sys::kill(k, libc::SIGTERM).unwrap_or_else(|e| panic!("kill {k}: {e}"));
    }
    let status = job.root.wait(EXIT_TIMEOUT);
    tree.root_reaped.set(true);
    job.assert_verdict(status, true);
}

#[test]
fn a_shell_gets_many_children_back_one_round() {
    shell_with_many_children(1);
}

#[test]
fn a_shell_gets_many_children_back_three_rounds() {
    shell_with_many_children(3);
}

// ---------------------------------------------------------------------------
// A program that ignores SIGSEGV

/// The SigIgn mask of /proc/PID/status.
fn ignored_signals(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("SigIgn:").map(|v| u64::from_str_radix(v.trim(), 16).ok()))?)
        .unwrap_or(0)
}

/// A restore ends each process's injected calls with a fault on the unmapped helper page,
/// unless the program ignores SIGSEGV (a fault would reset that): such a program keeps
/// its SIGSEGV ignored through the rounds.
#[test]
fn an_ignored_sigsegv_stays_ignored() {
    let segv = 1u64 << (libc::SIGSEGV - 1);
    let mut cmd = hermetic_command("bash");
    cmd.args(["-c", "trap '' SEGV; exec sleep 1000"]);
    let mut job = Job::start("sleep ignoring SIGSEGV", TempDir::new("segv-ignored"), cmd);
    let tree = Tree::new(job.pid());
    wait_until(Duration::from_secs(30), "sleep runs with SIGSEGV ignored", || {
        stat(job.pid()).is_some_and(|s| s.kin.comm == "sleep") && ignored_signals(job.pid()) & segv != 0
    });
    checkpoint_rounds(&mut job, &tree, 2);
    assert_ne!(ignored_signals(job.pid()) & segv, 0, "SIGSEGV is no longer ignored after the restore");
    tree.kill(&mut job);
}

/// A queued field of /proc/PID/status (SigPnd: the thread's, ShdPnd: the process's).
fn pending_signals(pid: i32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field).map(|v| u64::from_str_radix(v.trim(), 16).ok()))?)
        .unwrap_or(0)
}

/// A program holding a blocked SIGSEGV of its own, queued to the process and to its main
/// thread: both are queued again after each restore (the restore's last batch, which
/// would otherwise end with a fault of its own, takes the separate path then).
#[test]
fn a_queued_sigsegv_stays_queued() {
    const PROGRAM: &str = r#"
import os, signal, sys, threading, time
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGSEGV])
os.kill(os.getpid(), signal.SIGSEGV)
signal.pthread_kill(threading.main_thread().ident, signal.SIGSEGV)
open(sys.argv[1], "w").close()
while True:
    time.sleep(1000)
"#;
    let segv = 1u64 << (libc::SIGSEGV - 1);
    let dir = TempDir::new("segv-queued");
    let ready = dir.join("ready");
    let mut cmd = hermetic_command("python3");
    cmd.args(["-c", PROGRAM]).arg(&ready);
    let mut job = Job::start("python with SIGSEGV queued", dir, cmd);
    let tree = Tree::new(job.pid());
    let queued = |pid: i32| pending_signals(pid, "ShdPnd:") & segv != 0 && pending_signals(pid, "SigPnd:") & segv != 0;
    wait_until(Duration::from_secs(30), "SIGSEGV is queued", || ready.exists() && queued(job.pid()));
    checkpoint_rounds(&mut job, &tree, 2);
    assert!(queued(job.pid()), "the queued SIGSEGVs are gone after the restore");
    tree.kill(&mut job);
}
