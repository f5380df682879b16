//! ringmover's integration tests: one binary, one module per area
//! (ripgrep's layout). Every test talks to the real kernel.

mod outbox;
mod probe;
mod send;
mod util;
