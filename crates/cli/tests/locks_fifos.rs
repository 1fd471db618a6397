//! End-to-end tests of file locks and named pipes (FIFOs) in a dumped tree.
//!
//! The `locks` fixture (see its header) holds flock, POSIX record and OFD locks in a
//! parent and its child, and has two children blocked waiting for locks; it checks itself
//! after SIGTERM, and this test checks from outside, before the dump and after every
//! restore, that exactly those locks are held: conflicting requests fail, compatible ones
//! succeed, F_GETLK names the original owner, and both waiters are blocked again. The
//! `fifos` fixture passes bytes, flags and capacities through two FIFOs.
//!
//! Every process is owned by a guard that kills and reaps it by PID.
//! Needs root: `cargo test -p stasis --test locks_fifos`.

#[allow(dead_code)] // shared with the other test crates, which use the rest
mod common;
mod lockprobe;

use common::*;
use lockprobe::{flock, get_lock, set_lock, F_OFD_GETLK, F_OFD_SETLK};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

// ---------------------------------------------------------------------------
// The children of a fixture

/// The processes of a fixture's tree other than its root, by role. On drop, kills the
/// whole tree (root included: its own guard, dropped later, reaps it) and reaps every
/// member that came to us.
struct Members {
    root: i32,
    pids: BTreeMap<String, i32>,
}

impl Members {
    fn new(root: i32, pids: BTreeMap<String, i32>) -> Members {
        Members { root, pids }
    }

    /// After a dump killed the tree and its root was reaped: the members come to us (the
    /// subreaper) and are reaped here, so that their PIDs are free for the restore.
    fn reap_dumped(&self) {
        for (role, &pid) in &self.pids {
            wait_until(EXIT_TIMEOUT, &format!("{role} (pid {pid}) is gone after the dump"), || {
                if sys::waitpid(pid, libc::WNOHANG).is_ok_and(|s| s.is_some()) {
                    return true;
                }
                proc_state(pid).is_none()
            });
        }
    }

    /// Every member is running (or sleeping) and not traced, as after a refused dump.
    fn assert_undisturbed(&self) {
        for pid in self.pids.values().chain([&self.root]) {
            let state = proc_state(*pid).map(|(s, _)| s);
            assert!(matches!(state, Some('R' | 'S')), "pid {pid} is {state:?}");
            assert_eq!(tracer_pid(*pid), Some(0), "pid {pid} is still traced");
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        let ours = |pid: i32, root: i32| {
            proc_state(pid).is_some_and(|(_, ppid)| ppid == root || ppid == std::process::id() as i32)
        };
        let kids: Vec<i32> = self.pids.values().copied().filter(|&p| ours(p, self.root)).collect();
        if kids.is_empty() {
            return;
        }
        for &pid in &kids {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        // The root is still our unreaped child: its PID is its own.
        let _ = sys::kill(self.root, libc::SIGKILL);
        for pid in kids {
            let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
            while std::time::Instant::now() < deadline {
                if sys::waitpid(pid, libc::WNOHANG).is_ok_and(|s| s.is_some()) || proc_state(pid).is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn read_roles(dir: &Path) -> BTreeMap<String, i32> {
    let path = dir.join("pids");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| {
            let (role, pid) = l.split_once(' ').expect("ROLE PID");
            (role.to_owned(), pid.parse().expect("PID"))
        })
        .collect()
}

fn children_of(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Dump (killing the tree), reap it all, restore detached.
fn round(fixture: &mut Fixture, members: &Members, image: &str) {
    let dir = fixture.dump(image, &[]);
    fixture.reap_killed();
    members.reap_dumped();
    fixture.restore_detached(&dir);
}

// ---------------------------------------------------------------------------
// The locks fixture, seen from outside

fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn would_block(r: std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) || e.raw_os_error() == Some(libc::EAGAIN))
}

/// PIDs with a blocked lock request in /proc/locks ("N: -> KIND ... PID ...").
fn blocked_in_proc_locks() -> Vec<i32> {
    fs::read_to_string("/proc/locks")
        .expect("read /proc/locks")
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(1) == Some(&"->")).then(|| w.get(5)?.parse().ok()).flatten()
        })
        .collect()
}

/// Every lock of the fixture, probed by this (lock-free) process through descriptions
/// of its own.
fn assert_locks_from_outside(dir: &Path, root: i32, roles: &BTreeMap<String, i32>) {
    let c = roles["C"];
    // flock: the shared description holds LOCK_EX, "shared" two LOCK_SH.
    let f = open_rw(&dir.join("flock"));
    assert!(would_block(flock(&f, libc::LOCK_SH | libc::LOCK_NB)), "flock: a LOCK_SH got through");
    let s = open_rw(&dir.join("shared"));
    assert!(would_block(flock(&s, libc::LOCK_EX | libc::LOCK_NB)), "shared: a LOCK_EX got through");
    flock(&s, libc::LOCK_SH | libc::LOCK_NB).expect("shared: LOCK_SH must be compatible");
    drop(s);

    // POSIX: F_GETLK names the owner of each range; compatible requests pass.
    let p = open_rw(&dir.join("posix"));
    let getlk = |ty, start, len| get_lock(&p, libc::F_GETLK, ty, start, len).expect("F_GETLK");
    assert_eq!(getlk(libc::F_RDLCK, 0, 10), (libc::F_WRLCK, root), "posix 0-9");
    assert_eq!(getlk(libc::F_RDLCK, 40, 10), (libc::F_WRLCK, c), "posix 40-49");
    assert_eq!(getlk(libc::F_RDLCK, 1000, 10), (libc::F_WRLCK, root), "posix 100-EOF");
    assert_eq!(getlk(libc::F_RDLCK, 20, 10).0, libc::F_UNLCK, "posix 20-29 must take readers");
    let (ty, pid) = getlk(libc::F_WRLCK, 20, 10);
    assert!(ty == libc::F_RDLCK && (pid == root || pid == c), "posix 20-29: {ty} {pid}");
    assert_eq!(getlk(libc::F_WRLCK, 60, 10).0, libc::F_UNLCK, "posix 60-69 must be free");
    assert!(would_block(set_lock(&p, F_OFD_SETLK, libc::F_WRLCK, 5, 1)), "posix 5: a write lock got through");
    set_lock(&p, F_OFD_SETLK, libc::F_WRLCK, 60, 10).expect("posix 60-69: a write lock must pass");
    set_lock(&p, F_OFD_SETLK, libc::F_RDLCK, 20, 10).expect("posix 20-29: a read lock must pass");
    drop(p);

    // OFD: locks of descriptions show PID -1.
    let o = open_rw(&dir.join("ofd"));
    let ofd = |ty, start, len| get_lock(&o, F_OFD_GETLK, ty, start, len).expect("F_OFD_GETLK");
    assert_eq!(ofd(libc::F_RDLCK, 0, 100), (libc::F_WRLCK, -1), "ofd 0-99");
    assert_eq!(ofd(libc::F_WRLCK, 200, 100), (libc::F_RDLCK, -1), "ofd 200-299");
    assert_eq!(ofd(libc::F_RDLCK, 200, 100).0, libc::F_UNLCK, "ofd 200-299 must take readers");
    set_lock(&o, F_OFD_SETLK, libc::F_WRLCK, 150, 10).expect("ofd 150-159 must be free");
    drop(o);

    // Both waiters are blocked again (they restart their calls once resumed).
    let (w1, w2) = (roles["W1"], roles["W2"]);
    wait_until(READY_TIMEOUT, "both waiters are blocked on their locks", || {
        let blocked = blocked_in_proc_locks();
        blocked.contains(&w1) && blocked.contains(&w2)
    });
}

fn start_locks(extra: &[&str]) -> (Fixture, Members) {
    let mut args = vec![DIR_ARG];
    args.extend_from_slice(extra);
    let fixture = Fixture::start("locks", &args);
    let roles = read_roles(fixture.dir().path());
    let members = Members::new(fixture.pid(), roles);
    (fixture, members)
}

#[test]
fn locks_fixture_alone_passes() {
    let (fixture, members) = start_locks(&[]);
    assert_locks_from_outside(fixture.dir().path(), fixture.pid(), &members.pids);
    fixture.finish();
}

fn locks_round_trip(rounds: usize) {
    let (mut fixture, members) = start_locks(&[]);
    let dir = fixture.dir().path().to_owned();
    assert_locks_from_outside(&dir, fixture.pid(), &members.pids);
    for r in 0..rounds {
        round(&mut fixture, &members, &format!("img{r}"));
        assert_eq!(children_of(fixture.pid()).len(), 3, "round {r}: children of the root");
        assert_locks_from_outside(&dir, fixture.pid(), &members.pids);
    }
    fixture.finish();
}

#[test]
fn locks_one_round() {
    locks_round_trip(1);
}

#[test]
fn locks_three_rounds() {
    locks_round_trip(3);
}

/// A lease is refused, naming C, its fd and the kind; the tree runs on and passes.
#[test]
fn a_lease_is_refused() {
    let (fixture, members) = start_locks(&["lease"]);
    let c = members.pids["C"];
    let line = assert_refused(&dump_args(fixture.pid(), &fixture.dir().join("img"), &[]), &["fd 20", "lease"]);
    assert!(line.contains(&format!("pid {c}")), "{line:?} does not name C (pid {c})");
    members.assert_undisturbed();
    assert_locks_from_outside(fixture.dir().path(), fixture.pid(), &members.pids);
    fixture.finish();
}

/// Somebody takes a conflicting lock between dump and restore: the restore fails
/// naming the lock, leaves no process, and succeeds once the lock is gone.
#[test]
fn a_conflicting_lock_taken_meanwhile_fails_the_restore_cleanly() {
    let (mut fixture, members) = start_locks(&[]);
    let dir = fixture.dir().path().to_owned();
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    members.reap_dumped();
    let thief = open_rw(&dir.join("flock"));
    flock(&thief, libc::LOCK_EX | libc::LOCK_NB).expect("LOCK_EX on the free file");
    assert_refused(&restore_detached_args(&image, &dir.join("pid-refused")), &["flock write lock", "conflicting"]);
    for pid in members.pids.values().chain([&fixture.pid()]) {
        assert_no_process(*pid, "the refused restore");
    }
    drop(thief);
    fixture.restore_detached(&image);
    assert_locks_from_outside(&dir, fixture.pid(), &members.pids);
    fixture.finish();
}

// ---------------------------------------------------------------------------
// The fifos fixture

fn start_fifos() -> (Fixture, Members) {
    let fixture = Fixture::start("fifos", &[DIR_ARG]);
    let kids = children_of(fixture.pid());
    assert_eq!(kids.len(), 1, "children of the fifos fixture");
    let members = Members::new(fixture.pid(), BTreeMap::from([("child".to_owned(), kids[0])]));
    (fixture, members)
}

#[test]
fn fifos_fixture_alone_passes() {
    let (fixture, _members) = start_fifos();
    fixture.finish();
}

/// Bytes read from F2 behind the fixture's back (a description of our own) are lost
/// to it, as in a restore that drops them: it must fail.
#[test]
fn fifos_fixture_fails_when_queued_bytes_are_stolen() {
    let (fixture, _members) = start_fifos();
    let mut f2 = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fixture.dir().join("f2"))
        .expect("open f2");
    let mut stolen = [0u8; 10];
    std::io::Read::read_exact(&mut f2, &mut stolen).expect("read from f2");
    drop(f2);
    let mut fixture = fixture;
    let status = fixture.terminate();
    fixture.assert_verdict(status, false);
}

fn fifos_round_trip(rounds: usize) {
    let (mut fixture, members) = start_fifos();
    for r in 0..rounds {
        round(&mut fixture, &members, &format!("img{r}"));
        assert_eq!(children_of(fixture.pid()), members.pids.values().copied().collect::<Vec<_>>());
    }
    fixture.finish();
}

#[test]
fn fifos_one_round() {
    fifos_round_trip(1);
}

#[test]
fn fifos_three_rounds() {
    fifos_round_trip(3);
}

/// A FIFO that a process outside the tree (this test) also holds open is refused,
/// naming the fd, the kind and why; the tree runs on and passes.
#[test]
fn a_fifo_held_outside_the_tree_is_refused() {
    let (fixture, members) = start_fifos();
    let outside = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fixture.dir().join("f2"))
        .expect("open f2");
    let line = assert_refused(
        &dump_args(fixture.pid(), &fixture.dir().join("img"), &[]),
        &["fd 11", "fifo", "outside the tree"],
    );
    assert!(line.contains(&format!("pid {}", fixture.pid())), "{line:?} does not name the root");
    members.assert_undisturbed();
    drop(outside);
    fixture.finish();
}

/// The FIFO's path is gone at restore time: refused before any process exists; once it
/// is back (a new, empty FIFO), the restore brings the saved bytes.
#[test]
fn a_missing_fifo_is_refused_before_any_process_exists() {
    let (mut fixture, members) = start_fifos();
    let dir = fixture.dir().path().to_owned();
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    members.reap_dumped();
    let f1 = dir.join("f1");
    fs::remove_file(&f1).expect("remove f1");
    assert_refused(&restore_detached_args(&image, &dir.join("pid-refused")), &[&f1.display().to_string(), "gone"]);
    for pid in members.pids.values().chain([&fixture.pid()]) {
        assert_no_process(*pid, "the refused restore");
    }
    sys::mkfifo(&f1, 0o600).expect("mkfifo f1");
    fixture.restore_detached(&image);
    fixture.finish();
}
