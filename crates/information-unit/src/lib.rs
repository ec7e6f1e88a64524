//! information-unit
