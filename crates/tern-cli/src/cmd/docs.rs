//! Shell completions and manual pages, generated from the same definitions as `--help`
//! (`clap_complete`, `clap_mangen`), so that they cannot drift from the commands.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// `tern completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `tern manpages`.
#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// The directory the pages are written to (made if missing).
    dir: PathBuf,
}

/// Print the completion script for `a.shell` to standard output.
pub fn completions(a: CompletionsArgs, mut cli: clap::Command) -> anyhow::Result<()> {
    clap_complete::generate(a.shell, &mut cli, "tern", &mut std::io::stdout());
    Ok(())
}

/// Write a page per command: `tern.1`, `tern-server.1`, `tern-server-run.1`…
pub fn manpages(a: ManpagesArgs, cli: clap::Command) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("{}", a.dir.display()))?;
    let mut cli = cli;
    cli.build();
    let mut written = 0;
    write_pages(&a.dir, &cli, "tern", &mut written)?;
    println!("{written} manual pages in {}", a.dir.display());
    Ok(())
}

fn write_pages(dir: &std::path::Path, cmd: &clap::Command, name: &str, written: &mut usize) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_owned()).bin_name(name.replace('-', " "));
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("rendering {name}.1"))?;
    let path = dir.join(format!("{name}.1"));
    tern_fs::atomic_write(&path, &text, 0o644).with_context(|| format!("{}", path.display()))?;
    *written += 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_pages(dir, sub, &format!("{name}-{}", sub.get_name()), written)?;
    }
    Ok(())
}
