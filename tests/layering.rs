//! Each layer may use only the layers below it (see `src/lib.rs`). This test
//! reads the sources and fails when a module reaches upward, so the rule in
//! each `mod.rs` cannot silently rot.

use std::path::Path;

/// (layer directory, modules it must not use)
const RULES: &[(&str, &[&str])] = &[
    (
        "src/replica",
        &["engine", "frontend", "controller", "node", "store"],
    ),
    ("src/engine", &["frontend", "controller", "node", "store"]),
    ("src/frontend", &["controller", "node", "store"]),
    (
        "src/store",
        &["replica", "engine", "frontend", "controller", "node"],
    ),
    ("src/controller", &["node", "dev"]),
    ("src/node", &["controller", "dev"]),
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn layers_do_not_import_upward() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut violations = Vec::new();
    for (dir, banned) in RULES {
        let mut files = Vec::new();
        sources(&root.join(dir), &mut files);
        assert!(!files.is_empty(), "{dir} has no sources");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for m in *banned {
                    if line.contains(&format!("crate::{m}"))
                        || line.contains(&format!("shorthorn::{m}"))
                    {
                        violations.push(format!(
                            "{}:{}: uses {m}: {}",
                            f.display(),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}
