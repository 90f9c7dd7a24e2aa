//! How errors are shown on one line: the hooks', reconcile's and the route writer's log lines.

/// An error and its causes on one line, `a: b: c`, as the hooks' and reconcile's log lines
/// show them.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}
