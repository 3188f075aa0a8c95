//! `--output json|table`: one place decides between the JSON document and the
//! human-readable text.

use super::Output;

/// Prints `value` as pretty JSON when `output` is [`Output::Json`], otherwise runs `human`
/// (which prints the table or text form).
pub(crate) fn emit<T: serde::Serialize + ?Sized>(output: Output, value: &T, human: impl FnOnce()) {
    match output {
        Output::Json => print_json(value),
        Output::Table => human(),
    }
}

/// Prints `v` as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}
