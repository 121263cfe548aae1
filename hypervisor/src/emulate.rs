//! Emulation of a guest's access to guest-physical memory that nothing backs.
//!
//! Without a device model behind an address, Xen answers reads with all ones and drops
//! writes (its "null" I/O handler); so does this. The faulting instruction is decoded
//! with `iced-x86` from bytes the caller fetched once from guest memory; only plain
//! moves are emulated, anything else is reported so the domain can be stopped.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// Where a value read from memory goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegDest {
    /// GPR number (0 = rax .. 15 = r15).
    pub reg: usize,
    /// Destination width in bytes (1, 2, 4, 8).
    pub size: u8,
    /// AH/CH/DH/BH: bits 8..15 of the register.
    pub high8: bool,
}

/// A decoded memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A load of `size` bytes into `dest`, zero- or sign-extended as `extend` says.
    Load {
        /// Bytes read from memory.
        size: u8,
        /// Destination register.
        dest: RegDest,
        /// Sign-extend (MOVSX/MOVSXD) instead of zero-extend.
        sign_extend: bool,
    },
    /// A store of `size` bytes.
    Store {
        /// Bytes written.
        size: u8,
        /// Value stored (truncated to `size`).
        value: StoreValue,
    },
}

/// The source of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreValue {
    /// A register (GPR number, high8).
    Reg(usize, bool),
    /// An immediate.
    Imm(u64),
}

/// A decoded instruction: its length and access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Instruction length in bytes.
    pub len: u8,
    /// The memory access it makes.
    pub access: Access,
}

/// Why an access cannot be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulError {
    /// The bytes do not decode to a complete instruction.
    Undecodable,
    /// The instruction is valid but not a plain move this emulator handles.
    Unsupported(Mnemonic),
}

impl core::fmt::Display for EmulError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EmulError::Undecodable => write!(f, "instruction bytes do not decode"),
            EmulError::Unsupported(m) => write!(f, "instruction {m:?} is not emulated"),
        }
    }
}

/// Decodes the instruction in `bytes` (at most 15, fetched once) for a CPU in
/// `bitness`-bit mode and returns only its length.
pub fn instruction_len(bytes: &[u8], bitness: u32) -> Option<u8> {
    let mut d = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let i = d.decode();
    (!i.is_invalid()).then_some(i.len() as u8)
}

fn gpr(r: Register) -> Option<(usize, u8, bool)> {
    if !r.is_gpr() {
        return None;
    }
    let high8 = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    Some((r.full_register().number(), r.size() as u8, high8))
}

/// Decodes a memory access instruction (the one that faulted).
pub fn decode(bytes: &[u8], bitness: u32) -> Result<Decoded, EmulError> {
    let mut d = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let i: Instruction = d.decode();
    if i.is_invalid() {
        return Err(EmulError::Undecodable);
    }
    let unsupported = Err(EmulError::Unsupported(i.mnemonic()));
    if i.has_lock_prefix() || i.has_rep_prefix() || i.has_repne_prefix() {
        return unsupported;
    }
    let len = i.len() as u8;
    let mem_size = i.memory_size().size() as u8;
    let access = match (i.mnemonic(), i.op0_kind(), i.op_count()) {
        (Mnemonic::Mov, OpKind::Register, 2) if i.op1_kind() == OpKind::Memory => {
            let Some((reg, size, high8)) = gpr(i.op0_register()) else {
                return unsupported;
            };
            Access::Load {
                size: mem_size,
                dest: RegDest { reg, size, high8 },
                sign_extend: false,
            }
        }
        (Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd, OpKind::Register, 2)
            if i.op1_kind() == OpKind::Memory =>
        {
            let Some((reg, size, high8)) = gpr(i.op0_register()) else {
                return unsupported;
            };
            Access::Load {
                size: mem_size,
                dest: RegDest { reg, size, high8 },
                sign_extend: i.mnemonic() != Mnemonic::Movzx,
            }
        }
        (Mnemonic::Mov, OpKind::Memory, 2) => match i.op1_kind() {
            OpKind::Register => {
                let Some((reg, _, high8)) = gpr(i.op1_register()) else {
                    return unsupported;
                };
                Access::Store {
                    size: mem_size,
                    value: StoreValue::Reg(reg, high8),
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate32to64
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64 => Access::Store {
                size: mem_size,
                value: StoreValue::Imm(i.immediate(1)),
            },
            _ => return unsupported,
        },
        _ => return unsupported,
    };
    if i.code() == Code::INVALID || mem_size == 0 || mem_size > 8 {
        return unsupported;
    }
    Ok(Decoded { len, access })
}

/// Mask of the low `size` bytes.
pub fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(size) * 8)) - 1
    }
}

/// The new value of the destination register after a load of `loaded` (already
/// `mask(size)`), following x86's rules: 32-bit destinations zero the upper half, 8-
/// and 16-bit ones merge.
pub fn apply_load(old: u64, loaded: u64, size: u8, dest: RegDest, sign_extend: bool) -> u64 {
    let mut v = loaded & mask(size);
    if sign_extend && size < 8 {
        let shift = 64 - u32::from(size) * 8;
        v = (((v << shift) as i64) >> shift) as u64;
    }
    match (dest.size, dest.high8) {
        (1, true) => (old & !0xff00) | ((v & 0xff) << 8),
        (1, false) => (old & !0xff) | (v & 0xff),
        (2, _) => (old & !0xffff) | (v & 0xffff),
        (4, _) => v & 0xffff_ffff,
        _ => v,
    }
}

/// The value a store writes, from the source register's value or the immediate.
pub fn store_value(value: StoreValue, reg_value: impl Fn(usize) -> u64, size: u8) -> u64 {
    match value {
        StoreValue::Reg(r, true) => (reg_value(r) >> 8) & 0xff,
        StoreValue::Reg(r, false) => reg_value(r) & mask(size),
        StoreValue::Imm(v) => v & mask(size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mov_eax_from_memory() {
        // mov eax, [rbx]
        let d = decode(&[0x8b, 0x03], 64).unwrap();
        assert_eq!(d.len, 2);
        assert_eq!(
            d.access,
            Access::Load {
                size: 4,
                dest: RegDest {
                    reg: 0,
                    size: 4,
                    high8: false
                },
                sign_extend: false
            }
        );
        assert_eq!(
            apply_load(
                u64::MAX,
                0xffff_ffff,
                4,
                RegDest {
                    reg: 0,
                    size: 4,
                    high8: false
                },
                false
            ),
            0xffff_ffff
        );
    }

    #[test]
    fn stores_from_register_and_immediate() {
        // mov [rdi], ecx
        let d = decode(&[0x89, 0x0f], 64).unwrap();
        assert_eq!(
            d.access,
            Access::Store {
                size: 4,
                value: StoreValue::Reg(1, false)
            }
        );
        // mov dword [rax], 0x12345678
        let d = decode(&[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12], 64).unwrap();
        assert_eq!(d.len, 6);
        assert_eq!(
            d.access,
            Access::Store {
                size: 4,
                value: StoreValue::Imm(0x1234_5678)
            }
        );
        // mov byte [rax], ah
        let d = decode(&[0x88, 0x20], 64).unwrap();
        assert_eq!(
            d.access,
            Access::Store {
                size: 1,
                value: StoreValue::Reg(0, true)
            }
        );
        assert_eq!(store_value(StoreValue::Reg(0, true), |_| 0xabcd, 1), 0xab);
    }

    #[test]
    fn narrow_loads_merge_and_extend() {
        let al = RegDest {
            reg: 0,
            size: 1,
            high8: false,
        };
        assert_eq!(
            apply_load(0x1122_3344_5566_7788, 0xff, 1, al, false),
            0x1122_3344_5566_77ff
        );
        let ah = RegDest {
            reg: 0,
            size: 1,
            high8: true,
        };
        assert_eq!(apply_load(0x1122, 0xab, 1, ah, false), 0xab22);
        // movzx eax, byte [rbx]
        let d = decode(&[0x0f, 0xb6, 0x03], 64).unwrap();
        let Access::Load {
            size,
            dest,
            sign_extend,
        } = d.access
        else {
            panic!()
        };
        assert_eq!((size, dest.size, sign_extend), (1, 4, false));
        // movsx rax, word [rbx]
        let d = decode(&[0x48, 0x0f, 0xbf, 0x03], 64).unwrap();
        let Access::Load {
            size,
            dest,
            sign_extend,
        } = d.access
        else {
            panic!()
        };
        assert_eq!(apply_load(0, 0xffff, size, dest, sign_extend), u64::MAX);
    }

    #[test]
    fn other_instructions_are_refused() {
        // add [rax], eax
        assert!(matches!(
            decode(&[0x01, 0x00], 64),
            Err(EmulError::Unsupported(_))
        ));
        // rep movsb
        assert!(matches!(
            decode(&[0xf3, 0xa4], 64),
            Err(EmulError::Unsupported(_))
        ));
        assert_eq!(decode(&[0x0f], 64), Err(EmulError::Undecodable));
        assert_eq!(decode(&[], 64), Err(EmulError::Undecodable));
    }

    #[test]
    fn lengths_for_exits_without_next_rip() {
        assert_eq!(instruction_len(&[0x0f, 0x01, 0xd9], 64), Some(3)); // vmmcall
        assert_eq!(instruction_len(&[0x0f, 0xa2], 32), Some(2)); // cpuid
        assert_eq!(instruction_len(&[0x66, 0x0f, 0xa2], 64), Some(3));
        assert_eq!(instruction_len(&[0xf4], 16), Some(1));
        assert_eq!(instruction_len(&[0x0f], 64), None);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..16), bits in proptest::sample::select(vec![16u32, 32, 64])) {
            let _ = decode(&bytes, bits);
            let _ = instruction_len(&bytes, bits);
        }
    }
}
