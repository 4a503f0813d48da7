//! The git commit a build comes from, for `observer --version`, the agent's start-up log
//! and the image's labels. Shared by build.rs and its test (tests/tests/image.rs).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Set it to name the commit of a tree that has no git history (a source tarball, a
/// Docker build context without `.git`).
pub const OVERRIDE_VAR: &str = "OBSERVER_GIT_COMMIT";
/// What a build reports when neither the variable nor git can tell its commit.
pub const UNKNOWN: &str = "unknown";

/// The commit `dir` was checked out at, and the files whose change means another commit
/// (cargo reruns the build script when they change). A directory that is no git work tree,
/// or a machine without git, gives [`UNKNOWN`] and no files: the build goes on.
pub fn commit_of(dir: &Path, override_value: Option<&str>) -> (String, Vec<PathBuf>) {
    if let Some(commit) = override_value.map(str::trim).filter(|c| !c.is_empty()) {
        return (commit.to_owned(), Vec::new());
    }
    let Some(commit) = git(dir, &["rev-parse", "--short=12", "HEAD"]) else {
        return (UNKNOWN.to_owned(), Vec::new());
    };
    // HEAD names the branch; the branch's ref (loose, or in packed-refs) names the commit.
    // `--git-path` finds each where this checkout keeps it (linked worktrees included).
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(dir, &["symbolic-ref", "--quiet", "HEAD"]));
    let files = watched
        .iter()
        .filter_map(|name| git(dir, &["rev-parse", "--git-path", name]))
        .map(|path| dir.join(path))
        // A file that does not exist would make cargo rerun the script on every build.
        .filter(|path| path.exists())
        .collect();
    (commit, files)
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}
