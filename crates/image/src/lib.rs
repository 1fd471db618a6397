//! The stasis image: one file, `stasis.img`, in the image directory.
//!
//! Layout (all integers little-endian; see docs/IMAGE-FORMAT.md):
//! ```text
//! 0      header page (4096 bytes): magic, format version, section offsets, checksums
//! 4096   page data: the saved pages of every mapping, run after run, in record order
//! ...    metadata: CBOR-encoded [`records::Image`]
//! ```
//! The header lives outside the payload, so a reader learns the format version without
//! decoding anything else. Every byte of the file is covered by a checksum: the header
//! page by its own hash, page data by per-block hashes kept in the metadata, the metadata
//! by a hash kept in the header. A dump writes a temporary file and renames it into place
//! only when complete, so an interrupted dump never leaves something that looks complete.

pub mod cbor;
pub mod format;
pub mod records;

pub use format::{hash64, ImageError, ImageReader, ImageWriter, FORMAT_VERSION, IMAGE_FILE, OLDEST_READABLE_VERSION};
pub use records::*;
