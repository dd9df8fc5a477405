//! The guard script, put together: the prelude idem generates from its
//! Rust names, then the files of `lua/` in order, one concept each (named
//! as the model's modules that state the same rules in Rust; the map is in
//! docs/development.md, "The guard's map"), with the custom effects
//! spliced in at `custom.lua`'s mark. Pure: files and snippets in, one
//! script out.
//!
//! The prelude's constants (verdict codes, rejection reasons, mutation
//! kinds and orders, key suffixes, the pairs limit) are top-level locals,
//! as the literals and locals they replace were: the functions read them
//! as upvalues, with no table lookup on the hot path. The script's top
//! level holds about a hundred locals of Lua 5.1's 200, and no function
//! reaches 60 upvalues; Redis refuses to compile a script past either,
//! and every test that runs the guard compiles it.

use super::args::{order_code, MutationKind};
use super::reply::VERDICT_CODES;
use crate::effects::{Order, Snippet};
use crate::event::Reason;
use crate::store::outbox::ENTRY_LUA;
use crate::store::script::{
    constant_name, lua_string, Builder, Constant, Named, Script, MAX_PAIRS,
};
use crate::store::{COUNTERS_SUFFIX, LEDGER_INFIX, META_SUFFIX, SET_INFIX};

/// The files, in the order they are joined: each uses what is above it.
/// The outbox entry's writer is the store's, shared with the snapshot.
const FILES: [(&str, &str); 11] = [
    ("src/guard/lua/call.lua", include_str!("lua/call.lua")),
    ("src/guard/lua/decimal.lua", include_str!("lua/decimal.lua")),
    ("src/guard/lua/custom.lua", include_str!("lua/custom.lua")),
    (
        "src/guard/lua/mutations.lua",
        include_str!("lua/mutations.lua"),
    ),
    ("src/guard/lua/read.lua", include_str!("lua/read.lua")),
    ("src/guard/lua/marks.lua", include_str!("lua/marks.lua")),
    ENTRY_LUA,
    ("src/guard/lua/writes.lua", include_str!("lua/writes.lua")),
    ("src/guard/lua/dense.lua", include_str!("lua/dense.lua")),
    (
        "src/guard/lua/per_field.lua",
        include_str!("lua/per_field.lua"),
    ),
    (
        "src/guard/lua/decisions.lua",
        include_str!("lua/decisions.lua"),
    ),
];

/// How the script ends: running the call, or reporting how it read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `main.lua`: decide every event of the call.
    Run,
    /// `report.lua`: what `read_call` made of the call, as JSON, nothing
    /// written (`Guard::parsed_by_script`).
    Report,
    /// `stub.lua`: every event read as `main.lua` reads it, with (`true`)
    /// or without the commands of a new plain merge event, no decision,
    /// every event answered applied. The benchmark's floor for the
    /// script's own time and its parts, never a run's
    /// (`IDEM_BENCH_GUARD_STUB`).
    Stub { commands: bool },
}

impl Ending {
    /// A stub where the benchmark asks for one (`IDEM_BENCH_GUARD_STUB=1`:
    /// reads and commands; `=arguments`: reads only), else `Run`.
    pub fn from_env() -> Ending {
        let ending = match std::env::var("IDEM_BENCH_GUARD_STUB").as_deref() {
            Ok("1") => Ending::Stub { commands: true },
            Ok("arguments") => Ending::Stub { commands: false },
            _ => return Ending::Run,
        };
        tracing::warn!("IDEM_BENCH_GUARD_STUB is set: the guard decides nothing and answers every event applied; for the benchmark's floor only");
        ending
    }
}

/// The line in custom.lua after which the custom effects go.
const CUSTOM_MARK: &str = "-- @CUSTOM\n";

/// Shadows what a pure effect must not touch.
const SANDBOX: &str = "local redis, KEYS, ARGV, _G, loadstring, rawset, rawget, setmetatable, getmetatable = nil, nil, nil, nil, nil, nil, nil, nil, nil";

/// Where the guard's files are, as error places name them.
const DIR: &str = "src/guard/lua/";

/// The prelude: every name the script shares with idem's Rust code.
pub fn constants() -> Vec<Named> {
    let mut out: Vec<Named> = VERDICT_CODES
        .iter()
        .map(|(name, code)| (name.to_string(), Constant::Int(*code)))
        .collect();
    let text =
        |prefix: &str, code: &str| (constant_name(prefix, code), Constant::Text(code.into()));
    out.extend(
        Reason::REJECTIONS
            .iter()
            .map(|r| text("REASON_", r.as_str())),
    );
    out.extend(MutationKind::ALL.iter().map(|k| text("KIND_", k.code())));
    out.extend([Order::Ordered, Order::Commutative].map(|o| text("ORDER_", order_code(o))));
    for (name, suffix) in [
        ("META_SUFFIX", META_SUFFIX),
        ("COUNTERS_SUFFIX", COUNTERS_SUFFIX),
        ("LEDGER_INFIX", LEDGER_INFIX),
        ("SET_INFIX", SET_INFIX),
    ] {
        out.push((name.into(), Constant::Text(suffix.into())));
    }
    out.push(("MAX_PAIRS".into(), Constant::Int(MAX_PAIRS)));
    out
}

/// The guard script with `snippets` (the custom effects) in it.
pub fn assemble(snippets: &[Snippet], ending: Ending) -> Script {
    let mut b = Builder::new(Some("#!lua"), &constants());
    for (path, text) in FILES {
        match text.split_once(CUSTOM_MARK) {
            Some((head, tail)) if !snippets.is_empty() => {
                let head = format!("{head}{CUSTOM_MARK}");
                b.file(path, &head);
                for (i, snippet) in snippets.iter().enumerate() {
                    push_snippet(&mut b, i + 1, snippet);
                }
                b.push(path, tail, head.lines().count() + 1);
            }
            _ => {
                b.file(path, text);
            }
        }
    }
    let (name, text) = match ending {
        Ending::Run => ("main.lua", include_str!("lua/main.lua")),
        Ending::Report => ("report.lua", include_str!("lua/report.lua")),
        Ending::Stub { commands } => {
            // One line, so stub.lua's line numbers stay its own.
            b.push("stub", &format!("local STUB_COMMANDS = {commands}\n"), 1);
            ("stub.lua", include_str!("lua/stub.lua"))
        }
    };
    b.file(&format!("{DIR}{name}"), text);
    b.finish()
}

/// `CUSTOM[index]`: a function of (state, counters, event) that cannot
/// reach `redis`, `KEYS` or `ARGV`, with the line offset that maps its
/// error messages (caught in the script) back to its file.
fn push_snippet(b: &mut Builder, index: usize, snippet: &Snippet) {
    let writes: Vec<String> = snippet
        .writes
        .iter()
        .map(|w| format!("[ {} ] = true", lua_string(w)))
        .collect();
    // The source starts two lines below the part's first.
    let offset = b.next_line() + 1;
    let head = format!(
        "CUSTOM[{index}] = {{ file = {}, writes = {{ {} }}, offset = {offset}, fn = function(state, counters, event)\n{SANDBOX}\n",
        lua_string(&snippet.file),
        writes.join(", "),
    );
    b.push("(custom effect)", &head, 1);
    b.file(&snippet.file, &snippet.source);
    b.push("(custom effect)", "end }\n", 1);
}

/// A standalone script that only compiles `snippet` (for the start-up
/// check): its errors, located, name the snippet's own lines.
pub fn compile_check(snippet: &Snippet) -> Script {
    let mut b = Builder::new(Some("#!lua flags=no-writes"), &[]);
    b.push(
        "(compile check)",
        "local f = function(state, counters, event)\n",
        1,
    );
    b.file(&snippet.file, &snippet.source);
    b.push("(compile check)", "end\nreturn 1\n", 1);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snippet(file: &str, source: &str) -> Snippet {
        Snippet {
            file: file.into(),
            source: source.into(),
            writes: vec!["p".into()],
        }
    }

    #[test]
    fn every_file_keeps_its_own_line_numbers() {
        let script = assemble(
            &[snippet("a]].lua", "local x = 1\nreturn { p = x }")],
            Ending::Run,
        );
        let lines: Vec<&str> = script.source().lines().collect();
        assert_eq!(lines[0], "#!lua");
        // Each file's first line, found in the whole, is named line 1 of it.
        for (name, text) in FILES {
            let first = text.lines().next().unwrap();
            let at = lines.iter().position(|l| *l == first).unwrap() + 1;
            assert_eq!(
                script.locate(&format!("user_script:{at}:")),
                format!("{name}:1:"),
                "{first}"
            );
        }
        // The snippet's lines are its own, in Rust and in the script's offset.
        let x = lines.iter().position(|l| *l == "local x = 1").unwrap() + 1;
        assert_eq!(script.locate(&format!("user_script:{x}:")), "a]].lua:1:");
        let offset: usize = script
            .source()
            .split("CUSTOM[1] = ")
            .nth(1)
            .and_then(|r| r.split("offset = ").nth(1))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert_eq!(x - offset, 1);
        assert!(script.source().contains("file = [=[a]].lua]=]"));
        // After the snippets, custom.lua goes on with its own numbering.
        let custom = FILES[2].1;
        let after = "local function hash_table(key)";
        let own = custom.lines().position(|l| l == after).unwrap() + 1;
        let at = lines.iter().position(|l| *l == after).unwrap() + 1;
        assert_eq!(
            script.locate(&format!("user_script:{at}:")),
            format!("{DIR}custom.lua:{own}:")
        );
        assert!(script.source().ends_with("return main()\n"));
    }

    #[test]
    fn without_snippets_the_files_are_joined_as_they_are() {
        let script = assemble(&[], Ending::Report);
        let body: String = FILES.iter().map(|(_, t)| *t).collect();
        assert!(script.source().contains(&body));
        assert!(script.source().ends_with("return cjson.encode(report)\n"));
        assert!(!script.source().contains("return main()"));
    }

    #[test]
    fn the_prelude_names_each_shared_value_once() {
        let names: Vec<String> = constants().into_iter().map(|(n, _)| n).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        for name in [
            "APPLIED",
            "SEQ_REUSED",
            "REASON_SEQ_GAP_CLOSED",
            "KIND_COUNTER_SET",
            "ORDER_COMMUTATIVE",
            "META_SUFFIX",
            "MAX_PAIRS",
        ] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
    }

    #[test]
    fn a_compile_check_names_the_snippets_lines() {
        let check = compile_check(&snippet("a.lua", "x = = 1"));
        assert!(check.source().starts_with("#!lua flags=no-writes\n"));
        assert_eq!(
            check.locate("Error compiling script (new function): user_script:3: unexpected symbol"),
            "Error compiling script (new function): a.lua:1: unexpected symbol"
        );
    }
}
