//! Host tests of the xenstore engine: every operation and error, permissions, watches,
//! transactions, domain lifecycle, quotas, malformed messages, the ring, and property
//! tests against a reference model.

use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

use abi::xs_wire::*;
use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------- helpers

fn s(x: &str) -> String {
    x.to_string()
}

fn write(xs: &mut Xenstore, d: u16, path: &str, v: &str) -> Result<(), XsError> {
    write_tx(xs, d, 0, path, v)
}

fn write_tx(xs: &mut Xenstore, d: u16, tx: u32, path: &str, v: &str) -> Result<(), XsError> {
    let op = Op::Write {
        path: s(path),
        value: v.as_bytes().to_vec(),
    };
    xs.request(d, tx, &op).map(|r| assert_eq!(r, b"OK\0"))
}

fn read(xs: &mut Xenstore, d: u16, path: &str) -> Result<String, XsError> {
    read_tx(xs, d, 0, path)
}

fn read_tx(xs: &mut Xenstore, d: u16, tx: u32, path: &str) -> Result<String, XsError> {
    xs.request(d, tx, &Op::Read { path: s(path) })
        .map(|v| String::from_utf8(v).unwrap())
}

fn mkdir(xs: &mut Xenstore, d: u16, path: &str) -> Result<(), XsError> {
    xs.request(d, 0, &Op::Mkdir { path: s(path) }).map(|_| ())
}

fn rm(xs: &mut Xenstore, d: u16, path: &str) -> Result<(), XsError> {
    rm_tx(xs, d, 0, path)
}

fn rm_tx(xs: &mut Xenstore, d: u16, tx: u32, path: &str) -> Result<(), XsError> {
    xs.request(d, tx, &Op::Rm { path: s(path) }).map(|_| ())
}

fn dir(xs: &mut Xenstore, d: u16, path: &str) -> Result<Vec<String>, XsError> {
    xs.request(d, 0, &Op::Directory { path: s(path) })
        .map(|v| split_strings(&v))
}

fn split_strings(v: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = v
        .split(|&b| b == 0)
        .map(|x| String::from_utf8(x.to_vec()).unwrap())
        .collect();
    assert_eq!(
        out.pop().as_deref(),
        Some(""),
        "payload must end in NUL: {v:?}"
    );
    out
}

fn perms_of(spec: &str) -> Vec<Perm> {
    spec.split(' ')
        .map(|p| Perm::parse(p.as_bytes()).unwrap())
        .collect()
}

fn set_perms(xs: &mut Xenstore, d: u16, path: &str, spec: &str) -> Result<(), XsError> {
    let op = Op::SetPerms {
        path: s(path),
        perms: perms_of(spec),
    };
    xs.request(d, 0, &op).map(|_| ())
}

fn get_perms(xs: &mut Xenstore, d: u16, path: &str) -> Result<String, XsError> {
    xs.request(d, 0, &Op::GetPerms { path: s(path) })
        .map(|v| split_strings(&v).join(" "))
}

fn watch(xs: &mut Xenstore, d: u16, path: &str, token: &str) -> Result<(), XsError> {
    let op = Op::Watch {
        path: s(path),
        token: token.as_bytes().to_vec(),
    };
    xs.request(d, 0, &op).map(|_| ())
}

fn unwatch(xs: &mut Xenstore, d: u16, path: &str, token: &str) -> Result<(), XsError> {
    let op = Op::Unwatch {
        path: s(path),
        token: token.as_bytes().to_vec(),
    };
    xs.request(d, 0, &op).map(|_| ())
}

fn tx_start(xs: &mut Xenstore, d: u16) -> u32 {
    let v = xs.request(d, 0, &Op::TransactionStart).unwrap();
    split_strings(&v)[0].parse().unwrap()
}

fn tx_end(xs: &mut Xenstore, d: u16, tx: u32, commit: bool) -> Result<(), XsError> {
    xs.request(d, tx, &Op::TransactionEnd { commit })
        .map(|_| ())
}

/// Queued watch events of `d` as `(path, token)`.
fn events(xs: &mut Xenstore, d: u16) -> Vec<(String, String)> {
    xs.take_output(d)
        .into_iter()
        .filter_map(|m| match decode_reply(&m) {
            Some(Reply::Event { path, token }) => Some((
                String::from_utf8(path).unwrap(),
                String::from_utf8(token).unwrap(),
            )),
            _ => None,
        })
        .collect()
}

fn ev(p: &str, t: &str) -> (String, String) {
    (s(p), s(t))
}

/// A store with domains 1 and 2 set up as the toolstack does.
fn with_domains() -> Xenstore {
    let mut xs = Xenstore::new();
    for d in [1u16, 2] {
        let layout = DomainLayout {
            name: format!("guest{d}"),
            target_kib: 524288,
            static_max_kib: 524288,
            vcpus: 2,
            store_port: 1,
            store_ring_ref: 0xfeffc,
        };
        xs.populate_domain(d, &layout).unwrap();
        xs.introduce(d, 0xfeffc, 1).unwrap();
    }
    xs.take_output(0);
    xs.check().unwrap();
    xs
}

/// Sends a wire message from `d` and decodes the reply.
fn wire(xs: &mut Xenstore, d: u16, msg: &[u8]) -> Option<Reply> {
    xs.handle(d, msg).map(|r| decode_reply(&r).unwrap())
}

fn err_reply(req_id: u32, tx_id: u32, e: XsError) -> Option<Reply> {
    Some(Reply::Error {
        req_id,
        tx_id,
        error: Some(e),
    })
}

fn raw(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    encode(ty, req_id, tx_id, payload)
}

// ---------------------------------------------------------------- wire format

#[test]
fn error_strings_are_xenstoreds() {
    assert_eq!(XsError::Enoent.payload(), b"ENOENT\0");
    assert_eq!(XsError::E2big.payload(), b"E2BIG\0");
    assert_eq!(XsError::Eperm.name(), "EPERM");
    for (i, n) in XSD_ERRORS.iter().enumerate() {
        let e = XsError::from_name(n.as_bytes()).unwrap();
        assert_eq!(e as usize, i);
    }
    let m = encode_error(7, 3, XsError::Eagain);
    assert_eq!(&m[0..4], &XS_ERROR.to_le_bytes());
    assert_eq!(&m[16..], b"EAGAIN\0");
}

#[test]
fn parse_round_trips_every_op() {
    let ops = vec![
        Op::Directory { path: s("/a") },
        Op::DirectoryPart {
            path: s("a/b"),
            offset: 12,
        },
        Op::Read { path: s("/") },
        Op::GetPerms {
            path: s("@releaseDomain"),
        },
        Op::Watch {
            path: s("device"),
            token: b"tok".to_vec(),
        },
        Op::Unwatch {
            path: s("/x"),
            token: Vec::new(),
        },
        Op::TransactionStart,
        Op::TransactionEnd { commit: true },
        Op::TransactionEnd { commit: false },
        Op::Introduce {
            domid: 5,
            gfn: -3,
            port: 9,
        },
        Op::Release { domid: 5 },
        Op::GetDomainPath { domid: 65535 },
        Op::Write {
            path: s("/a/b"),
            value: b"v\0with\0nuls".to_vec(),
        },
        Op::Write {
            path: s("/a/b"),
            value: Vec::new(),
        },
        Op::Mkdir { path: s("x_y-z@1") },
        Op::Rm { path: s("/a") },
        Op::SetPerms {
            path: s("/a"),
            perms: perms_of("n0 r1 w2 b3"),
        },
        Op::IsDomainIntroduced { domid: 0x7ff0 },
        Op::Resume { domid: 1 },
        Op::SetTarget {
            domid: 1,
            target: 2,
        },
        Op::ResetWatches,
    ];
    for op in ops {
        let bytes = op.encode(42, 7);
        let r = parse(&bytes).unwrap_or_else(|e| panic!("{op:?}: {e:?}"));
        assert_eq!(r.op, op);
        assert_eq!((r.req_id, r.tx_id), (42, 7));
    }
}

#[test]
fn parse_framing_errors() {
    assert_eq!(parse(&[1, 2, 3]), Err(WireError::Truncated));
    let mut m = raw(XS_READ, 1, 0, b"/a\0");
    m.push(0);
    assert!(matches!(
        parse(&m),
        Err(WireError::LengthMismatch { actual: 4, .. })
    ));
    m.truncate(17);
    assert!(matches!(parse(&m), Err(WireError::LengthMismatch { .. })));
    let h = XsdSockmsg {
        ty: XS_WRITE,
        req_id: 1,
        tx_id: 0,
        len: 4097,
    };
    assert_eq!(parse(&h.to_bytes()), Err(WireError::PayloadTooLong(h)));
    let ok = raw(XS_WRITE, 1, 0, &[b'a'; 4096]);
    // 4096 bytes is allowed; this one lacks the NUL after the path.
    assert!(matches!(
        parse(&ok),
        Err(WireError::BadPayload {
            error: XsError::Einval,
            ..
        })
    ));
}

#[test]
fn parse_unknown_types() {
    for ty in [0, 15, 16, 20, 23, 24, 25, 26, 27, 1000, 0xffff, u32::MAX] {
        let m = raw(ty, 1, 0, b"x\0");
        assert!(
            matches!(parse(&m), Err(WireError::UnknownType(h)) if h.ty == ty),
            "type {ty}"
        );
    }
}

#[test]
fn parse_payload_rules() {
    let bad = |ty: u32, p: &[u8]| {
        let m = raw(ty, 1, 0, p);
        assert!(
            matches!(
                parse(&m),
                Err(WireError::BadPayload {
                    error: XsError::Einval,
                    ..
                })
            ),
            "type {ty} payload {p:?} should be EINVAL, got {:?}",
            parse(&m)
        );
    };
    // one-argument requests: exactly one NUL, at the end
    bad(XS_READ, b"/a");
    bad(XS_READ, b"");
    bad(XS_READ, b"/a\0\0");
    bad(XS_READ, b"/a\0b");
    bad(XS_RM, b"\0");
    bad(XS_MKDIR, b"/a\0/b\0");
    // path syntax
    bad(XS_READ, b"/a b\0");
    bad(XS_READ, b"/a//b\0");
    bad(XS_READ, b"/a/\0");
    bad(XS_READ, b"a/\0");
    bad(XS_READ, b"@releaseDomain\0");
    bad(XS_WRITE, b"@x\0v");
    bad(XS_READ, b"/\xff\0");
    let mut long = vec![b'/'];
    long.extend(std::iter::repeat_n(b'a', XENSTORE_ABS_PATH_MAX));
    long.push(0);
    bad(XS_READ, &long);
    long.truncate(XENSTORE_ABS_PATH_MAX);
    long.push(0);
    assert!(parse(&raw(XS_READ, 1, 0, &long)).is_ok());
    // WRITE needs the NUL after the path
    bad(XS_WRITE, b"/a");
    bad(XS_WRITE, b"");
    // WATCH/UNWATCH: exactly two strings (trailing bytes after the last NUL ignored)
    bad(XS_WATCH, b"/a\0");
    bad(XS_WATCH, b"/a\0tok");
    bad(XS_WATCH, b"/a\0tok\0\x31\0");
    bad(XS_UNWATCH, b"/a");
    assert!(parse(&raw(XS_WATCH, 1, 0, b"/a\0tok\0junk")).is_ok());
    assert!(parse(&raw(XS_WATCH, 1, 0, b"@introduceDomain\0\0")).is_ok());
    // SET_PERMS
    bad(XS_SET_PERMS, b"/a\0");
    bad(XS_SET_PERMS, b"/a\0r1");
    bad(XS_SET_PERMS, b"/a\0x1\0");
    bad(XS_SET_PERMS, b"/a\0r\0");
    bad(XS_SET_PERMS, b"/a\0r65536\0");
    bad(XS_SET_PERMS, b"/a\0r-1\0");
    // TRANSACTION_END
    bad(XS_TRANSACTION_END, b"X\0");
    bad(XS_TRANSACTION_END, b"T");
    bad(XS_TRANSACTION_END, b"TT\0");
    // domain ids and ports
    bad(XS_GET_DOMAIN_PATH, b"abc\0");
    bad(XS_GET_DOMAIN_PATH, b"65536\0");
    bad(XS_GET_DOMAIN_PATH, b"\0");
    bad(XS_INTRODUCE, b"1\0 2\0");
    bad(XS_INTRODUCE, b"1\x002\x000\0");
    bad(XS_INTRODUCE, b"1\x002\0-4\0");
    bad(XS_SET_TARGET, b"1\0");
    bad(XS_DIRECTORY_PART, b"/a\0");
    bad(XS_DIRECTORY_PART, b"/a\x001\x002\0");
    // TRANSACTION_START and RESET_WATCHES ignore the payload
    assert!(parse(&raw(XS_TRANSACTION_START, 1, 0, b"whatever")).is_ok());
    assert!(parse(&raw(XS_RESET_WATCHES, 1, 0, b"")).is_ok());
    // INTRODUCE's port is atoi'd
    let r = parse(&raw(XS_INTRODUCE, 1, 0, b"3\0-17\x0012abc\0")).unwrap();
    assert_eq!(
        r.op,
        Op::Introduce {
            domid: 3,
            gfn: -17,
            port: 12
        }
    );
}

// ---------------------------------------------------------------- basic operations

#[test]
fn initial_tree_and_domain_paths() {
    let mut xs = Xenstore::new();
    assert_eq!(dir(&mut xs, 0, "/").unwrap(), vec![s("tool")]);
    assert_eq!(dir(&mut xs, 0, "/tool").unwrap(), vec![s("xenstored")]);
    assert_eq!(get_perms(&mut xs, 0, "@releaseDomain").unwrap(), "n0");
    let p = xs.request(0, 0, &Op::GetDomainPath { domid: 7 }).unwrap();
    assert_eq!(p, b"/local/domain/7\0");
}

#[test]
fn write_read_mkdir_rm_directory() {
    let mut xs = Xenstore::new();
    write(&mut xs, 0, "/a/b/c", "v").unwrap();
    assert_eq!(read(&mut xs, 0, "/a/b/c").unwrap(), "v");
    // implicit parents exist with empty values
    assert_eq!(read(&mut xs, 0, "/a").unwrap(), "");
    assert_eq!(read(&mut xs, 0, "/a/b").unwrap(), "");
    write(&mut xs, 0, "/a/b/d", "w").unwrap();
    write(&mut xs, 0, "/a/b/a", "x").unwrap();
    // creation order, as xenstored
    assert_eq!(
        dir(&mut xs, 0, "/a/b").unwrap(),
        vec![s("c"), s("d"), s("a")]
    );
    assert_eq!(dir(&mut xs, 0, "/a/b/c").unwrap(), Vec::<String>::new());
    // overwrite
    write(&mut xs, 0, "/a/b/c", "").unwrap();
    assert_eq!(read(&mut xs, 0, "/a/b/c").unwrap(), "");
    // mkdir: existing node untouched
    mkdir(&mut xs, 0, "/a/b/d").unwrap();
    assert_eq!(read(&mut xs, 0, "/a/b/d").unwrap(), "w");
    mkdir(&mut xs, 0, "/m/n").unwrap();
    assert_eq!(read(&mut xs, 0, "/m/n").unwrap(), "");
    // rm removes the subtree
    rm(&mut xs, 0, "/a/b").unwrap();
    assert_eq!(read(&mut xs, 0, "/a/b/c"), Err(XsError::Enoent));
    assert_eq!(dir(&mut xs, 0, "/a").unwrap(), Vec::<String>::new());
    // rm of a missing node with an existing parent is fine, without parent ENOENT
    rm(&mut xs, 0, "/a/zz").unwrap();
    assert_eq!(rm(&mut xs, 0, "/a/zz/yy"), Err(XsError::Enoent));
    assert_eq!(rm(&mut xs, 0, "/"), Err(XsError::Einval));
    assert_eq!(read(&mut xs, 0, "/nope"), Err(XsError::Enoent));
    assert_eq!(dir(&mut xs, 0, "/nope"), Err(XsError::Enoent));
    // binary values
    let op = Op::Write {
        path: s("/bin"),
        value: vec![0, 1, 0, 255],
    };
    xs.request(0, 0, &op).unwrap();
    assert_eq!(
        xs.request(0, 0, &Op::Read { path: s("/bin") }).unwrap(),
        vec![0, 1, 0, 255]
    );
    xs.check().unwrap();
}

#[test]
fn relative_paths_are_under_the_domain_home() {
    let mut xs = with_domains();
    write(&mut xs, 1, "data/x", "1").unwrap();
    assert_eq!(read(&mut xs, 0, "/local/domain/1/data/x").unwrap(), "1");
    assert_eq!(read(&mut xs, 1, "/local/domain/1/data/x").unwrap(), "1");
    assert_eq!(read(&mut xs, 1, "name").unwrap(), "guest1");
    assert_eq!(read(&mut xs, 1, "memory/target").unwrap(), "524288");
    assert_eq!(read(&mut xs, 1, "memory/static-max").unwrap(), "524288");
    assert_eq!(read(&mut xs, 2, "domid").unwrap(), "2");
}

#[test]
fn directory_part_pages_long_lists() {
    let mut xs = Xenstore::new();
    for i in 0..300 {
        write(&mut xs, 0, &format!("/d/child-with-a-long-name-{i:04}"), "").unwrap();
    }
    let mut all = Vec::new();
    let mut off = 0u32;
    let mut gen = None;
    loop {
        let op = Op::DirectoryPart {
            path: s("/d"),
            offset: off,
        };
        let v = xs.request(0, 0, &op).unwrap();
        assert!(v.len() <= XENSTORE_PAYLOAD_MAX);
        let parts = split_strings(&v);
        if let Some(g) = &gen {
            assert_eq!(g, &parts[0]);
        }
        gen = Some(parts[0].clone());
        let names: Vec<String> = parts[1..]
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        off += names.iter().map(|n| n.len() as u32 + 1).sum::<u32>();
        let done = parts.last().is_some_and(String::is_empty);
        all.extend(names);
        if done {
            break;
        }
    }
    let expected: Vec<String> = (0..300)
        .map(|i| format!("child-with-a-long-name-{i:04}"))
        .collect();
    assert_eq!(all, expected);
    // the plain directory does not fit a payload
    assert_eq!(dir(&mut xs, 0, "/d"), Err(XsError::E2big));
    // past the end: generation and an empty string
    let op = Op::DirectoryPart {
        path: s("/d"),
        offset: 1_000_000,
    };
    let v = xs.request(0, 0, &op).unwrap();
    assert_eq!(v, format!("{}\0\0", gen.unwrap()).into_bytes());
}

// ---------------------------------------------------------------- permissions

#[test]
fn get_and_set_perms() {
    let mut xs = with_domains();
    assert_eq!(get_perms(&mut xs, 0, "/local/domain/1").unwrap(), "n0 r1");
    assert_eq!(get_perms(&mut xs, 1, "data").unwrap(), "n1");
    assert_eq!(get_perms(&mut xs, 1, "name").unwrap(), "n0 r1");
    write(&mut xs, 1, "data/mine", "x").unwrap();
    // created by the domain: inherits, owned by the creator
    assert_eq!(get_perms(&mut xs, 1, "data/mine").unwrap(), "n1");
    set_perms(&mut xs, 1, "data/mine", "n1 r2").unwrap();
    assert_eq!(
        get_perms(&mut xs, 2, "/local/domain/1/data/mine").unwrap(),
        "n1 r2"
    );
    // the owner cannot give the node away; dom0 can
    assert_eq!(
        set_perms(&mut xs, 1, "data/mine", "n2"),
        Err(XsError::Eperm)
    );
    let owned2 = xs.counts(2).entries;
    set_perms(&mut xs, 0, "/local/domain/1/data/mine", "b2").unwrap();
    assert_eq!(
        get_perms(&mut xs, 2, "/local/domain/1/data/mine").unwrap(),
        "b2"
    );
    assert_eq!(xs.counts(2).entries, owned2 + 1);
    // a non-owner with write access may not set perms
    assert_eq!(
        set_perms(&mut xs, 1, "data/mine", "b1"),
        Err(XsError::Eacces)
    );
    // too many entries for a domU
    set_perms(&mut xs, 1, "data", "n1 r2 r3 r4 r5").unwrap();
    assert_eq!(
        set_perms(&mut xs, 1, "data", "n1 r2 r3 r4 r5 r6"),
        Err(XsError::Enospc)
    );
    set_perms(&mut xs, 0, "/local/domain/1/data", "n1 r2 r3 r4 r5 r6").unwrap();
    // special nodes
    set_perms(&mut xs, 0, "@releaseDomain", "n0 r1").unwrap();
    assert_eq!(get_perms(&mut xs, 1, "@releaseDomain").unwrap(), "n0 r1");
    assert_eq!(
        get_perms(&mut xs, 2, "@releaseDomain"),
        Err(XsError::Eacces)
    );
    xs.check().unwrap();
}

#[test]
fn domu_cannot_see_other_domains() {
    let mut xs = with_domains();
    write(&mut xs, 2, "data/secret", "s").unwrap();
    assert_eq!(
        read(&mut xs, 1, "/local/domain/2/data/secret"),
        Err(XsError::Eacces)
    );
    assert_eq!(
        read(&mut xs, 1, "/local/domain/2/name"),
        Err(XsError::Eacces)
    );
    assert_eq!(dir(&mut xs, 1, "/local/domain/2"), Err(XsError::Eacces));
    assert_eq!(dir(&mut xs, 1, "/local/domain"), Err(XsError::Eacces));
    assert_eq!(read(&mut xs, 1, "/tool/xenstored"), Err(XsError::Eacces));
    assert_eq!(
        write(&mut xs, 1, "/local/domain/2/data/secret", "x"),
        Err(XsError::Eacces)
    );
    assert_eq!(rm(&mut xs, 1, "/local/domain/2/data"), Err(XsError::Eacces));
    assert_eq!(write(&mut xs, 1, "/newtop", "x"), Err(XsError::Eacces));
    // existence is not leaked: missing nodes under unreadable parents are EACCES
    assert_eq!(
        read(&mut xs, 1, "/local/domain/2/data/nothing"),
        Err(XsError::Eacces)
    );
    assert_eq!(
        read(&mut xs, 1, "/local/domain/1/nothing"),
        Err(XsError::Enoent)
    );
    // read-only home: can read, cannot write; writable subdirs
    assert_eq!(write(&mut xs, 1, "name", "evil"), Err(XsError::Eacces));
    assert_eq!(write(&mut xs, 1, "newkey", "x"), Err(XsError::Eacces));
    write(&mut xs, 1, "device/vif/0/state", "1").unwrap();
    write(&mut xs, 1, "control/shutdown", "").unwrap();
    // dom0 sees and does everything
    assert_eq!(
        read(&mut xs, 0, "/local/domain/2/data/secret").unwrap(),
        "s"
    );
    write(&mut xs, 0, "/local/domain/2/data/secret", "t").unwrap();
    // nothing of domain 1's attempts changed domain 2's data
    assert_eq!(read(&mut xs, 2, "data/secret").unwrap(), "t");
}

#[test]
fn owner_and_others_permissions() {
    let mut xs = with_domains();
    write(&mut xs, 1, "data/n", "n").unwrap();
    write(&mut xs, 1, "data/r", "r").unwrap();
    write(&mut xs, 1, "data/w", "w").unwrap();
    write(&mut xs, 1, "data/b", "b").unwrap();
    set_perms(&mut xs, 1, "data/n", "n1").unwrap();
    set_perms(&mut xs, 1, "data/r", "r1").unwrap();
    set_perms(&mut xs, 1, "data/w", "n1 w2").unwrap();
    set_perms(&mut xs, 1, "data/b", "n1 b2").unwrap();
    let p = |k: &str| format!("/local/domain/1/data/{k}");
    assert_eq!(read(&mut xs, 2, &p("n")), Err(XsError::Eacces));
    // default access for others comes from the first entry
    assert_eq!(read(&mut xs, 2, &p("r")).unwrap(), "r");
    assert_eq!(write(&mut xs, 2, &p("r"), "x"), Err(XsError::Eacces));
    assert_eq!(read(&mut xs, 2, &p("w")), Err(XsError::Eacces));
    write(&mut xs, 2, &p("w"), "by2").unwrap();
    assert_eq!(read(&mut xs, 1, &p("w")).unwrap(), "by2");
    write(&mut xs, 2, &p("b"), "both").unwrap();
    assert_eq!(read(&mut xs, 2, &p("b")).unwrap(), "both");
    // the owner keeps full access whatever the first entry says
    assert_eq!(read(&mut xs, 1, &p("n")).unwrap(), "n");
    // a child created by 2 under 1's node belongs to 2
    let owned2 = xs.counts(2).entries;
    write(&mut xs, 2, &(p("b") + "/child"), "c").unwrap();
    assert_eq!(
        get_perms(&mut xs, 0, &(p("b") + "/child")).unwrap(),
        "n2 b2"
    );
    assert_eq!(xs.counts(2).entries, owned2 + 1);
}

#[test]
fn set_target_grants_the_targets_rights() {
    let mut xs = with_domains();
    write(&mut xs, 2, "data/x", "x").unwrap();
    assert_eq!(
        read(&mut xs, 1, "/local/domain/2/data/x"),
        Err(XsError::Eacces)
    );
    xs.request(
        0,
        0,
        &Op::SetTarget {
            domid: 1,
            target: 2,
        },
    )
    .unwrap();
    assert_eq!(read(&mut xs, 1, "/local/domain/2/data/x").unwrap(), "x");
    assert_eq!(
        xs.request(
            0,
            0,
            &Op::SetTarget {
                domid: 1,
                target: 9
            }
        ),
        Err(XsError::Enoent)
    );
}

// ---------------------------------------------------------------- watches

#[test]
fn watch_fires_once_on_registration_after_the_ok() {
    let mut xs = with_domains();
    let m = Op::Watch {
        path: s("device"),
        token: b"t1".to_vec(),
    }
    .encode(5, 0);
    let r = wire(&mut xs, 1, &m).unwrap();
    assert!(
        matches!(r, Reply::Ok { ty: XS_WATCH, req_id: 5, ref payload, .. } if payload == b"OK\0")
    );
    assert_eq!(events(&mut xs, 1), vec![ev("device", "t1")]);
    watch(&mut xs, 1, "/local/domain/1/control", "t2").unwrap();
    assert_eq!(
        events(&mut xs, 1),
        vec![ev("/local/domain/1/control", "t2")]
    );
    // the initial event does not need the path to exist or be readable
    watch(&mut xs, 1, "/local/domain/2/nothing", "t3").unwrap();
    assert_eq!(
        events(&mut xs, 1),
        vec![ev("/local/domain/2/nothing", "t3")]
    );
    assert_eq!(xs.counts(1).watches, 3);
}

#[test]
fn watch_events_in_the_registered_form() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "device", "rel").unwrap();
    watch(&mut xs, 1, "/local/domain/1/device", "abs").unwrap();
    watch(&mut xs, 0, "/local/domain/1", "dom0").unwrap();
    events(&mut xs, 1);
    events(&mut xs, 0);
    write(&mut xs, 1, "device/vif/0/state", "1").unwrap();
    assert_eq!(
        events(&mut xs, 1),
        vec![
            ev("device/vif/0/state", "rel"),
            ev("/local/domain/1/device/vif/0/state", "abs")
        ]
    );
    assert_eq!(
        events(&mut xs, 0),
        vec![ev("/local/domain/1/device/vif/0/state", "dom0")]
    );
    // the watched node itself
    write(&mut xs, 0, "/local/domain/1/device", "").unwrap();
    assert_eq!(
        events(&mut xs, 1),
        vec![ev("device", "rel"), ev("/local/domain/1/device", "abs")]
    );
    // siblings with a common prefix do not match
    write(&mut xs, 0, "/local/domain/1/devices", "").unwrap();
    assert_eq!(events(&mut xs, 1), vec![]);
    // removing an ancestor reports the watched path
    watch(&mut xs, 0, "/local/domain/1/device/vif/0/state", "deep").unwrap();
    events(&mut xs, 0);
    rm(&mut xs, 0, "/local/domain/1").unwrap();
    let e0 = events(&mut xs, 0);
    assert!(e0.contains(&ev("/local/domain/1/device/vif/0/state", "deep")));
    assert!(e0.contains(&ev("/local/domain/1", "dom0")));
    let e1 = events(&mut xs, 1);
    assert!(e1.contains(&ev("device", "rel")));
}

#[test]
fn root_watch_sees_everything_but_special_events() {
    let mut xs = Xenstore::new();
    watch(&mut xs, 0, "/", "root").unwrap();
    assert_eq!(events(&mut xs, 0), vec![ev("/", "root")]);
    write(&mut xs, 0, "/a/b", "x").unwrap();
    assert_eq!(events(&mut xs, 0), vec![ev("/a/b", "root")]);
    xs.introduce(3, 1, 1).unwrap();
    assert_eq!(events(&mut xs, 0), vec![]);
}

#[test]
fn watch_events_respect_permissions() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "/local/domain/2", "spy").unwrap();
    watch(&mut xs, 1, "/", "all").unwrap();
    events(&mut xs, 1);
    write(&mut xs, 2, "data/secret", "s").unwrap();
    assert_eq!(events(&mut xs, 1), vec![]);
    // a node readable by 1: its event gets through
    write(&mut xs, 2, "data/shared", "s").unwrap();
    set_perms(&mut xs, 2, "data/shared", "n2 r1").unwrap();
    let e = events(&mut xs, 1);
    assert!(e.contains(&ev("/local/domain/2/data/shared", "spy")));
    // losing read permission still reports the change (old permissions)
    set_perms(&mut xs, 2, "data/shared", "n2").unwrap();
    assert!(events(&mut xs, 1).contains(&ev("/local/domain/2/data/shared", "spy")));
    write(&mut xs, 2, "data/shared", "t").unwrap();
    assert_eq!(events(&mut xs, 1), vec![]);
}

#[test]
fn unwatch_and_duplicates() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "data", "a").unwrap();
    assert_eq!(watch(&mut xs, 1, "data", "a"), Err(XsError::Eexist));
    // the same watch given in absolute form is a duplicate too
    assert_eq!(
        watch(&mut xs, 1, "/local/domain/1/data", "a"),
        Err(XsError::Eexist)
    );
    watch(&mut xs, 1, "data", "b").unwrap();
    events(&mut xs, 1);
    unwatch(&mut xs, 1, "/local/domain/1/data", "a").unwrap();
    assert_eq!(unwatch(&mut xs, 1, "data", "a"), Err(XsError::Enoent));
    assert_eq!(unwatch(&mut xs, 1, "data", "zz"), Err(XsError::Enoent));
    write(&mut xs, 1, "data/x", "1").unwrap();
    assert_eq!(events(&mut xs, 1), vec![ev("data/x", "b")]);
    // reset drops all
    xs.request(1, 0, &Op::ResetWatches).unwrap();
    write(&mut xs, 1, "data/x", "2").unwrap();
    assert_eq!(events(&mut xs, 1), vec![]);
    assert_eq!(xs.counts(1).watches, 0);
}

#[test]
fn identical_pending_events_are_merged() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "data", "t").unwrap();
    events(&mut xs, 1);
    for _ in 0..5 {
        write(&mut xs, 1, "data/x", "1").unwrap();
    }
    write(&mut xs, 1, "data/y", "1").unwrap();
    assert_eq!(
        events(&mut xs, 1),
        vec![ev("data/x", "t"), ev("data/y", "t")]
    );
}

#[test]
fn too_many_watches() {
    let mut xs = with_domains();
    for i in 0..128 {
        watch(&mut xs, 1, "data", &format!("t{i}")).unwrap();
    }
    assert_eq!(watch(&mut xs, 1, "data", "one-more"), Err(XsError::Enospc));
    assert_eq!(xs.counts(1).watches, 128);
    // domain 0 has no quota
    for i in 0..200 {
        watch(&mut xs, 0, "/x", &format!("t{i}")).unwrap();
    }
    // other domains unaffected
    watch(&mut xs, 2, "data", "fine").unwrap();
}

#[test]
fn special_watches_introduce_and_release() {
    let mut xs = Xenstore::new();
    watch(&mut xs, 0, "@introduceDomain", "intro").unwrap();
    watch(&mut xs, 0, "@releaseDomain", "rel").unwrap();
    assert_eq!(
        events(&mut xs, 0),
        vec![ev("@introduceDomain", "intro"), ev("@releaseDomain", "rel")]
    );
    xs.introduce(4, 0x1000, 3).unwrap();
    assert_eq!(events(&mut xs, 0), vec![ev("@introduceDomain", "intro")]);
    // re-introduction resets, no event
    xs.introduce(4, 0x1000, 3).unwrap();
    assert_eq!(events(&mut xs, 0), vec![]);
    // a domU needs read access to the special node
    watch(&mut xs, 4, "@releaseDomain", "mine").unwrap();
    assert_eq!(events(&mut xs, 4), vec![ev("@releaseDomain", "mine")]);
    xs.introduce(5, 0x1000, 3).unwrap();
    xs.release(5).unwrap();
    assert_eq!(events(&mut xs, 4), vec![]);
    assert_eq!(
        events(&mut xs, 0),
        vec![ev("@introduceDomain", "intro"), ev("@releaseDomain", "rel")]
    );
    // a permission change is itself an event on the special path
    set_perms(&mut xs, 0, "@releaseDomain", "n0 r4").unwrap();
    assert_eq!(events(&mut xs, 4), vec![ev("@releaseDomain", "mine")]);
    assert_eq!(events(&mut xs, 0), vec![ev("@releaseDomain", "rel")]);
    xs.introduce(5, 0x1000, 3).unwrap();
    xs.release(5).unwrap();
    assert_eq!(events(&mut xs, 4), vec![ev("@releaseDomain", "mine")]);
    events(&mut xs, 0);
    // special events are never merged
    xs.introduce(6, 1, 1).unwrap();
    xs.introduce(7, 1, 1).unwrap();
    assert_eq!(
        events(&mut xs, 0),
        vec![
            ev("@introduceDomain", "intro"),
            ev("@introduceDomain", "intro")
        ]
    );
}

// ---------------------------------------------------------------- transactions

#[test]
fn transaction_commit_and_abort() {
    let mut xs = with_domains();
    let t = tx_start(&mut xs, 1);
    assert_ne!(t, 0);
    write_tx(&mut xs, 1, t, "data/a/b", "1").unwrap();
    assert_eq!(read_tx(&mut xs, 1, t, "data/a/b").unwrap(), "1");
    // invisible outside until commit
    assert_eq!(read(&mut xs, 1, "data/a/b"), Err(XsError::Enoent));
    tx_end(&mut xs, 1, t, true).unwrap();
    assert_eq!(read(&mut xs, 1, "data/a/b").unwrap(), "1");
    let t = tx_start(&mut xs, 1);
    rm_tx(&mut xs, 1, t, "data/a").unwrap();
    assert_eq!(read_tx(&mut xs, 1, t, "data/a/b"), Err(XsError::Enoent));
    tx_end(&mut xs, 1, t, false).unwrap();
    assert_eq!(read(&mut xs, 1, "data/a/b").unwrap(), "1");
    // the transaction is gone
    assert_eq!(tx_end(&mut xs, 1, t, true), Err(XsError::Enoent));
    assert_eq!(read_tx(&mut xs, 1, t, "data"), Err(XsError::Enoent));
    assert_eq!(xs.counts(1).transactions, 0);
    xs.check().unwrap();
}

#[test]
fn transaction_conflicts_give_eagain() {
    let mut xs = with_domains();
    write(&mut xs, 1, "data/x", "0").unwrap();
    let t = tx_start(&mut xs, 1);
    assert_eq!(read_tx(&mut xs, 1, t, "data/x").unwrap(), "0");
    write_tx(&mut xs, 1, t, "data/y", "1").unwrap();
    // someone else changes what the transaction read
    write(&mut xs, 0, "/local/domain/1/data/x", "changed").unwrap();
    assert_eq!(tx_end(&mut xs, 1, t, true), Err(XsError::Eagain));
    // the transaction ended and left nothing behind
    assert_eq!(read(&mut xs, 1, "data/y"), Err(XsError::Enoent));
    assert_eq!(xs.counts(1).transactions, 0);
    // an unrelated change does not conflict
    let t = tx_start(&mut xs, 1);
    read_tx(&mut xs, 1, t, "data/x").unwrap();
    write_tx(&mut xs, 1, t, "data/y", "1").unwrap();
    write(&mut xs, 2, "data/elsewhere", "z").unwrap();
    tx_end(&mut xs, 1, t, true).unwrap();
    assert_eq!(read(&mut xs, 1, "data/y").unwrap(), "1");
    // a node the transaction found missing appears meanwhile
    let t = tx_start(&mut xs, 1);
    assert_eq!(read_tx(&mut xs, 1, t, "data/new"), Err(XsError::Enoent));
    write(&mut xs, 1, "data/new", "n").unwrap();
    assert_eq!(tx_end(&mut xs, 1, t, true), Err(XsError::Eagain));
    // two transactions writing the same node: the second loses
    let t1 = tx_start(&mut xs, 1);
    let t2 = tx_start(&mut xs, 1);
    write_tx(&mut xs, 1, t1, "data/x", "t1").unwrap();
    write_tx(&mut xs, 1, t2, "data/x", "t2").unwrap();
    tx_end(&mut xs, 1, t1, true).unwrap();
    assert_eq!(tx_end(&mut xs, 1, t2, true), Err(XsError::Eagain));
    assert_eq!(read(&mut xs, 1, "data/x").unwrap(), "t1");
    // a deletion inside a subtree the transaction walked
    write(&mut xs, 1, "data/tree/a/b", "1").unwrap();
    let t = tx_start(&mut xs, 1);
    rm_tx(&mut xs, 1, t, "data/tree").unwrap();
    write(&mut xs, 1, "data/tree/a/c", "2").unwrap();
    assert_eq!(tx_end(&mut xs, 1, t, true), Err(XsError::Eagain));
    assert_eq!(read(&mut xs, 1, "data/tree/a/c").unwrap(), "2");
    xs.check().unwrap();
}

#[test]
fn transaction_errors() {
    let mut xs = with_domains();
    let t = tx_start(&mut xs, 1);
    // start inside a transaction
    assert_eq!(xs.request(1, t, &Op::TransactionStart), Err(XsError::Ebusy));
    // unknown transaction ids
    assert_eq!(read_tx(&mut xs, 1, t + 100, "data"), Err(XsError::Enoent));
    assert_eq!(tx_end(&mut xs, 1, 0, true), Err(XsError::Enoent));
    // another domain's transaction id is unknown to it
    assert_eq!(read_tx(&mut xs, 2, t, "data"), Err(XsError::Enoent));
    // watches ignore the transaction id
    let op = Op::Watch {
        path: s("data"),
        token: b"w".to_vec(),
    };
    xs.request(1, 12345, &op).unwrap();
    // wire: bad END argument is EINVAL before the missing transaction is noticed
    let m = raw(XS_TRANSACTION_END, 9, 0, b"X\0");
    assert_eq!(wire(&mut xs, 1, &m), err_reply(9, 0, XsError::Einval));
    // but an unknown transaction id is checked before the payload
    let m = raw(XS_TRANSACTION_END, 9, 999, b"X\0");
    assert_eq!(wire(&mut xs, 1, &m), err_reply(9, 999, XsError::Enoent));
    // quota: 10 per connection
    for _ in 1..10 {
        tx_start(&mut xs, 1);
    }
    assert_eq!(
        xs.request(1, 0, &Op::TransactionStart),
        Err(XsError::Enospc)
    );
    assert_eq!(xs.counts(1).transactions, 10);
    tx_start(&mut xs, 2);
    // RESET_WATCHES also drops transactions
    xs.request(1, 0, &Op::ResetWatches).unwrap();
    assert_eq!(xs.counts(1).transactions, 0);
}

#[test]
fn transaction_watch_events_fire_at_commit() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "data", "w").unwrap();
    watch(&mut xs, 0, "/local/domain/1/data", "d0").unwrap();
    events(&mut xs, 1);
    events(&mut xs, 0);
    let t = tx_start(&mut xs, 1);
    write_tx(&mut xs, 1, t, "data/a", "1").unwrap();
    write_tx(&mut xs, 1, t, "data/b", "1").unwrap();
    assert_eq!(events(&mut xs, 1), vec![]);
    tx_end(&mut xs, 1, t, true).unwrap();
    assert_eq!(
        events(&mut xs, 1),
        vec![ev("data/a", "w"), ev("data/b", "w")]
    );
    assert_eq!(events(&mut xs, 0).len(), 2);
    // aborted: nothing
    let t = tx_start(&mut xs, 1);
    write_tx(&mut xs, 1, t, "data/c", "1").unwrap();
    tx_end(&mut xs, 1, t, false).unwrap();
    assert_eq!(events(&mut xs, 1), vec![]);
    // removal inside a transaction
    let t = tx_start(&mut xs, 1);
    rm_tx(&mut xs, 1, t, "data/a").unwrap();
    tx_end(&mut xs, 1, t, true).unwrap();
    assert_eq!(events(&mut xs, 1), vec![ev("data/a", "w")]);
}

#[test]
fn transaction_quota_on_nodes_is_checked_at_commit() {
    let q = Quotas {
        entries: 20,
        ..Quotas::default()
    };
    let mut xs = Xenstore::with_quotas(q);
    write(&mut xs, 0, "/local/domain/3/data", "").unwrap();
    set_perms(&mut xs, 0, "/local/domain/3/data", "n3").unwrap();
    xs.introduce(3, 1, 1).unwrap();
    let t1 = tx_start(&mut xs, 3);
    let t2 = tx_start(&mut xs, 3);
    for i in 0..10 {
        write_tx(&mut xs, 3, t1, &format!("data/a{i}"), "").unwrap();
        write_tx(&mut xs, 3, t2, &format!("data/b{i}"), "").unwrap();
    }
    tx_end(&mut xs, 3, t1, true).unwrap();
    // 1 + 10 owned; 10 more would exceed 20. (The parent changed too: EAGAIN would
    // also do, but the quota is checked first, as xenstored.)
    assert_eq!(tx_end(&mut xs, 3, t2, true), Err(XsError::Enospc));
    assert_eq!(xs.counts(3).entries, 11);
}

// ---------------------------------------------------------------- domains

#[test]
fn privileged_operations() {
    let mut xs = with_domains();
    for op in [
        Op::Introduce {
            domid: 9,
            gfn: 1,
            port: 1,
        },
        Op::Release { domid: 2 },
        Op::IsDomainIntroduced { domid: 2 },
        Op::Resume { domid: 2 },
        Op::SetTarget {
            domid: 1,
            target: 2,
        },
    ] {
        assert_eq!(xs.request(1, 0, &op), Err(XsError::Eacces), "{op:?}");
    }
    // a privileged type with a bad payload is still EACCES for a domU
    let m = raw(XS_INTRODUCE, 4, 0, b"garbage");
    assert_eq!(wire(&mut xs, 1, &m), err_reply(4, 0, XsError::Eacces));
    assert!(xs.is_introduced(2));
    let yes = xs
        .request(0, 0, &Op::IsDomainIntroduced { domid: 2 })
        .unwrap();
    assert_eq!(yes, b"T\0");
    let no = xs
        .request(0, 0, &Op::IsDomainIntroduced { domid: 9 })
        .unwrap();
    assert_eq!(no, b"F\0");
    let me = xs.request(0, 0, &Op::IsDomainIntroduced { domid: DOMID_SELF });
    assert_eq!(me.unwrap(), b"T\0");
    xs.request(0, 0, &Op::Resume { domid: 2 }).unwrap();
    assert_eq!(
        xs.request(0, 0, &Op::Resume { domid: 9 }),
        Err(XsError::Enoent)
    );
    // INTRODUCE over the wire from domain 0
    let m = raw(XS_INTRODUCE, 1, 0, b"9\x00123\x005\0");
    assert!(matches!(
        wire(&mut xs, 0, &m),
        Some(Reply::Ok {
            ty: XS_INTRODUCE,
            ..
        })
    ));
    assert_eq!(xs.ring_of(9), Some((123, 5)));
    assert_eq!(
        xs.request(0, 0, &Op::Release { domid: 0 }),
        Err(XsError::Einval)
    );
    assert_eq!(
        xs.request(0, 0, &Op::Release { domid: 33 }),
        Err(XsError::Enoent)
    );
    xs.request(0, 0, &Op::Release { domid: 9 }).unwrap();
    assert!(!xs.is_introduced(9));
    assert_eq!(xs.release(9), Err(XsError::Enoent));
}

#[test]
fn release_cleans_up_everything() {
    let mut xs = with_domains();
    write(&mut xs, 1, "data/x", "1").unwrap();
    watch(&mut xs, 1, "data", "w").unwrap();
    tx_start(&mut xs, 1);
    // a node owned by 1 outside its home, and a permission entry for 1 elsewhere
    write(&mut xs, 0, "/backend/vif/1/0/state", "1").unwrap();
    set_perms(&mut xs, 0, "/backend/vif/1/0", "n1").unwrap();
    set_perms(&mut xs, 0, "/backend/vif/1", "n0 r1 r2").unwrap();
    watch(&mut xs, 0, "@releaseDomain", "rel").unwrap();
    watch(&mut xs, 2, "/local/domain/1/data", "other").unwrap();
    events(&mut xs, 0);
    xs.release(1).unwrap();
    assert_eq!(
        xs.counts(1),
        Counts {
            entries: 0,
            ..Counts::default()
        }
    );
    assert_eq!(read(&mut xs, 0, "/local/domain/1"), Err(XsError::Enoent));
    assert_eq!(read(&mut xs, 0, "/backend/vif/1/0"), Err(XsError::Enoent));
    assert_eq!(get_perms(&mut xs, 0, "/backend/vif/1").unwrap(), "n0 r2");
    assert!(events(&mut xs, 0).contains(&ev("@releaseDomain", "rel")));
    // requests from a released domain are not answered
    assert_eq!(xs.handle(1, &Op::Read { path: s("x") }.encode(1, 0)), None);
    assert_eq!(read(&mut xs, 1, "x"), Err(XsError::Enoent));
    // domain 2 unaffected
    assert_eq!(read(&mut xs, 2, "name").unwrap(), "guest2");
    xs.check().unwrap();
}

#[test]
fn create_destroy_cycles_leave_no_trace() {
    let mut xs = Xenstore::new();
    watch(&mut xs, 0, "@releaseDomain", "r").unwrap();
    // the toolstack's /local/domain stays once created
    mkdir(&mut xs, 0, "/local/domain").unwrap();
    xs.take_output(0);
    let before: Vec<Counts> = (0..4).map(|d| xs.counts(d)).collect();
    let total = xs.total_entries();
    for cycle in 0..100u32 {
        let d = 1 + (cycle % 3) as u16;
        let layout = DomainLayout {
            name: format!("g{cycle}"),
            target_kib: 1024,
            static_max_kib: 2048,
            vcpus: 1 + cycle % 4,
            store_port: 1,
            store_ring_ref: 5,
        };
        xs.populate_domain(d, &layout).unwrap();
        xs.introduce(d, 5, 1).unwrap();
        write(&mut xs, d, "data/k", "v").unwrap();
        write(&mut xs, d, "device/vif/0/state", "4").unwrap();
        watch(&mut xs, d, "device", "t").unwrap();
        let t = tx_start(&mut xs, d);
        write_tx(&mut xs, d, t, "data/in-tx", "x").unwrap();
        // a frontend watched by dom0 as a backend would
        watch(&mut xs, 0, &format!("/local/domain/{d}/device"), "be").unwrap();
        xs.release(d).unwrap();
        unwatch(&mut xs, 0, &format!("/local/domain/{d}/device"), "be").unwrap();
        xs.take_output(0);
    }
    let after: Vec<Counts> = (0..4).map(|d| xs.counts(d)).collect();
    assert_eq!(before, after);
    assert_eq!(total, xs.total_entries());
    xs.check().unwrap();
}

// ---------------------------------------------------------------- quotas

#[test]
fn node_quota_and_sizes() {
    let mut xs = with_domains();
    // groups of 50, as one directory's child list is itself limited by the node size
    let mut i = 0;
    while write(&mut xs, 1, &format!("data/g{}/n{i}", i / 50), "").is_ok() {
        i += 1;
    }
    let mut j = 0;
    let err = loop {
        match write(&mut xs, 1, &format!("data/g0/x{j}"), "") {
            Ok(()) => j += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, XsError::Enospc);
    assert_eq!(xs.counts(1).entries, 1000);
    // existing nodes can still be modified, and removal frees room
    write(&mut xs, 1, "data/g0/n0", "v").unwrap();
    rm(&mut xs, 1, "data/g0/n1").unwrap();
    write(&mut xs, 1, "data/g0/again", "").unwrap();
    // a write needing several new nodes is all or nothing
    rm(&mut xs, 1, "data/g0/n2").unwrap();
    assert_eq!(write(&mut xs, 1, "data/x/y/z", ""), Err(XsError::Enospc));
    assert_eq!(read(&mut xs, 1, "data/x"), Err(XsError::Enoent));
    assert_eq!(xs.counts(1).entries, 999);
    // other domains unaffected
    write(&mut xs, 2, "data/fine", "").unwrap();
    xs.check().unwrap();
}

#[test]
fn node_size_quota() {
    let mut xs = with_domains();
    let big = "x".repeat(2048 - 16 - 8);
    write(&mut xs, 1, "data/big", &big).unwrap();
    let bigger = "x".repeat(2048 - 16 - 8 + 1);
    assert_eq!(write(&mut xs, 1, "data/big", &bigger), Err(XsError::Enospc));
    assert_eq!(read(&mut xs, 1, "data/big").unwrap(), big);
    // domain 0 has no node-size limit
    write(&mut xs, 0, "/big", &"y".repeat(4000)).unwrap();
    // the parent's child list counts too: a domU cannot grow one directory forever
    let mut n = 0;
    let err = loop {
        match write(&mut xs, 1, &format!("data/many/child{n:05}"), "") {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, XsError::Enospc);
    let many = xs.store().get("/local/domain/1/data/many").unwrap();
    assert!(
        many.acc_size() <= 2048 && many.acc_size() + 11 > 2048,
        "{n}"
    );
}

#[test]
fn path_length_limits() {
    let mut xs = with_domains();
    let mut rel = String::from("data");
    while rel.len() < XENSTORE_REL_PATH_MAX {
        rel.push_str("/a");
    }
    assert_eq!(rel.len(), XENSTORE_REL_PATH_MAX);
    let q = Quotas {
        entries: 0,
        node_size: 0,
        ..Quotas::default()
    };
    let mut big = Xenstore::with_quotas(q);
    big.populate_domain(
        1,
        &DomainLayout {
            name: s("g"),
            target_kib: 1,
            static_max_kib: 1,
            vcpus: 1,
            store_port: 1,
            store_ring_ref: 1,
        },
    )
    .unwrap();
    big.introduce(1, 1, 1).unwrap();
    write(&mut big, 1, &rel, "ok").unwrap();
    let too_long = format!("{rel}b");
    assert_eq!(write(&mut big, 1, &too_long, ""), Err(XsError::Einval));
    assert_eq!(read(&mut xs, 1, &too_long), Err(XsError::Einval));
    // the same length is fine for domain 0
    write(&mut big, 0, &format!("/local/domain/1/{too_long}"), "").unwrap();
}

#[test]
fn oversize_reply_is_e2big() {
    let mut xs = Xenstore::new();
    // a directory listing longer than a payload
    for i in 0..200 {
        write(&mut xs, 0, &format!("/d/{}{i:03}", "n".repeat(20)), "").unwrap();
    }
    let m = Op::Directory { path: s("/d") }.encode(3, 0);
    assert_eq!(wire(&mut xs, 0, &m), err_reply(3, 0, XsError::E2big));
}

// ---------------------------------------------------------------- malformed messages

fn snapshot(xs: &Xenstore) -> Vec<(String, Node)> {
    xs.store()
        .paths()
        .map(|p| (s(p), xs.store().get(p).unwrap().clone()))
        .collect()
}

#[test]
fn malformed_messages_get_xenstoreds_errors() {
    let mut xs = with_domains();
    // unknown types
    for ty in [0, 15, 16, 20, 23, 26, 27, 0xffff] {
        let m = raw(ty, 11, 0, b"x\0");
        assert_eq!(
            wire(&mut xs, 1, &m),
            err_reply(11, 0, XsError::Enosys),
            "{ty}"
        );
    }
    // missing NUL, bad path, bad perms
    let cases: Vec<(u32, &[u8])> = vec![
        (XS_READ, b"name"),
        (XS_READ, b"na me\0"),
        (XS_WRITE, b"data/x"),
        (XS_MKDIR, b"data//x\0"),
        (XS_SET_PERMS, b"data\0q1\0"),
        (XS_WATCH, b"data\0"),
        (XS_GET_DOMAIN_PATH, b"x\0"),
    ];
    for (ty, p) in cases {
        let m = raw(ty, 12, 0, p);
        assert_eq!(
            wire(&mut xs, 1, &m),
            err_reply(12, 0, XsError::Einval),
            "{p:?}"
        );
    }
    // framing problems of a direct call
    assert_eq!(wire(&mut xs, 1, &[1, 2]), err_reply(0, 0, XsError::Einval));
    let mut m = raw(XS_READ, 13, 2, b"name\0");
    m.pop();
    assert_eq!(wire(&mut xs, 1, &m), err_reply(13, 2, XsError::Einval));
    // still working
    let m = Op::Read { path: s("name") }.encode(14, 0);
    assert!(matches!(
        wire(&mut xs, 1, &m),
        Some(Reply::Ok { req_id: 14, .. })
    ));
    // an over-long payload ends the conversation with domain 1 only
    let before = snapshot(&xs);
    watch(&mut xs, 2, "data", "w2").unwrap();
    let h = XsdSockmsg {
        ty: XS_WRITE,
        req_id: 15,
        tx_id: 0,
        len: 5000,
    };
    let mut m = h.to_bytes().to_vec();
    m.extend(std::iter::repeat_n(b'a', 5000));
    assert_eq!(xs.handle(1, &m), None);
    assert_eq!(xs.counts(1).error, Some(XENSTORE_ERROR_PROTO));
    assert_eq!(
        xs.handle(1, &Op::Read { path: s("name") }.encode(16, 0)),
        None
    );
    assert_eq!(snapshot(&xs), before);
    assert_eq!(xs.counts(2).watches, 1);
    assert_eq!(read(&mut xs, 2, "name").unwrap(), "guest2");
}

#[test]
fn bad_messages_never_disturb_other_domains() {
    let mut xs = with_domains();
    write(&mut xs, 2, "data/keep", "k").unwrap();
    watch(&mut xs, 2, "data", "w").unwrap();
    let t = tx_start(&mut xs, 2);
    write_tx(&mut xs, 2, t, "data/tx", "t").unwrap();
    events(&mut xs, 2);
    let counts2 = xs.counts(2);
    let mut rng = 0x1234_5678_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..3000 {
        let ty = (next() % 30) as u32;
        let len = (next() % 40) as usize;
        let mut p: Vec<u8> = (0..len)
            .map(|_| b"/ab0\0@-_xyzT12345"[(next() % 17) as usize])
            .collect();
        if i % 3 == 0 {
            p = format!("/local/domain/2/data/{}\0", i).into_bytes();
        }
        // transaction id of domain 2 used by domain 1: must be unknown to it
        let tx = if i % 5 == 0 { t } else { 0 };
        let m = raw(ty, i, tx, &p);
        let _ = xs.handle(1, &m);
    }
    assert_eq!(xs.counts(2), counts2);
    assert_eq!(read(&mut xs, 2, "data/keep").unwrap(), "k");
    assert_eq!(read_tx(&mut xs, 2, t, "data/tx").unwrap(), "t");
    tx_end(&mut xs, 2, t, true).unwrap();
    let e = events(&mut xs, 2);
    assert_eq!(e, vec![ev("data/tx", "w")]);
    xs.check().unwrap();
}

// ---------------------------------------------------------------- ring

/// A guest's side of the ring page.
struct Guest {
    page: Vec<u8>,
}

impl Guest {
    fn new(start: u32) -> Self {
        let mut g = Self {
            page: vec![0u8; 4096],
        };
        for off in [
            XS_RING_REQ_CONS_OFFSET,
            XS_RING_REQ_PROD_OFFSET,
            XS_RING_RSP_CONS_OFFSET,
            XS_RING_RSP_PROD_OFFSET,
        ] {
            g.set(off, start);
        }
        g
    }
    fn get(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.page[off..off + 4].try_into().unwrap())
    }
    fn set(&mut self, off: usize, v: u32) {
        self.page[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Puts as much of `data` as fits into the request ring; returns bytes written.
    fn send(&mut self, data: &[u8]) -> usize {
        let cons = self.get(XS_RING_REQ_CONS_OFFSET);
        let mut prod = self.get(XS_RING_REQ_PROD_OFFSET);
        let mut n = 0;
        while n < data.len() && prod.wrapping_sub(cons) < 1024 {
            self.page[(prod % 1024) as usize] = data[n];
            prod = prod.wrapping_add(1);
            n += 1;
        }
        self.set(XS_RING_REQ_PROD_OFFSET, prod);
        n
    }
    fn recv(&mut self) -> Vec<u8> {
        let mut cons = self.get(XS_RING_RSP_CONS_OFFSET);
        let prod = self.get(XS_RING_RSP_PROD_OFFSET);
        let mut v = Vec::new();
        while cons != prod {
            v.push(self.page[1024 + (cons % 1024) as usize]);
            cons = cons.wrapping_add(1);
        }
        self.set(XS_RING_RSP_CONS_OFFSET, cons);
        v
    }
    fn service(&mut self, xs: &mut Xenstore, d: u16) -> RingUpdate {
        let up = xs.service_ring(d, &RingSnapshot::from_page(&self.page));
        up.apply(&mut self.page);
        up
    }
}

fn split_messages(mut b: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        out.push(decode_reply(&b[..16 + len]).unwrap());
        b = &b[16 + len..];
    }
    assert!(b.is_empty());
    out
}

#[test]
fn ring_round_trip_with_wrap_and_partial_messages() {
    let mut xs = with_domains();
    // indices near the u32 wrap, and not 0 mod 1024
    let mut g = Guest::new(u32::MAX - 700);
    let mut stream = Vec::new();
    for i in 0..200u32 {
        stream.extend(
            Op::Write {
                path: format!("data/k{i}"),
                value: vec![b'v'; (i % 50) as usize],
            }
            .encode(i, 0),
        );
        stream.extend(
            Op::Read {
                path: format!("data/k{i}"),
            }
            .encode(1000 + i, 0),
        );
    }
    let mut sent = 0;
    let mut got = Vec::new();
    for round in 0..10_000 {
        // send in odd-sized pieces
        let piece = (37 + round * 11) % 300 + 1;
        let end = (sent + piece).min(stream.len());
        sent += g.send(&stream[sent..end]);
        let up = g.service(&mut xs, 1);
        got.extend(g.recv());
        if sent == stream.len() && up == RingUpdate::default() && xs.counts(1).queued == 0 {
            break;
        }
    }
    assert_eq!(sent, stream.len());
    let replies = split_messages(&got);
    assert_eq!(replies.len(), 400);
    for (i, r) in replies.iter().enumerate() {
        let i = i as u32;
        match r {
            Reply::Ok {
                ty: XS_WRITE,
                req_id,
                payload,
                ..
            } => {
                assert_eq!(*req_id, i / 2);
                assert_eq!(payload, b"OK\0");
            }
            Reply::Ok {
                ty: XS_READ,
                req_id,
                payload,
                ..
            } => {
                assert_eq!(*req_id, 1000 + i / 2);
                assert_eq!(payload.len() as u32, (i / 2) % 50);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(xs.counts(1).queued, 0);
}

#[test]
fn ring_watch_event_follows_the_ok() {
    let mut xs = with_domains();
    let mut g = Guest::new(0);
    g.send(
        &Op::Watch {
            path: s("control"),
            token: b"ctl".to_vec(),
        }
        .encode(1, 0),
    );
    let up = g.service(&mut xs, 1);
    assert!(up.notify);
    let r = split_messages(&g.recv());
    assert!(matches!(r[0], Reply::Ok { ty: XS_WATCH, .. }));
    assert_eq!(
        r[1],
        Reply::Event {
            path: b"control".to_vec(),
            token: b"ctl".to_vec()
        }
    );
    // an event caused by another domain is queued and reported dirty
    write(&mut xs, 0, "/local/domain/1/control/shutdown", "poweroff").unwrap();
    assert_eq!(xs.take_dirty(), vec![1]);
    g.service(&mut xs, 1);
    let r = split_messages(&g.recv());
    assert_eq!(
        r,
        vec![Reply::Event {
            path: b"control/shutdown".to_vec(),
            token: b"ctl".to_vec()
        }]
    );
}

#[test]
fn ring_bad_indices_end_only_that_conversation() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "data", "w").unwrap();
    let before = snapshot(&xs);
    let mut g = Guest::new(100);
    g.set(XS_RING_REQ_PROD_OFFSET, 100 + 1025);
    let up = g.service(&mut xs, 1);
    assert_eq!(up.error, Some(XENSTORE_ERROR_RINGIDX));
    assert_eq!(g.get(XS_RING_ERROR_OFFSET), XENSTORE_ERROR_RINGIDX);
    assert_eq!(xs.counts(1).watches, 0);
    // nothing more is exchanged
    g.set(XS_RING_REQ_PROD_OFFSET, 100);
    g.send(&Op::Read { path: s("name") }.encode(1, 0));
    assert_eq!(g.service(&mut xs, 1), RingUpdate::default());
    assert_eq!(snapshot(&xs), before);
    // domain 2 is fine
    let mut g2 = Guest::new(0);
    g2.send(&Op::Read { path: s("name") }.encode(1, 0));
    g2.service(&mut xs, 2);
    assert!(matches!(
        split_messages(&g2.recv())[0],
        Reply::Ok { ref payload, .. } if payload == b"guest2"
    ));
    // the response ring is checked too
    let mut g3 = Guest::new(0);
    g3.set(XS_RING_RSP_PROD_OFFSET, 5000);
    assert_eq!(g3.service(&mut xs, 2).error, Some(XENSTORE_ERROR_RINGIDX));
}

#[test]
fn ring_oversize_payload_and_reconnect() {
    let mut xs = with_domains();
    let mut g = Guest::new(0);
    let h = XsdSockmsg {
        ty: XS_WRITE,
        req_id: 1,
        tx_id: 0,
        len: 4097,
    };
    g.send(&h.to_bytes());
    let up = g.service(&mut xs, 1);
    assert_eq!(up.error, Some(XENSTORE_ERROR_PROTO));
    assert_eq!(g.recv(), Vec::<u8>::new());
    // the guest asks for a reconnection
    g.set(XS_RING_CONNECTION_OFFSET, XENSTORE_RECONNECT);
    g.set(XS_RING_REQ_PROD_OFFSET, 77);
    let up = g.service(&mut xs, 1);
    assert!(up.reset_indices && up.notify);
    assert_eq!(g.get(XS_RING_CONNECTION_OFFSET), XENSTORE_CONNECTED);
    assert_eq!(g.get(XS_RING_ERROR_OFFSET), XENSTORE_ERROR_NONE);
    assert_eq!(g.get(XS_RING_REQ_PROD_OFFSET), 0);
    assert_eq!(xs.counts(1).error, None);
    g.send(&Op::Read { path: s("name") }.encode(2, 0));
    g.service(&mut xs, 1);
    assert!(matches!(
        split_messages(&g.recv())[0],
        Reply::Ok { req_id: 2, .. }
    ));
}

#[test]
fn ring_backpressure_when_the_guest_does_not_read() {
    let mut xs = with_domains();
    let mut g = Guest::new(0);
    let req = Op::Read { path: s("name") }.encode(1, 0);
    let free = |g: &Guest| {
        1024 - g
            .get(XS_RING_REQ_PROD_OFFSET)
            .wrapping_sub(g.get(XS_RING_REQ_CONS_OFFSET)) as usize
    };
    let mut n_sent = 0;
    for _ in 0..200 {
        while free(&g) >= req.len() {
            assert_eq!(g.send(&req), req.len());
            n_sent += 1;
        }
        g.service(&mut xs, 1);
    }
    // the server stopped reading once its queue was full
    let c = xs.counts(1);
    assert!(c.queued_bytes <= xs.quotas().read_stop_bytes + 64, "{c:?}");
    assert!(n_sent * req.len() > xs.quotas().read_stop_bytes);
    assert!(free(&g) < req.len());
    // draining lets it continue, and every reply arrives
    let mut stream = Vec::new();
    for _ in 0..100_000 {
        g.service(&mut xs, 1);
        let got = g.recv();
        stream.extend_from_slice(&got);
        if got.is_empty() && xs.counts(1).queued == 0 {
            break;
        }
    }
    let replies = split_messages(&stream).len();
    assert_eq!(replies, n_sent);
}

#[test]
fn reintroduction_resets_the_ring() {
    let mut xs = with_domains();
    watch(&mut xs, 1, "data", "w").unwrap();
    xs.introduce(1, 7, 8).unwrap();
    assert_eq!(xs.counts(1).watches, 0);
    let mut g = Guest::new(500);
    let up = g.service(&mut xs, 1);
    assert!(up.reset_indices);
    assert_eq!(g.get(XS_RING_RSP_PROD_OFFSET), 0);
    assert_eq!(xs.ring_of(1), Some((7, 8)));
}

// ---------------------------------------------------------------- property tests

/// Reference model for READ/WRITE/MKDIR/RM/DIRECTORY below `/shared`, where every
/// domain may read and write.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    nodes: BTreeMap<String, Vec<u8>>,
}

impl Model {
    fn ensure_parents(&mut self, p: &str) {
        let mut cur = p;
        while let Some(i) = cur.rfind('/') {
            cur = &cur[..i];
            if cur == "/shared" || cur.is_empty() {
                break;
            }
            self.nodes.entry(cur.to_string()).or_default();
        }
    }
    fn write(&mut self, p: &str, v: &[u8]) {
        self.ensure_parents(p);
        self.nodes.insert(p.to_string(), v.to_vec());
    }
    fn mkdir(&mut self, p: &str) {
        self.ensure_parents(p);
        self.nodes.entry(p.to_string()).or_default();
    }
    fn exists(&self, p: &str) -> bool {
        p == "/shared" || self.nodes.contains_key(p)
    }
    fn rm(&mut self, p: &str) -> Result<(), XsError> {
        if !self.exists(p) {
            let parent = &p[..p.rfind('/').unwrap()];
            return if self.exists(parent) {
                Ok(())
            } else {
                Err(XsError::Enoent)
            };
        }
        let prefix = format!("{p}/");
        self.nodes.retain(|k, _| k != p && !k.starts_with(&prefix));
        Ok(())
    }
    fn read(&self, p: &str) -> Result<Vec<u8>, XsError> {
        if p == "/shared" {
            return Ok(Vec::new());
        }
        self.nodes.get(p).cloned().ok_or(XsError::Enoent)
    }
    fn dir(&self, p: &str) -> Result<Vec<String>, XsError> {
        if !self.exists(p) {
            return Err(XsError::Enoent);
        }
        let prefix = format!("{p}/");
        let mut v: Vec<String> = self
            .nodes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|r| !r.contains('/'))
            .map(String::from)
            .collect();
        v.sort();
        Ok(v)
    }
}

#[derive(Clone, Debug)]
enum MOp {
    Write(u16, String, Vec<u8>),
    Mkdir(u16, String),
    Rm(u16, String),
    Read(u16, String),
    Dir(u16, String),
}

impl MOp {
    fn with_domain(self, d: u16) -> Self {
        match self {
            MOp::Write(_, p, v) => MOp::Write(d, p, v),
            MOp::Mkdir(_, p) => MOp::Mkdir(d, p),
            MOp::Rm(_, p) => MOp::Rm(d, p),
            MOp::Read(_, p) => MOp::Read(d, p),
            MOp::Dir(_, p) => MOp::Dir(d, p),
        }
    }
}

/// Outcome of one operation, comparable between the engine and the model.
#[derive(Clone, Debug, PartialEq)]
enum Res {
    Unit(Result<(), XsError>),
    Val(Result<Vec<u8>, XsError>),
    Dir(Result<Vec<String>, XsError>),
}

fn path_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c"]), 1..4)
        .prop_map(|v| format!("/shared/{}", v.join("/")))
}

fn mop_strategy() -> impl Strategy<Value = MOp> {
    let dom = proptest::sample::select(vec![0u16, 1, 2]);
    prop_oneof![
        (
            dom.clone(),
            path_strategy(),
            proptest::collection::vec(any::<u8>(), 0..4)
        )
            .prop_map(|(d, p, v)| MOp::Write(d, p, v)),
        (dom.clone(), path_strategy()).prop_map(|(d, p)| MOp::Mkdir(d, p)),
        (dom.clone(), path_strategy()).prop_map(|(d, p)| MOp::Rm(d, p)),
        (dom.clone(), path_strategy()).prop_map(|(d, p)| MOp::Read(d, p)),
        (dom, path_strategy()).prop_map(|(d, p)| MOp::Dir(d, p)),
    ]
}

fn shared_store() -> Xenstore {
    let mut xs = Xenstore::new();
    mkdir(&mut xs, 0, "/shared").unwrap();
    set_perms(&mut xs, 0, "/shared", "b0").unwrap();
    xs.introduce(1, 1, 1).unwrap();
    xs.introduce(2, 1, 1).unwrap();
    xs
}

/// Runs `op` on the engine, in transaction `tx` (0: none).
fn run_engine(xs: &mut Xenstore, op: &MOp, tx: u32) -> Res {
    let unit = |r: Result<Vec<u8>, XsError>| Res::Unit(r.map(|_| ()));
    match op {
        MOp::Write(d, p, v) => {
            let o = Op::Write {
                path: p.clone(),
                value: v.clone(),
            };
            unit(xs.request(*d, tx, &o))
        }
        MOp::Mkdir(d, p) => unit(xs.request(*d, tx, &Op::Mkdir { path: p.clone() })),
        MOp::Rm(d, p) => unit(xs.request(*d, tx, &Op::Rm { path: p.clone() })),
        MOp::Read(d, p) => Res::Val(xs.request(*d, tx, &Op::Read { path: p.clone() })),
        MOp::Dir(d, p) => Res::Dir(xs.request(*d, tx, &Op::Directory { path: p.clone() }).map(
            |v| {
                let mut v = split_strings(&v);
                v.sort();
                v
            },
        )),
    }
}

/// Runs `op` on the model.
fn run_model(m: &mut Model, op: &MOp) -> Res {
    match op {
        MOp::Write(_, p, v) => {
            m.write(p, v);
            Res::Unit(Ok(()))
        }
        MOp::Mkdir(_, p) => {
            m.mkdir(p);
            Res::Unit(Ok(()))
        }
        MOp::Rm(_, p) => Res::Unit(m.rm(p)),
        MOp::Read(_, p) => Res::Val(m.read(p)),
        MOp::Dir(_, p) => Res::Dir(m.dir(p)),
    }
}

fn store_tree(xs: &Xenstore) -> BTreeMap<String, Vec<u8>> {
    xs.store()
        .paths()
        .filter(|p| p.starts_with("/shared/"))
        .map(|p| (s(p), xs.store().get(p).unwrap().value.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_framed_messages(
        ty in 0u32..30,
        payload in proptest::collection::vec(
            proptest::sample::select(b"/ab@-_0123\0Tnrwb".to_vec()), 0..64),
        tx in 0u32..3,
    ) {
        let m = encode(ty, 1, tx, &payload);
        if let Ok(r) = parse(&m) {
            // what parses re-encodes to something that parses to the same thing
            let again = parse(&r.op.encode(r.req_id, r.tx_id)).unwrap();
            prop_assert_eq!(again, r);
        }
        let mut xs = shared_store();
        let _ = xs.handle(1, &m);
        let _ = xs.handle(0, &m);
        prop_assert!(xs.check().is_ok());
    }

    #[test]
    fn ring_functions_never_panic(
        cons in any::<u32>(),
        delta in 0u32..2048,
        data in proptest::collection::vec(any::<u8>(), 0..1024),
        max in 0usize..5000,
    ) {
        let mut area = [0u8; 1024];
        area[..data.len()].copy_from_slice(&data);
        let prod = cons.wrapping_add(delta);
        let r = ring_read(cons, prod, &area, max);
        prop_assert_eq!(r.is_ok(), delta <= 1024);
        if let Ok(v) = r {
            prop_assert_eq!(v.len(), (delta as usize).min(max));
        }
        let w = ring_write(cons, prod, &data);
        if let Ok(w) = w {
            prop_assert_eq!(w.written, data.len().min(1024 - delta as usize));
            prop_assert_eq!(w.chunks[0].2 + w.chunks[1].2, w.written);
        }
        let mut reader = MessageReader::new();
        let _ = read_messages(&mut reader, cons, prod, &area, 100);
    }

    #[test]
    fn service_ring_never_panics(
        page in proptest::collection::vec(any::<u8>(), 2080),
        rounds in 1usize..4,
    ) {
        let mut xs = shared_store();
        let mut page = page;
        for _ in 0..rounds {
            let up = xs.service_ring(1, &RingSnapshot::from_page(&page));
            up.apply(&mut page);
        }
        prop_assert!(xs.check().is_ok());
        // domain 2 still served
        let r = xs.request(2, 0, &Op::Read { path: s("/shared") });
        prop_assert!(r.is_ok());
    }

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(mop_strategy(), 1..80)) {
        let mut xs = shared_store();
        let mut m = Model::default();
        for op in &ops {
            prop_assert_eq!(run_engine(&mut xs, op, 0), run_model(&mut m, op), "{:?}", op);
            prop_assert!(xs.check().is_ok(), "{:?}", xs.check());
        }
        prop_assert_eq!(store_tree(&xs), m.nodes);
    }

    /// Domain 1 runs `in_tx` in a transaction while domain 2 runs `concurrent` between
    /// its two halves. A successful commit must equal running the transaction's
    /// operations after the concurrent ones (same results, same tree); EAGAIN must
    /// leave the tree as the concurrent operations made it.
    #[test]
    fn transactions_serialize(
        before in proptest::collection::vec(mop_strategy(), 0..20),
        in_tx in proptest::collection::vec(mop_strategy(), 0..20),
        concurrent in proptest::collection::vec(mop_strategy(), 0..6),
    ) {
        let mut xs = shared_store();
        let mut global = Model::default();
        for op in &before {
            prop_assert_eq!(run_engine(&mut xs, op, 0), run_model(&mut global, op));
        }
        let in_tx: Vec<MOp> = in_tx.into_iter().map(|o| o.with_domain(1)).collect();
        let concurrent: Vec<MOp> = concurrent.into_iter().map(|o| o.with_domain(2)).collect();
        let t = tx_start(&mut xs, 1);
        let half = in_tx.len() / 2;
        let mut seen = Vec::new();
        for op in &in_tx[..half] {
            seen.push(run_engine(&mut xs, op, t));
        }
        for op in &concurrent {
            prop_assert_eq!(run_engine(&mut xs, op, 0), run_model(&mut global, op));
        }
        for op in &in_tx[half..] {
            seen.push(run_engine(&mut xs, op, t));
        }
        prop_assert!(xs.check().is_ok(), "{:?}", xs.check());
        match tx_end(&mut xs, 1, t, true) {
            Ok(()) => {
                let mut replay = global.clone();
                let expected: Vec<Res> = in_tx.iter().map(|op| run_model(&mut replay, op)).collect();
                prop_assert_eq!(seen, expected);
                prop_assert_eq!(store_tree(&xs), replay.nodes);
            }
            Err(XsError::Eagain) => prop_assert_eq!(store_tree(&xs), global.nodes),
            Err(e) => prop_assert!(false, "commit: {:?}", e),
        }
        prop_assert!(xs.check().is_ok(), "{:?}", xs.check());
        prop_assert_eq!(xs.counts(1).transactions, 0);
    }
}
