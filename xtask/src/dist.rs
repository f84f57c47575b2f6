//! `cargo xtask dist`: shell completions and a man page for `drover`, generated from the
//! CLI's own definition so they never drift from it.

use std::fs;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

/// Writes `completions/{drover.bash,_drover,drover.fish}` and `man/drover.1` under `out`.
pub(crate) fn run(out: &Path) -> anyhow::Result<()> {
    let completions = out.join("completions");
    let man = out.join("man");
    fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    let mut cmd = drover_client::Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "drover", &completions)
            .with_context(|| format!("cannot write {shell} completions"))?;
        eprintln!("wrote {}", path.display());
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    let path = man.join("drover.1");
    fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn completions_and_man_page_cover_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        super::run(dir.path()).unwrap();
        let bash = std::fs::read_to_string(dir.path().join("completions/drover.bash")).unwrap();
        for cmd in [
            "get-nodes",
            "deploy-config",
            "logs",
            "monitor",
            "show-settings",
        ] {
            assert!(bash.contains(cmd), "bash completion lacks {cmd}");
        }
        assert!(dir.path().join("completions/_drover").exists());
        assert!(dir.path().join("completions/drover.fish").exists());
        let man = std::fs::read_to_string(dir.path().join("man/drover.1")).unwrap();
        assert!(man.contains(".TH drover"), "{}", &man[..200.min(man.len())]);
    }
}
