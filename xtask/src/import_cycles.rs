//! The lint's import-circle check: within each crate of the workspace, no module may use one
//! that uses it back, directly or through others.
//!
//! Each `.rs` file under a crate's `src/` is a module (`a/b.rs` and `a/b/mod.rs` are `a::b`;
//! `lib.rs` and `main.rs` the root). A module depends on another when its code (comments and
//! its `#[cfg(test)] mod tests` left out) names a path through it: `crate::x::…`,
//! `$crate::x::…`, `super::x::…`, or an item of a grouped `use crate::{x::…, y, …}`. A path is
//! resolved to the longest module it names; a module naming one of its own ancestors (a child
//! using its parent's items) is not counted, the parent declaring the child is its normal
//! shape. Binaries under `src/bin/` are crates of their own and are checked alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Every import circle in the crate whose sources are under `src`, each as the module path
/// from one module back to itself (`a -> b -> a`).
pub fn crate_cycles(src: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let mut modules = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src");
        if rel.starts_with("bin") {
            continue;
        }
        let text =
            fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        modules.insert(module_path(rel), strip(&text));
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // A module holds its children: whoever uses it may use what they define (re-exported).
    for m in modules.keys() {
        if let Some((parent, _)) = m.rsplit_once("::") {
            graph
                .entry(parent.to_string())
                .or_default()
                .insert(m.clone());
        } else if !m.is_empty() {
            graph.entry(String::new()).or_default().insert(m.clone());
        }
    }
    for (m, text) in &modules {
        for path in referenced_paths(m, text) {
            if let Some(target) = resolve(&path, &modules) {
                if target != *m && !is_ancestor(&target, m) {
                    graph.entry(m.clone()).or_default().insert(target);
                }
            }
        }
    }
    Ok(cycles(&graph))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// `a/b.rs`, `a/b/mod.rs` -> `a::b`; `lib.rs`, `main.rs` -> `` (the root).
fn module_path(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// The code without line comments (doc links name modules without importing them) and
/// without the unit tests module.
fn strip(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    match code.find("#[cfg(test)]\nmod tests") {
        Some(i) => code[..i].to_string(),
        None => code,
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifiers of the path starting at `s` (`a::b::C` -> [a, b, C]); stops at anything
/// else (a `{`, a space, a `;`).
fn path_at(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_string());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(r) if r.starts_with(is_ident) => rest = r,
            _ => break,
        }
    }
    out
}

/// The items of a `{…}` group starting at `s` (just after the `{`), split at its top-level
/// commas.
fn group_items(s: &str) -> Vec<&str> {
    let mut depth = 0usize;
    let mut items = Vec::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(s[start..i].trim());
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// Every absolute module path (from the crate root) that module `m`'s code names.
fn referenced_paths(m: &str, text: &str) -> Vec<Vec<String>> {
    let module: Vec<String> = m
        .split("::")
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let mut out = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let at = from + i;
            from = at + prefix.len();
            // Inside a longer identifier (`my_crate::`) or a chain already read
            // (`super::super::`): not the start of a path.
            if text[..at].ends_with(is_ident) || text[..at].ends_with("::") {
                continue;
            }
            let mut base = Vec::new();
            if prefix == "super::" {
                let mut up = 1;
                while text[from..].starts_with("super::") {
                    from += "super::".len();
                    up += 1;
                }
                base = module[..module.len().saturating_sub(up)].to_vec();
            }
            let rest = &text[from..];
            let heads: Vec<Vec<String>> = match rest.strip_prefix('{') {
                Some(group) => group_items(group).into_iter().map(path_at).collect(),
                None => vec![path_at(rest)],
            };
            for h in heads.into_iter().filter(|h| !h.is_empty()) {
                let mut full = base.clone();
                full.extend(h);
                out.push(full);
            }
        }
    }
    out
}

/// The longest module that `path` goes through, if it names one other than the root.
fn resolve(path: &[String], modules: &BTreeMap<String, String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|c| modules.contains_key(c))
}

fn is_ancestor(a: &str, m: &str) -> bool {
    a.is_empty() || m.starts_with(&format!("{a}::"))
}

fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        found: &mut BTreeSet<String>,
    ) {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == next).expect("on the stack");
                    let mut c = stack[from..].to_vec();
                    c.push(next.clone());
                    found.insert(c.join(" -> "));
                }
                Some(_) => {}
                None => visit(next, graph, state, stack, found),
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    let mut found = BTreeSet::new();
    for n in graph.keys() {
        if !state.contains_key(n.as_str()) {
            visit(n, graph, &mut state, &mut Vec::new(), &mut found);
        }
    }
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> (PathBuf, Vec<String>) {
        let dir = std::env::temp_dir().join(format!(
            "icpt-xtask-cycles-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = fs::remove_dir_all(&dir);
        for (p, text) in files {
            let f = dir.join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, text).unwrap();
        }
        let found = crate_cycles(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        (dir, found)
    }

    #[test]
    fn a_grouped_use_and_super_paths_close_a_circle() {
        let (_, found) = tree(&[
            ("lib.rs", "mod a;\nmod b;\nmod c;\n"),
            ("a.rs", "use crate::{\n    b::{X, Y},\n    c,\n};\n"),
            ("b/mod.rs", "mod inner;\n"),
            ("b/inner.rs", "fn f() { super::super::a::g(); }\n"),
        ]);
        assert_eq!(found, vec!["a -> b -> b::inner -> a".to_string()]);
    }

    #[test]
    fn comments_tests_and_parents_are_not_imports() {
        let (_, found) = tree(&[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "use crate::b::X; // see [`crate::a`]\n"),
            (
                "b.rs",
                "/// Rendered by [`crate::a`].\nfn f() { super::helper(); }\n#[cfg(test)]\nmod tests {\n    use crate::a;\n}\n",
            ),
        ]);
        assert!(found.is_empty(), "{found:?}");
    }
}
