"""Safety and provenance: what is allowed in, what is marked on the way out."""
