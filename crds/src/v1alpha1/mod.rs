//! `kpipe.io/v1alpha1`.

mod replay;
mod spec;
mod status;

pub use replay::*;
pub use spec::*;
pub use status::*;
