//! A restorer killed in the middle of restoring a tree (several tracer threads at work)
//! leaves no process of it behind, and the image restores afterwards as if nothing had
//! happened (rule 2).
//!
//! Needs root: `cargo test -p stasis --test restore_killed`.

#[allow(dead_code)]
mod common;

use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Waits until none of `pids` exists any more, collecting those that end up ours (we
/// are the subreaper of everything the tests start).
fn wait_all_gone(pids: &[i32], what: &str) {
    wait_until(Duration::from_secs(20), what, || {
        for &p in pids {
            let _ = sys::waitpid(p, libc::WNOHANG);
        }
        pids.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists())
    });
}

#[test]
fn a_restorer_killed_midway_leaves_nothing_of_the_tree() {
    let mut fixture = Fixture::start("tree", &[DIR_ARG]);
    let saved = tree_roles(fixture.dir().path());
    let pids: Vec<i32> = saved.values().copied().collect();
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    wait_all_gone(&pids, "the dumped tree is gone");
    // 1: the first call of the first process; later ones fall in the other processes'
    // batches and single calls, with several tracer threads at work; 8: the last
    // there is (the tree's restore injects 8 times).
    for n in [1, 3, 6, 8] {
        let pidfile = fixture.dir().join(format!("pid-{n}"));
        let mut cmd = stasis_command(&restore_detached_args(&image, &pidfile));
        cmd.env("STASIS_FAULT_KILL_AT_INJECTION", n.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut restorer = Proc::spawned(cmd.spawn().expect("spawn stasis restore"), "stasis restore");
        let status = restorer.wait(EXIT_TIMEOUT);
        assert!(!status.success(), "the restorer was to be killed at injection {n}");
        assert!(!pidfile.exists(), "a killed restorer wrote its pidfile");
        wait_all_gone(&pids, &format!("nothing is left of the tree after a restorer killed at injection {n}"));
    }
    fixture.restore_detached(&image);
    fixture.finish();
}
