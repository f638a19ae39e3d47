//! The layering of `src/`: dependencies between top-level modules point one way.
//!
//! Reads every file under `src/` as text, finds each path that leaves its top-level module
//! (`crate::cache::…`, `use crate::{config, oci::Digest}`, a `super::` that climbs to the crate
//! root), and checks the graph of top-level modules they make:
//! - **no cycle**: no module refers, directly or through others, to one that refers back;
//! - **no upward reference**: a module uses only modules of its own layer or the layers below
//!   ([`LAYERS`]).
//!
//! Comments and string literals are blanked out first, so prose that names a module is not a
//! dependency. Test code inside `src/` counts like any other code. `src/main.rs` is its own
//! crate (it sees the library only as `cistern::…`) and sits above everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may refer to modules of its own layer and of those
/// below; cycles inside a layer are caught by the cycle check.
const LAYERS: &[(&str, &[&str])] = &[
    // Lock helpers over `std::sync`: no IO, nothing else of the crate.
    ("sync", &["sync"]),
    // No IO, no tokio types: grammars, protocol rules, errors, and the keep/expire policy.
    ("pure", &["error", "oci", "api", "policy"]),
    // The clock: the one place time is read from (system, or manual in tests). Above the
    // pure modules, so that they take times as arguments and never read one.
    ("clock", &["clock"]),
    // TOML → validated settings; turns keys into `policy` values.
    ("config", &["config"]),
    // The disk layout, talking to upstream registries, and OCI image layouts (read and
    // written from the store; a layout may later serve as an upstream).
    ("storage/upstream", &["storage", "upstream", "layout"]),
    // Fills, readers, manifests, eviction: uses storage and walks upstreams.
    ("cache", &["cache"]),
    // Cache administration (stats, pins, purges) as a library service.
    ("admin", &["admin"]),
    // HTTP: handlers and the admin API over the cache.
    ("server", &["server"]),
    // `src/lib.rs`'s own items, and `run` (the `Server` builder), which wire everything
    // together.
    ("crate root", &["lib", "run"]),
];

/// Where a reference was found, to name it in a failure.
type Site = String;

/// (from, to) → the first place `from` refers to `to`.
type Edges = BTreeMap<(String, String), Site>;

#[test]
fn top_level_modules_do_not_form_a_cycle() {
    let edges = edges_of_src();
    if let Some(message) = cycle(&edges) {
        panic!("{message}");
    }
}

#[test]
fn no_module_refers_to_a_higher_layer() {
    let edges = edges_of_src();
    let problems = layer_violations(&edges);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checks_catch_a_cycle_an_upward_reference_and_an_unknown_module() {
    // The checker itself, on made-up files, so that it is known to be able to fail.
    let files = [
        ("lib.rs", "pub mod config; pub mod policy;"),
        (
            "config/mod.rs",
            "// crate::server in a comment is no dependency\nuse crate::policy::pins::Pin;\nconst S: &str = \"crate::cache\";",
        ),
        ("policy/glob.rs", "use crate::{oci::Digest, config::X};"),
        (
            "policy/pins.rs",
            "mod tests { fn f() { super::super::super::cache::Clock::system(); } }",
        ),
        ("oci/mod.rs", "fn f() { let _ = crate::Config::default(); }"),
        ("shiny/mod.rs", "use crate::oci::Digest;"),
    ];
    let mut edges = Edges::new();
    for (path, text) in files {
        references(Path::new(path), text, &mut edges);
    }
    let pairs: Vec<(&str, &str)> = edges
        .keys()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("config", "policy"),
            ("oci", "lib"),
            ("policy", "cache"),
            ("policy", "config"),
            ("policy", "oci"),
            ("shiny", "oci"),
        ]
    );
    let cycle = cycle(&edges).expect("config → policy → config is a cycle");
    assert!(cycle.contains("config → policy → config"), "{cycle}");
    let problems = layer_violations(&edges).join("\n");
    for want in [
        "policy (layer pure) refers to config (layer config) at policy/glob.rs:1",
        "policy (layer pure) refers to cache",
        "oci (layer pure) refers to lib (layer crate root) at oci/mod.rs:1",
        "shiny is in no layer",
    ] {
        assert!(problems.contains(want), "missing {want:?} in:\n{problems}");
    }
}

/// The reference graph of the real `src/`.
fn edges_of_src() -> Edges {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 10, "found only {files:?} under {root:?}");
    let mut edges = Edges::new();
    for path in files {
        let relative = path.strip_prefix(&root).expect("below src/");
        if relative == Path::new("main.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        references(relative, &text, &mut edges);
    }
    edges
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

/// The module path of a file below `src/`: `cache/refs/graph.rs` → `[cache, refs, graph]`,
/// `config/mod.rs` → `[config]`, `lib.rs` → `[]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if stem != "mod" && !(parts.is_empty() && stem == "lib") {
        parts.push(stem.to_string());
    }
    parts
}

/// Adds the references from the top-level module of the file at `relative` (below `src/`)
/// to other top-level modules.
fn references(relative: &Path, text: &str, edges: &mut Edges) {
    let file_module = module_path(relative);
    let from = file_module.first().cloned().unwrap_or_else(|| "lib".into());
    let tokens = tokens(&blank_comments_and_strings(text));
    // Inline modules (`mod tests { … }`) open below the file's module: (name, brace depth).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let (line, tok) = (&tokens[i].0, tokens[i].1.as_str());
        match tok {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t.1 == "{") => {
                inline.push((tokens[i + 1].1.clone(), depth));
            }
            "crate" | "super" | "self" => {
                let starts_path = i == 0 || !matches!(tokens[i - 1].1.as_str(), "::" | "$");
                if starts_path && tokens.get(i + 1).is_some_and(|t| t.1 == "::") {
                    let mut here: Vec<String> = file_module.clone();
                    here.extend(inline.iter().map(|(n, _)| n.clone()));
                    for to in targets(&tokens, i, here) {
                        if to != from {
                            let site = format!("{}:{line}", relative.display());
                            edges.entry((from.clone(), to)).or_insert(site);
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
}

/// The top-level modules the path starting at token `i` reaches, seen from module `here`.
fn targets(tokens: &[(usize, String)], mut i: usize, mut here: Vec<String>) -> Vec<String> {
    // Resolve the leading `crate`, `self` and `super`s to the module the path continues in.
    let mut at: Vec<String> = match tokens[i].1.as_str() {
        "crate" => {
            i += 2;
            Vec::new()
        }
        _ => {
            loop {
                match tokens.get(i).map(|t| t.1.as_str()) {
                    Some("self") => {}
                    Some("super") => {
                        here.pop();
                    }
                    _ => break,
                }
                // Past the segment and its `::`.
                i += 2;
            }
            here
        }
    };
    if !at.is_empty() {
        return vec![at.swap_remove(0)];
    }
    // At the crate root: the next segment names the top-level module, or a group names several.
    match tokens.get(i).map(|t| t.1.as_str()) {
        Some("{") => group_heads(tokens, i),
        Some(name) => vec![top_level(name)],
        None => Vec::new(),
    }
}

/// The first segment of each path in the `{ … }` group opening at token `i`.
fn group_heads(tokens: &[(usize, String)], i: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for (_, t) in &tokens[i..] {
        match t.as_str() {
            "{" => {
                depth += 1;
                expect_head = depth == 1;
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => expect_head = true,
            name if expect_head && depth == 1 => {
                heads.push(top_level(name));
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// A name right below `crate::`: a top-level module, or else an item of the crate root.
fn top_level(name: &str) -> String {
    let is_module = LAYERS.iter().any(|(_, mods)| mods.contains(&name))
        || Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(name)
            .is_dir()
        || Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(format!("{name}.rs"))
            .is_file();
    if is_module && name != "lib" && name != "main" {
        name.to_string()
    } else {
        "lib".to_string()
    }
}

/// Identifiers, `::` and single punctuation characters, each with its line.
fn tokens(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line) = (0, 1);
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((line, chars[start..i].iter().collect()));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push((line, "::".into()));
            i += 2;
        } else {
            out.push((line, c.to_string()));
            i += 1;
        }
    }
    out
}

/// The text with comments, string literals and character literals replaced by spaces (line
/// breaks kept, so lines still count right).
fn blank_comments_and_strings(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied();
        if c[i] == '/' && at(i + 1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == Some('*') {
            let mut nesting = 0;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '/' && at(i + 1) == Some('*') {
                    nesting += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == Some('/') {
                    nesting -= 1;
                    out.push_str("  ");
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(&c, i) {
            // r"…", r#"…"#, br"…": no escapes; ends at a quote followed by as many #s.
            let open = c[i..].iter().position(|&ch| ch == '"').expect("a quote") + 1;
            for _ in 0..open {
                out.push(' ');
            }
            i += open;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && (at(i + 1) == Some('\\') || at(i + 2) == Some('\'')) {
            // A character literal ('x', '\n', '\u{1F600}'); a lifetime ('a) has no closing quote.
            out.push(' ');
            i += 1;
            if c.get(i) == Some(&'\\') {
                // The backslash and the character it escapes (which may be a quote).
                out.push_str("  ");
                i += 2;
            }
            while i < c.len() && c[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// If a raw string literal starts at `i` (`r"`, `r#"`, `br#"`, …), how many `#`s it has.
fn raw_string_start(c: &[char], i: usize) -> Option<usize> {
    let previous_is_ident = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
    if previous_is_ident {
        return None;
    }
    let mut j = i;
    if c.get(j) == Some(&'b') {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = c[j..].iter().take_while(|&&ch| ch == '#').count();
    (c.get(j + hashes) == Some(&'"')).then_some(hashes)
}

/// A cycle in the graph, as `a → b → … → a` with where each step was found.
fn cycle(edges: &Edges) -> Option<String> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    // Depth-first search; a node met again while still on the stack closes a cycle.
    fn visit<'a>(
        node: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for n in next.get(node).into_iter().flatten() {
            if let Some(c) = visit(n, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for start in next.keys() {
        if let Some(c) = visit(start, &next, &mut Vec::new(), &mut done) {
            let mut message = format!(
                "import cycle between top-level modules: {}\n",
                c.join(" → ")
            );
            for pair in c.windows(2) {
                let site = &edges[&(pair[0].to_string(), pair[1].to_string())];
                let _ = writeln!(message, "  {} → {}: {site}", pair[0], pair[1]);
            }
            return Some(message);
        }
    }
    None
}

/// Every reference that goes to a higher layer, and every module in no layer.
fn layer_violations(edges: &Edges) -> Vec<String> {
    let layer = |m: &str| LAYERS.iter().position(|(_, mods)| mods.contains(&m));
    let mut problems = Vec::new();
    let mut unplaced = BTreeSet::new();
    for ((from, to), site) in edges {
        for m in [from, to] {
            if layer(m).is_none() && unplaced.insert(m.clone()) {
                problems.push(format!(
                    "{m} is in no layer: add it to LAYERS in tests/layering.rs (seen at {site})"
                ));
            }
        }
        if let (Some(f), Some(t)) = (layer(from), layer(to))
            && t > f
        {
            problems.push(format!(
                "{from} (layer {}) refers to {to} (layer {}) at {site}: \
                 dependencies must point down (see LAYERS in tests/layering.rs)",
                LAYERS[f].0, LAYERS[t].0
            ));
        }
    }
    problems
}
