//! Grant-table engine (issue 4): grant table v1/v2 entries, `map_grant_ref` /
//! `unmap_grant_ref` with maptrack handles, `copy`, status frames, and the rules Xen
//! enforces (GNTST_* codes, GTF_reading/GTF_writing pinning). It holds no hardware
//! access and is tested on the host.
//!
//! Nothing is implemented yet; this crate is deliberately empty until that issue.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
