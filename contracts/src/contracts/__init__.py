"""The messages every Assay process shares: payloads, envelope, subjects and streams, signatures, JSON Schema."""
