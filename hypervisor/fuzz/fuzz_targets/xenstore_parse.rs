//! Fuzz target: xenstore message parsing and the engine behind it.
//!
//! The input is split into messages (2-byte little-endian length prefixes). Each goes
//! through `parse`, which must never panic and whose successes must re-encode to
//! themselves, then through the engine as a request from unprivileged domain 1; the
//! raw input is also fed to domain 3's request ring. None of that may change what
//! domain 2 owns or sees. Finally the messages are replayed as domain 0 (which may do
//! anything); the store must still satisfy its invariants.
#![no_main]

use abi::xs_wire::*;
use hypervisor::xenstore::{parse, Access, Op, Perm, RingSnapshot, Xenstore};
use libfuzzer_sys::fuzz_target;

fn messages(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (usize::from(rest[0]) | usize::from(rest[1]) << 8).min(rest.len() - 2);
        out.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut xs = Xenstore::new();
    for d in [1, 2, 3] {
        xs.introduce(d, 1, 1).unwrap();
    }
    let home = Op::Mkdir {
        path: "/local/domain/2".into(),
    };
    xs.request(0, 0, &home).unwrap();
    let perms = Op::SetPerms {
        path: "/local/domain/2".into(),
        perms: vec![Perm::new(2, Access::None)],
    };
    xs.request(0, 0, &perms).unwrap();
    let witness = Op::Write {
        path: "w".into(),
        value: b"w".to_vec(),
    };
    xs.request(2, 0, &witness).unwrap();
    let watch = Op::Watch {
        path: "/local/domain/2".into(),
        token: b"t".to_vec(),
    };
    xs.request(2, 0, &watch).unwrap();
    xs.take_output(2);
    let counts2 = xs.counts(2);

    let msgs = messages(data);
    for msg in &msgs {
        if let Ok(r) = parse(msg) {
            assert_eq!(parse(&r.op.encode(r.req_id, r.tx_id)), Ok(r.clone()));
        }
        let _ = xs.handle(1, msg);
        let _ = xs.take_output(1);
    }

    // The raw input as the contents of domain 3's request ring.
    let mut page = vec![0u8; 4096];
    let n = data.len().min(XENSTORE_RING_SIZE);
    page[..n].copy_from_slice(&data[..n]);
    page[XS_RING_REQ_PROD_OFFSET..XS_RING_REQ_PROD_OFFSET + 4]
        .copy_from_slice(&(n as u32).to_le_bytes());
    for _ in 0..3 {
        let up = xs.service_ring(3, &RingSnapshot::from_page(&page));
        up.apply(&mut page);
        // the guest consumes all responses
        let prod = page[XS_RING_RSP_PROD_OFFSET..XS_RING_RSP_PROD_OFFSET + 4].to_vec();
        page[XS_RING_RSP_CONS_OFFSET..XS_RING_RSP_CONS_OFFSET + 4].copy_from_slice(&prod);
    }

    xs.check().unwrap();
    assert_eq!(xs.counts(2), counts2);
    let r = xs.request(2, 0, &Op::Read { path: "w".into() });
    assert_eq!(r, Ok(b"w".to_vec()));

    for msg in &msgs {
        let _ = xs.handle(0, msg);
        let _ = xs.take_output(0);
    }
    xs.check().unwrap();
});
