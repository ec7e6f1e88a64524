//! cim-runtime
