//! The netback engine (later issues): xen-netif TX/RX rings, multiqueue with split
//! event channels, multi-page rings, persistent grants and the zero-copy path through
//! IOMMU-backed grant mappings, generic over a small platform trait so that it is
//! tested and benchmarked on the host with simulated guests.
//!
//! Nothing is implemented yet; this crate is deliberately empty until that issue.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
