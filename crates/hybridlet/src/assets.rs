//! `hybridlet assets DIR` (hidden; the packaging runs it on the built binary): the manual
//! pages (hybridlet(8) and one per command) and the bash, zsh and fish completions, all
//! generated from the clap definition so that they never drift from `--help`. Pages are
//! gzipped without a timestamp, so the same binary writes the same bytes.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::cli::Cli;
use crate::exit::Failure;

/// Write `man/*.8.gz` and `completions/{hybridlet.bash,_hybridlet,hybridlet.fish}` under
/// `out`.
pub fn write(out: &Path) -> Result<(), Failure> {
    let mut top = Cli::command();
    top.build();
    let mut pages = vec![("hybridlet".to_string(), top.clone())];
    for sub in top
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("hybridlet-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, cmd) in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(cmd)
            .section("8")
            .manual("hybridlet")
            .render(&mut roff)
            .context("rendering a manual page")?;
        place(&out.join("man").join(format!("{name}.8.gz")), &gzip(&roff)?)?;
    }
    use clap_complete::Shell;
    for (shell, file) in [
        (Shell::Bash, "hybridlet.bash"),
        (Shell::Zsh, "_hybridlet"),
        (Shell::Fish, "hybridlet.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut top.clone(), "hybridlet", &mut script);
        place(&out.join("completions").join(file), &script)?;
    }
    Ok(())
}

/// Gzip with no name and mtime 0 (reproducible; lintian and rpmlint want pages gzipped).
fn gzip(data: &[u8]) -> Result<Vec<u8>, Failure> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(data).context("gzip")?;
    Ok(gz.finish().context("gzip")?)
}

fn place(path: &Path, contents: &[u8]) -> Result<(), Failure> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    hybridlet_sys::atomic_write(path, contents, 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
