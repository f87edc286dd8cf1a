//! The Whittle application: the command line (`cli`) and, later, the workbench window.

pub mod cli;
