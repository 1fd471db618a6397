//! The one unsafe layer of stasis: thin wrappers over the system calls the engine needs.
//!
//! Everything above this crate denies `unsafe`. Every wrapper here returns an owned,
//! typed result and an [`Errno`]; nothing here decides policy. Identifiers that live in
//! another process have their own types ([`Pid`], [`RemoteAddr`], [`RemoteFd`]) so that
//! a descriptor or address of the target can never be used as one of ours by mistake.
#![allow(unsafe_code)]

pub mod alloc;
pub mod bpf;
pub mod btf;
pub mod cpu;
pub mod events;
pub mod mem;
pub mod pagemap;
pub mod probe;
pub mod proc;
pub mod ptrace;
pub mod tty;
pub mod types;

pub use types::*;
