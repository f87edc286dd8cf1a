//! Whittle's core: everything that is not pixels or kernels. Model loading and the forward pass (`model`),
//! evaluation (`eval`), synthetic models (`synth`), the compressors (`compress`).

pub mod calib;
pub mod checkpoint;
pub mod chat;
pub mod compress;
pub mod compress_model;
pub mod error;
pub mod estimate;
pub mod eval;
pub mod export;
pub mod model;
pub mod plan;
pub mod runtime;
pub mod saved_states;
pub mod search;
pub mod spill;
pub mod synth;

pub use error::{Result, WhittleError};
