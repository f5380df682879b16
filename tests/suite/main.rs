//! ringmover's integration tests: one binary, one module per area
//! (ripgrep's layout). Every test talks to the real kernel.

/// Generates `mod uring`, `mod epoll` and `mod poll` (and with `auto;`
/// also `mod auto`, which selects at run time), each with one `#[test]` per
/// behaviour `fn name(backend: Option<Backend>)`: one suite, every backend
/// compiled in (off Linux, `poll` and `auto`, which is poll there).
macro_rules! for_each_backend {
    (auto; $($test:ident),* $(,)?) => {
        for_each_backend!($($test),*);
        for_each_backend!(@mod auto, None, $($test),*);
        // And `mod auto_seccomp`: each test as `auto` in a child process
        // whose seccomp filter denies io_uring (so on the fallback).
        #[cfg(target_os = "linux")]
        for_each_backend!(@seccomp $($test),*);
    };
    ($($test:ident),* $(,)?) => {
        #[cfg(target_os = "linux")]
        for_each_backend!(@mod uring, Some(ringmover::Backend::Uring), $($test),*);
        #[cfg(target_os = "linux")]
        for_each_backend!(@mod epoll, Some(ringmover::Backend::Epoll), $($test),*);
        for_each_backend!(@mod poll, Some(ringmover::Backend::Poll), $($test),*);
    };
    (@mod $name:ident, $backend:expr, $($test:ident),*) => {
        mod $name {
            $(
                #[test]
                fn $test() {
                    super::$test($backend);
                }
            )*
        }
    };
    (@seccomp $($test:ident),*) => {
        mod auto_seccomp {
            $(
                #[test]
                fn $test() {
                    crate::seccomp::run_where_io_uring_is_denied(
                        module_path!(),
                        stringify!($test),
                        || super::$test(None),
                    );
                }
            )*
        }
    };
}

mod cli;
// Drives a Mover from an epoll loop too: Linux only.
#[cfg(target_os = "linux")]
mod event_loop;
mod examples;
mod fixed;
mod probe;
mod receiver;
mod recv;
#[cfg(target_os = "linux")]
mod recv_paths;
mod registered_files;
#[cfg(target_os = "linux")]
mod seccomp;
mod send;
mod send_cli;
mod shards;
mod stream;
mod udp;
mod util;
mod zerocopy;
