//! Little-endian wire structs for the Xen ABI: one macro declares a `#[repr(C)]` struct,
//! its size, field-by-field `from_bytes`/`to_bytes`/`read`, and `const` asserts that the
//! Rust layout matches the C offsets.

/// Little-endian field access for the wire structs.
pub(crate) trait Le: Sized {
    const N: usize;
    fn get(b: &[u8]) -> Self;
    fn put(&self, b: &mut [u8]);
}

macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl Le for $t {
            const N: usize = core::mem::size_of::<$t>();
            fn get(b: &[u8]) -> Self {
                let mut w = [0u8; core::mem::size_of::<$t>()];
                w.copy_from_slice(&b[..Self::N]);
                <$t>::from_le_bytes(w)
            }
            fn put(&self, b: &mut [u8]) {
                b[..Self::N].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le_int!(u8, i16, u16, u32, u64);

impl<const K: usize> Le for [u8; K] {
    const N: usize = K;
    fn get(b: &[u8]) -> Self {
        let mut w = [0u8; K];
        w.copy_from_slice(&b[..K]);
        w
    }
    fn put(&self, b: &mut [u8]) {
        b[..K].copy_from_slice(self);
    }
}

/// Declares a wire struct: `#[repr(C)]` fields at the given offsets, its `SIZE`,
/// field-by-field little-endian `from_bytes`/`to_bytes`/`read`, and `const` asserts that
/// the Rust layout matches the offsets and that every field fits.
macro_rules! wire_struct {
    (
        $(#[$m:meta])*
        $name:ident, $size:literal, {
            $( $(#[$fm:meta])* $field:ident : $ty:ty = $off:literal ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name {
            $( $(#[$fm])* pub $field: $ty, )*
        }

        impl $name {
            /// Size in bytes of the C structure.
            pub const SIZE: usize = $size;

            /// Decodes a copy of the guest's structure.
            pub fn from_bytes(b: &[u8; $size]) -> Self {
                $name { $( $field: <$ty as $crate::wire::Le>::get(&b[$off..]), )* }
            }

            /// Little-endian encoding; padding bytes are zero.
            pub fn to_bytes(&self) -> [u8; $size] {
                let mut b = [0u8; $size];
                $( $crate::wire::Le::put(&self.$field, &mut b[$off..]); )*
                b
            }

            /// Decodes the first `SIZE` bytes of `b`; `None` if `b` is shorter.
            pub fn read(b: &[u8]) -> Option<Self> {
                let a: &[u8; $size] = b.get(..$size)?.try_into().ok()?;
                Some(Self::from_bytes(a))
            }
        }

        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        $(
            const _: () = assert!(core::mem::offset_of!($name, $field) == $off);
            const _: () = assert!($off + <$ty as $crate::wire::Le>::N <= $size);
        )*
    };
}

pub(crate) use wire_struct;
