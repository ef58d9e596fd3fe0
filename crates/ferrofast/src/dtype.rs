//! Element types and MLX's type-promotion rules.

use half::{bf16, f16};
use std::fmt;

/// The element type of an [`Array`](crate::Array).
///
/// Floating types (`F16`, `BF16`, `F32`, `F64`) are what the fused ops compute on; the
/// integer and bool types exist for offsets, targets and masks. `Display` prints MLX's names
/// (`float32`, `bfloat16`, `int32`, ...) so error messages read as MLX's do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// `bool`, one byte per element.
    Bool,
    /// `uint8`.
    U8,
    /// `uint32`.
    U32,
    /// `int32`.
    I32,
    /// `int64`.
    I64,
    /// IEEE half precision, `float16`.
    F16,
    /// brain float, `bfloat16`.
    BF16,
    /// `float32`.
    F32,
    /// `float64` (CPU).
    F64,
}

impl DType {
    /// Every dtype, in promotion order.
    pub const ALL: [DType; 9] = [
        DType::Bool,
        DType::U8,
        DType::U32,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// True for `F16`, `BF16`, `F32`, `F64`.
    pub fn is_floating(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// True for the signed and unsigned integer types (not `Bool`).
    pub fn is_integer(self) -> bool {
        matches!(self, DType::U8 | DType::U32 | DType::I32 | DType::I64)
    }

    /// True for the unsigned integer types.
    pub fn is_unsigned(self) -> bool {
        matches!(self, DType::U8 | DType::U32)
    }

    /// MLX's name for the type (`"float32"`, `"bfloat16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// The smallest finite value of a floating type (MLX's `finfo(dtype).min`), used for
    /// boolean masking. `None` for non-floating types.
    pub fn finfo_min(self) -> Option<f64> {
        match self {
            DType::F16 => Some(f16::MIN.to_f64()),
            DType::BF16 => Some(bf16::MIN.to_f64()),
            DType::F32 => Some(f32::MIN as f64),
            DType::F64 => Some(f64::MIN),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// MLX's `promote_types(a, b)`: the type both operands are converted to in a binary op.
///
/// Rules (MLX's table restricted to the types here): `bool` yields to anything; two unsigned
/// or two signed integers give the wider; `uint8` with a signed type gives the signed type,
/// `uint32` with `int32`/`int64` gives `int64`; an integer with a float gives the float;
/// `float16` with `bfloat16` gives `float32`; otherwise the wider float.
pub fn promote_types(a: DType, b: DType) -> DType {
    use DType::*;
    if a == b {
        return a;
    }
    match (a, b) {
        (Bool, x) | (x, Bool) => x,
        (F16, BF16) | (BF16, F16) => F32,
        (x, y) if x.is_floating() && y.is_floating() => x.max(y),
        (x, _) if x.is_floating() => x,
        (_, y) if y.is_floating() => y,
        // Both integers from here on.
        (U8, U32) | (U32, U8) => U32,
        (U8, x) | (x, U8) => x,
        (U32, I32) | (I32, U32) | (U32, I64) | (I64, U32) => I64,
        (x, y) => x.max(y),
    }
}

/// `result_type` over several dtypes (left fold of [`promote_types`]).
///
/// Returns `None` for an empty list.
pub fn result_type(types: &[DType]) -> Option<DType> {
    let mut it = types.iter().copied();
    let first = it.next()?;
    Some(it.fold(first, promote_types))
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that can be an element of an [`Array`](crate::Array).
///
/// Implemented for `bool`, `u8`, `u32`, `i32`, `i64`, [`f16`](struct@f16), [`bf16`], `f32`, `f64`; sealed.
pub trait Element: Copy + Send + Sync + PartialEq + fmt::Debug + 'static + sealed::Sealed {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widen to `f64` (exact for every type but `i64` beyond 2^53).
    fn to_f64(self) -> f64;
    /// Narrow from `f64` as a C cast would (round to nearest for floats, truncate toward zero
    /// and saturate for integers, `!= 0` for bool).
    fn from_f64(v: f64) -> Self;
    /// Integer view (floats truncate toward zero, bool is 0/1).
    fn to_i64(self) -> i64;
    /// From an integer, wrapping as a C cast between integer types would.
    fn from_i64(v: i64) -> Self;
    #[doc(hidden)]
    fn slice(data: &crate::array::CpuData) -> Option<&[Self]>;
    #[doc(hidden)]
    fn slice_mut(data: &mut crate::array::CpuData) -> Option<&mut [Self]>;
    #[doc(hidden)]
    fn wrap(v: Vec<Self>) -> crate::array::CpuData;
    #[doc(hidden)]
    fn take_vec(data: &mut crate::array::CpuData) -> Option<Vec<Self>>;
}

/// The `CpuData` accessors of an `Element` impl, for the variant `CpuData::$dt`.
macro_rules! cpu_data_access {
    ($dt:ident) => {
        fn slice(data: &crate::array::CpuData) -> Option<&[Self]> {
            match data {
                crate::array::CpuData::$dt(v) => Some(v),
                _ => None,
            }
        }
        fn slice_mut(data: &mut crate::array::CpuData) -> Option<&mut [Self]> {
            match data {
                crate::array::CpuData::$dt(v) => Some(v),
                _ => None,
            }
        }
        fn wrap(v: Vec<Self>) -> crate::array::CpuData {
            crate::array::CpuData::$dt(v)
        }
        fn take_vec(data: &mut crate::array::CpuData) -> Option<Vec<Self>> {
            match data {
                crate::array::CpuData::$dt(v) => Some(std::mem::take(v)),
                _ => None,
            }
        }
    };
}

macro_rules! int_element {
    ($t:ty, $dt:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$dt;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_i64(self) -> i64 {
                self as i64
            }
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            cpu_data_access!($dt);
        }
    };
}
int_element!(u8, U8);
int_element!(u32, U32);
int_element!(i32, I32);
int_element!(i64, I64);

macro_rules! float_element {
    ($t:ty, $dt:ident, $to:expr, $from:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$dt;
            fn to_f64(self) -> f64 {
                ($to)(self)
            }
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
            fn to_i64(self) -> i64 {
                (($to)(self)) as i64
            }
            fn from_i64(v: i64) -> Self {
                ($from)(v as f64)
            }
            cpu_data_access!($dt);
        }
    };
}
float_element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
float_element!(f64, F64, |x: f64| x, |v: f64| v);
// Narrowing to a 16-bit float goes through f32, as MLX (and the GPU copy kernel) does: exact
// for f32 sources, and independent of how `half` rounds from f64.
float_element!(f16, F16, |x: f16| x.to_f64(), |v: f64| f16::from_f32(
    v as f32
));
float_element!(bf16, BF16, |x: bf16| x.to_f64(), |v: f64| bf16::from_f32(
    v as f32
));

impl sealed::Sealed for bool {}
impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn to_f64(self) -> f64 {
        if self {
            1.0
        } else {
            0.0
        }
    }
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(v: i64) -> Self {
        v != 0
    }
    cpu_data_access!(Bool);
}

/// A floating element type the CPU kernels compute on: converts to and from `f32` (the
/// accumulation type of every fused op).
pub trait Float: Element + Default {
    /// Widen to f32 (rounds for `f64`).
    fn to_f32(self) -> f32;
    /// Round from f32 to nearest even.
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Float for f64 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}
impl Float for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl Float for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bf16 is the top half of an f32: widening is a shift, cheaper than `half`'s call.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_matches_mlx_examples() {
        assert_eq!(promote_types(DType::I32, DType::F16), DType::F16);
        assert_eq!(promote_types(DType::BF16, DType::F16), DType::F32);
        assert_eq!(promote_types(DType::F16, DType::F32), DType::F32);
        assert_eq!(promote_types(DType::U32, DType::I32), DType::I64);
        assert_eq!(promote_types(DType::U8, DType::I32), DType::I32);
        assert_eq!(promote_types(DType::Bool, DType::BF16), DType::BF16);
        assert_eq!(promote_types(DType::F64, DType::BF16), DType::F64);
        assert_eq!(
            result_type(&[DType::F16, DType::F16, DType::F32]),
            Some(DType::F32)
        );
    }

    #[test]
    fn bf16_widening_is_exact() {
        for v in [0.0f32, -1.5, 3.140625, 1e30, -1e-30] {
            let b = bf16::from_f32(v);
            assert_eq!(Float::to_f32(b), b.to_f32());
        }
    }
}
