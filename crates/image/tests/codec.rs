//! The metadata codec against ciborium, which wrote every image before it: the same bytes
//! for the same records both ways, over records that use every variant and optional field
//! and over many generated ones; and clean errors for corrupt, truncated or forged data.

use stasis_image::format::{Header, HEADER_PAGE};
use stasis_image::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A fixed-seed generator (xorshift) of values biased towards the edges of CBOR's integer
/// and length encodings.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn u64(&mut self) -> u64 {
        const EDGES: [u64; 12] =
            [0, 1, 23, 24, 255, 256, 65535, 65536, 0xffff_ffff, 0x1_0000_0000, u64::MAX - 1, u64::MAX];
        match self.below(3) {
            0 => EDGES[self.below(EDGES.len() as u64) as usize],
            1 => self.next() >> self.below(64),
            _ => self.next(),
        }
    }
    fn u32(&mut self) -> u32 {
        match self.below(2) {
            0 => [0, 23, 24, 255, 256, 65535, 65536, u32::MAX][self.below(8) as usize],
            _ => self.next() as u32 >> self.below(32),
        }
    }
    fn i32(&mut self) -> i32 {
        match self.below(2) {
            0 => [0, -1, 23, -24, -25, 24, -256, -257, 65536, -65537, i32::MIN, i32::MAX][self.below(12) as usize],
            _ => (self.next() as i32) >> self.below(32),
        }
    }
    fn i64(&mut self) -> i64 {
        match self.below(2) {
            0 => [0, -1, -24, -25, i64::MIN, i64::MAX, -0x1_0000_0001][self.below(7) as usize],
            _ => (self.next() as i64) >> self.below(64),
        }
    }
    fn len(&mut self) -> usize {
        [0, 1, 2, 23, 24, 25, 255, 256, 300][self.below(9) as usize]
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = if self.below(20) == 0 { 70_000 } else { self.len() };
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self) -> String {
        const PIECES: [&str; 6] = ["a", "bash", "é", "€", "𝄞", "[vdso]"];
        let n = self.len() / 4;
        (0..n).map(|_| PIECES[self.below(6) as usize]).collect()
    }
    fn vec<T>(&mut self, max: u64, mut f: impl FnMut(&mut Gen) -> T) -> Vec<T> {
        let n = self.below(max + 1);
        (0..n).map(|_| f(self)).collect()
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Gen) -> T) -> Option<T> {
        if self.bool() {
            Some(f(self))
        } else {
            None
        }
    }

    fn file(&mut self) -> FileRef {
        FileRef {
            path: self.bytes(),
            dev: self.u64(),
            ino: self.u64(),
            mode: self.u32(),
            size: self.u64(),
            mtime_ns: self.i64(),
        }
    }
    fn run(&mut self, with_data: bool) -> PageRun {
        PageRun { addr: self.u64(), npages: self.u64(), data: if with_data { self.opt(Gen::u64) } else { None } }
    }
    fn fd_kind(&mut self, which: u64) -> FdKind {
        match which {
            0 => FdKind::File { file: self.file(), flags: self.i32(), pos: self.u64() },
            1 => FdKind::CharDevice { path: self.bytes(), rdev: self.u64(), flags: self.i32() },
            2 => FdKind::Terminal { path: self.bytes(), rdev: self.u64(), flags: self.i32() },
            3 => FdKind::Pipe { ino: self.u64(), write: self.bool(), flags: self.i32() },
            4 => FdKind::Fifo { file: self.file(), flags: self.i32() },
            5 => FdKind::Shmem { id: self.u64(), flags: self.i32(), pos: self.u64() },
            6 => FdKind::PtyMaster { index: self.u32(), flags: self.i32() },
            7 => FdKind::PtySlave { index: self.u32(), flags: self.i32() },
            8 => FdKind::Signalfd { mask: self.u64(), flags: self.i32() },
            9 => FdKind::Eventfd { count: self.u64(), semaphore: self.bool(), flags: self.i32() },
            10 => FdKind::Timerfd(TimerfdRecord {
                clockid: self.i32(),
                flags: self.i32(),
                settime_flags: self.i32(),
                value_ns: self.u64(),
                interval_ns: self.u64(),
                ticks: self.u64(),
            }),
            _ => FdKind::Epoll {
                flags: self.i32(),
                targets: self.vec(3, |g| EpollTarget { fd: g.i32(), events: g.u32(), data: g.u64(), desc: g.u64() }),
            },
        }
    }
    fn backing(&mut self, which: u64) -> VmaBacking {
        match which {
            0 => VmaBacking::Anonymous,
            1 => VmaBacking::File(self.file()),
            2 => VmaBacking::Special(self.string()),
            _ => VmaBacking::Shmem(self.u64()),
        }
    }
    fn shmem_kind(&mut self, which: u64) -> ShmemKind {
        match which {
            0 => ShmemKind::Anonymous,
            1 => ShmemKind::Memfd { name: self.bytes() },
            _ => ShmemKind::DeletedFile { path: self.bytes() },
        }
    }
    fn lock_kind(&mut self, which: u64) -> LockKind {
        [LockKind::Flock, LockKind::Posix, LockKind::Ofd][which as usize % 3]
    }
    fn vma(&mut self) -> Vma {
        let which = self.below(4);
        Vma {
            start: self.u64(),
            end: self.u64(),
            prot: self.u32(),
            shared: self.bool(),
            flags: self.u64(),
            backing: self.backing(which),
            file_offset: self.u64(),
            pages: self.vec(4, |g| g.run(true)),
            data_offset: self.u64(),
            guards: self.vec(2, |g| g.run(false)),
        }
    }
    fn thread(&mut self) -> ThreadRecord {
        ThreadRecord {
            tid: self.i32(),
            comm: self.string(),
            regs: (0..27).map(|_| self.u64()).collect(),
            xstate: self.bytes(),
            sigmask: self.u64(),
            pending: self.vec(2, |g| SigInfo(g.bytes())),
            rseq: self.opt(|g| Rseq { addr: g.u64(), len: g.u32(), sig: g.u32() }),
            robust_list: (self.u64(), self.u64()),
            clear_child_tid: self.u64(),
            altstack: AltStack { sp: self.u64(), flags: self.i32(), size: self.u64() },
        }
    }
    fn process(&mut self) -> ProcessRecord {
        ProcessRecord {
            pid: self.i32(),
            ppid: self.i32(),
            pgid: self.i32(),
            sid: self.i32(),
            comm: self.string(),
            creds: Creds {
                uids: [self.u32(), self.u32(), self.u32(), self.u32()],
                gids: [self.u32(), self.u32(), self.u32(), self.u32()],
                groups: self.vec(3, Gen::u32),
            },
            cwd: self.bytes(),
            root: self.bytes(),
            umask: self.u32(),
            rlimits: self.vec(3, |g| Rlimit { resource: g.u32(), soft: g.u64(), hard: g.u64() }),
            sigactions: self.vec(3, |g| SigAction {
                sig: g.i32(),
                handler: g.u64(),
                flags: g.u64(),
                restorer: g.u64(),
                mask: g.u64(),
            }),
            shared_pending: self.vec(2, |g| SigInfo(g.bytes())),
            mm: MmRecord {
                start_code: self.u64(),
                end_code: self.u64(),
                start_data: self.u64(),
                end_data: self.u64(),
                start_brk: self.u64(),
                brk: self.u64(),
                start_stack: self.u64(),
                arg_start: self.u64(),
                arg_end: self.u64(),
                env_start: self.u64(),
                env_end: self.u64(),
                auxv: self.vec(8, Gen::u64),
                exe: self.file(),
                xcomp_perm: self.u64(),
                vmas: self.vec(4, Gen::vma),
            },
            fds: self.vec(4, |g| {
                let which = g.below(12);
                FdRecord {
                    fd: g.i32(),
                    cloexec: g.bool(),
                    kind: g.fd_kind(which),
                    same_as: g.opt(Gen::i32),
                    desc: g.u64(),
                }
            }),
            threads: self.vec(2, Gen::thread),
            no_new_privs: self.bool(),
            personality: self.u32(),
            zombie_status: self.opt(Gen::i32),
            locks: self.vec(2, |g| {
                let which = g.below(3);
                LockRecord { fd: g.i32(), kind: g.lock_kind(which), write: g.bool(), start: g.u64(), len: g.u64() }
            }),
            ctty: self.opt(|g| ControllingTty { pty: g.opt(Gen::u32), fg_pgrp: g.i32() }),
            files_with_parent: self.bool(),
            fs_with_parent: self.bool(),
            vm_with_parent: self.bool(),
            sighand_with_parent: self.bool(),
            exit_signal: self.opt(Gen::i32),
        }
    }
    fn image(&mut self) -> Image {
        Image {
            stasis_version: self.string(),
            created_unix_ms: self.u64(),
            host: HostInfo {
                kernel_release: self.string(),
                machine: self.string(),
                cpu_model: self.string(),
                xcr0: self.u64(),
                xsave_size: self.u32(),
                page_size: self.u64(),
                vdso_layout: self.vec(3, |g| SpecialMapping { name: g.string(), size: g.u64(), offset: g.u64() }),
                vdso_hash: self.u64(),
            },
            root_pid: self.i32(),
            shell_job: self.bool(),
            processes: self.vec(3, Gen::process),
            pipes: self.vec(2, |g| PipeRecord { ino: g.u64(), capacity: g.u32(), data: g.bytes(), external: g.bool() }),
            pid_namespace: self.bool(),
            fifos: self.vec(2, |g| FifoRecord { dev: g.u64(), ino: g.u64(), capacity: g.u32(), data: g.bytes() }),
            shmem: self.vec(2, |g| {
                let which = g.below(3);
                ShmemRecord {
                    id: g.u64(),
                    kind: g.shmem_kind(which),
                    size: g.u64(),
                    mode: g.u32(),
                    uid: g.u32(),
                    gid: g.u32(),
                    seals: g.u32(),
                    pages: g.vec(3, |g| g.run(false)),
                    data_offset: g.u64(),
                }
            }),
            ptys: self.vec(2, |g| PtyRecord {
                index: g.u32(),
                termios: Termios {
                    iflag: g.u32(),
                    oflag: g.u32(),
                    cflag: g.u32(),
                    lflag: g.u32(),
                    line: g.next() as u8,
                    cc: std::array::from_fn(|_| g.next() as u8),
                    ispeed: g.u32(),
                    ospeed: g.u32(),
                },
                winsize: WinSize { rows: g.next() as u16, cols: g.next() as u16, xpixel: 0, ypixel: u16::MAX },
                packet: g.bool(),
                locked: g.bool(),
                exclusive: g.bool(),
                input: g.bytes(),
                input_eof_at: g.vec(3, Gen::u64),
                output: g.bytes(),
            }),
            page_block_size: self.u64(),
            page_block_hashes: self.vec(5, Gen::u64),
        }
    }
}

/// An image with every variant of every enum and both states of every option.
fn rich_image() -> Image {
    let mut g = Gen(0x2545_f491_4f6c_dd1d);
    let mut img = g.image();
    let mut p = g.process();
    p.fds = (0..12).map(|k| FdRecord { fd: k as i32, cloexec: k % 2 == 0, kind: g.fd_kind(k), same_as: None, desc: k })
        .collect();
    p.fds[3].same_as = Some(-7);
    p.mm.vmas = (0..4)
        .map(|k| {
            let mut v = g.vma();
            v.backing = g.backing(k);
            v.pages = vec![PageRun::new(0x1000, 1), PageRun { data: Some(0), ..PageRun::new(0x2000, 24) }];
            v
        })
        .collect();
    p.locks = (0..3)
        .map(|k| LockRecord { fd: 1, kind: g.lock_kind(k), write: k == 1, start: 0, len: u64::MAX })
        .collect();
    p.zombie_status = Some(-1);
    p.exit_signal = Some(17);
    p.ctty = Some(ControllingTty { pty: Some(3), fg_pgrp: -25 });
    let mut t = g.thread();
    t.rseq = Some(Rseq { addr: 1 << 40, len: 32, sig: 0x5305_3053 });
    let mut t2 = g.thread();
    t2.rseq = None;
    p.threads = vec![t, t2];
    let mut q = p.clone();
    q.zombie_status = None;
    q.exit_signal = None;
    q.ctty = Some(ControllingTty { pty: None, fg_pgrp: 0 });
    let mut r = q.clone();
    r.ctty = None;
    img.processes = vec![p, q, r];
    img.shmem = (0..3)
        .map(|k| ShmemRecord {
            id: k + 1,
            kind: g.shmem_kind(k),
            size: 1 << 33,
            mode: 0o600,
            uid: 0,
            gid: 65534,
            seals: 0,
            pages: vec![PageRun::new(0, 3)],
            data_offset: 4096,
        })
        .collect();
    img
}

fn ciborium_bytes(img: &Image) -> Vec<u8> {
    let mut v = Vec::new();
    ciborium::into_writer(img, &mut v).unwrap();
    v
}

/// Both codecs agree on `img`: the same bytes, and each decodes the other's.
fn agree(img: &Image) {
    let ours = cbor::to_vec(img).unwrap();
    let theirs = ciborium_bytes(img);
    assert!(ours == theirs, "the encodings differ");
    assert_eq!(&cbor::from_slice::<Image>(&theirs).unwrap(), img);
    assert_eq!(&ciborium::from_reader::<Image, _>(&ours[..]).unwrap(), img);
}

#[test]
fn same_bytes_as_ciborium_for_every_variant() {
    let img = rich_image();
    let names: BTreeSet<&str> = img.processes.iter().flat_map(|p| &p.fds).map(|f| f.kind.kind_name()).collect();
    assert_eq!(names.len(), 12, "every descriptor kind");
    agree(&img);
}

#[test]
fn same_bytes_as_ciborium_for_generated_images() {
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    let mut kinds = BTreeSet::new();
    for _ in 0..300 {
        let img = g.image();
        kinds.extend(img.processes.iter().flat_map(|p| &p.fds).map(|f| f.kind.kind_name()));
        agree(&img);
    }
    assert_eq!(kinds.len(), 12, "the generator reaches every descriptor kind");
}

fn golden_meta(version: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(version).join(IMAGE_FILE);
    let file = std::fs::read(&path).unwrap();
    let h = Header::decode(&path, &file[..HEADER_PAGE as usize]).unwrap();
    file[h.meta_offset as usize..h.file_len() as usize].to_vec()
}

/// The golden images were written by ciborium: both decoders read the same records, and
/// the version-2 one re-encodes to its very bytes.
#[test]
fn golden_metadata_decodes_as_with_ciborium() {
    for version in ["v1", "v2"] {
        let meta = golden_meta(version);
        let ours: Image = cbor::from_slice(&meta).unwrap();
        let theirs: Image = ciborium::from_reader(&meta[..]).unwrap();
        assert_eq!(ours, theirs, "{version}");
        if version == "v2" {
            assert!(cbor::to_vec(&ours).unwrap() == meta, "v2 re-encodes to the same bytes");
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = cbor::to_vec(&rich_image()).unwrap();
    // Every cut in the first and last 3000 bytes, and 3000 cuts between.
    let len = bytes.len();
    let cuts = (0..len.min(3000)).chain((0..len).step_by(len / 3000 + 1)).chain(len.saturating_sub(3000)..len);
    for n in cuts {
        let e = cbor::from_slice::<Image>(&bytes[..n]).unwrap_err();
        assert!(e.offset().is_some_and(|o| o <= n), "{e}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let e = cbor::from_slice::<Image>(&longer).unwrap_err();
    assert!(e.to_string().contains("1 bytes after the end"), "{e}");
}

/// Random byte changes: an error or a decoded record, never a panic.
#[test]
fn corrupt_bytes_never_panic() {
    let good = cbor::to_vec(&rich_image()).unwrap();
    let mut g = Gen(0xdead_beef_cafe_f00d);
    for _ in 0..3000 {
        let mut bad = good.clone();
        for _ in 0..1 + g.below(4) {
            let i = g.below(bad.len() as u64) as usize;
            bad[i] = g.next() as u8;
        }
        let _ = cbor::from_slice::<Image>(&bad);
    }
}

/// CBOR head bytes for major type `major` with an 8-byte argument.
fn head64(major: u8, arg: u64) -> Vec<u8> {
    let mut v = vec![major << 5 | 27];
    v.extend_from_slice(&arg.to_be_bytes());
    v
}

fn text(s: &str) -> Vec<u8> {
    let mut v = vec![3 << 5 | s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

/// Huge announced lengths and counts fail at once, naming what they announce, without an
/// allocation of that size; so does nesting beyond the limit, also inside a skipped field.
#[test]
fn forged_lengths_are_rejected() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // {"processes": [2^64-1 items]}
        ([vec![0xa1], text("processes"), head64(4, u64::MAX)].concat(), "array of 18446744073709551615 items"),
        // {"stasis_version": text of 2^62 bytes}
        ([vec![0xa1], text("stasis_version"), head64(3, 1 << 62)].concat(), "text of 4611686018427387904 bytes"),
        // {"page_block_hashes": [..]} with a map count of 2^40 entries for the image
        (head64(5, 1 << 40), "map of 1099511627776 entries"),
        // an unknown field holding a byte string of 2^63 bytes
        ([vec![0xa1], text("junk"), head64(2, 1 << 63)].concat(), "byte string of 9223372036854775808 bytes"),
        // an unknown field holding arrays nested a million deep
        ([vec![0xa1], text("junk"), vec![0x81; 1_000_000]].concat(), "cannot fit in the 0 bytes that remain"),
        // an indefinite-length array
        ([vec![0xa1], text("processes"), vec![0x9f, 0xff]].concat(), "indefinite length"),
    ];
    for (bytes, want) in cases {
        let e = cbor::from_slice::<Image>(&bytes).unwrap_err();
        assert!(e.to_string().contains(want), "{e} (wanted: {want})");
    }
    // Typed nesting deeper than the limit: Vec<Vec<...>> of depth 300.
    let mut deep = vec![0x81u8; 300];
    deep.push(0x80);
    type Deep = Vec<serde_value_free::Nested>;
    let e = cbor::from_slice::<Deep>(&deep).unwrap_err();
    assert!(e.to_string().contains("nested more than 256 deep"), "{e}");
}

/// A recursive type for the nesting test, without any extra dependency.
mod serde_value_free {
    #[derive(serde::Deserialize, Debug)]
    pub struct Nested(#[allow(dead_code)] pub Vec<Nested>);
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stasis-codec-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A well-formed image file (valid header and hashes) whose metadata announces a huge
/// array: the reader says the metadata is corrupt, and where.
#[test]
fn reader_rejects_forged_length_with_valid_hashes() {
    let d = tempdir("forged");
    let mut img = rich_image();
    let mut w = ImageWriter::create(&d).unwrap();
    w.write_pages(&[7u8; 4096]).unwrap();
    w.finish(&mut img).unwrap();
    let path = d.join(IMAGE_FILE);
    let mut file = std::fs::read(&path).unwrap();
    let h = Header::decode(&path, &file[..HEADER_PAGE as usize]).unwrap();
    let forged = [vec![0xa1], text("processes"), head64(4, u64::MAX / 2)].concat();
    file.truncate(h.meta_offset as usize);
    file.extend_from_slice(&forged);
    let h2 = Header { meta_len: forged.len() as u64, meta_hash: hash64(&forged), ..h };
    file[..HEADER_PAGE as usize].copy_from_slice(&h2.encode());
    std::fs::write(&path, &file).unwrap();
    let err = ImageReader::open(&d).err().expect("forged metadata is rejected");
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Malformed { .. }), "{msg}");
    assert!(msg.contains("metadata does not decode") && msg.contains("array of 9223372036854775807 items"), "{msg}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Whole image files both ways: what ImageWriter writes decodes with ciborium to the
/// records it was given, and a file whose metadata ciborium encoded opens with
/// ImageReader to the same records.
#[test]
fn image_files_both_ways() {
    let d = tempdir("both");
    let mut img = rich_image();
    let mut w = ImageWriter::create(&d).unwrap();
    w.write_pages(&[3u8; 8192]).unwrap();
    w.finish(&mut img).unwrap();
    let path = d.join(IMAGE_FILE);
    let mut file = std::fs::read(&path).unwrap();
    let h = Header::decode(&path, &file[..HEADER_PAGE as usize]).unwrap();
    let meta = &file[h.meta_offset as usize..];
    assert_eq!(ciborium::from_reader::<Image, _>(meta).unwrap(), img);

    let theirs = ciborium_bytes(&img);
    file.truncate(h.meta_offset as usize);
    file.extend_from_slice(&theirs);
    let h2 = Header { meta_len: theirs.len() as u64, meta_hash: hash64(&theirs), ..h };
    file[..HEADER_PAGE as usize].copy_from_slice(&h2.encode());
    std::fs::write(&path, &file).unwrap();
    assert_eq!(ImageReader::open(&d).unwrap().image, img);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Encoding through a writer gives the same bytes as into memory, in several pieces for
/// metadata larger than one.
#[test]
fn writer_pieces_make_the_same_bytes() {
    struct Pieces(Vec<Vec<u8>>);
    impl std::io::Write for Pieces {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut img = rich_image();
    let p = img.processes[0].clone();
    img.processes = vec![p; 40];
    let whole = cbor::to_vec(&img).unwrap();
    assert!(whole.len() > 3 * cbor::PIECE, "{} bytes", whole.len());
    let mut pieces = Pieces(Vec::new());
    cbor::to_writer(&img, &mut pieces).unwrap();
    assert!(pieces.0.len() >= 3);
    assert!(pieces.0.concat() == whole);
}
