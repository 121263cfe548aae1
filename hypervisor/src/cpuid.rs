//! The CPUID a guest sees: the host's, filtered, plus Xen's hypervisor leaves.
//!
//! A pure function of the host's answers so that it is tested with canned CPUID data.

use abi::{XEN_CPUID_SIGNATURE, XEN_VERSION_MAJOR, XEN_VERSION_MINOR};

/// Base of the hypervisor leaves.
pub const HV_BASE: u32 = 0x4000_0000;
/// Highest hypervisor leaf (Xen 4.17 has five).
pub const HV_MAX: u32 = HV_BASE + 5;

/// Leaf 0x40000004 eax: XEN_HVM_CPUID_X2APIC_VIRT (1), VCPU_ID_PRESENT (3),
/// DOMID_PRESENT (4).
pub const HVM_FEATURES: u32 = (1 << 1) | (1 << 3) | (1 << 4);

/// XSAVE components offered to guests: x87, SSE, AVX (see `arch::svm::enable_fpu`).
pub const GUEST_XCR0_MASK: u64 = 0x7;

/// What the guest's answer depends on besides the host's CPUID.
#[derive(Clone, Copy, Debug)]
pub struct GuestView {
    /// Guest CR4.OSXSAVE, reflected in leaf 1 ecx bit 27.
    pub osxsave: bool,
    /// The guest's XCR0 (sizes in leaf 0xd).
    pub xcr0: u64,
    /// The vCPU's APIC id (leaf 1 ebx[31:24]).
    pub apic_id: u8,
    /// vCPU id (leaf 0x40000004 ebx).
    pub vcpu_id: u32,
    /// Domain id (leaf 0x40000004 ecx).
    pub domid: u16,
}

/// The guest's CPUID for `leaf`/`subleaf`; `host` runs the real instruction.
pub fn guest_cpuid(
    leaf: u32,
    subleaf: u32,
    view: GuestView,
    host: impl Fn(u32, u32) -> [u32; 4],
) -> [u32; 4] {
    match leaf {
        HV_BASE => [
            HV_MAX,
            XEN_CPUID_SIGNATURE[0],
            XEN_CPUID_SIGNATURE[1],
            XEN_CPUID_SIGNATURE[2],
        ],
        0x4000_0001 => [(XEN_VERSION_MAJOR << 16) | XEN_VERSION_MINOR, 0, 0, 0],
        // one hypercall page, written through MSR 0x40000000
        0x4000_0002 => [1, crate::exits::HYPERCALL_PAGE_MSR, 0, 0],
        0x4000_0004 => [HVM_FEATURES, view.vcpu_id, u32::from(view.domid), 0],
        0x4000_0003 | 0x4000_0005..=0x4fff_ffff => [0; 4],
        1 => {
            let [eax, ebx, mut ecx, edx] = host(1, 0);
            ecx &= !((1 << 5)      // VMX
                | (1 << 3)         // MONITOR/MWAIT
                | (1 << 7)         // EST: no P-state MSRs
                | (1 << 8)         // TM2: no thermal MSRs
                | (1 << 27)        // OSXSAVE (set below from the guest's CR4)
                | (1 << 24)); // TSC deadline: the virtual APIC has one-shot/periodic only
            ecx |= (1 << 31) | (1 << 21); // hypervisor present; x2APIC (see vlapic)
            if view.osxsave {
                ecx |= 1 << 27;
            }
            let ebx = (ebx & 0x00ff_ffff) | (u32::from(view.apic_id) << 24);
            // No machine-check architecture is emulated (MCE, MCA): Linux would read the
            // MCG/MCi MSRs.
            // Nor thermal monitoring (ACPI, TM, PBE: Intel Linux writes the thermal
            // interrupt MSR when it sees them), as Xen's HVM policy.
            let edx = edx & !((1 << 7) | (1 << 14) | (1 << 22) | (1 << 29) | (1 << 31));
            [eax, ebx, ecx, edx]
        }
        7 if subleaf == 0 => {
            let [eax, mut ebx, mut ecx, edx] = host(7, 0);
            // AVX-512 family (state components the guest cannot enable), Intel PT;
            // TSC_ADJUST (its MSR is not offered).
            ebx &= !((1 << 1)
                | (1 << 16)
                | (1 << 17)
                | (1 << 21)
                | (1 << 26)
                | (1 << 27)
                | (1 << 28)
                | (1 << 30)
                | (1 << 31)
                | (1 << 25));
            // PKU, OSPKE, AVX512_VBMI; RDPID (needs TSC_AUX, which is not switched)
            ecx &= !((1 << 3) | (1 << 4) | (1 << 1) | (1 << 22));
            [eax, ebx, ecx, edx]
        }
        0xd => xsave_leaf(subleaf, view.xcr0, &host),
        0x8000_0001 => {
            let [eax, ebx, ecx, edx] = host(0x8000_0001, 0);
            // no nested SVM; no RDTSCP (TSC_AUX is not switched per guest)
            [eax, ebx, ecx & !(1 << 2), edx & !(1 << 27)]
        }
        0x8000_000a => [0; 4],
        _ => host(leaf, subleaf),
    }
}

fn xsave_leaf(subleaf: u32, xcr0: u64, host: &impl Fn(u32, u32) -> [u32; 4]) -> [u32; 4] {
    let [eax0, _, _, edx0] = host(0xd, 0);
    let supported = ((u64::from(edx0) << 32) | u64::from(eax0)) & GUEST_XCR0_MASK;
    let size_for = |mask: u64| {
        (2..64)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| {
                let [size, offset, _, _] = host(0xd, i);
                offset + size
            })
            .fold(576, u32::max)
    };
    match subleaf {
        0 => [
            supported as u32,
            size_for(xcr0 & supported),
            size_for(supported),
            0,
        ],
        1 => {
            let [eax, _, _, _] = host(0xd, 1);
            // XSAVEOPT and XGETBV1 only: XSAVES needs IA32_XSS, which is not offered.
            [eax & 0b101, 0, 0, 0]
        }
        i if i < 64 && supported & (1 << i) != 0 => host(0xd, i),
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            (1, _) => [
                0x0006_0fb1,
                0x0102_0800,
                0xfffa_3223 | (1 << 5),
                0x178b_fbff,
            ],
            (0xd, 0) => [0xe7, 0x340, 0x980, 0],
            (0xd, 1) => [0xf, 0, 0, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0xd, 5) => [64, 832, 0, 0],
            (0x8000_0001, _) => [0, 0, 0x0000_0007, 0],
            _ => [leaf, sub, 0xdead, 0xbeef],
        }
    }

    const VIEW: GuestView = GuestView {
        osxsave: false,
        xcr0: 1,
        apic_id: 3,
        vcpu_id: 3,
        domid: 7,
    };

    #[test]
    fn hypervisor_leaves_say_xen() {
        let r = guest_cpuid(HV_BASE, 0, VIEW, host);
        assert_eq!(r[0], HV_MAX);
        let mut sig = Vec::new();
        for w in &r[1..] {
            sig.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(sig, b"XenVMMXenVMM");
        assert_eq!(guest_cpuid(0x4000_0001, 0, VIEW, host)[0], 0x0004_0011);
        assert_eq!(guest_cpuid(0x4000_0003, 0, VIEW, host), [0; 4]);
        assert_eq!(
            guest_cpuid(0x4000_0002, 0, VIEW, host),
            [1, 0x4000_0000, 0, 0]
        );
        assert_eq!(
            guest_cpuid(0x4000_0004, 0, VIEW, host),
            [HVM_FEATURES, 3, 7, 0]
        );
        assert_eq!(guest_cpuid(0x4000_0006, 0, VIEW, host), [0; 4]);
    }

    #[test]
    fn leaf1_hides_vmx_and_sets_hypervisor_bit() {
        let [_, ebx, ecx, edx] = guest_cpuid(1, 0, VIEW, host);
        assert_ne!(ecx & (1 << 31), 0);
        assert_eq!(ecx & (1 << 5), 0);
        // no thermal or P-state features (EST, TM2; ACPI, TM, PBE), even when the host
        // has every feature bit
        let all = |l: u32, s: u32| if l == 1 { [0, 0, !0, !0] } else { host(l, s) };
        let [_, _, ecx_all, edx_all] = guest_cpuid(1, 0, VIEW, all);
        assert_eq!(ecx_all & ((1 << 7) | (1 << 8)), 0);
        assert_eq!(edx_all & ((1 << 22) | (1 << 29) | (1 << 31)), 0);
        assert_ne!(edx & 1, 0);
        assert_eq!(ecx & (1 << 27), 0);
        assert_eq!(ebx >> 24, 3);
        let v = GuestView {
            osxsave: true,
            ..VIEW
        };
        assert_ne!(guest_cpuid(1, 0, v, host)[2] & (1 << 27), 0);
    }

    #[test]
    fn svm_is_hidden() {
        assert_eq!(guest_cpuid(0x8000_0001, 0, VIEW, host)[2] & 4, 0);
        assert_eq!(guest_cpuid(0x8000_000a, 0, VIEW, host), [0; 4]);
    }

    #[test]
    fn xsave_sizes_follow_guest_xcr0() {
        let [eax, ebx, ecx, _] = guest_cpuid(0xd, 0, VIEW, host);
        assert_eq!(eax, 0x7);
        assert_eq!(ebx, 576);
        assert_eq!(ecx, 832);
        let v = GuestView { xcr0: 0x7, ..VIEW };
        assert_eq!(guest_cpuid(0xd, 0, v, host)[1], 832);
        assert_eq!(guest_cpuid(0xd, 1, v, host)[0], 0b101);
        assert_eq!(guest_cpuid(0xd, 5, v, host), [0; 4]);
        assert_eq!(guest_cpuid(0xd, 2, v, host)[0], 256);
    }

    #[test]
    fn other_leaves_pass_through() {
        assert_eq!(
            guest_cpuid(0x8000_0008, 0, VIEW, host),
            [0x8000_0008, 0, 0xdead, 0xbeef]
        );
    }
}
