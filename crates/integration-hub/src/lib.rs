//! integration-hub
