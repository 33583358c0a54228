//! The server crate's modules depend on each other in one direction only: this test reads
//! every `crate::<module>` path under src/ (plain paths and `use crate::{...}` groups), builds
//! the graph of the top-level modules, and fails naming every cycle. The crate root (lib.rs,
//! where `App` wires the modules together) and main.rs are not modules of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`None` for the crate root and the binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// Test code is not part of the dependency graph: everything from `#[cfg(test)]` on, and
/// whole files that are test-only modules (`#![cfg(test)]`).
fn without_tests(text: &str) -> &str {
    if text.contains("#![cfg(test)]") {
        return "";
    }
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

/// The text with every `//` comment (doc comments included) cut off: a comment naming a
/// module is not a dependency on it.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::...` path in `text`, `use crate::{a, b::c}` included.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("crate::") {
        let at = i + off + "crate::".len();
        i = at;
        // Not part of a longer identifier such as `my_crate::`.
        let before = text[..at - "crate::".len()].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if bytes.get(at) == Some(&b'{') {
            // A group: split its top-level items by commas.
            let mut depth = 0;
            let mut start = at + 1;
            for (j, &b) in bytes.iter().enumerate().skip(at) {
                match b {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            out.extend(first_segment(&text[start..j]));
                            break;
                        }
                    }
                    b',' if depth == 1 => {
                        out.extend(first_segment(&text[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.extend(first_segment(&text[at..]));
        }
    }
    out
}

fn first_segment(s: &str) -> Option<String> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| s[..end].to_owned())
}

/// Every cycle among the modules, as strongly connected components of more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm, iteratively small enough to recurse: a few dozen modules.
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn modules_depend_on_each_other_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    assert!(
        modules.len() > 5,
        "found only {modules:?} under {}",
        src.display()
    );
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        let deps = graph.entry(m.clone()).or_default();
        for r in crate_refs(&without_comments(without_tests(&text))) {
            if r != m && modules.contains(&r) {
                deps.insert(r);
            }
        }
    }
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "module cycles (each group depends on itself through the others): {found:?}\n\
         graph: {graph:#?}"
    );
}

#[test]
fn the_reader_finds_paths_and_groups() {
    let refs = crate_refs(
        "use crate::hub::{Frame, Hub};\nuse crate::{App, store::{A, B}, protocol};\n\
         fn f() { crate::rtc::go(); my_crate::x(); }",
    );
    let want: BTreeSet<String> = ["hub", "App", "store", "protocol", "rtc"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(refs, want);
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycles(&g), vec![vec!["a".to_owned(), "b".to_owned()]]);
}

/// Only `src/store/` talks SQL: no other file of the server names `sqlx`.
#[test]
fn only_the_store_runs_sql() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(!files.is_empty(), "no sources under {}", src.display());
    let store = src.join("store");
    let outside: Vec<_> = files
        .iter()
        .filter(|f| !f.starts_with(&store))
        .filter(|f| {
            std::fs::read_to_string(f)
                .map(|t| without_comments(&t).contains("sqlx"))
                .unwrap_or(false)
        })
        .collect();
    assert!(outside.is_empty(), "sqlx outside src/store/: {outside:?}");
}

/// The two migration trees hold the same versions under the same names.
#[test]
fn both_backends_have_the_same_migrations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("migrations/{dir}: {e}"))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (sqlite, postgres) = (names("sqlite"), names("postgres"));
    assert!(!sqlite.is_empty());
    assert_eq!(sqlite, postgres);
}
