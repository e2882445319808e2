"""qmail's on-disk queue: layout, envelopes, the crash-safe writer, readers and cleaning."""
