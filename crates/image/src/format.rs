//! Writing and reading the image file: header, page data, metadata, checksums.

use crate::records::Image;
use stasis_sys::mem::LocalMapping;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

pub const IMAGE_FILE: &str = "stasis.img";
pub const MAGIC: &[u8; 8] = b"STASISIM";
/// The version this stasis writes. Version 2 added page runs that refer to page data
/// saved for another mapping (`PageRun::data`), which a version-1 reader would
/// misread, so it must refuse them.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this stasis reads (version 1 is version 2 without such runs).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// The header occupies the whole first page; page data starts page-aligned after it.
pub const HEADER_PAGE: u64 = 4096;
const HEADER_USED: usize = 72;
const HASH_AT: usize = 64;
pub const PAGE_BLOCK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image directory {0} is missing")]
    DirMissing(PathBuf),
    #[error("no complete image in {0}: {IMAGE_FILE} is missing (an interrupted dump leaves none)")]
    NoImage(PathBuf),
    #[error("{op} {path}: {err}")]
    Io { op: &'static str, path: PathBuf, err: io::Error },
    #[error("{0} is not a stasis image (bad magic)")]
    BadMagic(PathBuf),
    #[error("{path} has unsupported format version {found} (this stasis reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is truncated: {size} bytes, the header says {expected}")]
    Truncated { path: PathBuf, size: u64, expected: u64 },
    #[error("{path} is corrupt: checksum mismatch in {what}")]
    Checksum { path: PathBuf, what: String },
    #[error("{path} is corrupt: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// The fixed header, outside the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub pages_offset: u64,
    pub pages_len: u64,
    pub meta_offset: u64,
    pub meta_len: u64,
    pub meta_hash: u64,
}

impl Header {
    /// Encodes the whole header page, its hash at bytes 64..72 covering the rest.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_PAGE as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_USED as u32).to_le_bytes());
        // 16..24: flags, zero in version 1.
        b[24..32].copy_from_slice(&self.pages_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.pages_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.meta_len.to_le_bytes());
        b[56..64].copy_from_slice(&self.meta_hash.to_le_bytes());
        let h = header_hash(&b);
        b[HASH_AT..HASH_AT + 8].copy_from_slice(&h.to_le_bytes());
        b
    }

    /// Decodes and checks a header page. The version is checked before the hash so that an
    /// image from another format version is reported as such, not as corrupt.
    pub fn decode(path: &Path, b: &[u8]) -> Result<Header, ImageError> {
        if b.len() < HEADER_PAGE as usize {
            return Err(ImageError::Truncated {
                path: path.into(),
                size: b.len() as u64,
                expected: HEADER_PAGE,
            });
        }
        if &b[0..8] != MAGIC {
            return Err(ImageError::BadMagic(path.into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let stored_hash = u64_at(HASH_AT);
        let hash_ok = stored_hash == header_hash(b);
        let version = u32_at(8);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            // A flipped bit in the version field itself is corruption, not a new format.
            return Err(if hash_ok {
                ImageError::Version { path: path.into(), found: version }
            } else {
                ImageError::Checksum { path: path.into(), what: "the header".into() }
            });
        }
        if !hash_ok {
            return Err(ImageError::Checksum { path: path.into(), what: "the header".into() });
        }
        let h = Header {
            version,
            pages_offset: u64_at(24),
            pages_len: u64_at(32),
            meta_offset: u64_at(40),
            meta_len: u64_at(48),
            meta_hash: u64_at(56),
        };
        let consistent = h.pages_offset == HEADER_PAGE
            && h.pages_offset.checked_add(h.pages_len) == Some(h.meta_offset)
            && h.meta_offset.checked_add(h.meta_len).is_some();
        if !consistent {
            return Err(ImageError::Malformed { path: path.into(), what: "section offsets".into() });
        }
        Ok(h)
    }

    pub fn file_len(&self) -> u64 {
        self.meta_offset + self.meta_len
    }
}

/// Recomputes the hash of a header page (for tests that forge another format version).
#[doc(hidden)]
pub fn rehash_header_for_tests(page: &[u8]) -> Vec<u8> {
    let mut b = page.to_vec();
    let h = header_hash(&b);
    b[HASH_AT..HASH_AT + 8].copy_from_slice(&h.to_le_bytes());
    b
}

/// The hash used throughout the format (xxh3, 64 bits).
pub fn hash64(data: &[u8]) -> u64 {
    xxh3_64(data)
}

fn header_hash(page: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&page[..HASH_AT]);
    h.update(&page[HASH_AT + 8..HEADER_PAGE as usize]);
    h.digest()
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io { op, path: path.to_path_buf(), err: source }
}

/// Makes sure `dir` exists as a directory only its owner can enter (0700).
pub fn prepare_dir(dir: &Path) -> Result<(), ImageError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            if m.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err("chmod 0700", dir))?;
            }
            Ok(())
        }
        Ok(_) => Err(ImageError::Io {
            op: "use as image directory",
            path: dir.into(),
            err: io::Error::from_raw_os_error(libc::ENOTDIR),
        }),
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir)),
    }
}

/// Removes temporary files of dumps whose process is gone (a killed dumper cannot remove
/// its own).
fn remove_stale_partials(dir: &Path) {
    let prefix = format!(".{IMAGE_FILE}.partial-");
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Streams an image into a temporary file and renames it into place on [`finish`].
/// Dropped unfinished, it removes the temporary file.
///
/// [`finish`]: ImageWriter::finish
pub struct ImageWriter {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    pages_len: u64,
    block: Xxh3,
    block_fill: u64,
    hashes: Vec<u64>,
    done: bool,
}

impl ImageWriter {
    pub fn create(dir: &Path) -> Result<ImageWriter, ImageError> {
        prepare_dir(dir)?;
        remove_stale_partials(dir);
        let tmp = dir.join(format!(".{IMAGE_FILE}.partial-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let mut w = ImageWriter {
            file,
            dest: dir.join(IMAGE_FILE),
            dir: dir.to_path_buf(),
            tmp,
            pages_len: 0,
            block: Xxh3::new(),
            block_fill: 0,
            hashes: Vec::new(),
            done: false,
        };
        // A placeholder header page: a file renamed without its real header cannot exist,
        // but a zero page also fails the magic check should anything read the partial file.
        w.file.write_all(&[0u8; HEADER_PAGE as usize]).map_err(io_err("write", &w.tmp))?;
        Ok(w)
    }

    /// Where the next page bytes will land, relative to the start of page data.
    pub fn pages_len(&self) -> u64 {
        self.pages_len
    }

    /// Writes `total` bytes of page data with `threads` workers. Each worker owns a
    /// contiguous, block-aligned share of the data; it asks `fill(offset, buf)` for the
    /// bytes at `offset` (relative to the start of this call's data), hashes them block by
    /// block while they are still in cache, and writes them at their place in the file.
    /// Must be called once, before any other page data is written; `fill` offsets are
    /// relative to the start of page data.
    pub fn write_pages_parallel<E, F>(&mut self, total: u64, threads: usize, chunk: usize, fill: F) -> Result<(), E>
    where
        E: From<ImageError> + Send,
        F: Fn(u64, &mut [u8]) -> Result<(), E> + Sync,
    {
        assert!(self.pages_len == 0 && (chunk as u64).is_multiple_of(PAGE_BLOCK));
        let nblocks = total.div_ceil(PAGE_BLOCK);
        let threads = (threads as u64).clamp(1, nblocks.max(1));
        let per = nblocks.div_ceil(threads) * PAGE_BLOCK;
        let file = &self.file;
        let tmp = &self.tmp;
        let fill = &fill;
        let results: Vec<Result<Vec<u64>, E>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (start, end) = ((t * per).min(total), ((t + 1) * per).min(total));
                    s.spawn(move || -> Result<Vec<u64>, E> {
                        let mut buf = vec![0u8; chunk.min((end - start) as usize)];
                        let mut hashes = Vec::new();
                        let mut off = start;
                        while off < end {
                            let n = ((end - off) as usize).min(buf.len());
                            fill(off, &mut buf[..n])?;
                            hashes.extend(buf[..n].chunks(PAGE_BLOCK as usize).map(xxh3_64));
                            file.write_all_at(&buf[..n], HEADER_PAGE + off).map_err(io_err("write", tmp))?;
                            off += n as u64;
                        }
                        // The disk starts on this share while the rest is collected and
                        // encoded: the fsync in `finish` then waits for less. Only a hint.
                        let _ = stasis_sys::mem::start_writeback(file, HEADER_PAGE + start, end - start);
                        Ok(hashes)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        for r in results {
            self.hashes.extend(r?);
        }
        self.pages_len = total;
        use std::io::Seek;
        self.file.seek(io::SeekFrom::Start(HEADER_PAGE + total)).map_err(io_err("seek", &self.tmp))?;
        Ok(())
    }

    /// Appends page data.
    pub fn write_pages(&mut self, mut data: &[u8]) -> Result<(), ImageError> {
        self.file.write_all(data).map_err(io_err("write", &self.tmp))?;
        self.pages_len += data.len() as u64;
        while !data.is_empty() {
            let take = ((PAGE_BLOCK - self.block_fill) as usize).min(data.len());
            self.block.update(&data[..take]);
            self.block_fill += take as u64;
            data = &data[take..];
            if self.block_fill == PAGE_BLOCK {
                self.hashes.push(self.block.digest());
                self.block.reset();
                self.block_fill = 0;
            }
        }
        Ok(())
    }

    /// Writes the metadata and header, syncs, and renames the file into place. Returns
    /// the image's total size in bytes.
    pub fn finish(mut self, meta: &mut Image) -> Result<u64, ImageError> {
        if self.block_fill > 0 {
            self.hashes.push(self.block.digest());
        }
        meta.page_block_size = PAGE_BLOCK;
        meta.page_block_hashes = std::mem::take(&mut self.hashes);
        // The metadata goes to the file piece by piece as it is encoded, hashed on the way.
        let mut sink = MetaSink { file: &self.file, hash: Xxh3::new(), len: 0, err: None };
        if let Err(e) = crate::cbor::to_writer(meta, &mut sink) {
            return Err(match sink.err.take() {
                Some(err) => ImageError::Io { op: "write", path: self.tmp.clone(), err },
                None => ImageError::Io {
                    op: "encode metadata for",
                    path: self.tmp.clone(),
                    err: io::Error::other(e.to_string()),
                },
            });
        }
        let header = Header {
            version: FORMAT_VERSION,
            pages_offset: HEADER_PAGE,
            pages_len: self.pages_len,
            meta_offset: HEADER_PAGE + self.pages_len,
            meta_len: sink.len,
            meta_hash: sink.hash.digest(),
        };
        self.file.write_all_at(&header.encode(), 0).map_err(io_err("write", &self.tmp))?;
        self.file.sync_all().map_err(io_err("fsync", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err("rename", &self.tmp))?;
        self.done = true;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(header.file_len())
    }
}

/// Appends the metadata to the image file as the encoder hands it over, hashing and
/// counting it; keeps a write error for the caller.
struct MetaSink<'a> {
    file: &'a File,
    hash: Xxh3,
    len: u64,
    err: Option<io::Error>,
}

impl Write for MetaSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut file = self.file;
        if let Err(e) = file.write_all(buf) {
            let kept = io::Error::new(e.kind(), e.to_string());
            self.err = Some(e);
            return Err(kept);
        }
        self.hash.update(buf);
        self.len += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// An image whose header and metadata have been read and checked.
pub struct ImageReader {
    pub path: PathBuf,
    pub file: File,
    pub header: Header,
    pub image: Image,
}

impl ImageReader {
    /// Opens `dir/stasis.img`, checking header, size and metadata (not yet page data:
    /// see [`ImageReader::verify_pages`]).
    pub fn open(dir: &Path) -> Result<ImageReader, ImageError> {
        if !dir.is_dir() {
            return Err(ImageError::DirMissing(dir.into()));
        }
        let path = dir.join(IMAGE_FILE);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NoImage(dir.into()))
            }
            Err(e) => return Err(ImageError::Io { op: "open", path, err: e }),
        };
        let size = file.metadata().map_err(io_err("stat", &path))?.len();
        let mut page = Vec::with_capacity(HEADER_PAGE as usize);
        (&mut file).take(HEADER_PAGE).read_to_end(&mut page).map_err(io_err("read", &path))?;
        let header = Header::decode(&path, &page)?;
        if size < header.file_len() {
            return Err(ImageError::Truncated { path, size, expected: header.file_len() });
        }
        if size > header.file_len() {
            return Err(ImageError::Malformed {
                path,
                what: format!("{size} bytes, the header says {}", header.file_len()),
            });
        }
        let mut meta = vec![0u8; header.meta_len as usize];
        file.read_exact_at(&mut meta, header.meta_offset).map_err(io_err("read", &path))?;
        if xxh3_64(&meta) != header.meta_hash {
            return Err(ImageError::Checksum { path, what: "the metadata".into() });
        }
        let image: Image = crate::cbor::from_slice(&meta).map_err(|e| ImageError::Malformed {
            path: path.clone(),
            what: format!("metadata does not decode: {e}"),
        })?;
        let expected_blocks = header.pages_len.div_ceil(PAGE_BLOCK.max(1));
        if image.page_block_size != PAGE_BLOCK
            || image.page_block_hashes.len() as u64 != expected_blocks
        {
            return Err(ImageError::Malformed { path, what: "page block table".into() });
        }
        Ok(ImageReader { path, file, header, image })
    }

    /// A read-only, pre-faulted mapping of all page data (no copy: page-cache pages).
    pub fn map_pages(&self) -> Result<LocalMapping, ImageError> {
        let len = self.header.pages_len.max(1) as usize;
        LocalMapping::file_readonly(&self.file, self.header.pages_offset, len, true)
            .map_err(|e| io_err("mmap", &self.path)(e.into()))
    }

    /// Checks every page-data block of `map` (from [`ImageReader::map_pages`]) against its
    /// hash, with up to `threads` threads.
    pub fn verify_pages(&self, map: &LocalMapping, threads: usize) -> Result<(), ImageError> {
        let len = self.header.pages_len as usize;
        if len == 0 {
            return Ok(());
        }
        let data = &map.as_slice()[..len];
        let hashes = &self.image.page_block_hashes;
        let nblocks = hashes.len();
        let threads = threads.clamp(1, nblocks);
        let per = nblocks.div_ceil(threads);
        let check = |i: usize| {
            let start = i * PAGE_BLOCK as usize;
            let end = (start + PAGE_BLOCK as usize).min(data.len());
            xxh3_64(&data[start..end]) != hashes[i]
        };
        let bad = match threads {
            // On the caller's thread: none left behind (a stack, an allocator arena).
            1 => (0..nblocks).find(|&i| check(i)),
            _ => std::thread::scope(|s| {
                let check = &check;
                let workers: Vec<_> = (0..threads)
                    .map(|t| s.spawn(move || (t * per..((t + 1) * per).min(nblocks)).find(|&i| check(i))))
                    .collect();
                workers.into_iter().filter_map(|w| w.join().ok().flatten()).min()
            }),
        };
        match bad {
            None => Ok(()),
            Some(i) => Err(ImageError::Checksum {
                path: self.path.clone(),
                what: format!(
                    "page data block {i} (file offset {:#x})",
                    self.header.pages_offset + i as u64 * PAGE_BLOCK
                ),
            }),
        }
    }

    /// Absolute file offset of a page-data offset.
    pub fn page_file_offset(&self, data_offset: u64) -> u64 {
        self.header.pages_offset + data_offset
    }
}
