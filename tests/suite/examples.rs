//! The runnable examples run, on every backend, and say what they did.
//! `cargo test` builds them next to this binary (`target/<profile>/examples`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::util::{output_within, stderr, stdout};

/// The built example `name`, failing loudly when it was not built.
fn example(name: &str) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/suite-<hash> -> target/<profile>/examples/<name>
    let path: PathBuf = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples").join(name))
        .expect("the test binary lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} was not built: run `cargo test` (it builds the examples) or `cargo build --examples`",
        path.display()
    );
    Command::new(path)
}

/// Runs example `name` on each backend, expecting success and every line
/// of `expect` in its stdout.
fn runs_on_every_backend(name: &str, expect: &[&str]) {
    for backend in ringmover::Backend::compiled() {
        let out = output_within(
            example(name).env(ringmover::BACKEND_ENV, backend.name()),
            Duration::from_secs(120),
            &format!("examples/{name}.rs on {backend}"),
        );
        let (so, se) = (stdout(&out), stderr(&out));
        assert!(
            out.status.success(),
            "examples/{name}.rs on {backend}: {}\n{so}\n{se}",
            out.status
        );
        for want in expect {
            let want = want.replace("{backend}", backend.name());
            assert!(
                so.contains(&want),
                "examples/{name}.rs on {backend}: no {want:?} in\n{so}"
            );
        }
    }
}

#[test]
fn event_loop_example() {
    runs_on_every_backend(
        "event_loop",
        &[
            "backend: {backend}",
            "64 MiB written by the Mover, 64 MiB read by the loop",
        ],
    );
}

#[test]
fn probe_example() {
    runs_on_every_backend("probe", &["kernel ", "selected: {backend}", "fallback"]);
}

#[test]
fn receive_example() {
    runs_on_every_backend(
        "receive",
        &["backend: {backend}", "3 files received and checked"],
    );
}
