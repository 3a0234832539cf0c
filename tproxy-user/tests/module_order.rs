//! The crate's rooms import each other in one direction only (the order is in the crate
//! docs): a cycle between the top-level modules of `src` fails here, naming the files whose
//! `crate::` (or `super::`) paths close it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// For each top-level module, the other top-level modules its files name, with those files.
type Imports = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The source without comments and literals, which may spell paths that are not imports.
fn code_of(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied();
    let mut code = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        match (chars[i], at(i + 1)) {
            ('/', Some('/')) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ('/', Some('*')) => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && at(i + 1) == Some('/')) {
                    i += 1;
                }
                i += 2;
            }
            ('r', Some('#' | '"')) => {
                let mut j = i + 1;
                while at(j) == Some('#') {
                    j += 1;
                }
                let hashes = j - i - 1;
                if at(j) != Some('"') {
                    // A raw identifier (`r#type`).
                    code.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                while j < chars.len()
                    && !(chars[j] == '"' && (1..=hashes).all(|k| at(j + k) == Some('#')))
                {
                    j += 1;
                }
                code.push_str("\"\"");
                i = j + 1 + hashes;
            }
            ('"', _) => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                code.push_str("\"\"");
                i += 1;
            }
            ('\'', Some('\\')) => {
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                code.push_str("' '");
                i += 1;
            }
            ('\'', Some(_)) if at(i + 2) == Some('\'') => {
                code.push_str("' '");
                i += 3;
            }
            (c, _) => {
                code.push(c);
                i += 1;
            }
        }
    }
    code
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn ident_at(code: &str) -> &str {
    let end = code.find(|c| !is_ident(c)).unwrap_or(code.len());
    &code[..end]
}

/// The first segments that the paths in `code` reach the crate root with: `crate::x`,
/// `crate::{x, y::z}`, and `super::x` with as many `super`s as the file is deep (`depth`).
fn roots_named(code: &str, depth: usize) -> Vec<&str> {
    let mut roots = Vec::new();
    for (start, _) in code.match_indices("crate::") {
        if code[..start].ends_with(is_ident) {
            continue;
        }
        let rest = &code[start + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            roots.push(ident_at(rest));
            continue;
        };
        let mut nesting = 0;
        let mut item_start = true;
        for (offset, c) in group.char_indices() {
            match c {
                '{' => nesting += 1,
                '}' if nesting == 0 => break,
                '}' => nesting -= 1,
                ',' if nesting == 0 => item_start = true,
                c if item_start && is_ident(c) => {
                    roots.push(ident_at(&group[offset..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    for (start, _) in code.match_indices("super::") {
        if code[..start].ends_with("super::") || code[..start].ends_with(is_ident) {
            continue;
        }
        let mut rest = &code[start..];
        let mut ups = 0;
        while let Some(after) = rest.strip_prefix("super::") {
            ups += 1;
            rest = after;
        }
        if depth > 0 && ups == depth {
            roots.push(ident_at(rest));
        }
    }
    roots
}

fn rust_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

fn imports(src: &Path) -> Imports {
    let mut modules = BTreeSet::new();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir()
            || (path.extension().is_some_and(|ext| ext == "rs") && stem != "lib" && stem != "main")
        {
            modules.insert(stem);
        }
    }
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut imports = Imports::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let parts: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        let module = parts[0].trim_end_matches(".rs").to_string();
        if !modules.contains(&module) {
            continue;
        }
        let depth = parts.len() - 1 - usize::from(parts[parts.len() - 1] == "mod.rs");
        let code = code_of(&fs::read_to_string(&file).unwrap());
        for root in roots_named(&code, depth) {
            if root != module && modules.contains(root) {
                imports
                    .entry(module.clone())
                    .or_default()
                    .entry(root.to_string())
                    .or_default()
                    .insert(relative.display().to_string());
            }
        }
    }
    imports
}

/// A cycle of modules (first repeated last), if there is one.
fn cycle(imports: &Imports) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        imports: &Imports,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_string());
        for next in imports.get(module).into_iter().flat_map(BTreeMap::keys) {
            if let Some(cycle) = visit(next, imports, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(module.to_string());
        None
    }
    let mut done = BTreeSet::new();
    imports
        .keys()
        .find_map(|module| visit(module, imports, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_import_each_other_in_one_direction() {
    let imports = imports(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The scan sees imports at all: the relay steers through the data path.
    assert!(imports["relay"].contains_key("datapath"), "{imports:#?}");
    if let Some(cycle) = cycle(&imports) {
        let edges: Vec<String> = cycle
            .windows(2)
            .map(|pair| {
                let files = &imports[&pair[0]][&pair[1]];
                format!(
                    "{} -> {} ({})",
                    pair[0],
                    pair[1],
                    Vec::from_iter(files.iter().cloned()).join(", ")
                )
            })
            .collect();
        panic!(
            "the modules import each other in a cycle:\n{}",
            edges.join("\n")
        );
    }
}

#[test]
fn the_scan_reads_paths_and_not_comments_or_literals() {
    let code = code_of(
        "use crate::{values::Mark, stats};\n// crate::run\nlet s = \"crate::tools\";\n\
         let q = '\"'; let r = r#\"crate::cli\"#; super::super::daemon::x();",
    );
    assert_eq!(roots_named(&code, 2), ["values", "stats", "daemon"]);
    let imports = Imports::from([
        (
            "a".to_string(),
            BTreeMap::from([("b".to_string(), BTreeSet::new())]),
        ),
        (
            "b".to_string(),
            BTreeMap::from([("a".to_string(), BTreeSet::new())]),
        ),
    ]);
    assert_eq!(cycle(&imports).unwrap(), ["a", "b", "a"]);
}
