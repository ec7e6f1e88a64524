//! The one integration-test binary: every module runs against real processes.

mod harness;
