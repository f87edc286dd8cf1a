//! The Whittle application: the command line (`cli`) and the workbench window (`gui`).

pub mod allocator;
pub mod cli;
pub mod gui;
