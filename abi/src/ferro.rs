//! Ferrovisor's test interface: how project test guests report what they observed so
//! that the hypervisor can compare it with what it did.
//!
//! This is NOT part of Xen's ABI. The hypercall number lies outside Xen's table, so a
//! real Xen (and ferrovisor, for domains without `test_interface = 1` in their config)
//! answers `-ENOSYS`.
//!
//! Call: `rax = TEST_HYPERCALL`, `rdi = check id`, `rsi = observed value`,
//! `rdx = second observed value`. Returns 0 when the hypervisor's verdict is PASS,
//! 1 when it is FAIL, `-EINVAL` for an unknown check id. The hypervisor logs every
//! verdict as `d<domid> check <name>: PASS|FAIL (<detail>)`.

/// The test-report hypercall number ("FE" in ASCII, far above Xen's 64 slots).
pub const TEST_HYPERCALL: u64 = 0x4645;

/// Not a check: `rdi = QUERY_RESTARTS` asks how many times the hypervisor restarted
/// this domain (`on_reboot`/`on_crash = "restart"`); the count comes back in rax.
pub const QUERY_RESTARTS: u64 = 0x100;

/// Port a guest may write characters to; the hypervisor prints them as the guest's
/// console (Xen's HVM debug port 0xe9 behaves the same).
pub const DEBUG_PORT: u16 = 0xe9;

/// A port nothing decodes: reads return all ones, writes are dropped (as on real
/// hardware and on Xen without a device model).
pub const UNCLAIMED_PORT: u16 = 0x4321;

/// A guest-physical address the test guest's domain never backs (the guest maps it
/// in its own page tables; the nested page tables do not).
pub const UNBACKED_GPA: u64 = 0xd000_0000;

/// `test=dma-nic`: where the NIC owner maps the granter's page (4 GiB: above its RAM
/// and every 32-bit BAR, outside its own page tables: only the NIC touches it).
pub const DMA_GRANT_GPA: u64 = 0x1_0000_0000;

/// `test=dma-nic`: an address the NIC owner never maps; its third frame is received
/// there and must be blocked.
pub const DMA_NEVER_MAPPED_GPA: u64 = 0x1_4000_0000;

/// Value the test guest writes to IA32_SYSENTER_ESP (MSR 0x175) in the `msr` check.
pub const MSR_TEST_VALUE: u64 = 0x0000_1234_5678_9abc;

/// An MSR number no CPU implements; reading it must raise #GP in the guest.
pub const MSR_UNKNOWN: u32 = 0x4000_00ff;

/// Length of the pattern written in the `memory-write` check.
pub const MEMORY_PATTERN_LEN: u64 = 4096;

/// Byte `i` of the `memory-write` pattern.
pub const fn memory_pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xff) as u8
}

/// The checks a test guest reports. Values are the `rdi` of the report hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Check {
    /// `xen_version(XENVER_version)` result: value = rax the guest saw.
    Hypercall = 1,
    /// CPUID 0x40000000: value = ebx | ecx << 32, value2 = edx.
    CpuidSignature = 2,
    /// CPUID leaf 1 ecx in value (hypervisor bit 31 must be set), leaf 0x80000001 ecx in
    /// value2 (SVM bit 2 must be clear: nested SVM is not offered).
    CpuidFeatures = 3,
    /// Bytes the guest wrote to [`DEBUG_PORT`] so far (value).
    IoOut = 4,
    /// `inl` from [`UNCLAIMED_PORT`] in value, `inb` in value2.
    IoIn = 5,
    /// IA32_SYSENTER_ESP read back after writing [`MSR_TEST_VALUE`].
    Msr = 6,
    /// Exception vector the guest took on `rdmsr` of [`MSR_UNKNOWN`] (value), or
    /// `u64::MAX` when no exception was raised.
    MsrGp = 7,
    /// 32-bit read from [`UNBACKED_GPA`] (value).
    NpfRead = 8,
    /// 32-bit read from [`UNBACKED_GPA`] after writing 0 to it (value).
    NpfWrite = 9,
    /// Guest wrote [`memory_pattern`] at guest-physical value, length value2.
    MemoryWrite = 10,
    /// Only when the domain has a ramdisk (module 0 of `hvm_start_info`): the
    /// [`fnv1a64`] of its bytes (value) and its length (value2), as the guest read them.
    Ramdisk = 11,
    /// Only from `test=hostile`: hypercalls with garbage arguments. value = how many
    /// returned something other than Xen's error code, value2 = how many were made.
    Hostile = 12,
    /// `test=peer-a`: failed steps (value) of how many (value2).
    PeerA = 13,
    /// `test=peer-b`: failed steps (value) of how many (value2).
    PeerB = 14,
    /// `test=reboot-twice` / `test=reboot-cycles`: the restart count the guest read
    /// (value) once it reached its goal (at least 2).
    Restarts = 15,
    /// `test=xenstore`: FNV-1a of the guest's `name` node as it read it (value); 1 if
    /// writing `data/ferro` and reading it back worked (value2).
    Xenstore = 16,
    /// `test=dma-granter`: failed steps (value) of how many (value2).
    DmaGranter = 17,
    /// `test=dma-nic`: failed steps (value) of how many (value2).
    DmaNic = 18,
}

impl Check {
    /// Every check, in the order the test guest runs them.
    pub const ALL: [Check; 10] = [
        Check::Hypercall,
        Check::CpuidSignature,
        Check::CpuidFeatures,
        Check::IoOut,
        Check::IoIn,
        Check::Msr,
        Check::MsrGp,
        Check::NpfRead,
        Check::NpfWrite,
        Check::MemoryWrite,
    ];

    /// Checks reported only when their subject exists (a ramdisk).
    pub const OPTIONAL: [Check; 8] = [
        Check::Ramdisk,
        Check::Hostile,
        Check::PeerA,
        Check::PeerB,
        Check::Restarts,
        Check::Xenstore,
        Check::DmaGranter,
        Check::DmaNic,
    ];

    /// The check for a report's `rdi`.
    pub fn from_id(id: u64) -> Option<Check> {
        Check::ALL
            .into_iter()
            .chain(Check::OPTIONAL)
            .find(|c| *c as u64 == id)
    }

    /// The name used in log lines.
    pub fn name(self) -> &'static str {
        match self {
            Check::Hypercall => "hypercall",
            Check::CpuidSignature => "cpuid-signature",
            Check::CpuidFeatures => "cpuid-features",
            Check::IoOut => "io-out",
            Check::IoIn => "io-in",
            Check::Msr => "msr",
            Check::MsrGp => "msr-gp",
            Check::NpfRead => "npf-read",
            Check::NpfWrite => "npf-write",
            Check::MemoryWrite => "memory-write",
            Check::Ramdisk => "ramdisk",
            Check::Hostile => "hostile-hypercalls",
            Check::PeerA => "peer-a",
            Check::PeerB => "peer-b",
            Check::Restarts => "restarts",
            Check::Xenstore => "xenstore",
            Check::DmaGranter => "dma-granter",
            Check::DmaNic => "dma-nic",
        }
    }
}

/// The UUID (Xen's domain handle) of a domain whose config names none: derived from
/// its name, so it stays the same across restarts as xl keeps it (xl draws a random
/// one at creation; ferrovisor has no entropy source it trusts at boot). RFC 4122
/// layout, version 4 and variant bits set.
pub fn default_uuid(name: &str) -> [u8; 16] {
    let a = fnv1a64(name.as_bytes());
    let b = fnv1a64(&a.to_le_bytes()) ^ 0x6665_7272_6f76_6973; // "ferrovis"
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&a.to_be_bytes());
    u[8..].copy_from_slice(&b.to_be_bytes());
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as Linux prints `/sys/hypervisor/uuid`.
pub fn uuid_string(u: &[u8; 16]) -> UuidText {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [0u8; 36];
    let mut j = 0;
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            t[j] = b'-';
            j += 1;
        }
        t[j] = HEX[usize::from(b >> 4)];
        t[j + 1] = HEX[usize::from(b & 15)];
        j += 2;
    }
    UuidText(t)
}

/// The text of a UUID ([`uuid_string`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UuidText([u8; 36]);

impl UuidText {
    /// As a string.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// 64-bit FNV-1a, the checksum of the `ramdisk` check.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_uuids_are_v4_shaped_and_stable() {
        let u = default_uuid("linux");
        assert_eq!(u, default_uuid("linux"));
        assert_ne!(u, default_uuid("linux-b"));
        let t = uuid_string(&u);
        let s = t.as_str();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_eq!(s.matches('-').count(), 4);
    }

    #[test]
    fn ids_round_trip_and_names_are_unique() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        for c in Check::ALL.into_iter().chain(Check::OPTIONAL) {
            assert_eq!(Check::from_id(c as u64), Some(c));
        }
        assert_eq!(Check::from_id(0), None);
        let mut names: Vec<_> = Check::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Check::ALL.len());
    }

    #[test]
    fn signature_spells_xen() {
        let mut s = Vec::new();
        for w in crate::XEN_CPUID_SIGNATURE {
            s.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&s, b"XenVMMXenVMM");
    }
}
