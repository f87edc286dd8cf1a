//! Layer-wise compressors (algorithms.md): each method is one file behind the `Compressor` trait, working on one
//! linear layer's weight and its calibration Hessian. Calibration (collecting Hessians layer by layer) lives in
//! `crate::calib`; plans (which method where) in `crate::plan`.

pub mod types;

pub use types::*;
