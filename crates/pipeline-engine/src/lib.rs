//! pipeline-engine
