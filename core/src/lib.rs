//! Whittle's core: everything that is not pixels or kernels.

pub mod compress;
