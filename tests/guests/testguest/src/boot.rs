//! PVH entry: 32-bit protected mode to 64-bit long mode, then `main`.
//!
//! The loader (QEMU's `-kernel`, or ferrovisor) finds `pvh_start32` through the Xen ELF
//! note below and enters it in 32-bit protected mode with paging off, flat 4 GiB
//! segments and `ebx` = guest-physical address of `struct hvm_start_info`.
//!
//! The entry code clears `.bss`, identity-maps the first 4 GiB with 2 MiB pages, turns on
//! PAE, SSE (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, clear CR0.EM/TS: precompiled core uses SSE),
//! EFER.LME and paging, loads a 64-bit GDT, far-jumps to 64-bit code and calls
//! `main(start_info_paddr)` on a 64 KiB stack.

core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz: 32-bit entry address */
    .long {phys32_entry}        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32
    .popsection

    .pushsection .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    mov %ebx, %esi              /* keep the start_info address across the setup */

    /* Clear .bss (page tables, stack, statics); the loader should have, but be sure. */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    mov $boot_stack_top, %esp

    /* PML4[0] -> PDPT */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4

    /* PDPT[0..4] -> the four page directories */
    mov $boot_pdpt, %edi
    mov $boot_pd, %eax
    or $0x3, %eax
    mov $4, %ecx
1:
    mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    dec %ecx
    jnz 1b

    /* 2048 PDEs: 2 MiB pages (P | RW | PS) covering 0..4 GiB */
    mov $boot_pd, %edi
    mov $0x83, %eax
    mov $2048, %ecx
2:
    mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz 2b

    /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    mov %cr4, %eax
    or $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    mov %eax, %cr4

    mov $boot_pml4, %eax
    mov %eax, %cr3

    /* EFER.LME */
    mov $0xc0000080, %ecx
    rdmsr
    or $(1 << 8), %eax
    wrmsr

    /* CR0: PG | NE | MP | PE, clear EM and TS */
    mov %cr0, %eax
    and $~((1 << 2) | (1 << 3)), %eax
    or $((1 << 31) | (1 << 5) | (1 << 1) | 1), %eax
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $3f

    .code64
3:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    fninit
    mov %esi, %edi              /* zero-extends: start_info_paddr */
    call main
4:
    cli
    hlt
    jmp 4b
    .size pvh_start32, . - pvh_start32
    .popsection

    .pushsection .data.boot_gdt, "aw", @progbits
    .balign 16
boot_gdt:
    .quad 0                     /* null */
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code, DPL 0, accessed */
    .quad 0x00cf93000000ffff    /* 0x10: data, DPL 0, accessed */
boot_gdt_end:
    .balign 8
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack:
    .skip 65536
boot_stack_top:
    .popsection
    "#,
    phys32_entry = const abi::XEN_ELFNOTE_PHYS32_ENTRY,
    options(att_syntax)
);
