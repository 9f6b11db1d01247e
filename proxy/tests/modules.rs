//! No import circle among the proxy's modules.
//!
//! Reads every source file under `src/`, collects the crate-internal paths each one uses
//! (`use crate::…`, `use super::…`, `use self::…`, and the same paths written inline), and
//! resolves each to the file of the module it names. The resulting graph must have no
//! cycle, at file level and at the level of the top-level modules (`config`, `stats`,
//! `routing`, …). Items re-exported by the crate root count as the root's, so a module that
//! writes `crate::Config` instead of `crate::config::Config` makes a circle with the root.
//!
//! Run with `--nocapture` to print every module's edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path below the crate root, e.g. `["routing", "server", "http"]`.
type ModPath = Vec<String>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    OpenParen,
    CloseParen,
    Comma,
    Semi,
    Star,
    Other,
}

/// Tokens of Rust source with comments, strings and character literals removed: enough to
/// see paths and `use` trees.
fn tokens(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(n) = raw_string_len(&b[i..]) {
            i += n;
            out.push(Tok::Other);
        } else if c == b'"' || (c == b'b' && b.get(i + 1) == Some(&b'"')) {
            i += if c == b'b' { 2 } else { 1 };
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(Tok::Other);
        } else if c == b'\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let close = if b.get(i + 1) == Some(&b'\\') {
                b.get(i + 3..)
                    .and_then(|r| r.iter().position(|&x| x == b'\''))
                    .map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                std::str::from_utf8(&b[i + 1..])
                    .ok()
                    .and_then(|s| s.chars().next())
                    .filter(|ch| !ch.is_ascii())
                    .map(|ch| i + 1 + ch.len_utf8())
                    .filter(|&end| b.get(end) == Some(&b'\''))
            };
            match close {
                Some(end) => i = end + 1,
                None => i += 1, // a lifetime: its name follows as an identifier
            }
            out.push(Tok::Other);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[start..i].to_owned()));
        } else if b[i..].starts_with(b"::") {
            i += 2;
            out.push(Tok::PathSep);
        } else {
            out.push(match c {
                b'{' => Tok::Open,
                b'}' => Tok::Close,
                b'(' => Tok::OpenParen,
                b')' => Tok::CloseParen,
                b',' => Tok::Comma,
                b';' => Tok::Semi,
                b'*' => Tok::Star,
                _ => Tok::Other,
            });
            i += if c.is_ascii() {
                1
            } else {
                src[i..].chars().next().map_or(1, char::len_utf8)
            };
        }
    }
    out
}

/// Length of a raw string literal (`r"…"`, `r#"…"#`, `br##"…"##`) starting at `b`.
fn raw_string_len(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    if b.first() == Some(&b'b') {
        i += 1;
    }
    if b.get(i) != Some(&b'r') {
        return None;
    }
    i += 1;
    let hashes = b[i..].iter().take_while(|&&x| x == b'#').count();
    i += hashes;
    if b.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    let mut end = Vec::from(&b"\""[..]);
    end.extend(std::iter::repeat_n(b'#', hashes));
    let rest = b[i..]
        .windows(end.len())
        .position(|w| w == end.as_slice())?;
    Some(i + rest + end.len())
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// Flattens the `use` tree starting at `toks[*i]` (just after `use`) into full paths.
fn use_tree(toks: &[Tok], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) if s == "as" => {
                *i += 2; // `as alias`
            }
            Some(Tok::Ident(s)) => {
                if s == "self" && !path.is_empty() {
                    // `a::{self, …}` names `a` itself.
                } else {
                    path.push(s.clone());
                }
                *i += 1;
            }
            Some(Tok::PathSep) => *i += 1,
            Some(Tok::Star) => *i += 1,
            Some(Tok::Open) => {
                *i += 1;
                loop {
                    if toks.get(*i) == Some(&Tok::Close) {
                        *i += 1;
                        break;
                    }
                    use_tree(toks, i, path.clone(), out);
                    match toks.get(*i) {
                        Some(Tok::Comma) => *i += 1,
                        Some(Tok::Close) => {
                            *i += 1;
                            break;
                        }
                        _ => break,
                    }
                }
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

struct Source {
    file: PathBuf,
    module: ModPath,
}

fn sources(dir: &Path, module: &ModPath, out: &mut Vec<Source>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            let mut m = module.clone();
            m.push(name);
            sources(&p, &m, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let m = match (module.is_empty(), name.as_str()) {
                // The binary is another crate: it reaches the library by its name.
                (true, "main") => continue,
                (true, "lib") | (false, "mod") => module.clone(),
                _ => {
                    let mut m = module.clone();
                    m.push(name);
                    m
                }
            };
            out.push(Source { file: p, module: m });
        }
    }
}

/// The crate-internal paths `toks` uses, each with the module it is written in (inline
/// `mod x { … }` blocks included, so `super` inside `mod tests` is the file's module).
fn paths(toks: &[Tok], file_module: &ModPath) -> Vec<(ModPath, Vec<String>)> {
    let mut out = Vec::new();
    // (brace depth at which the inline module closes, module path inside it)
    let mut inline: Vec<(usize, ModPath)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let here = inline
            .last()
            .map_or_else(|| file_module.clone(), |(_, m)| m.clone());
        match &toks[i] {
            Tok::Open => {
                depth += 1;
                i += 1;
            }
            Tok::Close => {
                if inline.last().is_some_and(|(d, _)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            // `pub(in crate::a)`: a visibility, not a use.
            Tok::OpenParen
                if ident(toks.get(i + 1)) == Some("in")
                    && i > 0
                    && ident(toks.get(i - 1)) == Some("pub") =>
            {
                while i < toks.len() && toks[i] != Tok::CloseParen {
                    i += 1;
                }
            }
            Tok::Ident(s) if s == "mod" => {
                if let (Some(name), Some(Tok::Open)) = (ident(toks.get(i + 1)), toks.get(i + 2)) {
                    let mut m = here.clone();
                    m.push(name.to_owned());
                    depth += 1;
                    inline.push((depth, m));
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Tok::Ident(s) if s == "use" => {
                i += 1;
                let mut found = Vec::new();
                use_tree(toks, &mut i, Vec::new(), &mut found);
                for mut p in found {
                    if p.is_empty() {
                        continue;
                    }
                    // `use child::X` in a module is relative to it (a child module, or another
                    // crate, which resolves to nothing of ours).
                    if !matches!(p[0].as_str(), "crate" | "super" | "self") {
                        p.insert(0, "self".to_owned());
                    }
                    out.push((here.clone(), p));
                }
            }
            Tok::Ident(s)
                if matches!(s.as_str(), "crate" | "super" | "self")
                    && toks.get(i + 1) == Some(&Tok::PathSep) =>
            {
                let mut p = vec![s.clone()];
                i += 1;
                while toks.get(i) == Some(&Tok::PathSep) {
                    match ident(toks.get(i + 1)) {
                        Some(seg) => {
                            p.push(seg.to_owned());
                            i += 2;
                        }
                        None => break,
                    }
                }
                out.push((here.clone(), p));
            }
            _ => i += 1,
        }
    }
    out
}

/// The module (one of `known`) that `path`, written in module `here`, refers to.
fn resolve(path: &[String], here: &ModPath, known: &BTreeSet<ModPath>) -> ModPath {
    let mut base = here.clone();
    let mut rest = path;
    match path[0].as_str() {
        "crate" => {
            base.clear();
            rest = &path[1..];
        }
        "self" => rest = &path[1..],
        _ => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
    }
    // An inline module is part of its file: start from the file's module.
    while !known.contains(&base) {
        base.pop();
    }
    for seg in rest {
        let mut next = base.clone();
        next.push(seg.clone());
        if known.contains(&next) {
            base = next;
        } else {
            break;
        }
    }
    base
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

/// A cycle in `edges`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Module → the modules it uses, at file level and at top-level-module level.
fn graphs(
    src_dir: &Path,
) -> (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, BTreeSet<String>>,
) {
    let mut files = Vec::new();
    sources(src_dir, &Vec::new(), &mut files);
    let known: BTreeSet<ModPath> = files.iter().map(|s| s.module.clone()).collect();
    let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut by_top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &files {
        let text = std::fs::read_to_string(&s.file).unwrap();
        by_file.entry(name(&s.module)).or_default();
        let top = |m: &ModPath| name(&m.iter().take(1).cloned().collect());
        by_top.entry(top(&s.module)).or_default();
        for (here, p) in paths(&tokens(&text), &s.module) {
            let target = resolve(&p, &here, &known);
            if target != s.module {
                by_file
                    .get_mut(&name(&s.module))
                    .unwrap()
                    .insert(name(&target));
            }
            if top(&target) != top(&s.module) {
                by_top
                    .get_mut(&top(&s.module))
                    .unwrap()
                    .insert(top(&target));
            }
        }
    }
    (by_file, by_top)
}

fn print(title: &str, g: &BTreeMap<String, BTreeSet<String>>) {
    println!("{title}:");
    for (from, to) in g {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        println!(
            "  {from} -> {}",
            if to.is_empty() {
                "-".to_owned()
            } else {
                to.join(", ")
            }
        );
    }
}

#[test]
fn no_import_circle_among_the_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (by_file, by_top) = graphs(&src);
    print("modules (one per file) and what they use", &by_file);
    print("top-level modules and what they use", &by_top);
    assert!(
        by_file.len() >= 10,
        "found only {} modules under {}",
        by_file.len(),
        src.display()
    );
    if let Some(c) = find_cycle(&by_file) {
        panic!("import circle between files: {}", c.join(" -> "));
    }
    if let Some(c) = find_cycle(&by_top) {
        panic!(
            "import circle between top-level modules: {}",
            c.join(" -> ")
        );
    }
}

/// The check itself: it sees `use` trees, inline paths, `super` in inline modules, and
/// it finds a circle where there is one.
#[test]
fn the_check_sees_paths_and_finds_circles() {
    let src = r##"
        use crate::a::{self, b::{C, D as E}};
        use super::*;
        // use crate::commented_out;
        const S: &str = "crate::in_a_string";
        const R: &str = r#"crate::in_a_raw_string"#;
        pub(in crate::vis) fn f<'a>(x: &'a str) -> char { let _ = crate::c::g(); 'x' }
        mod tests { use super::*; use super::super::h; }
    "##;
    let found: Vec<(String, String)> = paths(&tokens(src), &vec!["m".to_owned()])
        .into_iter()
        .map(|(here, p)| (name(&here), p.join("::")))
        .collect();
    let want = [
        ("m", "crate::a"),
        ("m", "crate::a::b::C"),
        ("m", "crate::a::b::D"),
        ("m", "super"),
        ("m", "crate::c::g"),
        ("m::tests", "super"),
        ("m::tests", "super::super::h"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(found, want);

    let known: BTreeSet<ModPath> = [
        vec![],
        vec!["a".to_owned()],
        vec!["a".to_owned(), "b".to_owned()],
    ]
    .into_iter()
    .collect();
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(resolve(&m("crate::a::b::C"), &vec![], &known), m("a::b"));
    assert_eq!(resolve(&m("super::X"), &m("a::b"), &known), m("a"));
    assert_eq!(
        resolve(&m("super::X"), &m("a::b::tests"), &known),
        m("a::b")
    );
    assert_eq!(
        resolve(&m("crate::Config"), &m("a"), &known),
        Vec::<String>::new()
    );

    let g = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
