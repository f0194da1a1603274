//! Collects what libbpf prints (the verifier log among it) so a load error can carry its
//! last lines instead of spraying libbpf's output over the agent's log.

use std::collections::VecDeque;
use std::sync::{Mutex, Once};

use libbpf_rs::PrintLevel;

const KEEP: usize = 40;

static LINES: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
static INSTALL: Once = Once::new();

fn collect(level: PrintLevel, msg: String) {
    if matches!(level, PrintLevel::Debug) {
        return;
    }
    let mut lines = LINES.lock().unwrap_or_else(|p| p.into_inner());
    for line in msg.lines().filter(|l| !l.trim().is_empty()) {
        if lines.len() == KEEP {
            lines.pop_front();
        }
        lines.push_back(line.to_string());
    }
}

/// Route libbpf's messages here (once per process) and forget earlier ones.
pub(crate) fn start() {
    INSTALL.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Info, collect)));
    });
    LINES.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// The collected lines, formatted to follow an error message ("" when none).
pub(crate) fn tail() -> String {
    let lines = LINES.lock().unwrap_or_else(|p| p.into_inner());
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nlibbpf said:");
    for l in lines
        .iter()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        s.push_str("\n  ");
        s.push_str(l);
    }
    s
}
