//! Lua as idem sends it to Redis. A script is a prelude of constants,
//! generated from the Rust names the Lua shares with idem (so each is
//! written once, in Rust), then one or more `.lua` files joined in order.
//! Redis names the place of an error as `user_script:<line>` of the
//! whole; [`Script::locate`] maps it back to the file and line it came
//! from. Pure: text in, text out.
//!
//! The constants are top-level locals: the script's functions read them as
//! upvalues, as they read the literals and locals they replace, with no
//! table lookup on the hot path. Lua 5.1 allows 200 locals per function
//! (the script's top level is one) and 60 upvalues per function; the
//! guard's prelude holds about thirty (`guard::script` says why that is safe).

/// At most this many field/value pairs go into one command as pairs: Lua
/// passes at most ~8000 values to a call (`unpack`), so a state or effects
/// larger than this travel as one JSON field each (the guard's changes and
/// the snapshot).
pub const MAX_PAIRS: i64 = 3000;

/// A constant's value, as Lua writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constant {
    Int(i64),
    Text(String),
}

/// A name and its value: one `local NAME = value` line of a prelude.
pub type Named = (String, Constant);

/// A name in Lua's constant style: `counter_set` → `KIND_COUNTER_SET`.
pub fn constant_name(prefix: &str, code: &str) -> String {
    format!("{prefix}{}", code.to_ascii_uppercase())
}

/// A Lua long string literal that holds `text` whatever it contains.
pub fn lua_string(text: &str) -> String {
    let mut eq = String::new();
    while text.contains(&format!("]{eq}]")) || text.ends_with(&format!("]{eq}")) {
        eq.push('=');
    }
    format!("[{eq}[{text}]{eq}]")
}

/// A script being put together: parts are appended in order, each
/// remembered with the line where it starts.
#[derive(Debug)]
pub struct Builder {
    source: String,
    lines: usize,
    parts: Vec<Place>,
}

/// Where a part of the script starts, and what its first line is called.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    /// The line of the whole script where the part starts (1-based).
    at: usize,
    /// The file it came from.
    name: String,
    /// The file's line number of the part's first line.
    first_line: usize,
}

impl Builder {
    /// A script that starts with `shebang` (`#!lua`, with its flags; `None`
    /// for a script without, which Redis runs as before 7.0) and the
    /// prelude of `constants`.
    pub fn new(shebang: Option<&str>, constants: &[Named]) -> Builder {
        let mut b = Builder {
            source: String::new(),
            lines: 0,
            parts: Vec::new(),
        };
        if let Some(line) = shebang {
            b.push("(shebang)", &format!("{line}\n"), 1);
        }
        if !constants.is_empty() {
            let mut prelude = String::from(
                "-- Constants idem defines in Rust (generated, src/store/script.rs).\n",
            );
            for (name, value) in constants {
                let value = match value {
                    Constant::Int(n) => n.to_string(),
                    Constant::Text(t) => lua_string(t),
                };
                prelude.push_str(&format!("local {name} = {value}\n"));
            }
            b.push("(prelude)", &prelude, 1);
        }
        b
    }

    /// The line of the whole script the next part starts at.
    pub fn next_line(&self) -> usize {
        self.lines + 1
    }

    /// Appends `text`, whose first line is line `first_line` of `name`.
    pub fn push(&mut self, name: &str, text: &str, first_line: usize) -> &mut Builder {
        self.parts.push(Place {
            at: self.next_line(),
            name: name.to_string(),
            first_line,
        });
        self.source.push_str(text);
        if !text.ends_with('\n') {
            self.source.push('\n');
        }
        // The part's own lines, not the whole source counted again.
        self.lines += text.lines().count().max(1);
        self
    }

    /// Appends a whole file.
    pub fn file(&mut self, name: &str, text: &str) -> &mut Builder {
        self.push(name, text, 1)
    }

    pub fn finish(self) -> Script {
        Script {
            source: self.source,
            parts: self.parts,
        }
    }
}

/// A script put together, and where each of its parts came from.
#[derive(Debug, Clone)]
pub struct Script {
    source: String,
    parts: Vec<Place>,
}

impl Script {
    /// A script of one file with a prelude.
    pub fn of(shebang: Option<&str>, constants: &[Named], name: &str, text: &str) -> Script {
        let mut b = Builder::new(shebang, constants);
        b.file(name, text);
        b.finish()
    }

    /// The text Redis runs.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `text` (an error Redis returned) with each `user_script:<line>`
    /// turned into the file and line it came from.
    pub fn locate(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("user_script:") {
            out.push_str(&rest[..at]);
            let after = &rest[at + "user_script:".len()..];
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            match digits.parse::<usize>().ok().and_then(|n| self.place_of(n)) {
                Some(place) => out.push_str(&place),
                None => out.push_str(&format!("user_script:{digits}")),
            }
            rest = &after[digits.len()..];
        }
        out.push_str(rest);
        out
    }

    /// `file:line` of the script's line `line`.
    fn place_of(&self, line: usize) -> Option<String> {
        let part = self.parts.iter().rev().find(|p| p.at <= line)?;
        Some(format!(
            "{}:{}",
            part.name,
            line - part.at + part.first_line
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_is_named_by_its_file_and_line() {
        let mut b = Builder::new(
            Some("#!lua"),
            &[
                ("APPLIED".into(), Constant::Int(0)),
                ("SUFFIX".into(), Constant::Text(":meta]]".into())),
            ],
        );
        b.file("a.lua", "local x = 1\nlocal y = 2\n");
        assert_eq!(b.next_line(), 7);
        b.push("b.lua", "z()", 10);
        let script = b.finish();
        assert_eq!(
            script.source(),
            "#!lua\n-- Constants idem defines in Rust (generated, src/store/script.rs).\n\
             local APPLIED = 0\nlocal SUFFIX = [=[:meta]]]=]\n\
             local x = 1\nlocal y = 2\nz()\n"
        );
        assert_eq!(
            script.locate("ERR user_script:6: oops, user_script:7: and user_script:3:"),
            "ERR a.lua:2: oops, b.lua:10: and (prelude):2:"
        );
        assert_eq!(script.locate("user_script:x"), "user_script:x");
        assert_eq!(script.locate("no place"), "no place");
    }

    #[test]
    fn names_and_strings_are_lua() {
        assert_eq!(constant_name("KIND_", "counter_set"), "KIND_COUNTER_SET");
        assert_eq!(lua_string("tags]"), "[=[tags]]=]");
        assert_eq!(lua_string("a]]b"), "[=[a]]b]=]");
        let plain = Script::of(None, &[], "x.lua", "return 1\n");
        assert_eq!(plain.source(), "return 1\n");
        assert_eq!(plain.locate("user_script:1:"), "x.lua:1:");
    }
}
