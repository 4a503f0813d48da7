//! The documentation: the README fits one screen and a bit (at most 200 lines), every page of
//! `docs/src/` is in the book's table of contents, the book builds with mdBook without a
//! warning, and every relative link and `#anchor` of the README, of the book's Markdown and of
//! the built HTML resolves (lychee, offline). mdBook and lychee come from `cargo xtask setup`.
//! The generated reference pages are checked by `observer/tests/reference_pages.rs`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const README_MAX_LINES: usize = 200;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// Runs a documentation tool, failing loudly (never skipping) when it is not installed.
fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}` ({e}): `cargo xtask setup` installs it"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every Markdown file under `dir`, relative to `root`.
fn markdown_files(root: &Path, dir: &Path, found: &mut Vec<String>) {
    for entry in fs::read_dir(dir).expect("read docs/src") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            markdown_files(root, &path, found);
        } else if path.extension().is_some_and(|e| e == "md") {
            let relative = path.strip_prefix(root).expect("under root");
            found.push(relative.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn readme_fits_in_200_lines() {
    let readme = fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, more than {README_MAX_LINES}: move the detail into a page of docs/src/"
    );
}

/// The commands of the README's first screen (its first code block), each with where it is
/// run as written: a newcomer's first command must be one the project runs itself.
const FIRST_SCREEN_COMMANDS: &[(&str, &str)] = &[
    // .ci/run runs it, exactly.
    ("cargo xtask test", ".ci/run"),
    // The demo binary it builds and execs is run end to end by tests/tests/demo.rs.
    ("cargo xtask demo", "tests/tests/demo.rs"),
];

#[test]
fn the_first_screen_shows_only_commands_that_are_run() {
    let readme = fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let block: Vec<&str> = readme
        .split("```")
        .nth(1)
        .expect("README.md starts with a code block of commands")
        .lines()
        .skip(1) // the fence's language tag
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!block.is_empty(), "the README's first code block is empty");
    for line in block {
        let command = line.split('#').next().unwrap_or_default().trim();
        let Some((_, runner)) = FIRST_SCREEN_COMMANDS.iter().find(|(c, _)| *c == command) else {
            panic!(
                "the README's first screen shows `{command}`, which no test or CI runs as written: \
                 keep it out of the first screen, or run it and list it in FIRST_SCREEN_COMMANDS"
            );
        };
        let runner_text = fs::read_to_string(repo().join(runner))
            .unwrap_or_else(|e| panic!("{runner}, which runs `{command}`, cannot be read: {e}"));
        assert!(
            runner_text.contains(command),
            "{runner} no longer runs `{command}`"
        );
    }
}

#[test]
fn every_page_is_in_the_table_of_contents() {
    let src = repo().join("docs/src");
    let summary = fs::read_to_string(src.join("SUMMARY.md")).expect("read docs/src/SUMMARY.md");
    let mut pages = Vec::new();
    markdown_files(&src, &src, &mut pages);
    pages.sort();
    let missing: Vec<&String> = pages
        .iter()
        // Included into pages by `{{#include}}`, not pages of their own.
        .filter(|p| !p.starts_with("reference/generated/") && *p != "SUMMARY.md")
        .filter(|p| !summary.contains(&format!("]({p})")))
        .collect();
    assert!(
        missing.is_empty(),
        "pages of docs/src/ missing from SUMMARY.md (mdBook would not publish them): {missing:?}"
    );
}

#[test]
fn the_book_builds_and_every_link_resolves() {
    let out_dir = std::env::temp_dir().join(format!("observer-book-{}", std::process::id()));
    let _remove = RemoveOnDrop(out_dir.clone());
    let out = out_dir.to_str().expect("UTF-8 temp dir");

    let build = tool("mdbook", &["build", "docs", "--dest-dir", out]);
    let log = text(&build);
    assert!(build.status.success(), "mdbook build docs failed:\n{log}");
    assert!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "mdbook build docs warned (a broken include, unclosed HTML in a page...):\n{log}"
    );

    // The Markdown sources: what GitHub shows, with the anchors it makes of headings.
    let sources = tool(
        "lychee",
        &[
            "--offline",
            "--include-fragments",
            "--no-progress",
            "README.md",
            "docs/src/**/*.md",
        ],
    );
    assert!(
        sources.status.success(),
        "broken links in README.md or docs/src/:\n{}",
        text(&sources)
    );

    // The built book: the pages and anchors mdBook actually made.
    let html_glob = format!("{out}/**/*.html");
    let html = tool(
        "lychee",
        &[
            "--offline",
            "--include-fragments",
            "--no-progress",
            "--root-dir",
            out,
            &html_glob,
        ],
    );
    assert!(
        html.status.success(),
        "broken links in the built book:\n{}",
        text(&html)
    );
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
