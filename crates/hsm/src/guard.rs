//! `hsm guard`: show, install or remove the BPF LSM guard (docs/BPF.md).

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum GuardAction {
    /// Show whether the guard is installed, who is registered and its counters.
    Status,
    /// Load, attach and pin the guard (the agent does this itself with guard = "auto").
    Install,
    /// Detach and unpin the guard; nothing is left in bpffs.
    Remove,
}

pub(crate) fn run(action: GuardAction) -> anyhow::Result<ExitCode> {
    match action {
        GuardAction::Status => {
            let st = hsm_bpf::guard_status();
            if let Some(why) = &st.untrusted {
                println!("guard: not installed: {why}");
                println!(
                    "guard: {} is not the guard's and is ignored (`hsm guard install` or `hsm guard remove` removes it)",
                    hsm_bpf::PIN_DIR
                );
                return Ok(ExitCode::from(3));
            }
            if !st.present {
                println!("guard: not installed ({} is absent)", hsm_bpf::PIN_DIR);
                for p in &st.problems {
                    println!("problem: {p}");
                }
                return Ok(ExitCode::from(3));
            }
            println!(
                "guard: {} at {}",
                if st.installed {
                    "installed"
                } else if st.unverified {
                    "pinned (not verified: only root can check that the pins are the guard's BPF objects)"
                } else {
                    "INCOMPLETE"
                },
                hsm_bpf::PIN_DIR
            );
            for p in &st.problems {
                println!("problem: {p}");
            }
            println!("links: {}", st.links.join(" "));
            println!("maps: {}", st.maps.join(" "));
            println!("generation: {}", st.generation);
            for h in &st.holders {
                println!(
                    "holder: {} pid {} {}",
                    h.kind,
                    h.tgid,
                    if h.alive { "alive" } else { "dead" }
                );
            }
            for (major, minor) in &st.served {
                println!("served: {major}:{minor}");
            }
            for (name, v) in &st.stats {
                println!("{name}: {v}");
            }
            Ok(if st.installed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        GuardAction::Install => match hsm_bpf::install_guard()? {
            hsm_bpf::GuardInstall::Installed {
                skipped_hooks,
                replaced,
                stale,
            } => {
                print_stale(&stale);
                if let Some(what) = replaced {
                    println!("guard: removed what was not the guard's: {what}");
                }
                println!("guard: installed at {}", hsm_bpf::PIN_DIR);
                if !skipped_hooks.is_empty() {
                    println!(
                        "guard: this kernel lacks the optional hooks {}",
                        skipped_hooks.join(", ")
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            hsm_bpf::GuardInstall::AlreadyInstalled { stale } => {
                print_stale(&stale);
                println!("guard: already installed at {}", hsm_bpf::PIN_DIR);
                Ok(ExitCode::SUCCESS)
            }
        },
        GuardAction::Remove => {
            let removed = hsm_bpf::remove_guard()?;
            print_stale(&removed.stale);
            if let Some(what) = &removed.planted {
                println!("guard: removed what was not the guard's: {what}");
            } else if removed.pins == 0 {
                if removed.stale.is_empty() {
                    println!("guard: nothing to remove");
                }
            } else {
                println!("guard: removed ({} pins)", removed.pins);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_stale(stale: &[String]) {
    for p in stale {
        println!("guard: removed the staging directory of an install that did not finish: {p}");
    }
}
