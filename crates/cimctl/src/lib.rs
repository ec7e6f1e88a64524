//! cimctl
