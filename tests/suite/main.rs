//! ringmover's behavioural suite: one test binary, one module per feature.
//! Tests run the built binary and, where the backend matters, run once per
//! backend (`RINGMOVER_BACKEND=uring|epoll|poll`).

mod recv;
