//! `--inherit-fd`: a pipe that led outside the dumped tree is refused by restore unless
//! the user names what to connect it to, CRIU-style (`fd[N]:pipe:[INO]`).
//!
//! The program is real `cat`, reading a pipe whose write end this test holds, writing to
//! a file. After restore it reads a new pipe the test hands to stasis as its stdin.

// Each test crate compiles the shared harness anew and uses only part of it.
#[allow(dead_code)]
mod common;

use common::*;
use std::io::Write;
use std::process::Stdio;

#[test]
fn a_pipe_from_outside_is_reconnected_with_inherit_fd() {
    init();
    let dir = TempDir::new("inherit-fd");
    let out = dir.join("out");
    let image = dir.join("img");
    // setsid: a session leader needs no --shell-job. Not a group leader when spawned,
    // setsid(1) execs cat in place, so the PID we hold is cat's.
    let mut cmd = hermetic_command("setsid");
    cmd.arg("cat")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).expect("create out"))
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn setsid cat");
    let mut feed = child.stdin.take().expect("cat's stdin");
    let mut cat = Proc::spawned(child, "cat");
    let pid = cat.pid();
    feed.write_all(b"first\n").expect("write first");
    wait_until(READY_TIMEOUT, "cat copied the first line", || {
        std::fs::read_to_string(&out).is_ok_and(|t| t == "first\n")
    });
    let key = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("readlink fd 0");
    let key = key.to_string_lossy().into_owned();
    assert!(key.starts_with("pipe:["), "{key}");

    stasis_ok(&dump_args(pid, &image, &[]));
    cat.wait(EXIT_TIMEOUT);
    drop(feed);

    // Without the option: refused, naming the option and the pipe, nothing created.
    let line = stasis_error(&restore_detached_args(&image, &dir.join("pid0")));
    assert!(line.contains("--inherit-fd fd[N]:") && line.contains(&key), "{line}");
    assert_no_process(pid, "restore without --inherit-fd");

    // With it: the new pipe (stasis's stdin) becomes cat's stdin.
    let mut args = restore_detached_args(&image, &dir.join("pid1"));
    args.push("--inherit-fd".into());
    args.push(format!("fd[0]:{key}").into());
    let mut restore = stasis_command(&args);
    restore.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut stasis = restore.spawn().expect("spawn stasis restore");
    let mut feed = stasis.stdin.take().expect("stasis stdin");
    let mut restorer = Proc::spawned(stasis, "stasis restore");
    let mut restored = Proc::adopted(pid, "restored cat");
    feed.write_all(b"second\n").expect("write second");
    drop(feed); // cat sees EOF once it has read the line: it exits 0
    assert!(restorer.wait(COMMAND_TIMEOUT).success(), "stasis restore failed");
    let status = restored.wait(EXIT_TIMEOUT);
    assert!(status.success(), "restored cat: {status:?}");
    assert_eq!(std::fs::read_to_string(&out).expect("read out"), "first\nsecond\n");
}
