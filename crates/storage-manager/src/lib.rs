//! storage-manager
