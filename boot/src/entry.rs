//! The image's first instructions: the PVH ELF note (QEMU `-kernel`, Xen-style direct
//! boot), the multiboot2 header (GRUB), and the 32-bit entry that builds an identity map
//! of the first 4 GiB, enters long mode and calls [`crate::boot_main`].
//!
//! Both boot protocols enter `_start32` in 32-bit protected mode with paging off:
//! multiboot2 with `eax` = 0x36d76289 and `ebx` = the boot information; PVH with `ebx` =
//! the `hvm_start_info` (told apart by its magic, as PLATFORM.md advises, not by `eax`).

/// Size of the boot (BSP) stack.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz: a 32-bit physical address */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32

    .section .multiboot2, "a"
    .p2align 3
mb2_header_start:
    .long 0xe85250d6        /* magic */
    .long 0                 /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header_start
    .long -(0xe85250d6 + (mb2_header_end - mb2_header_start))
    /* information request: basic meminfo (4), mmap (6), ACPI old (14) and new (15) */
    .p2align 3
    .short 1, 0
    .long 24
    .long 4, 6, 14, 15
    /* optional (flags bit 0) under UEFI: EFI 64-bit system table (12), EFI mmap (17) */
    .p2align 3
    .short 1, 1
    .long 16
    .long 12, 17
    /* end tag */
    .p2align 3
    .short 0, 0
    .long 8
mb2_header_end:

    .section .text.entry32, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov edi, eax            /* boot magic (multiboot2) */
    mov esi, ebx            /* boot information */

    /* zero .bss (page tables and the stack live there) */
    mov ebp, edi
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov edi, ebp

    mov esp, offset {stack} + {stack_size}

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages */
    mov eax, offset {pdpt}
    or eax, 0x3
    mov dword ptr [{pml4}], eax
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset {pds}
    or eax, 0x3
    mov dword ptr [{pdpt} + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83            /* present, writable, 2 MiB page */
    mov dword ptr [{pds} + ecx * 8], eax
    mov eax, ecx
    shr eax, 11             /* bits 32.. of the physical address */
    mov dword ptr [{pds} + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jne 2b

    /* CR4: PAE, OSFXSR, OSXMMEXCPT (precompiled core uses SSE) */
    mov eax, cr4
    or eax, (1 << 5) | (1 << 9) | (1 << 10)
    mov cr4, eax
    mov eax, offset {pml4}
    mov cr3, eax
    /* EFER.LME */
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    /* CR0: PG, PE, MP; clear EM and TS */
    mov eax, cr0
    and eax, ~((1 << 2) | (1 << 3))
    or eax, (1 << 31) | (1 << 0) | (1 << 1)
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    mov eax, offset ferrovisor_long_mode
    push 0x08
    push eax
    retf

    .code64
ferrovisor_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov edi, edi
    mov esi, esi
    xor ebp, ebp
    call {main}
4:
    cli
    hlt
    jmp 4b

    .section .rodata
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
boot_gdt_end:
    .p2align 3
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    "#,
    stack = sym BOOT_STACK,
    stack_size = const BOOT_STACK_SIZE,
    pml4 = sym BOOT_PML4,
    pdpt = sym BOOT_PDPT,
    pds = sym BOOT_PDS,
    main = sym crate::boot_main,
);

#[repr(C, align(4096))]
struct Page<const N: usize>([u8; N]);

/// The boot stack. Written only by the CPU through `rsp`.
static mut BOOT_STACK: Page<BOOT_STACK_SIZE> = Page([0; BOOT_STACK_SIZE]);
/// Boot page tables: zeroed with .bss and filled by `_start32`, later extended by Rust.
static mut BOOT_PML4: Page<4096> = Page([0; 4096]);
static mut BOOT_PDPT: Page<4096> = Page([0; 4096]);
static mut BOOT_PDS: Page<{ 4 * 4096 }> = Page([0; 4 * 4096]);

/// The boot CPU's stack: (lowest address, size).
pub fn boot_stack() -> (u64, u64) {
    ((&raw const BOOT_STACK) as u64, BOOT_STACK_SIZE as u64)
}

/// Makes the 2 MiB page of the boot identity map that holds `pa` (below 4 GiB)
/// uncacheable (PCD|PWT), for device registers such as the local APIC's.
pub fn mark_uncached(pa: u64) {
    let index = (pa >> 21) as usize;
    if index >= 2048 {
        return;
    }
    // SAFETY: the boot page directories are only written here and by the entry code
    // (long before); the entry stays a present 2 MiB mapping of the same frame, so no
    // live access is affected; CR3 is reloaded to drop the stale TLB entry.
    unsafe {
        let pds = (&raw mut BOOT_PDS).cast::<u64>();
        let e = pds.add(index);
        e.write_volatile(e.read_volatile() | 0x18);
        core::arch::asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack));
    }
}
