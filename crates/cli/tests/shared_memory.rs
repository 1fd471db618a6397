//! End-to-end tests of memory shared between the processes of a tree: shared
//! anonymous memory, memfd (name, size, seals, descriptors), POSIX shared
//! memory (also unlinked while in use), a shared file mapping, and System V
//! shared memory, which is refused.
//!
//! The C fixture `shmem` checks itself (see its header): after a restore
//! every process must see the saved contents and every write of the others.
//! From outside, the tests check that the processes map one object (same
//! inode), that an object is saved once however many processes map it, and
//! that a refused dump leaves the tree running.
//!
//! Needs root, like the e2e tests: `cargo test -p stasis --test shared_memory`.

#[allow(dead_code)] // shared with e2e.rs, which uses the rest
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU32, Ordering};

const PAGE: u64 = 4096;

/// A POSIX shared memory name of this test, removed (with its "-del"
/// sibling) on drop.
struct ShmName(String);

impl ShmName {
    fn new() -> ShmName {
        static N: AtomicU32 = AtomicU32::new(0);
        ShmName(format!("/stasis-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for ShmName {
    fn drop(&mut self) {
        let _ = fs::remove_file(format!("/dev/shm{}", self.0));
        let _ = fs::remove_file(format!("/dev/shm{}-del", self.0));
    }
}

/// One dump/kill/restore round of a fixture with children.
fn round(fixture: &mut Fixture, kids: &Kids, image: &str, extra: &[&str]) {
    let dir = fixture.dump(image, extra);
    fixture.reap_killed();
    kids.reap_dumped();
    fixture.restore_detached(&dir);
}


/// (start, end) of the first mapping of `pid` named `name` with `len` bytes.
fn find_mapping(pid: i32, name: &str, len: u64) -> (u64, u64) {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    maps.lines()
        .filter(|l| l.ends_with(name))
        .filter_map(|l| {
            let (s, e) = l.split(' ').next()?.split_once('-')?;
            Some((u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?))
        })
        .find(|(s, e)| e - s == len)
        .unwrap_or_else(|| panic!("pid {pid}: no {len}-byte mapping of {name}:\n{maps}"))
}

/// (device, inode) of the object mapped at `range` in `pid`.
fn mapped_object(pid: i32, (s, e): (u64, u64)) -> (u64, u64) {
    let path = format!("/proc/{pid}/map_files/{s:x}-{e:x}");
    let md = fs::metadata(&path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    (md.dev(), md.ino())
}

/// The root and kid1 map the same anonymous object and the same memfd.
fn assert_one_object_each(fixture: &Fixture, kids: &Kids) {
    let (root, kid1) = (fixture.pid(), kids.pid("kid1"));
    for (name, len) in [("/dev/zero (deleted)", 16 * PAGE), ("/memfd:stasis-memfd (deleted)", 17 * PAGE)] {
        let range = find_mapping(root, name, len);
        assert_eq!(
            mapped_object(root, range),
            mapped_object(kid1, range),
            "{name}: the root and kid1 map different objects"
        );
    }
}

fn start_all(shm: &ShmName) -> (Fixture, Kids) {
    let fixture = Fixture::start("shmem", &[DIR_ARG, "all", &shm.0]);
    let kids = Kids::of(&fixture);
    (fixture, kids)
}

#[test]
fn shmem_fixture_alone_passes() {
    let shm = ShmName::new();
    let (fixture, kids) = start_all(&shm);
    assert_one_object_each(&fixture, &kids);
    kids_finish(fixture, kids);
}

/// A write into kid1's mailbox slot of the anonymous object behind the
/// fixture's back (as a restore that does not share it could do): it must
/// fail.
#[test]
fn shmem_fixture_fails_when_its_memory_changes() {
    let shm = ShmName::new();
    let (mut fixture, kids) = start_all(&shm);
    let (start, _) = find_mapping(fixture.pid(), "/dev/zero (deleted)", 16 * PAGE);
    let mem = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", fixture.pid()))
        .expect("open mem");
    mem.write_all_at(&1u64.to_le_bytes(), start + 8 * PAGE + 128 + 8).expect("write mem");
    let status = fixture.terminate();
    fixture.assert_verdict(status, false);
    drop(kids);
}

fn shmem_rounds(rounds: usize) {
    let shm = ShmName::new();
    let (mut fixture, kids) = start_all(&shm);
    for r in 0..rounds {
        round(&mut fixture, &kids, &format!("img{r}"), &[]);
        assert_one_object_each(&fixture, &kids);
    }
    kids_finish(fixture, kids);
}

#[test]
fn shmem_one_round() {
    shmem_rounds(1);
}

#[test]
fn shmem_three_rounds() {
    shmem_rounds(3);
}

// ---------------------------------------------------------------------------
// Saved once

const BIG: u64 = 64 << 20;

fn image_bytes(stats: &std::path::Path) -> u64 {
    let text = fs::read_to_string(stats).expect("read stats");
    let v: serde_json::Value = serde_json::from_str(&text).expect("stats JSON");
    v["image_bytes"].as_u64().expect("image_bytes")
}

/// Dumps a 64 MiB shared object mapped by the root and `n` children; returns
/// the image size. With `restore`, restores it and lets it check itself.
fn big(n: usize, restore: bool) -> u64 {
    let mut fixture = Fixture::start("shmem", &[DIR_ARG, "big", &n.to_string()]);
    let kids = Kids::of(&fixture);
    let stats = fixture.dir().join("stats.json");
    let stats_arg = stats.to_str().expect("utf-8 path").to_owned();
    let dir = fixture.dump("img", &["--stats-json", &stats_arg]);
    fixture.reap_killed();
    kids.reap_dumped();
    let bytes = image_bytes(&stats);
    if restore {
        fixture.restore_detached(&dir);
        kids_finish(fixture, kids);
    }
    bytes
}

#[test]
fn shared_object_is_saved_once() {
    let one = big(1, false);
    let three = big(3, true);
    eprintln!("image of a 64 MiB shared object: {one} bytes with 1 child, {three} with 3");
    assert!(one >= BIG, "image of {one} bytes cannot hold the 64 MiB object");
    assert!(three < 2 * BIG, "image of {three} bytes holds the 64 MiB object more than once");
    // Two more processes add only their own private pages.
    assert!(three - one.min(three) < 8 << 20, "two more children grew the image from {one} to {three} bytes");
}

// ---------------------------------------------------------------------------
// Refused

/// System V shared memory is refused naming the process, the mapping and
/// its kind, and the tree runs on undisturbed (and passes). The root and its
/// child both map the segment: the refusal names the root, the process
/// nearest the root, whichever of the two the dump got to first.
#[test]
fn sysv_shm_is_refused() {
    let fixture = Fixture::start("shmem", &[DIR_ARG, "sysv"]);
    let kids = Kids::of(&fixture);
    let line = assert_refused(
        &dump_args(fixture.pid(), &fixture.dir().join("img"), &[]),
        &["System V shared memory", "mapping 0x"],
    );
    // The PIDs after "pid " (the mapping's hex addresses hold digits too).
    let pids: Vec<i32> = line
        .split("pid ")
        .skip(1)
        .filter_map(|w| w.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert_eq!(pids, [fixture.pid()], "{line}: does not name the root, and only it");
    assert!(!fixture.dir().join("img").join("stasis.img").exists(), "{line}: an image was written");
    for pid in [fixture.pid(), kids.pid("kid")] {
        assert!(is_alive(pid), "pid {pid} died after the refused dump");
        assert_eq!(tracer_pid(pid), Some(0), "pid {pid} is still traced");
    }
    kids_finish(fixture, kids);
}
