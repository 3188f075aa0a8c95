//! LUKS2 header: parse, validate, and write both copies (DESIGN §4).
//!
//! (Being written by the luks2 work; see the module contract in DESIGN.md §4.)
