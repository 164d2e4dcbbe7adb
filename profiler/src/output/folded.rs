//! Folded stacks (`root;caller;callee value` per line), the input of
//! flamegraph tools.
use super::View;

/// One line per stack, frames outermost first.
pub(crate) fn render(view: &View) -> String {
    let mut out = String::new();
    for s in &view.stacks {
        push_stack(&mut out, &s.frames);
        out.push(' ');
        out.push_str(&s.value.to_string());
        out.push('\n');
    }
    out
}

/// Appends `frames` joined by `;`, each made safe by [`push_frame`].
pub(crate) fn push_stack(out: &mut String, frames: &[String]) {
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        push_frame(out, f);
    }
}

/// A frame name as the folded format can carry it: `;` separates frames,
/// so it becomes `:`; a line break would start a new stack, so `\n` and
/// `\r` are written as those two characters.
fn push_frame(out: &mut String, name: &str) {
    for c in name.chars() {
        match c {
            ';' => out.push(':'),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}
