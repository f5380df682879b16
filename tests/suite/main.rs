//! ringmover's integration tests: one binary, one module per area
//! (ripgrep's layout). Every test talks to the real kernel.

mod probe;
mod recv;
mod send;
mod util;
mod zerocopy;
