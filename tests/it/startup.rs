//! Start-up checks of the glommio runtime, on the real binary: a machine it cannot run on
//! gets a sentence naming the fix and a non-zero exit, never a panic from an executor.

use std::process::{Command, Output};

use crate::support::SECRET;

/// Runs `switchboard serve --runtime glommio` with `args` through `sh -c`, so `prefix`
/// (a `ulimit`, say) applies to it, and returns what it printed once it exited.
fn serve_glommio(prefix: &str, args: &str) -> Output {
    let binary = env!("CARGO_BIN_EXE_switchboard");
    let script = format!(
        "{prefix} exec {binary} serve --runtime glommio --bind 127.0.0.1:0 --jwt-secret {SECRET} {args}"
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("sh runs");
    assert!(
        !child.status.success(),
        "the server must refuse to start: {}",
        String::from_utf8_lossy(&child.stdout)
    );
    child
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn too_little_locked_memory_exits_saying_which_ulimit_to_set() {
    let output = serve_glommio("ulimit -l 256 &&", "--shards 1");
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("RLIMIT_MEMLOCK) is 256 KiB"), "{said}");
    assert!(said.contains("`ulimit -l 512`"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn more_shards_than_cores_exits_saying_how_many_fit() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let output = serve_glommio("", &format!("--shards {}", cores + 1));
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("use --shards {cores} or fewer")),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
}
