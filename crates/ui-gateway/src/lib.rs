//! ui-gateway
