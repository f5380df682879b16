//! Shared test support: running the real binary.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The built `ringmover` binary, with `RINGMOVER_BACKEND` cleared so each
/// test states the backend it wants.
pub fn ringmover() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmover"));
    cmd.env_remove("RINGMOVER_BACKEND");
    cmd
}

/// Runs `cmd` to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawning ringmover")
}

/// `stdout` as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `stderr` as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
