//! The documentation names no command or flag that does not exist.
//!
//! * `docs/cli/*.md` — one page per command group (agent, local, operator, crd) plus an index —
//!   are the `--help` output of the real binary; this test fails when they differ. Regenerate
//!   them with `scripts/gen-cli-docs` (`PGRS_UPDATE_CLI_DOCS=1 cargo test --test docs_cli`).
//! * Every `pgrs …` command line in a code block of `docs/*.md`, `docs/cli/*.md` and `README.md`
//!   (also as `target/debug/pgrs …` or `cargo run -- …`) parses with the real command line
//!   (`pgrs::cli::Cli`), and so does every inline `pgrs …` code span, where an incomplete command
//!   (`pgrs local`) is fine but an unknown subcommand, flag or value is not.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::error::ErrorKind;
use clap::{CommandFactory as _, Parser as _};
use pgrs::cli::Cli;

const GROUPS: &[&str] = &["agent", "local", "operator", "crd"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `pgrs <path> --help` from the built binary, with a clean environment (clap prints the values
/// of `env = ...` variables in the help).
fn help(path: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_pgrs"))
        .args(path)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run pgrs --help");
    assert!(
        output.status.success(),
        "pgrs {path:?} --help failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// Visible subcommands of `pgrs <path>`, from the clap definition.
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut command = Cli::command();
    for name in path {
        command = command
            .find_subcommand(name)
            .unwrap_or_else(|| panic!("no subcommand {name}"))
            .clone();
    }
    command
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect()
}

fn section(out: &mut String, path: &[&str], level: usize) {
    let command = std::iter::once("pgrs")
        .chain(path.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    out.push_str(&format!(
        "{} `{command}`\n\n```text\n{}```\n",
        "#".repeat(level),
        help(path)
    ));
    for sub in subcommands(path) {
        let mut deeper: Vec<&str> = path.to_vec();
        deeper.push(&sub);
        out.push('\n');
        section(out, &deeper, level + 1);
    }
}

const GENERATED: &str = "<!-- Generated from the `--help` output of the `pgrs` binary by \
                         `scripts/gen-cli-docs`; do not edit. `cargo test --test docs_cli` fails \
                         when this page differs from the CLI. -->\n\n";

/// The expected pages: `docs/cli/<group>.md` and the index `docs/cli/README.md`.
fn pages() -> Vec<(PathBuf, String)> {
    let dir = repo().join("docs/cli");
    let mut pages = Vec::new();
    for group in GROUPS {
        let mut page = String::from(GENERATED);
        section(&mut page, &[group], 1);
        pages.push((dir.join(format!("{group}.md")), page));
    }
    let mut index = String::from(GENERATED);
    index.push_str("# The `pgrs` command line\n\nOne binary, one subcommand per role:\n\n");
    for group in GROUPS {
        index.push_str(&format!("* [`pgrs {group}`]({group}.md)\n"));
    }
    index.push_str(&format!("\n```text\n{}```\n", help(&[])));
    pages.push((dir.join("README.md"), index));
    pages
}

#[test]
fn cli_pages_match_help() {
    let update = std::env::var_os("PGRS_UPDATE_CLI_DOCS").is_some();
    let mut stale = Vec::new();
    for (path, expected) in pages() {
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == expected {
            continue;
        }
        if update {
            std::fs::create_dir_all(path.parent().expect("docs/cli")).expect("mkdir docs/cli");
            std::fs::write(&path, &expected).expect("write the page");
        } else {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the CLI's --help: run scripts/gen-cli-docs"
    );
}

/// Splits a command line into words like a POSIX shell would for simple lines: quotes, and a
/// comment or a shell operator ends the command.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(next) = chars.next() {
                    word.push(next);
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '#') if !in_word => break,
            (None, '|' | ';' | '&' | '>' | '<') if !in_word => break,
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The pgrs arguments of a shell line, if it runs pgrs: `pgrs …`, `target/debug/pgrs …`,
/// `cargo run [flags] -- …`, after `VAR=value` prefixes and a `$ ` prompt.
fn pgrs_arguments(line: &str) -> Option<Vec<String>> {
    let line = line.trim().trim_start_matches("$ ");
    let mut words = words(line);
    while words
        .first()
        .is_some_and(|w| w.contains('=') && !w.starts_with('-'))
    {
        words.remove(0);
    }
    let first = words.first()?.clone();
    let binary = first == "pgrs"
        || ["/debug/pgrs", "/release/pgrs", "bin/pgrs"]
            .iter()
            .any(|suffix| first.ends_with(suffix));
    let rest = if binary {
        words[1..].to_vec()
    } else if first == "cargo" && words.get(1).map(String::as_str) == Some("run") {
        let separator = words.iter().position(|w| w == "--")?;
        // `cargo run -p other`, `--example x` or `--bin other` run something else.
        let flags = &words[2..separator];
        let other = flags.iter().enumerate().any(|(i, flag)| {
            let value = flags.get(i + 1).map(String::as_str);
            match flag.as_str() {
                "-p" | "--package" | "--bin" => value != Some("pgrs"),
                "--example" => true,
                _ => false,
            }
        });
        if other {
            return None;
        }
        words[separator + 1..].to_vec()
    } else {
        return None;
    };
    // Documentation notation: `[--flag]` is an optional flag, `<name>`, `N`, `FILE` or `$DIR`
    // a placeholder (given a value any argument accepts).
    Some(
        rest.into_iter()
            .map(|w| {
                w.trim_start_matches('[')
                    .trim_end_matches(']')
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
            .filter(|w| !w.is_empty() && w != "..." && w != "…")
            .map(|w| {
                let placeholder =
                    w.starts_with('$') || w.chars().all(|c| c.is_ascii_uppercase() || c == '_');
                if placeholder { "1".to_string() } else { w }
            })
            .collect(),
    )
}

/// `a/b/c` in a subcommand position is notation for three commands.
fn alternatives(arguments: &[String]) -> Vec<Vec<String>> {
    let position = arguments.iter().position(|w| {
        w.contains('/')
            && w.split('/')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
    });
    match position {
        None => vec![arguments.to_vec()],
        Some(i) => arguments[i]
            .split('/')
            .map(|alternative| {
                let mut variant = arguments.to_vec();
                variant[i] = alternative.to_string();
                variant
            })
            .collect(),
    }
}

struct Mention {
    file: String,
    line: usize,
    text: String,
    /// In a code block: must be a complete, runnable command.
    complete: bool,
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    for dir in ["docs", "docs/cli"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "md"))
            .collect();
        found.sort();
        files.extend(found);
    }
    files
}

fn mentions(file: &Path) -> Vec<Mention> {
    let text = std::fs::read_to_string(file).expect("read a doc");
    let name = file
        .strip_prefix(repo())
        .unwrap_or(file)
        .display()
        .to_string();
    let mut found = Vec::new();
    let mut in_block = false;
    let mut continued: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            // Shell continuation lines form one command.
            let (start, mut joined) = continued.take().unwrap_or((index + 1, String::new()));
            match line.trim_end().strip_suffix('\\') {
                Some(head) => {
                    joined.push_str(head);
                    joined.push(' ');
                    continued = Some((start, joined));
                }
                None => {
                    joined.push_str(line);
                    found.push(Mention {
                        file: name.clone(),
                        line: start,
                        text: joined,
                        complete: true,
                    });
                }
            }
            continue;
        }
        // Inline code spans; `a && b` holds two commands.
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 {
                for part in span.split("&&") {
                    found.push(Mention {
                        file: name.clone(),
                        line: index + 1,
                        text: part.to_string(),
                        complete: false,
                    });
                }
            }
        }
    }
    found
}

/// Why `arguments` do not name an existing command, if they do not.
fn check(arguments: &[String], complete: bool) -> Result<(), String> {
    let argv = std::iter::once("pgrs".to_string()).chain(arguments.iter().cloned());
    let Err(error) = Cli::try_parse_from(argv) else {
        return Ok(());
    };
    let fine = match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => true,
        ErrorKind::MissingSubcommand
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        | ErrorKind::MissingRequiredArgument => !complete,
        _ => false,
    };
    if fine {
        Ok(())
    } else {
        Err(error.render().to_string())
    }
}

#[test]
fn docs_name_only_existing_commands_and_flags() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in markdown_files() {
        for mention in mentions(&file) {
            let Some(arguments) = pgrs_arguments(&mention.text) else {
                continue;
            };
            for variant in alternatives(&arguments) {
                checked += 1;
                if let Err(why) = check(&variant, mention.complete) {
                    wrong.push(format!(
                        "{}:{}: `{}`: {}",
                        mention.file,
                        mention.line,
                        mention.text.trim(),
                        why.lines().next().unwrap_or_default()
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "commands in the docs that the CLI rejects:\n{}",
        wrong.join("\n")
    );
    assert!(
        checked >= 20,
        "only {checked} pgrs commands found in the docs"
    );
}

#[test]
fn the_checker_rejects_what_does_not_exist() {
    let parse = |line: &str| pgrs_arguments(line).expect("a pgrs line");
    assert!(check(&parse("pgrs local up --dir /tmp/x --replicas 2"), true).is_ok());
    assert!(
        check(
            &parse("target/debug/pgrs local down --dir D [--purge]  # comment"),
            true
        )
        .is_ok()
    );
    assert!(check(&parse("cargo run -q -- local switchover --to node1"), true).is_ok());
    assert!(check(&parse("PGRS_LOG=debug pgrs crd > crd.yaml"), true).is_ok());
    assert!(check(&parse("pgrs local"), false).is_ok());
    assert!(
        check(&parse("pgrs local"), true).is_err(),
        "incomplete in a code block"
    );
    assert!(
        check(&parse("pgrs status"), true).is_err(),
        "no such command"
    );
    assert!(check(&parse("pgrs local up --no-such-flag"), true).is_err());
    assert!(
        check(
            &parse("pgrs local chaos --report r.md --kinds meteor"),
            true
        )
        .is_err()
    );
    assert_eq!(
        alternatives(&parse("pgrs local up/status/down")).len(),
        3,
        "slash notation expands"
    );
    assert!(pgrs_arguments("kubectl annotate pgrs pg x=y").is_none());
    assert!(pgrs_arguments("cargo build").is_none());
    assert!(pgrs_arguments("cargo run -p pgrs-router --example notes -- --listen x").is_none());
    assert!(
        check(
            &parse("pgrs local chaos --dir D --rounds N --report FILE"),
            true
        )
        .is_ok()
    );
    assert!(check(&parse("pgrs local kill NODE --hard --dir $DIR"), true).is_ok());
}
