//! The in-memory form of one checkpoint tensor: a safetensors dtype, a shape and little-endian bytes.
//!
//! Packers produce typed values (`Vec<i32>`, f16 scales); the writer only needs bytes. Keeping one plain
//! `RawTensor` between the two means the packers never touch files and the writer never knows about formats.
//! Import goes the other way: bytes from a (memory-mapped) safetensors file become a `RawTensor`, whose typed
//! accessors check dtype and length before anything is decoded, so a lying file is an error, never a panic.

use half::{bf16, f16};

use super::error::{ExportError, Result};

/// The safetensors dtypes the export formats use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
}

impl Dtype {
    /// The name safetensors headers use.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::U8 => "U8",
        }
    }
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "U8" => Dtype::U8,
            _ => return None,
        })
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I64 => 8,
            Dtype::U8 => 1,
        }
    }
    /// The same dtype as the `safetensors` crate names it (the model loader hands tensors over in that form).
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F32 => Dtype::F32,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::I64 => Dtype::I64,
            S::I32 => Dtype::I32,
            S::U8 => Dtype::U8,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Float dtypes a checkpoint stores weights and scales in ("the model dtype").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum FloatDtype {
    #[default]
    F16,
    BF16,
    F32,
}

impl From<FloatDtype> for Dtype {
    fn from(d: FloatDtype) -> Self {
        match d {
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
            FloatDtype::F32 => Dtype::F32,
        }
    }
}

impl FloatDtype {
    /// `x` rounded to this dtype and widened back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatDtype::F16 => f16::from_f32(x).to_f32(),
            FloatDtype::BF16 => bf16::from_f32(x).to_f32(),
            FloatDtype::F32 => x,
        }
    }
}

/// One tensor as stored: dtype, shape (row-major) and little-endian bytes (`data.len() == numel · size`).
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The name the export side uses for [`RawTensor`].
pub type TensorOut = RawTensor;

impl RawTensor {
    /// Wraps bytes read from a file, checking that their length matches dtype and shape.
    pub fn from_bytes(name: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let numel = checked_numel(name, &shape)?;
        let want = numel.checked_mul(dtype.size()).ok_or_else(|| ExportError::tensor(name, "shape overflows"))?;
        if data.len() != want {
            return Err(ExportError::tensor(
                name,
                format!("{} bytes for dtype {dtype} and shape {shape:?}, expected {want}", data.len()),
            ));
        }
        Ok(Self { dtype, shape, data })
    }

    /// Converts a tensor view of the `safetensors` crate (which validated offsets against the file).
    pub fn from_view(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Self> {
        let dtype = Dtype::from_safetensors(view.dtype()).ok_or_else(|| {
            ExportError::tensor(name, format!("dtype {:?} is not used by any export format", view.dtype()))
        })?;
        Self::from_bytes(name, dtype, view.shape().to_vec(), view.data().to_vec())
    }

    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self { dtype: Dtype::I32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self { dtype: Dtype::I64, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    pub fn from_u8(shape: Vec<usize>, values: Vec<u8>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Self { dtype: Dtype::U8, shape, data: values }
    }

    /// Float values stored in `dtype`, rounding to nearest (dense weights: the model dtype is the stored precision).
    pub fn from_f32_rounded(dtype: FloatDtype, shape: Vec<usize>, values: &[f32]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = match dtype {
            FloatDtype::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            FloatDtype::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        Self { dtype: dtype.into(), shape, data }
    }

    /// Float values that must survive `dtype` exactly (quantization scales: a rounded scale would change every
    /// weight of its group, so the exporter refuses instead of rounding). `what` names the tensor in the error.
    pub fn from_f32_exact(what: &str, dtype: FloatDtype, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| dtype.round(**v).to_bits() != v.to_bits()) {
            return Err(ExportError::tensor(
                what,
                format!("value {v:e} at flat index {i} is not exactly representable in {}", Dtype::from(dtype)),
            ));
        }
        Ok(Self::from_f32_rounded(dtype, shape, values))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn expect(&self, name: &str, dtypes: &[Dtype]) -> Result<()> {
        if !dtypes.contains(&self.dtype) {
            let want: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(ExportError::tensor(name, format!("dtype is {}, expected {}", self.dtype, want.join(" or "))));
        }
        if self.data.len() != self.numel() * self.dtype.size() {
            return Err(ExportError::tensor(
                name,
                format!("{} bytes do not match dtype {} and shape {:?}", self.data.len(), self.dtype, self.shape),
            ));
        }
        Ok(())
    }

    /// Checks that the shape is exactly `shape`.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(ExportError::tensor(name, format!("shape is {:?}, expected {:?}", self.shape, shape)));
        }
        Ok(())
    }

    pub fn to_i32(&self, name: &str) -> Result<Vec<i32>> {
        self.expect(name, &[Dtype::I32])?;
        Ok(self.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Integer values stored as I64 or I32 (compressed-tensors writes shapes in either).
    pub fn to_i64(&self, name: &str) -> Result<Vec<i64>> {
        self.expect(name, &[Dtype::I64, Dtype::I32])?;
        Ok(match self.dtype {
            Dtype::I32 => {
                self.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect()
            }
            _ => self
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        })
    }

    pub fn to_u8(&self, name: &str) -> Result<Vec<u8>> {
        self.expect(name, &[Dtype::U8])?;
        Ok(self.data.clone())
    }

    /// Float values of any float dtype, widened to f32 (exact for F16 and BF16).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.expect(name, &[Dtype::F16, Dtype::BF16, Dtype::F32])?;
        Ok(match self.dtype {
            Dtype::F16 => self.data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => self.data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            _ => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        })
    }
}

fn checked_numel(name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| ExportError::tensor(name, format!("shape {shape:?} overflows")))
}

/// A 2-D matrix of packed i32 words, row-major, as the packers produce it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<i32>,
}

impl Packed {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0; rows * cols] }
    }
    pub fn to_raw(&self) -> RawTensor {
        RawTensor::from_i32(vec![self.rows, self.cols], &self.data)
    }
    /// Reads an I32 2-D tensor, checking dtype and that it is 2-D.
    pub fn from_raw(name: &str, t: &RawTensor) -> Result<Self> {
        let data = t.to_i32(name)?;
        match t.shape[..] {
            [rows, cols] => Ok(Self { rows, cols, data }),
            _ => Err(ExportError::tensor(name, format!("shape is {:?}, expected 2 dimensions", t.shape))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bytes_rejects_length_that_does_not_match_shape() {
        let err = RawTensor::from_bytes("x", Dtype::I32, vec![2, 3], vec![0; 20]).unwrap_err();
        assert!(err.to_string().contains("expected 24"), "{err}");
        assert!(RawTensor::from_bytes("x", Dtype::I32, vec![2, 3], vec![0; 24]).is_ok());
        assert!(RawTensor::from_bytes("x", Dtype::U8, vec![usize::MAX, 3], vec![]).is_err());
    }

    #[test]
    fn exact_float_refuses_values_that_would_round() {
        assert!(RawTensor::from_f32_exact("s", FloatDtype::F16, vec![2], &[0.5, 1.0 / 1024.0]).is_ok());
        let err = RawTensor::from_f32_exact("s", FloatDtype::F16, vec![1], &[0.1]).unwrap_err();
        assert!(err.to_string().contains("not exactly representable in F16"), "{err}");
        // 1 + 2^-10 is exact in f16 but not in bf16 (7 fraction bits).
        assert!(RawTensor::from_f32_exact("s", FloatDtype::BF16, vec![1], &[1.0 + 1.0 / 1024.0]).is_err());
    }

    #[test]
    fn typed_accessors_check_dtype_and_round_trip() {
        let t = RawTensor::from_i32(vec![2], &[-1, 7]);
        assert_eq!(t.data, vec![0xFF, 0xFF, 0xFF, 0xFF, 7, 0, 0, 0]);
        assert_eq!(t.to_i32("t").unwrap(), vec![-1, 7]);
        assert_eq!(t.to_i64("t").unwrap(), vec![-1, 7]);
        assert!(t.to_f32("t").unwrap_err().to_string().contains("dtype is I32"));
        let f = RawTensor::from_f32_rounded(FloatDtype::BF16, vec![2], &[1.5, -2.0]);
        assert_eq!(f.to_f32("f").unwrap(), vec![1.5, -2.0]);
    }
}
