//! End-to-end tests of event descriptors: signalfd, eventfd, timerfd and epoll (the
//! `evfd` fixture, which checks its own state: see its header), and a real program that
//! holds a signalfd, util-linux `script`, running a shell loop in a pseudo-terminal.
//!
//! Every process is owned by a guard that kills and reaps it by PID.
//! Needs root: `cargo test -p stasis --test event_fds`.

#[allow(dead_code)] // shared with the other test crates, which use the rest
mod common;

use common::*;
use std::os::unix::fs::OpenOptionsExt;

fn evfd_round_trip(mode: &str, rounds: usize) {
    let mut fixture = Fixture::start("evfd", &[mode]);
    fixture.checkpoint_rounds(rounds);
    fixture.finish();
}

#[test]
fn evfd_fixture_alone_passes() {
    for mode in ["signalfd", "eventfd", "timerfd", "epoll"] {
        Fixture::start("evfd", &[mode]).finish();
    }
}

#[test]
fn signalfd_one_round() {
    evfd_round_trip("signalfd", 1);
}

#[test]
fn signalfd_three_rounds() {
    evfd_round_trip("signalfd", 3);
}

/// The fixture checks the exact queue its signalfd reads: one signal more than it set up
/// (as a restore that queued a signal twice would leave) makes it fail.
#[test]
fn signalfd_fixture_fails_when_the_queue_differs() {
    let mut fixture = Fixture::start("evfd", &["signalfd"]);
    sys::kill(fixture.pid(), libc::SIGRTMIN() + 1).expect("kill");
    let status = fixture.terminate();
    fixture.assert_verdict(status, false);
}

#[test]
fn eventfd_one_round() {
    evfd_round_trip("eventfd", 1);
}

#[test]
fn eventfd_three_rounds() {
    evfd_round_trip("eventfd", 3);
}

#[test]
fn timerfd_one_round() {
    evfd_round_trip("timerfd", 1);
}

#[test]
fn timerfd_three_rounds() {
    evfd_round_trip("timerfd", 3);
}

#[test]
fn epoll_one_round() {
    evfd_round_trip("epoll", 1);
}

#[test]
fn epoll_three_rounds() {
    evfd_round_trip("epoll", 3);
}

/// An epoll whose registered target number no longer holds the target: refused, naming
/// the process, the epoll descriptor and the target number, and left running.
#[test]
fn epoll_with_a_moved_target_is_refused() {
    let fixture = Fixture::start("evfd", &["epoll-moved"]);
    let pid = fixture.pid().to_string();
    assert_refused(
        &dump_args(fixture.pid(), &fixture.dir().join("img"), &[]),
        &[&pid, "fd 20", "epoll", "target fd 21"],
    );
    assert_eq!(tracer_pid(fixture.pid()), Some(0), "still traced after the refused dump");
    fixture.finish();
}

// ---------------------------------------------------------------------------
// A real program: util-linux `script` (a signalfd, a pseudo-terminal pair) running a
// shell loop

/// `script -q -c 'bash -c LOOP' /dev/null`, a session leader, whose loop reads one number
/// at a time from FIFO (opening it anew for each), appends it to OUT and prints it on its
/// terminal, which `script` copies to its output (the log). The test writes
/// the next number only once the last one is in OUT, so the loop never holds the FIFO
/// between numbers and the dumps find it blocked opening it. A read that gets no line
/// (under `script` the loop now and then sees an open of the FIFO end with nothing to
/// read, also without any dump) is skipped; every number sent must be in OUT once, in
/// order.
struct Script {
    dir: TempDir,
    /// The script process, then its restored incarnation.
    root: Proc,
    /// Its descendants (the shells), by PID; killed and reaped on drop.
    others: Vec<Proc>,
    next: u32,
}

impl Script {
    fn start() -> Script {
        init();
        let dir = TempDir::new("script");
        let fifo = dir.join("fifo");
        sys::mkfifo(&fifo, 0o600).expect("mkfifo");
        let lp = format!(
            "while true; do if read -r n < {}; then echo \"$n\" >> {}; echo \"tty $n\"; fi; done",
            fifo.display(),
            dir.join("out").display()
        );
        let log = std::fs::File::create(dir.join("log")).expect("create log");
        let mut cmd = hermetic_command("script");
        cmd.args(["-q", "-c", &format!("bash -c '{lp}'"), "/dev/null"])
            .env("SHELL", "/bin/bash")
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        sys::setsid_on_spawn(&mut cmd);
        let child = cmd.spawn().expect("spawn script (util-linux bsdutils)");
        let root = Proc::spawned(child, "script");
        let mut s = Script { dir, root, others: Vec::new(), next: 1 };
        // The loop runs once it takes the first number.
        s.feed(3);
        s.others = descendants(s.root.pid()).into_iter().map(|p| Proc::adopted(p, "script's shell")).collect();
        assert!(!s.others.is_empty(), "script has no child");
        s
    }

    /// Sends the next `count` numbers, each once the previous one is in OUT.
    fn feed(&mut self, count: u32) {
        for _ in 0..count {
            let n = self.next;
            let fifo = self.dir.join("fifo");
            // Non-blocking: opens once the loop waits in its open (ENXIO before).
            let mut w = None;
            wait_until(READY_TIMEOUT, "the loop to open the FIFO", || {
                w = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo)
                    .ok();
                w.is_some()
            });
            std::io::Write::write_all(&mut w.expect("opened"), format!("{n}\n").as_bytes()).expect("write FIFO");
            wait_until(READY_TIMEOUT, &format!("{n} in OUT"), || self.numbers().len() as u32 >= n);
            // Through the terminal: `script` copies it from the master to its stdout.
            let want = format!("tty {n}");
            wait_until(READY_TIMEOUT, &format!("{want:?} in script's output"), || {
                self.log().lines().any(|l| l.trim_end() == want)
            });
            self.next += 1;
        }
        let all: Vec<u32> = (1..self.next).collect();
        assert_eq!(self.numbers(), all, "numbers lost or repeated\nlog: {}", self.log());
    }

    /// The lines of OUT, each a number (anything else, such as an empty line from a read
    /// that failed, is 0).
    fn numbers(&self) -> Vec<u32> {
        let text = std::fs::read_to_string(self.dir.join("out")).unwrap_or_default();
        text.lines().map(|l| l.parse().unwrap_or(0)).collect()
    }

    /// Every process of the tree still runs (none ended or is ending).
    fn assert_running(&self, when: &str) {
        for p in std::iter::once(&self.root).chain(&self.others) {
            let state = proc_state(p.pid()).map(|(s, _)| s);
            assert!(matches!(state, Some('S' | 'R')), "pid {} is {state:?} {when}\nlog: {}", p.pid(), self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Dumps the tree from the script process (killing it), reaps every member and
    /// restores it.
    fn round(&mut self, image: &str) {
        let pids: Vec<i32> = std::iter::once(self.root.pid()).chain(self.others.iter().map(|p| p.pid())).collect();
        let dir = self.dir.join(image);
        stasis_ok(&dump_args(self.root.pid(), &dir, &[]));
        let status = self.root.wait(EXIT_TIMEOUT);
        assert!(status.code().is_none(), "script exited by itself after the dump: {status}\n{}", self.log());
        for p in &mut self.others {
            p.wait(EXIT_TIMEOUT);
        }
        let pidfile = self.dir.join(format!("pid-{image}"));
        stasis_ok(&restore_detached_args(&dir, &pidfile));
        let restored: i32 = std::fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("pid");
        self.root = Proc::adopted(restored, "script (restored)");
        self.others = pids[1..].iter().map(|&p| Proc::adopted(p, "script's shell (restored)")).collect();
        assert_eq!(restored, pids[0], "restored under another PID");
        let mut now = descendants(restored);
        now.sort();
        let mut want = pids[1..].to_vec();
        want.sort();
        assert_eq!(now, want, "the restored tree differs");
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        // Children first: once the root goes they are ours to reap anyway.
        for p in &self.others {
            let _ = sys::kill(p.pid(), libc::SIGKILL);
        }
    }
}

/// The PIDs below `pid`, depth first.
fn descendants(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut out = Vec::new();
    for c in text.split_whitespace().filter_map(|w| w.parse().ok()) {
        out.push(c);
        out.extend(descendants(c));
    }
    out
}

fn script_round_trip(rounds: usize) {
    // script's pair comes back as the same /dev/pts/N: no other test opens one meanwhile.
    let _devpts = devpts_lock();
    let mut s = Script::start();
    for r in 0..rounds {
        s.round(&format!("img{r}"));
        s.feed(3);
        s.assert_running(&format!("after restore {r}"));
    }
}

#[test]
fn script_loop_one_round() {
    script_round_trip(1);
}

#[test]
fn script_loop_three_rounds() {
    script_round_trip(3);
}
