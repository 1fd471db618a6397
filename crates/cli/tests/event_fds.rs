//! End-to-end tests of event descriptors: signalfd, eventfd, timerfd and epoll (the
//! `evfd` fixture, which checks its own state: see its header), and a real program that
//! holds a signalfd, util-linux `script`, running a shell loop in a pseudo-terminal.
//!
//! Every process is owned by a guard that kills and reaps it by PID.
//! Needs root: `cargo test -p stasis --test event_fds`.

#[allow(dead_code)] // shared with the other test crates, which use the rest
mod common;

use common::*;

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
