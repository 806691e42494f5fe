//! Test inputs that live outside the repository: the shared ESCI data (`../shared/data`), the
//! MiniLM weights (`scripts/fetch-minilm.sh`) and an external broker (`MERGE_INDEXER_E2E_BROKERS`).
//!
//! On a newcomer's machine a test whose input is absent is skipped with a message. CI sets
//! `MERGE_INDEXER_REQUIRE_TEST_INPUTS=1`, where every input is present by construction: there a
//! missing input fails the test, naming what is missing, so no test passes by skipping.

#![allow(dead_code)]

use std::io::Write;

/// The variable under which a missing input fails the test instead of skipping it.
pub const REQUIRE_TEST_INPUTS_ENV: &str = "MERGE_INDEXER_REQUIRE_TEST_INPUTS";

/// Whether this run requires every input (`MERGE_INDEXER_REQUIRE_TEST_INPUTS=1`).
pub fn inputs_required() -> bool {
    std::env::var(REQUIRE_TEST_INPUTS_ENV).is_ok_and(|value| value == "1")
}

/// Reports that `test` lacks `missing`: panics (fails the test) when inputs are required, else
/// prints `SKIPPED …` to stderr (past the harness's capture) and returns, and the caller returns.
pub fn skip_or_fail(test: &str, missing: &str) {
    if inputs_required() {
        panic!("{test}: required test input missing: {missing} ({REQUIRE_TEST_INPUTS_ENV}=1, as in CI)");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {missing}");
}
